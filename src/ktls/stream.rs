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
//!   peer's messages require us to send (an alert; under kTLS our KeyUpdate
//!   reply) and the writer sends it before its next record, as RFC 8446
//!   §4.6.3 allows. On rustls' records rustls holds a KeyUpdate reply itself
//!   and writes it before the next record it seals (`User::reply_owed`).
//! - Under kTLS the reader may send one alert record itself before failing;
//!   the kernel seals each `sendmsg` as whole records, so it cannot split one
//!   of the writer's records.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsFd;
use std::rc::Rc;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use super::kernel::{Kernel, TxStep};
use super::record::{self, Control};
use super::user::{
    decrypt_available, queue_close_notify, seal_userspace, Deferral, User, UserConn,
};
use super::{OffloadError, Path};
use crate::handshake::client::ClientEstablished;
use crate::handshake::{Established, MAX_RECORD};
use crate::sys::{self, Pipe};

/// How long `end` waits to send close_notify: nginx gives its
/// `SSL_shutdown` 3 s (`ngx_ssl_shutdown`'s timer) before it drops the
/// connection.
pub const CLOSE_NOTIFY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a `sendfile` stopped: the stream, or the file.
#[derive(Debug, thiserror::Error)]
pub enum SendfileError {
    /// The stream failed (the peer's side).
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The file ended before the length promised (it shrank while being
    /// sent): the connection must end, the client was told the length.
    #[error("file shorter than its length")]
    FileShort,
    /// `sendfile` failed reading the file (`EIO` from the disk, ...): not
    /// the client's doing.
    #[error("sendfile: {0}")]
    File(io::Error),
}

impl SendfileError {
    /// Which side a failed `sendfile(2)` charges. One call both reads the
    /// file and writes the socket, and its errno alone says which failed.
    /// Only the errors of reading a file are ktern's side (a disk's `EIO`,
    /// a stale NFS handle); every other is the stream's. A list of the
    /// peer's errors instead would miss some: the record layer of older
    /// kernels turns a TCP send's `EPIPE` into `EBADMSG` (`tls_tx_records`
    /// aborts the socket with it), so a kTLS socket whose client reset it
    /// fails its sends with `EBADMSG`, the client's doing all the same.
    fn of(e: io::Error) -> SendfileError {
        match e.raw_os_error() {
            Some(libc::EIO | libc::ESTALE | libc::ENXIO | libc::EOVERFLOW) => {
                SendfileError::File(e)
            }
            _ => SendfileError::Stream(StreamError::from(e)),
        }
    }
}

/// Why a TLS stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer's socket failed (reset, broken pipe, …). (The peer is
    /// the client, or a backend on a route with `tls`; the route's error
    /// says which.)
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The client sent records rustls rejected (userspace path).
    #[error("peer sent invalid TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The client sent a fatal alert.
    #[error("peer sent alert {0}")]
    PeerAlert(u8),
    /// The client sent a post-handshake message we do not accept; an alert was sent.
    #[error("peer sent {0}")]
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
    /// The keys could not go to the kernel mid-connection (internal: the
    /// probe said it would work).
    #[error("{0}")]
    Offload(#[from] OffloadError),
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
            StreamError::Offload(_) => "offload",
        }
    }
}

