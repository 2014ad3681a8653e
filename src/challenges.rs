//! ACME challenge answers, shared between the ACME thread (which
//! publishes them while a CA validates an order) and the shards (which
//! serve them): TLS-ALPN-01 certificates by name for the handshake, and
//! HTTP-01 key authorizations by token for the redirect listener.
//!
//! Read only on a validation's path (a ClientHello offering `acme-tls/1`,
//! a request under `/.well-known/acme-challenge/`), so a lock is cheaper
//! than anything cleverer: ordinary handshakes and requests never take it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::sign::CertifiedKey;

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The HTTP-01 path prefix (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// The answers being validated right now.
#[derive(Debug, Default)]
pub struct Challenges {
    /// Name (lower case) to the self-signed certificate carrying the
    /// acmeIdentifier extension (RFC 8737 §3).
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// Token to key authorization (RFC 8555 §8.3).
    http: Mutex<HashMap<String, String>>,
}

impl Challenges {
    /// Publishes a TLS-ALPN-01 certificate for `name`.
    pub fn put_tls_alpn(&self, name: &str, key: Arc<CertifiedKey>) {
        lock(&self.tls_alpn).insert(name.to_ascii_lowercase(), key);
    }

    /// Publishes an HTTP-01 key authorization for `token`.
    pub fn put_http(&self, token: &str, key_authorization: &str) {
        lock(&self.http).insert(token.to_string(), key_authorization.to_string());
    }

    /// Withdraws what was published for `name` and `token`.
    pub fn remove(&self, name: &str, token: &str) {
        lock(&self.tls_alpn).remove(&name.to_ascii_lowercase());
        lock(&self.http).remove(token);
    }

    /// The TLS-ALPN-01 certificate for a ClientHello's SNI.
    pub fn tls_alpn(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        lock(&self.tls_alpn)
            .get(&sni?.to_ascii_lowercase())
            .cloned()
    }

    /// The body for a request target, when it is an HTTP-01 challenge
    /// path: `Some(Some(key_authorization))` for a published token,
    /// `Some(None)` for an unknown one (a 404), `None` for other paths.
    pub fn http_answer(&self, target: &str) -> Option<Option<String>> {
        // Origin-form: an absolute-form target (RFC 9112 §3.2.2) arrives
        // as its origin-form part (`head::build_request`).
        let token = target.strip_prefix(HTTP01_PREFIX)?;
        Some(lock(&self.http).get(token).cloned())
    }

    /// Whether nothing is published.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        lock(&self.tls_alpn).is_empty() && lock(&self.http).is_empty()
    }
}

/// A poisoned lock still holds a consistent map (every critical section
/// is one insert, remove or lookup).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_answers_only_challenge_paths() {
        let c = Challenges::default();
        assert_eq!(c.http_answer("/index.html"), None);
        assert_eq!(c.http_answer("/.well-known/acme-challenge/abc"), Some(None));
        c.put_http("abc", "abc.thumb");
        assert_eq!(
            c.http_answer("/.well-known/acme-challenge/abc"),
            Some(Some("abc.thumb".to_string()))
        );
        assert!(!c.is_empty());
        c.remove("example.com", "abc");
        assert_eq!(c.http_answer("/.well-known/acme-challenge/abc"), Some(None));
        assert!(c.is_empty());
    }

    #[test]
    fn tls_alpn_by_name_ignores_case() {
        let c = Challenges::default();
        let (cert, key) = crate::builtin::self_signed(&["a.example"]).unwrap();
        let cert = crate::config::Certificate::from_pem(&cert, &key).unwrap();
        c.put_tls_alpn("A.Example", cert.key.clone());
        assert!(c.tls_alpn(Some("a.EXAMPLE")).is_some());
        assert!(c.tls_alpn(Some("b.example")).is_none());
        assert!(c.tls_alpn(None).is_none());
        c.remove("a.example", "-");
        assert!(c.is_empty());
    }
}
