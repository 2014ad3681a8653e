//! Session ticket keys (RFC 8446 §4.6.1, RFC 5077 for TLS 1.2).
//!
//! Time is cut into epochs (`unix time / rotation`). A ticket is sealed
//! under a key of its epoch and opens in that epoch and the next, so it
//! lives between one and two rotations (the lifetime hint says one).
//! Where the epoch keys come from:
//! - **A fleet secret** (`[tickets] secret_file`): every epoch's key is
//!   HKDF-derived from it, so every host holding the same secret issues
//!   and accepts the same tickets and rotates at the same moment, with no
//!   coordination (a host whose clock is a little ahead issues tickets of
//!   the next epoch: those open too). Forward secrecy is then the secret
//!   file's: whoever reads it later opens every ticket sealed under it.
//! - **No secret**: a random key per epoch, made when the epoch begins and
//!   forgotten after the next one, shared by every shard and every reload
//!   of this process. A ticket cannot be opened, by anyone, two rotations
//!   after it was issued.
//!
//! Every key also binds the listener's name, so a ticket issued on one
//! listener never resumes on another (rustls checks only the suite and
//! the SNI on resumption; another listener may front other backends), and
//! its client authentication settings (a resumed session is not asked for
//! a certificate: a CA, CRL or mode changed by a reload must not be
//! bypassed by a session from before it).
//!
//! Ticket: `epoch (8, big-endian) | salt (16) | AES-256-GCM(state) | tag (16)`.
//! Each ticket has its own key, HKDF-SHA256-expanded (RFC 5869) with the
//! epoch, the listener and a random salt, so the nonce can be fixed: a
//! fleet issuing more than 2^32 tickets per epoch under one key would push
//! random 96-bit GCM nonces past their collision bound (NIST SP 800-38D
//! §8.3); per-ticket keys have no such limit. Costs one HMAC per ticket,
//! on the PRK's state keyed once: noise beside the handshake's signature.

use std::sync::{Arc, Mutex};

use crate::provider::prims::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
#[cfg(test)]
use crate::provider::prims::hkdf;
use crate::provider::prims::hmac;
use crate::provider::prims::rand::{SecureRandom, SystemRandom};

pub use crate::config::MIN_TICKET_SECRET as MIN_SECRET;

/// RFC 8446 §4.6.1: a ticket lifetime is at most 7 days. A ticket opens
/// for up to two rotations, so rotation is at most half of this.
pub const MAX_LIFETIME: u32 = 604_800;

const SALT_LEN: usize = 16;
const HEADER: usize = 8 + SALT_LEN;
const TAG: usize = 16;

/// Label for the HKDF extract (domain separation from any other use of
/// the same secret).
const EXTRACT_SALT: &[u8] = b"ktern session tickets v1";

/// Where epoch keys come from.
enum Source {
    /// One pseudorandom key for every epoch (the epoch is in each
    /// ticket key's info).
    /// Boxed: an aws-lc-rs HMAC key holds its keyed state, 1.2 KB.
    Fleet(Box<hmac::Key>),
    /// A random key per epoch: (epoch, key), the current and the previous.
    Random(Mutex<Vec<(u64, hmac::Key)>>),
}

/// The ticket keys of one source and rotation period, shared by every
/// listener (each through its [`ListenerTickets`]).
pub struct TicketKeys {
    source: Source,
    rotation: u64,
    rng: SystemRandom,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("fleet", &matches!(self.source, Source::Fleet(_)))
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
}

/// A fleet secret's fingerprint, for the log: 8 bytes of an HMAC keyed by
/// the secret over a fixed label, in hex. Hosts that log the same one
/// share tickets; one that read a half-written file logs another. Reveals
/// nothing of the secret (HMAC is a PRF keyed by it).
pub fn fingerprint(secret: &[u8]) -> String {
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, secret),
        b"ktern ticket secret fingerprint",
    );
    tag.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// HKDF-Extract (RFC 5869 §2.2: PRK = HMAC-Hash(salt, IKM)), done here
