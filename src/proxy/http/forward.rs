//! The `http` route's pump: reads request heads from the client, routes by
//! Host and path, forwards each request (body streamed, never buffered
//! whole) to a pooled or new backend connection, and relays the response.
//! Requests on one connection are answered in order (pipelining).
//!
//! The parsing and framing decisions are the sans-IO modules' (`head`,
//! `body`, `rewrite`); this file only moves bytes and keeps time.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use monoio::net::TcpStream;

use super::body::{BodyError, BodyScanner, Framing};
use super::exchange::{self, Relay, UpstreamFault, Verdict};
use super::files::{self, FileError, Plan, Resolved};
use super::head::{self, HeadError, Limits, Persist, RequestHead, ResponseError};
use super::rewrite::{self, Forwarding};
use crate::buffers;
use crate::clock;
use crate::config::{HttpRoute, Upstream};
use crate::handshake::TlsInfo;
use crate::ktls::Path;
use crate::ktls::{SendfileError, StreamError, TlsReader, TlsWriter};
use crate::metrics::access::{self, Sink};
use crate::metrics::family::ClassCounters;
use crate::metrics::ShardMetrics as M;
use crate::proxy::drain::DrainSignal;
use crate::proxy::idle::{self, Idle, IdleSweeper};
use crate::proxy::tcp::{self, Meter, Moved, PipePool, ProxyError};
use crate::upstream::conn::BackendConn;
use crate::upstream::pool::Pool;
use crate::upstream::Balancer;

/// Largest backend response head accepted (502 above it).
const MAX_RESPONSE_HEAD: usize = 64 << 10;

/// Backend read size: four TLS records' worth of plaintext.
const READ: usize = 64 << 10;

/// Largest body prefix sent in the same write as the response head: one
/// TLS record's plaintext (RFC 8446 §5.1), so the copy stays small.
const COALESCE: usize = 16 << 10;

/// Below this much room in the client's send buffer, a response body is
/// not read further until the socket says it has room (see `client_room`).
const MIN_ROOM: usize = 16 << 10;

/// How long an idle connection may still deliver a request once the drain
/// starts: bytes already on their way (a client that wrote just before
/// the close would otherwise see its request fail).
const DRAIN_GRACE: Duration = Duration::from_millis(50);

/// What the pump needs from its shard.
#[derive(Clone)]
pub struct Ctx<'a> {
    /// The listener's route.
    pub route: &'a HttpRoute,
    /// All upstream groups.
    pub upstreams: &'a [Upstream],
    /// One balancer per upstream group.
    pub balancers: &'a [Rc<Balancer>],
    /// rustls client configs per upstream group with `tls`, one per
    /// backend (`ShardGen::group_tls`).
    pub group_tls: &'a [Vec<Arc<rustls::ClientConfig>>],
    /// `runtime.ktls` and what this kernel offloads (backend TLS).
    pub ktls: (crate::config::KtlsMode, &'a crate::ktls::Support),
    /// Idle backend connections, one pool per upstream group: the shard's,
    /// or for a `send_proxy` group this client connection's own.
    pub pools: &'a [Rc<Pool>],
    /// The shard's drain flag: close instead of keeping alive.
    pub drain: &'a DrainSignal,
    /// When a reload replaced the connection's generation (see
    /// `ShardGen::retired`).
    pub retired: &'a Cell<Option<Instant>>,
    /// This listener's response counters: one per upstream group, then
    /// static files, then ktern's own answers.
    pub responses: &'a [Arc<ClassCounters>],
    /// Counters.
    pub metrics: &'a M,
    /// The client.
    pub peer: SocketAddr,
    /// The address the client connected to, when an upstream group sends
    /// PROXY headers (read only then: one `getsockname` per connection).
    pub local: Option<SocketAddr>,
    /// Bytes moved, for the connection's log line.
    pub moved: &'a Meter<'a>,
    /// The shard's idle sweeper: the clock's entries, and upgraded tunnels'.
    pub idle: &'a IdleSweeper,
    /// The shard's pipes (for upgraded tunnels under kTLS).
    pub pipes: &'a PipePool,
    /// The connection's TLS facts (SNI routing, access log).
    pub tls: &'a TlsInfo,
    /// Where access lines go, if anywhere.
    pub access: Option<&'a Sink>,
    /// The shard's throttle for the line of a request refused before its
    /// exchange (a bad head, a malformed HTTP/2 request), which any client
    /// can cause once per connection or stream: one per 10 s with how many
    /// since, the others at debug.
    pub refused_log: &'a crate::clock::LogEvery,
    /// The wait clock of whatever waits for one thing at a time: an
    /// HTTP/1.1 connection (set by [`serve`]) or one HTTP/2 stream (set
    /// per stream by `h2::serve`). An entry of the shard's sweeper that
    /// bounds each wait in turn. `None` until one of them sets it; a wait
    /// without one gets a timer of its own.
    pub clock: Option<Rc<Idle>>,
}

pin_project_lite::pin_project! {
    /// [`Ctx::within`]'s future: `fut` inline once (see `idle::Bounded`
    /// for why not an `async fn`), or boxed with its timer.
    #[project = WithinProj]
    #[must_use = "`within` arms the wait when called: await it at once"]
    pub(crate) enum Within<'a, F: Future> {
        Clock { #[pin] wait: idle::Bounded<'a, F> },
        Timer { wait: Pin<Box<monoio::time::Timeout<F>>> },
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, idle::Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            WithinProj::Clock { wait } => wait.poll(cx),
            WithinProj::Timer { wait } => wait.as_mut().poll(cx).map_err(|_| idle::Elapsed),
        }
    }
}

impl Ctx<'_> {
    /// `fut`, one wait for a request body's next bytes under `pace`
    /// (`received` so far, `per_read` for each wait): `None`, counted,
    /// when the body is too slow (the pace ran out, or this wait did).
    /// Both protocols' pumps wait this way, so both time it alike.
    pub(crate) async fn paced<F: Future>(
        &self,
        pace: &mut exchange::BodyPace,
        received: u64,
        per_read: Duration,
        fut: F,
    ) -> Option<F::Output> {
        let out = match pace.wait(received, per_read) {
            Some(wait) => {
                let began = clock::coarse_now();
                let out = self.within(wait, fut).await.ok();
                // At most the wait allowed: the coarse clock may read a
                // tick more, which would cut off a body that made it in time.
                pace.waited(
                    clock::coarse_now()
                        .saturating_duration_since(began)
                        .min(wait),
                );
                out
            }
            None => None,
        };
        if out.is_none() {
            M::inc(&self.metrics.http_slow_bodies);
        }
        out
    }

    /// Runs `fut` for at most `timeout`. On the connection's clock this
    /// costs no allocation and no timer (the expiry is found by the
    /// shard's sweeper, at most a quarter of the shortest timeout late,
    /// see `idle::sweep_period`); without one, a boxed monoio timer (boxed,
    /// so its 128-byte alignment does not spread to the caller's future).
    /// The wait starts when this is called (the clock is armed, or the
    /// timer set, here): await it at once.
    pub(crate) fn within<F: Future>(&self, timeout: Duration, fut: F) -> Within<'_, F> {
        match &self.clock {
            Some(clock) => {
                self.idle.arm(clock, timeout);
                Within::Clock {
                    wait: idle::bounded(clock, fut),
                }
            }
            None => Within::Timer {
                wait: Box::pin(monoio::time::timeout(timeout, fut)),
            },
        }
    }

    /// Draining, or the connection's config was replaced more than a
    /// keep-alive timeout ago: keep-alive ends after the current response.
    pub(crate) fn closing(&self) -> bool {
        self.drain.is_on()
            || self
                .retired
                .get()
                .is_some_and(|at| at.elapsed() >= self.route.keepalive_timeout)
    }
}

/// What one request/response exchange did, for its access line.
#[derive(Default)]
pub(crate) struct Exchange {
    /// Status sent to the client (0: none was sent).
    pub(crate) status: u16,
    /// The backend that answered.
    pub(crate) upstream: Option<SocketAddr>,
    /// Request head to backend response head.
    pub(crate) upstream_time: Option<Duration>,
    /// The request was HEAD: ktern's own answers carry no body.
    pub(crate) head_only: bool,
    /// The request was HTTP/1.0: a kept connection is said to be kept.
    pub(crate) http10: bool,
    /// Index into `Ctx::responses` of who answered (none: ktern itself).
    pub(crate) answered_by: Option<usize>,
    /// The kernel carried the records at the end (none: as at the
    /// handshake, `TlsInfo::kernel`).
    pub(crate) kernel: Option<bool>,
    /// The client's method where it is not the upstream head's: an
    /// HTTP/2 WebSocket's CONNECT goes upstream as a `GET` (RFC 8441),
    /// and the access line says what the client sent.
    pub(crate) client_method: Option<&'static str>,
    /// The request body was read to its end (it went to the backend
    /// whole): a close after it leaves none of it unread.
    pub(crate) body_read: bool,
}

