//! Layer-4 route: decrypted client bytes to a TCP backend and back.
//!
//! Both directions run at once and end independently (half-close): the
//! client's close_notify/FIN becomes a FIN to the backend while the backend's
//! reply still flows back; the backend's FIN becomes close_notify + FIN to the
//! client (a TLS backend's FIN without close_notify, a FIN alone: see
//! `tls_through`). An error on either side aborts both. No bytes moving either way
//! for `idle_timeout` closes the connection.
//!
//! Write-side awaits are boxed: they are short and busy, while the two
//! direction futures live as long as the connection, and an idle connection
//! should cost as little memory as possible (tuning.md, "Memory").
//!
//! Under kTLS the payload never enters userspace: socket → pipe → socket with
//! `splice`, pipes reused from the shard's pool. On the userspace path it
//! moves through one owned buffer per direction.
//!
//! A deferred connection (`runtime.ktls_after`) starts on the userspace
//! path and moves to the kernel's once the backend sends a burst of that
//! many bytes, in reads of at least a full record, with nothing from the
//! client in between (a bulk download); each direction then switches to
//! `splice` at its next step.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use super::idle::Idle;
use crate::ktls::stream::Spliced;
use crate::ktls::{Path, StreamError, TlsConn, TlsReader, TlsWriter};
use crate::metrics::ShardMetrics as M;
use crate::sys::{self, Pipe, ReadSide, WriteSide};

/// Bytes moved per splice call: the default pipe capacity (16 pages), so one
/// call can fill an empty pipe.
pub(crate) const SPLICE_CHUNK: usize = 64 << 10;

/// Userspace read size from the backend: four full TLS records of plaintext
/// (4 × 2^14), so one backend read becomes one client write of whole
/// records. Held only while bytes flow.
const COPY_BUF: usize = 64 << 10;

/// A backend read this large is sealed as at least one full record (2^14
/// bytes of plaintext, RFC 8446 §5.1), where the kernel's record path
/// costs less than rustls' (bench/vm-http.sh); smaller reads, a backend
/// pushing small messages, stay on rustls' and do not count towards a
/// deferred connection's burst.
const FULL_RECORD: usize = 16 << 10;

/// Why a proxied connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client side failed.
    #[error("downstream: {0}")]
    Downstream(#[from] StreamError),
    /// The backend side failed (reset, refused write).
    #[error("upstream: {0}")]
    Upstream(io::Error),
    /// The backend's TLS failed after its handshake (`tls` on the route).
    #[error("upstream TLS: {0}")]
    UpstreamTls(StreamError),
    /// No bytes moved for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// ktern ran out of something of its own: a pipe for splice (EMFILE,
    /// ENFILE).
    #[error("internal: cannot make a pipe: {0}")]
    Local(io::Error),
}

/// Which side an error of one direction's read or write is charged to.
type Blame<E> = fn(E) -> ProxyError;

/// Bytes moved by a connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// Client to backend.
    pub up: u64,
    /// Backend to client.
    pub down: u64,
    /// kTLS RX keys replaced after client KeyUpdates.
    pub rekey_rx: u64,
    /// kTLS TX keys replaced (our KeyUpdates).
    pub rekey_tx: u64,
}

/// A connection's bytes, counted as they move: in its own tally (its
/// access and close lines) and at once in the shard's totals
/// (`ktern_bytes_client_to_backend_total`, `_backend_to_client_total`).
/// Counted only at the connection's close, as before, a tunnel or a
/// keep-alive connection open for hours added nothing to a scrape until
/// it ended, then all at once: a rate graphed from them showed spikes at
/// closes, not traffic.
#[derive(Debug)]
pub struct Meter<'m> {
    moved: Cell<Moved>,
    totals: &'m M,
}

