//! The kernel record path: after the handshake the session keys go to the
//! kernel (kTLS), which seals and opens every record. What stays here is
//! the key schedule: rustls' `KernelConnection` computes new secrets on a
//! TLS 1.3 KeyUpdate, and ktern counts records against the cipher's
//! confidentiality limit (the caller's job once the kernel encrypts, as
//! `rustls::kernel` says) and rekeys where the kernel can (Linux 6.13+).
//! The socket I/O (records, waits) is `stream.rs`'s.

use std::io;
use std::os::fd::BorrowedFd;

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};

use super::record::{self, RecordBudget};
use super::stream::StreamError;
use super::user::UserConn;
use super::OffloadError;
use crate::handshake::ServerData;
use crate::sys::{self, KeyDirection};

/// rustls' key schedule after the handshake, for either end.
pub(super) enum KernelConn {
    /// ktern is the server: a client's connection.
    Server(KernelConnection<ServerData>),
    /// ktern is the client: a backend's connection (`tls` on a route).
    Client(KernelConnection<ClientConnectionData>),
}

impl KernelConn {
    fn suite(&self) -> SupportedCipherSuite {
        match self {
            KernelConn::Server(c) => c.negotiated_cipher_suite(),
            KernelConn::Client(c) => c.negotiated_cipher_suite(),
        }
    }

    fn version(&self) -> ProtocolVersion {
        match self {
            KernelConn::Server(c) => c.protocol_version(),
            KernelConn::Client(c) => c.protocol_version(),
        }
    }

    fn next_secret(
        &mut self,
        dir: KeyDirection,
    ) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match (self, dir) {
            (KernelConn::Server(c), KeyDirection::Transmit) => c.update_tx_secret(),
            (KernelConn::Server(c), KeyDirection::Receive) => c.update_rx_secret(),
            (KernelConn::Client(c), KeyDirection::Transmit) => c.update_tx_secret(),
            (KernelConn::Client(c), KeyDirection::Receive) => c.update_rx_secret(),
        }
    }
}

/// Key-schedule state under kTLS.
pub(super) struct Kernel {
    conn: KernelConn,
    /// TLS 1.3 (KeyUpdate exists; TLS 1.2 connections cannot rekey).
    pub(super) tls13: bool,
    /// The kernel accepts replacement keys (Linux 6.13+).
    rekey: bool,
    /// Records sealed with the current TX key.
    tx_budget: RecordBudget,
    /// Records opened with the current RX key (estimated from bytes: the
    /// kernel does not say how many records a read spanned).
    rx_budget: RecordBudget,
    /// Our next KeyUpdate should ask the peer to update its key too (our
    /// RX budget is nearly spent).
    request_peer_update: bool,
    /// The peer requested a KeyUpdate; the writer sends ours before its next record.
    tx_update_pending: bool,
    /// KeyUpdates received since the last application data
    /// ([`MAX_KEY_UPDATES_IN_A_ROW`]).
    key_updates_in_a_row: u8,
    /// Counters the shard reads after the connection.
    pub(super) rx_rekeys: u64,
    pub(super) tx_rekeys: u64,
}

/// KeyUpdates a peer may send with no application data between them, as
/// rustls allows on the userspace path (its `allowed_key_update_requests`,
/// BoringSSL's too): each costs a key derivation and a `setsockopt` on
/// the shard's thread for a 27-byte record.
const MAX_KEY_UPDATES_IN_A_ROW: u8 = 32;

/// What a write must do first.
pub(super) enum TxStep {
    /// Nothing: write.
    Write,
    /// Send our KeyUpdate (asking the peer to update too if `request`),
    /// then [`Kernel::install_tx`].
    KeyUpdate { request: bool },
    /// The TX key is spent and the kernel cannot take a new one: end with
    /// close_notify.
    Limit,
}

/// The kernel's TLS crypto info for one direction's secrets.
pub(super) fn crypto_info(
    suite: rustls::SupportedCipherSuite,
    secrets: (u64, rustls::ConnectionTrafficSecrets),
) -> io::Result<ktls::CryptoInfo> {
    ktls::CryptoInfo::from_rustls(suite, secrets)
        .map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))
}

