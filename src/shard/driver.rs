//! The connection driver: the one place that knows the order of a
//! connection's life — handshake → record path (kTLS or userspace) → route.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use super::clients::{ClientKey, ClientSlot};
use super::{Shard, ShardGen};
use crate::config::{KtlsMode, Route};
use crate::handshake::{self, HandshakeError, TlsInfo};
use crate::ktls::{self, Path, StreamError, TlsConn};
use crate::metrics::family::UserspaceReason;
use crate::metrics::ShardMetrics as M;
use crate::proxy::http::{self, forward::HttpError};
use crate::proxy::tcp::{self, Meter, ProxyError};

/// Serves one accepted connection to its end. Never panics on peer input:
/// every failure becomes a log line and a counter.
///
/// Memory matters here: this future lives as long as the connection. The
/// handshake stage (rustls' connection, buffers: several KiB) runs in its own
/// boxed future, freed when it ends, and the proxy stage keeps its state in
/// one local `Session` that `run` borrows (async fn arguments would otherwise
/// stay stored for the connection's whole life).
///
/// `gen` is the config generation the connection started on: it keeps it
/// to its end, whatever reloads happen meanwhile.
pub fn serve(
    shard: Rc<Shard>,
    gen: Rc<ShardGen>,
    listener: usize,
    socket: TcpStream,
    peer: SocketAddr,
    admitted: Option<ClientSlot>,
) -> impl Future<Output = ()> {
    let m = &shard.metrics;
    M::inc(&m.accepted);
    M::inc(&m.active);
    M::inc(&gen.active[listener]);
    // A passthrough connection is served whole by its stage (it has no
    // TLS of ours); the others hand an established connection on.
    type First = std::pin::Pin<Box<dyn Future<Output = Option<Established>>>>;
    let first: First = match &gen.config().listeners[listener].route {
        Route::Passthrough(_) => Box::pin(passthrough(
            shard.clone(),
            gen.clone(),
            listener,
            socket,
            peer,
            admitted,
        )),
        _ => Box::pin(establish(
            shard.clone(),
            gen.clone(),
            listener,
            socket,
            peer,
            admitted,
        )),
    };
    // Counted out when the task's state drops: at the end, or when a
    // panic caught by [`contained`] drops the rest of it.
    let open = Open {
        shard,
        gen,
        listener,
    };
    async move {
        if let Some((conn, info, peer, _client, dest)) = first.await {
            // `_client`: the connection's place in its client's count,
            // held to the end.
            proxy(
                &open.shard,
                &open.gen,
                open.listener,
                conn,
                info,
                peer,
                dest,
            )
            .await;
        }
    }
}

/// A redirect listener's connection in the shard's counts
/// (`ktern_connections_accepted_total`, `_active`, what
/// `runtime.max_connections` is checked against), given back on drop.
pub(super) struct Opened(std::sync::Arc<M>);

impl Opened {
    pub(super) fn new(m: std::sync::Arc<M>) -> Opened {
        M::inc(&m.accepted);
        M::inc(&m.active);
        Opened(m)
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        M::dec(&self.0.active);
    }
}

/// An open connection's place in the shard's and its listener's counts
/// (`ktern_connections_active`, and what `runtime.max_connections` is
/// checked against), given back on drop so that a caught panic does not
/// leave it counted for good. It owns the connection's generation and
/// shard: no byte more than before in the connection's task.
struct Open {
    shard: Rc<Shard>,
    gen: Rc<ShardGen>,
    listener: usize,
}

impl Drop for Open {
    fn drop(&mut self) {
        M::dec(&self.shard.metrics.active);
        M::dec(&self.gen.active[self.listener]);
    }
}

/// Runs a connection's task, catching a panic in it. monoio does not
/// catch a task's panic: one unwound the shard's thread, ending every
/// connection on it, and its listeners stayed open in their `SO_REUSEPORT`
/// groups (the control thread keeps a copy of each), so the kernel kept
/// queueing a share of new connections where nobody accepted them (any
/// client could do that once, `a_keyupdate_cut_across_records_...` in
/// tests/l4.rs). A panic is a bug all the same; caught here it ends its
/// connection alone: the task's state drops (closing the socket and giving
/// back its counts, [`Open`]), and the shard's locks tolerate poisoning.
/// Logged and counted as an internal error.
///
/// The wrapper stores nothing of its own (the counters are the thread's
/// shard's, [`super::on_task_panic`]): an earlier one, an `async fn`
/// taking the task and the peer's address, kept its argument beside the
/// moved task and cost 229 bytes per idle connection in the kTLS VM
/// (4,325 against the 4 KiB budget of tests/l4.rs).
pub(super) fn contained(work: impl Future<Output = ()>) -> impl Future<Output = ()> {
    use futures_util::FutureExt as _;
    std::panic::AssertUnwindSafe(work)
        .catch_unwind()
        .map(|caught| {
            if caught.is_err() {
                super::on_task_panic();
            }
        })
}

pin_project_lite::pin_project! {
    /// A connection task that the drain timeout can cut: once the shard
    /// cuts ([`DrainSignal::cut`](crate::proxy::drain::DrainSignal::cut)),
    /// `work` is dropped inside this poll, so within [`contained`]'s
    /// catch: each request in flight writes its access line from its
    /// guard, the connection's counts are given back, its sockets close
    /// (nginx's `worker_shutdown_timeout` closes them with no line). 16
    /// bytes beside `work`: the shard and the task's slot in its table.
    pub(super) struct UntilCut<F> {
        #[pin]
        work: Option<F>,
        shard: Rc<Shard>,
        slot: Option<u32>,
    }
    impl<F> PinnedDrop for UntilCut<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.shard.drain.forget_cut(this.slot.take());
        }
    }
}

