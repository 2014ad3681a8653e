//! One HTTP/2 stream: one request exchange, decided by the same sans-IO
//! core as an HTTP/1.1 request (`proxy::http::exchange`) and forwarded to
//! the same pools and balancers of HTTP/1.1 backends.
//!
//! Bodies stream both ways under HTTP/2 flow control: request DATA is
//! acknowledged (its window released) only once the backend took it, and
//! the backend's response is read no faster than the client's window and
//! h2's per-stream send buffer allow, so neither a slow backend nor a slow
//! client makes ktern hold a whole body.

use std::cell::Cell;
use std::future::Future;
use std::io::Write;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::upstream::conn::BackendConn;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};

use super::convert::{self, Refusal};
use super::io::Signals;
use crate::buffers;
use crate::metrics::ShardMetrics as M;
use crate::proxy::http::body::{BodyScanner, Decoded, Framing};
use crate::proxy::http::exchange::{self, Relay};
use crate::proxy::http::forward::{
    self, BodySent, Ctx, Exchange, FileAbort, StaticAnswer, Step, UpstreamAbort,
};
use crate::proxy::http::head::{self, Limits, RequestHead};
use crate::proxy::tcp::Meter;

/// Logged as the request's protocol.
const PROTOCOL: &str = "HTTP/2.0";

/// Backend read size, as on HTTP/1.1: four TLS records of plaintext.
const READ: usize = 64 << 10;

/// Why a stream ended before its response did.
#[derive(Debug)]
enum Cut {
    /// The client reset the stream, or the connection ended.
    Client,
    /// The client's window stayed shut for `send_timeout`, and no DATA
    /// went out on the connection meanwhile: it reads nothing.
    Stalled,
    /// The stream's window stayed shut for `send_timeout` while DATA went
    /// out on others (a paused video): this stream's matter alone.
    Paused,
    /// The client opened the stream's window by less than [`PROGRESS`]
    /// over `send_timeout` of waiting for it: a slow read, reset alone.
    Slow,
    /// The backend failed mid-response.
    Upstream(UpstreamAbort),
    /// A static file failed mid-response (ktern's own side).
    File(FileAbort),
    /// A WebSocket moved no byte either way for this long (the route's
    /// `keepalive_timeout`, as an HTTP/1.1 upgrade's tunnel).
    Idle(Duration),
}

/// How a stream ended, for its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// Answered, refused, reset or abandoned: the stream's own business.
    Done,
    /// The client's window stayed shut for `send_timeout`: a client that
    /// opens streams and does not read them; the connection ends.
    Stalled,
}