impl<'m> Meter<'m> {
    /// A meter counting into `totals`, a shard's counters.
    pub fn new(totals: &'m M) -> Meter<'m> {
        Meter {
            moved: Cell::default(),
            totals,
        }
    }

    /// The tally so far.
    pub fn get(&self) -> Moved {
        self.moved.get()
    }

    /// `up` bytes client to backend, `down` backend to client.
    pub fn add(&self, up: u64, down: u64) {
        let mut m = self.moved.get();
        m.up += up;
        m.down += down;
        self.moved.set(m);
        if up > 0 {
            M::add(&self.totals.bytes_in, up);
        }
        if down > 0 {
            M::add(&self.totals.bytes_out, down);
        }
    }

    /// The client reader's kTLS rekeys, in the tally (counted in the
    /// shard's totals by the connection's close).
    pub fn set_rekeys(&self, rekeys: crate::ktls::stream::RekeyCounts) {
        let mut m = self.moved.get();
        m.rekey_rx = rekeys.rx;
        m.rekey_tx = rekeys.tx;
        self.moved.set(m);
    }
}

/// A shard's pool of idle, empty pipes.
#[derive(Debug, Default)]
pub struct PipePool {
    idle: RefCell<Vec<Pipe>>,
}

/// Pipes kept per shard; more are created on demand and closed on return.
const POOL_MAX: usize = 256;

impl PipePool {
    pub(crate) fn take(&self) -> io::Result<Pipe> {
        match self.idle.borrow_mut().pop() {
            Some(p) => Ok(p),
            None => Pipe::new(0),
        }
    }

    /// Returns a pipe that is known to be empty.
    pub(crate) fn give(&self, pipe: Pipe) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < POOL_MAX {
            idle.push(pipe);
        }
    }
}

/// One proxied connection: the client's two halves and the backend's.
///
/// Built synchronously and kept as a local of the connection task; `run`
/// borrows it, so no part is stored twice in the task's state (async fn
/// arguments stay in the future for its whole life).
pub struct Session {
    reader: TlsReader,
    writer: TlsWriter,
    backend_rd: ReadSide,
    backend_wr: WriteSide,
}

impl Session {
    /// Pairs an established client connection with a connected backend.
    pub fn new(conn: TlsConn, backend: TcpStream) -> Result<Session, ProxyError> {
        let (backend_rd, backend_wr) = sys::split_stream(backend).map_err(ProxyError::Upstream)?;
        let (reader, writer) = conn.split();
        Ok(Session {
            reader,
            writer,
            backend_rd,
            backend_wr,
        })
    }

    /// Runs the bidirectional pipe until both directions end, one fails, or
    /// the connection idles out. `moved` is updated as bytes go, so a caller
    /// sees partial progress even on error.
    pub async fn run(
        &mut self,
        idle: &Idle,
        pipes: &PipePool,
        moved: &Meter<'_>,
        metrics: &M,
    ) -> Result<(), ProxyError> {
        let result = tunnel(
            &mut self.reader,
            &mut self.writer,
            &mut self.backend_rd,
            &mut self.backend_wr,
            idle,
            pipes,
            moved,
            metrics,
        )
        .await;
        moved.set_rekeys(self.reader.rekeys());
        result
    }
}

/// A `tcp` route with `tls`: TLS on both sides. When both connections'
/// keys are in the kernel the plaintext never enters userspace: kTLS
/// socket → pipe → kTLS socket (the kernel decrypts on one side and
/// encrypts on the other); otherwise it moves through rustls on the side
/// that has it.
pub struct TlsSession {
    reader: TlsReader,
    writer: TlsWriter,
    backend_reader: TlsReader,
    backend_writer: TlsWriter,
}

impl TlsSession {
    /// Pairs an established client connection with an established
    /// backend connection.
    pub fn new(client: TlsConn, backend: TlsConn) -> TlsSession {
        let (reader, writer) = client.split();
        let (backend_reader, backend_writer) = backend.split();
        TlsSession {
            reader,
            writer,
            backend_reader,
            backend_writer,
        }
    }

    /// Both record paths: the client's, then the backend's.
    pub fn paths(&self) -> (Path, Path) {
        (self.reader.path(), self.backend_reader.path())
    }

    /// Moves bytes both ways (half-close: each side's close_notify/FIN
    /// becomes close_notify + FIN on the other) until both directions end,
    /// one fails, or the connection idles out.
    pub async fn run(
        &mut self,
        idle: &Idle,
        pipes: &PipePool,
        moved: &Meter<'_>,
    ) -> Result<(), ProxyError> {
        let result = tls_tunnel(
            (&mut self.reader, &mut self.writer),
            (&mut self.backend_reader, &mut self.backend_writer),
            idle,
            pipes,
            moved,
        )
        .await;
        moved.set_rekeys(self.reader.rekeys());
        result
    }
}