/// TLS 1.2 AES-GCM sends an 8-byte explicit nonce in each record
/// (RFC 5288 §3), which must never repeat under one key. rustls makes it
/// `E xor seq` (E: the key block's IV part) and exports E; the kernel
/// starts from the exported value and adds one per record
/// (`tls_advance_record_sn`: no XOR for TLS 1.2 AES-GCM). Started at E
/// its first record reused the nonce of rustls' record 0 (the
/// Finished), and after a deferred hand-over more of them: a repeated
/// GCM nonce gives away the authentication key and the XOR of the two
/// plaintexts. So the kernel starts where rustls' values cannot be:
/// [`fresh_explicit_nonce`]. The peer reads each record's nonce from the
/// record and needs nothing else. TLS 1.3 and ChaCha20 derive the nonce
/// from the sequence number on both sides: nothing to do.
fn tls12_fresh_explicit_nonces(info: &mut ktls::CryptoInfo, sealed: u64) {
    let iv = match info {
        ktls::CryptoInfo::AesGcm128(i) => &mut i.iv,
        ktls::CryptoInfo::AesGcm256(i) => &mut i.iv,
        _ => return,
    };
    *iv = fresh_explicit_nonce(u64::from_be_bytes(*iv), sealed).to_be_bytes();
}

/// The first explicit nonce the kernel may use after rustls sealed
/// `sealed` records with nonces `base xor j` (j < `sealed`): those differ
/// from `base` only in the low `b` bits (b: the bit length of
/// `sealed - 1`), so counting up from the next multiple of 2^b above
/// `base`'s high part meets none of them for 2^64 - 2^b records.
fn fresh_explicit_nonce(base: u64, sealed: u64) -> u64 {
    if sealed == 0 {
        return base;
    }
    let b = u64::BITS - (sealed - 1).leading_zeros();
    if b >= u64::BITS {
        // 2^63 records sealed: not reachable (the AES-GCM limit is 2^24.5).
        return base.wrapping_add(1);
    }
    ((base >> b).wrapping_add(1)) << b
}

impl Kernel {
    /// Takes the keys out of rustls' connection, with its sequence numbers,
    /// and hands them to the kernel on `fd` (its ULP attached): after the
    /// handshake, or mid-connection (`TlsWriter::bulk_ahead`).
    pub(super) fn take_over(
        fd: BorrowedFd<'_>,
        conn: UserConn,
        rekey: bool,
    ) -> Result<Kernel, OffloadError> {
        let (secrets, kconn) = Kernel::extract(conn)?;
        Kernel::offload(fd, secrets, kconn, rekey)
    }

    /// Takes the keys, with their sequence numbers, out of rustls'
    /// connection, which is left as the part that handles control records.
    pub(super) fn extract(conn: UserConn) -> Result<(ExtractedSecrets, KernelConn), OffloadError> {
        match conn {
            UserConn::Server(c) => c
                .dangerous_into_kernel_connection()
                .map(|(s, k)| (s, KernelConn::Server(k))),
            UserConn::Client(c) => c
                .dangerous_into_kernel_connection()
                .map(|(s, k)| (s, KernelConn::Client(k))),
        }
        .map_err(OffloadError::Extract)
    }