/// Serves one stream to its end. Never panics and never fails the
/// connection itself: it only reports a client that stopped reading.
/// `link`: the connection transport's signals (a bulk response ahead;
/// which records carry the connection now).
pub(super) async fn exchange(
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    ctx: &Ctx<'_>,
    link: &Signals,
) -> End {
    let started = Instant::now();
    let wall = ctx.access.map_or(UNIX_EPOCH, |_| SystemTime::now());
    let (parts, body) = req.into_parts();
    // A WebSocket's extended CONNECT (RFC 8441; h2 takes one only where
    // the route offered it) goes upstream as an HTTP/1.1 upgrade, with a
    // key of ktern's.
    let ws_key = if ctx.route.http2.websocket && convert::is_websocket(&parts) {
        match nonce() {
            Some(n) => Some(convert::websocket_key(&n)),
            None => {
                M::inc(&ctx.metrics.internal_errors);
                tracing::warn!(peer = %ctx.peer, "internal: no random bytes for a WebSocket key: stream reset");
                respond.send_reset(Reason::INTERNAL_ERROR);
                return End::Done;
            }
        }
    } else {
        None
    };
    let head = match convert::request_head(
        &parts,
        body.is_end_stream(),
        &Limits::default(),
        ws_key.as_deref(),
    ) {
        Ok(h) => h,
        Err(Refusal::Malformed(why)) => {
            // RFC 9113 §8.1.1: a malformed request is a stream error of
            // type PROTOCOL_ERROR; nothing goes upstream. (Counted by
            // the transport's watch on what is sent, with h2's own.)
            refused(ctx, why, 400, "HTTP/2 request malformed: stream reset");
            respond.send_reset(Reason::PROTOCOL_ERROR);
            // Logged as the 400 HTTP/1.1 answers the same head with (as a
            // head HTTP/1.1 refuses: `-` for method and path), so the
            // access log has a line per request on both protocols.
            let ex = Exchange {
                status: 400,
                kernel: Some(link.kernel.get()),
                ..Exchange::default()
            };
            forward::record(ctx, None, &ex, (0, 0), PROTOCOL, wall, started);
            return End::Done;
        }
        Err(Refusal::Status(status, why)) => {
            refused(ctx, why, status, "HTTP/2 request refused");
            let mut ex = Exchange {
                kernel: Some(link.kernel.get()),
                // A refused HEAD's answer has no body either (RFC 9110 §9.3.2).
                head_only: parts.method == http::Method::HEAD,
                ..Exchange::default()
            };
            let out = local(&mut respond, ctx, &mut ex, status);
            ctx.moved.add(0, out);
            forward::record(ctx, None, &ex, (0, out), PROTOCOL, wall, started);
            return End::Done;
        }
    };
    M::inc(&ctx.metrics.http_requests);
    let mut rec = Recorded {
        ctx,
        head: &head,
        link,
        wall,
        started,
        ex: Exchange {
            head_only: head.method() == "HEAD",
            client_method: ws_key.as_ref().map(|_| "CONNECT"),
            ..Exchange::default()
        },
        moved: Tally::new(ctx.moved),
        ended: false,
    };
    let result = forward(
        &head,
        body,
        &mut respond,
        ctx,
        link,
        &mut rec.ex,
        &rec.moved,
        started,
        ws_key.as_deref(),
    )
    .await;
    rec.ended = true;
    let end = if let Err(Cut::Stalled) = result {
        End::Stalled
    } else {
        End::Done
    };
    match result {
        Ok(()) => {}
        Err(Cut::Client) => M::inc(&ctx.metrics.h2_stream_resets),
        Err(Cut::Stalled) => {
            M::inc(&ctx.metrics.http_send_timeouts);
            tracing::info!(peer = %ctx.peer, "HTTP/2 stream: client window shut for send_timeout");
        }
        Err(Cut::Paused) => {
            M::inc(&ctx.metrics.http_send_timeouts);
            tracing::debug!(peer = %ctx.peer, "HTTP/2 stream: its window shut for send_timeout while the client read others: stream reset");
        }
        Err(Cut::Slow) => {
            M::inc(&ctx.metrics.http_send_timeouts);
            tracing::debug!(peer = %ctx.peer, "HTTP/2 stream: its window opened by less than 16 KiB over send_timeout: stream reset");
        }
        Err(Cut::File(e)) => {
            M::inc(&ctx.metrics.internal_errors);
            tracing::warn!(peer = %ctx.peer, error = %e, "internal: static file failed mid-response: stream reset");
        }
        Err(Cut::Upstream(e)) => {
            M::inc(&ctx.metrics.upstream_errors);
            let what = "upstream failed mid-response: stream reset";
            match (rec.ex.answered_by, rec.ex.upstream) {
                (Some(g), Some(addr)) if g < ctx.balancers.len() => {
                    ctx.balancers[g].log_failure(ctx.peer, addr, what, &e)
                }
                _ => tracing::warn!(peer = %ctx.peer, error = %e, "{what}"),
            }
        }
        Err(Cut::Idle(after)) => {
            tracing::debug!(peer = %ctx.peer, ?after, "HTTP/2 WebSocket idle: stream reset");
        }
    }
    // `rec` records the stream as it drops.
    end
}

/// A stream's exchange as it goes, recorded when it drops (its access
/// line, its response count; its bytes went to the connection's as they
/// moved, [`Tally`]), however the stream ends. One whose connection failed
/// is never polled to its end: a client's bad frame or reset ends h2's
/// connection, and the connection loop with it, dropping the streams in
/// flight. Such a stream is the client's doing: recorded as HTTP/1.1
/// records a request its connection cut (499, the bytes moved so far),
/// and counted as a stream the client reset. One the drain timeout cut
/// (`DrainSignal::cut`) is ktern's: 444 if it had no answer yet, and no
/// reset counted.
struct Recorded<'r, 'a> {
    ctx: &'r Ctx<'a>,
    head: &'r RequestHead,
    link: &'r Signals,
    wall: SystemTime,
    started: Instant,
    ex: Exchange,
    moved: Tally<'r>,
    /// The exchange returned, and its outcome was counted.
    ended: bool,
}

impl Drop for Recorded<'_, '_> {
    fn drop(&mut self) {
        let ctx = self.ctx;
        // A stream the drain timeout cut is ktern's doing, not a reset.
        if !self.ended && !ctx.drain.is_cut() {
            M::inc(&ctx.metrics.h2_stream_resets);
        }
        // The records that carried the response: the kernel's if the
        // connection's keys went there before it ended, or go there for it
        // (it announced a bulk transfer, which the transport acts on at its
        // next write, possibly after the last DATA was queued).
        self.ex.kernel = Some(self.link.kernel.get() || self.ex.kernel == Some(true));
        forward::record(
            ctx,
            Some(self.head),
            &self.ex,
            (
                self.head.len as u64 + self.moved.up.get(),
                self.moved.down.get(),
            ),
            PROTOCOL,
            self.wall,
            self.started,
        );
    }
}

/// A stream's body bytes each way (and its local answers'), counted in
/// the connection's meter, so in the shard's byte counters, as they move,
/// as HTTP/1.1's are: a long download or WebSocket over HTTP/2 shows in
/// a scrape while it runs, not all at once at its end. Kept for the
/// stream's access line.
pub(super) struct Tally<'m> {
    up: Cell<u64>,
    down: Cell<u64>,
    meter: &'m Meter<'m>,
}

