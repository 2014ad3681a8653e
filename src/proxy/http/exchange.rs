//! The request exchange's decisions, sans-IO: which route a request takes,
//! what ktern answers itself, when a failed backend attempt is retried and
//! what the client gets otherwise, how a backend response is framed towards
//! the client, whether the client connection stays open and whether the
//! backend connection goes back to the pool.
//!
//! Parsed heads and facts go in, a decision comes out; no socket, no clock.
//! The HTTP/1.1 pump (`forward.rs`) asks at each step and does the I/O; an
//! HTTP/2 stream task asks the same questions, so both protocols make one
//! set of decisions.

use std::path::Path;
use std::time::Duration;

use super::body::Framing;
use super::head::{list_tokens, RequestHead, ResponseHead};
use crate::config::{Balance, HashKey, HostMatch, HttpRoute, Rule, Target};

/// What to do with a request whose head was accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan<'r> {
    /// Answer with `status` ourselves; close the connection after it when
    /// `close` (an unread request body would otherwise be read as the next
    /// request).
    Local {
        /// The status.
        status: u16,
        /// Close after the answer.
        close: bool,
        /// The upstream group the matching rule named, if one did (its
        /// response counters count the answer).
        group: Option<usize>,
    },
    /// Serve a file under `root`.
    Static {
        /// The rule's directory.
        root: &'r Path,
        /// Close after a local answer (404, 416…) of the file stage.
        close_after_local: bool,
    },
    /// Forward to upstream group `group`.
    Upstream {
        /// Index into `Config::upstreams`.
        group: usize,
        /// Answer `100 Continue` ourselves before streaming the body
        /// (the request goes upstream without `Expect`, RFC 9110 §10.1.1).
        send_continue: bool,
        /// Close after a local answer (502, 504) before the body was read.
        close_after_local: bool,
    },
}

/// Plans a request: the first rule (most specific first) whose Host, SNI
/// and path prefix match, or 404.
pub fn plan<'r>(route: &'r HttpRoute, head: &RequestHead, sni: Option<&str>) -> Plan<'r> {
    let has_body = head.framing != Framing::Length(0);
    // A local answer before the body was read leaves the body in the
    // stream; closing afterwards keeps it from being read as a request.
    let close_after_local = !head.keep_alive || has_body;
    // A `.` or `..` segment (literal or `%2e`): rules match the path as
    // sent, and a backend that resolves `/v2/../admin` would serve what no
    // rule routed to it (browsers remove them before sending). 400, the
    // connection kept, as nginx answers one that climbs above the root.
    if super::head::has_dot_segment(head.target().as_bytes()) {
        return Plan::Local {
            status: 400,
            close: close_after_local,
            group: None,
        };
    }
    let host = route_host(head.host().unwrap_or_default());
    let path = target_path(head.target());
    let found = find_rule(&route.rules, host, sni, path);
    // A rule names this host but another server name: the client reused
    // a connection for a name it did not open it for (a browser
    // coalescing HTTP/2 connections across its certificate's names, RFC
    // 9113 §9.1.1). 421 sends it to a connection of its own (RFC 9110
    // §15.5.20), where a catch-all would have answered from the wrong
    // route. A rule that names the host for any server name still wins.
    if found.is_none_or(|r| r.host == HostMatch::Any) && misdirected(&route.rules, host, sni, path)
    {
        return Plan::Local {
            status: 421,
            close: close_after_local,
            group: None,
        };
    }
    let Some(rule) = found else {
        return Plan::Local {
            status: 404,
            close: close_after_local,
            group: None,
        };
    };
    match &rule.target {
        Target::Static(root) => Plan::Static {
            root,
            close_after_local,
        },
        Target::Upstream(group) => {
            if matches!(head.framing, Framing::Length(n) if n > route.max_body) {
                return Plan::Local {
                    status: 413,
                    close: true,
                    group: Some(*group),
                };
            }
            Plan::Upstream {
                group: *group,
                // An HTTP/1.0 client cannot take a 1xx: its expectation is
                // ignored (RFC 9110 §10.1.1).
                send_continue: head.expect_continue && has_body && head.minor == 1,
                close_after_local,
            }
        }
    }
}

