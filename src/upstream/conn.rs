//! A connection to a backend: plain TCP, or TLS when the route or the
//! upstream group has `tls` (nginx's `proxy_ssl_*`), its records in the
//! kernel when it can carry the suite the backend chose, else in rustls.
//! The HTTP pumps and the pool read and write through [`BackendConn`]
//! without knowing which.

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::config::{KtlsMode, UpstreamTls};
use crate::handshake::client::{BackendTlsError, ClientHandshake};
use crate::ktls::{OffloadError, Support, TlsConn, TlsReader, TlsWriter};
use crate::{buffers, sys};

/// Largest plain read: four TLS records' worth, as the client side reads.
const READ: usize = 64 << 10;

/// Why TLS to a backend did not come up: the backend's doing (its
/// certificate, alert, silence or plain TCP), or ktern's own.
#[derive(Debug, thiserror::Error)]
pub enum StartTlsError {
    /// The handshake failed on the backend's side.
    #[error(transparent)]
    Handshake(#[from] BackendTlsError),
    /// rustls refused to start a handshake with this config (internal).
    #[error("internal: cannot start the backend TLS handshake: {0}")]
    Start(rustls::Error),
    /// The record path could not be set up (internal).
    #[error("internal: backend record path setup failed: {0}")]
    Offload(#[from] OffloadError),
}

impl StartTlsError {
    /// Logs it: the backend's failure through its group's throttle (any
    /// client's request can meet a backend whose certificate expired),
    /// ktern's own at once.
    pub fn log(
        &self,
        balancer: &super::Balancer,
        peer: std::net::SocketAddr,
        backend: std::net::SocketAddr,
    ) {
        match self {
            StartTlsError::Handshake(_) => {
                balancer.log_failure(peer, backend, "upstream TLS handshake failed", self)
            }
            _ => tracing::warn!(%peer, %backend, error = %self, "upstream TLS set-up failed"),
        }
    }

    /// Its counter: the backend's failures, or ktern's own.
    pub fn counter<'m>(
        &self,
        m: &'m crate::metrics::ShardMetrics,
    ) -> &'m std::sync::atomic::AtomicU64 {
        match self {
            StartTlsError::Handshake(_) => &m.upstream_tls_failures,
            StartTlsError::Offload(_) => &m.ktls_offload_errors,
            StartTlsError::Start(_) => &m.internal_errors,
        }
    }
}

/// A backend connection with TLS up.
pub struct Started {
    /// The record path, kTLS when the kernel carries the suite.
    pub conn: TlsConn,
    /// The backend resumed a session (`session_reuse`).
    pub resumed: bool,
}

impl Started {
    /// Counts this start: the handshake, a resumption, a kernel record path.
    pub fn count(&self, m: &crate::metrics::ShardMetrics) {
        use crate::metrics::ShardMetrics as M;
        M::inc(&m.upstream_tls_handshakes);
        if self.resumed {
            M::inc(&m.upstream_tls_resumed);
        }
        if self.conn.path() == crate::ktls::Path::Kernel {
            M::inc(&m.upstream_ktls_offloaded);
        }
    }
}

/// The client handshake with a backend on `stream` (within `timeout`),
/// then its record path: the kernel when `mode` allows and the kernel can
/// carry the suite the backend chose.
pub async fn start_tls(
    mut stream: TcpStream,
    config: Arc<rustls::ClientConfig>,
    tls: &UpstreamTls,
    addr: SocketAddr,
    timeout: Duration,
    (mode, support): (KtlsMode, &Support),
) -> Result<Started, StartTlsError> {
    // Without a configured name, the backend's address, checked against
    // its IP SANs (rustls sends no SNI for an address, RFC 6066 §3).
    let name = tls
        .server_name
        .clone()
        .unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
    let hs = ClientHandshake::new(config, name).map_err(StartTlsError::Start)?;
    let est = crate::handshake::pump::run(&mut stream, hs, timeout).await?;
    let resumed = est.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let conn = crate::ktls::establish_client(stream, est, mode, support)?;
    Ok(Started { conn, resumed })
}

/// Writes the PROXY header ([`super::proxy_out::header`]) first on a new
/// backend connection, for a client at `source` that connected to
/// `destination` over TLS ktern terminated (`tls`).
pub async fn send_proxy(
    stream: &mut TcpStream,
    version: crate::config::ProxyVersion,
    (source, destination): (SocketAddr, SocketAddr),
    tls: &crate::handshake::TlsInfo,
) -> io::Result<()> {
    let header =
        super::proxy_out::header(version, source, destination, tls.sni.as_deref(), Some(tls))?;
    stream.write_all(header).await.0.map(drop)
}

/// A connection to an HTTP backend.
pub enum BackendConn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (boxed: two halves and their shared record engine).
    Tls(Box<(TlsReader, TlsWriter)>),
}

impl From<TcpStream> for BackendConn {
    fn from(stream: TcpStream) -> BackendConn {
        BackendConn::Plain(stream)
    }
}

impl From<TlsConn> for BackendConn {
    fn from(conn: TlsConn) -> BackendConn {
        BackendConn::Tls(Box::new(conn.split()))
    }
}