/// [`tunnel`] for a backend on TLS too (a `tcp` route with `tls`, an
/// upgrade from an upstream group with `tls`): each direction splices
/// kTLS socket to kTLS socket when both ends are in the kernel, else
/// moves through rustls on the side that has it.
pub async fn tls_tunnel(
    (reader, writer): (&mut TlsReader, &mut TlsWriter),
    (backend_reader, backend_writer): (&mut TlsReader, &mut TlsWriter),
    idle: &Idle,
    pipes: &PipePool,
    moved: &Meter<'_>,
) -> Result<(), ProxyError> {
    let result = {
        let up = pin!(tls_through(
            reader,
            backend_writer,
            pipes,
            idle,
            moved,
            true
        ));
        let down = pin!(tls_through(
            backend_reader,
            writer,
            pipes,
            idle,
            moved,
            false
        ));
        both_or_first_error(up, down, idle, ProxyError::Idle).await
    };
    match &result {
        Err(ProxyError::Idle(_)) => {
            let _ = Box::pin(writer.end()).await;
            let _ = Box::pin(backend_writer.end()).await;
        }
        Err(e) => {
            // As `tunnel`: the client's stream broke, and the backend must
            // not read the end of a whole one. A lenient TLS backend (Go's
            // at a record boundary, OpenSSL with IGNORE_UNEXPECTED_EOF)
            // takes a FIN without close_notify as one; a reset it cannot.
            if let ProxyError::Downstream(_) = e {
                let _ = sys::reset_on_close(backend_reader.fd());
            }
            Box::pin(writer.abort()).await;
            Box::pin(backend_writer.abort()).await;
        }
        Ok(()) => {}
    }
    result
}

/// One direction of a [`tls_tunnel`]: `from`'s plaintext to `to` until
/// `from` ends, then close_notify and FIN on `to`. `up`: client to backend
/// (a read error is the client's, a write error the backend's).
async fn tls_through(
    from: &mut TlsReader,
    to: &mut TlsWriter,
    pipes: &PipePool,
    activity: &Idle,
    moved: &Meter<'_>,
    up: bool,
) -> Result<(), ProxyError> {
    let (reading, writing): (Blame<StreamError>, Blame<StreamError>) = if up {
        (ProxyError::Downstream, ProxyError::UpstreamTls)
    } else {
        (ProxyError::UpstreamTls, ProxyError::Downstream)
    };
    let count = |n: usize| {
        let (u, d) = if up { (n as u64, 0) } else { (0, n as u64) };
        note(activity, moved, u, d);
    };
    let early = from.take_pending();
    if !early.is_empty() {
        let n = early.len();
        let (res, _) = Box::pin(to.write_all(early)).await;
        res.map_err(writing)?;
        count(n);
    }
    if from.path() == Path::Kernel && to.path() == Path::Kernel {
        let mut held: Option<Pipe> = None;
        loop {
            let pipe = match held.take() {
                Some(p) => p,
                None => pipes.take().map_err(ProxyError::Local)?,
            };
            match from.splice_to(&pipe, SPLICE_CHUNK).await.map_err(reading)? {
                Spliced::Bytes(n) => {
                    Box::pin(to.splice_from(&pipe, n)).await.map_err(writing)?;
                    count(n);
                    held = Some(pipe);
                }
                Spliced::WouldBlock => {
                    pipes.give(pipe);
                    from.readable()
                        .await
                        .map_err(|e| reading(StreamError::from(e)))?;
                }
                Spliced::Eof => {
                    pipes.give(pipe);
                    break;
                }
            }
        }
    } else {
        while let Some(chunk) = Box::pin(from.read_chunk()).await.map_err(reading)? {
            let n = chunk.len();
            let (res, _) = Box::pin(to.write_all(chunk)).await;
            res.map_err(writing)?;
            count(n);
        }
    }
    // The end as it came: a FIN alone (at a record boundary) goes on
    // without close_notify, which would vouch for an end anyone on the
    // path could have sent (a body delimited by the close, cut short).
    if from.closed_cleanly() {
        Box::pin(to.close()).await.map_err(writing)
    } else {
        to.close_unclean().map_err(writing)
    }
}

/// A `passthrough` connection: the client's TLS bytes go to the backend
/// and back untouched, socket → pipe → socket both ways (`splice`: the
/// bytes never enter userspace), with half-close as [`tunnel`].
pub struct Passthrough {
    client_rd: ReadSide,
    client_wr: WriteSide,
    backend_rd: ReadSide,
    backend_wr: WriteSide,
}

