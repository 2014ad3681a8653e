//! `ktern check` as a lint: a config that loads can still be unsound
//! (a certificate that does not cover its names, expires soon, has its
//! chain out of order or a weak key; names that shadow each other). Each
//! finding names its field; errors make `ktern check` exit 1, warnings
//! are printed and leave it at 0. Data in, findings out: no clock (the
//! caller passes `now`) and nothing written.

use std::fmt;

use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::*;

use super::{Certificate, Config};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Worth knowing; the config still serves.
    Warning,
    /// Clients will fail (an expired certificate, a weak key, a broken
    /// chain): `ktern check` exits 1.
    Error,
}

/// One finding, with the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Warning or error.
    pub severity: Severity,
    /// The config field, e.g. `listener[0].certificate[1].cert`.
    pub field: String,
    /// What is wrong, and what it does to clients.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(f, "{}: {level}: {}", self.field, self.message)
    }
}

/// A CRL whose nextUpdate is this close is reported: CAs issue CRLs for
/// days, not months, and refresh them well ahead, so only one that is
/// about to lapse is news.
const CRL_WARN_SECONDS: i64 = 86_400;

/// Certificates expiring within this many days are reported.
pub const EXPIRY_WARN_DAYS: i64 = 30;

/// The smallest RSA modulus clients accept (CA/Browser Forum Baseline
/// Requirements §6.1.5; NIST SP 800-131A).
pub const MIN_RSA_BITS: usize = 2048;

/// Lints `config` at Unix time `now`. With `roots` (`ktern check --ca`),
/// every chain must verify to them.
pub fn lint(config: &Config, now: i64, roots: Option<&rustls::RootCertStore>) -> Vec<Finding> {
    let mut out = Vec::new();
    let verifier = roots.and_then(|r| {
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(r.clone()),
            std::sync::Arc::new(crate::provider::crypto_provider()),
        )
        .build()
        .ok()
    });
    for (i, l) in config.listeners.iter().enumerate() {
        for (j, c) in l.certificates.iter().enumerate() {
            let at = format!("listener[{i}].certificate[{j}]");
            certificate(&at, c, now, &mut out);
            if let Some(a) = &c.acme {
                acme_ports(&at, a, l.address.port(), config, &mut out);
            }
            if let Some(v) = &verifier {
                verify(&at, c, now, v.as_ref(), &mut out);
            }
        }
        names(i, &l.certificates, &mut out);
        if let Some(when) = l.client_auth.as_ref().and_then(|a| a.crl_next_update) {
            let field = format!("listener[{i}].client_auth.crl");
            if when <= now {
                let days = (now - when) / 86_400;
                let message = format!(
                    "the CRL's nextUpdate passed {days} day(s) ago: every client certificate is refused (unknown_ca) until a fresh CRL is loaded"
                );
                push(&mut out, Severity::Error, field, message);
            } else if when - now < CRL_WARN_SECONDS {
                let hours = (when - now) / 3600;
                let message = format!(
                    "the CRL's nextUpdate is in {hours} hour(s): after it every client certificate is refused until a reload reads a fresh CRL"
                );
                push(&mut out, Severity::Warning, field, message);
            }
        }
    }
    if let Some(path) = &config.tickets.secret_file {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                push(
                    &mut out,
                    Severity::Warning,
                    "tickets.secret_file".into(),
                    format!(
                        "{} is readable by others (mode {mode:o}): whoever reads it can open every \
                         ticket sealed under it (chmod 600)",
                        path.display()
                    ),
                );
            }
        }
    }
    out
}

/// The CA validates on the standard ports (RFC 8737 §3: 443; RFC 8555
/// §8.3: 80): a listener elsewhere works only behind a port forward.
fn acme_ports(at: &str, a: &super::AcmeCert, port: u16, config: &Config, out: &mut Vec<Finding>) {
    match a.challenge {
        super::AcmeChallenge::TlsAlpn01 if port != 443 => push(
            out,
            Severity::Warning,
            format!("{at}.acme.challenge"),
            format!("tls-alpn-01 is validated on port 443, and this listener is on port {port}: it works only if port 443 reaches it"),
        ),
        super::AcmeChallenge::Http01 if !config.redirects.iter().any(|r| r.address.port() == 80) => push(
            out,
            Severity::Warning,
            format!("{at}.acme.challenge"),
            "http-01 is validated on port 80, and no [[redirect]] listener is on port 80: it works only if port 80 reaches one".into(),
        ),
        _ => {}
    }
}

