//! Sans-IO head rewriting for forwarding: hop-by-hop fields removed (RFC
//! 9110 §7.6.1), forwarding information added (X-Forwarded-*, RFC 7239
//! `Forwarded`), framing re-stated for the next hop.

use std::net::{IpAddr, SocketAddr};

use super::body::Framing;
use super::head::{list_tokens, Fields, Persist, RequestHead, ResponseHead};
use crate::handshake::client_auth::ClientIdentity;
use crate::handshake::TlsInfo;

/// Fields that describe one connection, never forwarded (RFC 9110 §7.6.1,
/// plus the non-standard Proxy-Connection and Keep-Alive). Expect too:
/// ktern answers 100-continue itself on this hop and streams the body
/// as it arrives (RFC 9110 §10.1.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// Forwarding fields a client could forge; dropped unless it is trusted.
/// Beside the ones ktern writes, those that backends' proxy filters read
/// to rebuild the client's address or URLs (Spring's
/// `ForwardedHeaderFilter`, Werkzeug's `ProxyFix`, nginx's `real_ip`):
/// from an untrusted client they would be the client's own word.
const FORWARDING: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-real-ip",
    "forwarded",
];

/// The prefix of the client-certificate fields ktern adds: any field of
/// a client's that starts with it is dropped, always, so a backend that
/// trusts them never reads a forged one.
const CLIENT_CERT_PREFIX: &str = "x-client-cert-";

/// What to say about the client when forwarding.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The client's address.
    pub client: SocketAddr,
    /// The client is a trusted proxy: keep (and extend) its forwarding fields.
    pub trusted: bool,
    /// Add `X-Forwarded-For`, `-Proto`, `-Host`.
    pub x_forwarded: bool,
    /// Add RFC 7239 `Forwarded`.
    pub forwarded: bool,
    /// The client certificate facts, where the listener asks for one:
    /// `X-Client-Cert-Verify` (and the identity's fields when verified).
    pub client_cert: Option<(&'static str, Option<&'a ClientIdentity>)>,
}

impl<'a> Forwarding<'a> {
    /// The forwarding facts for a request from `client` on `route`, over
    /// the TLS connection `tls`.
    pub fn for_client(
        route: &crate::config::HttpRoute,
        client: SocketAddr,
        tls: &'a TlsInfo,
    ) -> Forwarding<'a> {
        Forwarding {
            client,
            trusted: route.trusted_proxies.contains(&client.ip().to_canonical()),
            x_forwarded: route.x_forwarded,
            forwarded: route.forwarded,
            client_cert: tls
                .client_verify()
                .map(|verify| (verify, tls.client.as_deref())),
        }
    }
}

/// True for a field that speaks for ktern or a trusted proxy: a
/// forwarding field or `X-Client-Cert-*`.
pub(crate) fn asserts_for_ktern(name: &[u8]) -> bool {
    is_client_cert_field(name) || is_forwarding_field(name)
}

/// A client's trailer section (field lines then the final CRLF, as
/// `body::Decoded` keeps it) as it goes to the backend: only lines that
/// are fields, and none that frames, routes or describes the message
/// (RFC 9110 §6.5.1: content-length, host, te, trailer, content-encoding,
/// content-type, the hop-by-hop ones), or that speaks for ktern or a
/// trusted proxy ([`asserts_for_ktern`]): a backend that merges trailers
/// into its headers would otherwise read the client's word, which the
/// head's fields cannot carry. HTTP/2 clients' trailers pass the same
/// rule (`h2::convert::last_chunk`).
pub(crate) fn client_trailers(section: &[u8]) -> Vec<u8> {
    kept_trailers(section, client_trailer_allowed)
}

/// A backend's trailer section as it goes to an HTTP/1.1 client: the
/// fields [`trailer_allowed`] lets through, as for HTTP/2 clients. A
/// `Content-Length` or `Transfer-Encoding` there means nothing to the
/// client and a cache or proxy after ktern may read it differently.
pub(crate) fn backend_trailers(section: &[u8]) -> Vec<u8> {
    kept_trailers(section, trailer_allowed)
}