impl<F> UntilCut<F> {
    pub(super) fn new(shard: Rc<Shard>, work: F) -> UntilCut<F> {
        UntilCut {
            work: Some(work),
            shard,
            slot: None,
        }
    }
}

impl<F: Future<Output = ()>> Future for UntilCut<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if !this.shard.drain.is_cut() {
            let Some(work) = this.work.as_mut().as_pin_mut() else {
                return Poll::Ready(());
            };
            if work.poll(cx).is_ready() {
                this.work.set(None);
                return Poll::Ready(());
            }
            if this.shard.drain.poll_cut(this.slot, cx).is_pending() {
                return Poll::Pending;
            }
        }
        this.work.set(None);
        Poll::Ready(())
    }
}

/// A connection after its handshake: the record path, what the handshake
/// settled, the client's address, its place in the client's count
/// (`max_conns_per_client`), and the address it connected to when a PROXY
/// header in front said it (boxed: 8 bytes in every connection's state,
/// not 32, for what only PROXY listeners have).
type Established = (
    TlsConn,
    TlsInfo,
    SocketAddr,
    Option<ClientSlot>,
    Option<Box<SocketAddr>>,
);

/// The connection's place in its client's count, taken at accept where
/// the client is known then: on a listener without PROXY protocol, so a
/// connection over `max_conns_per_client` is closed before a task exists
/// for it, as one over `runtime.max_connections` is. `Ok(None)` on a
/// `proxy_protocol` listener (its client is counted after the header,
/// [`client_of`]) or where there is no limit. A refused connection counts
/// as accepted too, as one refused after a PROXY header does.
pub(super) fn admit_at_accept(
    shard: &Shard,
    gen: &ShardGen,
    listener: usize,
    peer: SocketAddr,
) -> Result<Option<ClientSlot>, ()> {
    if gen.config().listeners[listener].proxy_protocol.is_some() {
        return Ok(None);
    }
    admit_client(shard, gen, listener, peer, true).inspect_err(|()| M::inc(&shard.metrics.accepted))
}

/// The connection's client, its place in that client's count, the bytes
/// read past a PROXY header (which begin the TLS stream) and the address
/// the client connected to as the header said it: from the header on a
/// `proxy_protocol` listener, else the peer with the place
/// `admit_at_accept` took (and the socket's own address, asked where it
/// is needed). `None` when the connection was closed instead.
async fn client_of(
    shard: &Shard,
    gen: &ShardGen,
    listener: usize,
    socket: &mut TcpStream,
    peer: SocketAddr,
    admitted: Option<ClientSlot>,
) -> Option<(SocketAddr, Vec<u8>, Option<ClientSlot>, Option<SocketAddr>)> {
    match &gen.config().listeners[listener].proxy_protocol {
        None => Some((peer, Vec::new(), admitted, None)),
        Some(pp) => {
            let (peer, first, dest) = read_proxy_header(shard, socket, peer, pp).await?;
            let slot = admit_client(shard, gen, listener, peer, dest.is_some()).ok()?;
            Some((peer, first, slot, dest))
        }
    }
}

/// The connection's place in its client's count on this listener, where
/// the listener limits connections per client (`Ok(None)` where it does
/// not); `Err` when the client already has the limit open: the connection
/// is then closed before any TLS work (counted; logged at most once per
/// 10 s per shard), as at `runtime.max_connections`. `from_client`: false
/// for a PROXY header that carried no address (LOCAL: the load balancer's
/// own health checks; UNKNOWN), which is not counted: the address there
/// is the balancer's, and counting it would cap the balancer itself.
fn admit_client(
    shard: &Shard,
    gen: &ShardGen,
    listener: usize,
    peer: SocketAddr,
    from_client: bool,
) -> Result<Option<ClientSlot>, ()> {
    let config = &gen.config().listeners[listener];
    let limit = config.max_conns_per_client;
    if limit == 0 || !from_client {
        return Ok(None);
    }
    let key = ClientKey::on(&config.name, peer.ip());
    match gen.gen.clients.admit(key, limit) {
        Some(slot) => Ok(Some(slot)),
        None => {
            M::inc(&shard.metrics.refused_per_client);
            if let Some(count) = shard.client_log.due() {
                tracing::warn!(shard = shard.id, %peer, limit, count, "client at max_conns_per_client: connection closed ({count} since the last such line; at most one line per 10 s)");
            }
            Err(())
        }
    }
}

/// A refused client certificate, by reason.
fn count_refused_certificate(shard: &Shard, e: &rustls::Error) {
    use handshake::client_auth::Refused;
    let m = &shard.metrics;
    if let Some(why) = handshake::client_auth::refused(e) {
        M::inc(match why {
            Refused::Missing => &m.client_cert_missing,
            Refused::UnknownCa => &m.client_cert_unknown_ca,
            Refused::Expired => &m.client_cert_expired,
            Refused::Revoked => &m.client_cert_revoked,
            Refused::Bad => &m.client_cert_bad,
        });
    }
}

/// Logs a failed client handshake (each is counted by the caller): one
/// line per 10 s per shard, with how many since, the others at debug.
/// Anyone can make one (a port scan, a load balancer's TCP check, plain
/// HTTP on 443), and a line each would let them flood the log, which is
/// written on the shard's own thread.
fn handshake_failed(shard: &Shard, peer: SocketAddr, e: &dyn std::fmt::Display) {
    match shard.handshake_log.due() {
        Some(count) => {
            tracing::info!(shard = shard.id, %peer, error = %e, count, "handshake failed ({count} since the last such line; at most one line per 10 s, the others at debug)")
        }
        None => tracing::debug!(%peer, error = %e, "handshake failed"),
    }
}