/// The first rule matching `host` (lower case, no port), `sni` and `path`.
pub fn find_rule<'r>(
    rules: &'r [Rule],
    host: &str,
    sni: Option<&str>,
    path: &str,
) -> Option<&'r Rule> {
    rules
        .iter()
        .find(|r| r.host.matches(host) && r.sni.matches_sni(sni) && path.starts_with(&r.path))
}

/// Whether a rule names `host` (not any host) for `path` on connections
/// opened for that very name, and this one (`sni`) was opened for
/// another: a connection of its own, where the client sends the host as
/// its server name, reaches the rule. (A rule for other server names than
/// the host's is a gate, not a misdirection: the request falls through.)
fn misdirected(rules: &[Rule], host: &str, sni: Option<&str>, path: &str) -> bool {
    // Without a server name (a health check by address) nothing was
    // coalesced, and a retry would send none either: it falls through.
    sni.is_some()
        && rules.iter().any(|r| {
            r.host != HostMatch::Any
                && r.host.matches(host)
                && path.starts_with(&r.path)
                && r.sni.matches(host)
                && !r.sni.matches_sni(sni)
        })
}

/// The path a rule matches against: the target itself (origin-form, the
/// only form with a path after `head::build_request`), or `/` for
/// OPTIONS' `*`.
pub fn target_path(target: &str) -> &str {
    if target.starts_with('/') {
        target
    } else {
        "/"
    }
}

/// The name a request's host is routed by: no port, and no trailing dot.
/// `app.example.com.` is the same host as `app.example.com` (RFC 1034
/// §3.1: the dot only marks the name absolute); clients send it as typed
/// (curl does), the server name in the ClientHello goes without it (RFC
/// 6066 §3), and nginx drops it from Host before matching `server_name`.
/// One dot only: `a..` stays unmatched.
pub fn route_host(host: &str) -> &str {
    let host = strip_port(host);
    host.strip_suffix('.').unwrap_or(host)
}

/// A Host value without its port (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// A client address as a hash key: IPv4 clients hash as their
/// IPv4-mapped IPv6 form, so both families share one key space.
pub fn ip_key(peer: std::net::SocketAddr) -> [u8; 16] {
    match peer.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// The key a hashing balancer places this request by, if it hashes.
pub fn hash_key<'h>(
    balance: &'h Balance,
    head: &'h RequestHead,
    ip_key: &'h [u8; 16],
) -> Option<&'h [u8]> {
    match balance {
        Balance::Hash(HashKey::ClientIp) => Some(ip_key),
        // Without the header: round robin (HAProxy's `balance hdr()`).
        Balance::Hash(HashKey::Header(name)) => head.values(name.as_str()).next(),
        _ => None,
    }
}

/// Methods a client may repeat without changing the outcome (RFC 9110
/// §9.2.2).
pub fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// How one attempt at a backend failed before its response head arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFault {
    /// Writing the request head failed (the connection was closed).
    WriteFailed,
    /// The backend closed before sending anything.
    NothingBack,
    /// No complete response head within the response timeout.
    Timeout,
    /// Not HTTP/1.x, too large, ambiguous framing, or cut short.
    Bad(&'static str),
}

impl UpstreamFault {
    /// For the log line.
    pub fn describe(&self) -> &'static str {
        match self {
            UpstreamFault::WriteFailed => "request write failed",
            UpstreamFault::NothingBack => "closed without a response",
            UpstreamFault::Timeout => "no response head in time",
            UpstreamFault::Bad(why) => why,
        }
    }
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Once more, on a new connection.
    Retry,
    /// Give up: answer the client with `status` and close (the backend
    /// is marked failed if [`backend_at_fault`]).
    Answer(u16),
}