fn push(out: &mut Vec<Finding>, severity: Severity, field: String, message: String) {
    out.push(Finding {
        severity,
        field,
        message,
    });
}

pub use super::names::covers;

/// The modulus size of an RSA leaf certificate's key.
pub fn rsa_bits(leaf: &[u8]) -> Option<usize> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    match cert.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => Some(rsa.key_size()),
        _ => None,
    }
}

/// The errors of [`lint`] for one certificate on its own (dates, chain
/// order): what clients refuse. A reload checks each certificate it
/// changes with it.
pub fn certificate_errors(at: &str, c: &Certificate, now: i64) -> Vec<Finding> {
    let mut out = Vec::new();
    certificate(at, c, now, &mut out);
    out.retain(|f| f.severity == Severity::Error);
    out
}

/// One certificate on its own: names, dates, key, chain order.
fn certificate(at: &str, c: &Certificate, now: i64, out: &mut Vec<Finding>) {
    if let Some(a) = &c.acme {
        if !a.issued {
            push(
                out,
                Severity::Warning,
                format!("{at}.acme"),
                format!(
                    "not obtained yet (nothing valid in {}): a self-signed stand-in serves {} until the first order succeeds",
                    a.dir.display(),
                    a.domains.join(", ")
                ),
            );
            return;
        }
    }
    let field = format!("{at}.cert");
    for name in c
        .info
        .names
        .iter()
        .filter(|n| n.parse::<std::net::IpAddr>().is_err())
    {
        if let Err(why) = super::names::check(name) {
            push(
                out,
                Severity::Warning,
                field.clone(),
                format!("subjectAltName {why}: no SNI can select it"),
            );
        }
    }
    for name in &c.server_names {
        if !c.info.names.iter().any(|san| covers(san, name)) {
            push(
                out,
                Severity::Warning,
                format!("{at}.server_names"),
                format!(
                    "{:?} does not cover {name:?} (its names: {}): clients that check the name refuse it",
                    c.info.cert_file,
                    c.info.names.join(", ")
                ),
            );
        }
    }
    if let (Some(file), Some(why)) = (&c.info.ocsp_file, &c.info.ocsp_problem) {
        push(
            out,
            Severity::Warning,
            format!("{at}.ocsp"),
            format!("{file:?} will not be stapled: {why}"),
        );
    }
    let left = c.info.not_after - now;
    if left <= 0 {
        push(
            out,
            Severity::Error,
            field.clone(),
            format!(
                "{:?} expired {} day(s) ago: clients refuse it",
                c.info.cert_file,
                -left / 86_400
            ),
        );
    } else if left <= EXPIRY_WARN_DAYS * 86_400 {
        push(
            out,
            Severity::Warning,
            field.clone(),
            format!("{:?} expires in {} day(s)", c.info.cert_file, left / 86_400),
        );
    }
    let parsed: Vec<_> = c
        .key
        .cert
        .iter()
        .map(|d| X509Certificate::from_der(d.as_ref()).map(|(_, x)| x))
        .collect();
    // (An RSA key under 2048 bits never gets here: loading refuses it.)
    for (k, cert) in parsed.iter().enumerate().skip(1) {
        if let Ok(cert) = cert {
            if cert.validity().not_after.timestamp() <= now {
                push(
                    out,
                    Severity::Error,
                    field.clone(),
                    format!(
                        "certificate {k} of the chain ({}) has expired: clients refuse the chain",
                        cert.subject()
                    ),
                );
            }
        }
    }
    for (k, pair) in parsed.windows(2).enumerate() {
        let (Ok(child), Ok(parent)) = (&pair[0], &pair[1]) else {
            push(
                out,
                Severity::Error,
                field.clone(),
                format!(
                    "certificate {} or {} of the chain cannot be parsed",
                    k,
                    k + 1
                ),
            );
            continue;
        };
        if child.issuer() != parent.subject() {
            push(
                out,
                Severity::Error,
                field.clone(),
                format!(
                    "chain out of order: certificate {k} was issued by {:?}, but certificate {} is {:?} \
                     (the leaf comes first, then each issuer)",
                    child.issuer().to_string(),
                    k + 1,
                    parent.subject().to_string()
                ),
            );
        }
    }
}