/// The field lines of `section` whose names are tokens that `allowed`
/// takes, then the final CRLF.
fn kept_trailers(section: &[u8], allowed: fn(&[u8]) -> bool) -> Vec<u8> {
    let mut out = Vec::new();
    for line in section.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let token = !name.is_empty()
            && name
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token || !allowed(name) {
            continue;
        }
        push_field(&mut out, name, value.trim_ascii());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Whether a field may travel as a trailer (RFC 9110 §6.5.1): none that
/// frames, routes or describes the message, and no hop-by-hop one (which
/// covers HTTP/2's connection-specific fields). Clients' trailers of both
/// protocols pass this rule, and a backend's to clients of both (an
/// HTTP/1.1 client gets the rest of a chunked body as the backend framed
/// it).
pub(crate) fn trailer_allowed(name: &[u8]) -> bool {
    const BARRED: &[&str] = &[
        "content-length",
        "host",
        "trailer",
        "content-encoding",
        "content-type",
    ];
    !BARRED
        .iter()
        .chain(HOP_BY_HOP)
        .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

/// [`trailer_allowed`] for a client's trailers, which also may not speak
/// for ktern ([`asserts_for_ktern`]).
pub(crate) fn client_trailer_allowed(name: &[u8]) -> bool {
    trailer_allowed(name) && !asserts_for_ktern(name)
}

/// True for a field named `X-Client-Cert-*`.
fn is_client_cert_field(name: &[u8]) -> bool {
    name.len() >= CLIENT_CERT_PREFIX.len()
        && same_name(&name[..CLIENT_CERT_PREFIX.len()], CLIENT_CERT_PREFIX)
}

/// `name` is `wanted` (lower case, with `-`), ignoring case and taking `_`
/// for `-`: backends that map fields to CGI-style names (`HTTP_X_REAL_IP`:
/// WSGI and Rack servers) read `X_Real_IP` as `X-Real-IP`, so a field that
/// must not come from a client must not in either spelling (nginx drops
/// names with `_` by default for this reason).
fn same_name(name: &[u8], wanted: &str) -> bool {
    name.len() == wanted.len()
        && name
            .iter()
            .zip(wanted.bytes())
            .all(|(&a, b)| a.to_ascii_lowercase() == b || (a == b'_' && b == b'-'))
}

/// True for one of [`FORWARDING`], in either spelling ([`same_name`]).
fn is_forwarding_field(name: &[u8]) -> bool {
    FORWARDING.iter().any(|h| same_name(name, h))
}

/// True if `name` must not be forwarded, given the `Connection` options.
pub(crate) fn is_hop_by_hop(name: &[u8], connection_options: &[&str]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        || connection_options
            .iter()
            .any(|o| name.eq_ignore_ascii_case(o.as_bytes()))
}

/// Fields a `Connection` option cannot remove. RFC 9110 §7.6.1 has a
/// proxy drop the fields its Connection lists, but dropping Content-Length
/// would send the body on unframed, to be read as the next message
/// (smuggling), and dropping Host would change the request's authority.
/// Transfer-Encoding is re-stated from the framing anyway.
const NOT_OPTIONS: &[&str] = &["content-length", "host", "transfer-encoding"];

/// The `Connection` options, borrowed (compared case-insensitively).
pub(crate) fn connection_options(fields: &Fields) -> Vec<&str> {
    fields
        .values("connection")
        .flat_map(list_tokens)
        .filter(|o| !NOT_OPTIONS.iter().any(|n| o.eq_ignore_ascii_case(n)))
        .collect()
}

pub(crate) fn push_field(out: &mut Vec<u8>, name: impl AsRef<[u8]>, value: &[u8]) {
    out.extend_from_slice(name.as_ref());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `ip` in its usual text form. IPv4, the common case, without
/// `fmt` (which showed at about 1% of a proxied request's CPU).
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends `v` as a Forwarded value: as is if it is an RFC 9110 token,
/// else as a quoted-string with `\` and `"` escaped (RFC 7239 §4).
fn push_forwarded_value(out: &mut Vec<u8>, v: &str) {
    // tchar (RFC 9110 §5.6.2), as a match: `contains` on the set was a
    // byte-loop memchr per byte of the value (a Host of "a.b:443"), 0.6%
    // of a proxied HTTP/2 request's user instructions.
    let tchar = |b: u8| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            )
    };
    let token = !v.is_empty() && v.bytes().all(tchar);
    if token {
        out.extend_from_slice(v.as_bytes());
        return;
    }
    out.push(b'"');
    for b in v.bytes() {
        if b == b'\\' || b == b'"' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// Writes the request head to send upstream: HTTP/1.1 (keep-alive), or
/// HTTP/1.0 for an HTTP/1.0 client, so the backend never answers it with
/// a transfer coding the client could not read (RFC 9112 §6.1).
pub fn request(head: &RequestHead, fwd: &Forwarding, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target_bytes());
    out.extend_from_slice(if head.minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let options = connection_options(&head.fields);
    let mut prior_xff: Vec<&[u8]> = Vec::new();
    let mut prior_forwarded: Vec<&[u8]> = Vec::new();
    let mut length_sent = false;
    for f in head.fields.iter() {
        if is_hop_by_hop(f.name, &options) {
            continue;
        }
        if content_length_once(f.name, f.value, &mut length_sent, out) {
            continue;
        }
        if is_client_cert_field(f.name) {
            continue;
        }
        if is_forwarding_field(f.name) {
            if fwd.trusted {
                if f.name.eq_ignore_ascii_case(b"x-forwarded-for") && fwd.x_forwarded {
                    prior_xff.push(f.value);
                    continue;
                }
                if f.name.eq_ignore_ascii_case(b"forwarded") && fwd.forwarded {
                    prior_forwarded.push(f.value);
                    continue;
                }
                push_field(out, f.name, f.value);
            }
            continue;
        }
        push_field(out, f.name, f.value);
    }
    if head.host_bytes().is_none() {
        // Upstream requests always carry Host (HTTP/1.1 requires it); an
        // HTTP/1.0 request without one has no authority, so it is empty
        // (RFC 9112 §3.2).
        push_field(out, "Host", b"");
    }
    if head.framing == Framing::Chunked {
        push_field(out, "Transfer-Encoding", b"chunked");
    }
    if head.upgrade {
        for value in head.fields.values("upgrade") {
            push_field(out, "Upgrade", value);
        }
        push_field(out, "Connection", b"upgrade");
    }
    // Written straight into `out`: no per-request strings for the
    // address (this runs once per proxied request).
    let ip = fwd.client.ip().to_canonical();
    if fwd.x_forwarded {
        out.extend_from_slice(b"X-Forwarded-For: ");
        for prior in &prior_xff {
            out.extend_from_slice(prior);
            out.extend_from_slice(b", ");
        }
        push_ip(out, ip);
        out.extend_from_slice(b"\r\n");
        push_field(out, "X-Forwarded-Proto", b"https");
        if let Some(host) = head.host_bytes() {
            push_field(out, "X-Forwarded-Host", host);
        }
    }
    if fwd.forwarded {
        out.extend_from_slice(b"Forwarded: ");
        for prior in &prior_forwarded {
            out.extend_from_slice(prior);
            out.extend_from_slice(b", ");
        }
        // RFC 7239 §6: IPv6 nodes in brackets, quoted.
        if ip.is_ipv4() {
            out.extend_from_slice(b"for=");
            push_ip(out, ip);
        } else {
            out.extend_from_slice(b"for=\"[");
            push_ip(out, ip);
            out.extend_from_slice(b"]\"");
        }
        out.extend_from_slice(b";proto=https");
        if let Some(host) = head.host() {
            out.extend_from_slice(b";host=");
            push_forwarded_value(out, host);
        }
        out.extend_from_slice(b"\r\n");
    }
    if let Some((verify, identity)) = fwd.client_cert {
        push_field(out, "X-Client-Cert-Verify", verify.as_bytes());
        if let Some(id) = identity {
            push_field(out, "X-Client-Cert-Subject", id.subject.as_bytes());
            if !id.sans.is_empty() {
                push_field(out, "X-Client-Cert-SAN", id.sans.as_bytes());
            }
            push_field(out, "X-Client-Cert-Fingerprint", id.fingerprint.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Handles a Content-Length field: the first one goes on as its first
/// member alone, the rest are dropped (returns true for any Content-Length
/// field). The parser has refused a message whose members differ, so this
/// is RFC 9110 §8.6's "forward one value when all are equal": a list such as
/// `2, 2`, or the field repeated, never reaches the other side, which might
/// read it differently.
fn content_length_once(name: &[u8], value: &[u8], sent: &mut bool, out: &mut Vec<u8>) -> bool {
    if !name.eq_ignore_ascii_case(b"content-length") {
        return false;
    }
    if !*sent {
        let first = value.split(|&b| b == b',').next().unwrap_or_default();
        push_field(out, "Content-Length", first.trim_ascii());
        *sent = true;
    }
    true
}

/// Writes the response head to send to the client. `persist` says whether
/// ktern will close the client connection after this response, and what
/// the client must be told about it.
pub fn response(head: &ResponseHead, persist: Persist, extra: &[(&str, &[u8])], out: &mut Vec<u8>) {
    // httparse accepts exactly three status digits.
    let s = head.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (s / 100 % 10) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(head.reason().as_bytes());
    out.extend_from_slice(b"\r\n");
    let options = connection_options(&head.fields);
    let switching = head.status == 101;
    let mut length_sent = false;
    for f in head.fields.iter() {
        // A 101 keeps Upgrade (and gets its own Connection below).
        if switching && f.name.eq_ignore_ascii_case(b"upgrade") {
            push_field(out, f.name, f.value);
            continue;
        }
        // The body is relayed byte for byte, so the backend's transfer
        // codings still describe it: `gzip, chunked` stays that, and gzip
        // without chunked (read until close, RFC 9112 §6.3) keeps its
        // field. Only sent to HTTP/1.1 clients (the caller's check).
        if matches!(head.framing, Framing::UntilClose | Framing::Chunked)
            && f.name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            push_field(out, f.name, f.value);
            continue;
        }
        if is_hop_by_hop(f.name, &options) {
            continue;
        }
        // RFC 9110 §8.6: a 1xx or 204 carries no Content-Length (a client
        // could read one as a body to wait for).
        if (switching || head.status == 204) && f.name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        if content_length_once(f.name, f.value, &mut length_sent, out) {
            continue;
        }
        push_field(out, f.name, f.value);
    }
    for (name, value) in extra {
        push_field(out, name, value);
    }
    if switching {
        push_field(out, "Connection", b"upgrade");
    } else if let Some(v) = persist.field() {
        push_field(out, "Connection", v);
    }
    out.extend_from_slice(b"\r\n");
}

/// A complete short response generated by ktern itself (errors, redirects).
/// To a HEAD request (`head_only`) the head says the body's length but the
/// body is not sent (RFC 9110 §9.3.2): bytes after it would be read as the
/// start of the next response on a kept-alive connection.
pub fn local_response(
    status: u16,
    reason: &str,
    persist: Persist,
    extra: &[(&str, &str)],
    body: &str,
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (name, value) in extra {
        push_field(&mut out, name, value.as_bytes());
    }
    if let Some(v) = persist.field() {
        push_field(&mut out, "connection", v);
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::http::head::{parse_request, parse_response, Limits};

    fn fwd(trusted: bool) -> Forwarding<'static> {
        Forwarding {
            client_cert: None,
            client: "[::ffff:192.0.2.7]:5555".parse().unwrap(),
            trusted,
            x_forwarded: true,
            forwarded: true,
        }
    }

    fn rewrite(text: &str, trusted: bool) -> String {
        let head = parse_request(text.as_bytes(), &Limits::default())
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        request(&head, &fwd(trusted), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn client_certificate_fields_are_the_handshakes_never_the_clients() {
        let text = "GET / HTTP/1.1\r\nHost: a\r\nX-Client-Cert-Verify: SUCCESS\r\nx-client-cert-subject: CN=admin\r\nX-Client-Certainly: kept\r\n\r\n";
        // A listener without client_auth: forged fields go, none is added.
        let out = rewrite(text, true);
        assert!(
            !out.to_ascii_lowercase().contains("x-client-cert-"),
            "{out}"
        );
        assert!(out.contains("X-Client-Certainly: kept\r\n"), "{out}");
        let head = parse_request(text.as_bytes(), &Limits::default())
            .unwrap()
            .unwrap();
        // Asked, none sent.
        let mut f = fwd(false);
        f.client_cert = Some(("NONE", None));
        let mut out = Vec::new();
        request(&head, &f, &mut out);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out.to_ascii_lowercase().matches("x-client-cert-").count(),
            1,
            "{out}"
        );
        assert!(out.ends_with("X-Client-Cert-Verify: NONE\r\n\r\n"), "{out}");
        // Verified.
        let id = ClientIdentity {
            subject: "CN=svc, O=Example".into(),
            common_name: Some("svc".into()),
            sans: "DNS:svc.example".into(),
            fingerprint: "0f".repeat(32).into(),
        };
        f.client_cert = Some(("SUCCESS", Some(&id)));
        let mut out = Vec::new();
        request(&head, &f, &mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.ends_with(&format!(
                "X-Client-Cert-Verify: SUCCESS\r\nX-Client-Cert-Subject: CN=svc, O=Example\r\n\
                 X-Client-Cert-SAN: DNS:svc.example\r\nX-Client-Cert-Fingerprint: {}\r\n\r\n",
                "0f".repeat(32)
            )),
            "{out}"
        );
        assert!(!out.contains("CN=admin"), "{out}");
    }

    #[test]
    fn hop_by_hop_and_connection_options_are_removed() {
        let out = rewrite(
            "POST /x HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Secret: 1\r\nTransfer-Encoding: chunked\r\nAccept: */*\r\n\r\n",
            false,
        );
        assert!(out.starts_with("POST /x HTTP/1.1\r\nHost: app.example\r\nAccept: */*\r\nTransfer-Encoding: chunked\r\n"), "{out}");
        for gone in ["Connection: keep", "Keep-Alive", "TE:", "X-Secret"] {
            assert!(!out.contains(gone), "{gone} kept: {out}");
        }
        assert!(out.ends_with("\r\n\r\n"));
    }

    #[test]
    fn a_content_length_list_or_repeat_goes_on_as_one_value() {
        for text in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\ncontent-length:  2 \r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2,2, 2\r\n\r\n",
        ] {
            let out = rewrite(text, false);
            assert_eq!(out.matches("Content-Length: 2\r\n").count(), 1, "{out}");
            assert_eq!(
                out.to_ascii_lowercase().matches("content-length").count(),
                1,
                "{out}"
            );
        }
        let head = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n",
            "GET",
            64 << 10,
        )
        .unwrap()
        .unwrap();
        let mut out = Vec::new();
        response(&head, Persist::Keep, &[], &mut out);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
    }

    #[test]
    fn forwarding_fields_are_replaced_for_untrusted_clients() {
        let out = rewrite(
            "GET / HTTP/1.1\r\nHost: App.Example\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Proto: http\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Port: 6666\r\nX-Forwarded-Prefix: //6.6.6.6\r\nX-Forwarded-Server: 6.6.6.6\r\n\r\n",
            false,
        );
        assert!(!out.contains("6.6.6.6"), "{out}");
        assert!(!out.contains("6666"), "{out}");
        assert!(out.contains("X-Forwarded-For: 192.0.2.7\r\n"), "{out}");
        assert!(out.contains("X-Forwarded-Proto: https\r\n"));
        assert!(out.contains("X-Forwarded-Host: app.example\r\n"));
        assert!(
            out.contains("Forwarded: for=192.0.2.7;proto=https;host=app.example\r\n"),
            "{out}"
        );
        // The CGI spelling (`_` for `-`) of the same fields goes too.
        let out = rewrite(
            "GET / HTTP/1.1\r\nHost: a\r\nX_Real_IP: 6.6.6.6\r\nX_Forwarded_Host: evil\r\nX_Client_Cert_Subject: CN=admin\r\nX_Other: kept\r\n\r\n",
            false,
        );
        assert!(
            !out.contains("6.6.6.6") && !out.contains("evil") && !out.contains("admin"),
            "{out}"
        );
        assert!(out.contains("X_Other: kept\r\n"), "{out}");
    }

    #[test]
    fn client_trailers_keep_only_plain_fields() {
        let section = b"X-Sum: 7\r\nX-Client-Cert-Subject: CN=admin\r\nX_Real_IP: 1.2.3.4\r\nHost: other\r\nContent-Length: 9\r\nGET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nbad name: 1\r\nX-Last:  yes \r\n\r\n";
        assert_eq!(client_trailers(section), b"X-Sum: 7\r\nX-Last: yes\r\n\r\n");
        assert_eq!(client_trailers(b"\r\n"), b"\r\n");
        // A backend's may speak for ktern (it is the backend's answer),
        // but not frame or describe the message.
        let section = b"X-Forwarded-For: 1.2.3.4\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\nServer-Timing: db;dur=5\r\n\r\n";
        assert_eq!(
            backend_trailers(section),
            b"X-Forwarded-For: 1.2.3.4\r\nServer-Timing: db;dur=5\r\n\r\n"
        );
    }

    #[test]
    fn trusted_proxies_are_extended_not_replaced() {
        let out = rewrite(
            "GET / HTTP/1.1\r\nHost: a:8443\r\nX-Forwarded-For: 10.0.0.1\r\nForwarded: for=10.0.0.1\r\nX-Real-IP: 10.0.0.1\r\n\r\n",
            true,
        );
        assert!(out.contains("X-Real-IP: 10.0.0.1\r\n"), "{out}");
        assert!(
            out.contains("X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n"),
            "{out}"
        );
        assert!(
            out.contains("Forwarded: for=10.0.0.1, for=192.0.2.7;proto=https;host=\"a:8443\"\r\n"),
            "{out}"
        );
    }

    #[test]
    fn http10_without_host_gets_an_empty_host_upstream() {
        let out = rewrite("GET / HTTP/1.0\r\n\r\n", false);
        assert!(out.starts_with("GET / HTTP/1.0\r\nHost: \r\n"), "{out}");
        let again = parse_request(out.as_bytes(), &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(again.host(), Some(""));
    }

    #[test]
    fn forwarded_values_are_tokens_or_escaped_quoted_strings() {
        let quoted = |v: &str| {
            let mut out = Vec::new();
            push_forwarded_value(&mut out, v);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(quoted("example.com"), "example.com");
        assert_eq!(quoted("a:443"), "\"a:443\"");
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quoted(""), "\"\"");
    }

    #[test]
    fn connection_options_cannot_remove_framing_or_host() {
        let out = rewrite(
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, HOST, x-drop\r\nX-Drop: 1\r\nContent-Length: 4\r\n\r\n",
            false,
        );
        // Every received field that is forwarded comes before ktern's own.
        assert!(
            out.starts_with("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nX-Forwarded-For: "),
            "{out}"
        );
        let text = "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\n";
        let head = parse_response(text.as_bytes(), "GET", 1 << 16)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        response(&head, Persist::Keep, &[], &mut out);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n");
    }

    #[test]
    fn addresses_are_written_as_their_display_form() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "192.0.2.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn expect_is_answered_here_never_forwarded() {
        let text =
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n";
        let head = parse_request(text.as_bytes(), &Limits::default())
            .unwrap()
            .unwrap();
        assert!(head.expect_continue);
        let out = rewrite(text, false);
        assert!(
            out.starts_with("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nX-Forwarded-For: "),
            "{out}"
        );
    }

    #[test]
    fn response_transfer_codings_are_kept_with_the_body_they_describe() {
        let text = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        let head = parse_response(text.as_bytes(), "GET", 1 << 16)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        response(&head, Persist::Keep, &[], &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        );
    }

    #[test]
    fn no_content_length_goes_out_with_a_204_or_a_101() {
        let relayed = |text: &str| {
            let head = parse_response(text.as_bytes(), "GET", 1 << 16)
                .unwrap()
                .unwrap();
            let mut out = Vec::new();
            response(&head, Persist::Keep, &[], &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            relayed("HTTP/1.1 204 No Content\r\nContent-Length: 6\r\nX: y\r\n\r\n"),
            "HTTP/1.1 204 No Content\r\nX: y\r\n\r\n"
        );
        assert_eq!(
            relayed("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n"),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
        );
        // A 304's is the resource's, and stays.
        assert!(
            relayed("HTTP/1.1 304 Not Modified\r\nContent-Length: 6\r\n\r\n")
                .contains("Content-Length: 6\r\n")
        );
    }

    #[test]
    fn ipv6_clients_are_quoted_in_forwarded() {
        let head = parse_request(
            b"GET / HTTP/1.1\r\nHost: a:8443\r\n\r\n",
            &Limits::default(),
        )
        .unwrap()
        .unwrap();
        let mut out = Vec::new();
        let mut f = fwd(false);
        f.client = "[2001:db8::1]:443".parse().unwrap();
        request(&head, &f, &mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("\r\nForwarded: for=\"[2001:db8::1]\";proto=https;host=\"a:8443\"\r\n"),
            "{out}"
        );
        assert!(
            out.contains("\r\nX-Forwarded-For: 2001:db8::1\r\n"),
            "{out}"
        );
    }

    #[test]
    fn upgrade_is_kept_for_websocket() {
        let out = rewrite(
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n",
            false,
        );
        assert!(
            out.contains("Upgrade: websocket\r\nConnection: upgrade\r\n"),
            "{out}"
        );
        assert!(out.contains("Sec-WebSocket-Key: k\r\n"));
    }

    #[test]
    fn response_heads_drop_hop_by_hop_and_state_framing() {
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-App: 1\r\n\r\n";
        let head = parse_response(text.as_bytes(), "GET", 8192)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        response(
            &head,
            Persist::Close,
            &[("Strict-Transport-Security", b"max-age=63072000")],
            &mut out,
        );
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-App: 1\r\nStrict-Transport-Security: max-age=63072000\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn a_kept_http10_client_is_told_keep_alive() {
        // The backend's own `Connection: keep-alive` is hop-by-hop and
        // dropped; ktern states its own decision for the client.
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
        let head = parse_response(text.as_bytes(), "GET", 8192)
            .unwrap()
            .unwrap();
        let said = |persist| {
            let mut out = Vec::new();
            response(&head, persist, &[], &mut out);
            let out = String::from_utf8(out).unwrap();
            let local = local_response(404, "Not Found", persist, &[], "", true);
            (out, String::from_utf8(local).unwrap())
        };
        let (http10, local10) = said(Persist::new(false, true));
        assert_eq!(
            http10,
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
        );
        assert!(
            local10.ends_with("\r\nconnection: keep-alive\r\n\r\n"),
            "{local10}"
        );
        let (http11, local11) = said(Persist::new(false, false));
        assert_eq!(http11, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(!local11.contains("connection"), "{local11}");
        for http10 in [true, false] {
            let (closed, local) = said(Persist::new(true, http10));
            assert!(
                closed.ends_with("\r\nConnection: close\r\n\r\n"),
                "{closed}"
            );
            assert!(local.ends_with("\r\nconnection: close\r\n\r\n"), "{local}");
        }
    }

    #[test]
    fn local_responses_are_complete() {
        let r = String::from_utf8(local_response(
            400,
            "Bad Request",
            Persist::Close,
            &[],
            "bad request\n",
            false,
        ))
        .unwrap();
        assert_eq!(r, "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad request\n");
        let head = local_response(
            404,
            "Not Found",
            Persist::Keep,
            &[],
            "404 Not Found\n",
            true,
        );
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 14\r\n\r\n"
        );
    }
}
