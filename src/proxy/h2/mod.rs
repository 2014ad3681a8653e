//! HTTP/2 to clients (RFC 9113), served by hyperium's `h2` crate over
//! ktern's TLS reader and writer (`io`), with HTTP/1.1 backends behind it
//! as nginx has. A connection whose ALPN chose `h2` runs [`serve`]; each
//! stream is one request exchange (`stream`), decided by the same core as
//! HTTP/1.1.
//!
//! Defences, each closing the connection with GOAWAY and its code:
//! h2's own limits (header list size, so CONTINUATION floods; streams
//! reset before accept, so rapid reset; streams ktern had to reset, so
//! "MadeYouReset"; bounded send buffers) and ktern's frame watch
//! (`watch`: SETTINGS, PING, PRIORITY, RST_STREAM, empty-frame floods).

pub mod convert;
pub mod io;
mod stream;
pub mod watch;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::{waker_ref, ArcWake, AtomicWaker};
use h2::Reason;

use self::io::{H2Io, Signals};
use self::watch::FrameWatch;
use crate::buffers;
use crate::ktls::{StreamError, TlsReader, TlsWriter};
use crate::metrics::ShardMetrics as M;
use crate::proxy::http::forward::{Ctx, HttpError};
use crate::proxy::idle::Idle;

/// Ended streams' sweeper entries an HTTP/2 connection keeps for its next
/// streams: as many as h2load's or a browser page's usual streams in
/// flight; more open at once register their own.
const CLOCKS_KEPT: usize = 16;

/// How long a busy HTTP/2 connection (its client came back within this
/// after its last idle spell) keeps its empty read and write buffers with
/// no stream open: the shard's idle sweeper finds it at its first pass
/// after that (passes are at most 1 s apart), so they go back within 2 s.
/// Any other connection gives them back at once: a burst of connections
/// that each make one request and idle does not hold 24 KiB apiece for a
/// second (RSS kept after a burst, tests/h2.rs).
const BUFFERS_KEPT_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The waker the `h2` connection is polled with: it wakes the connection's
/// task and notes that the connection itself has work (its socket's read
/// or write completed, a stream queued frames, a handle was dropped). The
/// task is also woken by its streams' backends, several times per request;
/// polling the whole connection then (a read attempt, `poll_complete`, a
/// flush: about 4 k instructions) found nothing to do. Requests that arrive
/// one at a time, as under an open-loop load, paid that on every wake.
/// A wake while the task runs (a stream queued frames) only marks the
/// connection due: the same poll sends them, with no second poll after it.
#[derive(Default)]
struct ConnWake {
    due: AtomicBool,
    running: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for ConnWake {
    fn wake_by_ref(this: &Arc<Self>) {
        this.due.store(true, Ordering::Relaxed);
        if !this.running.load(Ordering::Relaxed) {
            this.task.wake();
        }
    }
}

impl ConnWake {
    fn due(&self) {
        self.due.store(true, Ordering::Relaxed);
    }

    fn take(&self) -> bool {
        self.due.swap(false, Ordering::Relaxed)
    }

    fn is_due(&self) -> bool {
        self.due.load(Ordering::Relaxed)
    }
}

/// Serves an HTTP/2 connection until the client closes it, it idles out,
/// the drain or a reload ends it (GOAWAY; streams in flight finish), or a
/// protocol error or flood closes it.
///
/// A plain function that sets the connection up (the transport, the h2
/// builder, the preface's timer) and returns an `async` block owning what
/// the connection keeps: an `async fn` keeps each argument in its state
/// for the connection's life, also once moved out (rustc issue 62958), so
/// taking the halves and `ctx` by value kept dead copies of them (`ctx`,
/// 240 bytes, twice).
pub fn serve<'a>(
    reader: TlsReader,
    writer: TlsWriter,
    ctx: Ctx<'a>,
) -> impl Future<Output = Result<(), HttpError>> + 'a {
    let lim = &ctx.route.http2;
    M::inc(&ctx.metrics.h2_connections);
    let signals = Rc::new(Signals {
        kernel: Cell::new(ctx.tls.kernel),
        ..Signals::default()
    });
    let watch = FrameWatch::new(lim.max_control_frames);
    let io = H2Io::new(reader, writer, watch, signals.clone());
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(lim.max_concurrent_streams)
        .max_header_list_size(lim.max_header_list_size)
        .initial_window_size(lim.stream_window)
        .initial_connection_window_size(lim.connection_window)
        .max_send_buffer_size(lim.send_buffer)
        .max_pending_accept_reset_streams(lim.max_pending_resets)
        .max_local_error_reset_streams(Some(lim.max_error_resets));
    // WebSocket over HTTP/2 (RFC 8441 §3): SETTINGS_ENABLE_CONNECT_PROTOCOL
    // in the first SETTINGS.
    if lim.websocket {
        builder.enable_connect_protocol();
    }
    // The preface and first SETTINGS within the head timeout, as an
    // HTTP/1.1 request head. Boxed: a monoio timer inline (its entry is
    // `repr(align(128))`) made the whole connection's state a 2,816-byte,
    // 128-byte-aligned allocation for the connection's life, for a wait
    // that ends with the handshake.
    let handshake = Box::pin(monoio::time::timeout(
        ctx.route.head_timeout,
        builder.handshake::<_, Bytes>(io),
    ));
    async move { serve_on(handshake, signals, &ctx).await }
}

