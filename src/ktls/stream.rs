//! One stream interface over both record paths.
//!
//! A [`TlsConn`] splits into a [`TlsReader`] and a [`TlsWriter`] so the two
//! directions of a proxy run concurrently. They share the socket through one
//! fd (`sys::split_stream`: a read side and a write side). What both directions must agree on — the rustls state in
//! userspace, the `KernelConnection` and key schedule under kTLS — sits in an
//! `Rc<RefCell<_>>` borrowed only between awaits (one shard thread, no lock).
//!
//! Rules that keep the record stream correct:
//! - Only the writer writes application records. The reader queues what the
//!   peer's messages require us to send (a KeyUpdate reply) and the writer
//!   sends it before its next record, as RFC 8446 §4.6.3 allows.
//! - Under kTLS the reader may send one alert record itself before failing;
//!   the kernel seals each `sendmsg` as whole records, so it cannot split one
//!   of the writer's records.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsFd;
use std::rc::Rc;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use rustls::kernel::KernelConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::ProtocolVersion;

use super::record::{self, Control, RecordBudget};
use super::{OffloadError, Path};
use crate::handshake::{self, Established, ServerData, MAX_RECORD};
use crate::sys::{self, KeyDirection, Pipe};

/// Why a TLS stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The client's socket failed (reset, broken pipe, …).
    #[error("client socket: {0}")]
    Io(#[from] io::Error),
    /// The client sent records rustls rejected (userspace path).
    #[error("client sent invalid TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The client sent a fatal alert.
    #[error("client sent alert {0}")]
    PeerAlert(u8),
    /// The client sent a post-handshake message we do not accept; an alert was sent.
    #[error("client sent {0}")]
    Unexpected(&'static str),
    /// The client asked for a TLS 1.3 KeyUpdate and this kernel cannot install
    /// new keys (Linux < 6.13 answers EBUSY); an alert was sent.
    #[error("KeyUpdate not possible on this kernel: {0}")]
    RekeyUnsupported(io::Error),
    /// Our sending key reached the cipher's confidentiality limit and could
    /// not be replaced; close_notify was sent.
    #[error("confidentiality limit reached")]
    ConfidentialityLimit,
    /// The TCP connection ended inside a record.
    #[error("connection closed mid-record")]
    Truncated,
}

impl StreamError {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            StreamError::Io(_) => "io",
            StreamError::Tls(_) => "tls",
            StreamError::PeerAlert(_) => "peer_alert",
            StreamError::Unexpected(_) => "unexpected_record",
            StreamError::RekeyUnsupported(_) => "rekey_unsupported",
            StreamError::ConfidentialityLimit => "confidentiality_limit",
            StreamError::Truncated => "truncated",
        }
    }
}

/// Key-schedule state under kTLS.
struct Kernel {
    conn: KernelConnection<ServerData>,
    tls13: bool,
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
    /// Counters the shard reads after the connection.
    rx_rekeys: u64,
    tx_rekeys: u64,
}

/// rustls state on the userspace path.
struct User {
    conn: UnbufferedServerConnection,
    /// Ciphertext of a partly received record. Every `process_tls_records`
    /// call, from either half, must pass this same buffer: rustls remembers
    /// how far into it a fragmented handshake message was joined, and an
    /// empty slice in its place makes it index out of bounds (found by the
    /// `handshake` fuzz target).
    inbuf: Vec<u8>,
    /// Ciphertext queued by either half. The writer sends it with its
    /// records; the reader sends what rustls queued while reading (a
    /// `no_renegotiation` warning, a KeyUpdate reply) itself, at once, when
    /// no write is in flight.
    tls_out: Vec<u8>,
    /// The writer has sealed records on their way out: the reader must not
    /// send (its bytes would land inside the writer's).
    writing: bool,
    /// rustls failed on the client's bytes and queued its fatal alert:
    /// nothing may call rustls again (it would try to queue a second alert;
    /// a debug assertion in rustls), only `abort` sends what is queued.
    failed: bool,
}

