//! Layer-4 route: decrypted client bytes to a TCP backend and back.
//!
//! Both directions run at once and end independently (half-close): the
//! client's close_notify/FIN becomes a FIN to the backend while the backend's
//! reply still flows back; the backend's FIN becomes close_notify + FIN to the
//! client. An error on either side aborts both. No bytes moving either way
//! for `idle_timeout` closes the connection.
//!
//! Under kTLS the payload never enters userspace: socket → pipe → socket with
//! `splice`, pipes reused from the shard's pool. On the userspace path it
//! moves through one owned buffer per direction.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::ktls::stream::Spliced;
use crate::ktls::{Path, StreamError, TlsConn, TlsReader, TlsWriter};
use crate::sys::{self, Pipe};

/// Bytes moved per splice call: the default pipe capacity (16 pages), so one
/// call can fill an empty pipe.
const SPLICE_CHUNK: usize = 64 << 10;

/// Userspace copy buffer per direction. 16 KiB is one full TLS record of
/// plaintext, so each read or write maps to whole records.
const COPY_BUF: usize = 16 << 10;

/// Why a proxied connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client side failed.
    #[error("downstream: {0}")]
    Downstream(#[from] StreamError),
    /// The backend side failed (reset, refused write).
    #[error("upstream: {0}")]
    Upstream(io::Error),
    /// No bytes moved for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
}

/// Bytes moved by a finished connection.
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

/// A shard's pool of idle, empty pipes.
#[derive(Debug, Default)]
pub struct PipePool {
    idle: RefCell<Vec<Pipe>>,
}

/// Pipes kept per shard; more are created on demand and closed on return.
const POOL_MAX: usize = 256;

impl PipePool {
    fn take(&self) -> io::Result<Pipe> {
        match self.idle.borrow_mut().pop() {
            Some(p) => Ok(p),
            None => Pipe::new(0),
        }
    }

    /// Returns a pipe that is known to be empty.
    fn give(&self, pipe: Pipe) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < POOL_MAX {
            idle.push(pipe);
        }
    }
}

/// Runs the bidirectional pipe until both directions end, one fails, or the
/// connection idles out. `moved` is updated as bytes go, so a caller sees
/// partial progress even on error.
pub async fn run(
    conn: TlsConn,
    backend: TcpStream,
    idle_timeout: Duration,
    pipes: &PipePool,
    moved: &Cell<Moved>,
) -> Result<(), ProxyError> {
    let kernel = conn.path() == Path::Kernel;
    let (mut reader, mut writer) = conn.split();
    let mut backend_rd = backend;
    let mut backend_wr = sys::dup_stream(&backend_rd).map_err(ProxyError::Upstream)?;
    let activity = Cell::new(Instant::now());
    let result = {
        let up = pin!(client_to_backend(
            &mut reader,
            &mut backend_wr,
            kernel,
            pipes,
            &activity,
            moved
        ));
        let down = pin!(backend_to_client(
            &mut backend_rd,
            &mut writer,
            kernel,
            pipes,
            &activity,
            moved
        ));
        both_or_first_error(up, down, &activity, idle_timeout).await
    };
    if result.is_err() {
        writer.abort().await;
    }
    let rekeys = reader.rekeys();
    let mut m = moved.get();
    m.rekey_rx = rekeys.rx;
    m.rekey_tx = rekeys.tx;
    moved.set(m);
    result
}

fn note(activity: &Cell<Instant>, moved: &Cell<Moved>, up: u64, down: u64) {
    activity.set(Instant::now());
    let mut m = moved.get();
    m.up += up;
    m.down += down;
    moved.set(m);
}