impl Passthrough {
    /// Pairs a client (its ClientHello already forwarded) with a backend.
    pub fn new(client: TcpStream, backend: TcpStream) -> Result<Passthrough, ProxyError> {
        let (client_rd, client_wr) =
            sys::split_stream(client).map_err(|e| ProxyError::Downstream(e.into()))?;
        let (backend_rd, backend_wr) = sys::split_stream(backend).map_err(ProxyError::Upstream)?;
        Ok(Passthrough {
            client_rd,
            client_wr,
            backend_rd,
            backend_wr,
        })
    }

    /// Moves bytes both ways until both directions end, one fails, or the
    /// connection idles out; `moved` counts them as they go.
    pub async fn run(
        &mut self,
        idle: &Idle,
        pipes: &PipePool,
        moved: &Meter<'_>,
    ) -> Result<(), ProxyError> {
        let up = pin!(splice_through(
            &self.client_rd,
            &mut self.backend_wr,
            pipes,
            idle,
            moved,
            true
        ));
        let down = pin!(splice_through(
            &self.backend_rd,
            &mut self.client_wr,
            pipes,
            idle,
            moved,
            false
        ));
        let result = both_or_first_error(up, down, idle, ProxyError::Idle).await;
        // A relay of TCP passes a broken stream on as one: the side that
        // did not fail gets a reset, not the FIN of a whole stream (the
        // other side's reset, or a write to it that failed).
        let _ = match &result {
            Err(ProxyError::Downstream(_)) => sys::reset_on_close(sys::borrow_fd(&self.backend_rd)),
            Err(ProxyError::Upstream(_)) => sys::reset_on_close(sys::borrow_fd(&self.client_rd)),
            _ => Ok(()),
        };
        result
    }
}