/// The retry rule. A pooled connection may have been closed by the
/// backend an instant ago; that is retried once on a fresh connection:
/// when the request head could not even be written, or when nothing of
/// the response came back and the request can safely be repeated (an
/// idempotent method without a body, so nothing was consumed). A fresh
/// connection's failure is the backend's: 504 for a timeout, else 502.
pub fn after_fault(
    attempt: u32,
    reused: bool,
    head: &RequestHead,
    fault: UpstreamFault,
) -> Verdict {
    let first_on_pooled = reused && attempt == 1;
    let repeatable = idempotent(head.method()) && head.framing == Framing::Length(0);
    match fault {
        UpstreamFault::WriteFailed if first_on_pooled => Verdict::Retry,
        UpstreamFault::NothingBack if first_on_pooled && repeatable => Verdict::Retry,
        UpstreamFault::Timeout => Verdict::Answer(504),
        _ => Verdict::Answer(502),
    }
}

/// Whether a failed attempt counts against its backend (`max_fails`).
/// Not a pooled connection's first close: a backend whose keep-alive
/// timeout is shorter than `pool_idle_timeout` (gunicorn's 2 s against
/// ktern's 4 s) closes it an instant before ktern writes, a race, not a
/// failure. Whether the request could be retried or got a 502 (a POST)
/// does not change whose fault it was; counted, one race took a healthy
/// backend out of the shard's rotation for `fail_timeout` with the
/// default `max_fails = 1`. A timeout or a bad response is the backend's.
pub fn backend_at_fault(attempt: u32, reused: bool, fault: UpstreamFault) -> bool {
    let first_on_pooled = reused && attempt == 1;
    !(first_on_pooled
        && matches!(
            fault,
            UpstreamFault::WriteFailed | UpstreamFault::NothingBack
        ))
}

/// How a backend's response head is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// 101 to a request that asked to upgrade: relay the head, then tunnel.
    Upgrade,
    /// Unusable for this client: answer 502 and close (why, for the log).
    Refuse(&'static str),
    /// Relay head and body.
    Body {
        /// A body delimited by the backend's close goes to a keep-alive
        /// HTTP/1.1 client re-framed as chunked (RFC 9112 §7.1), so its
        /// connection survives.
        rechunk: bool,
        /// The client connection closes after this response (and the
        /// response says `Connection: close`).
        close: bool,
    },
}

/// Decides how `resp` goes to the client of `head`. `closing`: draining,
/// or the connection's config generation was replaced (keep-alive ends).
pub fn relay(head: &RequestHead, resp: &ResponseHead, closing: bool) -> Relay {
    if resp.status == 101 {
        if !head.upgrade {
            // The backend connection now speaks something else.
            return Relay::Refuse("101 to a request without Upgrade");
        }
        let asked = |t: &str| {
            head.values("upgrade")
                .flat_map(list_tokens)
                .any(|a| a.eq_ignore_ascii_case(t))
        };
        let mut keys = head.values("sec-websocket-key");
        let key = match (keys.next(), keys.next()) {
            (Some(k), None) => std::str::from_utf8(k).ok(),
            _ => None,
        };
        return match switch_refusal(resp, asked, key) {
            Some(why) => Relay::Refuse(why),
            None => Relay::Upgrade,
        };
    }
    let coded = resp
        .fields
        .iter()
        .any(|f| f.name.eq_ignore_ascii_case(b"transfer-encoding"));
    // A transfer coding may only go to an HTTP/1.1 client (RFC 9112 §6.1).
    // An HTTP/1.0 client's request went upstream as HTTP/1.0, so a backend
    // answering it with one is broken: 502 rather than an unreadable body.
    if head.minor == 0 && (resp.framing == Framing::Chunked || coded) {
        return Relay::Refuse("transfer-coded response to an HTTP/1.0 request");
    }
    // A response with a transfer coding of its own keeps it and is relayed
    // until close.
    let rechunk =
        resp.framing == Framing::UntilClose && head.keep_alive && head.minor == 1 && !coded;
    let close = !head.keep_alive || closing || (resp.framing == Framing::UntilClose && !rechunk);
    Relay::Body { rechunk, close }
}