// The kernel variant (~600 B, mostly rustls' KernelConnection) is stored
// inline: it is the common case and the Engine already lives in one Rc
// allocation per connection; only the rarer, larger userspace state is boxed.
#[allow(clippy::large_enum_variant)]
enum Engine {
    Kernel(Kernel),
    /// Boxed: rustls' connection is about 1 KiB, twice the kernel variant.
    User(Box<User>),
    /// A hand-over to the kernel failed after rustls gave up the keys:
    /// every further read and write fails.
    Lost,
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
            unsent,
            peer_closed,
            after_finished,
            sni: _,
            acme_validation: _,
        } = est;
        // The kernel's first record would go out before them, with the
        // next sequence number: the driver sends them first.
        if !unsent.is_empty() {
            return Err(OffloadError::Unsent);
        }
        let (secrets, kconn) = Kernel::extract(UserConn::Server(conn))?;
        // A KeyUpdate came with the client's Finished: rustls held its
        // reply, and dropped it with the connection. Deferred here, these
        // keys would wait for a bulk transfer some routes never announce (a
        // `tcp` route with `tls` picks its path once), and stay with rustls
        // for good under `required`: the connection is closed instead. No
        // client does this but one testing servers. A warning alert in that
        // flight (JDK's `user_canceled`), or a KeyUpdate that asked for no
        // reply, owes nothing: the keys' sequence numbers tell them apart.
        if after_finished.owed(secrets.rx.0, secrets.tx.0) {
            return Err(OffloadError::ReplyOwed);
        }
        let kernel = Kernel::offload(sys::borrow_fd(&socket), secrets, kconn, rekey)?;
        TlsConn::assemble(socket, Engine::Kernel(kernel), early_plaintext, peer_closed)
    }

    /// Keeps rustls sealing and opening records in userspace.
    pub(super) fn userspace(socket: TcpStream, est: Established) -> Result<TlsConn, OffloadError> {
        let mut user = User::new(UserConn::Server(est.conn));
        user.hold(est.unsent);
        let engine = Engine::User(Box::new(user));
        TlsConn::assemble(socket, engine, est.early_plaintext, est.peer_closed)
    }

    /// Keeps rustls on the records until the connection starts a bulk
    /// transfer of `after` bytes ([`TlsWriter::bulk_ahead`]), then hands
    /// the keys to the kernel (`rekey`: it installs new keys).
    pub(super) fn deferred(
        socket: TcpStream,
        est: Established,
        after: u64,
        rekey: bool,
    ) -> Result<TlsConn, OffloadError> {
        let mut user = User::new(UserConn::Server(est.conn));
        user.hold(est.unsent);
        user.defer = Some(Deferral { after, rekey });
        user.reply_owed = est.after_finished.maybe_owed();
        let engine = Engine::User(Box::new(user));
        TlsConn::assemble(socket, engine, est.early_plaintext, est.peer_closed)
    }

    /// A backend connection (ktern the client) with its keys in the kernel.
    pub(super) fn kernel_client(
        socket: TcpStream,
        est: ClientEstablished,
        rekey: bool,
    ) -> Result<TlsConn, OffloadError> {
        let kernel = Kernel::take_over(sys::borrow_fd(&socket), UserConn::Client(est.conn), rekey)?;
        TlsConn::assemble(
            socket,
            Engine::Kernel(kernel),
            est.early_plaintext,
            est.peer_closed,
        )
    }

    /// A backend connection (ktern the client) on userspace records.
    pub(super) fn userspace_client(
        socket: TcpStream,
        est: ClientEstablished,
    ) -> Result<TlsConn, OffloadError> {
        let engine = Engine::User(Box::new(User::new(UserConn::Client(est.conn))));
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
                notified: peer_closed,
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

    /// The address the client connected to (this end of the socket).
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        socket2::SockRef::from(&sys::borrow_fd(&self.reader.sock))
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))
    }

    /// A handle that reads the connection's rekey counts after its halves
    /// went to a route that does not hand them back (the HTTP routes).
    pub fn rekey_probe(&self) -> RekeyProbe {
        RekeyProbe(self.reader.shared.clone())
    }

    /// Splits into the two directions.
    pub fn split(self) -> (TlsReader, TlsWriter) {
        (self.reader, self.writer)
    }
}

/// See [`TlsConn::rekey_probe`].
pub struct RekeyProbe(Shared);

impl RekeyProbe {
    /// Rekey counts so far (kTLS only).
    pub fn counts(&self) -> RekeyCounts {
        rekey_counts(&self.0.borrow())
    }
}