/// The chain verifies to the CA bundle (as a client would check it).
fn verify(
    at: &str,
    c: &Certificate,
    now: i64,
    v: &dyn rustls::client::danger::ServerCertVerifier,
    out: &mut Vec<Finding>,
) {
    let Some((leaf, rest)) = c.key.cert.split_first() else {
        return;
    };
    // A name the certificate covers, so only the chain is judged here (a
    // name it does not cover is reported above).
    let name = c
        .info
        .names
        .iter()
        .map(|n| {
            n.strip_prefix("*.")
                .map_or(n.clone(), |p| format!("lint.{p}"))
        })
        .find_map(|n| ServerName::try_from(n).ok());
    let Some(name) = name else {
        return;
    };
    let when = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64));
    let chain: Vec<CertificateDer<'_>> = rest.to_vec();
    match v.verify_server_cert(leaf, &chain, &name, &[], when) {
        Ok(_) => {}
        // Expiry has its own finding.
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Expired))
        | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext {
            ..
        })) => {}
        Err(e) => push(
            out,
            Severity::Error,
            format!("{at}.cert"),
            format!(
                "{:?} does not verify to the CA bundle: {e}",
                c.info.cert_file
            ),
        ),
    }
}

/// Across one listener's certificates: a name listed twice for the same
/// key type, and a wildcard that covers another certificate's exact name
/// with a different key. Indexed by name, so tens of thousands of
/// certificates lint in linear time. IP names are never looked up by SNI,
/// so they shadow nothing.
fn names(i: usize, certs: &[Certificate], out: &mut Vec<Finding>) {
    use std::collections::HashMap;
    let dns = |n: &&String| n.parse::<std::net::IpAddr>().is_err();
    // Name -> (certificate, key type) in config order.
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, c) in certs.iter().enumerate() {
        for name in c.server_names.iter().filter(dns) {
            let holders = by_name.entry(name.as_str()).or_default();
            if let Some(&first) = holders
                .iter()
                .find(|&&k| certs[k].info.key_type == c.info.key_type)
            {
                push(
                    out,
                    Severity::Warning,
                    format!("listener[{i}].certificate[{j}].server_names"),
                    format!(
                        "{name:?} ({} key) is also in certificate[{first}], which is listed first and wins",
                        c.info.key_type
                    ),
                );
            }
            if !holders.contains(&j) {
                holders.push(j);
            }
        }
    }
    // Wildcard parent -> exact names under it.
    let mut under: HashMap<&str, Vec<&str>> = HashMap::new();
    for name in by_name.keys().filter(|n| !n.starts_with("*.")) {
        if let Some(parent) = super::names::wildcard_parent(name) {
            under.entry(parent).or_default().push(name);
        }
    }
    for (j, c) in certs.iter().enumerate() {
        let key = c.key.key.public_key();
        for name in c.server_names.iter().filter(dns) {
            let Some(parent) = name.strip_prefix("*.") else {
                continue;
            };
            let mut exact: Vec<&str> = under.get(parent).cloned().unwrap_or_default();
            exact.sort_unstable();
            for e in exact {
                for &k in &by_name[e] {
                    if k != j && certs[k].key.key.public_key() != key {
                        push(
                            out,
                            Severity::Warning,
                            format!("listener[{i}].certificate[{j}].server_names"),
                            format!(
                                "{name:?} covers {e:?}, which certificate[{k}] serves with another key \
                                 (exact names win; check that this is meant)"
                            ),
                        );
                    }
                }
            }
        }
    }
}