type Preface = Pin<Box<monoio::time::Timeout<h2::server::Handshake<H2Io, Bytes>>>>;

async fn serve_on(
    handshake: Preface,
    signals: Rc<Signals>,
    ctx: &Ctx<'_>,
) -> Result<(), HttpError> {
    let route = ctx.route;
    let mut conn = match handshake.await {
        Err(_) => {
            tracing::debug!(peer = %ctx.peer, "HTTP/2 preface not received in time");
            return Ok(());
        }
        Ok(Err(e)) => return Err(failure(e, &signals)),
        Ok(Ok(c)) => c,
    };
    // Each stream waits for one thing at a time, bounded on a sweeper
    // entry of its own (`Ctx::clock`), as an HTTP/1.1 connection is: no
    // timer and no over-aligned box per stream. An ended stream's entry
    // goes to the next one; up to CLOCKS_KEPT are kept (a burst of streams
    // leaves no more behind: each entry is about 100 bytes).
    let clocks: RefCell<Vec<Rc<Idle>>> = RefCell::default();
    // Each stream's future in a block of the shard's cache
    // (`buffers::future`): a fresh box was an allocation per stream too
    // big for glibc's thread cache. Not inline in FuturesUnordered's
    // task: its queue keeps a stub task of the future's size for the
    // connection's life, 4 KB more per idle connection (tests/h2.rs's
    // budget, 20 KiB, failed at 20.8 KB).
    let mut streams = FuturesUnordered::new();
    let mut drain = ctx.drain.watch();
    // One keep-alive entry for the connection's life, armed again when its
    // last stream ends: a new entry per idle spell cost an allocation and a
    // sweeper slot per request when requests come one at a time. While
    // streams are open it is not consulted.
    let idle = ctx.idle.register(route.keepalive_timeout);
    let mut going_away = false;
    let mut accepting = true;
    let mut flooded = false;
    let mut stalled = false;
    // Once a GOAWAY is on its way and no stream of ktern's is left, h2
    // still waits on the client: for the PING that confirms a graceful
    // GOAWAY (RFC 9113 §6.8), for windows to send DATA it holds, for the
    // socket to take the GOAWAY itself. A client that gives none of them
    // would hold the connection for good; it gets `send_timeout`, as a
    // client that stops reading a response does, and the connection is
    // then dropped.
    let mut winding_down = false;
    let mut abandoned = false;
    // A graceful GOAWAY names no stream (2^31-1) until the client
    // acknowledges its PING (RFC 9113 §6.8): a client that never does and
    // keeps opening streams was served for good, on the config generation
    // a reload retired. After GOAWAY_GRACE the final GOAWAY names the last
    // stream anyway; later ones are ignored, and the connection winds down.
    let mut goaway_since: Option<std::time::Instant> = None;
    // The client came back after its last idle spell before the sweeper
    // found that spell BUFFERS_KEPT_IDLE old (so within 1-2 s): its
    // buffers are kept through the next spell's first second.
    let mut busy = false;
    let wake = Arc::new(ConnWake::default());
    wake.due();
    let yielded = Rc::new(Cell::new(false));
    let ended = std::future::poll_fn(|cx| {
        // Run again before the yield's own wake: a stream woken during the
        // poll that yielded wakes the task while it runs, and monoio puts
        // it back at the front of the queue (`yield_to_others`). The
        // yield's wake comes after the others have run.
        if yielded.get() {
            return Poll::Pending;
        }
        wake.task.register(cx.waker());
        wake.running.store(true, Ordering::Relaxed);
        let mut passes = 0;
        let conn_waker = waker_ref(&wake);
        let mut conn_cx = Context::from_waker(&conn_waker);
        let polled = loop {
            let malformed = signals.malformed.take();
            if malformed > 0 {
                M::add(&ctx.metrics.h2_malformed, malformed);
            }
            promoted(&signals, ctx);
            if signals.flood.get() && !flooded {
                flooded = true;
                goaway_since = None;
                tracing::info!(peer = %ctx.peer, "HTTP/2 control-frame flood: GOAWAY ENHANCE_YOUR_CALM");
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                wake.due();
            }
            signals.idle.set(streams.is_empty());
            // Drain, a reload that retired this connection's config, or no
            // stream open for the keep-alive timeout: GOAWAY (RFC 9113
            // §6.8), and the streams in flight finish.
            if !going_away
                && (drain.poll_on(cx).is_ready()
                    || ctx.closing()
                    || streams.is_empty() && idle.poll_expired(cx).is_ready())
            {
                going_away = true;
                goaway_since = Some(crate::clock::coarse_now());
                conn.graceful_shutdown();
                wake.due();
            }
            if goaway_since
                .is_some_and(|t| crate::clock::coarse_now().saturating_duration_since(t) >= GOAWAY_GRACE)
            {
                goaway_since = None;
                conn.finish_graceful_shutdown();
                wake.due();
            }
            let mut progressed = false;
            if accepting && wake.take() {
                let mut next = match conn.poll_accept(&mut conn_cx) {
                    Poll::Ready(Some(Ok(stream))) => Some(stream),
                    Poll::Ready(Some(Err(e))) => break Poll::Ready(Err(e)),
                    Poll::Ready(None) => {
                        accepting = false;
                        None
                    }
                    Poll::Pending => None,
                };
                // The streams that came with the first: taken without a
                // connection poll each (h2's `try_accept`, ktern's patch).
                while let Some((req, respond)) = next.take() {
                    M::inc(&ctx.metrics.h2_streams);
                    // A stream accepted after a graceful GOAWAY (sent
                    // before the client's PING confirmed it) is served
                    // whole: the close's bound starts again when it,
                    // and any other, has ended.
                    winding_down = false;
                    // The first stream after an idle spell: a client
                    // back before the sweeper found the spell
                    // BUFFERS_KEPT_IDLE old (its nudge still pending)
                    // is busy, and keeps its buffers from now on.
                    if streams.is_empty() {
                        busy = idle.nudge_pending();
                    }
                    let clock = clocks.borrow_mut().pop();
                    let clock = clock.unwrap_or_else(|| ctx.idle.register(route.head_timeout));
                    let mut own = ctx.clone();
                    own.clock = Some(clock.clone());
                    let clocks = &clocks;
                    let link = &*signals;
                    streams.push(buffers::future(async move {
                        let end = stream::exchange(req, respond, &own, link).await;
                        let mut kept = clocks.borrow_mut();
                        if kept.len() < CLOCKS_KEPT {
                            kept.push(clock);
                        }
                        end
                    }));
                    // Ready registered no waker: poll again for the next.
                    wake.due();
                    progressed = true;
                    next = conn.try_accept();
                }
                // The frame watch may have flagged a flood during that poll's
                // reads: act on it now, not at the next wake (which a client
                // that sent its whole flood at once never causes).
                if signals.flood.get() && !flooded {
                    progressed = true;
                }
            }
            while let Poll::Ready(Some(end)) = streams.poll_next_unpin(cx) {
                progressed = true;
                // A client that leaves a stream unread for send_timeout holds
                // the connection's buffers: the connection ends, with GOAWAY
                // ENHANCE_YOUR_CALM (its other streams are reset with it).
                if end == stream::End::Stalled && !stalled && !flooded {
                    stalled = true;
                    goaway_since = None;
                    conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                    wake.due();
                }
                if streams.is_empty() && !winding_down {
                    ctx.idle.arm(&idle, route.keepalive_timeout);
                    idle.nudge_after(BUFFERS_KEPT_IDLE);
                }
            }
            if !accepting && streams.is_empty() {
                break Poll::Ready(Ok(()));
            }
            if (going_away || flooded || stalled) && streams.is_empty() {
                if !winding_down {
                    winding_down = true;
                    ctx.idle.arm(&idle, route.send_timeout);
                }
                if idle.poll_expired(cx).is_ready() {
                    abandoned = true;
                    break Poll::Ready(Ok(()));
                }
            }
            // A stream polled above may have queued frames (waking `wake`):
            // the connection sends them in this poll, not the next.
            passes += 1;
            if !(progressed || accepting && wake.is_due()) {
                // No stream open and nothing to do: h2's read and write
                // buffers (8 and 16 KiB, empty now) go back to the
                // allocator until the client sends again, as nginx
                // frees an idle connection's buffers (vendor/README.md:
                // an idle connection 27 -> 16 KB, tests/h2.rs). At once,
                // unless the client is busy: then after BUFFERS_KEPT_IDLE,
                // or every pause between its requests would free and
                // allocate them again (two allocations and 24 KiB of
                // fresh memory per request).
                if streams.is_empty() && (!busy || idle.take_nudged()) {
                    conn.release_idle_buffers();
                    busy = false;
                }
                break Poll::Pending;
            }
            // A connection that always has more to do yields to the shard's
            // other tasks after eight passes: streams that keep it due (a
            // body sent as windows open), a client that keeps the socket
            // full (each pass reads at most the transport's budget), and
            // one whose requests keep coming (each pass accepts and answers
            // some).
            if passes == 8 {
                yield_to_others(cx.waker(), &yielded, ctx.idle.overdue());
                break Poll::Pending;
            }
        };
        wake.running.store(false, Ordering::Relaxed);
        polled
    })
    .await;
    // What the last pass's reads flagged, when it ended the connection.
    let malformed = signals.malformed.take();
    if malformed > 0 {
        M::add(&ctx.metrics.h2_malformed, malformed);
    }
    promoted(&signals, ctx);
    if abandoned {
        tracing::info!(peer = %ctx.peer, "HTTP/2 client took no part in closing within send_timeout: dropped");
        // A stalled stream counted the connection already.
        if !stalled {
            M::inc(&ctx.metrics.http_send_timeouts);
        }
    }
    if flooded {
        return Err(HttpError::H2(Reason::ENHANCE_YOUR_CALM.into()));
    }
    if stalled || abandoned {
        return Err(HttpError::ClientStalled);
    }
    ended.map_err(|e| failure(e, &signals))
}