/// rather than by `Salt::extract`: aws-lc-rs's extracted key keeps the
/// secret and reruns the extract in every expansion, twice per resumed
/// handshake (one ticket opened, one sealed). The PRK is kept as an HMAC
/// key, keyed once ([`expand`]).
fn extract(secret: &[u8]) -> hmac::Key {
    let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, EXTRACT_SALT), secret);
    hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref())
}

/// HKDF-Expand (RFC 5869 §2.3) of 32 bytes, one hash length: T(1) =
/// HMAC-Hash(PRK, info | 0x01), on the PRK's keyed HMAC. `Prk::expand`
/// keys a new HMAC with the PRK for every call (two SHA-256 blocks, and
/// copies of the HMAC state), and a full handshake seals two tickets.
fn expand(prk: &hmac::Key, info: &[&[u8]]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(prk);
    for part in info {
        ctx.update(part);
    }
    ctx.update(&[1]);
    let mut out = [0u8; 32];
    out.copy_from_slice(&ctx.sign().as_ref()[..32]);
    out
}

impl TicketKeys {
    /// Keys derived from a fleet's `secret`, rotating every
    /// `rotation_secs` (at least 1).
    pub fn fleet(secret: &[u8], rotation_secs: u64) -> Result<TicketKeys, TicketKeyError> {
        if secret.len() < MIN_SECRET {
            return Err(TicketKeyError::ShortSecret(secret.len()));
        }
        Ok(TicketKeys {
            source: Source::Fleet(Box::new(extract(secret))),
            rotation: rotation_secs.max(1),
            rng: SystemRandom::new(),
        })
    }

    /// Random keys, a new one each epoch: this process alone can open its
    /// tickets, and only for two rotations.
    pub fn random(rotation_secs: u64) -> TicketKeys {
        TicketKeys {
            source: Source::Random(Mutex::new(Vec::with_capacity(3))),
            rotation: rotation_secs.max(1),
            rng: SystemRandom::new(),
        }
    }

    /// The rotation period, seconds.
    pub fn rotation(&self) -> u64 {
        self.rotation
    }

    fn epoch(&self, unix_secs: u64) -> u64 {
        unix_secs / self.rotation
    }

    /// The AES-256-GCM key of one ticket: epoch key, then HKDF-Expand with
    /// the rotation, the epoch, the listener and the ticket's salt.
    /// `issue`: the epoch is the current one and may need a new random
    /// key; otherwise a missing random key means "forgotten".
    fn key(&self, epoch: u64, context: &[u8], salt: &[u8], issue: bool) -> Option<LessSafeKey> {
        let (rotation, epoch_be) = (self.rotation.to_be_bytes(), epoch.to_be_bytes());
        let info = [
            b"ticket key".as_slice(),
            &rotation,
            &epoch_be,
            &(context.len() as u16).to_be_bytes(),
            context,
            salt,
        ];
        let bytes = match &self.source {
            Source::Fleet(prk) => expand(prk, &info),
            Source::Random(keys) => {
                let mut keys = keys.lock().unwrap_or_else(|e| e.into_inner());
                if issue && keys.last().is_none_or(|(e, _)| *e < epoch) {
                    let mut fresh = [0u8; 32];
                    self.rng.fill(&mut fresh).ok()?;
                    keys.push((epoch, extract(&fresh)));
                    // Forget all but this epoch's and the previous one's.
                    keys.retain(|(e, _)| e.saturating_add(1) >= epoch);
                }
                let (_, prk) = keys.iter().find(|(e, _)| *e == epoch)?;
                expand(prk, &info)
            }
        };
        Some(LessSafeKey::new(
            UnboundKey::new(&aead::AES_256_GCM, &bytes).ok()?,
        ))
    }

