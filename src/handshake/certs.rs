//! The certificate store behind a listener's SNI (RFC 6066 §3): which
//! chain answers a ClientHello.
//!
//! Built once per listener per config generation (off the shards) and
//! shared by every shard's rustls config, so tens of thousands of
//! certificates cost one index, not one per shard. A lookup is two hash
//! probes at most: the exact name, then the one-label wildcard covering it
//! (`*.example.com` covers `a.example.com`, not `a.b.example.com` nor
//! `example.com`: RFC 6125 §6.4.3), then the listener's default.
//!
//! Each name holds up to one key per algorithm, so an ECDSA and an RSA
//! chain for the same names live side by side and the client's
//! `signature_algorithms` pick one: ECDSA for every modern client, RSA for
//! old ones that offer no ECDSA scheme.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::config;
use crate::config::names;

/// Up to one key per algorithm for a name, as indexes into
/// [`CertStore::keys`]. Preference order: ECDSA (smaller, faster to sign),
/// then RSA, then anything else (Ed25519).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slots([Option<u32>; 3]);

impl Slots {
    fn slot(alg: SignatureAlgorithm) -> usize {
        match alg {
            SignatureAlgorithm::ECDSA => 0,
            SignatureAlgorithm::RSA => 1,
            _ => 2,
        }
    }

    /// Fills the algorithm's slot unless an earlier certificate holds it
    /// (config order decides; the lint reports the loser).
    fn offer(&mut self, alg: SignatureAlgorithm, index: u32) {
        self.0[Slots::slot(alg)].get_or_insert(index);
    }
}

/// The certificates of one listener, indexed by name.
#[derive(Debug, Default)]
pub struct CertStore {
    keys: Vec<Arc<CertifiedKey>>,
    /// Exact DNS names, lower case.
    exact: HashMap<Box<str>, Slots>,
    /// `*.example.com` under the key `example.com`.
    wildcard: HashMap<Box<str>, Slots>,
    /// The first certificate (with its other-algorithm twin, if the first
    /// name it answers for has one): for hellos without a known SNI.
    default: Option<Slots>,
    /// Refuse unknown or missing SNI instead of serving the default.
    strict: bool,
    /// Keys with a stapled OCSP response: its nextUpdate, and the same
    /// key without the staple, served from then on (a stale staple makes
    /// a checking client refuse the connection; none does not).
    stapled: HashMap<u32, (i64, Arc<CertifiedKey>)>,
}