impl<'m> Tally<'m> {
    fn new(meter: &'m Meter<'m>) -> Tally<'m> {
        Tally {
            up: Cell::new(0),
            down: Cell::new(0),
            meter,
        }
    }

    /// `n` bytes of the request body went to the backend.
    fn up(&self, n: u64) {
        self.up.set(self.up.get() + n);
        self.meter.add(n, 0);
    }

    /// `n` bytes of a response body went to h2 for the client.
    fn down(&self, n: u64) {
        self.down.set(self.down.get() + n);
        self.meter.add(0, n);
    }

    fn down_so_far(&self) -> u64 {
        self.down.get()
    }
}

/// The line for a stream refused before its exchange: one per 10 s per
/// shard at info (with how many since), the others at debug (a client can
/// open streams of them, up to the reset budget; each still gets its
/// access line and counter).
fn refused(ctx: &Ctx<'_>, why: &str, status: u16, what: &str) {
    match ctx.refused_log.due() {
        Some(count) => {
            tracing::info!(peer = %ctx.peer, status, why, count, "{what} ({count} since the last such line; at most one line per 10 s, the others at debug)")
        }
        None => tracing::debug!(peer = %ctx.peer, status, why, "{what}"),
    }
}

/// `work`, unless the stream is reset first (by the client's RST_STREAM,
/// by h2 for an error of the client's, or with the connection): then
/// `Cut::Client`, and `work` drops with what it holds (a backend
/// connection, its lease). h2 frees a reset stream's concurrency slot at
/// once, so a stream left waiting on its backend (up to
/// `response_timeout` per wait) would let a client keep resetting and
/// reopening streams with no bound on the backend requests in flight
/// (rapid reset, CVE-2023-44487; "MadeYouReset", with the resets h2 sends
/// for the client's errors). `reset`: the stream's `poll_reset`.
async fn until_reset<F: std::future::Future>(
    mut reset: impl FnMut(&mut std::task::Context<'_>) -> std::task::Poll<Result<Reason, h2::Error>>,
    work: F,
) -> Result<F::Output, Cut> {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(out) = work.as_mut().poll(cx) {
            return std::task::Poll::Ready(Ok(out));
        }
        reset(cx).map(|_| Err(Cut::Client))
    })
    .await
}

/// ktern's own answer; returns the body bytes sent.
fn local(respond: &mut SendResponse<Bytes>, ctx: &Ctx<'_>, ex: &mut Exchange, status: u16) -> u64 {
    answer(respond, ctx, ex, status, None)
}