/// Why a backend's 101 does not switch to what was asked, if it does not.
/// RFC 9110 §7.8: a 101 names in `Upgrade` the protocols it switches to,
/// each one the client `asked` for; RFC 6455 §4.1: a WebSocket's
/// `Sec-WebSocket-Accept` answers the client's `key` (§4.2.2), or the
/// client fails the connection. Tunnelled anyway, a backend that answered
/// 101 while still speaking HTTP (a status it reflects, a broken
/// WebSocket endpoint) would take the client's next bytes as requests of
/// their own, past every rule, path check and forwarding field ktern
/// applies ("WebSocket smuggling").
pub fn switch_refusal(
    resp: &ResponseHead,
    asked: impl Fn(&str) -> bool,
    key: Option<&str>,
) -> Option<&'static str> {
    let mut named = resp
        .fields
        .values("upgrade")
        .flat_map(list_tokens)
        .peekable();
    if named.peek().is_none() {
        return Some("101 without Upgrade");
    }
    let mut websocket = false;
    for token in named {
        if !asked(token) {
            return Some("101 to a protocol the client did not ask for");
        }
        websocket |= token.eq_ignore_ascii_case("websocket");
    }
    if websocket {
        let accepted = key.is_some_and(|key| {
            resp.fields
                .values("sec-websocket-accept")
                .eq([websocket_accept(key).as_bytes()])
        });
        if !accepted {
            return Some("101 without the Sec-WebSocket-Accept for the client's key");
        }
    }
    None
}

/// The GUID of RFC 6455 §1.3, which a WebSocket server appends to the
/// client's key before hashing it into `Sec-WebSocket-Accept`.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` a backend must answer `key` with (RFC 6455
/// §4.2.2): base64 of the SHA-1 of the key and the GUID.
pub fn websocket_accept(key: &str) -> String {
    use crate::provider::prims::digest;
    use base64::Engine;
    let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(WEBSOCKET_GUID);
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// Whether a response carries a transfer coding other than chunked
/// (`gzip`, `gzip, chunked`). HTTP/2 has none (RFC 9113 §8.2.2: the field
/// is connection-specific), and the `content-encoding` does not say it, so
/// an HTTP/2 client would take the coded bytes for the content: 502, as
/// nginx answers. (HTTP/1.1 clients get the coding, named.)
pub fn coded_beyond_chunked(resp: &ResponseHead) -> bool {
    resp.fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(b"transfer-encoding"))
        .flat_map(|f| super::head::list_tokens(f.value))
        .any(|c| !c.eq_ignore_ascii_case("chunked"))
}

/// Whether the backend connection goes back to the pool once the response
/// was relayed: only one whose response ended exactly at its framing
/// (`leftover` bytes past it: none), that said keep-alive, and not after
/// an HTTP/1.0 request (it went upstream without keep-alive, so the
/// backend closes it whatever its answer says).
pub fn reusable(head: &RequestHead, resp: &ResponseHead, leftover: usize) -> bool {
    resp.keep_alive && head.minor == 1 && leftover == 0 && resp.framing != Framing::UntilClose
}

/// The least pace a request body must keep: `per_read` for each wait (as
/// nginx's `client_body_timeout`), and on average `rate` bytes a second
/// once it has waited `grace` for the client (Apache's mod_reqtimeout
/// `MinRate`, Kestrel's `MinRequestBodyDataRate`). A per-read bound alone
/// let a client that sends a byte just inside each wait hold its backend
/// connection and `max_conns` place for as long as `max_body` lasts: a
/// 1 MiB body at a byte a minute is two years. With the rate, holding N
/// backend connections costs the client N times `rate` of bandwidth.
///
/// Only time spent waiting for the client counts: a backend that takes
/// the body slowly holds its reads back (HTTP/1.1 reads no further, and
/// HTTP/2 opens no window), and that is not the client's doing.
#[derive(Debug, Clone, Copy)]
pub struct BodyPace {
    waited: Duration,
    grace: Duration,
    /// Bytes a second; 0: no rate, only `per_read`.
    rate: u64,
}

impl BodyPace {
    /// A body that has not been waited for yet.
    pub fn new(grace: Duration, rate: u64) -> Self {
        BodyPace {
            waited: Duration::ZERO,
            grace,
            rate,
        }
    }

    /// Adds one wait for the client's bytes.
    pub fn waited(&mut self, d: Duration) {
        self.waited = self.waited.saturating_add(d);
    }

