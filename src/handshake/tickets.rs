//! Session ticket keys (RFC 8446 §4.6.1, RFC 5077 for TLS 1.2) that a
//! fleet shares with no coordination.
//!
//! Every key is derived from one secret and the time epoch
//! (`unix time / rotation`), so every host holding the same secret issues
//! and accepts the same tickets and rotates at the same moment; a ticket of
//! the previous epoch is still accepted (and of the next, for hosts whose
//! clocks run a little ahead at the boundary). Without a configured secret,
//! the process makes a random one at start: every shard and every reload
//! share it, as before, and nothing outside the process can open its
//! tickets.
//!
//! Ticket: `epoch (8, big-endian) | salt (16) | AES-256-GCM(state) | tag (16)`.
//! Each ticket has its own key, HKDF-SHA256-expanded from the secret with
//! the epoch and a random salt (RFC 5869), so the nonce can be fixed: a
//! fleet issuing more than 2^32 tickets per epoch under one key would push
//! random 96-bit GCM nonces past their collision bound (NIST SP 800-38D
//! §8.3); per-ticket keys have no such limit. Costs one HMAC pair per
//! ticket, noise beside the handshake's signature.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

pub use crate::config::MIN_TICKET_SECRET as MIN_SECRET;

/// RFC 8446 §4.6.1: a ticket lifetime is at most 7 days.
pub const MAX_LIFETIME: u32 = 604_800;

const SALT_LEN: usize = 16;
const HEADER: usize = 8 + SALT_LEN;
const TAG: usize = 16;

/// Label for the HKDF extract (domain separation from any other use of
/// the same secret).
const EXTRACT_SALT: &[u8] = b"ktern session tickets v1";

/// The ticket keys of one secret and rotation period.
pub struct TicketKeys {
    prk: hkdf::Prk,
    rotation: u64,
    rng: SystemRandom,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

/// Why ticket keys cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    /// The secret is shorter than [`MIN_SECRET`].
    #[error("the ticket secret has {0} bytes; at least {MIN_SECRET} are needed")]
    ShortSecret(usize),
    /// No randomness for the process's own secret.
    #[error("no randomness for the ticket secret")]
    NoRandom,
}

impl TicketKeys {
    /// Keys from `secret` rotating every `rotation_secs` (at least 1).
    pub fn new(secret: &[u8], rotation_secs: u64) -> Result<TicketKeys, TicketKeyError> {
        if secret.len() < MIN_SECRET {
            return Err(TicketKeyError::ShortSecret(secret.len()));
        }
        Ok(TicketKeys {
            prk: hkdf::Salt::new(hkdf::HKDF_SHA256, EXTRACT_SALT).extract(secret),
            rotation: rotation_secs.max(1),
            rng: SystemRandom::new(),
        })
    }

    /// Keys from a fresh random secret: this process alone can open its
    /// tickets.
    pub fn random(rotation_secs: u64) -> Result<TicketKeys, TicketKeyError> {
        TicketKeys::new(&random_secret()?, rotation_secs)
    }

    fn epoch(&self, unix_secs: u64) -> u64 {
        unix_secs / self.rotation
    }

    /// The AES-256-GCM key of one ticket.
    fn key(&self, epoch: u64, salt: &[u8]) -> Option<LessSafeKey> {
        let epoch = epoch.to_be_bytes();
        let info = [b"ticket key".as_slice(), &epoch, salt];
        let okm = self.prk.expand(&info, &aead::AES_256_GCM).ok()?;
        let mut bytes = [0u8; 32];
        okm.fill(&mut bytes).ok()?;
        Some(LessSafeKey::new(
            UnboundKey::new(&aead::AES_256_GCM, &bytes).ok()?,
        ))
    }

    /// Seals `plain` as a ticket of the epoch of `now` (Unix seconds).
    pub fn seal_at(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let epoch = self.epoch(now);
        let mut out = Vec::with_capacity(HEADER + plain.len() + TAG);
        out.extend_from_slice(&epoch.to_be_bytes());
        let mut salt = [0u8; SALT_LEN];
        self.rng.fill(&mut salt).ok()?;
        out.extend_from_slice(&salt);
        let key = self.key(epoch, &salt)?;
        let mut body = plain.to_vec();
        // The key is used once, so a fixed nonce is safe; the header is
        // authenticated so an epoch cannot be moved.
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&out[..HEADER]),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// Opens a ticket sealed in the previous, current or next epoch of
    /// `now`; anything else (another secret, another epoch, altered bytes)
    /// is `None`, and the client gets a full handshake.
    pub fn open_at(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < HEADER + TAG {
            return None;
        }
        let epoch = u64::from_be_bytes(ticket[..8].try_into().ok()?);
        let current = self.epoch(now);
        // The bytes are the client's: any epoch may arrive (no overflow).
        if epoch.saturating_add(1) < current || epoch > current.saturating_add(1) {
            return None;
        }
        let key = self.key(epoch, &ticket[8..HEADER])?;
        let mut body = ticket[HEADER..].to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(&ticket[..HEADER]),
                &mut body,
            )
            .ok()?
            .len();
        body.truncate(plain);
        Some(body)
    }
}