/// Logs a connection closed before TLS for what any peer can cause (an
/// untrusted PROXY source; a passthrough hello that is bad, late or
/// unrouted), each counted by the caller: as [`handshake_failed`], one
/// line per 10 s per shard with how many since, the others at debug.
fn closed_before_tls(shard: &Shard, peer: SocketAddr, why: std::fmt::Arguments<'_>) {
    closed_before_tls_on(&shard.peer_log, shard, peer, why)
}

/// [`closed_before_tls`] with a throttle of its own: a trusted load
/// balancer's bad or slow PROXY header (its health checks connect and
/// close) must not be hidden by the lines any untrusted peer can cause.
fn closed_before_tls_on(
    log: &crate::clock::LogEvery,
    shard: &Shard,
    peer: SocketAddr,
    why: std::fmt::Arguments<'_>,
) {
    match log.due() {
        Some(count) => {
            tracing::info!(shard = shard.id, %peer, count, "connection closed: {why} ({count} since the last such line; at most one line per 10 s, the others at debug)")
        }
        None => tracing::debug!(%peer, "connection closed: {why}"),
    }
}

/// Whether the line of a connection that ended with an error on `side`
/// is due at info: always for ktern's own failure; for the client's (a
/// reset, an alert, a bad record, an HTTP/2 error of its own, a KeyUpdate
/// this kernel cannot follow) or an idle end, which any client can cause
/// once per connection, and for a backend's, at most one line per 10 s
/// per shard each (`Some(how many since the last)`), the others at debug.
/// Each is counted by side all the same.
fn ended_line_due(shard: &Shard, side: &str) -> Option<u64> {
    match side {
        "downstream" | "idle" => shard.ended_log.due(),
        // A failing backend fails each connection or request sent to it
        // (HTTP/1.1 ends the client's connection on a body cut short):
        // a throttle of its own.
        "upstream" => shard.upstream_ended_log.due(),
        _ => Some(1),
    }
}