// The kernel variant (~600 B, mostly rustls' KernelConnection) is stored
// inline: it is the common case and the Engine already lives in one Rc
// allocation per connection; only the rarer, larger userspace state is boxed.
#[allow(clippy::large_enum_variant)]
enum Engine {
    Kernel(Kernel),
    /// Boxed: rustls' connection is about 1 KiB, twice the kernel variant.
    User(Box<User>),
}

type Shared = Rc<RefCell<Engine>>;

/// A TLS connection after the handshake, before it is split.
pub struct TlsConn {
    reader: TlsReader,
    writer: TlsWriter,
}

/// Per-connection facts for logs and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct RekeyCounts {
    /// RX keys replaced after the client's KeyUpdate.
    pub rx: u64,
    /// TX keys replaced (our KeyUpdate).
    pub tx: u64,
}

fn crypto_info(
    suite: rustls::SupportedCipherSuite,
    secrets: (u64, rustls::ConnectionTrafficSecrets),
) -> io::Result<ktls::CryptoInfo> {
    ktls::CryptoInfo::from_rustls(suite, secrets)
        .map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e.to_string()))
}

impl TlsConn {
    /// Hands the session keys to the kernel and returns a kTLS stream.
    pub(super) fn kernel(
        socket: TcpStream,
        est: Established,
        rekey: bool,
    ) -> Result<TlsConn, OffloadError> {
        let Established {
            conn,
            early_plaintext,
            peer_closed,
            sni: _,
        } = est;
        let (secrets, kconn) = conn
            .dangerous_into_kernel_connection()
            .map_err(OffloadError::Extract)?;
        let suite = kconn.negotiated_cipher_suite();
        let fd = sys::borrow_fd(&socket);
        sys::set_ulp_tls(fd).map_err(|e| OffloadError::Kernel("ULP", e))?;
        let tx =
            crypto_info(suite, secrets.tx).map_err(|e| OffloadError::Kernel("TX cipher", e))?;
        let rx =
            crypto_info(suite, secrets.rx).map_err(|e| OffloadError::Kernel("RX cipher", e))?;
        sys::set_crypto_info(fd, KeyDirection::Transmit, &tx)
            .map_err(|e| OffloadError::Kernel("TX key", e))?;
        sys::set_crypto_info(fd, KeyDirection::Receive, &rx)
            .map_err(|e| OffloadError::Kernel("RX key", e))?;
        let tls13 = kconn.protocol_version() == ProtocolVersion::TLSv1_3;
        let limit = match suite {
            rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            rustls::SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        let engine = Engine::Kernel(Kernel {
            conn: kconn,
            tls13,
            rekey: rekey && tls13,
            tx_budget: RecordBudget::new(limit),
            rx_budget: RecordBudget::new(limit),
            request_peer_update: false,
            tx_update_pending: false,
            rx_rekeys: 0,
            tx_rekeys: 0,
        });
        TlsConn::assemble(socket, engine, early_plaintext, peer_closed)
    }

    /// Keeps rustls sealing and opening records in userspace.
    pub(super) fn userspace(socket: TcpStream, est: Established) -> Result<TlsConn, OffloadError> {
        let engine = Engine::User(Box::new(User {
            conn: est.conn,
            inbuf: Vec::new(),
            tls_out: Vec::new(),
            writing: false,
            failed: false,
        }));
        TlsConn::assemble(socket, engine, est.early_plaintext, est.peer_closed)
    }

    fn assemble(
        socket: TcpStream,
        engine: Engine,
        early_plaintext: Vec<u8>,
        peer_closed: bool,
    ) -> Result<TlsConn, OffloadError> {
        let (read_side, write_side) = sys::split_stream(socket)?;
        let shared: Shared = Rc::new(RefCell::new(engine));
        Ok(TlsConn {
            reader: TlsReader {
                sock: read_side,
                shared: shared.clone(),
                pending: early_plaintext,
                eof: peer_closed,
                hot: false,
            },
            writer: TlsWriter {
                sock: write_side,
                shared,
            },
        })
    }

    /// Which record path this connection uses.
    pub fn path(&self) -> Path {
        self.reader.path()
    }

    /// The socket's upper-layer protocol (`"tls"` under kTLS), straight from
    /// the kernel.
    pub fn kernel_ulp(&self) -> io::Result<String> {
        sys::tcp_ulp(sys::borrow_fd(&self.reader.sock))
    }

    /// Splits into the two directions.
    pub fn split(self) -> (TlsReader, TlsWriter) {
        (self.reader, self.writer)
    }
}

/// What a kernel-path splice moved.
#[derive(Debug)]
pub enum Spliced {
    /// This many plaintext bytes are now in the pipe.
    Bytes(usize),
    /// The client finished sending (close_notify, or FIN without it).
    Eof,
    /// Nothing to read now: wait with [`TlsReader::readable`].
    WouldBlock,
}

/// The client-to-us direction.
pub struct TlsReader {
    sock: sys::ReadSide,
    shared: Shared,
    /// Plaintext decrypted but not yet handed out (handshake over-read on
    /// both paths; every record on the userspace path).
    pending: Vec<u8>,
    eof: bool,
    /// The last read filled its buffer, so more is probably waiting: read
    /// again at once instead of first waiting for readiness.
    hot: bool,
}

/// Plaintext chunk size per read: one full TLS record (2^14, RFC 8446 §5.1).
const CHUNK: usize = 16 << 10;

/// Userspace path: ciphertext read per call, four maximum-size records, so a
/// bulk upload costs one read per ~64 KiB. Allocated only while bytes flow.
const READ_AHEAD: usize = 4 * MAX_RECORD;

impl TlsReader {
    /// Which record path this connection uses.
    pub fn path(&self) -> Path {
        match &*self.shared.borrow() {
            Engine::Kernel(_) => Path::Kernel,
            Engine::User(_) => Path::Userspace,
        }
    }