/// A random secret for a process that has no fleet secret.
pub fn random_secret() -> Result<[u8; MIN_SECRET], TicketKeyError> {
    let mut secret = [0u8; MIN_SECRET];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| TicketKeyError::NoRandom)?;
    Ok(secret)
}

/// The ticket keys a config generation uses: from the fleet secret when
/// configured, else from `own` (the process's random secret).
pub fn for_config(
    tickets: &crate::config::Tickets,
    own: &[u8],
) -> Result<Arc<dyn rustls::server::ProducesTickets>, TicketKeyError> {
    let secret = tickets.secret.as_ref().map_or(own, |s| &s.0);
    Ok(Arc::new(TicketKeys::new(
        secret,
        tickets.rotation.as_secs(),
    )?))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl rustls::server::ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    /// The lifetime hint: a ticket stays valid for at least one rotation
    /// (it is accepted through the next epoch).
    fn lifetime(&self) -> u32 {
        self.rotation.min(MAX_LIFETIME as u64) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(cipher, now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OTHER: &[u8] = b"0123456789abcdef0123456789abcdeF";

    #[test]
    fn hosts_with_one_secret_open_each_others_tickets_across_one_rotation() {
        let (a, b) = (
            TicketKeys::new(SECRET, 3600).unwrap(),
            TicketKeys::new(SECRET, 3600).unwrap(),
        );
        let t0 = 500_000 * 3600; // the start of an epoch
        let ticket = a.seal_at(b"session state", t0 + 10).unwrap();
        assert_eq!(
            b.open_at(&ticket, t0 + 20).as_deref(),
            Some(&b"session state"[..])
        );
        // The next epoch still accepts it; the one after does not.
        assert!(b.open_at(&ticket, t0 + 3600 + 5).is_some());
        assert!(b.open_at(&ticket, t0 + 7200 + 5).is_none());
        // A host whose clock is a little ahead issues next-epoch tickets.
        let ahead = a.seal_at(b"x", t0 + 3600).unwrap();
        assert!(b.open_at(&ahead, t0 + 3599).is_some());
        // Two tickets never share a key.
        assert_ne!(a.seal_at(b"x", t0).unwrap(), a.seal_at(b"x", t0).unwrap());
    }

    #[test]
    fn another_secret_or_altered_bytes_open_nothing() {
        let a = TicketKeys::new(SECRET, 60).unwrap();
        let other = TicketKeys::new(OTHER, 60).unwrap();
        let now = 1_800_000_000;
        let ticket = a.seal_at(b"state", now).unwrap();
        assert!(other.open_at(&ticket, now).is_none());
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert!(a.open_at(&bad, now).is_none(), "byte {i}");
        }
        assert!(a.open_at(&ticket[..HEADER + TAG - 1], now).is_none());
        assert!(a.open_at(&[], now).is_none());
        // An epoch of u64::MAX (found by fuzz/fuzz_targets/session_ticket.rs).
        let mut far = ticket.clone();
        far[..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(a.open_at(&far, now).is_none());
        // A random secret is this process's alone.
        let r = TicketKeys::random(60).unwrap();
        assert!(a.open_at(&r.seal_at(b"s", now).unwrap(), now).is_none());
    }

    #[test]
    fn short_secrets_are_refused_and_lifetime_is_capped() {
        assert!(matches!(
            TicketKeys::new(&SECRET[..31], 60),
            Err(TicketKeyError::ShortSecret(31))
        ));
        use rustls::server::ProducesTickets;
        assert_eq!(TicketKeys::new(SECRET, 43_200).unwrap().lifetime(), 43_200);
        assert_eq!(
            TicketKeys::new(SECRET, 30 * 86_400).unwrap().lifetime(),
            MAX_LIFETIME
        );
    }
}