/// Why an HTTP connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The client side failed.
    #[error("downstream: {0}")]
    Downstream(#[from] StreamError),
    /// The backend failed after the response started: the client
    /// connection is aborted so a cut-short body never looks complete.
    #[error("upstream failed mid-response: {0}")]
    UpstreamAborted(#[from] UpstreamAbort),
    /// A static file failed while its body was being sent (ktern's own
    /// side: the filesystem); the client connection is aborted.
    #[error("internal: static file failed mid-response: {0}")]
    FileAborted(FileAbort),
    /// An upgraded (101) tunnel ended with an error.
    #[error("upgraded tunnel: {0}")]
    Tunnel(ProxyError),
    /// The client took no response bytes within `send_timeout` (it
    /// stopped reading); the connection is aborted.
    #[error("client took no response bytes within send_timeout")]
    ClientStalled,
    /// The client broke HTTP/2 (a connection error: bad frames, a header
    /// list over the limit) or flooded it (ENHANCE_YOUR_CALM); GOAWAY was
    /// sent with the code.
    #[error("HTTP/2: {0}")]
    H2(h2::Error),
}

/// How a backend failed after its response started.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamAbort {
    /// Its body broke its own framing (chunked syntax, length).
    #[error("response body: {0}")]
    Framing(#[from] BodyError),
    /// No body bytes within `response_timeout`.
    #[error("no response bytes within response_timeout")]
    Stalled,
    /// The read failed (reset).
    #[error("response read: {0}")]
    Io(std::io::Error),
    /// A body delimited by the close ended with the TLS backend's FIN
    /// alone: incomplete (RFC 9112 §9.8), since anyone on the path can
    /// send a FIN, and only its close_notify says the backend ended it.
    #[error(
        "the TLS backend closed without close_notify: a body delimited by the close is incomplete"
    )]
    UncleanClose,
}

/// How a static file failed while being sent.
#[derive(Debug, thiserror::Error)]
pub enum FileAbort {
    /// Shorter than its length when the head went out.
    #[error("{0} shrank while being sent")]
    Shrank(std::path::PathBuf),
    /// A read failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

enum Next {
    /// Serve the next request on this connection.
    KeepAlive,
    /// Close cleanly (close_notify).
    Close,
    /// Close cleanly, then read and drop what the client still sends for
    /// a while ([`linger`]): it may be mid-body or mid-head, and a close
    /// with its bytes unread resets the connection, which can destroy the
    /// last answer (a 413 to an upload) before the client reads it.
    Linger,
    /// The connection already ended (an upgraded tunnel closed it).
    Ended,
}

/// Serves requests until the client closes, a timeout, or an error. A
/// connection that ends on the client's error (bad TLS after the handshake)
/// sends the fatal alert rustls made first, as the `tcp` route does.
///
/// A plain function around an `async` block that owns the halves and
/// `ctx` and lends them: an `async fn` taking them by value kept each
/// twice in the connection's state (its argument and the `mut` copy it
/// borrowed), 304 bytes for the connection's life, idle ones included.
/// The keep-alive clock is registered when this is called: await it at
/// once.
pub fn serve<'a>(
    mut reader: TlsReader,
    mut writer: TlsWriter,
    mut ctx: Ctx<'a>,
) -> impl Future<Output = Result<(), HttpError>> + 'a {
    let clock = ctx.idle.register(ctx.route.keepalive_timeout);
    ctx.clock = Some(clock.clone());
    async move {
        let result = serve_requests(&mut reader, &mut writer, &ctx, &clock).await;
        if let Err(HttpError::Downstream(_)) = &result {
            // Boxed: its timer (640 bytes) exists only while an alert goes out.
            Box::pin(writer.abort()).await;
        }
        result
    }
}

async fn serve_requests(
    reader: &mut TlsReader,
    writer: &mut TlsWriter,
    ctx: &Ctx<'_>,
    clock: &Rc<Idle>,
) -> Result<(), HttpError> {
    let mut inbuf = reader.take_pending();
    let mut first = true;
    loop {
        if inbuf.is_empty() && !first {
            // The userspace record buffer (as large as the last response's
            // biggest write) is not kept while the client is idle.
            writer.release_buffers();
            // The keep-alive wait, on the connection's clock.
            ctx.idle.arm(clock, ctx.route.keepalive_timeout);
            match next_request(reader, clock, ctx).await? {
                Wake::Input => {}
                Wake::Idle => break,
            }
        }
        // On the heap: a request's state (head parsing, backend connect,
        // body and response streaming) exists only while one runs; between
        // requests an idle keep-alive connection holds just this loop's
        // state (issue 12's idle budget). Its waits are bounded on the
        // connection's clock or by boxed timers, never by a monoio timer
        // inline (see `boxed`). In a block of the shard's cache, given back
        // when the request is done.
        match buffers::future(exchange(reader, writer, &mut inbuf, first, ctx)).await? {
            Next::KeepAlive => first = false,
            Next::Close => break,
            Next::Linger => {
                tracing::debug!(peer = %ctx.peer, "lingering close: the client's bytes may be unread");
                let _ = Box::pin(writer.end()).await;
                let deadline = monoio::time::Instant::now() + crate::proxy::LINGER;
                Box::pin(crate::proxy::linger(reader, deadline)).await;
                return Ok(());
            }
            Next::Ended => return Ok(()),
        }
    }
    let _ = Box::pin(writer.end()).await;
    Ok(())
}

/// Boxes a future made once per request, refusing at compile time one
/// that is over-aligned. A monoio timer held inline is `repr(align(128))`,
/// and so is every future around it; such a box is a `posix_memalign`
/// (about 900 instructions under callgrind, against some 200 for `malloc`
/// of the same size): three per keep-alive request before issue 13's
/// work. A plain function, so no borrowed local of the caller's async
/// state outlives the move (it would keep a copy of the future inline).
pub(crate) fn boxed<F: Future>(f: F) -> std::pin::Pin<Box<F>> {
    const { buffers::refuse_over_aligned::<F>() };
    Box::pin(f)
}

/// Why the wait between two requests ended.
enum Wake {
    /// Bytes arrived (or the client closed): read the next head.
    Input,
    /// Keep-alive timeout, or a drain with nothing on its way: close.
    Idle,
}

/// Waits, between requests, for the next one. Holds only the socket's
/// readiness wait, an idle-sweeper entry and a drain slot: no timer
/// (monoio's `Sleep` is 640 bytes) and no buffer.
///
/// A drain ends the wait, after a short grace for a request already on its
/// way, which is then answered with `Connection: close`. Nothing is lost:
/// the wait is for readiness only, no bytes were read.
async fn next_request(
    reader: &mut TlsReader,
    idle: &Idle,
    ctx: &Ctx<'_>,
) -> Result<Wake, HttpError> {
    {
        let mut input = std::pin::pin!(reader.input());
        let waited = ctx
            .drain
            .or_drain(std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = input.as_mut().poll(cx) {
                    return Poll::Ready(r.map(|()| Wake::Input));
                }
                idle.poll_expired(cx).map(|()| Ok(Wake::Idle))
            }))
            .await;
        if let Some(r) = waited {
            return Ok(r.map_err(StreamError::from)?);
        }
    }
    // Boxed: the grace timer exists only during a drain.
    match Box::pin(monoio::time::timeout(DRAIN_GRACE, reader.input())).await {
        Err(_) => Ok(Wake::Idle),
        Ok(r) => {
            r.map_err(StreamError::from)?;
            Ok(Wake::Input)
        }
    }
}

/// One request: its head, its exchange with the backend (or a file, or
/// ktern's own answer) and its access line.
async fn exchange(
    reader: &mut TlsReader,
    writer: &mut TlsWriter,
    inbuf: &mut Vec<u8>,
    first: bool,
    ctx: &Ctx<'_>,
) -> Result<Next, HttpError> {
    let limits = Limits::default();
    let mut head = match read_head(reader, inbuf, &limits, ctx, first).await? {
        HeadOutcome::Head(h) => h,
        HeadOutcome::Closed | HeadOutcome::Idle => return Ok(Next::Close),
        HeadOutcome::Refused(status, reason) => {
            M::inc(&ctx.metrics.http_local_errors);
            match ctx.refused_log.due() {
                Some(count) => {
                    tracing::info!(peer = %ctx.peer, status, reason, count, "request refused ({count} since the last such line; at most one line per 10 s, the others at debug)")
                }
                None => tracing::debug!(peer = %ctx.peer, status, reason, "request refused"),
            }
            let body = format!("{status} {reason}\n");
            let before = ctx.moved.get();
            let sent = send(
                writer,
                rewrite::local_response(status, reason, Persist::Close, &[], &body, false),
                ctx,
            )
            .await;
            let ex = Exchange {
                status,
                ..Exchange::default()
            };
            log(ctx, None, &ex, before, SystemTime::now(), Instant::now());
            sent?;
            // The client may still be sending the head (one over the
            // limit) or a body behind it.
            return Ok(Next::Linger);
        }
    };
    // Whether the client means to keep the connection (RFC 9112 §9.3): it
    // may then send its next request before this answer ends (pipelining),
    // which a close of ktern's must not reset.
    let client_keeps = head.keep_alive;
    if ctx.closing() {
        // Draining, or reloaded: this response says `Connection: close`.
        head.keep_alive = false;
    }
    M::inc(&ctx.metrics.http_requests);
    let started = Instant::now();
    // The wall clock is only read when a line will be written.
    let wall = ctx.access.map_or(UNIX_EPOCH, |_| SystemTime::now());
    let before = ctx.moved.get();
    // The head left `inbuf` when it was parsed: with nothing pipelined
    // behind it, hold no read buffer while the client is idle. (When the
    // head took the buffer itself, `inbuf` has no capacity left and this
    // gives nothing back.)
    if inbuf.is_empty() && inbuf.capacity() > 0 {
        buffers::give(std::mem::take(inbuf));
    }
    let mut rec = Logged {
        ctx,
        ex: Exchange {
            head_only: head.method() == "HEAD",
            http10: head.minor == 0,
            ..Exchange::default()
        },
        head,
        before,
        wall,
        started,
        done: false,
    };
    let next = forward(reader, writer, inbuf, &rec.head, ctx, &mut rec.ex, started).await;
    rec.ex.kernel = Some(writer.path() == Path::Kernel);
    rec.log();
    let (head, ex) = (&rec.head, &rec.ex);
    // A closing answer to a request whose body was not read whole (a 413,
    // a local answer, a backend's early answer), or with bytes pipelined
    // behind it, read or still in the socket (a close of ktern's: a drain,
    // a reload, a backend that ended the body with its close). A body that
    // went to the backend whole and a client that asked for the close leave
    // nothing to wait for: the connection goes at once.
    let unread = head.framing != Framing::Length(0) && !ex.body_read;
    next.map(|next| match next {
        Next::Close if unread || !inbuf.is_empty() || (client_keeps && reader.unread_input()) => {
            Next::Linger
        }
        next => next,
    })
}