/// One direction of a [`Passthrough`]: splices `from` into `to` until
/// `from` ends, then half-closes `to`. `up`: client to backend (a read
/// error is the client's, a write error the backend's), else the reverse.
async fn splice_through(
    from: &ReadSide,
    to: &mut WriteSide,
    pipes: &PipePool,
    activity: &Idle,
    moved: &Meter<'_>,
    up: bool,
) -> Result<(), ProxyError> {
    let (reading, writing): (Blame<io::Error>, Blame<io::Error>) = if up {
        (|e| ProxyError::Downstream(e.into()), ProxyError::Upstream)
    } else {
        (ProxyError::Upstream, |e| ProxyError::Downstream(e.into()))
    };
    let mut held: Option<Pipe> = None;
    loop {
        let pipe = match held.take() {
            Some(p) => p,
            None => pipes.take().map_err(ProxyError::Local)?,
        };
        match sys::splice(sys::borrow_fd(from), pipe.tx.as_fd(), SPLICE_CHUNK) {
            Ok(0) => {
                pipes.give(pipe);
                break;
            }
            Ok(n) => {
                Box::pin(drain_pipe(&pipe, to, n)).await.map_err(writing)?;
                let (u, d) = if up { (n as u64, 0) } else { (0, n as u64) };
                note(activity, moved, u, d);
                held = Some(pipe);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipes.give(pipe);
                from.get().readable(false).await.map_err(reading)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => held = Some(pipe),
            Err(e) => return Err(reading(e)),
        }
    }
    sys::shutdown_write(sys::borrow_fd(to)).map_err(writing)
}

/// Pipes bytes both ways between an established client and a backend
/// (`backend_rd` and `backend_wr` are the two sides of one socket, see
/// `sys::split_stream`), with half-close, until both directions end, one
/// fails, or `idle` expires. Used by the `tcp` route and by HTTP upgrades.
#[allow(clippy::too_many_arguments)]
pub async fn tunnel(
    reader: &mut TlsReader,
    writer: &mut TlsWriter,
    backend_rd: &mut ReadSide,
    backend_wr: &mut WriteSide,
    idle: &Idle,
    pipes: &PipePool,
    moved: &Meter<'_>,
    metrics: &M,
) -> Result<(), ProxyError> {
    // Bytes the backend sent in full-record reads since the client last
    // sent some: the measure of a bulk download for a deferred
    // connection's hand-over.
    let burst = Cell::new(0u64);
    let result = {
        let up = pin!(client_to_backend(
            reader, backend_wr, pipes, idle, moved, &burst
        ));
        let down = pin!(backend_to_client(
            backend_rd, writer, pipes, idle, moved, &burst, metrics
        ));
        both_or_first_error(up, down, idle, ProxyError::Idle).await
    };
    match &result {
        // Our decision, nothing in flight: end politely with close_notify.
        Err(ProxyError::Idle(_)) => {
            let _ = Box::pin(writer.end()).await;
        }
        // The client's stream broke (a reset, a record cut short by its
        // FIN, an alert): a FIN would tell the backend it ended whole, and
        // a backend commits an upload at its end. It gets a reset.
        Err(ProxyError::Downstream(_)) => {
            let _ = sys::reset_on_close(sys::borrow_fd(backend_wr));
            Box::pin(writer.abort()).await
        }
        Err(_) => Box::pin(writer.abort()).await,
        Ok(()) => {}
    }
    result
}

fn note(activity: &Idle, moved: &Meter<'_>, up: u64, down: u64) {
    activity.touch();
    moved.add(up, down);
}

async fn client_to_backend(
    reader: &mut TlsReader,
    backend: &mut WriteSide,
    pipes: &PipePool,
    activity: &Idle,
    moved: &Meter<'_>,
    burst: &Cell<u64>,
) -> Result<(), ProxyError> {
    // Userspace records, until the other direction hands the keys to the
    // kernel (a read waiting then goes on with the kernel's records).
    // Boxed: only the userspace path needs this future; the kernel path's
    // idle state should not pay for its size.
    let mut first = true;
    while reader.path() == Path::Userspace {
        let Some(chunk) = Box::pin(reader.read_chunk()).await? else {
            break;
        };
        // Held tickets wait for the answer to the client's first bytes;
        // a client that sends more first is uploading: they go now.
        if !std::mem::replace(&mut first, false) {
            reader.release_held();
        }
        burst.set(0);
        let n = chunk.len() as u64;
        let (res, _) = Box::pin(backend.get_mut().write_all(chunk)).await;
        res.map_err(ProxyError::Upstream)?;
        note(activity, moved, n, 0);
    }
    if reader.path() == Path::Kernel {
        // Plaintext rustls decrypted before the hand-over goes first.
        let early = reader.take_pending();
        if !early.is_empty() {
            let n = early.len() as u64;
            let (res, _) = Box::pin(backend.get_mut().write_all(early)).await;
            res.map_err(ProxyError::Upstream)?;
            note(activity, moved, n, 0);
        }
        // A pipe is held only while bytes flow; an idle connection has none.
        let mut held: Option<Pipe> = None;
        loop {
            let pipe = match held.take() {
                Some(p) => p,
                None => pipes.take().map_err(ProxyError::Local)?,
            };
            match reader.splice_to(&pipe, SPLICE_CHUNK).await? {
                Spliced::Bytes(n) => {
                    Box::pin(drain_pipe(&pipe, backend, n))
                        .await
                        .map_err(ProxyError::Upstream)?;
                    note(activity, moved, n as u64, 0);
                    held = Some(pipe);
                }
                Spliced::WouldBlock => {
                    pipes.give(pipe);
                    reader.readable().await.map_err(StreamError::from)?;
                }
                Spliced::Eof => {
                    pipes.give(pipe);
                    break;
                }
            }
        }
    }
    // Half-close: the client is done sending; the backend's reply still comes back.
    sys::shutdown_write(sys::borrow_fd(backend)).map_err(ProxyError::Upstream)?;
    Ok(())
}

async fn backend_to_client(
    backend: &mut ReadSide,
    writer: &mut TlsWriter,
    pipes: &PipePool,
    activity: &Idle,
    moved: &Meter<'_>,
    burst: &Cell<u64>,
    metrics: &M,
) -> Result<(), ProxyError> {
    if writer.path() == Path::Userspace
        && !Box::pin(copy_to_client(
            backend, writer, activity, moved, burst, metrics,
        ))
        .await?
    {
        Box::pin(writer.close()).await?;
        return Ok(());
    }
    let mut held: Option<Pipe> = None;
    loop {
        let pipe = match held.take() {
            Some(p) => p,
            None => pipes.take().map_err(ProxyError::Local)?,
        };
        match sys::splice(sys::borrow_fd(backend), pipe.tx.as_fd(), SPLICE_CHUNK) {
            Ok(0) => {
                pipes.give(pipe);
                break;
            }
            Ok(n) => {
                Box::pin(writer.splice_from(&pipe, n)).await?;
                note(activity, moved, 0, n as u64);
                held = Some(pipe);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipes.give(pipe);
                backend
                    .get()
                    .readable(false)
                    .await
                    .map_err(ProxyError::Upstream)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => held = Some(pipe),
            Err(e) => return Err(ProxyError::Upstream(e)),
        }
    }
    Box::pin(writer.close()).await?;
    Ok(())
}

/// The userspace path of [`backend_to_client`]: rustls seals what the
/// backend sends. `Ok(true)` when the keys went to the kernel (a deferred
/// connection's burst reached its threshold) and the caller carries on
/// with `splice`; `Ok(false)` at the backend's end of stream.
async fn copy_to_client(
    backend: &mut ReadSide,
    writer: &mut TlsWriter,
    activity: &Idle,
    moved: &Meter<'_>,
    burst: &Cell<u64>,
    metrics: &M,
) -> Result<bool, ProxyError> {
    // No buffer while idle: wait for bytes, then allocate one, unless
    // the last read filled its buffer (more is probably queued); keep it
    // across reads while data streams.
    let mut hot = false;
    let mut spare: Option<Vec<u8>> = None;
    let promoted = loop {
        if !hot {
            if let Some(b) = spare.take() {
                crate::buffers::give(b);
            }
            writer.release_buffers();
            backend
                .get()
                .readable(false)
                .await
                .map_err(ProxyError::Upstream)?;
        }
        // The userspace writer hands back an empty buffer (it keeps
        // none while a slow client drains): take a cached one then.
        let mut buf = match spare.take() {
            Some(b) if b.capacity() >= COPY_BUF => b,
            _ => crate::buffers::take(COPY_BUF),
        };
        buf.clear();
        // After readiness, one `recv` (the read side submits no
        // io_uring operation of its own).
        let n = match sys::recv_upto(sys::borrow_fd(backend), &mut buf, COPY_BUF) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                hot = false;
                spare = Some(buf);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                spare = Some(buf);
                continue;
            }
            Err(e) => return Err(ProxyError::Upstream(e)),
        };
        if n == 0 {
            break false;
        }
        hot = n == COPY_BUF;
        // A bulk download: these bytes are the kernel's first records.
        // Not at a record boundary (a client record partly received), the
        // next read tries again.
        let mut promoted = false;
        if n >= FULL_RECORD {
            burst.set(burst.get() + n as u64);
            promoted = writer.bulk_ahead(burst.get())?;
            if promoted {
                M::inc(&metrics.ktls_offloaded);
                M::inc(&metrics.ktls_promoted);
                tracing::debug!(
                    burst = burst.get(),
                    "keys to the kernel for a bulk download"
                );
            }
        }
        let (res, buf) = Box::pin(writer.write_all(buf)).await;
        res?;
        note(activity, moved, 0, n as u64);
        if promoted {
            crate::buffers::give(buf);
            break true;
        }
        spare = Some(buf);
    };
    if let Some(b) = spare {
        crate::buffers::give(b);
    }
    Ok(promoted)
}