    /// Rekey counts so far (kTLS only; zero in userspace, where rustls rekeys).
    pub fn rekeys(&self) -> RekeyCounts {
        match &*self.shared.borrow() {
            Engine::Kernel(k) => RekeyCounts {
                rx: k.rx_rekeys,
                tx: k.tx_rekeys,
            },
            Engine::User(_) => RekeyCounts::default(),
        }
    }

    /// Takes plaintext already decrypted in userspace (must be forwarded
    /// before anything spliced later).
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// Waits for input unless the last read suggests more is queued. Idle
    /// connections thus hold no read buffer: one is allocated only once
    /// bytes are there to fill it.
    async fn wait_input(&mut self) -> io::Result<()> {
        if !self.hot {
            self.sock.get().readable(false).await?;
        }
        Ok(())
    }

    /// Reads the next chunk of plaintext; `None` is the end of the client's
    /// stream (close_notify, or a FIN at a record boundary).
    pub async fn read_chunk(&mut self) -> Result<Option<Vec<u8>>, StreamError> {
        loop {
            if !self.pending.is_empty() {
                return Ok(Some(std::mem::take(&mut self.pending)));
            }
            if self.eof {
                return Ok(None);
            }
            if self.path() == Path::Userspace {
                self.fill_userspace().await?;
                continue;
            }
            self.wait_input().await?;
            let mut buf = Vec::with_capacity(CHUNK);
            match sys::recv_spare(sys::borrow_fd(&self.sock), &mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.hot = n == CHUNK;
                    self.charge_rx(n)?;
                    return Ok(Some(buf));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.hot = false,
                // EIO: the next record is not application data
                // (tls_sw_recvmsg without a cmsg buffer).
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    if let Some(n) = self.control_record(&mut buf).await? {
                        if n > 0 {
                            return Ok(Some(buf));
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Charges `n` received bytes to the RX key. Near the cipher's limit, a
    /// TLS 1.3 connection on a rekey-capable kernel asks the peer for a
    /// KeyUpdate (through the writer's next KeyUpdate); otherwise it ends
    /// with close_notify.
    fn charge_rx(&mut self, n: usize) -> Result<(), StreamError> {
        let mut shared = self.shared.borrow_mut();
        let Engine::Kernel(k) = &mut *shared else {
            return Ok(());
        };
        k.rx_budget.charge(n);
        if !k.rx_budget.exhausted() || k.request_peer_update {
            return Ok(());
        }
        if k.rekey {
            k.request_peer_update = true;
            k.tx_update_pending = true;
            return Ok(());
        }
        let _ = sys::send_record(
            sys::borrow_fd(&self.sock),
            record::content::ALERT,
            &record::CLOSE_NOTIFY,
        );
        Err(StreamError::ConfidentialityLimit)
    }

    /// Waits until the client socket has something to read.
    pub async fn readable(&self) -> io::Result<()> {
        self.sock.get().readable(false).await
    }

    /// Waits until a read would make progress: plaintext or a partial
    /// record is already buffered, or the socket is readable. Holds no
    /// buffer while waiting (an idle keep-alive connection's only wait).
    /// The next read then goes straight to the socket, without a second
    /// readiness round trip.
    pub async fn input(&mut self) -> io::Result<()> {
        let partial = match &*self.shared.borrow() {
            Engine::User(u) => !u.inbuf.is_empty(),
            Engine::Kernel(_) => false,
        };
        if self.pending.is_empty() && !self.eof && !partial && !self.hot {
            self.sock.get().readable(false).await?;
            self.hot = true;
        }
        Ok(())
    }

    /// Kernel path: moves up to `max` plaintext bytes from the socket into
    /// `pipe` without copying them to userspace. Does not wait for data
    /// (the caller holds a pooled pipe and should not keep it while idle).
    pub async fn splice_to(&mut self, pipe: &Pipe, max: usize) -> Result<Spliced, StreamError> {
        let mut scratch = Vec::new();
        loop {
            if self.eof {
                return Ok(Spliced::Eof);
            }
            match sys::splice(sys::borrow_fd(&self.sock), pipe.tx.as_fd(), max) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(Spliced::Eof);
                }
                Ok(n) => {
                    self.charge_rx(n)?;
                    return Ok(Spliced::Bytes(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Spliced::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // tls_sw_splice_read refuses non-data records (EINVAL; EIO on
                // some versions): read that one record with recvmsg.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EIO)) => {
                    if let Some(n) = Box::pin(self.control_record(&mut scratch)).await? {
                        // A data record after all: push it into the pipe so
                        // order is kept.
                        let mut at = 0;
                        while at < n {
                            match sys::write_fd(pipe.tx.as_fd(), &scratch[at..n]) {
                                Ok(w) => at += w,
                                Err(e) => return Err(e.into()),
                            }
                        }
                        return Ok(Spliced::Bytes(n));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Kernel path: reads one record with its type. Returns `Some(n)` for
    /// application data (in `buf`), `None` after handling a control record
    /// that leaves the stream open (KeyUpdate) or ends it (close_notify → eof).
    async fn control_record(&mut self, buf: &mut Vec<u8>) -> Result<Option<usize>, StreamError> {
        buf.clear();
        buf.resize(MAX_RECORD, 0);
        let (rtype, n) = loop {
            match sys::recv_record(sys::borrow_fd(&self.sock), buf) {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock.get().readable(false).await?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        };
        buf.truncate(n);
        if rtype == record::content::APPLICATION_DATA {
            if n == 0 && rtype == record::content::APPLICATION_DATA {
                // recvmsg returning 0 is the TCP FIN.
                self.eof = true;
            }
            return Ok(Some(n));
        }
        let fd = sys::borrow_fd(&self.sock);
        let mut shared = self.shared.borrow_mut();
        let Engine::Kernel(k) = &mut *shared else {
            return Err(StreamError::Unexpected(
                "control record on the userspace path",
            ));
        };
        match record::classify(rtype, buf, k.tls13) {
            Control::CloseNotify => {
                self.eof = true;
                Ok(None)
            }
            Control::Alert(desc) => Err(StreamError::PeerAlert(desc)),
            Control::Unexpected { alert, what } => {
                let _ = sys::send_record(fd, record::content::ALERT, &record::fatal_alert(alert));
                Err(StreamError::Unexpected(what))
            }
            Control::KeyUpdate { update_requested } => {
                // Always ask the kernel: Linux < 6.13 answers EBUSY (no
                // rekey), newer ones install the key and resume decrypting.
                let installed = k
                    .conn
                    .update_rx_secret()
                    .map_err(|e| io::Error::other(e.to_string()))
                    .and_then(|s| crypto_info(k.conn.negotiated_cipher_suite(), s))
                    .and_then(|info| sys::set_crypto_info(fd, KeyDirection::Receive, &info));
                match installed {
                    Ok(()) => {
                        k.rx_rekeys += 1;
                        k.rx_budget.reset();
                        k.tx_update_pending |= update_requested;
                        Ok(None)
                    }
                    Err(e) => {
                        let alert = record::fatal_alert(record::alert::INTERNAL_ERROR);
                        let _ = sys::send_record(fd, record::content::ALERT, &alert);
                        Err(StreamError::RekeyUnsupported(e))
                    }
                }
            }
        }
    }

    /// Userspace path: reads ciphertext and decrypts whatever complete
    /// records arrived into `pending`.
    async fn fill_userspace(&mut self) -> Result<(), StreamError> {
        let partial = match &*self.shared.borrow() {
            Engine::User(u) => !u.inbuf.is_empty(),
            Engine::Kernel(_) => return Err(StreamError::Unexpected("userspace read on kTLS")),
        };
        if !partial {
            self.wait_input().await?;
        }
        // Read into a separate buffer: the shared `inbuf` stays in place for
        // the writer's calls into rustls. No buffer is held while waiting.
        let (n, buf) = loop {
            let mut buf = crate::buffers::take(READ_AHEAD);
            match sys::recv_spare(sys::borrow_fd(&self.sock), &mut buf) {
                Ok(n) => break (n, buf),
                // Nothing yet (a partial record, or a stale readiness):
                // wait, then read again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    crate::buffers::give(buf);
                    self.hot = false;
                    self.sock.get().readable(false).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => crate::buffers::give(buf),
                Err(e) => {
                    crate::buffers::give(buf);
                    return Err(e.into());
                }
            }
        };
        self.hot = n == READ_AHEAD;
        let mut shared = self.shared.borrow_mut();
        let Engine::User(u) = &mut *shared else {
            return Err(StreamError::Unexpected("userspace read on kTLS"));
        };
        if n == 0 {
            self.eof = true;
            return if u.inbuf.is_empty() {
                Ok(())
            } else {
                Err(StreamError::Truncated)
            };
        }
        if u.inbuf.is_empty() {
            // Nothing buffered means rustls has no progress into it either:
            // take the new bytes without copying.
            u.inbuf = buf;
        } else {
            u.inbuf.extend_from_slice(&buf);
            crate::buffers::give(buf);
        }
        let result = decrypt_available(u, &mut self.pending, &mut self.eof);
        // Keep a buffer only while a record is partly received.
        if u.inbuf.is_empty() {
            crate::buffers::give(std::mem::take(&mut u.inbuf));
        }
        if result.is_ok() && !u.writing && !u.tls_out.is_empty() {
            // rustls answered something while reading (a renegotiation
            // refusal, a KeyUpdate reply): the client may be waiting for it
            // and send nothing more, and the writer may have nothing to
            // write for a long time. Send it now, if the socket takes it;
            // what it does not take waits for the writer, in order.
            let out = std::mem::take(&mut u.tls_out);
            match sys::send_now(sys::borrow_fd(&self.sock), &out) {
                Ok(n) if n < out.len() => u.tls_out = out[n..].to_vec(),
                Ok(_) => {}
                Err(_) => u.tls_out = out,
            }
        }
        result
    }
}

/// Runs rustls over `u.inbuf` until it needs more bytes, collecting plaintext.
fn decrypt_available(u: &mut User, plain: &mut Vec<u8>, eof: &mut bool) -> Result<(), StreamError> {
    // Plaintext is never longer than the ciphertext holding it.
    plain.reserve(u.inbuf.len());
    loop {
        let UnbufferedStatus { discard, state } = u.conn.process_tls_records(&mut u.inbuf);
        let mut stop = false;
        let res: Result<(), StreamError> = match state {
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                let mut res = Ok(());
                while let Some(rec) = r.next_record() {
                    match rec {
                        Ok(rec) => plain.extend_from_slice(rec.payload),
                        Err(e) => {
                            res = Err(e.into());
                            break;
                        }
                    }
                }
                res
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                handshake::encode(&mut u.tls_out, |o| enc.encode(o))
                    .map_err(|_| StreamError::Unexpected("encode"))
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                Ok(())
            }
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                *eof = true;
                stop = true;
                Ok(())
            }
            Ok(_) => {
                stop = true;
                Ok(())
            }
            Err(e) => Err(e.into()),
        };
        if discard > 0 {
            u.inbuf.drain(..discard);
        }
        if let Err(e) = res {
            // rustls queued a fatal alert; the writer flushes it on abort.
            handshake::collect_alert(&mut u.conn, &mut u.inbuf, &mut u.tls_out);
            u.failed = true;
            return Err(e);
        }
        if stop {
            if *eof {
                u.inbuf.clear();
            }
            return Ok(());
        }
    }
}

/// The us-to-client direction.
pub struct TlsWriter {
    sock: sys::WriteSide,
    shared: Shared,
}

impl TlsWriter {
    /// Before sealing more records under kTLS: send the KeyUpdate the peer
    /// asked for, or the one our record budget needs, and install the new TX
    /// key. Without kernel rekey, a spent budget ends the stream.
    async fn prepare_kernel_write(&mut self, bytes: usize) -> Result<(), StreamError> {
        let (update, possible) = match &mut *self.shared.borrow_mut() {
            Engine::Kernel(k) => {
                k.tx_budget.charge(bytes);
                (k.tx_update_pending || k.tx_budget.exhausted(), k.rekey)
            }
            Engine::User(_) => return Ok(()),
        };
        if !update {
            return Ok(());
        }
        if !possible {
            self.send_control(record::content::ALERT, &record::CLOSE_NOTIFY)
                .await?;
            return Err(StreamError::ConfidentialityLimit);
        }
        let request = match &*self.shared.borrow() {
            Engine::Kernel(k) => k.request_peer_update,
            Engine::User(_) => false,
        };
        self.send_control(record::content::HANDSHAKE, &record::key_update(request))
            .await?;
        let fd = sys::borrow_fd(&self.sock);
        let mut shared = self.shared.borrow_mut();
        if let Engine::Kernel(k) = &mut *shared {
            let info = k
                .conn
                .update_tx_secret()
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|s| crypto_info(k.conn.negotiated_cipher_suite(), s))?;
            sys::set_crypto_info(fd, KeyDirection::Transmit, &info)
                .map_err(StreamError::RekeyUnsupported)?;
            k.tx_update_pending = false;
            k.request_peer_update = false;
            k.tx_budget.reset();
            k.tx_budget.charge(bytes);
            k.tx_rekeys += 1;
        }
        Ok(())
    }

    async fn send_control(&mut self, rtype: u8, body: &[u8]) -> io::Result<()> {
        loop {
            match sys::send_record(sys::borrow_fd(&self.sock), rtype, body) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock.get().writable(false).await?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends all of `buf` as application data. Returns the buffer for
    /// reuse, except on the userspace path, where it goes back to the
    /// shard's cache as soon as it is sealed and an empty `Vec` comes back:
    /// a client that reads slowly then holds only the ciphertext in flight,
    /// not the plaintext too (issue 12's slow readers).
    pub async fn write_all(&mut self, buf: Vec<u8>) -> (Result<(), StreamError>, Vec<u8>) {
        let kernel = matches!(&*self.shared.borrow(), Engine::Kernel(_));
        if kernel {
            if let Err(e) = self.prepare_kernel_write(buf.len()).await {
                return (Err(e), buf);
            }
            let (res, buf) = self.sock.get_mut().write_all(buf).await;
            return (res.map(drop).map_err(Into::into), buf);
        }
        let out = {
            let mut shared = self.shared.borrow_mut();
            let Engine::User(u) = &mut *shared else {
                return (Err(StreamError::Unexpected("engine changed")), buf);
            };
            if let Err(e) = seal_userspace(u, &buf) {
                return (Err(e), buf);
            }
            std::mem::take(&mut u.tls_out)
        };
        crate::buffers::give(buf);
        let res = self.send_ciphertext(out).await;
        (res, Vec::new())
    }

    /// Sends sealed records, keeping the buffer for the next write (see
    /// [`TlsWriter::release_buffers`]).
    async fn send_ciphertext(&mut self, mut out: Vec<u8>) -> Result<(), StreamError> {
        loop {
            if let Engine::User(u) = &mut *self.shared.borrow_mut() {
                u.writing = true;
            }
            let (res, mut sent) = self.sock.get_mut().write_all(out).await;
            sent.clear();
            let more = match &mut *self.shared.borrow_mut() {
                Engine::User(u) => {
                    u.writing = false;
                    if u.tls_out.is_empty() {
                        u.tls_out = sent;
                        None
                    } else {
                        // The reader queued something (an alert, a
                        // KeyUpdate reply) while this write was in flight.
                        Some(std::mem::take(&mut u.tls_out))
                    }
                }
                Engine::Kernel(_) => None,
            };
            res.map_err(StreamError::from)?;
            match more {
                Some(next) => out = next,
                None => return Ok(()),
            }
        }
    }

    /// About how many plaintext bytes a write would hand to the kernel now
    /// without waiting (see `sys::send_room`; records add a little, which
    /// the estimate's margin covers). On error, unlimited: the write
    /// itself will report it.
    pub fn send_room(&self) -> usize {
        sys::send_room(sys::borrow_fd(&self.sock)).unwrap_or(usize::MAX)
    }

    /// Waits until the client's socket has room in its send buffer.
    pub async fn writable(&self) -> io::Result<()> {
        self.sock.get().writable(false).await
    }

    /// Frees the userspace record buffer; call when the connection goes
    /// idle so it holds no buffer while waiting.
    pub fn release_buffers(&mut self) {
        if let Engine::User(u) = &mut *self.shared.borrow_mut() {
            if u.tls_out.is_empty() {
                crate::buffers::give(std::mem::take(&mut u.tls_out));
            }
        }
    }

    /// Kernel path: moves `n` bytes that are in `pipe` to the client; the
    /// kernel seals them.
    pub async fn splice_from(&mut self, pipe: &Pipe, n: usize) -> Result<(), StreamError> {
        self.prepare_kernel_write(n).await?;
        let mut left = n;
        while left > 0 {
            match sys::splice(pipe.rx.as_fd(), sys::borrow_fd(&self.sock), left) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock.get().writable(false).await?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Kernel path: sends `count` bytes of `file` from `offset` with
    /// sendfile; the kernel reads the page cache and seals the records.
    /// A file shorter than promised is an error (the client was told the
    /// length). A client that takes nothing for `stall` is an `Io` error of
    /// kind `TimedOut`.
    pub async fn sendfile(
        &mut self,
        file: &std::fs::File,
        mut offset: u64,
        count: u64,
        stall: std::time::Duration,
    ) -> Result<(), StreamError> {
        use std::os::fd::AsFd;
        let mut left = count;
        while left > 0 {
            // Budget per step: at most 1 MiB charged against the key at once.
            let step = left.min(1 << 20) as usize;
            self.prepare_kernel_write(step).await?;
            let mut sent_step = 0;
            while sent_step < step {
                match sys::sendfile(
                    sys::borrow_fd(&self.sock),
                    file.as_fd(),
                    &mut offset,
                    step - sent_step,
                ) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "file shorter than its length",
                        )
                        .into())
                    }
                    Ok(m) => sent_step += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        match monoio::time::timeout(stall, self.sock.get().writable(false)).await {
                            Ok(r) => r?,
                            Err(_) => {
                                return Err(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    "client took nothing for send_timeout",
                                )
                                .into())
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            left -= step as u64;
        }
        Ok(())
    }

    /// Ends our direction cleanly: close_notify (RFC 8446 §6.1), then a TCP FIN.
    pub async fn close(&mut self) -> Result<(), StreamError> {
        match self.close_notify().await {
            // A client that already closed both ways cannot take our
            // close_notify; every byte before it was delivered.
            Err(StreamError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(())
            }
            r => r?,
        }
        match sys::shutdown_write(sys::borrow_fd(&self.sock)) {
            // The client already closed both ways: nothing left to tell it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r.map_err(Into::into),
        }
    }

    async fn close_notify(&mut self) -> Result<(), StreamError> {
        let kernel = matches!(&*self.shared.borrow(), Engine::Kernel(_));
        if kernel {
            self.send_control(record::content::ALERT, &record::CLOSE_NOTIFY)
                .await?;
        } else {
            let out = {
                let mut shared = self.shared.borrow_mut();
                let Engine::User(u) = &mut *shared else {
                    return Ok(());
                };
                queue_close_notify(u)?;
                std::mem::take(&mut u.tls_out)
            };
            self.send_ciphertext(out).await?;
        }
        Ok(())
    }

    /// After a failure: send whatever alert rustls queued (userspace path;
    /// under kTLS the reader already sent it), without waiting long.
    pub async fn abort(&mut self) {
        let out = match &mut *self.shared.borrow_mut() {
            Engine::User(u) if !u.tls_out.is_empty() => std::mem::take(&mut u.tls_out),
            _ => return,
        };
        let _ = monoio::time::timeout(
            std::time::Duration::from_millis(100),
            self.sock.get_mut().write_all(out),
        )
        .await;
    }
}

/// What one writer-side step of rustls asked for.
enum WriteStep {
    /// Handshake data was queued; ask again.
    Again,
    /// Done (the closure ran against `WriteTraffic`).
    Done(Result<(), StreamError>),
}

/// Drives rustls until it offers `WriteTraffic`, encoding anything it
/// queued first (e.g. a KeyUpdate reply), then runs `f` on it.
fn with_write_traffic(
    u: &mut User,
    mut f: impl FnMut(
        &mut rustls::unbuffered::WriteTraffic<'_, ServerData>,
        &mut Vec<u8>,
    ) -> Result<(), StreamError>,
) -> Result<(), StreamError> {
    if u.failed {
        return Err(StreamError::Unexpected("the connection failed"));
    }
    loop {
        let UnbufferedStatus { discard, state } = u.conn.process_tls_records(&mut u.inbuf);
        let step = match state {
            Err(e) => WriteStep::Done(Err(e.into())),
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                match handshake::encode(&mut u.tls_out, |o| enc.encode(o)) {
                    Ok(()) => WriteStep::Again,
                    Err(_) => WriteStep::Done(Err(StreamError::Unexpected("encode"))),
                }
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                WriteStep::Again
            }
            Ok(ConnectionState::WriteTraffic(mut wt)) => {
                WriteStep::Done(f(&mut wt, &mut u.tls_out))
            }
            // Peer closed its side; we may still send (half-close).
            Ok(ConnectionState::PeerClosed) => WriteStep::Again,
            Ok(_) => WriteStep::Done(Err(StreamError::Unexpected(
                "cannot write in this TLS state",
            ))),
        };
        // The reader leaves no complete record in `inbuf`, so nothing is
        // processed here; honour a discard anyway.
        if discard > 0 {
            u.inbuf.drain(..discard);
        }
        if let WriteStep::Done(r) = step {
            return r;
        }
    }
}

/// Encrypts `plain` (after any handshake messages rustls has queued, e.g. a
/// KeyUpdate reply) into `u.tls_out`.
fn seal_userspace(u: &mut User, plain: &[u8]) -> Result<(), StreamError> {
    // Per record: 5-byte header, content type byte, 16-byte tag (RFC 8446
    // §5.2); TLS 1.2 adds an 8-byte explicit nonce. 32 covers both.
    let guess = plain.len() + 32 * (plain.len() / (16 << 10) + 1);
    if u.tls_out.is_empty() && u.tls_out.capacity() < guess && guess >= 16 << 10 {
        // A large batch: seal into a buffer of the shard's one large size
        // (see `buffers::CLASS`), not a fresh allocation of this size.
        let small = std::mem::replace(&mut u.tls_out, crate::buffers::take(guess));
        crate::buffers::give(small);
    }
    with_write_traffic(u, |wt, out| {
        handshake::encode_sized(out, guess, |o| wt.encrypt(plain, o)).map_err(|e| match e {
            handshake::HandshakeError::Tls(t) => StreamError::Tls(t),
            _ => StreamError::ConfidentialityLimit,
        })
    })
}

fn queue_close_notify(u: &mut User) -> Result<(), StreamError> {
    with_write_traffic(u, |wt, out| {
        handshake::encode(out, |o| wt.queue_close_notify(o))
            .map_err(|_| StreamError::Unexpected("close_notify"))
    })
}