/// A request's access line, written when its exchange returns
/// ([`Logged::log`]) or, if the exchange is dropped before (the drain
/// timeout cut its connection, `DrainSignal::cut`), when it drops, with
/// what it had sent by then.
struct Logged<'r, 'a> {
    ctx: &'r Ctx<'a>,
    head: RequestHead,
    ex: Exchange,
    before: Moved,
    wall: SystemTime,
    started: Instant,
    done: bool,
}

impl Logged<'_, '_> {
    fn log(&mut self) {
        self.done = true;
        log(
            self.ctx,
            Some(&self.head),
            &self.ex,
            self.before,
            self.wall,
            self.started,
        );
    }
}

impl Drop for Logged<'_, '_> {
    fn drop(&mut self) {
        // Not while a panic unwinds: the access log may be what panicked.
        if !self.done && !std::thread::panicking() {
            // `ex.status` is set when the answer is decided (the backend's
            // head read, a local answer made), before its head is written:
            // cut with no byte of it sent, the client saw none (444).
            if self.ctx.drain.is_cut() && self.ctx.moved.get().down == self.before.down {
                self.ex.status = 0;
            }
            self.log();
        }
    }
}

/// Writes the access line for one exchange (`head` is `None` for a
/// request refused before its head could be parsed).
fn log(
    ctx: &Ctx<'_>,
    head: Option<&RequestHead>,
    ex: &Exchange,
    before: Moved,
    wall: SystemTime,
    started: Instant,
) {
    let now = ctx.moved.get();
    let bytes_in = head.map_or(0, |h| h.len as u64) + (now.up - before.up);
    let protocol = match head.map_or(1, |h| h.minor) {
        0 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    record(
        ctx,
        head,
        ex,
        (bytes_in, now.down - before.down),
        protocol,
        wall,
        started,
    );
}

/// Counts one answered exchange (by status class, under who answered) and
/// writes its access line: the one place both protocols record a request.
pub(crate) fn record(
    ctx: &Ctx<'_>,
    head: Option<&RequestHead>,
    ex: &Exchange,
    (bytes_in, bytes_out): (u64, u64),
    protocol: &str,
    wall: SystemTime,
    started: Instant,
) {
    let total = started.elapsed();
    // A parsed request that got no answer: the drain timeout cut it
    // (nginx's 444, "closed without a response"), or the client went away
    // first (nginx's 499, "client closed request").
    let status = match (ex.status, head) {
        (0, Some(_)) if ctx.drain.is_cut() => 444,
        (0, Some(_)) => 499,
        (s, _) => s,
    };
    if status != 0 {
        let who = ex
            .answered_by
            .unwrap_or(ctx.responses.len().saturating_sub(1));
        if let Some(c) = ctx.responses.get(who) {
            c.record(status);
        }
        if head.is_some() {
            ctx.metrics.families.request_seconds.observe(total);
        }
    }
    let Some(sink) = ctx.access else { return };
    let first = |name| head.and_then(|h| h.values(name).next());
    let record = access::Record {
        time: wall,
        client: ctx.peer,
        tls: ctx.tls,
        kernel: ex.kernel.unwrap_or(ctx.tls.kernel),
        method: ex
            .client_method
            .unwrap_or_else(|| head.map_or("-", |h| h.method())),
        host: head.and_then(|h| h.host()).unwrap_or(""),
        target: head.map_or("-", |h| h.target()),
        protocol,
        status,
        bytes_in,
        bytes_out,
        referer: first("referer"),
        user_agent: first("user-agent"),
        upstream: ex.upstream,
        total,
        upstream_time: ex.upstream_time,
    };
    sink.write(&record, &ctx.metrics.access_log_dropped);
}

enum HeadOutcome {
    Head(RequestHead),
    /// The client closed between requests.
    Closed,
    /// Head timeout with nothing received (a new connection that sent
    /// nothing, or readiness without data).
    Idle,
    /// Answer with this status and close.
    Refused(u16, &'static str),
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        301 => "Moved Permanently",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        405 => "Method Not Allowed",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

async fn read_head(
    reader: &mut TlsReader,
    inbuf: &mut Vec<u8>,
    limits: &Limits,
    ctx: &Ctx<'_>,
    first: bool,
) -> Result<HeadOutcome, HttpError> {
    // Called once input is there (or on a new connection). The input may
    // still turn out to be no request byte (a kTLS control record such as
    // a client KeyUpdate): until the first byte of a keep-alive request,
    // the keep-alive timeout still applies; from the first byte on, the
    // head timeout (408 once a head has started). No drain race here: the
    // input that woke us may be a request, which is answered (with
    // `Connection: close` while draining), never dropped.
    let mut waiting = inbuf.is_empty() && !first;
    // One deadline for the whole head, however many reads it takes.
    // The coarse clock: a bound in seconds, checked by the idle sweeper.
    let mut deadline = clock::coarse_now()
        + if waiting {
            ctx.route.keepalive_timeout
        } else {
            ctx.route.head_timeout
        };
    let mut pacer = head::HeadPacer::default();
    loop {
        if pacer.ready(inbuf) {
            match head::parse_request_in(inbuf, limits) {
                Ok(Some(h)) => return Ok(HeadOutcome::Head(h)),
                Ok(None) => {}
                Err(e) => return Ok(HeadOutcome::Refused(e.status(), refusal(e))),
            }
        }
        let left = deadline.saturating_duration_since(clock::coarse_now());
        let chunk = match ctx.within(left, reader.read_chunk()).await {
            Err(_) if inbuf.is_empty() => return Ok(HeadOutcome::Idle),
            Err(_) => return Ok(HeadOutcome::Refused(408, reason(408))),
            Ok(r) => r?,
        };
        if waiting && chunk.as_ref().is_some_and(|c| !c.is_empty()) {
            waiting = false;
            deadline = clock::coarse_now() + ctx.route.head_timeout;
        }
        match chunk {
            None if inbuf.is_empty() => return Ok(HeadOutcome::Closed),
            None => return Ok(HeadOutcome::Refused(400, "Bad Request")),
            Some(c) if inbuf.is_empty() => *inbuf = c,
            Some(c) => inbuf.extend_from_slice(&c),
        }
    }
}

fn refusal(e: HeadError) -> &'static str {
    reason(e.status())
}

async fn send(writer: &mut TlsWriter, bytes: Vec<u8>, ctx: &Ctx<'_>) -> Result<(), HttpError> {
    let n = bytes.len() as u64;
    // nginx's send_timeout: a client that stops reading would otherwise
    // hold this connection, its backend connection and buffers for ever.
    // A record may be half sent, so the connection cannot go on.
    let Ok((res, sent)) = ctx
        .within(ctx.route.send_timeout, writer.write_all(bytes))
        .await
    else {
        M::inc(&ctx.metrics.http_send_timeouts);
        return Err(HttpError::ClientStalled);
    };
    buffers::give(sent);
    res?;
    ctx.moved.add(0, n);
    Ok(())
}

/// How long a backend whose request body stopped going through (a write
/// failed or stalled) has to show an answer it sent before the body's
/// end. Such an answer is normally there already, ahead of the backend's
/// close; a backend that closed without one gives end of file at once.
const EARLY_ANSWER: Duration = Duration::from_secs(1);

/// Bytes of a response body left from which it is spliced (under kTLS,
/// from a plain backend) instead of read and written: a pipe and two
/// splices per 64 KiB beat a read and a write only when there are many.
const SPLICE_MIN: u64 = 64 << 10;

/// Why [`splice_body`] stopped short.
enum Spliced {
    /// The backend closed before the body's length.
    Ended,
    /// A read, a write or a wait failed.
    Failed(HttpError),
}

/// Moves the last `left` bytes of a response body from the backend's
/// socket to the client's kTLS socket through `pipe` (`splice`; the
/// kernel seals the records). The same limits as the buffered loop:
/// `stall` for each wait on the backend, `send_timeout` for the client.
/// On success the pipe is empty again; on error it is dropped.
async fn splice_body(
    sock: &TcpStream,
    pipe: &crate::sys::Pipe,
    writer: &mut TlsWriter,
    mut left: u64,
    ctx: &Ctx<'_>,
    stall: Duration,
) -> Result<(), Spliced> {
    use std::os::fd::AsFd;
    let fail = |e: HttpError| Spliced::Failed(e);
    // SPLICE_F_NONBLOCK makes only the pipe's side non-blocking: TCP's
    // splice read waits on the socket's own O_NONBLOCK (`tcp_splice_read`,
    // `sock_rcvtimeo`), and io_uring's connect hands out blocking sockets.
    // Without this a backend pausing mid-body stopped the whole shard in
    // the kernel until it sent more. Its io_uring sends and receives are
    // the same on a non-blocking socket.
    crate::sys::set_nonblocking(crate::sys::borrow_fd(sock))
        .map_err(|e| fail(UpstreamAbort::Io(e).into()))?;
    while left > 0 {
        let want = left.min(tcp::SPLICE_CHUNK as u64) as usize;
        match crate::sys::splice(crate::sys::borrow_fd(sock), pipe.tx.as_fd(), want) {
            Ok(0) => return Err(Spliced::Ended),
            Ok(n) => {
                match ctx
                    .within(ctx.route.send_timeout, writer.splice_from(pipe, n))
                    .await
                {
                    Err(_) => {
                        M::inc(&ctx.metrics.http_send_timeouts);
                        return Err(fail(HttpError::ClientStalled));
                    }
                    Ok(r) => r.map_err(|e| fail(e.into()))?,
                }
                left -= n as u64;
                ctx.moved.add(0, n as u64);
                M::add(&ctx.metrics.http_spliced_bytes, n as u64);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                match ctx.within(stall, sock.readable(false)).await {
                    Err(_) => return Err(fail(UpstreamAbort::Stalled.into())),
                    Ok(r) => r.map_err(|e| fail(UpstreamAbort::Io(e).into()))?,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(UpstreamAbort::Io(e).into())),
        }
    }
    Ok(())
}

/// A connection that rustls carries until its first bulk response
/// (`runtime.ktls_after`) is about to send `bytes` in this one: its keys
/// go to the kernel now if that is enough (counted and logged).
fn bulk_ahead(writer: &mut TlsWriter, bytes: u64, ctx: &Ctx<'_>) -> Result<(), HttpError> {
    if writer.bulk_ahead(bytes)? {
        M::inc(&ctx.metrics.ktls_offloaded);
        M::inc(&ctx.metrics.ktls_promoted);
        tracing::debug!(peer = %ctx.peer, bytes, "keys to the kernel for a bulk response");
    }
    Ok(())
}

/// How many body bytes to read (from a backend or a file) for the client
/// now: no more than its socket takes without waiting, at most one read
/// buffer. A client that stops reading thus leaves nothing in flight in
/// ktern: the kernel's socket buffers hold what was sent, and the body
/// waits at its source (issue 12: slow readers cost one read buffer each
/// before; nginx and HAProxy likewise stop reading upstream when their
/// buffers towards the client are full). Waits within `send_timeout`
/// while the room is short.
async fn client_room(writer: &TlsWriter, ctx: &Ctx<'_>) -> Result<usize, HttpError> {
    let deadline = monoio::time::Instant::now() + ctx.route.send_timeout;
    let mut woken = false;
    loop {
        let room = writer.send_room();
        if room >= MIN_ROOM {
            return Ok(room.min(READ));
        }
        if woken {
            // The socket reported room, the estimate less: write a little
            // rather than poll again at once.
            return Ok(room.clamp(4 << 10, READ));
        }
        // Boxed: the timer exists only while a client is behind.
        match Box::pin(monoio::time::timeout_at(deadline, writer.writable())).await {
            Err(_) => {
                M::inc(&ctx.metrics.http_send_timeouts);
                return Err(HttpError::ClientStalled);
            }
            Ok(r) => r.map_err(StreamError::from)?,
        }
        woken = true;
    }
}

async fn forward(
    reader: &mut TlsReader,
    writer: &mut TlsWriter,
    inbuf: &mut Vec<u8>,
    head: &RequestHead,
    ctx: &Ctx<'_>,
    ex: &mut Exchange,
    started: Instant,
) -> Result<Next, HttpError> {
    let route = ctx.route;
    let (group, close_after_local) = match exchange::plan(route, head, ctx.tls.sni.as_deref()) {
        exchange::Plan::Local {
            status,
            close,
            group,
        } => {
            ex.answered_by = group;
            return local(writer, ctx, ex, status, close).await;
        }
        exchange::Plan::Static {
            root,
            close_after_local,
        } => {
            ex.answered_by = Some(ctx.upstreams.len());
            return serve_file(reader, writer, head, root, ctx, ex, close_after_local).await;
        }
        exchange::Plan::Upstream {
            group,
            send_continue,
            close_after_local,
        } => {
            ex.answered_by = Some(group);
            if send_continue {
                // The rewrite forwards without Expect: the body then
                // streams as it arrives.
                send(writer, b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), ctx).await?;
            }
            (group, close_after_local)
        }
    };
    let upstream = &ctx.upstreams[group];
    let balancer = &ctx.balancers[group];
    let mut out = upstream_head(ctx, head);
    // A pooled connection may have been closed by the backend an instant
    // ago; that is retried once on a fresh connection when nothing of the
    // response came back and the request can safely be repeated.
    let mut attempt = 0;
    let (mut backend, addr, response, lease) = loop {
        attempt += 1;
        let mut at = match begin_attempt(ctx, group, head, attempt, &mut out, started, ex).await {
            Step::Go(at) => at,
            Step::Retry => continue,
            // Before any of the request body was read: the connection
            // can go on (a 503 at max_conns must not cost the client a
            // new handshake while the backends are saturated).
            Step::NoBackend => return local(writer, ctx, ex, 502, close_after_local).await,
            Step::Answer(status) => return local(writer, ctx, ex, status, close_after_local).await,
        };
        let sent = send_body(
            reader,
            &mut at.backend,
            inbuf,
            head,
            route.max_body,
            (route.head_timeout, upstream.response_timeout),
            ctx,
        )
        .await?;
        if let BodySent::ClientGone = sent {
            return Ok(Next::Close);
        }
        ex.body_read = matches!(sent, BodySent::Done);
        if let Some(r) = early_answer(ctx, head, &mut at, &sent).await {
            break (at.backend, at.addr, r, at.lease);
        }
        // An answer of ktern's own from here on: the backend connection
        // and its `max_conns` slot go first, not after the write to the
        // client (which a slow reader can hold for `send_timeout`).
        if let Some(status) = body_verdict(ctx, balancer, at.addr, &sent) {
            drop(at);
            return local(writer, ctx, ex, status, true).await;
        }
        let status = match finish_attempt(ctx, group, head, &mut at, attempt).await {
            Step::Go(r) => break (at.backend, at.addr, r, at.lease),
            Step::Retry => continue,
            Step::NoBackend => 502,
            Step::Answer(status) => status,
        };
        drop(at);
        return local(writer, ctx, ex, status, true).await;
    };
    let (resp, mut rbuf) = response;
    balancer.succeeded(addr);
    ex.status = resp.status;
    ex.upstream = Some(addr);
    let ttfb = started.elapsed();
    ctx.metrics.families.upstream_ttfb_seconds.observe(ttfb);
    ex.upstream_time = Some(ttfb);
    // Draining: the connection ends after this response, whenever the
    // drain started (the request may have been read before it).
    // A response here whose request body did not go whole is a backend's
    // early answer (`early_answer`): the rest of the client's body is
    // unread, so neither connection can carry another request.
    let early = !ex.body_read;
    let (rechunk, close) = match exchange::relay(head, &resp, ctx.closing() || early) {
        Relay::Upgrade => return upgrade(reader, writer, inbuf, backend, resp, rbuf, ctx).await,
        Relay::Refuse(why) => {
            // The backend connection is dropped, never pooled, and its
            // slot given back before the answer is written.
            drop((backend, lease));
            M::inc(&ctx.metrics.upstream_errors);
            balancer.log_failure(ctx.peer, addr, "unusable upstream response", &why);
            return local(writer, ctx, ex, 502, true).await;
        }
        Relay::Body { rechunk, close } => (rechunk, close),
    };
    let mut extra: Vec<(&str, &[u8])> = Vec::new();
    if let Some(v) = route.hsts.as_deref() {
        extra.push(("Strict-Transport-Security", v.as_bytes()));
    }
    if rechunk {
        extra.push(("Transfer-Encoding", b"chunked"));
    }
    if let Framing::Length(n) = resp.framing {
        bulk_ahead(writer, n, ctx)?;
    }
    let mut scanner = BodyScanner::new(resp.framing);
    let abort = |e: BodyError| HttpError::UpstreamAborted(e.into());
    // A chunked body's trailer section, once reached: held, and sent as
    // `rewrite::backend_trailers` allows when the body has ended.
    let mut trailers = None;
    // Body bytes after the head that the scanner has passed and that are
    // not sent yet. (The scanner takes every byte it is given until the
    // body ends, so anything after them, once the trailer section's bytes
    // are taken out, is past the body.)
    let mut ready = if rbuf.len() > resp.len {
        let (ready, used) = scanner
            .scan_holding_trailers(&rbuf[resp.len..], &mut trailers)
            .map_err(abort)?;
        rbuf.drain(resp.len + ready..resp.len + used);
        ready
    } else {
        0
    };
    let body = rbuf.get(resp.len..).unwrap_or_default();
    // Room for the head as rewritten (a few fields more or fewer, the
    // extra ones) and a coalesced body with its chunk framing: one
    // allocation, where growing it took a realloc per response; from the
    // shard's small buffers when it fits one (`send` gives it back).
    let extra_len: usize = extra.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    let coalesced = if ready <= COALESCE { ready + 16 } else { 0 };
    let mut out = buffers::take(resp.len + 64 + extra_len + coalesced);
    rewrite::response(&resp, head.persist(close), &extra, &mut out);
    // A small body that came with the head goes out in the same write: one
    // TLS record and one TCP segment instead of two per response. Head and
    // body leave `rbuf` together, so a buffer holding nothing else is just
    // emptied, not shifted.
    if ready <= COALESCE {
        frame(&mut out, &body[..ready], rechunk);
        rbuf.drain(..resp.len + ready);
        ready = 0;
        if scanner.is_done() {
            push_trailers(&mut out, &mut trailers);
        }
    } else {
        rbuf.drain(..resp.len);
    }
    send(writer, out, ctx).await?;
    // Body bytes sent so far: a body of unknown length becomes a bulk
    // transfer once it reaches `ktls_after`.
    let mut streamed = 0u64;
    loop {
        if ready > 0 {
            streamed += ready as u64;
            bulk_ahead(writer, streamed, ctx)?;
            let mut chunk = if rechunk {
                let mut framed = Vec::with_capacity(ready + 16);
                frame(&mut framed, &rbuf[..ready], true);
                rbuf.drain(..ready);
                framed
            } else {
                take_front(&mut rbuf, ready)
            };
            if scanner.is_done() {
                push_trailers(&mut chunk, &mut trailers);
            }
            send(writer, chunk, ctx).await?;
        }
        if scanner.is_done() {
            // The trailer section, when it came in a read of its own.
            if trailers.is_some() {
                let mut out = Vec::new();
                push_trailers(&mut out, &mut trailers);
                send(writer, out, ctx).await?;
            }
            break;
        }
        // The rest of a long body of known length, under kTLS from a plain
        // backend: socket to socket through a pipe, never copied to
        // userspace (the kernel seals it as it goes, as on the `tcp` route).
        if let (Some(left), BackendConn::Plain(sock)) = (scanner.remaining(), &backend) {
            if left >= SPLICE_MIN && !rechunk && rbuf.is_empty() && writer.path() == Path::Kernel {
                if let Ok(pipe) = ctx.pipes.take() {
                    splice_body(sock, &pipe, writer, left, ctx, upstream.response_timeout)
                        .await
                        .map_err(|e| match e {
                            Spliced::Ended => HttpError::from(UpstreamAbort::Framing(
                                scanner.finish().err().unwrap_or(BodyError::Truncated),
                            )),
                            Spliced::Failed(e) => e,
                        })?;
                    ctx.pipes.give(pipe);
                    break;
                }
            }
        }
        // Backpressure: read no more than the client's socket takes now.
        let want = client_room(writer, ctx).await?;
        // `response_timeout` also bounds each wait for more of the body
        // (nginx's proxy_read_timeout between reads): a stalled backend
        // does not hold the client, the connection and a buffer forever.
        let read = backend.read_some(want);
        let Ok(res) = ctx.within(upstream.response_timeout, read).await else {
            return Err(UpstreamAbort::Stalled.into());
        };
        match res {
            Ok(buf) if buf.is_empty() => {
                buffers::give(buf);
                scanner.finish().map_err(abort)?;
                // Only a body delimited by the close gets here whole.
                if !backend.ended_cleanly() {
                    return Err(UpstreamAbort::UncleanClose.into());
                }
                if rechunk {
                    send(writer, b"0\r\n\r\n".to_vec(), ctx).await?;
                }
                break;
            }
            Ok(buf) => {
                buffers::give(std::mem::replace(&mut rbuf, buf));
                let used;
                (ready, used) = scanner
                    .scan_holding_trailers(&rbuf, &mut trailers)
                    .map_err(abort)?;
                rbuf.drain(ready..used);
            }
            Err(e) => return Err(UpstreamAbort::Io(e).into()),
        }
    }
    if !early && exchange::reusable(head, &resp, rbuf.len()) {
        ctx.pools[group].put(0, backend, addr, upstream.pool_size);
    }
    buffers::give(rbuf);
    Ok(if close { Next::Close } else { Next::KeepAlive })
}

/// Appends a backend's held trailer section, as the client may have it,
/// to `out` (once: `held` is emptied).
fn push_trailers(out: &mut Vec<u8>, held: &mut Option<super::body::Decoded>) {
    match held.take() {
        // Most chunked bodies have none: no second buffer for the CRLF.
        Some(section) if section.trailers == b"\r\n" => out.extend_from_slice(b"\r\n"),
        Some(section) => out.extend_from_slice(&rewrite::backend_trailers(&section.trailers)),
        None => {}
    }
}

/// What a `static` rule answers a request, decided (and the file opened)
/// the same way for both protocols.
pub(crate) enum StaticAnswer {
    /// An error status (404, 403, 405…) from ktern itself.
    Local(u16),
    /// 301 to the directory's slash form.
    Redirect(String),
    /// The file.
    File(StaticFile),
}

/// A file to send: an HTTP/1.1 response head (`files::response_head`),
/// the byte range to send, if any, and the open file.
pub(crate) struct StaticFile {
    pub(crate) status: u16,
    pub(crate) head: Vec<u8>,
    pub(crate) body: Option<(u64, u64)>,
    pub(crate) file: std::fs::File,
    pub(crate) path: std::path::PathBuf,
}

/// Resolves `head`'s target under `root`, opens the file and plans the
/// answer (conditional and range requests, by the sans-IO `files`
/// module). File reads are synchronous on the shard, as nginx's without
/// `aio`: fine for files in the page cache.
pub(crate) fn static_answer(
    head: &RequestHead,
    root: &std::path::Path,
    route: &HttpRoute,
    keep_alive: bool,
) -> StaticAnswer {
    let (path, content_type) = match files::resolve(root, head.target()) {
        Ok(Resolved::File {
            path, content_type, ..
        }) => (path, content_type),
        Ok(Resolved::Redirect(location)) => return StaticAnswer::Redirect(location),
        Err(e) => return StaticAnswer::Local(e.status()),
    };
    // The length and date sent are those of the file actually opened.
    let opened = open_static(root, &path).and_then(|f| {
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        }
        Ok((f, meta.len(), meta.modified()?))
    });
    let (file, len, modified) = match opened {
        Ok(o) => o,
        Err(e) => return StaticAnswer::Local(FileError::from(e).status()),
    };
    let now = SystemTime::now();
    // A file dated in the future (clock skew, `touch -d`) is dated now
    // (RFC 9110 §8.8.2.1): a client that kept the future date would send
    // it as If-Modified-Since and get 304 for every later version, until
    // that date.
    let modified = modified.min(now);
    let once = |name| {
        let mut v = head.values(name);
        // A field sent twice is ignored rather than guessed at.
        match (v.next(), v.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    };
    // With If-None-Match, If-Modified-Since is ignored (RFC 9110 §13.1.3);
    // with If-Match, If-Unmodified-Since (§13.1.4).
    let none_match = head.values("if-none-match").next().is_some();
    let ims = if none_match {
        None
    } else {
        once("if-modified-since")
    };
    let if_match = head
        .values("if-match")
        .next()
        .is_some()
        .then(|| files::lists_any(head.values("if-match")));
    let if_range = once("if-range");
    // An If-Range that does not hold sends the whole file, as if no Range
    // came (§13.1.5): one on a date that is not strong, and one sent twice
    // (no validator, so nothing can match; it was read as none, and a
    // resumed download got a range of the changed file).
    let range = once("range").filter(|_| match if_range {
        Some(_) => files::strong_date(modified, now),
        None => head.values("if-range").next().is_none(),
    });
    let plan = match files::plan(head.method(), ims, range, if_range, len, modified) {
        Plan::MethodNotAllowed => Plan::MethodNotAllowed,
        // First of all for the GET and HEAD that reach here (§13.2.2).
        _ if !files::preconditions_hold(if_match, once("if-unmodified-since"), modified) => {
            Plan::PreconditionFailed
        }
        // Before Range (§13.2.2).
        Plan::Full | Plan::Partial { .. } | Plan::Unsatisfiable
            if none_match && files::lists_any(head.values("if-none-match")) =>
        {
            Plan::NotModified
        }
        plan => plan,
    };
    let status = match plan {
        Plan::Full => 200,
        Plan::Partial { .. } => 206,
        Plan::NotModified => 304,
        Plan::Unsatisfiable => 416,
        Plan::MethodNotAllowed => 405,
        Plan::PreconditionFailed => 412,
    };
    // An origin server with a clock sends Date (RFC 9110 §6.6.1).
    let date = httpdate::fmt_http_date(now);
    let mut extra: Vec<(&str, &[u8])> = vec![("date", date.as_bytes())];
    if let Some(v) = route.hsts.as_deref() {
        extra.push(("strict-transport-security", v.as_bytes()));
    }
    let head_bytes = files::response_head(
        &plan,
        len,
        modified,
        content_type,
        head.persist(!keep_alive),
        &extra,
    );
    let body = match head.method() {
        "HEAD" => None,
        _ => files::body_range(&plan, len),
    };
    StaticAnswer::File(StaticFile {
        status,
        head: head_bytes,
        // An empty body (a 0-byte file) is just the head.
        body: body.filter(|&(_, count)| count > 0),
        file,
        path,
    })
}

/// A `static` rule: the file under `root` named by the request path.
/// Under kTLS the body goes out with sendfile (the kernel reads the page
/// cache and seals the records); otherwise it is read and sealed here.
async fn serve_file(
    reader: &TlsReader,
    writer: &mut TlsWriter,
    head: &RequestHead,
    root: &std::path::Path,
    ctx: &Ctx<'_>,
    ex: &mut Exchange,
    close: bool,
) -> Result<Next, HttpError> {
    let (mut out, body, file, path) = match static_answer(head, root, ctx.route, !close) {
        StaticAnswer::Local(status) => return local(writer, ctx, ex, status, close).await,
        StaticAnswer::Redirect(location) => {
            ex.status = 301;
            let out = rewrite::local_response(
                301,
                reason(301),
                head.persist(close),
                &[("location", location.as_str())],
                "301 Moved Permanently\n",
                ex.head_only,
            );
            send(writer, out, ctx).await?;
            return Ok(if close { Next::Close } else { Next::KeepAlive });
        }
        StaticAnswer::File(f) => {
            ex.status = f.status;
            (f.head, f.body, f.file, f.path)
        }
    };
    let Some((mut offset, count)) = body else {
        send(writer, out, ctx).await?;
        return Ok(if close { Next::Close } else { Next::KeepAlive });
    };
    bulk_ahead(writer, count, ctx)?;
    if reader.path() == Path::Kernel {
        send(writer, out, ctx).await?;
        // Boxed: sendfile's stall timer is over-aligned (128 bytes), and
        // inline it would make every request's boxed state so.
        let sent = |n| ctx.moved.add(0, n);
        match Box::pin(writer.sendfile(&file, offset, count, ctx.route.send_timeout, &sent)).await {
            Err(SendfileError::Stream(StreamError::Io(e)))
                if e.kind() == std::io::ErrorKind::TimedOut =>
            {
                M::inc(&ctx.metrics.http_send_timeouts);
                return Err(HttpError::ClientStalled);
            }
            // Shorter than its length now: the connection is aborted, as
            // on the userspace path below, and counted as internal.
            Err(SendfileError::FileShort) => {
                return Err(HttpError::FileAborted(FileAbort::Shrank(path)))
            }
            // The file's side (a disk's EIO): internal, as a failed pread
            // on the userspace path below.
            Err(SendfileError::File(source)) => {
                return Err(HttpError::FileAborted(FileAbort::Io { path, source }))
            }
            Err(SendfileError::Stream(e)) => return Err(e.into()),
            Ok(()) => {}
        }
    } else {
        use std::os::fd::AsFd;
        let mut left = count;
        while left > 0 {
            // The first piece rides with the head (one record for a small file).
            // From the cache, so the buffer has its one large size (see
            // `buffers::CLASS`); the head, if still here, goes first.
            let mut buf = buffers::take(READ + out.len());
            buf.append(&mut out);
            let want = client_room(writer, ctx).await?;
            let n = match crate::sys::pread_append(
                file.as_fd(),
                &mut buf,
                offset,
                (left as usize).min(want),
            ) {
                // Shorter than its length now: the client was promised
                // `count` bytes, so the connection is aborted.
                Ok(0) => return Err(HttpError::FileAborted(FileAbort::Shrank(path))),
                Ok(n) => n,
                Err(source) => return Err(HttpError::FileAborted(FileAbort::Io { path, source })),
            };
            offset += n as u64;
            left -= n as u64;
            send(writer, buf, ctx).await?;
        }
    }
    Ok(if close { Next::Close } else { Next::KeepAlive })
}

/// Opens a file `files::resolve` found under `root`, so that nothing
/// swapped in since can lead outside it: `openat2` with RESOLVE_BENEATH
/// from the root (the kernel refuses any escape during the open itself),
/// or where `openat2` is missing a plain open with O_NOFOLLOW (a swapped
/// last component is refused; a swapped directory is not): on kernels
/// before 5.6 (`ENOSYS`), and under a seccomp filter that refuses the
/// syscall (`EPERM`: container runtimes' default profiles before they
/// knew it, Docker's before 20.10; openat2 itself gives EPERM only for
/// O_NOATIME and sealed files, neither of which applies). Each file
/// answered 403 there before. O_NONBLOCK: a FIFO cannot block the shard in
/// open(2); the caller requires a regular file.
fn open_static(root: &std::path::Path, path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let escaped = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
    let rel = path.strip_prefix(root).map_err(|_| escaped())?;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(root)?;
    match crate::sys::open_beneath(dir.as_fd(), rel, flags) {
        Ok(fd) => Ok(std::fs::File::from(fd)),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Err(escaped()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(error = %e, "openat2 unavailable (an old kernel, or a seccomp filter): static files are opened with O_NOFOLLOW only, so a directory swapped for a symlink under a static root is followed");
            });
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(path)
        }
        Err(e) => Err(e),
    }
}