/// The PROXY protocol header, when the listener expects one: the client
/// address it carries (or `peer` for LOCAL/UNKNOWN), the bytes read after
/// it, which begin the TLS stream, and the address the client connected
/// to, when it carried addresses.
/// `None` when the connection was closed instead (untrusted source, bad
/// or slow header: logged, counted).
async fn read_proxy_header(
    shard: &Shard,
    socket: &mut TcpStream,
    peer: SocketAddr,
    config: &crate::config::ProxyProtocol,
) -> Option<(SocketAddr, Vec<u8>, Option<SocketAddr>)> {
    use super::proxy_header::{self, Verdict, MAX_HEADER};
    use monoio::buf::SliceMut;
    use monoio::io::AsyncReadRent;
    let m = &shard.metrics;
    if !config.trusted.iter().any(|c| c.contains(peer.ip())) {
        M::inc(&m.pp_untrusted);
        closed_before_tls(
            shard,
            peer,
            format_args!("PROXY protocol: an untrusted address"),
        );
        return None;
    }
    let read = async {
        let mut buf = Vec::with_capacity(256);
        loop {
            let have = buf.len();
            if buf.capacity() == have {
                buf.reserve(have.max(256));
            }
            let want = (MAX_HEADER - have).min(buf.capacity() - have);
            let (res, b) = socket.read(SliceMut::new(buf, have, have + want)).await;
            buf = b.into_inner();
            match res {
                Ok(0) => return Err("the client closed before the header ended".to_string()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
            match proxy_header::parse(&buf) {
                Verdict::NeedMore => {}
                Verdict::Done { addresses, len } => {
                    buf.drain(..len);
                    return Ok((addresses, buf));
                }
                Verdict::Bad(why) => return Err(why),
            }
        }
    };
    match monoio::time::timeout(config.timeout, read).await {
        Ok(Ok((addresses, rest))) => {
            M::inc(&m.pp_headers);
            Some(match addresses {
                Some(a) => (a.source, rest, Some(a.destination)),
                None => (peer, rest, None),
            })
        }
        Ok(Err(why)) => {
            M::inc(&m.pp_invalid);
            closed_before_tls_on(
                &shard.proxy_header_log,
                shard,
                peer,
                format_args!("PROXY protocol: bad header: {why}"),
            );
            None
        }
        Err(_) => {
            M::inc(&m.pp_timeout);
            closed_before_tls_on(
                &shard.proxy_header_log,
                shard,
                peer,
                format_args!(
                    "PROXY protocol: no complete header within {:?}",
                    config.timeout
                ),
            );
            None
        }
    }
}

/// The most a passthrough connection's first bytes may hold before its
/// ClientHello ends: the largest hello ktern reads ([`MAX_HELLO`]), with
/// room for its record headers when a client splits it into small
/// records (5 bytes each).
///
/// [`MAX_HELLO`]: handshake::hello::MAX_HELLO
const PASSTHROUGH_PEEK_MAX: usize = 2 * handshake::hello::MAX_HELLO;

/// Why a passthrough connection has no ClientHello to route by.
enum NoHello {
    /// Its first bytes are not one (the reason).
    Bad(&'static str),
    /// The client closed or reset first: a TCP health check or a port
    /// scan, not a protocol error (the reason).
    Gone(&'static str),
}

/// Reads a connection's first bytes onto `buf` until they hold a whole
/// ClientHello (returned), or are not one.
async fn read_hello(
    socket: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<handshake::hello::Hello, NoHello> {
    use handshake::hello::{HelloPeek, Peeked};
    use monoio::buf::SliceMut;
    use monoio::io::AsyncReadRent;
    let mut peek = HelloPeek::default();
    loop {
        if !buf.is_empty() {
            match peek.feed(buf) {
                Peeked::Hello(h) => return Ok(h),
                Peeked::NotHello => return Err(NoHello::Bad("not a TLS ClientHello")),
                Peeked::NeedMore => {}
            }
        }
        let have = buf.len();
        if have >= PASSTHROUGH_PEEK_MAX {
            return Err(NoHello::Bad("no whole ClientHello in the first 128 KiB"));
        }
        if buf.capacity() == have {
            // Not `clamp`, which panics when its bounds cross (`have` past
            // 126 KiB of a full buffer).
            buf.reserve(have.max(2048).min(PASSTHROUGH_PEEK_MAX - have));
        }
        let want = (PASSTHROUGH_PEEK_MAX - have).min(buf.capacity() - have);
        let (res, b) = socket
            .read(SliceMut::new(std::mem::take(buf), have, have + want))
            .await;
        *buf = b.into_inner();
        match res {
            Ok(0) => {
                return Err(NoHello::Gone(
                    "the client closed before its ClientHello ended",
                ))
            }
            Ok(_) => {}
            Err(_) => {
                return Err(NoHello::Gone(
                    "the client's socket failed before its ClientHello ended",
                ))
            }
        }
    }
}

/// A `passthrough` connection, whole: the PROXY header (if the listener
/// expects one), the ClientHello read but not answered, an upstream group
/// picked by its SNI and ALPN, then the bytes read and all that follow
/// spliced to the backend untouched, and back. Always `None`: nothing is
/// left for the proxy stage.
async fn passthrough(
    shard: Rc<Shard>,
    gen: Rc<ShardGen>,
    listener: usize,
    mut socket: TcpStream,
    peer: SocketAddr,
    admitted: Option<ClientSlot>,
) -> Option<Established> {
    use monoio::io::AsyncWriteRentExt;
    let config = &gen.config().listeners[listener];
    let Route::Passthrough(route) = &config.route else {
        return None;
    };
    let m = &shard.metrics;
    // TCP_NODELAY came from the listener (`shard::no_nagle`). `_client`:
    // held for the connection's life (this stage serves it whole).
    let (peer, mut first, _client, dest) =
        client_of(&shard, &gen, listener, &mut socket, peer, admitted).await?;
    let hello =
        match monoio::time::timeout(route.hello_timeout, read_hello(&mut socket, &mut first)).await
        {
            Ok(Ok(hello)) => hello,
            Ok(Err(NoHello::Bad(why))) => {
                M::inc(&m.passthrough_bad_hello);
                closed_before_tls(&shard, peer, format_args!("passthrough: {why}"));
                return None;
            }
            Ok(Err(NoHello::Gone(why))) => {
                M::inc(&m.hs_fail_eof);
                tracing::debug!(%peer, "passthrough: {why}");
                return None;
            }
            Err(_) => {
                M::inc(&m.passthrough_hello_timeout);
                let timeout = route.hello_timeout;
                closed_before_tls(
                    &shard,
                    peer,
                    format_args!("passthrough: no whole ClientHello within {timeout:?}"),
                );
                return None;
            }
        };
    let Some(group) = route.pick(hello.sni.as_deref(), &hello.alpn) else {
        M::inc(&m.passthrough_no_route);
        let sni = hello.sni.as_deref().unwrap_or("(none)");
        closed_before_tls(
            &shard,
            peer,
            format_args!("passthrough: no rule for server name {sni:?} and no default"),
        );
        return None;
    };
    M::inc(&m.passthrough_routed);
    let upstream = &gen.config().upstreams[group];
    let balancer = &gen.upstream_balancers[group];
    // `balance = "hash"` places a client by its address (a header-keyed
    // hash has no request here: round robin).
    let ip_key = crate::proxy::http::exchange::ip_key(peer);
    let key = matches!(
        balancer.balance(),
        crate::config::Balance::Hash(crate::config::HashKey::ClientIp)
    )
    .then_some(&ip_key[..]);
    let connected = Box::pin(balancer.connect_keyed(key, upstream.connect_timeout)).await;
    // The lease is held for the connection's life (`least_conn` counts it).
    let (mut backend, addr, _lease) = match connected {
        Ok(c) => c,
        Err(e) => {
            M::inc(e.counter(m));
            if let crate::upstream::UpstreamError::Full { .. } = e {
                if let Some(count) = balancer.full_log.due() {
                    tracing::warn!(upstream = %upstream.name, error = %e, count, "passthrough: upstream full, connection closed ({count} since the last such line; at most one line per 10 s)");
                }
            } else {
                balancer.log_connect_failure(peer, "passthrough", &e);
            }
            return None;
        }
    };
    // The PROXY header, then the bytes read so far (the hello), in one
    // write: the backend's TLS stack sees the hello where it expects it.
    let mut out = match route.send_proxy {
        None => Vec::new(),
        Some(version) => match dest
            .map_or_else(|| socket.local_addr(), Ok)
            .and_then(|local| {
                crate::upstream::proxy_out::header(version, peer, local, hello.sni.as_deref(), None)
            }) {
            Ok(h) => h,
            Err(e) => {
                // The local address or the header builder: ktern's side,
                // before any byte reached the backend.
                M::inc(&m.internal_errors);
                tracing::warn!(%peer, backend = %addr, error = %e, "internal: passthrough cannot build the PROXY header");
                return None;
            }
        },
    };
    let hello_len = first.len() as u64;
    out.extend_from_slice(&first);
    // Freed now, not at the connection's end: this state lives as long as
    // the tunnel (as does only the hello's server name below).
    drop(first);
    let sni = hello.sni;
    drop(hello.alpn);
    // The tunnel's idle bound from here: a backend that takes not even
    // the hello within it (wedged, its window shut) is left, not waited on
    // for good.
    let idle = shard.idle.register(route.idle_timeout);
    let written = Box::pin(crate::proxy::idle::bounded(&idle, backend.write_all(out))).await;
    let failed = match written {
        Ok((Ok(_), _)) => None,
        Ok((Err(e), _)) => Some(e),
        Err(_) => Some(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the backend took no bytes within idle_timeout",
        )),
    };
    if let Some(e) = failed {
        M::inc(&m.upstream_errors);
        balancer.log_failure(peer, addr, "passthrough: backend write failed", &e);
        return None;
    }
    // The tunnel's own idle wait starts now, whatever the write took.
    shard.idle.arm(&idle, route.idle_timeout);
    let moved = Meter::new(m);
    moved.add(hello_len, 0);
    let result = match tcp::Passthrough::new(socket, backend) {
        Ok(mut session) => Box::pin(session.run(&idle, &shard.pipes, &moved)).await,
        Err(e) => Err(e),
    };
    let moved = moved.get();
    match result {
        Err(e) => {
            let failure = Failure::Tcp(e);
            let (counter, side) = failure.classify(m);
            M::inc(counter);
            match ended_line_due(&shard, side) {
                Some(count) => {
                    tracing::info!(%peer, sni = sni.as_deref(), backend = %addr, up = moved.up, down = moved.down, side, error = %failure, count, "passthrough connection ended with error")
                }
                None => {
                    tracing::debug!(%peer, sni = sni.as_deref(), backend = %addr, up = moved.up, down = moved.down, side, error = %failure, "passthrough connection ended with error")
                }
            }
        }
        Ok(()) => {
            tracing::debug!(%peer, sni = sni.as_deref(), backend = %addr, up = moved.up, down = moved.down, "passthrough connection closed")
        }
    }
    None
}

/// The PROXY header (if the listener expects one), the handshake, then
/// the record-path decision. `None` when the connection ended (already
/// logged and counted); else the connection, its TLS facts and the client
/// address (the header's, when there was one).
async fn establish(
    shard: Rc<Shard>,
    gen: Rc<ShardGen>,
    listener: usize,
    mut socket: TcpStream,
    peer: SocketAddr,
    admitted: Option<ClientSlot>,
) -> Option<Established> {
    let m = &shard.metrics;
    let accepted = std::time::Instant::now();
    // TCP_NODELAY came from the listener (`shard::no_nagle`).
    let (peer, first_bytes, client, dest) =
        client_of(&shard, &gen, listener, &mut socket, peer, admitted).await?;
    let hs = match handshake::Handshake::new(&gen.tls[listener]) {
        Ok(hs) => hs,
        Err(e) => {
            tracing::error!(%peer, error = %e, "internal: cannot start handshake");
            return None;
        }
    };
    let deadline = gen.config().runtime.handshake_timeout;
    let mut est = match handshake::pump::run_after(&mut socket, hs, deadline, &first_bytes).await {
        Ok(est) => est,
        Err(e) => {
            let counter = match &e {
                HandshakeError::Timeout => &m.hs_fail_timeout,
                HandshakeError::Eof | HandshakeError::Io(_) => &m.hs_fail_eof,
                HandshakeError::Tls(_) | HandshakeError::TooLarge => &m.hs_fail_tls,
                HandshakeError::UnknownName(_) => &m.hs_fail_sni,
            };
            M::inc(counter);
            if let HandshakeError::Tls(tls) = &e {
                count_refused_certificate(&shard, tls);
            }
            handshake_failed(&shard, peer, &e);
            return None;
        }
    };
    if est.acme_validation {
        // A CA's TLS-ALPN-01 validation: it has seen the certificate and
        // closes now (RFC 8737 §3); nothing is routed.
        tracing::info!(%peer, sni = est.sni.as_deref(), "ACME tls-alpn-01 validation answered");
        return None;
    }
    let resumed = est.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let mode = gen.config().runtime.ktls;
    let carried = ktls::kernel_carries(mode, est.conn.negotiated_cipher_suite(), &shard.ktls);
    let alpn_h2 = est.conn.alpn_protocol() == Some(b"h2");
    // Under `auto`, rustls keeps the records until the first bulk transfer
    // (`runtime.ktls_after`): small exchanges cost fewer instructions on
    // its records than on the kernel's (bench/vm-http.sh), and a
    // connection that moves only a few bytes saves the kernel's set-up
    // (bench/vm-handshake.sh). HTTP/1.1 hands over at its first bulk
    // response, HTTP/2 at the first of any of its streams (for 1 KiB
    // responses the kernel's records cost 13% more instructions per
    // request than rustls', `bench/vm-http.sh --h2`), a `tcp` route at
    // the backend's first bulk burst. A `tcp` route with `tls` splices
    // kTLS to kTLS: it goes to the kernel at once.
    let runtime = &gen.config().runtime;
    let after = (mode == KtlsMode::Auto && runtime.ktls_after > 0).then_some(runtime.ktls_after);
    let defer = match &gen.config().listeners[listener].route {
        Route::Http(_) => after,
        Route::Tcp(route) if route.tls.is_none() => after,
        _ => None,
    };
    // Held tickets (`Established::unsent`) ride with the first record on
    // rustls' path; where the kernel takes the records now, they go first,
    // still part of the handshake (a failed write is a failed handshake,
    // as when the pump wrote them).
    if carried && defer.is_none() && !est.unsent.is_empty() {
        let (res, _) = socket.write_all(std::mem::take(&mut est.unsent)).await;
        if let Err(e) = res {
            M::inc(&m.hs_fail_eof);
            handshake_failed(&shard, peer, &e);
            return None;
        }
    }
    M::inc(&m.handshakes);
    let f = &m.families;
    f.handshake_seconds.observe(accepted.elapsed());
    let mut info = TlsInfo {
        sni: est.sni.take(),
        version: est.conn.protocol_version(),
        suite: est.conn.negotiated_cipher_suite().map(|s| s.suite()),
        kernel: false,
        alpn_h2,
        alpn: est.conn.alpn_protocol().and_then(|p| {
            let names = &gen.config().listeners[listener].alpn;
            names
                .iter()
                .position(|n| n.as_bytes() == p)
                .and_then(|i| u8::try_from(i).ok())
        }),
        resumed,
        client_auth: gen.config().listeners[listener].client_auth.is_some(),
        client: est
            .conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|der| handshake::client_auth::ClientIdentity::read(der))
            .map(Box::new),
    };
    f.handshakes.record(
        info.version,
        info.suite,
        est.conn.negotiated_key_exchange_group().map(|g| g.name()),
        info.resumed,
    );
    if tracing::enabled!(tracing::Level::DEBUG) {
        if let Some(p) = est.conn.alpn_protocol() {
            tracing::debug!(%peer, alpn = %String::from_utf8_lossy(p), "ALPN");
        }
    }
    match ktls::establish(socket, est, (mode, &shard.ktls), defer) {
        Ok(conn) => {
            let path = conn.path();
            info.kernel = path == Path::Kernel;
            if info.kernel {
                M::inc(&m.ktls_offloaded);
            } else if carried && defer.is_some() {
                M::inc(&m.ktls_deferred);
            } else {
                M::inc(&m.ktls_userspace);
                f.userspace(if mode == KtlsMode::Off {
                    UserspaceReason::Config
                } else if !shard.ktls.ulp {
                    UserspaceReason::NoKernelTls
                } else if carried {
                    UserspaceReason::PeerClosed
                } else {
                    UserspaceReason::Cipher
                });
            }
            tracing::debug!(shard = shard.id, %peer, sni = info.sni.as_deref(), version = info.version_name(), cipher = info.cipher_name(), ?path, "handshake done");
            Some((conn, info, peer, client, dest.map(Box::new)))
        }
        Err(ktls::OffloadError::ReplyOwed) => {
            M::inc(&m.downstream_errors);
            match shard.ended_log.due() {
                Some(count) => {
                    tracing::info!(%peer, count, "client error: a KeyUpdate came with its Finished, whose reply the kernel could not send; closed ({count} connections ended by their client since the last such line; at most one line per 10 s, the others at debug)")
                }
                None => {
                    tracing::debug!(%peer, "client error: a KeyUpdate came with its Finished, whose reply the kernel could not send; closed")
                }
            }
            None
        }
        Err(e) => {
            M::inc(&m.ktls_offload_errors);
            tracing::warn!(%peer, error = %e, "internal: record path setup failed");
            None
        }
    }
}

/// Writes the PROXY header (`send_proxy`) first on a new backend
/// connection: the client's address (the PROXY-in header's, when the
/// listener takes one), the address it connected to, and (v2) the TLS
/// facts with the client certificate's common name.
async fn send_proxy(
    (mut backend, addr): (TcpStream, SocketAddr),
    version: crate::config::ProxyVersion,
    peer: SocketAddr,
    dest: Option<&SocketAddr>,
    conn: &TlsConn,
    tls: &TlsInfo,
    balancer: &crate::upstream::Balancer,
) -> Result<(TcpStream, SocketAddr), crate::upstream::UpstreamError> {
    let written = match dest.map_or_else(|| conn.local_addr(), |d| Ok(*d)) {
        Ok(local) => {
            let sent =
                crate::upstream::conn::send_proxy(&mut backend, version, (peer, local), tls).await;
            // A backend that takes no bytes counts towards its
            // `max_fails`, as on the `http` route.
            if sent.is_err() {
                balancer.failed(addr, std::time::Instant::now());
            }
            sent
        }
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => Ok((backend, addr)),
        Err(source) => Err(crate::upstream::UpstreamError::ProxyHeader { addr, source }),
    }
}

/// TLS to a `tcp` route's backend (`tls`): the client handshake (within
/// the route's connect timeout), then the record path, kTLS when the
/// kernel can carry the suite. `None` when it failed (logged, counted).
async fn backend_tls(
    shard: &Shard,
    gen: &ShardGen,
    listener: usize,
    route: &crate::config::TcpRoute,
    (backend, addr): (TcpStream, SocketAddr),
    peer: SocketAddr,
    alpn: Option<u8>,
) -> Option<TlsConn> {
    let m = &shard.metrics;
    let tls = route.tls.as_ref()?;
    // The backend is offered the protocol the client chose (none if it
    // chose none).
    let config = route
        .backends
        .iter()
        .position(|b| *b == addr)
        .and_then(|i| gen.upstream_tls[listener].get(i))
        .and_then(|by_alpn| by_alpn.get(alpn.map_or(0, |a| usize::from(a) + 1)));
    let Some(config) = config else {
        M::inc(&m.internal_errors);
        tracing::error!(%peer, backend = %addr, "internal: no TLS config for this backend");
        return None;
    };
    let started = crate::upstream::conn::start_tls(
        backend,
        config.clone(),
        tls,
        addr,
        route.connect_timeout,
        (gen.config().runtime.ktls, &shard.ktls),
    )
    .await;
    let balancer = &gen.balancers[listener];
    match started {
        Ok(s) => {
            balancer.succeeded(addr);
            s.count(m);
            Some(s.conn)
        }
        Err(e) => {
            // The backend's handshake failing counts towards its
            // `max_fails`, as a failed connect does; ktern's own failures
            // do not.
            if let crate::upstream::conn::StartTlsError::Handshake(_) = e {
                balancer.failed(addr, std::time::Instant::now());
            }
            M::inc(e.counter(m));
            e.log(balancer, peer, addr);
            None
        }
    }
}

/// Runs the listener's route for an established connection.
fn proxy<'a>(
    shard: &'a Shard,
    gen: &'a ShardGen,
    listener: usize,
    conn: TlsConn,
    info: TlsInfo,
    peer: SocketAddr,
    dest: Option<Box<SocketAddr>>,
) -> impl Future<Output = ()> + 'a {
    let path = conn.path();
    // Boxed while the backend connect runs, so the long-lived future stores
    // a pointer rather than the connection (async state keeps every
    // captured value's slot for the future's whole life).
    let mut conn = Some(Box::new(conn));
    async move {
        let m = &shard.metrics;
        let moved = Meter::new(&shard.metrics);
        let result = match &gen.config().listeners[listener].route {
            Route::Tcp(route) => {
                let balancer = &gen.balancers[listener];
                // Boxed for the same reason as the handshake.
                let connected = Box::pin(balancer.connect(route.connect_timeout)).await;
                let Some(conn) = conn.take() else { return };
                let connected = match (connected, route.send_proxy) {
                    (Ok((backend, addr)), Some(version)) => {
                        Box::pin(send_proxy(
                            (backend, addr),
                            version,
                            peer,
                            dest.as_deref(),
                            &conn,
                            &info,
                            balancer,
                        ))
                        .await
                    }
                    (c, _) => c,
                };
                match connected {
                    Ok((backend, addr)) if route.tls.is_some() => {
                        match Box::pin(backend_tls(
                            shard,
                            gen,
                            listener,
                            route,
                            (backend, addr),
                            peer,
                            info.alpn,
                        ))
                        .await
                        {
                            Some(backend) => {
                                let mut session = tcp::TlsSession::new(*conn, backend);
                                let idle = shard.idle.register(route.idle_timeout);
                                tracing::debug!(%peer, backend = %addr, paths = ?session.paths(), "tcp route over TLS both ways");
                                Box::pin(session.run(&idle, &shard.pipes, &moved))
                                    .await
                                    .map_err(Failure::Tcp)
                            }
                            None => {
                                // Logged and counted; the client gets a
                                // close_notify and no data.
                                let (_, mut writer) = conn.split();
                                let _ = Box::pin(writer.end()).await;
                                Ok(())
                            }
                        }
                    }
                    Ok((backend, addr)) => match tcp::Session::new(*conn, backend) {
                        Ok(mut session) => {
                            balancer.succeeded(addr);
                            let idle = shard.idle.register(route.idle_timeout);
                            // Boxed: the tunnel's state is the `tcp` route's
                            // alone; inline, every connection's task (an
                            // idle HTTP one too) would carry its size.
                            Box::pin(session.run(&idle, &shard.pipes, &moved, m))
                                .await
                                .map_err(Failure::Tcp)
                        }
                        Err(e) => Err(Failure::Tcp(e)),
                    },
                    Err(e) => {
                        M::inc(e.counter(m));
                        balancer.log_connect_failure(peer, "tcp", &e);
                        // Tell the client we are closing; it gets no data.
                        let (_, mut writer) = conn.split();
                        let _ = Box::pin(writer.end()).await;
                        Ok(())
                    }
                }
            }
            // Served whole by `passthrough`, never established here.
            Route::Passthrough(_) => return,
            Route::Http(route) => {
                let Some(conn) = conn.take() else { return };
                // The HTTP routes keep the halves; the rekey counts are
                // read through this after they end.
                let probe = conn.rekey_probe();
                // A group with `send_proxy` pools its connections for this
                // client alone: each carries this client's header.
                let upstreams = &gen.config().upstreams;
                let proxied = upstreams.iter().any(|u| u.send_proxy.is_some());
                let private: Vec<Rc<crate::upstream::pool::Pool>> = if proxied {
                    upstreams
                        .iter()
                        .zip(&gen.pools)
                        .map(|(u, shared)| match u.send_proxy {
                            Some(_) => Rc::new(crate::upstream::pool::Pool::capped(
                                1,
                                crate::upstream::pool::PRIVATE_CAP,
                            )),
                            None => shared.clone(),
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let local = if proxied {
                    dest.as_deref().copied().or_else(|| conn.local_addr().ok())
                } else {
                    None
                };
                let (reader, writer) = conn.split();
                let ctx = http::forward::Ctx {
                    route,
                    upstreams,
                    balancers: &gen.upstream_balancers,
                    group_tls: &gen.group_tls,
                    ktls: (gen.config().runtime.ktls, &shard.ktls),
                    pools: if proxied { &private } else { &gen.pools },
                    drain: &shard.drain,
                    retired: &gen.retired,
                    responses: &gen.responses[listener],
                    metrics: m,
                    peer,
                    local,
                    moved: &moved,
                    idle: &shard.idle,
                    pipes: &shard.pipes,
                    tls: &info,
                    access: gen.gen.access.as_ref(),
                    refused_log: &shard.refused_log,
                    clock: None,
                };
                // Boxed: the HTTP pump's state is large, and inline it would
                // sit in every connection's task, `tcp` routes' too (issue
                // 12's idle budget).
                let served = if info.alpn_h2 {
                    Box::pin(crate::proxy::h2::serve(reader, writer, ctx)).await
                } else {
                    let serving = Box::pin(http::forward::serve(reader, writer, ctx));
                    tracing::trace!(bytes = std::mem::size_of_val(&*serving), "http task size");
                    serving.await
                };
                moved.set_rekeys(probe.counts());
                served.map_err(Failure::Http)
            }
        };
        let moved = moved.get();
        M::add(&m.ktls_rekey_rx, moved.rekey_rx);
        M::add(&m.ktls_rekey_tx, moved.rekey_tx);
        match result {
            Err(e) => {
                let (counter, side) = e.classify(m);
                M::inc(counter);
                match ended_line_due(shard, side) {
                    Some(count) => {
                        tracing::info!(%peer, ?path, up = moved.up, down = moved.down, side, error = %e, count, "connection ended with error")
                    }
                    None => {
                        tracing::debug!(%peer, ?path, up = moved.up, down = moved.down, side, error = %e, "connection ended with error")
                    }
                }
            }
            Ok(()) => {
                tracing::debug!(%peer, ?path, up = moved.up, down = moved.down, "connection closed")
            }
        }
    }
}

/// Why a connection ended abnormally, as its route reported it. The one
/// place that maps a failure to its counter and names the side that failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Tcp(#[from] ProxyError),
    #[error("{0}")]
    Http(HttpError),
}

impl Failure {
    /// The counter this failure adds one to, and who failed (for the log
    /// line): the client, the backend, ktern itself, or nobody (an idle
    /// timeout is ktern's decision).
    fn classify<'m>(&self, m: &'m M) -> (&'m std::sync::atomic::AtomicU64, &'static str) {
        match self {
            Failure::Tcp(e) | Failure::Http(HttpError::Tunnel(e)) => match e {
                ProxyError::Idle(_) => (&m.idle_timeouts, "idle"),
                // A deferred connection's hand-over to the kernel failed.
                ProxyError::Downstream(StreamError::Offload(_)) => {
                    (&m.ktls_offload_errors, "internal")
                }
                ProxyError::Upstream(_) | ProxyError::UpstreamTls(_) => {
                    (&m.upstream_errors, "upstream")
                }
                ProxyError::Local(_) => (&m.local_exhaustion, "internal"),
                ProxyError::Downstream(s) => (stream_counter(m, s), "downstream"),
            },
            // A deferred connection's hand-over to the kernel failed.
            Failure::Http(HttpError::Downstream(StreamError::Offload(_))) => {
                (&m.ktls_offload_errors, "internal")
            }
            Failure::Http(HttpError::Downstream(s)) => (stream_counter(m, s), "downstream"),
            Failure::Http(HttpError::ClientStalled) => (&m.downstream_errors, "downstream"),
            Failure::Http(HttpError::UpstreamAborted(_)) => (&m.upstream_errors, "upstream"),
            Failure::Http(HttpError::FileAborted(_)) => (&m.internal_errors, "internal"),
            // The client's own GOAWAY with an error code: its word about
            // ktern (or itself), not a protocol error or flood ktern
            // caught. h2 reports both alike but for `is_remote`.
            Failure::Http(HttpError::H2(e)) if e.is_remote() => {
                (&m.downstream_errors, "downstream")
            }
            Failure::Http(HttpError::H2(e)) => match e.reason() {
                Some(h2::Reason::ENHANCE_YOUR_CALM) => (&m.h2_floods, "downstream"),
                _ => (&m.h2_protocol_errors, "downstream"),
            },
        }
    }
}

/// The counter for a client-side failure after the handshake.
fn stream_counter<'m>(m: &'m M, s: &StreamError) -> &'m std::sync::atomic::AtomicU64 {
    match s {
        StreamError::RekeyUnsupported(_) => &m.ktls_rekey_unsupported,
        StreamError::Unexpected(_) => &m.tls_unexpected,
        StreamError::PeerAlert(_) => &m.tls_peer_alerts,
        StreamError::ConfidentialityLimit => &m.tls_limit_closes,
        _ => &m.downstream_errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_connection_ends_that_connection_counted_not_the_shard() {
        let m = std::sync::Arc::new(M::default());
        super::super::set_thread_shard(0, m.clone());
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        // What the panicking task held is dropped, as a connection's
        // socket and counts are.
        let held = Rc::new(());
        let served = rt.block_on(async {
            let h = held.clone();
            contained(async move {
                let _h = h;
                panic!("a bug in a connection")
            })
            .await;
            let served = std::cell::Cell::new(false);
            contained(async { served.set(true) }).await;
            served.get()
        });
        assert!(served, "the next connection is served");
        assert_eq!(
            Rc::strong_count(&held),
            1,
            "the panicked task's state was dropped"
        );
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(count(&m.internal_errors), 1);
    }
}
