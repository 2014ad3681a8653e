//! Sans-IO translation between an HTTP/2 stream's messages and the
//! HTTP/1.1 heads the shared exchange core and the backends read.
//!
//! A request is restated as the HTTP/1.1 head it stands for and parsed by
//! the same parser as a client's HTTP/1.1 head, so routing, the forwarding
//! fields, the retry rule and the framing checks are the ones HTTP/1.1
//! requests get, and nothing reaches a backend that an HTTP/1.1 client
//! could not have sent.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::proxy::http::body::Framing;
use crate::proxy::http::exchange;
use crate::proxy::http::head::{self, Limits, RequestHead, ResponseHead};
use crate::proxy::http::rewrite;

/// Why a stream's request is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed (RFC 9113 §8.1.1): the stream is reset with
    /// PROTOCOL_ERROR.
    Malformed(&'static str),
    /// Well-formed, but answered by ktern with this status.
    Status(u16, &'static str),
}

/// Fields that are connection-specific in HTTP/2 (RFC 9113 §8.2.2); h2
/// already refuses them, checked again here before anything is restated.
const CONNECTION_SPECIFIC: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
];

/// Whether `parts` opens a WebSocket: an extended CONNECT (RFC 8441 §4)
/// whose `:protocol` is `websocket`. Its HTTP/1.1 restatement needs a
/// `Sec-WebSocket-Key` ([`websocket_key`]), which HTTP/2 clients do not
/// send (RFC 8441 §5: the key and accept handshake is HTTP/1.1's).
pub fn is_websocket(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::CONNECT
        && parts
            .extensions
            .get::<h2::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// A `Sec-WebSocket-Key` from 16 random bytes (RFC 6455 §4.1: a nonce,
/// base64-encoded).
pub fn websocket_key(nonce: &[u8; 16]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

/// The HTTP/1.1 head `parts` stands for. `end_stream`: the request has no
/// body (its HEADERS frame ended the stream). `ws_key`: the
/// `Sec-WebSocket-Key` for a WebSocket's extended CONNECT
/// ([`is_websocket`]), which becomes the `GET` with `Upgrade: websocket`
/// that an HTTP/1.1 backend expects (RFC 8441 §5); `None` refuses one.
pub fn request_head(
    parts: &http::request::Parts,
    end_stream: bool,
    limits: &Limits,
    ws_key: Option<&str>,
) -> Result<RequestHead, Refusal> {
    let websocket = match (parts.method == http::Method::CONNECT, ws_key) {
        (true, Some(key)) if is_websocket(parts) => Some(key),
        (true, _) if parts.extensions.get::<h2::ext::Protocol>().is_some() => {
            // h2 takes `:protocol` only once ktern offered extended
            // CONNECT; a protocol other than WebSocket has no HTTP/1.1
            // upgrade to restate it as.
            return Err(Refusal::Status(
                501,
                "extended CONNECT for another protocol",
            ));
        }
        // A plain CONNECT asks for a tunnel ktern does not open.
        (true, _) => return Err(Refusal::Status(405, "CONNECT over HTTP/2")),
        (false, _) => None,
    };
    let authority = match parts.uri.authority() {
        // RFC 9113 §8.3.1: a Host naming another host than :authority makes
        // the request malformed (a server SHOULD say so): routing and the
        // backend read :authority, and a Host that was dropped in silence
        // left a log or an intermediary reading the other.
        Some(a) => {
            // Compared in place, no lowercase copy per request (most
            // clients send no Host beside :authority).
            let authority = exchange::strip_port(a.as_str());
            for host in parts.headers.get_all(http::header::HOST) {
                let host = host
                    .to_str()
                    .map_err(|_| Refusal::Malformed("host is not text"))?;
                if !exchange::strip_port(host).eq_ignore_ascii_case(authority) {
                    return Err(Refusal::Malformed("host differs from :authority"));
                }
            }
            a.as_str()
        }
        // RFC 9113 §8.3.1: without :authority, Host carries it.
        None => {
            let mut hosts = parts.headers.get_all(http::header::HOST).iter();
            match (hosts.next(), hosts.next()) {
                (Some(h), None) => h
                    .to_str()
                    .map_err(|_| Refusal::Malformed("host is not text"))?,
                // Two would name two hosts; HTTP/1.1's head is refused
                // alike (400).
                (Some(_), Some(_)) => return Err(Refusal::Malformed("more than one host")),
                (None, _) => return Err(Refusal::Malformed("no :authority and no host")),
            }
        }
    };
    // RFC 9113 §8.3.1: no userinfo in an https authority (`evil@api.example`
    // would route as api.example's and reach the backend as another
    // host); HTTP/1.1's absolute form refuses it likewise (head.rs).
    if authority.contains('@') {
        return Err(Refusal::Malformed("userinfo in :authority"));
    }
    let target = match parts.uri.path_and_query() {
        Some(p) => p.as_str(),
        // RFC 8441 §4: an extended CONNECT carries `:path`.
        None if websocket.is_some() => {
            return Err(Refusal::Malformed("extended CONNECT without :path"))
        }
        // RFC 9113 §8.3.1: every request but CONNECT carries `:path`. (h2
        // refuses one with `:authority` and no `:path`; with neither, the
        // `http` crate's empty URI reads as `/`, which cannot be told
        // from a `:path` of `/` here.)
        None => return Err(Refusal::Malformed("no :path")),
    };
    let method = match websocket {
        Some(_) => "GET",
        None => parts.method.as_str(),
    };
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(key) = websocket {
        out.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\n");
        rewrite::push_field(&mut out, "sec-websocket-key", key.as_bytes());
    }
    let mut cookies: Vec<&[u8]> = Vec::new();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if CONNECTION_SPECIFIC.contains(&n) || (n == "te" && value != "trailers") {
            return Err(Refusal::Malformed("connection-specific field"));
        }
        match n {
            "host" => continue,
            // The key is ktern's own (above); an HTTP/2 client has none to
            // send (RFC 8441 §5).
            "sec-websocket-key" | "sec-websocket-accept" if websocket.is_some() => continue,
            // A CONNECT has no content (RFC 9110 §9.3.6): a length would
            // go upstream on the GET with no body behind it, and a backend
            // that refused the upgrade would read the pooled connection's
            // next request as that body.
            "content-length" if websocket.is_some() => {
                return Err(Refusal::Malformed("content-length on an extended CONNECT"));
            }
            // HTTP/2 may split cookies into several fields; HTTP/1.1 has
            // one (RFC 9113 §8.2.3).
            "cookie" => {
                cookies.push(value.as_bytes());
                continue;
            }
            // `te: trailers` means nothing to an HTTP/1.1 backend that is
            // not hop-by-hop.
            "te" => continue,
            _ => {}
        }
        rewrite::push_field(&mut out, n, value.as_bytes());
    }
    if !cookies.is_empty() {
        out.extend_from_slice(b"cookie: ");
        for (i, c) in cookies.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(c);
        }
        out.extend_from_slice(b"\r\n");
    }
    // A body of unknown length goes upstream chunked. A WebSocket's stream
    // carries the new protocol's bytes after the 101, not a body.
    if !end_stream
        && websocket.is_none()
        && !parts.headers.contains_key(http::header::CONTENT_LENGTH)
    {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    match head::parse_request_owned(out, limits) {
        Ok(Some(h)) => Ok(h),
        Ok(None) => Err(Refusal::Malformed("incomplete head")),
        Err(e) if e.status() == 400 => Err(Refusal::Malformed("invalid field")),
        Err(e) => Err(Refusal::Status(e.status(), "request head over limits")),
    }
}

/// The HTTP/2 response for a backend's response head: its status and its
/// end-to-end fields (hop-by-hop ones and those its `Connection` names
/// are dropped, RFC 9113 §8.2.2), plus `extra`.
pub fn response(resp: &ResponseHead, extra: &[(&str, &[u8])]) -> http::Response<()> {
    let options = rewrite::connection_options(&resp.fields);
    let mut headers = HeaderMap::with_capacity(resp.fields.iter().count() + extra.len());
    // Values are slices of the backend's head, shared: no copy each.
    let fields = resp.fields.shared();
    let extra = extra
        .iter()
        .map(|&(n, v)| (n.as_bytes(), Bytes::copy_from_slice(v)));
    let mut length_sent = false;
    for (name, mut value) in fields.chain(extra) {
        if rewrite::is_hop_by_hop(name, &options) {
            continue;
        }
        // One content-length, of one value (RFC 9113 §8.1.1): the head's
        // parser let through identical repeats (`5, 5`, or the field
        // twice), which HTTP/2 clients refuse.
        if name.eq_ignore_ascii_case(b"content-length") {
            if std::mem::replace(&mut length_sent, true) {
                continue;
            }
            let first = value.split(|&b| b == b',').next().unwrap_or_default();
            let one = value.slice_ref(first.trim_ascii());
            value = one;
        }
        // A backend field that is not a valid HTTP/2 field (the parser
        // let through what HTTP/1.1 allows) is dropped rather than sent
        // malformed.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_maybe_shared(value),
        ) {
            headers.append(n, v);
        }
    }
    let mut r = http::Response::new(());
    *r.status_mut() =
        http::StatusCode::from_u16(resp.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    *r.headers_mut() = headers;
    r
}

/// Why a backend's answer to a WebSocket's upgrade (ktern's `key`) cannot
/// go to the HTTP/2 client, if it cannot: a 101 that does not switch to
/// the WebSocket ktern asked for ([`exchange::switch_refusal`]: ktern is
/// the backend's client here, and RFC 6455 §4.1 has a client fail such a
/// connection), or a 2xx without a switch, which would tell the client
/// its tunnel is open (RFC 8441 §5). Any other answer (a refusal) is
/// relayed as it is.
pub fn websocket_refusal(resp: &ResponseHead, key: &str) -> Option<&'static str> {
    match resp.status {
        101 => exchange::switch_refusal(resp, |t| t.eq_ignore_ascii_case("websocket"), Some(key)),
        200..=299 => Some("a 2xx to a WebSocket upgrade, without switching"),
        _ => None,
    }
}