/// After a 101 Switching Protocols (WebSocket and any other upgrade): relay
/// the response head, then the bytes both ways until both sides close, as
/// the `tcp` route does (splice under kTLS).
async fn upgrade(
    reader: &mut TlsReader,
    writer: &mut TlsWriter,
    inbuf: &mut Vec<u8>,
    mut backend: BackendConn,
    resp: head::ResponseHead,
    mut rbuf: Vec<u8>,
    ctx: &Ctx<'_>,
) -> Result<Next, HttpError> {
    let mut out = Vec::with_capacity(resp.len + 64);
    // A 101 states its own `Connection: upgrade`.
    rewrite::response(&resp, Persist::Keep, &[], &mut out);
    // Bytes the backend sent after its 101 head belong to the new protocol.
    out.extend(rbuf.drain(resp.len..));
    send(writer, out, ctx).await?;
    let tunnel_err = |e| HttpError::Tunnel(ProxyError::Upstream(e));
    if !inbuf.is_empty() {
        let early = std::mem::take(inbuf);
        let (res, _) = Box::pin(backend.write_all(early)).await;
        res.map_err(tunnel_err)?;
    }
    let idle = ctx.idle.register(ctx.route.keepalive_timeout);
    let backend = match backend {
        BackendConn::Plain(s) => s,
        BackendConn::Tls(b) => {
            let (mut br, mut bw) = *b;
            let tunnel = tcp::tls_tunnel(
                (reader, writer),
                (&mut br, &mut bw),
                &idle,
                ctx.pipes,
                ctx.moved,
            );
            Box::pin(tunnel).await.map_err(HttpError::Tunnel)?;
            return Ok(Next::Ended);
        }
    };
    let (mut backend_rd, mut backend_wr) = crate::sys::split_stream(backend).map_err(tunnel_err)?;
    tcp::tunnel(
        reader,
        writer,
        &mut backend_rd,
        &mut backend_wr,
        &idle,
        ctx.pipes,
        ctx.moved,
        ctx.metrics,
    )
    .await
    .map_err(HttpError::Tunnel)?;
    Ok(Next::Ended)
}