    /// How long the next read may wait, `received` bytes in: `per_read`,
    /// or less when the body's allowance (`grace`, plus a second per
    /// `rate` bytes received) ends sooner. `None` once it has ended: the
    /// body is too slow (408).
    pub fn wait(&self, received: u64, per_read: Duration) -> Option<Duration> {
        if self.rate == 0 {
            return Some(per_read);
        }
        // Milliseconds: u64 holds a max_body of 18 PB at 1 byte a second.
        let earned = Duration::from_millis(received.saturating_mul(1000) / self.rate);
        let allowed = self.grace.saturating_add(earned);
        allowed
            .checked_sub(self.waited)
            .filter(|left| !left.is_zero())
            .map(|left| left.min(per_read))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::http::head::{parse_request, parse_response, Limits};
    use std::path::PathBuf;
    use std::time::Duration;

    fn req(text: &str) -> RequestHead {
        parse_request(text.as_bytes(), &Limits::default())
            .unwrap()
            .expect("complete head")
    }

    fn resp(text: &str, method: &str) -> ResponseHead {
        parse_response(text.as_bytes(), method, 1 << 16)
            .unwrap()
            .expect("complete head")
    }

    fn rule(host: HostMatch, sni: HostMatch, path: &str, target: Target) -> Rule {
        Rule {
            host,
            sni,
            path: path.into(),
            target,
        }
    }

    fn route() -> HttpRoute {
        HttpRoute {
            rules: vec![
                rule(
                    HostMatch::Exact("api.example.com".into()),
                    HostMatch::Any,
                    "/v1/",
                    Target::Upstream(1),
                ),
                rule(
                    HostMatch::Suffix(".example.com".into()),
                    HostMatch::Exact("secure.example.com".into()),
                    "/",
                    Target::Upstream(2),
                ),
                rule(
                    HostMatch::Any,
                    HostMatch::Any,
                    "/files/",
                    Target::Static(PathBuf::from("/srv/www")),
                ),
                rule(HostMatch::Any, HostMatch::Any, "/app/", Target::Upstream(0)),
            ],
            max_body: 1000,
            http2: Default::default(),
            head_timeout: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(1),
            send_timeout: Duration::from_secs(1),
            min_body_rate: 500,
            trusted_proxies: Vec::new(),
            x_forwarded: true,
            forwarded: false,
            hsts: None,
        }
    }

    #[test]
    fn a_body_keeps_each_read_within_the_wait_and_its_average_above_the_rate() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let mut pace = BodyPace::new(s(60), 500);
        // Within the grace: each read gets the whole per-read wait, or
        // what is left of the grace if less.
        assert_eq!(pace.wait(0, s(60)), Some(s(60)));
        pace.waited(s(50));
        assert_eq!(pace.wait(0, s(60)), Some(s(10)));
        // After it, each 500 bytes earn a second.
        pace.waited(s(10));
        assert_eq!(pace.wait(0, s(60)), None);
        assert_eq!(pace.wait(5000, s(60)), Some(s(10)));
        pace.waited(s(10));
        assert_eq!(pace.wait(5000, s(60)), None);
        // A fast body is held to the per-read wait only.
        assert_eq!(pace.wait(1 << 20, s(60)), Some(s(60)));
        // A byte a minute, each read just inside the wait: cut off when
        // the grace has gone, however many reads came.
        let mut pace = BodyPace::new(s(60), 500);
        let mut got = 0;
        while let Some(w) = pace.wait(got, s(60)) {
            if w < s(59) {
                // The wait ends before the next byte comes.
                pace.waited(w);
                break;
            }
            pace.waited(s(59));
            got += 1;
        }
        assert_eq!((got, pace.waited), (1, s(60) + ms(2)));
        // A client at the rate exactly is never cut off, however long.
        let (mut pace, mut got) = (BodyPace::new(s(60), 500), 0);
        for _ in 0..100_000 {
            assert!(pace.wait(got, s(60)).is_some());
            pace.waited(ms(2));
            got += 1;
        }
        // Rate 0: no rate; nor an overflow for sizes past u64
        // milliseconds, or waits past Duration's range.
        let mut none = BodyPace::new(s(1), 0);
        none.waited(s(3600));
        assert_eq!(none.wait(0, s(5)), Some(s(5)));
        assert_eq!(BodyPace::new(s(1), 500).wait(u64::MAX, s(5)), Some(s(5)));
        let mut long = BodyPace::new(Duration::MAX, 1);
        long.waited(Duration::MAX);
        long.waited(s(1));
        assert_eq!(long.wait(u64::MAX, s(5)), None);
    }