    /// Seals `plain` for listener `context` at `now` (Unix seconds).
    pub fn seal_at(&self, context: &[u8], plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let epoch = self.epoch(now);
        let mut out = Vec::with_capacity(HEADER + plain.len() + TAG);
        out.extend_from_slice(&epoch.to_be_bytes());
        let mut salt = [0u8; SALT_LEN];
        self.rng.fill(&mut salt).ok()?;
        out.extend_from_slice(&salt);
        let key = self.key(epoch, context, &salt, true)?;
        out.extend_from_slice(plain);
        // Sealed in place in the ticket (no second buffer). The key is
        // used once, so a fixed nonce is safe; the header is authenticated
        // so an epoch cannot be moved.
        let (header, body) = out.split_at_mut(HEADER);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(&*header),
                body,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// Opens a ticket of listener `context` sealed in the previous,
    /// current or next epoch of `now`; anything else (another secret,
    /// listener or epoch, a forgotten key, altered bytes) is `None`, and
    /// the client gets a full handshake.
    pub fn open_at(&self, context: &[u8], ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < HEADER + TAG {
            return None;
        }
        let epoch = u64::from_be_bytes(ticket[..8].try_into().ok()?);
        let current = self.epoch(now);
        // The bytes are the client's: any epoch may arrive (no overflow).
        if epoch.saturating_add(1) < current || epoch > current.saturating_add(1) {
            return None;
        }
        let key = self.key(epoch, context, &ticket[8..HEADER], false)?;
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

/// The ticket keys a config generation uses: the fleet secret's when
/// configured, else `own` (the process's random keys, kept across
/// reloads) unless the rotation changed.
pub fn for_config(
    tickets: &crate::config::Tickets,
    own: &Arc<TicketKeys>,
) -> Result<Arc<TicketKeys>, TicketKeyError> {
    let rotation = tickets.rotation.as_secs();
    Ok(match &tickets.secret {
        Some(s) => Arc::new(TicketKeys::fleet(&s.0, rotation)?),
        None if own.rotation == rotation => own.clone(),
        None => Arc::new(TicketKeys::random(rotation)),
    })
}

/// One listener's tickets: the shared keys, bound to the listener's name.
#[derive(Debug)]
pub struct ListenerTickets {
    keys: Arc<TicketKeys>,
    context: Box<[u8]>,
}

impl ListenerTickets {
    /// `keys` for the listener whose [`crate::config::Listener::ticket_context`]
    /// is `context`.
    pub fn for_listener(
        keys: &Arc<TicketKeys>,
        context: &[u8],
    ) -> Arc<dyn rustls::server::ProducesTickets> {
        Arc::new(ListenerTickets {
            keys: keys.clone(),
            context: context.into(),
        })
    }
}

impl rustls::server::ProducesTickets for ListenerTickets {
    fn enabled(&self) -> bool {
        true
    }

    /// The lifetime hint: a ticket stays valid for at least one rotation
    /// (it is accepted through the next epoch).
    fn lifetime(&self) -> u32 {
        self.keys.rotation.min(MAX_LIFETIME as u64) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.keys
            .seal_at(&self.context, plain, crate::clock::unix_now() as u64)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.keys
            .open_at(&self.context, cipher, crate::clock::unix_now() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OTHER: &[u8] = b"0123456789abcdef0123456789abcdeF";
    const L: &[u8] = b"public";
    /// The start of an epoch of one hour.
    const T0: u64 = 500_000 * 3600;

    /// The explicit extract and expand derive what `Salt::extract` and
    /// `Prk::expand` do, so hosts of a fleet running the releases before
    /// and after them share tickets.
    #[test]
    fn the_extract_and_expand_are_hkdfs() {
        let info: [&[u8]; 3] = [b"ticket key", b"\x00\x01", b"listener and salt"];
        let ours = expand(&extract(SECRET), &info);
        let mut theirs = [0u8; 32];
        hkdf::Salt::new(hkdf::HKDF_SHA256, EXTRACT_SALT)
            .extract(SECRET)
            .expand(&info, &aead::AES_256_GCM)
            .unwrap()
            .fill(&mut theirs)
            .unwrap();
        assert_eq!(ours, theirs);
        // And a known answer: RFC 5869 test case 1's expansion (L = 32
        // of its 42 bytes), from its PRK.
        let prk = hmac::Key::new(
            hmac::HMAC_SHA256,
            &hex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"),
        );
        let okm = expand(&prk, &[&hex("f0f1f2f3f4f5f6f7f8f9")]);
        assert_eq!(
            okm.to_vec(),
            hex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf")
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn hosts_with_one_secret_open_each_others_tickets_across_one_rotation() {
        let (a, b) = (
            TicketKeys::fleet(SECRET, 3600).unwrap(),
            TicketKeys::fleet(SECRET, 3600).unwrap(),
        );
        let ticket = a.seal_at(L, b"session state", T0 + 10).unwrap();
        assert_eq!(
            b.open_at(L, &ticket, T0 + 20).as_deref(),
            Some(&b"session state"[..])
        );
        // The next epoch still accepts it; the one after does not.
        assert!(b.open_at(L, &ticket, T0 + 3600 + 5).is_some());
        assert!(b.open_at(L, &ticket, T0 + 7200 + 5).is_none());
        // A host whose clock is a little ahead issues next-epoch tickets.
        let ahead = a.seal_at(L, b"x", T0 + 3600).unwrap();
        assert!(b.open_at(L, &ahead, T0 + 3599).is_some());
        // Another listener's tickets do not open here.
        assert!(b.open_at(b"admin", &ticket, T0 + 20).is_none());
        // Nor with another rotation (its epochs mean other times).
        let c = TicketKeys::fleet(SECRET, 1800).unwrap();
        assert!(c.open_at(L, &ticket, T0 + 20).is_none());
    }

    #[test]
    fn random_keys_are_this_processs_and_forgotten_after_two_rotations() {
        let k = TicketKeys::random(3600);
        let old = k.seal_at(L, b"s", T0 + 10).unwrap();
        assert!(k.open_at(L, &old, T0 + 20).is_some());
        // A new epoch's first ticket makes its key; the old one still opens.
        let new = k.seal_at(L, b"s", T0 + 3600 + 10).unwrap();
        assert!(k.open_at(L, &old, T0 + 3600 + 20).is_some());
        // Two epochs on, the first key is gone: even a clock turned back
        // cannot open its ticket.
        let _ = k.seal_at(L, b"s", T0 + 7200 + 10).unwrap();
        assert!(k.open_at(L, &old, T0 + 20).is_none());
        assert!(k.open_at(L, &new, T0 + 7200 + 20).is_some());
        // Another process (or a fleet) opens none of them.
        let other = TicketKeys::random(3600);
        assert!(other.open_at(L, &new, T0 + 7200 + 20).is_none());
        // A ticket of an epoch that never had a key opens nothing.
        let fleet = TicketKeys::fleet(SECRET, 3600).unwrap();
        let foreign = fleet.seal_at(L, b"s", T0 + 7200).unwrap();
        assert!(k.open_at(L, &foreign, T0 + 7200 + 20).is_none());
    }

    #[test]
    fn another_secret_or_altered_bytes_open_nothing() {
        let a = TicketKeys::fleet(SECRET, 60).unwrap();
        let other = TicketKeys::fleet(OTHER, 60).unwrap();
        let now = 1_800_000_000;
        let ticket = a.seal_at(L, b"state", now).unwrap();
        assert!(other.open_at(L, &ticket, now).is_none());
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert!(a.open_at(L, &bad, now).is_none(), "byte {i}");
        }
        assert!(a.open_at(L, &ticket[..HEADER + TAG - 1], now).is_none());
        assert!(a.open_at(L, &[], now).is_none());
        // An epoch of u64::MAX (found by fuzz/fuzz_targets/session_ticket.rs).
        let mut far = ticket.clone();
        far[..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(a.open_at(L, &far, now).is_none());
        // Each ticket has its own salt, so its own key.
        assert_ne!(
            a.seal_at(L, b"x", now).unwrap()[8..HEADER],
            a.seal_at(L, b"x", now).unwrap()[8..HEADER]
        );
    }

    #[test]
    fn short_secrets_are_refused_and_lifetime_is_capped() {
        assert!(matches!(
            TicketKeys::fleet(&SECRET[..31], 60),
            Err(TicketKeyError::ShortSecret(31))
        ));
        let keys = Arc::new(TicketKeys::fleet(SECRET, 43_200).unwrap());
        assert_eq!(
            ListenerTickets::for_listener(&keys, b"l").lifetime(),
            43_200
        );
        let long = Arc::new(TicketKeys::random(30 * 86_400));
        assert_eq!(
            ListenerTickets::for_listener(&long, b"l").lifetime(),
            MAX_LIFETIME
        );
    }
}
