//! The plain-HTTP redirect listener: every request gets a 301 to the same
//! host and target over https, then the connection closes (what nginx's
//! `return 301 https://$host$request_uri;` server does). The one
//! exception is an ACME HTTP-01 challenge path, answered with the key
//! authorization the ACME thread published (RFC 8555 §8.3), or 404.

use std::sync::Arc;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::head::{self, Limits, Persist};
use super::rewrite;
use crate::challenges::Challenges;

/// Time a client has to send its whole request head: one deadline, not
/// one per read (a client sending a byte every few seconds would hold the
/// connection for days, its head re-parsed at each byte).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Location` for a request to `host` (may carry a port) and `target`.
/// `None` when the request names no usable host.
pub fn location(host: &str, target: &str, https_port: Option<u16>) -> Option<String> {
    let name = if host.starts_with('[') {
        &host[..=host.find(']')?]
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    // A Host that could inject another header or URL part is refused.
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
    {
        return None;
    }
    let port = match https_port {
        Some(443) | None => String::new(),
        Some(p) => format!(":{p}"),
    };
    let path = if target.starts_with('/') { target } else { "/" };
    Some(format!("https://{name}{port}{path}"))
}

/// The response to a request for `target` naming `host`.
pub fn respond(
    host: &str,
    target: &str,
    https_port: Option<u16>,
    challenges: &Challenges,
) -> Vec<u8> {
    match challenges.http_answer(target) {
        Some(Some(key_authorization)) => {
            tracing::info!(target, "ACME http-01 validation answered");
            return rewrite::local_response(
                200,
                "OK",
                Persist::Close,
                &[],
                &key_authorization,
                false,
            );
        }
        Some(None) => {
            return rewrite::local_response(
                404,
                "Not Found",
                Persist::Close,
                &[],
                "404 Not Found\n",
                false,
            )
        }
        None => {}
    }
    match location(host, target, https_port) {
        Some(loc) => rewrite::local_response(
            301,
            "Moved Permanently",
            Persist::Close,
            &[("location", &loc)],
            "",
            false,
        ),
        None => rewrite::local_response(
            400,
            "Bad Request",
            Persist::Close,
            &[],
            "400 Bad Request\n",
            false,
        ),
    }
}

/// Answers one plain-HTTP connection.
pub async fn serve(mut socket: TcpStream, https_port: Option<u16>, challenges: Arc<Challenges>) {
    let limits = Limits::default();
    let head = async {
        let mut buf: Vec<u8> = Vec::new();
        let mut pacer = head::HeadPacer::default();
        loop {
            let parsed = match pacer.ready(&mut buf) {
                true => head::parse_request(&buf, &limits),
                false => Ok(None),
            };
            match parsed {
                Ok(Some(h)) => {
                    return Some(respond(
                        h.host().unwrap_or(""),
                        h.target(),
                        https_port,
                        &challenges,
                    ));
                }
                Ok(None) => {}
                Err(e) => {
                    let body = format!("{}\n", e);
                    return Some(rewrite::local_response(
                        e.status(),
                        "Error",
                        Persist::Close,
                        &[],
                        &body,
                        false,
                    ));
                }
            }
            match socket.read(Vec::with_capacity(4096)).await {
                (Ok(n), chunk) if n > 0 => buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    };
    let Ok(Some(response)) = monoio::time::timeout(HEAD_TIMEOUT, head).await else {
        return;
    };
    let _ = socket.write_all(response).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            location("example.com", "/a?b=1", None).as_deref(),
            Some("https://example.com/a?b=1")
        );
        assert_eq!(
            location("example.com:80", "/", Some(443)).as_deref(),
            Some("https://example.com/")
        );
        assert_eq!(
            location("example.com:80", "/x", Some(8443)).as_deref(),
            Some("https://example.com:8443/x")
        );
        assert_eq!(
            location("[::1]:80", "/", None).as_deref(),
            Some("https://[::1]/")
        );
        assert_eq!(location("", "/", None), None);
        assert_eq!(location("evil.com/x", "/", None), None);
        assert_eq!(location("a b", "/", None), None);
    }

    #[test]
    fn acme_challenge_paths_are_answered_before_the_redirect() {
        let c = Challenges::default();
        c.put_http("tok", "tok.thumb");
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        let hit = text(respond(
            "a.example",
            "/.well-known/acme-challenge/tok",
            None,
            &c,
        ));
        assert!(hit.starts_with("HTTP/1.1 200 "), "{hit}");
        assert!(hit.ends_with("\r\n\r\ntok.thumb"), "{hit}");
        let miss = text(respond(
            "a.example",
            "/.well-known/acme-challenge/other",
            None,
            &c,
        ));
        assert!(miss.starts_with("HTTP/1.1 404 "), "{miss}");
        let other = text(respond("a.example", "/x", None, &c));
        assert!(other.starts_with("HTTP/1.1 301 "), "{other}");
        assert!(
            other.contains("location: https://a.example/x\r\n"),
            "{other}"
        );
    }
}