/// How long a graceful GOAWAY waits for the client's PING acknowledgement
/// before the final GOAWAY names the last stream anyway: Envoy's default
/// `drain_timeout` between its two GOAWAYs, many round trips on any path
/// (nginx sends the final one at once). Streams the client opened before it
/// learned of the first are served; one opened later than this is ignored,
/// and the client, told so by the final GOAWAY, retries it elsewhere.
const GOAWAY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Wakes the task of `waker` after the shard's other queued tasks have
/// run. Not `waker.wake_by_ref()` before returning `Pending`: monoio (0.2.4,
/// `LocalScheduler::yield_now`) puts a task woken while it runs at the
/// front of the run queue, so it ran again at once, and a connection that
/// always had more to do held the shard: no other connection, no accept,
/// no timer (`a_client_that_keeps_the_socket_full_does_not_hold_the_shard`
/// in tests/h2.rs). A task spawned now goes to the back of the queue; when
/// it runs, what was queued before it has run, and its wake puts this one
/// at the back in turn. Until then `yielded` is set, and a poll that comes
/// first (a wake of the task during the poll that yielded) does nothing.
/// One small task per yield, and a yield comes at most once per eight
/// passes.
///
/// With `starved` (the shard's timers have not fired for a while,
/// `IdleSweeper::overdue`) the wake waits for a timer of 1 ms as well:
/// monoio fires timers only once its run queue is empty, which a spawned
/// wake never lets happen while this connection stays busy.
fn yield_to_others(waker: &std::task::Waker, yielded: &Rc<Cell<bool>>, starved: bool) {
    let (waker, yielded) = (waker.clone(), yielded.clone());
    yielded.set(true);
    monoio::spawn(async move {
        if starved {
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        yielded.set(false);
        waker.wake();
    });
}

/// Counts (once) the transport's hand-over of the keys to the kernel at a
/// bulk response (`runtime.ktls_after`), as HTTP/1.1's `bulk_ahead` does.
fn promoted(signals: &Signals, ctx: &Ctx<'_>) {
    if signals.promoted.take() {
        M::inc(&ctx.metrics.ktls_offloaded);
        M::inc(&ctx.metrics.ktls_promoted);
        tracing::debug!(peer = %ctx.peer, "keys to the kernel for a bulk HTTP/2 response");
    }
}

/// The connection's error, typed: the client's socket or TLS (as the
/// transport recorded it), or HTTP/2 itself.
fn failure(e: h2::Error, signals: &Signals) -> HttpError {
    if let Some(s) = signals.failed.borrow_mut().take() {
        return HttpError::Downstream(s);
    }
    if e.is_io() {
        if let Some(io) = e.into_io() {
            return HttpError::Downstream(StreamError::Io(io));
        }
        return HttpError::Downstream(StreamError::Truncated);
    }
    HttpError::H2(e)
}