/// [`local`], with an `Allow` field for a 405 (RFC 9110 §15.5.6: it says
/// what the resource allows).
fn answer(
    respond: &mut SendResponse<Bytes>,
    ctx: &Ctx<'_>,
    ex: &mut Exchange,
    status: u16,
    allow: Option<&'static str>,
) -> u64 {
    M::inc(&ctx.metrics.http_local_errors);
    ex.status = status;
    let body = format!("{status} {}\n", forward::reason(status));
    let mut resp = http::Response::new(());
    *resp.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    h.insert(http::header::CONTENT_LENGTH, body.len().into());
    if let Some(allow) = allow {
        h.insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    }
    match respond.send_response(resp, ex.head_only) {
        Ok(mut s) if !ex.head_only => {
            let n = body.len() as u64;
            // Small: h2 buffers it within the stream's send buffer.
            match s.send_data(Bytes::from(body), true) {
                Ok(()) => n,
                Err(_) => 0,
            }
        }
        _ => 0,
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    head: &RequestHead,
    mut body: RecvStream,
    respond: &mut SendResponse<Bytes>,
    ctx: &Ctx<'_>,
    link: &Signals,
    ex: &mut Exchange,
    moved: &Tally<'_>,
    started: Instant,
    ws_key: Option<&str>,
) -> Result<(), Cut> {
    let route = ctx.route;
    let group = match exchange::plan(route, head, ctx.tls.sni.as_deref()) {
        exchange::Plan::Local { status, group, .. } => {
            ex.answered_by = group;
            moved.down(local(respond, ctx, ex, status));
            return Ok(());
        }
        exchange::Plan::Static { .. } if ws_key.is_some() => {
            // A file's 200 would tell the client its WebSocket is open.
            ex.answered_by = Some(ctx.upstreams.len());
            moved.down(answer(respond, ctx, ex, 405, Some("GET, HEAD")));
            return Ok(());
        }
        exchange::Plan::Static { root, .. } => {
            ex.answered_by = Some(ctx.upstreams.len());
            return serve_file(head, root, respond, ctx, link, ex, moved).await;
        }
        exchange::Plan::Upstream {
            group,
            send_continue,
            ..
        } => {
            ex.answered_by = Some(group);
            if send_continue {
                // RFC 9113 §8.1: an interim 100 before the final response.
                let mut cont = http::Response::new(());
                *cont.status_mut() = http::StatusCode::CONTINUE;
                let _ = respond.send_informational(cont);
            }
            group
        }
    };
    let upstream = &ctx.upstreams[group];
    let balancer = &ctx.balancers[group];
    let mut out = forward::upstream_head(ctx, head);
    let mut attempt = 0;
    let (mut backend, addr, (resp, rbuf), _lease) = loop {
        attempt += 1;
        // Boxed here (by `boxed`, which refuses an over-aligned future at
        // compile time), not in HTTP/1.1's request state: at 792 bytes it
        // would be the largest part of each stream's boxed state (2,008 ->
        // 2,312 bytes), where HTTP/1.1's rare upgrade is larger still.
        let begun = forward::boxed(forward::begin_attempt(
            ctx, group, head, attempt, &mut out, started, ex,
        ));
        let mut at = match until_reset(|cx| respond.poll_reset(cx), begun).await? {
            Step::Go(at) => at,
            Step::Retry => continue,
            gave_up => {
                moved.down(local(respond, ctx, ex, gave_up.status()));
                return Ok(());
            }
        };
        // A request without a body (END_STREAM on its HEADERS, as every
        // GET) has nothing to send: no body future is built for it.
        // A WebSocket's stream carries no body before the backend's 101.
        let sent = if ws_key.is_some() || (body.is_end_stream() && head.framing != Framing::Chunked)
        {
            BodySent::Done
        } else {
            let sent = send_body(
                &mut body,
                &mut at.backend,
                head,
                ctx,
                upstream.response_timeout,
                moved,
            );
            // A reset ends the wait at once: h2 frees the stream's slot at
            // the reset, so a task held here in a write to a backend that
            // stopped reading (up to response_timeout a write) would
            // outlive it, its backend connection with it, beyond
            // max_concurrent_streams.
            until_reset(|cx| respond.poll_reset(cx), Box::pin(sent)).await?
        };
        if let BodySent::ClientGone = sent {
            return Err(Cut::Client);
        }
        ex.body_read = matches!(sent, BodySent::Done);
        let answered = forward::early_answer(ctx, head, &mut at, &sent);
        if let Some(r) = until_reset(|cx| respond.poll_reset(cx), answered).await? {
            break (at.backend, at.addr, r, at.lease);
        }
        if let Some(status) = forward::body_verdict(ctx, balancer, at.addr, &sent) {
            moved.down(local(respond, ctx, ex, status));
            return Ok(());
        }
        let finished = forward::finish_attempt(ctx, group, head, &mut at, attempt);
        match until_reset(|cx| respond.poll_reset(cx), finished).await? {
            Step::Go(r) => break (at.backend, at.addr, r, at.lease),
            Step::Retry => continue,
            gave_up => {
                moved.down(local(respond, ctx, ex, gave_up.status()));
                return Ok(());
            }
        }
    };
    // A response here whose request body did not go whole is a backend's
    // early answer (`forward::early_answer`): never pooled afterwards, and
    // the request side ends. The upload's unread DATA (up to a stream
    // window) would hold the connection's window until the answer is
    // relayed, however long that takes, and stall every other upload on
    // the connection. Dropped now, h2 gives it back, and frees what the
    // client still sends before the stream's reset.
    let body = ex.body_read.then_some(body);
    balancer.succeeded(addr);
    ex.upstream = Some(addr);
    let ttfb = started.elapsed();
    ctx.metrics.families.upstream_ttfb_seconds.observe(ttfb);
    ex.upstream_time = Some(ttfb);
    // The HSTS field, on whatever this stream's answer is.
    let mut extra: Vec<(&str, &[u8])> = Vec::new();
    if let Some(v) = route.hsts.as_deref() {
        extra.push(("strict-transport-security", v.as_bytes()));
    }
    let relay = match ws_key.map(|key| convert::websocket_refusal(&resp, key)) {
        Some(Some(why)) => Relay::Refuse(why),
        // The switch was checked just now (its SHA-1 once, not again in
        // `relay`).
        Some(None) if resp.status == 101 => Relay::Upgrade,
        _ => exchange::relay(head, &resp, false),
    };
    let refused = match (relay, ws_key) {
        (Relay::Body { .. }, _) if exchange::coded_beyond_chunked(&resp) => {
            Some("a transfer coding other than chunked, which HTTP/2 cannot carry")
        }
        (Relay::Body { .. }, _) => None,
        (Relay::Refuse(why), _) => Some(why),
        (Relay::Upgrade, Some(_)) => match body {
            Some(body) => {
                let send = respond
                    .send_response(convert::websocket_response(&resp, &extra), false)
                    .map_err(|_| Cut::Client)?;
                ex.status = 200;
                // Bytes the backend sent after its 101 are the new protocol's.
                let early = rbuf.get(resp.len..).unwrap_or_default().to_vec();
                buffers::give(rbuf);
                // Boxed: its state would otherwise be part of every stream's
                // future.
                return Box::pin(websocket(body, send, backend, early, ctx, moved)).await;
            }
            // `early_answer` refuses a 101: the body is gone only after
            // another status.
            None => Some("101 as an early answer"),
        },
        // HTTP/2 has no Upgrade (RFC 9113 §8.6) but a WebSocket's.
        (Relay::Upgrade, None) => Some("101 to an HTTP/2 request"),
    };
    if let Some(why) = refused {
        M::inc(&ctx.metrics.upstream_errors);
        balancer.log_failure(ctx.peer, addr, "unusable upstream response", &why);
        moved.down(local(respond, ctx, ex, 502));
        return Ok(());
    }
    let no_body = ex.head_only || resp.framing == Framing::Length(0);
    let mut send = respond
        .send_response(convert::response(&resp, &extra), no_body)
        .map_err(|_| Cut::Client)?;
    // Only once it went: a stream reset before is logged as the client's.
    ex.status = resp.status;
    // A bulk response moves the connection's keys to the kernel, if they
    // wait for one (`runtime.ktls_after`): one with a length now, one of
    // unknown length once that much of it went out with more to come (so
    // a body that ends there leaves no announcement behind for whatever
    // is written next). `ex.kernel`: this response goes out on the
    // kernel's records from its next write.
    let known = match resp.framing {
        Framing::Length(n) if !no_body => {
            if link.bulk_ahead(n) {
                ex.kernel = Some(true);
            }
            true
        }
        _ => false,
    };
    let mut scanner = BodyScanner::new(resp.framing);
    let mut decoded = Decoded::default();
    let after_head = rbuf.get(resp.len..).unwrap_or_default();
    let used = scanner
        .decode(after_head, &mut decoded)
        .map_err(|e| abort(&mut send, e.into()))?;
    let mut leftover = after_head.len() - used;
    buffers::give(rbuf);
    if !no_body {
        // The last DATA frame carries END_STREAM itself when no trailers
        // follow (RFC 9113 §8.1), as nginx sends it: no empty frame after
        // it.
        let mut ended = false;
        let mut pace = Pace::default();
        loop {
            if !decoded.data.is_empty() {
                let data = Bytes::from(std::mem::take(&mut decoded.data));
                moved.down(data.len() as u64);
                // This stream's body bytes so far (nothing else went down).
                if !known && !scanner.is_done() && link.bulk_ahead(moved.down_so_far()) {
                    ex.kernel = Some(true);
                }
                ended = scanner.is_done() && !convert::has_trailers(&decoded.trailers);
                send.send_data(data, ended).map_err(|_| Cut::Client)?;
            }
            if scanner.is_done() {
                break;
            }
            // Backpressure: read no more than the client may take now.
            let room = capacity(&mut send, ctx, route.send_timeout, link, &mut pace).await?;
            let want = room.clamp(1, READ);
            let read = Box::pin(backend.read_some(want));
            let read = ctx.within(upstream.response_timeout, read);
            let Ok(res) = until_reset(|cx| send.poll_reset(cx), read).await? else {
                return Err(abort(&mut send, UpstreamAbort::Stalled));
            };
            match res {
                Ok(buf) if buf.is_empty() => {
                    buffers::give(buf);
                    scanner.finish().map_err(|e| abort(&mut send, e.into()))?;
                    // Only a body delimited by the close gets here whole.
                    if !backend.ended_cleanly() {
                        return Err(abort(&mut send, UpstreamAbort::UncleanClose));
                    }
                    break;
                }
                Ok(buf) => {
                    let used = scanner.decode(&buf, &mut decoded);
                    let n = buf.len();
                    buffers::give(buf);
                    let used = used.map_err(|e| abort(&mut send, e.into()))?;
                    leftover += n - used;
                }
                Err(e) => return Err(abort(&mut send, UpstreamAbort::Io(e))),
            }
        }
        if !ended {
            match convert::trailers_from_h1(&decoded.trailers) {
                Some(t) => send.send_trailers(t),
                None => send.send_data(Bytes::new(), true),
            }
            .map_err(|_| Cut::Client)?;
        }
    }
    if ex.body_read && exchange::reusable(head, &resp, leftover) {
        ctx.pools[group].put(0, backend, addr, upstream.pool_size);
    }
    Ok(())
}

/// A WebSocket over an HTTP/2 stream (RFC 8441), once the backend
/// switched protocols: DATA both ways, each direction's end a half-close
/// (END_STREAM to a FIN or close_notify and back), until both ended, one
/// side failed, the client reset the stream, or no byte moved for the
/// route's `keepalive_timeout`; an abort is RST_STREAM: CONNECT_ERROR for
/// the backend's connection failing (RFC 9113 §8.5), else CANCEL. Under
/// flow control as a body: the client's window is released only for what
/// the backend took, and the backend is read no faster than the client's
/// window opens. A shut window only holds the backend back (h2 buffers at
/// most `send_buffer`); it does not end the connection as a response's
/// `send_timeout` does: a WebSocket may rightly go unread for a while, and
/// the idle bound ends one where nothing moves at all.
async fn websocket(
    mut body: RecvStream,
    mut send: SendStream<Bytes>,
    backend: BackendConn,
    early: Vec<u8>,
    ctx: &Ctx<'_>,
    moved: &Tally<'_>,
) -> Result<(), Cut> {
    let (mut from_backend, mut to_backend) = match backend.split() {
        Ok(halves) => halves,
        Err(e) => {
            // ktern's own: the socket could not be made non-blocking.
            M::inc(&ctx.metrics.internal_errors);
            tracing::warn!(peer = %ctx.peer, error = %e, "internal: cannot split a backend connection for a WebSocket: stream reset");
            send.send_reset(Reason::CANCEL);
            return Ok(());
        }
    };
    let upstream = |e| Cut::Upstream(UpstreamAbort::Io(e));
    let idle = ctx.idle.register(ctx.route.keepalive_timeout);
    // Each direction's end. Once the backend's has ended (its END_STREAM
    // queued), a failed write towards the backend only ends the client's
    // direction (the backend closed first, a WebSocket's usual end), and
    // no reset may go out: h2 would discard the DATA it still holds.
    let (up_done, down_done) = (Cell::new(false), Cell::new(false));
    let result = {
        let client_to_backend = std::pin::pin!(async {
            while let Some(data) = body.data().await {
                // A reset stream or an ended connection.
                let data = data.map_err(|_| Cut::Client)?;
                let n = data.len();
                if n == 0 {
                    continue;
                }
                if let Err(e) = to_backend.write_bytes(data).await {
                    return if down_done.get() {
                        Ok(())
                    } else {
                        Err(upstream(e))
                    };
                }
                idle.touch();
                moved.up(n as u64);
                let _ = body.flow_control().release_capacity(n);
            }
            match to_backend.finish().await {
                Err(e) if !down_done.get() => Err(upstream(e)),
                _ => {
                    up_done.set(true);
                    Ok(())
                }
            }
        });
        let send = &mut send;
        let backend_to_client = std::pin::pin!(async {
            if !early.is_empty() {
                moved.down(early.len() as u64);
                send.send_data(Bytes::from(early), false)
                    .map_err(|_| Cut::Client)?;
            }
            loop {
                // Room in the client's window; the client's reset ends the
                // wait (and the read below): its own direction may be
                // waiting on a backend that does not read.
                send.reserve_capacity(READ);
                let room = match send.capacity() {
                    0 => {
                        std::future::poll_fn(|cx| {
                            if send.poll_reset(cx).is_ready() {
                                return Poll::Ready(Err(Cut::Client));
                            }
                            match send.poll_capacity(cx) {
                                Poll::Ready(Some(Ok(n))) => Poll::Ready(Ok(n.max(1))),
                                Poll::Ready(_) => Poll::Ready(Err(Cut::Client)),
                                Poll::Pending => Poll::Pending,
                            }
                        })
                        .await?
                    }
                    n => n,
                };
                // Learned, not kept, while the backend is awaited (see
                // `capacity`): a quiet WebSocket must not hold the
                // connection's window.
                send.reserve_capacity(0);
                let mut read = std::pin::pin!(from_backend.read_some(room.clamp(1, READ)));
                let buf = std::future::poll_fn(|cx| {
                    if send.poll_reset(cx).is_ready() {
                        return Poll::Ready(Err(Cut::Client));
                    }
                    read.as_mut().poll(cx).map_err(upstream)
                })
                .await?;
                if buf.is_empty() {
                    buffers::give(buf);
                    send.send_data(Bytes::new(), true)
                        .map_err(|_| Cut::Client)?;
                    break;
                }
                // A copy the size of what came: the read buffer is the
                // cache's 64 KiB one, which a small message would pin
                // until h2 wrote it.
                let data = Bytes::copy_from_slice(&buf);
                buffers::give(buf);
                idle.touch();
                moved.down(data.len() as u64);
                send.send_data(data, false).map_err(|_| Cut::Client)?;
            }
            down_done.set(true);
            // Still watching for the client's reset while its direction
            // runs (polled after it: its end is seen in the same pass).
            std::future::poll_fn(|cx| {
                if up_done.get() {
                    Poll::Ready(Ok(()))
                } else if send.poll_reset(cx).is_ready() {
                    Poll::Ready(Err(Cut::Client))
                } else {
                    Poll::Pending
                }
            })
            .await
        });
        crate::proxy::tcp::both_or_first_error(
            client_to_backend,
            backend_to_client,
            &idle,
            Cut::Idle,
        )
        .await
    };
    if !down_done.get() {
        match &result {
            Ok(()) => {}
            // RFC 9113 §8.5: an error on the proxied TCP connection (a
            // reset among them) is a stream error of type CONNECT_ERROR.
            Err(Cut::Upstream(_)) => send.send_reset(Reason::CONNECT_ERROR),
            Err(_) => send.send_reset(Reason::CANCEL),
        }
    }
    result
}

/// A fresh WebSocket key's 16 random bytes.
fn nonce() -> Option<[u8; 16]> {
    use crate::provider::prims::rand::{SecureRandom, SystemRandom};
    let mut n = [0u8; 16];
    SystemRandom::new().fill(&mut n).ok()?;
    Some(n)
}

/// A backend failure mid-response: the stream is reset (INTERNAL_ERROR),
/// so the cut-short body never looks complete to the client.
fn abort(send: &mut SendStream<Bytes>, e: UpstreamAbort) -> Cut {
    send.send_reset(Reason::INTERNAL_ERROR);
    Cut::Upstream(e)
}

/// Waits until the client's window and h2's send buffer have room for
/// response bytes; returns how much. A window shut for `stall` ends the
/// stream (nginx's `send_timeout`): alone, if DATA went out on the
/// connection meanwhile (the client's windows let it out: it reads other
/// streams; flow control is per stream, RFC 9113 §5.2, and a browser
/// leaves a paused video's stream unread); with the connection otherwise
/// ([`Cut::Stalled`]). A client that lets DATA out without reading it
/// fills the socket's buffers, and then no more goes.
///
/// A client that keeps a stream going by opening its window a little at a
/// time (a byte per WINDOW_UPDATE, each within `send_timeout`) is a slow
/// read: it would hold the stream's backend connection for as long as it
/// likes at a few bytes a minute. The waits are added up (`pace`): once
/// they reach `stall` with less than [`PROGRESS`] of window opened since
/// the last time that much was, the stream is reset alone
/// ([`Cut::Slow`]). HTTP/1.1 has the same bound from TCP: a socket is
/// writable again only once a good part of its send buffer drained.
///
/// The room is learned, not kept: the reservation goes back to the
/// connection before the caller waits on its backend. A reservation held
/// through that wait holds the connection's window with it, and a client
/// that keeps the default 65,535-byte window (RFC 9113 §6.9.2; hyperium's
/// h2 does) then gets nothing on its other streams while one response
/// waits on a slow backend or a WebSocket is quiet. The bytes read
/// afterwards (no more than the room) are buffered by h2 and sent as the
/// windows allow, so the next call finds no room until they went.
async fn capacity(
    send: &mut SendStream<Bytes>,
    ctx: &Ctx<'_>,
    stall: Duration,
    link: &Signals,
    pace: &mut Pace,
) -> Result<usize, Cut> {
    send.reserve_capacity(READ);
    let room = match send.capacity() {
        0 => {
            let began = crate::clock::coarse_now();
            let mut wait = std::future::poll_fn(|cx| send.poll_capacity(cx));
            // Progress is judged over the wait's second half: in its first,
            // the transport may still be sending this stream's own DATA,
            // queued before its window shut.
            let first = stall / 2;
            let waited = match ctx.within(first, &mut wait).await {
                Err(_) => {
                    let sent = link.data_sent.get();
                    ctx.within(stall - first, &mut wait)
                        .await
                        .map_err(|_| link.data_sent.get() > sent)
                }
                Ok(got) => Ok(got),
            };
            drop(wait);
            pace.waited += crate::clock::coarse_now().saturating_duration_since(began);
            match waited {
                Err(others_moved) => {
                    send.send_reset(Reason::CANCEL);
                    return Err(match others_moved {
                        true => Cut::Paused,
                        false => Cut::Stalled,
                    });
                }
                Ok(Some(Ok(n))) if n > 0 => n,
                Ok(Some(Ok(_))) => send.capacity().max(1),
                Ok(_) => return Err(Cut::Client),
            }
        }
        n => n,
    };
    send.reserve_capacity(0);
    pace.opened += room as u64;
    if pace.opened >= PROGRESS {
        *pace = Pace::default();
    } else if pace.waited >= stall {
        send.send_reset(Reason::CANCEL);
        return Err(Cut::Slow);
    }
    Ok(room)
}

/// The least window a client must open for a response per `send_timeout`
/// it keeps the stream waiting: a full TLS record. A client on a link of
/// 300 bytes/s meets it with the default 60 s.
const PROGRESS: u64 = 16 << 10;

/// A response's waits on its client's window since it last opened
/// [`PROGRESS`] of it (see [`capacity`]).
#[derive(Default)]
struct Pace {
    waited: Duration,
    opened: u64,
}

/// Streams the request body to the backend as DATA arrives, releasing the
/// client's window only for what the backend took.
async fn send_body(
    body: &mut RecvStream,
    backend: &mut BackendConn,
    head: &RequestHead,
    ctx: &Ctx<'_>,
    backend_timeout: Duration,
    moved: &Tally<'_>,
) -> BodySent {
    let chunked = head.framing == Framing::Chunked;
    let mut total = 0u64;
    let per_read = ctx.route.head_timeout;
    let mut pace = exchange::BodyPace::new(per_read, ctx.route.min_body_rate);
    while !body.is_end_stream() {
        let data = match ctx.paced(&mut pace, total, per_read, body.data()).await {
            None => return BodySent::Refused(408),
            Some(None) => break,
            // Reset by the client, a content-length that disagrees with
            // the DATA sent (h2 resets it: PROTOCOL_ERROR), or the
            // connection ended: this backend connection carries half a
            // request and is dropped, never pooled.
            Some(Some(Err(_))) => return BodySent::ClientGone,
            Some(Some(Ok(d))) => d,
        };
        let n = data.len();
        total += n as u64;
        if total > ctx.route.max_body {
            // Never to be sent either, as below.
            let _ = body.flow_control().release_capacity(n);
            return BodySent::Refused(413);
        }
        if n == 0 {
            continue;
        }
        let bytes = if chunked {
            let mut framed = Vec::with_capacity(n + 12);
            // Into the frame's own buffer: a `format!` was a String per chunk.
            let _ = write!(framed, "{n:x}\r\n");
            framed.extend_from_slice(&data);
            framed.extend_from_slice(b"\r\n");
            Bytes::from(framed)
        } else {
            data
        };
        let sent = match ctx
            .within(backend_timeout, backend.write_bytes(bytes))
            .await
        {
            Err(_) => BodySent::BackendStalled,
            Ok(Err(_)) => BodySent::BackendFailed,
            Ok(Ok(())) => BodySent::Done,
        };
        if !matches!(sent, BodySent::Done) {
            // Never to be sent: its window goes back with the rest of the
            // unread body's when the stream ends or answers early.
            let _ = body.flow_control().release_capacity(n);
            return sent;
        }
        moved.up(n as u64);
        // The backend took it: the client may send as much again.
        let _ = body.flow_control().release_capacity(n);
    }
    if chunked {
        // The body has ended (END_STREAM came): the trailers, if any,
        // came with it, so this wait is not the body's to be paced.
        let trailers = match ctx.within(per_read, body.trailers()).await {
            Err(_) => {
                M::inc(&ctx.metrics.http_slow_bodies);
                return BodySent::Refused(408);
            }
            Ok(Err(_)) => return BodySent::ClientGone,
            Ok(Ok(t)) => t,
        };
        let last = convert::last_chunk(trailers.as_ref());
        match ctx
            .within(backend_timeout, backend.write_bytes(last.into()))
            .await
        {
            Err(_) => return BodySent::BackendStalled,
            Ok(Err(_)) => return BodySent::BackendFailed,
            Ok(Ok(())) => {}
        }
    }
    BodySent::Done
}

/// A `static` rule's answer, decided as for HTTP/1.1
/// (`forward::static_answer`); the body read in pieces no larger than the
/// client's window allows.
async fn serve_file(
    head: &RequestHead,
    root: &std::path::Path,
    respond: &mut SendResponse<Bytes>,
    ctx: &Ctx<'_>,
    link: &Signals,
    ex: &mut Exchange,
    moved: &Tally<'_>,
) -> Result<(), Cut> {
    use std::os::unix::fs::FileExt;
    let (bytes, body, file, path) = match forward::static_answer(head, root, ctx.route, true) {
        StaticAnswer::Local(status) => {
            moved.down(local(respond, ctx, ex, status));
            return Ok(());
        }
        StaticAnswer::Redirect(location) => {
            ex.status = 301;
            let mut resp = http::Response::new(());
            *resp.status_mut() = http::StatusCode::MOVED_PERMANENTLY;
            if let Ok(v) = http::HeaderValue::from_str(&location) {
                resp.headers_mut().insert(http::header::LOCATION, v);
            }
            respond.send_response(resp, true).map_err(|_| Cut::Client)?;
            return Ok(());
        }
        StaticAnswer::File(f) => {
            ex.status = f.status;
            (f.head, f.body, f.file, f.path)
        }
    };
    let Ok(Some(resp)) = head::parse_response(&bytes, head.method(), bytes.len()) else {
        // ktern's own head; unparsable would be a bug here, not the client's.
        moved.down(local(respond, ctx, ex, 500));
        return Ok(());
    };
    let mut send = respond
        .send_response(convert::response(&resp, &[]), body.is_none())
        .map_err(|_| Cut::Client)?;
    let Some((mut offset, count)) = body else {
        return Ok(());
    };
    if link.bulk_ahead(count) {
        ex.kernel = Some(true);
    }
    let mut left = count;
    let mut pace = Pace::default();
    while left > 0 {
        let room = capacity(&mut send, ctx, ctx.route.send_timeout, link, &mut pace).await?;
        let want = (left as usize).min(room.clamp(1, READ));
        let mut buf = vec![0; want];
        let n = match file.read_at(&mut buf, offset) {
            // Shorter than the length the head promised.
            Ok(0) => {
                send.send_reset(Reason::INTERNAL_ERROR);
                return Err(Cut::File(FileAbort::Shrank(path)));
            }
            Ok(n) => n,
            Err(source) => {
                send.send_reset(Reason::INTERNAL_ERROR);
                return Err(Cut::File(FileAbort::Io { path, source }));
            }
        };
        buf.truncate(n);
        offset += n as u64;
        left -= n as u64;
        moved.down(n as u64);
        send.send_data(Bytes::from(buf), left == 0)
            .map_err(|_| Cut::Client)?;
    }
    Ok(())
}