/// Splices exactly `n` bytes from the pipe into a plain socket.
async fn drain_pipe(pipe: &Pipe, to: &mut WriteSide, mut n: usize) -> io::Result<()> {
    while n > 0 {
        match sys::splice(pipe.rx.as_fd(), sys::borrow_fd(to), n) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => n -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.get().writable(false).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Polls both directions; finishes when both are done, at the first error,
/// or when the shard's sweeper finds the connection idle (`idled`: that
/// error, given the timeout). Also an upgraded HTTP/2 stream's two
/// directions (`proxy::h2::stream`).
pub(crate) async fn both_or_first_error<A, B, E>(
    mut up: std::pin::Pin<&mut A>,
    mut down: std::pin::Pin<&mut B>,
    idle: &Idle,
    idled: impl Fn(Duration) -> E,
) -> Result<(), E>
where
    A: Future<Output = Result<(), E>>,
    B: Future<Output = Result<(), E>>,
{
    let mut up_done = false;
    let mut down_done = false;
    std::future::poll_fn(|cx| {
        if !up_done {
            if let Poll::Ready(r) = up.as_mut().poll(cx) {
                r?;
                up_done = true;
            }
        }
        if !down_done {
            if let Poll::Ready(r) = down.as_mut().poll(cx) {
                r?;
                down_done = true;
            }
        }
        if up_done && down_done {
            return Poll::Ready(Ok(()));
        }
        if idle.poll_expired(cx).is_ready() {
            return Poll::Ready(Err(idled(idle.timeout())));
        }
        Poll::Pending
    })
    .await
}