/// The HTTP/2 response for a backend's `101` to a WebSocket's extended
/// CONNECT: `200` (RFC 8441 §5), with the backend's end-to-end fields
/// (`Sec-WebSocket-Protocol`, `-Extensions`) but not its
/// `Sec-WebSocket-Accept`, which answered ktern's key, not the client's,
/// nor a `Content-Length` (none in a 2xx to CONNECT, RFC 9110 §8.6; an
/// h2 client would hold the tunnel's bytes to it).
pub fn websocket_response(resp: &ResponseHead, extra: &[(&str, &[u8])]) -> http::Response<()> {
    let mut r = response(resp, extra);
    *r.status_mut() = http::StatusCode::OK;
    let h = r.headers_mut();
    h.remove("sec-websocket-accept");
    h.remove(http::header::CONTENT_LENGTH);
    r
}

/// Whether an HTTP/1.1 trailer section (as the body decoder keeps it)
/// holds any field: more than its final CRLF.
pub fn has_trailers(section: &[u8]) -> bool {
    section.len() > 2
}

/// A chunked body's trailer section (as `body::Decoded` keeps it) as
/// HTTP/2 trailers; `None` when there are none or they do not parse.
pub fn trailers_from_h1(section: &[u8]) -> Option<HeaderMap> {
    if !has_trailers(section) {
        return None;
    }
    let mut raw = [httparse::EMPTY_HEADER; 32];
    let httparse::Status::Complete((_, fields)) =
        httparse::parse_headers(section, &mut raw).ok()?
    else {
        return None;
    };
    let mut map = HeaderMap::new();
    for f in fields {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_bytes(f.value),
        ) {
            if rewrite::trailer_allowed(n.as_str().as_bytes()) {
                map.append(n, v);
            }
        }
    }
    (!map.is_empty()).then_some(map)
}