impl BackendConn {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            BackendConn::Plain(s) => sys::borrow_fd(s),
            BackendConn::Tls(t) => t.0.fd(),
        }
    }

    /// Still usable after idling in the pool: no byte, no close and no
    /// record (a close_notify, which kTLS reports as a non-data record)
    /// waiting on the socket, nor already read by TLS (a close_notify
    /// that came with the last response's records).
    pub fn usable_when_idle(&self) -> bool {
        let at_rest = match self {
            BackendConn::Plain(_) => true,
            BackendConn::Tls(t) => t.0.at_rest(),
        };
        at_rest && sys::idle_socket_usable(self.fd())
    }

    /// Writes all of `buf`, which comes back whatever the outcome (a
    /// retried request is resent without a copy).
    pub async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            BackendConn::Plain(s) => {
                let (res, buf) = s.write_all(buf).await;
                (res.map(drop), buf)
            }
            BackendConn::Tls(t) => {
                let (res, buf) = t.1.write_all(buf).await;
                (res.map_err(io::Error::other), buf)
            }
        }
    }

    /// Writes all of `buf` (HTTP/2 DATA, already in a `Bytes`).
    pub async fn write_bytes(&mut self, buf: bytes::Bytes) -> io::Result<()> {
        match self {
            BackendConn::Plain(s) => s.write_all(buf).await.0.map(drop),
            BackendConn::Tls(t) => t.1.write_all(buf.into()).await.0.map_err(io::Error::other),
        }
    }

    /// Whether the backend's stream, once it ended, ended as its protocol
    /// vouches for: always on plain TCP (a FIN is all there is); on TLS
    /// only with its close_notify.
    pub fn ended_cleanly(&self) -> bool {
        match self {
            BackendConn::Plain(_) => true,
            BackendConn::Tls(t) => t.0.closed_cleanly(),
        }
    }

    /// Reads what is there, at most `max` bytes on plain TCP (on TLS one
    /// chunk of plaintext, at most a record's worth on the userspace
    /// path). Empty at the end of the backend's stream. The buffer may
    /// go back to [`buffers::give`].
    pub async fn read_some(&mut self, max: usize) -> io::Result<Vec<u8>> {
        match self {
            BackendConn::Plain(s) => {
                // A small buffer for a small read (a response head's
                // first, when no large one is cached), else a large one.
                let max = max.clamp(1, READ);
                let class = if max <= buffers::SMALL {
                    buffers::SMALL
                } else {
                    READ
                };
                let (res, buf) = s.read(buffers::take(class).slice_mut(..max)).await;
                let buf = buf.into_inner();
                match res {
                    Ok(_) => Ok(buf),
                    Err(e) => {
                        buffers::give(buf);
                        Err(e)
                    }
                }
            }
            BackendConn::Tls(t) => read_chunk(&mut t.0).await,
        }
    }
}

/// One chunk of a TLS backend's plaintext; empty at its end of stream.
async fn read_chunk(r: &mut TlsReader) -> io::Result<Vec<u8>> {
    match r.read_chunk().await {
        Ok(Some(chunk)) => Ok(chunk),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// The reading half of a [`BackendConn`] split for a tunnel, whose two
/// directions run at once ([`BackendConn::split`]).
pub enum BackendRead {
    /// Plain TCP's read side (readiness, then `recv`).
    Plain(sys::ReadSide),
    /// TLS's reading half.
    Tls(TlsReader),
}

/// The writing half of a [`BackendConn`] split for a tunnel.
pub enum BackendWrite {
    /// Plain TCP's write side (io_uring sends).
    Plain(sys::WriteSide),
    /// TLS's writing half.
    Tls(TlsWriter),
}

impl BackendConn {
    /// The two directions apart, for a tunnel (an upgraded HTTP/2
    /// stream): one task reads while another writes.
    pub fn split(self) -> io::Result<(BackendRead, BackendWrite)> {
        Ok(match self {
            BackendConn::Plain(s) => {
                let (r, w) = sys::split_stream(s)?;
                (BackendRead::Plain(r), BackendWrite::Plain(w))
            }
            BackendConn::Tls(t) => {
                let (r, w) = *t;
                (BackendRead::Tls(r), BackendWrite::Tls(w))
            }
        })
    }
}

impl BackendRead {
    /// What the backend sent, at most `max` bytes on plain TCP (on TLS one
    /// chunk of plaintext); empty at its end of stream. Plain TCP waits
    /// for readiness and reads with one `recv`, as the `tcp` route does.
    /// The buffer may go back to [`buffers::give`].
    pub async fn read_some(&mut self, max: usize) -> io::Result<Vec<u8>> {
        match self {
            BackendRead::Plain(r) => {
                let max = max.clamp(1, READ);
                loop {
                    r.get().readable(false).await?;
                    let mut buf = buffers::take(READ);
                    buf.clear();
                    match sys::recv_upto(sys::borrow_fd(r), &mut buf, max) {
                        Ok(_) => return Ok(buf),
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                            ) =>
                        {
                            buffers::give(buf)
                        }
                        Err(e) => {
                            buffers::give(buf);
                            return Err(e);
                        }
                    }
                }
            }
            BackendRead::Tls(r) => read_chunk(r).await,
        }
    }
}

impl BackendWrite {
    /// Writes all of `buf`.
    pub async fn write_bytes(&mut self, buf: bytes::Bytes) -> io::Result<()> {
        match self {
            BackendWrite::Plain(w) => w.get_mut().write_all(buf).await.0.map(drop),
            BackendWrite::Tls(w) => w.write_all(buf.into()).await.0.map_err(io::Error::other),
        }
    }

    /// Half-close: nothing more will be sent (a FIN, or TLS's
    /// close_notify); the backend's side may still send.
    pub async fn finish(&mut self) -> io::Result<()> {
        match self {
            BackendWrite::Plain(w) => sys::shutdown_write(sys::borrow_fd(w)),
            BackendWrite::Tls(w) => w.close().await.map_err(io::Error::other),
        }
    }
}