    /// Hands the session keys to the kernel on `fd`, whose `tls` ULP is
    /// attached (`super::attach_ulp`): the TX and RX keys. `rekey`: the
    /// running kernel installs new keys.
    pub(super) fn offload(
        fd: BorrowedFd<'_>,
        secrets: ExtractedSecrets,
        kconn: KernelConn,
        rekey: bool,
    ) -> Result<Kernel, OffloadError> {
        let suite = kconn.suite();
        // Records the current keys already took (non-zero when rustls
        // carried the connection first): counted against their limits.
        let (tx_seq, rx_seq) = (secrets.tx.0, secrets.rx.0);
        let mut tx =
            crypto_info(suite, secrets.tx).map_err(|e| OffloadError::Kernel("TX cipher", e))?;
        if let rustls::SupportedCipherSuite::Tls12(_) = suite {
            tls12_fresh_explicit_nonces(&mut tx, tx_seq);
        }
        let rx =
            crypto_info(suite, secrets.rx).map_err(|e| OffloadError::Kernel("RX cipher", e))?;
        sys::set_crypto_info(fd, KeyDirection::Transmit, &tx)
            .map_err(|e| OffloadError::Kernel("TX key", e))?;
        sys::set_crypto_info(fd, KeyDirection::Receive, &rx)
            .map_err(|e| OffloadError::Kernel("RX key", e))?;
        let tls13 = kconn.version() == ProtocolVersion::TLSv1_3;
        let limit = match suite {
            rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            rustls::SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        Ok(Kernel {
            conn: kconn,
            tls13,
            rekey: rekey && tls13,
            tx_budget: RecordBudget::starting_at(limit, tx_seq),
            rx_budget: RecordBudget::starting_at(limit, rx_seq),
            request_peer_update: false,
            tx_update_pending: false,
            key_updates_in_a_row: 0,
            rx_rekeys: 0,
            tx_rekeys: 0,
        })
    }

    /// Charges `n` received bytes to the RX key. Near the cipher's limit, a
    /// TLS 1.3 connection on a rekey-capable kernel asks the peer for a
    /// KeyUpdate (through the writer's next KeyUpdate). Otherwise nothing
    /// happens: the limit binds the side that encrypts (RFC 8446 §5.5),
    /// and rustls' userspace path sets none on what it receives. Ending the
    /// connection here dropped the bytes of the read that crossed it.
    pub(super) fn charge_rx(&mut self, n: usize) {
        if n > 0 {
            self.key_updates_in_a_row = 0;
        }
        self.rx_budget.charge(n);
        if self.rx_budget.exhausted() && self.rekey && !self.request_peer_update {
            self.request_peer_update = true;
            self.tx_update_pending = true;
        }
    }

    /// Charges a write of `bytes` to the TX key and says what must go
    /// first: the KeyUpdate the peer asked for, or the one our record
    /// budget needs.
    pub(super) fn charge_tx(&mut self, bytes: usize) -> TxStep {
        self.tx_budget.charge(bytes);
        if !self.tx_update_pending && !self.tx_budget.exhausted() {
            return TxStep::Write;
        }
        if !self.rekey {
            return TxStep::Limit;
        }
        TxStep::KeyUpdate {
            request: self.request_peer_update,
        }
    }

    /// Whether a write may go out now with no KeyUpdate or close first
    /// (a non-blocking writer's check; it charges what was taken with
    /// [`Kernel::charge_sent`]). The budget's reserve covers one write.
    pub(super) fn tx_clear(&self) -> bool {
        !self.tx_update_pending && !self.tx_budget.exhausted()
    }

    /// Charges `bytes` the kernel took after [`Kernel::tx_clear`].
    pub(super) fn charge_sent(&mut self, bytes: usize) {
        self.tx_budget.charge(bytes);
    }

    /// Computes `dir`'s next traffic secret (RFC 8446 §7.2) and hands it
    /// to the kernel.
    fn next_key(&mut self, fd: BorrowedFd<'_>, dir: KeyDirection) -> io::Result<()> {
        let secret = self.conn.next_secret(dir).map_err(io::Error::other)?;
        let info = crypto_info(self.conn.suite(), secret)?;
        sys::set_crypto_info(fd, dir, &info)
    }

    /// After our KeyUpdate went out: installs the next TX key, and charges
    /// the write of `bytes` that waited for it to the new key.
    pub(super) fn install_tx(
        &mut self,
        fd: BorrowedFd<'_>,
        bytes: usize,
    ) -> Result<(), StreamError> {
        self.next_key(fd, KeyDirection::Transmit)
            .map_err(StreamError::RekeyUnsupported)?;
        self.tx_update_pending = false;
        self.request_peer_update = false;
        self.tx_budget.reset();
        self.tx_budget.charge(bytes);
        self.tx_rekeys += 1;
        Ok(())
    }

    /// The peer's KeyUpdate arrived: installs its next RX key. Linux < 6.13
    /// answers EBUSY (no rekey); then the connection ends with an
    /// `internal_error` alert (sent here: the kernel seals it under the
    /// current TX key).
    pub(super) fn install_rx(
        &mut self,
        fd: BorrowedFd<'_>,
        update_requested: bool,
    ) -> Result<(), StreamError> {
        if self.key_updates_in_a_row >= MAX_KEY_UPDATES_IN_A_ROW {
            let alert = record::fatal_alert(record::alert::UNEXPECTED_MESSAGE);
            let _ = sys::send_record(fd, record::content::ALERT, &alert);
            return Err(StreamError::Unexpected(
                "too many KeyUpdates without application data",
            ));
        }
        self.key_updates_in_a_row += 1;
        // Always ask the kernel: Linux < 6.13 answers EBUSY (no rekey),
        // newer ones install the key and resume decrypting.
        match self.next_key(fd, KeyDirection::Receive) {
            Ok(()) => {
                self.rx_rekeys += 1;
                self.rx_budget.reset();
                self.tx_update_pending |= update_requested;
                Ok(())
            }
            Err(e) => {
                let alert = record::fatal_alert(record::alert::INTERNAL_ERROR);
                let _ = sys::send_record(fd, record::content::ALERT, &alert);
                Err(StreamError::RekeyUnsupported(e))
            }
        }
    }

    /// This end is the client (the peer is a server, which may send
    /// NewSessionTicket after the handshake).
    pub(super) fn is_client(&self) -> bool {
        matches!(self.conn, KernelConn::Client(_))
    }

    /// The server's NewSessionTicket messages (`body`: one handshake
    /// record), given to rustls so later connections resume. They arrive
    /// after the keys went to the kernel (a TLS 1.3 server sends them once
    /// it has the client's Finished), so the kernel hands them over as
    /// handshake records. A body that holds anything else is refused.
    pub(super) fn session_tickets(&mut self, body: &[u8]) -> Result<(), StreamError> {
        let KernelConn::Client(conn) = &mut self.conn else {
            return Err(StreamError::Unexpected("a NewSessionTicket from a client"));
        };
        let Some(tickets) = record::session_tickets(body) else {
            return Err(StreamError::Unexpected(
                "a malformed NewSessionTicket record",
            ));
        };
        for payload in tickets {
            conn.handle_new_session_ticket(payload)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's nonces (`start + k`) never meet rustls' (`base xor j`,
    /// j < sealed), whatever the base, for every count of records sealed
    /// before the hand-over up to 2^12 and more kernel records than that.
    #[test]
    fn the_kernels_tls12_nonces_never_repeat_rustls_ones() {
        let bases = [
            0u64,
            1,
            0x0123_4567_89ab_cdef,
            u64::MAX,
            u64::MAX - 5,
            0xffff_ffff_ffff_f000,
            1 << 63,
        ];
        for base in bases {
            for sealed in (0..=300).chain([1023, 1024, 1025, 4096]) {
                let start = fresh_explicit_nonce(base, sealed);
                let used: std::collections::HashSet<u64> = (0..sealed).map(|j| base ^ j).collect();
                for k in 0..(2 * sealed + 64) {
                    let n = start.wrapping_add(k);
                    assert!(
                        !used.contains(&n),
                        "base {base:#x}, {sealed} sealed: kernel record {k} reuses {n:#x}"
                    );
                }
            }
        }
        // Nothing sealed yet: the exported value is fresh.
        assert_eq!(fresh_explicit_nonce(7, 0), 7);
    }

    #[test]
    fn only_tls12_aes_gcm_transmit_info_moves() {
        let mut gcm =
            ktls::CryptoInfo::AesGcm128(ktls_sys::bindings::tls12_crypto_info_aes_gcm_128 {
                info: ktls_sys::bindings::tls_crypto_info {
                    version: 0x0303,
                    cipher_type: ktls_sys::bindings::TLS_CIPHER_AES_GCM_128 as _,
                },
                iv: 5u64.to_be_bytes(),
                key: [0; 16],
                salt: [0; 4],
                rec_seq: 1u64.to_be_bytes(),
            });
        tls12_fresh_explicit_nonces(&mut gcm, 1);
        let ktls::CryptoInfo::AesGcm128(i) = gcm else {
            unreachable!()
        };
        assert_eq!(u64::from_be_bytes(i.iv), 6);
    }
}