impl CertStore {
    /// Indexes a listener's certificates by their names. Names that are
    /// not DNS names (IP addresses: RFC 6066 §3 forbids them in SNI) only
    /// serve through the default.
    pub fn new(certificates: &[config::Certificate], strict: bool) -> CertStore {
        let mut store = CertStore {
            keys: Vec::with_capacity(certificates.len()),
            strict,
            ..CertStore::default()
        };
        for (i, c) in certificates.iter().enumerate() {
            let index = i as u32;
            let alg = c.key.key.algorithm();
            store.keys.push(c.key.clone());
            if let (Some(until), Some(_)) = (c.info.ocsp_until, &c.key.ocsp) {
                let mut bare = (*c.key).clone();
                bare.ocsp = None;
                store.stapled.insert(index, (until, Arc::new(bare)));
            }
            for name in &c.server_names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(rest) => (&mut store.wildcard, rest),
                    None => (&mut store.exact, name.as_str()),
                };
                if key.parse::<std::net::IpAddr>().is_ok() {
                    continue;
                }
                match map.get_mut(key) {
                    Some(slots) => slots.offer(alg, index),
                    None => {
                        let mut slots = Slots::default();
                        slots.offer(alg, index);
                        map.insert(key.into(), slots);
                    }
                }
            }
        }
        if let Some(first) = certificates.first() {
            // The first certificate, and for each other key type the first
            // certificate that shares a name with it (IP names included:
            // clients without SNI, the default's usual callers, connect by
            // address).
            let mut slots = Slots::default();
            slots.offer(first.key.key.algorithm(), 0);
            for (k, c) in certificates.iter().enumerate().skip(1) {
                if c.server_names
                    .iter()
                    .any(|n| first.server_names.contains(n))
                {
                    slots.offer(c.key.key.algorithm(), k as u32);
                }
            }
            store.default = Some(slots);
        }
        store
    }

    /// Exact, then wildcard; `name` is lower case. An IP address is never
    /// a name here (`10.0.0.1` must not find `*.0.0.1`), and a wildcard
    /// covers one whole, non-empty label.
    fn find(&self, name: &str) -> Option<Slots> {
        if name.parse::<std::net::IpAddr>().is_ok() {
            return None;
        }
        if let Some(s) = self.exact.get(name) {
            return Some(*s);
        }
        self.wildcard.get(names::wildcard_parent(name)?).copied()
    }

    fn lookup(&self, sni: Option<&str>) -> Option<Slots> {
        let found = sni.and_then(|name| {
            // rustls and the hello peek already lower-case and drop the
            // trailing dot; a caller that did not gets the same answer.
            let name = name.strip_suffix('.').unwrap_or(name);
            let name = match name.bytes().any(|b| b.is_ascii_uppercase()) {
                true => Cow::Owned(name.to_ascii_lowercase()),
                false => Cow::Borrowed(name),
            };
            self.find(&name)
        });
        match (found, self.strict) {
            (Some(s), _) => Some(s),
            (None, true) => None,
            (None, false) => self.default,
        }
    }

    /// Whether a hello naming `sni` (or none) is refused with
    /// `unrecognized_name` (`strict_sni`).
    pub fn refuses(&self, sni: Option<&str>) -> bool {
        self.strict && self.lookup(sni).is_none()
    }

    /// The chain for a hello: by name, then the key the client can verify.
    pub fn select(
        &self,
        sni: Option<&str>,
        schemes: &[SignatureScheme],
    ) -> Option<&Arc<CertifiedKey>> {
        let slots = self.lookup(sni)?;
        let mut held = slots.0.iter().flatten().copied();
        let first = held.next()?;
        // One key (the usual case): no choice to make, and rustls reports
        // a client that cannot verify it.
        let index = if slots.0.iter().flatten().count() == 1 {
            first
        } else {
            std::iter::once(first)
                .chain(held)
                .find(|&i| self.keys[i as usize].key.choose_scheme(schemes).is_some())
                .unwrap_or(first)
        };
        // Most stores staple nothing: no hash of the index then.
        if let Some((until, bare)) = (!self.stapled.is_empty())
            .then(|| self.stapled.get(&index))
            .flatten()
        {
            if crate::clock::unix_now() >= *until {
                return Some(bare);
            }
        }
        Some(&self.keys[index as usize])
    }

    /// Certificates indexed (for logs and the memory figure).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No certificate at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.select(hello.server_name(), hello.signature_schemes())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RSA key made once with openssl (rcgen cannot make RSA keys with
    /// ring, and both providers run these tests).
    const RSA_KEY: &str = include_str!("../../tests/fixtures/rsa-2048.key");

    fn cert(names: &[&str], rsa: bool) -> config::Certificate {
        let (chain, key) = if rsa {
            let key = rcgen::KeyPair::from_pem(RSA_KEY).unwrap();
            let params = rcgen::CertificateParams::new(
                names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            (params.self_signed(&key).unwrap().pem(), RSA_KEY.to_string())
        } else {
            crate::builtin::self_signed(names).unwrap()
        };
        let mut c = config::Certificate::from_pem(&chain, &key).unwrap();
        c.server_names = names.iter().map(|n| n.to_string()).collect();
        c
    }

    const MODERN: &[SignatureScheme] = &[
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::RSA_PSS_SHA256,
    ];
    const RSA_ONLY: &[SignatureScheme] = &[
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA256,
    ];

    fn leaf(store: &CertStore, sni: Option<&str>, schemes: &[SignatureScheme]) -> Option<usize> {
        let k = store.select(sni, schemes)?;
        store.keys.iter().position(|x| Arc::ptr_eq(x, k))
    }

    #[test]
    fn exact_then_wildcard_then_default() {
        let store = CertStore::new(
            &[
                cert(&["default.test"], false),
                cert(&["*.example.com"], false),
                cert(&["a.example.com"], false),
            ],
            false,
        );
        assert_eq!(leaf(&store, Some("a.example.com"), MODERN), Some(2));
        assert_eq!(leaf(&store, Some("b.example.com"), MODERN), Some(1));
        // One label only (RFC 6125 §6.4.3), and not the bare domain.
        assert_eq!(leaf(&store, Some("x.b.example.com"), MODERN), Some(0));
        assert_eq!(leaf(&store, Some("example.com"), MODERN), Some(0));
        assert_eq!(leaf(&store, None, MODERN), Some(0));
        // Case and a trailing dot do not matter (RFC 6066 §3, RFC 4343).
        assert_eq!(leaf(&store, Some("A.Example.COM."), MODERN), Some(2));
        assert!(!store.refuses(Some("nowhere.test")));
    }

    #[test]
    fn strict_refuses_unknown_and_missing_names() {
        let store = CertStore::new(
            &[cert(&["a.test"], false), cert(&["*.b.test"], false)],
            true,
        );
        assert!(store.refuses(None));
        assert!(store.refuses(Some("other.test")));
        assert!(store.refuses(Some("b.test")));
        assert!(!store.refuses(Some("a.test")));
        assert!(!store.refuses(Some("x.b.test")));
        assert_eq!(leaf(&store, Some("other.test"), MODERN), None);
    }

    #[test]
    fn signature_schemes_pick_ecdsa_or_rsa() {
        let store = CertStore::new(
            &[
                cert(&["dual.test"], true),
                cert(&["dual.test"], false),
                cert(&["rsa.test"], true),
            ],
            false,
        );
        assert_eq!(leaf(&store, Some("dual.test"), MODERN), Some(1));
        assert_eq!(leaf(&store, Some("dual.test"), RSA_ONLY), Some(0));
        // The default is the first certificate with its twin.
        assert_eq!(leaf(&store, None, MODERN), Some(1));
        assert_eq!(leaf(&store, None, RSA_ONLY), Some(0));
        // A single key is served whatever the client offers (rustls then
        // refuses the handshake if it cannot sign).
        assert_eq!(leaf(&store, Some("rsa.test"), MODERN), Some(2));
    }

    #[test]
    fn first_certificate_wins_a_name_and_ip_names_are_not_indexed() {
        let store = CertStore::new(
            &[
                cert(&["a.test", "127.0.0.1"], false),
                cert(&["a.test", "b.test"], false),
            ],
            true,
        );
        assert_eq!(leaf(&store, Some("a.test"), MODERN), Some(0));
        assert_eq!(leaf(&store, Some("b.test"), MODERN), Some(1));
        assert!(store.refuses(Some("127.0.0.1")));
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn the_default_has_its_twin_by_any_shared_name_and_ips_match_no_wildcard() {
        // The first certificate's first name is an IP: its RSA twin (same
        // names) still serves RSA-only clients without SNI.
        let store = CertStore::new(
            &[
                cert(&["10.0.0.1", "ip.test"], false),
                cert(&["*.0.0.1"], false),
                cert(&["10.0.0.1", "ip.test"], true),
            ],
            false,
        );
        assert_eq!(leaf(&store, None, MODERN), Some(0));
        assert_eq!(leaf(&store, None, RSA_ONLY), Some(2));
        // An IP never reaches the wildcard index; an empty label neither.
        assert_eq!(leaf(&store, Some("10.0.0.1"), MODERN), Some(0));
        assert_eq!(store.find(".0.0.1"), None);
        assert!(store.find("x.0.0.1").is_some());
    }

    #[test]
    fn ten_thousand_names_index_by_hash() {
        let one = cert(&["x.test"], false);
        let many: Vec<config::Certificate> = (0..10_000)
            .map(|i| {
                let mut c = one.clone();
                c.key = Arc::new((*one.key).clone());
                c.server_names = vec![format!("host{i}.test"), format!("*.w{i}.test")];
                c
            })
            .collect();
        let store = CertStore::new(&many, true);
        assert_eq!(leaf(&store, Some("host9999.test"), MODERN), Some(9999));
        assert_eq!(leaf(&store, Some("a.w4321.test"), MODERN), Some(4321));
        assert!(store.refuses(Some("host10000.test")));
    }
}