/// Rekey counts of an engine: the kernel path's; zero in userspace, where
/// rustls rekeys.
fn rekey_counts(engine: &Engine) -> RekeyCounts {
    match engine {
        Engine::Kernel(k) => RekeyCounts {
            rx: k.rx_rekeys,
            tx: k.tx_rekeys,
        },
        Engine::User(_) | Engine::Lost => RekeyCounts::default(),
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

/// What a non-blocking attempt did (the poll-based interface HTTP/2's
/// framing layer needs; see `proxy::h2::io`).
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This many bytes were read or written (0 read: end of stream).
    Done(usize),
    /// The socket has nothing (or no room) now: wait for readiness.
    WouldBlock,
    /// This step needs the async path (`read_chunk`, `write_all`): the
    /// userspace record path, a kTLS control record, a KeyUpdate to send.
    Slow,
}

/// The client-to-us direction.
pub struct TlsReader {
    sock: sys::ReadSide,
    shared: Shared,
    /// Plaintext decrypted but not yet handed out (handshake over-read on
    /// both paths; every record on the userspace path).
    pending: Vec<u8>,
    eof: bool,
    /// The end came with the peer's close_notify: authenticated. A TCP FIN
    /// alone (at a record boundary) ends the stream too, but anyone on the
    /// path can send one (RFC 8446 §6.1; RFC 9112 §9.8).
    notified: bool,
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
            Engine::User(_) | Engine::Lost => Path::Userspace,
        }
    }

    /// Rekey counts so far (kTLS only; zero in userspace, where rustls rekeys).
    pub fn rekeys(&self) -> RekeyCounts {
        rekey_counts(&self.shared.borrow())
    }

    /// The socket (for a pooled backend connection's liveness check).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        sys::borrow_fd(&self.sock)
    }

    /// Whether the stream ended with the peer's close_notify (`false` while
    /// it has not ended, and after a FIN alone).
    pub fn closed_cleanly(&self) -> bool {
        self.notified
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
                Ok(0) => self.kernel_eof()?,
                Ok(n) => {
                    self.hot = n == CHUNK;
                    self.charge_rx(n);
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

    /// Kernel path: `recv` returned 0. The kernel says so at a FIN whether
    /// or not a record was cut off by it (tls_rx_rec_wait returns 0 on
    /// RCV_SHUTDOWN with half a record queued), so the bytes still in TCP's
    /// queue tell the two apart: none is the end of the stream, as on the
    /// userspace path; some are a truncated record ([`StreamError::Truncated`],
    /// as the userspace path reports it), and the caller aborts rather than
    /// pass the cut-off stream on as complete.
    fn kernel_eof(&mut self) -> Result<(), StreamError> {
        self.eof = true;
        match sys::unread_bytes(sys::borrow_fd(&self.sock)) {
            Ok(0) => Ok(()),
            Ok(_) => Err(StreamError::Truncated),
            Err(e) => Err(e.into()),
        }
    }

    /// Charges `n` received bytes to the RX key ([`Kernel::charge_rx`]).
    fn charge_rx(&mut self, n: usize) {
        if let Engine::Kernel(k) = &mut *self.shared.borrow_mut() {
            k.charge_rx(n);
        }
    }

    /// Sends held tickets (`Established::unsent`) now rather than with the
    /// first record: for a tunnel whose client keeps sending before any
    /// answer (an upload), so it is not left without them. What the socket
    /// does not take goes with the next write or read, ahead of anything
    /// else. No-op when none are held or a write is in flight (its records
    /// then carry them).
    pub fn release_held(&mut self) {
        let fd = sys::borrow_fd(&self.sock);
        if let Engine::User(u) = &mut *self.shared.borrow_mut() {
            if !u.writing {
                send_held(u, fd);
            }
        }
    }

    /// Whether the client sent bytes not read yet: plaintext or a partial
    /// record held here, or anything in the socket's receive queue (one
    /// non-blocking `recv(MSG_PEEK)`; also true at a FIN or a kTLS control
    /// record, which a lingering read then takes at once). Asked before
    /// closing a connection the client meant to keep: a close with bytes
    /// still queued sends a reset (RFC 9293 §3.6.1, Linux's `tcp_close`),
    /// which drops what ktern's send queue still holds of its last answer.
    pub fn unread_input(&self) -> bool {
        self.holds_input() || (!self.eof && sys::input_pending(sys::borrow_fd(&self.sock)))
    }

    /// Nothing read and not handed out, and no end seen: what a pooled
    /// backend connection must be, besides a quiet socket. On the
    /// userspace path a close_notify (or a stray record) can arrive with
    /// the last response's records, in one read: the socket is quiet then
    /// (its FIN may still be on the way), but the stream has ended.
    pub fn at_rest(&self) -> bool {
        !self.eof && !self.holds_input()
    }

    /// Plaintext decrypted and not handed out, or a partial record read
    /// (userspace path): input already here, no socket asked.
    fn holds_input(&self) -> bool {
        let partial = match &*self.shared.borrow() {
            Engine::User(u) => !u.inbuf.is_empty(),
            Engine::Kernel(_) | Engine::Lost => false,
        };
        !self.pending.is_empty() || partial
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
        if self.eof || self.holds_input() {
            return Ok(());
        }
        // `hot` may be left over from the previous request's last read
        // (it filled its buffer, and the client then had nothing more):
        // check before skipping the wait, or an idle connection would leave
        // its keep-alive wait with nothing to read.
        if self.hot && sys::input_pending(sys::borrow_fd(&self.sock)) {
            return Ok(());
        }
        self.sock.get().readable(false).await?;
        self.hot = true;
        Ok(())
    }

    /// Kernel path: one non-blocking read of plaintext straight into `buf`
    /// (the kernel decrypts into the caller's buffer: no copy here).
    pub fn try_read(&mut self, buf: &mut tokio::io::ReadBuf<'_>) -> Result<Attempt, StreamError> {
        if !self.pending.is_empty() || self.eof || self.path() == Path::Userspace {
            return Ok(Attempt::Slow);
        }
        // A read of 0 bytes returns 0, which is not the end of the stream.
        if buf.remaining() == 0 {
            return Ok(Attempt::Done(0));
        }
        match sys::recv_readbuf(sys::borrow_fd(&self.sock), buf) {
            Ok(0) => {
                self.kernel_eof()?;
                Ok(Attempt::Done(0))
            }
            Ok(n) => {
                self.charge_rx(n);
                Ok(Attempt::Done(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.hot = false;
                Ok(Attempt::WouldBlock)
            }
            // EIO: a control record is next; `read_chunk` reads it with its
            // type. EINTR: let the async path retry.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(Attempt::Slow),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Attempt::Slow),
            Err(e) => Err(e.into()),
        }
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
                // 0 is the FIN, or a data record with nothing in it (RFC
                // 8446 §5.4 lets a peer send one; tls_sw_splice_read
                // returns 0 for it on 6.1, not on 6.18, having consumed it). A
                // peek tells them apart: `recv` returns 0 only at the FIN
                // (tls_sw_recvmsg reads on past an empty record).
                Ok(0) => match sys::peek(sys::borrow_fd(&self.sock)) {
                    Ok(0) => {
                        self.kernel_eof()?;
                        return Ok(Spliced::Eof);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(Spliced::WouldBlock)
                    }
                    // More is queued (data, a control record, an error):
                    // the next splice takes it.
                    _ => {}
                },
                Ok(n) => {
                    self.charge_rx(n);
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
            if n == 0 {
                // recvmsg returning 0 is the TCP FIN.
                self.kernel_eof()?;
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
        match record::classify(rtype, buf, k.tls13, k.is_client()) {
            Control::CloseNotify => {
                self.eof = true;
                self.notified = true;
                Ok(None)
            }
            Control::Alert(desc) => Err(StreamError::PeerAlert(desc)),
            Control::Ignored => Ok(None),
            Control::Unexpected { alert, what } => {
                let _ = sys::send_record(fd, record::content::ALERT, &record::fatal_alert(alert));
                Err(StreamError::Unexpected(what))
            }
            Control::KeyUpdate { update_requested } => {
                k.install_rx(fd, update_requested).map(|()| None)
            }
            Control::SessionTickets => match k.session_tickets(buf) {
                Ok(()) => Ok(None),
                Err(e) => {
                    let alert = record::fatal_alert(record::alert::UNEXPECTED_MESSAGE);
                    let _ = sys::send_record(fd, record::content::ALERT, &alert);
                    Err(e)
                }
            },
        }
    }

    /// Userspace path: reads ciphertext and decrypts whatever complete
    /// records arrived into `pending`.
    async fn fill_userspace(&mut self) -> Result<(), StreamError> {
        let partial = match &*self.shared.borrow() {
            Engine::User(u) => !u.inbuf.is_empty(),
            Engine::Kernel(_) => return Err(StreamError::Unexpected("userspace read on kTLS")),
            Engine::Lost => return Err(StreamError::Unexpected("keys lost")),
        };
        if !partial {
            self.wait_input().await?;
        }
        // Read into a separate buffer: the shared `inbuf` stays in place for
        // the writer's calls into rustls. No buffer is held while waiting.
        let (n, buf) = loop {
            // The writer may have handed the keys to the kernel while this
            // waited (`bulk_ahead`, with nothing partly received): the
            // caller then reads from the kernel.
            match &*self.shared.borrow() {
                Engine::User(_) => {}
                Engine::Kernel(_) => return Ok(()),
                Engine::Lost => return Err(StreamError::Unexpected("keys lost")),
            }
            let mut buf = crate::buffers::take(READ_AHEAD);
            match sys::recv_upto(sys::borrow_fd(&self.sock), &mut buf, READ_AHEAD) {
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
        // rustls ends the stream only at the close_notify (a FIN returned
        // above).
        self.notified = self.eof;
        // Keep a buffer only while a record is partly received.
        if u.inbuf.is_empty() {
            crate::buffers::give(std::mem::take(&mut u.inbuf));
        }
        if result.is_ok() && !u.writing && u.tls_out.len() > u.lazy {
            // rustls answered something while reading (a renegotiation
            // refusal; not a KeyUpdate reply, which it holds until it
            // seals the next record: `User::reply_owed`): the client may
            // be waiting for it and send nothing more, and the writer may
            // have nothing to write for a long time. Send it now, if the socket takes it;
            // what it does not take waits for the writer, in order.
            let out = u.take_out();
            match sys::send_now(sys::borrow_fd(&self.sock), &out) {
                Ok(n) if n < out.len() => u.tls_out = out[n..].to_vec(),
                Ok(_) => {}
                Err(_) => u.tls_out = out,
            }
        }
        result
    }
}

/// Sends the held tickets (`User::lazy`, all that `tls_out` holds), if
/// any, with one non-blocking `send`. What the socket does not take stays
/// at the head of `tls_out`, no longer held: it goes before anything else.
fn send_held(u: &mut User, fd: std::os::fd::BorrowedFd<'_>) {
    if u.lazy == 0 || u.tls_out.len() != u.lazy {
        return;
    }
    match sys::send_now(fd, &u.tls_out) {
        Ok(n) if n == u.tls_out.len() => {
            u.take_out();
        }
        Ok(n) => {
            u.tls_out.drain(..n);
            u.lazy = 0;
        }
        Err(_) => {}
    }
}

/// The us-to-client direction.
pub struct TlsWriter {
    sock: sys::WriteSide,
    shared: Shared,
}

impl TlsWriter {
    /// Which record path this connection uses.
    pub fn path(&self) -> Path {
        match &*self.shared.borrow() {
            Engine::Kernel(_) => Path::Kernel,
            Engine::User(_) | Engine::Lost => Path::Userspace,
        }
    }

    /// Before sealing more records under kTLS: send the KeyUpdate the peer
    /// asked for, or the one our record budget needs, and install the new TX
    /// key. Without kernel rekey, a spent budget ends the stream.
    async fn prepare_kernel_write(&mut self, bytes: usize) -> Result<(), StreamError> {
        let step = match &mut *self.shared.borrow_mut() {
            Engine::Kernel(k) => k.charge_tx(bytes),
            Engine::User(_) | Engine::Lost => return Ok(()),
        };
        match step {
            TxStep::Write => Ok(()),
            TxStep::Limit => {
                self.send_control(record::content::ALERT, &record::CLOSE_NOTIFY)
                    .await?;
                Err(StreamError::ConfidentialityLimit)
            }
            TxStep::KeyUpdate { request } => {
                self.send_control(record::content::HANDSHAKE, &record::key_update(request))
                    .await?;
                let fd = sys::borrow_fd(&self.sock);
                match &mut *self.shared.borrow_mut() {
                    Engine::Kernel(k) => k.install_tx(fd, bytes),
                    Engine::User(_) | Engine::Lost => Ok(()),
                }
            }
        }
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
            u.take_out()
        };
        crate::buffers::give(buf);
        let res = self.send_ciphertext(out).await;
        (res, Vec::new())
    }

    /// Sends sealed records; the buffer goes back to the shard's cache, or
    /// is kept for the next write if the cache does not keep its size (see
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
                        // A buffer the shard's cache keeps goes back to it
                        // after each write (the next batch takes one again,
                        // `seal_userspace`), so a connection that waits
                        // between writes, streaming a body or with HTTP/2
                        // streams open, holds none; one of another size is
                        // kept for the next batch.
                        if crate::buffers::pooled(sent.capacity()) {
                            crate::buffers::give(sent);
                        } else {
                            u.tls_out = sent;
                        }
                        None
                    } else {
                        // The reader queued something (an alert) while
                        // this write was in flight.
                        Some(u.take_out())
                    }
                }
                Engine::Kernel(_) | Engine::Lost => None,
            };
            res.map_err(StreamError::from)?;
            match more {
                Some(next) => out = next,
                None => return Ok(()),
            }
        }
    }

    /// Kernel path: one non-blocking gathering write of `bufs` as
    /// application data, when no KeyUpdate has to go first. The kernel
    /// seals straight from the caller's buffers.
    pub fn try_write(&mut self, bufs: &[io::IoSlice<'_>]) -> Result<Attempt, StreamError> {
        let fd = sys::borrow_fd(&self.sock);
        let mut shared = self.shared.borrow_mut();
        let Engine::Kernel(k) = &mut *shared else {
            return Ok(Attempt::Slow);
        };
        if !k.tx_clear() {
            return Ok(Attempt::Slow);
        }
        match sys::send_vectored_now(fd, bufs) {
            Ok(n) => {
                k.charge_sent(n);
                Ok(Attempt::Done(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Attempt::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Attempt::Slow),
            Err(e) => Err(e.into()),
        }
    }

    /// A connection carried by rustls until a bulk transfer
    /// (`runtime.ktls_after`) is about to send `bytes` (in one HTTP/1.1
    /// response, or one burst of a tunnel's backend): from that size on,
    /// its keys go to the kernel now, with rustls' current sequence
    /// numbers, and stay there. `Ok(true)` when this call
    /// moved them. They move only at a record boundary both ways: not while
    /// sealed records wait to go out or a record is partly received
    /// (those bytes belong to rustls' record stream; a later call tries
    /// again). The reader's reads are non-blocking `recv`s after readiness,
    /// so no read is in flight with a buffer here.
    pub fn bulk_ahead(&mut self, bytes: u64) -> Result<bool, StreamError> {
        let fd = sys::borrow_fd(&self.sock);
        let mut shared = self.shared.borrow_mut();
        let rekey = match &mut *shared {
            Engine::User(u) => match u.defer {
                Some(d)
                    if bytes >= d.after
                        && !u.writing
                        && !u.failed
                        && !u.reply_owed
                        && u.inbuf.is_empty() =>
                {
                    // Held tickets (`Established::unsent`) go out first, if
                    // the socket takes them whole (a new connection's send
                    // buffer does): the kernel's records follow them.
                    send_held(u, fd);
                    if !u.tls_out.is_empty() {
                        return Ok(false);
                    }
                    d.rekey
                }
                _ => return Ok(false),
            },
            Engine::Kernel(_) | Engine::Lost => return Ok(false),
        };
        // While rustls still holds the keys, as at the handshake
        // (`attach_ulp`): a client that already sent its FIN keeps its
        // connection on userspace records, and is not asked again.
        let attached = super::attach_ulp(fd);
        if !matches!(attached, Ok(true)) {
            if let Engine::User(u) = &mut *shared {
                u.defer = None;
            }
            return attached.map_err(Into::into);
        }
        let user = match std::mem::replace(&mut *shared, Engine::Lost) {
            Engine::User(u) => u,
            other => {
                *shared = other;
                return Ok(false);
            }
        };
        *shared = Engine::Kernel(Kernel::take_over(fd, user.conn, rekey)?);
        Ok(true)
    }

    /// While rustls carries a connection whose keys may still go to the
    /// kernel: the size of a bulk transfer from which they do
    /// ([`TlsWriter::bulk_ahead`]). `None` once they went, or never will.
    pub fn defer_after(&self) -> Option<u64> {
        match &*self.shared.borrow() {
            Engine::User(u) => u.defer.as_ref().map(|d| d.after),
            Engine::Kernel(_) | Engine::Lost => None,
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
                crate::buffers::give(u.take_out());
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
    /// A file shorter than promised is `FileShort` (the client was told the
    /// length: the file's fault, not the client's). A client that takes
    /// nothing for `stall` is an `Io` error of kind `TimedOut`. `sent` is
    /// told each run of bytes the socket took, as it takes them (a large
    /// file's bytes are counted as they go, and a download cut midway is
    /// logged with what went out).
    pub async fn sendfile(
        &mut self,
        file: &std::fs::File,
        mut offset: u64,
        count: u64,
        stall: std::time::Duration,
        sent: &dyn Fn(u64),
    ) -> Result<(), SendfileError> {
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
                    Ok(0) => return Err(SendfileError::FileShort),
                    Ok(m) => {
                        sent_step += m;
                        sent(m as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        match monoio::time::timeout(stall, self.sock.get().writable(false)).await {
                            Ok(r) => r.map_err(StreamError::from)?,
                            Err(_) => {
                                return Err(StreamError::from(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    "client took nothing for send_timeout",
                                ))
                                .into())
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(SendfileError::of(e)),
                }
            }
            left -= step as u64;
        }
        Ok(())
    }

    /// Ends the connection's output, as [`close`](Self::close) does, with
    /// the close_notify waiting at most `CLOSE_NOTIFY_WAIT` for room in the
    /// socket: a client that stopped reading with the send buffer full
    /// would otherwise hold the connection for good. What was written
    /// before it still goes out once the socket is closed (the peer then
    /// misses only the close_notify). For a connection's end only: a
    /// tunnel direction's half-close uses `close`, bounded by the tunnel's
    /// idle timeout, since a download's last bytes to a slow reader may
    /// rightly take longer than this to leave.
    pub async fn end(&mut self) -> Result<(), StreamError> {
        match monoio::time::timeout(CLOSE_NOTIFY_WAIT, self.close()).await {
            Ok(r) => r,
            Err(_) => Err(StreamError::Io(io::ErrorKind::TimedOut.into())),
        }
    }

    /// Ends our direction with a TCP FIN and no close_notify: passes on an
    /// end that came without one (a tunnel's other side), which this side's
    /// peer then sees as it was, an end no record vouches for; ktern's own
    /// close_notify would vouch for it.
    pub fn close_unclean(&mut self) -> Result<(), StreamError> {
        match sys::shutdown_write(sys::borrow_fd(&self.sock)) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r.map_err(Into::into),
        }
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
                u.take_out()
            };
            self.send_ciphertext(out).await?;
        }
        Ok(())
    }

    /// After a failure: send whatever alert rustls queued (userspace path;
    /// under kTLS the reader already sent it), without waiting long.
    pub async fn abort(&mut self) {
        let out = match &mut *self.shared.borrow_mut() {
            Engine::User(u) if !u.tls_out.is_empty() => u.take_out(),
            _ => return,
        };
        let _ = monoio::time::timeout(
            std::time::Duration::from_millis(100),
            self.sock.get_mut().write_all(out),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_sendfile_is_charged_to_the_side_that_failed() {
        for errno in [
            libc::EPIPE,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
            libc::ENOTCONN,
            // A kTLS socket whose client reset it, on older kernels.
            libc::EBADMSG,
        ] {
            let e = SendfileError::of(io::Error::from_raw_os_error(errno));
            assert!(matches!(e, SendfileError::Stream(_)), "{errno}: {e:?}");
        }
        for errno in [libc::EIO, libc::ESTALE, libc::ENXIO, libc::EOVERFLOW] {
            let e = SendfileError::of(io::Error::from_raw_os_error(errno));
            assert!(matches!(e, SendfileError::File(_)), "{errno}: {e:?}");
        }
    }
}