async fn client_to_backend(
    reader: &mut TlsReader,
    backend: &mut TcpStream,
    kernel: bool,
    pipes: &PipePool,
    activity: &Cell<Instant>,
    moved: &Cell<Moved>,
) -> Result<(), ProxyError> {
    let early = reader.take_pending();
    if !early.is_empty() {
        let n = early.len() as u64;
        let (res, _) = backend.write_all(early).await;
        res.map_err(ProxyError::Upstream)?;
        note(activity, moved, n, 0);
    }
    if kernel {
        // A pipe is held only while bytes flow; an idle connection has none.
        let mut held: Option<Pipe> = None;
        loop {
            let pipe = match held.take() {
                Some(p) => p,
                None => pipes.take().map_err(ProxyError::Upstream)?,
            };
            match reader.splice_to(&pipe, SPLICE_CHUNK).await? {
                Spliced::Bytes(n) => {
                    drain_pipe(&pipe, backend, n)
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
    } else {
        let mut buf = Vec::with_capacity(COPY_BUF);
        loop {
            let (res, b) = reader.read(buf).await;
            let n = res?;
            if n == 0 {
                break;
            }
            let (res, b) = backend.write_all(b).await;
            buf = b;
            res.map_err(ProxyError::Upstream)?;
            note(activity, moved, n as u64, 0);
        }
    }
    // Half-close: the client is done sending; the backend's reply still comes back.
    sys::shutdown_write(sys::borrow_fd(backend)).map_err(ProxyError::Upstream)?;
    Ok(())
}

async fn backend_to_client(
    backend: &mut TcpStream,
    writer: &mut TlsWriter,
    kernel: bool,
    pipes: &PipePool,
    activity: &Cell<Instant>,
    moved: &Cell<Moved>,
) -> Result<(), ProxyError> {
    if kernel {
        let mut held: Option<Pipe> = None;
        loop {
            let pipe = match held.take() {
                Some(p) => p,
                None => pipes.take().map_err(ProxyError::Upstream)?,
            };
            match sys::splice(sys::borrow_fd(backend), pipe.tx.as_fd(), SPLICE_CHUNK) {
                Ok(0) => {
                    pipes.give(pipe);
                    break;
                }
                Ok(n) => {
                    writer.splice_from(&pipe, n).await?;
                    note(activity, moved, 0, n as u64);
                    held = Some(pipe);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipes.give(pipe);
                    backend
                        .readable(false)
                        .await
                        .map_err(ProxyError::Upstream)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => held = Some(pipe),
                Err(e) => return Err(ProxyError::Upstream(e)),
            }
        }
    } else {
        let mut buf = Vec::with_capacity(COPY_BUF);
        loop {
            buf.clear();
            let (res, b) = backend.read(buf).await;
            let n = res.map_err(ProxyError::Upstream)?;
            if n == 0 {
                buf = b;
                break;
            }
            let (res, b) = writer.write_all(b).await;
            buf = b;
            res?;
            note(activity, moved, 0, n as u64);
        }
        drop(buf);
    }
    writer.close().await?;
    Ok(())
}

/// Splices exactly `n` bytes from the pipe into a plain socket.
async fn drain_pipe(pipe: &Pipe, to: &mut TcpStream, mut n: usize) -> io::Result<()> {
    while n > 0 {
        match sys::splice(pipe.rx.as_fd(), sys::borrow_fd(to), n) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => n -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable(false).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Polls both directions; finishes when both are done, at the first error,
/// or when `activity` is older than `idle`.
async fn both_or_first_error<A, B>(
    mut up: std::pin::Pin<&mut A>,
    mut down: std::pin::Pin<&mut B>,
    activity: &Cell<Instant>,
    idle: Duration,
) -> Result<(), ProxyError>
where
    A: Future<Output = Result<(), ProxyError>>,
    B: Future<Output = Result<(), ProxyError>>,
{
    let mut up_done = false;
    let mut down_done = false;
    loop {
        let deadline = activity.get() + idle;
        let mut timer = pin!(monoio::time::sleep_until(monoio::time::Instant::from_std(
            deadline
        )));
        let step = std::future::poll_fn(|cx| {
            if !up_done {
                if let Poll::Ready(r) = up.as_mut().poll(cx) {
                    up_done = true;
                    return Poll::Ready(Some(r));
                }
            }
            if !down_done {
                if let Poll::Ready(r) = down.as_mut().poll(cx) {
                    down_done = true;
                    return Poll::Ready(Some(r));
                }
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match step {
            Some(Err(e)) => return Err(e),
            Some(Ok(())) if up_done && down_done => return Ok(()),
            Some(Ok(())) => {}
            None if activity.get().elapsed() >= idle => return Err(ProxyError::Idle(idle)),
            None => {}
        }
    }
}