/// A stream's trailers as the end of a chunked HTTP/1.1 body: the last
/// chunk, the allowed trailer fields, the final CRLF. Forwarding and
/// client-certificate fields never come from a client's trailers: the
/// head's are dropped or replaced (rewrite.rs), and a backend that merges
/// trailers into its headers would otherwise read the client's word.
pub fn last_chunk(trailers: Option<&HeaderMap>) -> Vec<u8> {
    let mut out = b"0\r\n".to_vec();
    for (name, value) in trailers.into_iter().flatten() {
        if rewrite::client_trailer_allowed(name.as_str().as_bytes()) {
            rewrite::push_field(&mut out, name.as_str(), value.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// How the request body goes upstream.
pub fn upstream_chunked(head: &RequestHead) -> bool {
    head.framing == Framing::Chunked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn a_request_becomes_the_http11_head_it_stands_for() {
        let req = http::Request::builder()
            .method("POST")
            .uri("https://App.example:8443/a/b?q=1")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("te", "trailers")
            .header("x-id", "7")
            .body(())
            .unwrap();
        let h = request_head(&parts(req), false, &Limits::default(), None).unwrap();
        assert_eq!(h.method(), "POST");
        assert_eq!(h.target(), "/a/b?q=1");
        assert_eq!(h.host(), Some("app.example:8443"));
        assert_eq!(h.framing, Framing::Chunked);
        assert_eq!(
            h.values("cookie").collect::<Vec<_>>(),
            vec![&b"a=1; b=2"[..]]
        );
        assert_eq!(h.values("te").count(), 0);
        assert_eq!(h.values("x-id").next(), Some(&b"7"[..]));
        assert!(h.keep_alive);
    }

    #[test]
    fn a_declared_length_or_an_ended_stream_frames_the_body() {
        let req = http::Request::builder()
            .method("PUT")
            .uri("https://a/")
            .header("content-length", "5")
            .body(())
            .unwrap();
        let h = request_head(&parts(req), false, &Limits::default(), None).unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        let req = http::Request::get("https://a/").body(()).unwrap();
        let h = request_head(&parts(req), true, &Limits::default(), None).unwrap();
        assert_eq!(h.framing, Framing::Length(0));
    }

    #[test]
    fn refusals() {
        let with = |name: &str, value: &str| {
            let req = http::Request::get("https://a/")
                .header(name, value)
                .body(())
                .unwrap();
            request_head(&parts(req), true, &Limits::default(), None)
        };
        for (n, v) in [
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("keep-alive", "5"),
            // Framing fields spelled with `_` (head.rs's check, after the
            // HTTP/1.1 head is made).
            ("transfer_encoding", "chunked"),
            ("content_length", "5"),
        ] {
            assert!(matches!(with(n, v), Err(Refusal::Malformed(_))), "{n}");
        }
        // Two content-lengths that disagree: the HTTP/1.1 parser's check.
        let req = http::Request::post("https://a/")
            .header("content-length", "1")
            .header("content-length", "2")
            .body(())
            .unwrap();
        assert!(matches!(
            request_head(&parts(req), false, &Limits::default(), None),
            Err(Refusal::Malformed(_))
        ));
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("a:443")
            .body(())
            .unwrap();
        assert_eq!(
            request_head(&parts(req), true, &Limits::default(), None).err(),
            Some(Refusal::Status(405, "CONNECT over HTTP/2"))
        );
        let req = http::Request::get("/x").body(()).unwrap();
        assert!(matches!(
            request_head(&parts(req), true, &Limits::default(), None),
            Err(Refusal::Malformed("no :authority and no host"))
        ));
        let req = http::Request::get("/x")
            .header("host", "a.example")
            .header("host", "b.example")
            .body(())
            .unwrap();
        assert_eq!(
            request_head(&parts(req), true, &Limits::default(), None).err(),
            Some(Refusal::Malformed("more than one host"))
        );
        // A Host beside :authority must name the same host (its port and
        // case aside), or the request is malformed (RFC 9113 §8.3.1).
        let with_host = |host: &str| {
            let req = http::Request::get("https://a.example/x")
                .header("host", host)
                .body(())
                .unwrap();
            request_head(&parts(req), true, &Limits::default(), None).err()
        };
        assert_eq!(with_host("A.example:443"), None);
        assert_eq!(
            with_host("b.example"),
            Some(Refusal::Malformed("host differs from :authority"))
        );
        // A URI with no path: refused, not sent as `/`.
        let req = http::Request::get("a.example").body(()).unwrap();
        assert_eq!(req.uri().path_and_query(), None);
        assert_eq!(
            request_head(&parts(req), true, &Limits::default(), None).err(),
            Some(Refusal::Malformed("no :path"))
        );
        // RFC 9113 §8.3.1: no userinfo, in :authority or in Host.
        let req = http::Request::get("https://evil@a.example/x")
            .body(())
            .unwrap();
        assert_eq!(
            request_head(&parts(req), true, &Limits::default(), None).err(),
            Some(Refusal::Malformed("userinfo in :authority"))
        );
        let req = http::Request::get("/x")
            .header("host", "evil@a.example")
            .body(())
            .unwrap();
        assert_eq!(
            request_head(&parts(req), true, &Limits::default(), None).err(),
            Some(Refusal::Malformed("userinfo in :authority"))
        );
    }

    fn extended_connect(protocol: &'static str) -> http::request::Parts {
        let mut req = http::Request::builder()
            .method("CONNECT")
            .uri("https://a.example/chat?room=1")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "chat")
            // Not an HTTP/2 client's to send (RFC 8441 §5): replaced.
            .header("sec-websocket-key", "theirs")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static(protocol));
        parts(req)
    }

    #[test]
    fn the_websocket_key_and_accept_are_rfc_6455s() {
        // RFC 6455 §1.3's example.
        assert_eq!(
            exchange::websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        // The sample nonce of RFC 6455 §4.1 is "the sample nonce".
        assert_eq!(
            websocket_key(b"the sample nonce"),
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
    }

    #[test]
    fn a_websocket_connect_becomes_an_http11_upgrade() {
        let p = extended_connect("websocket");
        assert!(is_websocket(&p));
        let h = request_head(
            &p,
            false,
            &Limits::default(),
            Some("a2V5a2V5a2V5a2V5a2V5aw=="),
        )
        .unwrap();
        assert_eq!(h.method(), "GET");
        assert_eq!(h.target(), "/chat?room=1");
        assert_eq!(h.host(), Some("a.example"));
        assert!(h.upgrade);
        // No body precedes the 101: nothing is framed as one.
        assert_eq!(h.framing, Framing::Length(0));
        let one = |n| h.values(n).collect::<Vec<_>>();
        assert_eq!(
            one("sec-websocket-key"),
            vec![&b"a2V5a2V5a2V5a2V5a2V5aw=="[..]]
        );
        assert_eq!(one("upgrade"), vec![&b"websocket"[..]]);
        assert_eq!(one("sec-websocket-version"), vec![&b"13"[..]]);
        assert_eq!(one("sec-websocket-protocol"), vec![&b"chat"[..]]);
        // A length on a CONNECT announces content that never comes.
        let mut with_length = extended_connect("websocket");
        with_length
            .headers
            .insert("content-length", http::HeaderValue::from_static("5"));
        assert_eq!(
            request_head(&with_length, false, &Limits::default(), Some("k")).err(),
            Some(Refusal::Malformed("content-length on an extended CONNECT"))
        );
        // Without a key (the route does not offer it: h2 refuses the
        // stream before ktern sees it), refused all the same.
        assert_eq!(
            request_head(&p, false, &Limits::default(), None).err(),
            Some(Refusal::Status(
                501,
                "extended CONNECT for another protocol"
            ))
        );
        // Another protocol has no HTTP/1.1 upgrade to become.
        let p = extended_connect("connect-udp");
        assert!(!is_websocket(&p));
        assert_eq!(
            request_head(&p, false, &Limits::default(), Some("k")).err(),
            Some(Refusal::Status(
                501,
                "extended CONNECT for another protocol"
            ))
        );
    }

    #[test]
    fn a_websocket_upgrade_is_answered_by_the_accept_for_its_key_or_refused() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let answer = |text: &str| {
            let resp = head::parse_response(text.as_bytes(), "GET", 1 << 16)
                .unwrap()
                .unwrap();
            websocket_refusal(&resp, key)
        };
        let switch =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
        // RFC 6455 §1.3's accept for that key.
        assert_eq!(
            answer(&format!(
                "{switch}Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
            )),
            None
        );
        for wrong in ["", "Sec-WebSocket-Accept: x\r\n", "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"] {
            assert_eq!(
                answer(&format!("{switch}{wrong}\r\n")),
                Some("101 without the Sec-WebSocket-Accept for the client's key"),
                "{wrong}"
            );
        }
        // A 101 to another protocol, or naming none.
        let accept = "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n";
        assert_eq!(
            answer(&format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n{accept}\r\n"
            )),
            Some("101 to a protocol the client did not ask for")
        );
        assert_eq!(
            answer(&format!("HTTP/1.1 101 Switching Protocols\r\n{accept}\r\n")),
            Some("101 without Upgrade")
        );
        assert_eq!(
            answer("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Some("a 2xx to a WebSocket upgrade, without switching")
        );
        assert_eq!(
            answer("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"),
            None
        );
    }

    #[test]
    fn a_websockets_101_becomes_200_without_the_accept() {
        let text = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\nContent-Length: 0\r\nSec-WebSocket-Protocol: chat\r\n\r\n";
        let resp = head::parse_response(text.as_bytes(), "GET", 1 << 16)
            .unwrap()
            .unwrap();
        let r = websocket_response(&resp, &[]);
        assert_eq!(r.status(), 200);
        let names: Vec<_> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["sec-websocket-protocol"]);
    }

    #[test]
    fn responses_lose_hop_by_hop_fields() {
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTransfer-Encoding: chunked\r\nX-End: 2\r\n\r\n";
        let resp = head::parse_response(text.as_bytes(), "GET", 1 << 16)
            .unwrap()
            .unwrap();
        let r = response(&resp, &[("strict-transport-security", b"max-age=1")]);
        assert_eq!(r.status(), 200);
        let names: Vec<_> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-end", "strict-transport-security"]);
    }

    #[test]
    fn a_repeated_content_length_goes_out_once() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length:  5 \r\n\r\n",
        ] {
            let resp = head::parse_response(text.as_bytes(), "GET", 1 << 16)
                .unwrap()
                .unwrap();
            let r = response(&resp, &[]);
            let lengths: Vec<_> = r.headers().get_all("content-length").iter().collect();
            assert_eq!(lengths, vec!["5"], "{text:?}");
        }
    }

    #[test]
    fn client_trailers_cannot_speak_for_ktern() {
        let mut map = HeaderMap::new();
        map.insert("x-sum", HeaderValue::from_static("7"));
        map.insert("x-client-cert-verify", HeaderValue::from_static("SUCCESS"));
        map.insert("x-forwarded-for", HeaderValue::from_static("127.0.0.1"));
        map.insert("forwarded", HeaderValue::from_static("for=127.0.0.1"));
        map.insert("x-real-ip", HeaderValue::from_static("127.0.0.1"));
        assert_eq!(last_chunk(Some(&map)), b"0\r\nx-sum: 7\r\n\r\n");
    }

    #[test]
    fn trailers_both_ways() {
        let map = trailers_from_h1(b"x-sum: 7\r\ncontent-length: 3\r\n\r\n").unwrap();
        assert_eq!(map.len(), 1);
        assert_eq!(map["x-sum"], "7");
        assert!(trailers_from_h1(b"\r\n").is_none());
        assert_eq!(last_chunk(Some(&map)), b"0\r\nx-sum: 7\r\n\r\n");
        assert_eq!(last_chunk(None), b"0\r\n\r\n");
    }
}