    #[test]
    fn plans_follow_host_sni_and_path_in_rule_order() {
        let r = route();
        let get =
            |host: &str, path: &str| req(&format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"));
        let upstream = |group| Plan::Upstream {
            group,
            send_continue: false,
            close_after_local: false,
        };
        assert_eq!(
            plan(&r, &get("api.example.com:8443", "/v1/x"), None),
            upstream(1)
        );
        // The absolute form of the name (a trailing dot, as curl sends what
        // was typed) is the same host; the SNI arrives without the dot.
        for host in ["api.example.com.", "api.example.com.:8443"] {
            assert_eq!(plan(&r, &get(host, "/v1/x"), None), upstream(1), "{host}");
        }
        // The suffix rule needs its SNI; without it the request falls through.
        assert_eq!(
            plan(
                &r,
                &get("www.example.com", "/app/"),
                Some("secure.example.com")
            ),
            upstream(2)
        );
        assert_eq!(
            plan(&r, &get("www.example.com", "/app/"), None),
            upstream(0)
        );
        // A host whose rule wants a connection opened for it, on one opened
        // for another name (HTTP/2 coalescing, RFC 9113 §9.1.1): 421, so
        // the client opens its own, instead of the catch-all answering.
        let secure = get("secure.example.com", "/app/");
        let misdirected = Plan::Local {
            status: 421,
            close: false,
            group: None,
        };
        assert_eq!(plan(&r, &secure, Some("www.example.com")), misdirected);
        assert_eq!(plan(&r, &secure, None), upstream(0));
        assert_eq!(plan(&r, &secure, Some("secure.example.com")), upstream(2));
        assert_eq!(
            plan(&r, &get("x", "/files/a.txt"), None),
            Plan::Static {
                root: Path::new("/srv/www"),
                close_after_local: false
            }
        );
        // An absolute-form target naming the Host routes by its path.
        assert_eq!(plan(&r, &get("x", "http://x/app/y"), None), upstream(0));
        assert_eq!(
            plan(&r, &get("x", "/nothing"), None),
            Plan::Local {
                status: 404,
                close: false,
                group: None
            }
        );
        // A dot-segment would reach what no rule routes: 400, the
        // connection kept.
        for path in ["/v1/../admin", "/v1/%2E%2e/admin", "/app/./x"] {
            assert_eq!(
                plan(&r, &get("api.example.com", path), None),
                Plan::Local {
                    status: 400,
                    close: false,
                    group: None
                },
                "{path}"
            );
        }
    }

    #[test]
    fn bodies_limits_and_expectations() {
        let r = route();
        // A body that is not read before a local answer closes the connection.
        let post = req("POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(
            plan(&r, &post, None),
            Plan::Local {
                status: 404,
                close: true,
                group: None
            }
        );
        let big = req("POST /app/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n");
        assert_eq!(
            plan(&r, &big, None),
            Plan::Local {
                status: 413,
                close: true,
                group: Some(0)
            }
        );
        let expect =
            "POST /app/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n";
        assert_eq!(
            plan(&r, &req(expect), None),
            Plan::Upstream {
                group: 0,
                send_continue: true,
                close_after_local: true
            }
        );
        // HTTP/1.0 cannot take a 1xx; no body, nothing to wait for.
        let old = expect.replace("HTTP/1.1", "HTTP/1.0");
        assert!(matches!(
            plan(&r, &req(&old), None),
            Plan::Upstream {
                send_continue: false,
                ..
            }
        ));
        let empty = "GET /app/ HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n";
        assert!(matches!(
            plan(&r, &req(empty), None),
            Plan::Upstream {
                send_continue: false,
                ..
            }
        ));
    }

    #[test]
    fn only_a_pooled_connections_first_failure_is_retried() {
        use UpstreamFault::*;
        let get = req("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let post = req("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n");
        let delete = req("DELETE / HTTP/1.1\r\nHost: x\r\n\r\n");
        let patch = req("PATCH / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(after_fault(1, true, &get, NothingBack), Verdict::Retry);
        assert_eq!(after_fault(1, true, &delete, NothingBack), Verdict::Retry);
        // Not idempotent, or a body was consumed: the backend may have acted.
        assert_eq!(
            after_fault(1, true, &patch, NothingBack),
            Verdict::Answer(502)
        );
        assert_eq!(
            after_fault(1, true, &post, NothingBack),
            Verdict::Answer(502)
        );
        // Nothing was delivered when the head could not be written.
        assert_eq!(after_fault(1, true, &post, WriteFailed), Verdict::Retry);
        // A pooled connection's first close is a race, whatever the client
        // got: not counted against the backend. A fresh one's is.
        assert!(!backend_at_fault(1, true, NothingBack));
        assert!(!backend_at_fault(1, true, WriteFailed));
        assert!(backend_at_fault(1, true, Timeout));
        assert!(backend_at_fault(1, true, Bad("x")));
        assert!(backend_at_fault(1, false, NothingBack));
        assert!(backend_at_fault(2, false, WriteFailed));
        // Once only, and never on a fresh connection.
        assert_eq!(
            after_fault(2, false, &get, NothingBack),
            Verdict::Answer(502)
        );
        assert_eq!(
            after_fault(1, false, &get, WriteFailed),
            Verdict::Answer(502)
        );
        assert_eq!(after_fault(1, true, &get, Timeout), Verdict::Answer(504));
        assert_eq!(after_fault(1, true, &get, Bad("x")), Verdict::Answer(502));
    }

    #[test]
    fn responses_are_framed_for_their_client() {
        let keep = req("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let closing = req("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let old = req("GET / HTTP/1.0\r\nHost: x\r\n\r\n");
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let upgrade = req(&format!(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        ));
        let sized = resp("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "GET");
        let until_close = resp("HTTP/1.1 200 OK\r\n\r\n", "GET");
        let chunked = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET",
        );
        let switch = |fields: &str| {
            resp(
                &format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n{fields}\r\n"),
                "GET",
            )
        };
        // RFC 6455 §1.3's example: this key's accept.
        let accept = "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n";
        let switching = switch(&format!("Upgrade: WebSocket\r\n{accept}"));
        let body = |rechunk, close| Relay::Body { rechunk, close };
        assert_eq!(relay(&keep, &sized, false), body(false, false));
        assert_eq!(relay(&keep, &sized, true), body(false, true), "draining");
        assert_eq!(relay(&closing, &sized, false), body(false, true));
        assert_eq!(relay(&keep, &until_close, false), body(true, false));
        assert_eq!(relay(&closing, &until_close, false), body(false, true));
        assert_eq!(relay(&old, &until_close, false), body(false, true));
        assert!(matches!(relay(&old, &chunked, false), Relay::Refuse(_)));
        assert_eq!(relay(&upgrade, &switching, false), Relay::Upgrade);
        assert!(matches!(relay(&keep, &switching, false), Relay::Refuse(_)));
        // A 101 must switch to what the client asked for, and a
        // WebSocket's accept must answer the client's key: else the
        // backend may still speak HTTP, and the client's next bytes would
        // reach it as requests ktern never saw.
        let refused = |r: &ResponseHead| match relay(&upgrade, r, false) {
            Relay::Refuse(why) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(&switch(accept)), "101 without Upgrade");
        assert_eq!(
            refused(&switch(&format!("Upgrade: h2c\r\n{accept}"))),
            "101 to a protocol the client did not ask for"
        );
        assert_eq!(
            refused(&switch(&format!("Upgrade: websocket, tls/1.3\r\n{accept}"))),
            "101 to a protocol the client did not ask for"
        );
        let wrong = "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOx=\r\n";
        for fields in [
            "Upgrade: websocket\r\n".to_string(),
            format!("Upgrade: websocket\r\n{wrong}"),
            format!("Upgrade: websocket\r\n{accept}{accept}"),
        ] {
            assert_eq!(
                refused(&switch(&fields)),
                "101 without the Sec-WebSocket-Accept for the client's key",
                "{fields}"
            );
        }
        // Another protocol the client asked for needs no key.
        let custom =
            req("GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo/2, bar\r\n\r\n");
        assert_eq!(
            relay(&custom, &switch("Upgrade: BAR\r\n"), false),
            Relay::Upgrade
        );
        // HTTP/1.0 has no upgrade (RFC 9110 §7.8): a 101 to it is refused.
        let old_upgrade = req(&format!(
            "GET / HTTP/1.0\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        ));
        assert!(!old_upgrade.upgrade);
        assert_eq!(
            relay(&old_upgrade, &switching, false),
            Relay::Refuse("101 to a request without Upgrade")
        );
        // Codings HTTP/2 cannot carry; chunked alone (in any case) it can.
        let coded = |te: &str| {
            let r = resp(
                &format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n"),
                "GET",
            );
            coded_beyond_chunked(&r)
        };
        assert!(!coded("chunked") && !coded("Chunked"));
        // Empty list items are none (RFC 9110 §5.6.1), as the parser reads them.
        assert!(!coded("chunked,") && !coded(", chunked"));
        assert!(coded("gzip, chunked") && coded("gzip"));
        assert!(!coded_beyond_chunked(&sized));
    }

    #[test]
    fn backend_connections_are_pooled_only_when_clean() {
        let keep = req("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let old = req("GET / HTTP/1.0\r\nHost: x\r\n\r\n");
        let sized = resp("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "GET");
        let close = resp(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
            "GET",
        );
        let until_close = resp("HTTP/1.1 200 OK\r\n\r\n", "GET");
        assert!(reusable(&keep, &sized, 0));
        assert!(!reusable(&keep, &sized, 3), "bytes past the response");
        assert!(!reusable(&keep, &close, 0));
        assert!(!reusable(&keep, &until_close, 0));
        assert!(!reusable(&old, &sized, 0));
        // A bodiless status that declares a body may send it anyway, after
        // the pool's check: not reused (RFC 9112 §6.3 (1)). A 304's
        // Content-Length is the resource's, and a HEAD's is the GET's.
        let pooled = |text: &str, method: &str| reusable(&keep, &resp(text, method), 0);
        assert!(!pooled(
            "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET"
        ));
        assert!(!pooled(
            "HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\n",
            "GET"
        ));
        assert!(!pooled(
            "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET"
        ));
        assert!(pooled(
            "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            "GET"
        ));
        assert!(pooled(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 6\r\n\r\n",
            "GET"
        ));
        assert!(pooled(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HEAD"
        ));
        // An HTTP/1.0 response with a transfer coding has faulty framing
        // (§6.1); `close` wins wherever it stands (§9.6).
        assert!(!pooled("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "GET"));
        assert!(pooled(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n",
            "GET"
        ));
        assert!(!pooled(
            "HTTP/1.0 200 OK\r\nConnection: close, keep-alive\r\nContent-Length: 2\r\n\r\n",
            "GET"
        ));
        assert!(!pooled(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\n",
            "GET"
        ));
        // The same for a client's request.
        assert!(
            !req("GET / HTTP/1.0\r\nHost: x\r\nConnection: close, keep-alive\r\n\r\n").keep_alive
        );
        assert!(req("GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(
            !req("GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n").keep_alive
        );
    }

    #[test]
    fn paths_and_hosts() {
        assert_eq!(target_path("/a/b?c"), "/a/b?c");
        assert_eq!(target_path("*"), "/");
        assert_eq!(strip_port("a.example:8443"), "a.example");
        assert_eq!(strip_port("a.example"), "a.example");
        assert_eq!(strip_port("[::1]:443"), "[::1]");
        assert_eq!(route_host("a.example.:8443"), "a.example");
        assert_eq!(route_host("a.example."), "a.example");
        assert_eq!(route_host("a.example"), "a.example");
        assert_eq!(route_host("a.example.."), "a.example.");
        assert_eq!(route_host("[::1]:443"), "[::1]");
    }
}