/// Appends `body` to `out`, as one chunk (RFC 9112 §7.1) when `chunked`.
fn frame(out: &mut Vec<u8>, body: &[u8], chunked: bool) {
    if body.is_empty() {
        return;
    }
    if chunked {
        out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(body);
    }
}

/// The first `n` bytes of `buf`, removed from it. In the common case (the
/// whole buffer belongs to the body) the buffer itself moves out, no copy.
fn take_front(buf: &mut Vec<u8>, n: usize) -> Vec<u8> {
    if n == buf.len() {
        std::mem::take(buf)
    } else {
        buf.drain(..n).collect()
    }
}

/// Sends a response ktern generated itself.
async fn local(
    writer: &mut TlsWriter,
    ctx: &Ctx<'_>,
    ex: &mut Exchange,
    status: u16,
    close: bool,
) -> Result<Next, HttpError> {
    M::inc(&ctx.metrics.http_local_errors);
    ex.status = status;
    let body = format!("{status} {}\n", reason(status));
    send(
        writer,
        rewrite::local_response(
            status,
            reason(status),
            Persist::new(close, ex.http10),
            &[],
            &body,
            ex.head_only,
        ),
        ctx,
    )
    .await?;
    Ok(if close { Next::Close } else { Next::KeepAlive })
}

/// How sending a request body to the backend ended (both protocols).
pub(crate) enum BodySent {
    Done,
    /// Answer the client with this status (408, 413, 400).
    Refused(u16),
    /// The client went away mid-body: nothing to answer.
    ClientGone,
    BackendFailed,
    /// A write to the backend made no progress within `response_timeout`.
    BackendStalled,
}

/// The answer a backend gave before it took the whole request body, when
/// the body stopped going through (a write failed or stalled): servers
/// answer an upload they refuse (a 413, a 401) and then stop reading or
/// close, and RFC 9112 §9.5 has a client watch for such an answer while
/// it sends. That answer is the client's, rather than a 502 or 504 of
/// ktern's; the backend connection is not pooled after it (the rest of
/// the body never went).
pub(crate) async fn early_answer(
    ctx: &Ctx<'_>,
    head: &RequestHead,
    at: &mut Attempt<'_>,
    sent: &BodySent,
) -> Option<Response> {
    if !matches!(sent, BodySent::BackendFailed | BodySent::BackendStalled) {
        return None;
    }
    let r = read_response(&mut at.backend, head.method(), EARLY_ANSWER, ctx)
        .await
        .ok()?;
    // A 101 would turn the unsent rest of the body into tunnel bytes.
    if r.0.status == 101 {
        return None;
    }
    at.count_answered(ctx);
    tracing::debug!(peer = %ctx.peer, backend = %at.addr, status = r.0.status, "backend answered before the end of the request body");
    Some(r)
}

/// The status a failed body step answers the client with (counted and
/// logged here); `None` when the body went through or the client left.
pub(crate) fn body_verdict(
    ctx: &Ctx<'_>,
    balancer: &Balancer,
    addr: SocketAddr,
    sent: &BodySent,
) -> Option<u16> {
    match sent {
        BodySent::Done | BodySent::ClientGone => None,
        BodySent::Refused(status) => Some(*status),
        BodySent::BackendFailed => {
            M::inc(&ctx.metrics.upstream_errors);
            Some(502)
        }
        BodySent::BackendStalled => {
            M::inc(&ctx.metrics.upstream_errors);
            balancer.log_failure(
                ctx.peer,
                addr,
                "upstream stalled",
                &"it stopped reading the request body",
            );
            Some(504)
        }
    }
}

/// The request head as it goes to the backend: hop-by-hop fields out,
/// the forwarding fields in.
pub(crate) fn upstream_head(ctx: &Ctx<'_>, head: &RequestHead) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len + 256);
    rewrite::request(
        head,
        &Forwarding::for_client(ctx.route, ctx.peer, ctx.tls),
        &mut out,
    );
    out
}

/// What one step of an upstream attempt decided.
pub(crate) enum Step<T> {
    /// Carry on with this.
    Go(T),
    /// Once more, on a new connection (the retry rule).
    Retry,
    /// No backend could be connected: 502, before the request body was
    /// read.
    NoBackend,
    /// Give up with this status (a backend that failed was marked so;
    /// 503: every backend was at its `max_conns`).
    Answer(u16),
}

impl<T> Step<T> {
    /// The status a step that gives up answers with.
    pub(crate) fn status(&self) -> u16 {
        match self {
            Step::Answer(status) => *status,
            _ => 502,
        }
    }
}

/// A backend connection an attempt runs on.
pub(crate) struct Attempt<'b> {
    pub(crate) backend: BackendConn,
    pub(crate) addr: SocketAddr,
    /// Taken from the pool (the retry rule treats it differently).
    pub(crate) reused: bool,
    /// Held while the exchange runs (least-connections counts it).
    pub(crate) lease: crate::upstream::Lease<'b>,
}

impl Attempt<'_> {
    /// Counts a response head this attempt got, as a pool hit or miss.
    fn count_answered(&self, ctx: &Ctx<'_>) {
        M::inc(if self.reused {
            &ctx.metrics.pool_hits
        } else {
            &ctx.metrics.pool_misses
        });
    }
}

/// Starts attempt number `attempt` of a request to upstream `group`: a
/// backend connection (pooled on the first attempt; the second follows a
/// stale pooled one and connects anew) and the request head `out` written
/// to it. monoio hands `out` back whatever the outcome, so a retry resends
/// it without a copy.
pub(crate) async fn begin_attempt<'b>(
    ctx: &'b Ctx<'_>,
    group: usize,
    head: &RequestHead,
    attempt: u32,
    out: &mut Vec<u8>,
    started: Instant,
    ex: &mut Exchange,
) -> Step<Attempt<'b>> {
    let upstream = &ctx.upstreams[group];
    let balancer = &ctx.balancers[group];
    let ip_key = exchange::ip_key(ctx.peer);
    let key = exchange::hash_key(balancer.balance(), head, &ip_key);
    let pool = (attempt == 1).then_some((0, &*ctx.pools[group]));
    // A new connection whose set-up failed (its TLS handshake, its PROXY
    // header) carried nothing of the request: the next backend is tried
    // (nginx's proxy_next_upstream error), each once, within one
    // connect_timeout from the request's start (a handshake that timed out
    // spends it: no second wait), and with one probe of a down backend
    // per request as for connects (an outage costs a request one try).
    let mut failed_set_ups: Vec<SocketAddr> = Vec::new();
    let (mut backend, addr, reused, lease) = loop {
        // Inline: no timer in it (a new connection's connect timer is
        // boxed inside), and a box of its own cost an allocation per
        // request.
        let acquired = balancer
            .acquire(
                pool,
                key,
                upstream.connect_timeout,
                upstream.pool_idle_timeout,
                if attempt == 1 && failed_set_ups.is_empty() {
                    started
                } else {
                    Instant::now()
                },
                &failed_set_ups,
            )
            .await;
        let (backend, addr, reused, lease) = match acquired {
            Ok(c) => {
                // From here on the exchange involves this backend, also in
                // the access line of one the client abandons (499).
                ex.upstream = Some(c.1);
                c
            }
            Err(e) => {
                M::inc(e.counter(ctx.metrics));
                if let crate::upstream::UpstreamError::Full { .. } = e {
                    // Not the backends' failure: they are busy. 503, as
                    // HAProxy answers a full queue (nginx: 502). A normal
                    // state at capacity: counted each time, logged at most
                    // once per 10 s per shard.
                    if let Some(count) = balancer.full_log.due() {
                        tracing::warn!(upstream = %upstream.name, error = %e, count, "upstream full: 503 ({count} since the last such line; at most one line per 10 s)");
                    }
                    return Step::Answer(503);
                }
                balancer.log_connect_failure(ctx.peer, "http", &e);
                return Step::NoBackend;
            }
        };
        if reused {
            break (backend, addr, reused, lease);
        }
        match Box::pin(set_up(ctx, group, backend, addr)).await {
            Ok(b) => break (b, addr, reused, lease),
            // Logged and counted. Only the backend's own failures count
            // towards its `max_fails`, and move on to the next: one of
            // ktern's must not take it out.
            Err(Blame::Backend) => {
                balancer.failed(addr, Instant::now());
                failed_set_ups.push(addr);
                if failed_set_ups.len() >= upstream.backends.len()
                    || started.elapsed() >= upstream.connect_timeout
                {
                    return Step::Answer(502);
                }
            }
            Err(Blame::Local) => return Step::Answer(502),
        }
    };
    let (res, sent) = backend.write_all(std::mem::take(out)).await;
    *out = sent;
    if let Err(e) = res {
        match exchange::after_fault(attempt, reused, head, UpstreamFault::WriteFailed) {
            Verdict::Retry => return Step::Retry,
            Verdict::Answer(status) => {
                balancer.failed(addr, Instant::now());
                M::inc(&ctx.metrics.upstream_errors);
                balancer.log_failure(ctx.peer, addr, "upstream write failed", &e);
                return Step::Answer(status);
            }
        }
    }
    Step::Go(Attempt {
        backend,
        addr,
        reused,
        lease,
    })
}

/// Whose failure stopped [`set_up`].
enum Blame {
    /// The backend's: its TLS handshake, or the PROXY header's write.
    Backend,
    /// ktern's own (logged as internal, counted as such).
    Local,
}

/// A new backend connection's set-up: the PROXY header (`send_proxy`),
/// then TLS (`tls`: the handshake within `connect_timeout`, then kTLS when
/// the kernel carries the suite). Failures are logged and counted here.
async fn set_up(
    ctx: &Ctx<'_>,
    group: usize,
    conn: BackendConn,
    addr: SocketAddr,
) -> Result<BackendConn, Blame> {
    let upstream = &ctx.upstreams[group];
    let BackendConn::Plain(mut stream) = conn else {
        return Ok(conn);
    };
    if let Some(version) = upstream.send_proxy {
        let Some(local) = ctx.local else {
            M::inc(&ctx.metrics.internal_errors);
            tracing::error!(peer = %ctx.peer, backend = %addr, "internal: the client connection's local address is unknown: no PROXY header to send");
            return Err(Blame::Local);
        };
        if let Err(e) = Box::pin(send_proxy(&mut stream, version, ctx, local)).await {
            M::inc(&ctx.metrics.upstream_errors);
            ctx.balancers[group].log_failure(ctx.peer, addr, "upstream write failed", &e);
            return Err(Blame::Backend);
        }
    }
    let Some(tls) = &upstream.tls else {
        return Ok(BackendConn::Plain(stream));
    };
    let m = ctx.metrics;
    let config = upstream
        .backends
        .iter()
        .position(|b| b.addr == addr)
        .and_then(|i| ctx.group_tls.get(group)?.get(i));
    let Some(config) = config else {
        M::inc(&m.internal_errors);
        tracing::error!(peer = %ctx.peer, backend = %addr, "internal: no TLS config for this backend");
        return Err(Blame::Local);
    };
    let started = crate::upstream::conn::start_tls(
        stream,
        config.clone(),
        tls,
        addr,
        upstream.connect_timeout,
        ctx.ktls,
    );
    match Box::pin(started).await {
        Ok(s) => {
            s.count(m);
            Ok(s.conn.into())
        }
        Err(e) => {
            M::inc(e.counter(m));
            e.log(&ctx.balancers[group], ctx.peer, addr);
            Err(match e {
                crate::upstream::conn::StartTlsError::Handshake(_) => Blame::Backend,
                _ => Blame::Local,
            })
        }
    }
}

/// Writes the PROXY header (the group's `send_proxy`) on a new backend
/// connection: the client's address (the PROXY-in header's, when the
/// listener takes one), the address it connected to, and in v2 the SNI and
/// the TLS facts, as on a `tcp` route.
async fn send_proxy(
    backend: &mut TcpStream,
    version: crate::config::ProxyVersion,
    ctx: &Ctx<'_>,
    local: SocketAddr,
) -> std::io::Result<()> {
    crate::upstream::conn::send_proxy(backend, version, (ctx.peer, local), ctx.tls).await
}

/// Ends an attempt whose request went out: the response head, or the
/// retry rule's verdict on the fault (counted and logged here).
pub(crate) async fn finish_attempt(
    ctx: &Ctx<'_>,
    group: usize,
    head: &RequestHead,
    at: &mut Attempt<'_>,
    attempt: u32,
) -> Step<Response> {
    let timeout = ctx.upstreams[group].response_timeout;
    match read_response(&mut at.backend, head.method(), timeout, ctx).await {
        Ok(r) => {
            at.count_answered(ctx);
            Step::Go(r)
        }
        Err(fault) => match exchange::after_fault(attempt, at.reused, head, fault) {
            Verdict::Retry => Step::Retry,
            Verdict::Answer(status) => {
                if exchange::backend_at_fault(attempt, at.reused, fault) {
                    ctx.balancers[group].failed(at.addr, Instant::now());
                }
                M::inc(&ctx.metrics.upstream_errors);
                if fault == UpstreamFault::Timeout {
                    M::inc(&ctx.metrics.upstream_timeouts);
                }
                ctx.balancers[group].log_failure(
                    ctx.peer,
                    at.addr,
                    "bad upstream response",
                    &fault.describe(),
                );
                Step::Answer(status)
            }
        },
    }
}

/// Streams the request body to the backend as it arrives. The two
/// timeouts are the client's (per read, 408) and the backend's (per
/// write, 504).
async fn send_body(
    reader: &mut TlsReader,
    backend: &mut BackendConn,
    inbuf: &mut Vec<u8>,
    head: &RequestHead,
    max_body: u64,
    (timeout, backend_timeout): (Duration, Duration),
    ctx: &Ctx<'_>,
) -> Result<BodySent, HttpError> {
    let mut scanner = BodyScanner::new(head.framing);
    let mut total = 0u64;
    let mut pace = exchange::BodyPace::new(timeout, ctx.route.min_body_rate);
    // A chunked body's trailer section, once reached: held (at most 8 KiB,
    // the scanner's bound) and sent as `rewrite::client_trailers` allows.
    let mut trailers: Option<crate::proxy::http::body::Decoded> = None;
    while !scanner.is_done() {
        if inbuf.is_empty() {
            // `total`: every byte read so far has been scanned when the
            // buffer is empty, those that came with the head included.
            let read = ctx.paced(&mut pace, total, timeout, reader.read_chunk());
            match read.await {
                None => return Ok(BodySent::Refused(408)),
                Some(Ok(Some(c))) => inbuf.extend_from_slice(&c),
                // The client vanished mid-body: this backend connection
                // carries half a request and is dropped, never pooled.
                Some(Ok(None)) => return Ok(BodySent::ClientGone),
                // Bad TLS mid-body: the connection ends with rustls' alert
                // (the caller aborts); the exchange is logged 499.
                Some(Err(e)) => return Err(HttpError::Downstream(e)),
            }
        }
        if let Some(section) = trailers.as_mut() {
            let n = match scanner.decode(inbuf, section) {
                Ok(n) => n,
                Err(_) => return Ok(BodySent::Refused(400)),
            };
            inbuf.drain(..n);
            ctx.moved.add(n as u64, 0);
            continue;
        }
        let n = match scanner.scan_to_trailers(inbuf) {
            Ok(n) => n,
            Err(_) => return Ok(BodySent::Refused(400)),
        };
        total += n as u64;
        // What a chunk-size line promises counts before its data comes:
        // the line is not forwarded when its chunk cannot fit (a backend
        // that keeps chunk sizes in 32 bits would read `100000005` as 5,
        // and what follows as another request, as Jetty did: CVE-2017-7657).
        if total.saturating_add(scanner.chunk_left()) > max_body {
            return Ok(BodySent::Refused(413));
        }
        if scanner.in_trailers() {
            trailers = Some(Default::default());
        }
        let chunk = take_front(inbuf, n);
        ctx.moved.add(chunk.len() as u64, 0);
        match ctx.within(backend_timeout, backend.write_all(chunk)).await {
            Err(_) => return Ok(BodySent::BackendStalled),
            Ok((Err(_), _)) => return Ok(BodySent::BackendFailed),
            Ok((Ok(_), _)) => {}
        }
    }
    if let Some(section) = trailers {
        let out = super::rewrite::client_trailers(&section.trailers);
        match ctx.within(backend_timeout, backend.write_all(out)).await {
            Err(_) => return Ok(BodySent::BackendStalled),
            Ok((Err(_), _)) => return Ok(BodySent::BackendFailed),
            Ok((Ok(_), _)) => {}
        }
    }
    Ok(BodySent::Done)
}

pub(crate) type Response = (head::ResponseHead, Vec<u8>);

/// Reads the final response head (1xx interim responses other than 101 are
/// skipped: they were answered by our own 100 Continue).
pub(crate) async fn read_response(
    backend: &mut BackendConn,
    method: &str,
    timeout: Duration,
    ctx: &Ctx<'_>,
) -> Result<Response, UpstreamFault> {
    let deadline = clock::coarse_now() + timeout;
    let mut rbuf: Vec<u8> = Vec::new();
    // Once an interim response came back, the backend has answered: a
    // close after it is a fault, not a reason to retry elsewhere.
    let mut interim = false;
    // Bytes of `rbuf` interim responses took: dropped once per read, not
    // once per response (a backend that sent thousands of 100s in one read
    // had the buffer shifted down after each, quadratic on the shard).
    let mut start = 0;
    // Bytes after `start` parsed without finding the head's end.
    let mut scanned = 0;
    loop {
        // Nothing buffered (the first pass, or interim responses took it
        // all): nothing to parse; nor when no empty line came since the
        // last parse.
        let head = &rbuf[start..];
        let parsed = match head.is_empty() || !head::may_end_head(head, scanned, MAX_RESPONSE_HEAD)
        {
            true => Ok(None),
            false => head::parse_response(head, method, MAX_RESPONSE_HEAD),
        };
        match parsed {
            Ok(Some(h)) if (100..200).contains(&h.status) && h.status != 101 => {
                start += h.len;
                interim = true;
                scanned = 0;
                continue;
            }
            Ok(Some(h)) => {
                rbuf.drain(..start);
                return Ok((h, rbuf));
            }
            Ok(None) => {}
            Err(ResponseError::TooLarge) => {
                return Err(UpstreamFault::Bad("response head too large"))
            }
            Err(ResponseError::Malformed) => {
                return Err(UpstreamFault::Bad("not an HTTP/1.x response"))
            }
            Err(ResponseError::Framing(why)) => return Err(UpstreamFault::Bad(why)),
        }
        rbuf.drain(..start);
        start = 0;
        scanned = rbuf.len();
        let left = deadline.saturating_duration_since(clock::coarse_now());
        // The first read takes a cached large buffer (the head and up to
        // 64 KiB of body in one read, a body up to COALESCE sent with the
        // head); with none cached, a page from the small ones (nginx's
        // `proxy_buffer_size`): the buffer is held through the backend's
        // whole wait, and with more exchanges waiting than the large cache
        // keeps (32), each of the rest allocated and freed 68 KiB
        // (tests/request_cost.rs: HTTP/2 at 20 connections of 10 streams,
        // 0.3 per request).
        let want = match rbuf.is_empty() && !buffers::large_cached() {
            true => buffers::SMALL,
            false => READ,
        };
        let res = match ctx.within(left, backend.read_some(want)).await {
            Ok(r) => r,
            Err(_) => return Err(UpstreamFault::Timeout),
        };
        match res {
            Ok(buf) if buf.is_empty() && rbuf.is_empty() && !interim => {
                return Err(UpstreamFault::NothingBack)
            }
            Ok(buf) if buf.is_empty() => return Err(UpstreamFault::Bad("closed mid-head")),
            // Usually the whole head arrives in one read: keep that buffer.
            Ok(buf) if rbuf.is_empty() => rbuf = buf,
            Ok(buf) => {
                rbuf.extend_from_slice(&buf);
                buffers::give(buf);
            }
            Err(_) if rbuf.is_empty() && !interim => return Err(UpstreamFault::NothingBack),
            Err(_) => return Err(UpstreamFault::Bad("reset mid-head")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_within_a_timeout_stores_the_future_once() {
        // A request's state holds several such waits; as `async fn`s each
        // held its future twice (see `idle::Bounded`). The size of what
        // `Ctx::within` returns, read from a closure's type (never called,
        // so no `Ctx` is needed): the future, the entry's reference,
        // padding to 8 bytes, the variant's tag (in a niche or not).
        fn returned<A, R>(_: &impl Fn(A) -> R) -> usize {
            std::mem::size_of::<R>()
        }
        let waited = std::mem::size_of::<std::future::Ready<[u8; 512]>>();
        let within = returned(&|c: &'static Ctx<'static>| {
            c.within(Duration::ZERO, std::future::ready([0u8; 512]))
        });
        assert!(
            within <= waited + 24,
            "{within} bytes for a {waited}-byte future"
        );
    }

    #[test]
    fn take_front_moves_or_splits() {
        let mut b = b"abcdef".to_vec();
        assert_eq!(take_front(&mut b, 2), b"ab");
        assert_eq!(b, b"cdef");
        assert_eq!(take_front(&mut b, 4), b"cdef");
        assert!(b.is_empty());
    }
}
