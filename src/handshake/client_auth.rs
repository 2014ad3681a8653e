//! Client certificates (mTLS): rustls' WebPKI verifier (chain to the
//! listener's CA bundle, CRLs, validity dates, client-auth usage) with a
//! chain-depth limit on top, and the failure reasons ktern counts.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// rustls' verifier, refusing chains longer than `depth` (nginx's
/// `ssl_verify_depth`): a client may send at most `depth - 1`
/// intermediates, not counting a CA of the bundle ([`counted`]).
#[derive(Debug)]
pub struct DepthLimited {
    /// The WebPKI verifier.
    pub inner: Arc<dyn ClientCertVerifier>,
    /// The longest chain, the client certificate included.
    pub depth: u8,
    /// The bundle's certificates.
    pub anchors: Arc<[CertificateDer<'static>]>,
}

/// The certificates a peer sent beside its own that count against
/// `verify_depth`: not those of the CA bundle itself. Many clients and
/// servers send their root too (a "full chain" file), which the chain
/// ends at anyway; OpenSSL (nginx, HAProxy) counts the path it builds,
/// which ends at the bundle's copy, so a root sent never counts there.
/// Counted, it refused with `verify_depth = 1` a client nginx takes.
/// Each CA of the bundle is let off once: copies of it sent again count,
/// or a client could send dozens of copies past the depth check, each
/// tried by the path search (two signature checks a copy). No allocation:
/// this runs in every handshake with a certificate.
pub fn counted(intermediates: &[CertificateDer<'_>], anchors: &[CertificateDer<'static>]) -> usize {
    let same = |a: &[u8], b: &[u8]| a == b;
    intermediates
        .iter()
        .enumerate()
        .filter(|&(i, c)| {
            let first = !intermediates[..i].iter().any(|p| same(p, c));
            !(first && anchors.iter().any(|a| same(a, c)))
        })
        .count()
}

/// A chain longer than `verify_depth` (rustls answers an error of ours
/// with `certificate_unknown`).
#[derive(Debug, thiserror::Error)]
#[error("the client's chain has {sent} intermediates; verify_depth {depth} allows {}", .depth.saturating_sub(1))]
pub struct TooDeep {
    /// Intermediates sent.
    pub sent: usize,
    /// The configured depth.
    pub depth: u8,
}

impl ClientCertVerifier for DepthLimited {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let sent = counted(intermediates, &self.anchors);
        if sent >= usize::from(self.depth) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(TooDeep {
                    sent,
                    depth: self.depth,
                })),
            )));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A resumed session's client certificate chain, verified again at `now`
/// with the listener's current CAs, CRLs and depth. rustls verifies a
/// client's chain only in a full handshake, and every resumption carries
/// the chain into a new ticket issued then: a client reconnecting within
/// each ticket's lifetime was admitted for ever, past its certificate's
/// notAfter and past a CRL's nextUpdate. A chain that no longer holds is
/// refused as a full handshake would refuse it. No chain (an `optional`
/// listener's client without one) has nothing to verify.
pub fn still_valid(
    verifier: &DepthLimited,
    chain: Option<&[CertificateDer<'_>]>,
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let Some((end_entity, intermediates)) = chain.and_then(|c| c.split_first()) else {
        return Ok(());
    };
    verifier
        .verify_client_cert(end_entity, intermediates, now)
        .map(drop)
}

/// Why a client certificate was refused, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// None sent where one is required (`certificate_required`).
    Missing,
    /// Not issued by a CA of the bundle (`unknown_ca`).
    UnknownCa,
    /// Outside its validity dates (`certificate_expired`).
    Expired,
    /// Revoked by a CRL (`certificate_revoked`).
    Revoked,
    /// Anything else: wrong usage (`unsupported_certificate`), a malformed
    /// certificate (`bad_certificate`), too deep a chain
    /// (`certificate_unknown`), a bad signature (`decrypt_error`).
    Bad,
}

/// The reason, when a handshake error is a refused client certificate.
/// (A server sees `InvalidCertificate` only from verifying its client.)
pub fn refused(e: &rustls::Error) -> Option<Refused> {
    use CertificateError as C;
    Some(match e {
        rustls::Error::NoCertificatesPresented => Refused::Missing,
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => Refused::UnknownCa,
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => Refused::Expired,
            C::Revoked => Refused::Revoked,
            _ => Refused::Bad,
        },
        _ => return None,
    })
}

/// What a verified client certificate says about the client, for the
/// backends (request fields, PROXY v2 TLVs) and the access log. Read once
/// per connection, after the handshake. Every text is printable ASCII:
/// other bytes (a CR or LF in a subject included) are written `\xHH`, so a
/// value can go into a header field or a log line as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject DN in the certificate's order (`CN=client,
    /// O=Example`), values escaped as RFC 4514 says (`CN=Doe\, John`).
    pub subject: Box<str>,
    /// The subject's first common name, if it has one.
    pub common_name: Option<Box<str>>,
    /// The subject alternative names: `DNS:a.example, IP:10.0.0.1,
    /// URI:spiffe://…, email:…`; empty when it has none.
    pub sans: Box<str>,
    /// SHA-256 of the certificate's DER, lower-case hex.
    pub fingerprint: Box<str>,
}

impl ClientIdentity {
    /// The identity in `der` (the end-entity certificate rustls verified).
    /// `None` if it does not parse, which cannot happen for a certificate
    /// WebPKI accepted, but is not a reason to panic.
    pub fn read(der: &[u8]) -> Option<ClientIdentity> {
        use std::fmt::Write as _;
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(printable);
        let mut sans = String::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                let (kind, value) = match name {
                    GeneralName::DNSName(d) => ("DNS", (*d).to_string()),
                    GeneralName::URI(u) => ("URI", (*u).to_string()),
                    GeneralName::RFC822Name(e) => ("email", (*e).to_string()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => (
                            "IP",
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string(),
                        ),
                        16 => (
                            "IP",
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string(),
                        ),
                        _ => continue,
                    },
                    _ => continue,
                };
                if !sans.is_empty() {
                    sans.push_str(", ");
                }
                // A comma inside a value (a URI may have one) as `\x2C`:
                // it must not read as the list's next name.
                let _ = write!(sans, "{kind}:{}", printable(&value).replace(',', "\\x2C"));
            }
        }
        let digest =
            crate::provider::prims::digest::digest(&crate::provider::prims::digest::SHA256, der);
        let mut fingerprint = String::with_capacity(64);
        for b in digest.as_ref() {
            let _ = write!(fingerprint, "{b:02x}");
        }
        Some(ClientIdentity {
            subject: subject(cert.subject()).into(),
            common_name,
            sans: sans.into(),
            fingerprint: fingerprint.into(),
        })
    }
}

/// The subject DN as one printable-ASCII string (RDNs in the
/// certificate's order, `, ` between them, ` + ` within one), each value
/// escaped as RFC 4514 §2.4 says, as nginx's `$ssl_client_s_dn` is: a CN
/// of `mallory, O=Admins` must not read as a second attribute, and a
/// backslash always starts an escape. A value that is not a string type
/// is `#` and its hex (§2.4's form).
fn subject(name: &x509_parser::x509::X509Name<'_>) -> String {
    use std::fmt::Write as _;
    use x509_parser::objects::{oid2abbrev, oid_registry};
    let mut out = String::new();
    for (i, rdn) in name.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push_str(" + ");
            }
            match oid2abbrev(atv.attr_type(), oid_registry()) {
                Ok(abbrev) => out.push_str(abbrev),
                Err(_) => out.push_str(&atv.attr_type().to_id_string()),
            }
            out.push('=');
            match atv.as_str() {
                Ok(value) => escape_dn_value(value.as_bytes(), &mut out),
                Err(_) => {
                    out.push('#');
                    for b in atv.as_slice() {
                        let _ = write!(out, "{b:02X}");
                    }
                }
            }
        }
    }
    out
}

/// RFC 4514 §2.4: `"` `+` `,` `;` `<` `>` `\\` anywhere, `#` or a space
/// first and a space last after a backslash; bytes outside printable
/// ASCII (controls, UTF-8) as a backslash and two hex digits.
fn escape_dn_value(value: &[u8], out: &mut String) {
    use std::fmt::Write as _;
    let last = value.len().saturating_sub(1);
    for (i, &b) in value.iter().enumerate() {
        let special = matches!(b, b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\')
            || (i == 0 && matches!(b, b'#' | b' '))
            || (i == last && b == b' ');
        if special {
            out.push('\\');
            out.push(b as char);
        } else if (0x20..0x7f).contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\{b:02X}");
        }
    }
}

/// `s` with every byte outside printable ASCII, and `\`, as `\xHH`.
fn printable(s: &str) -> Box<str> {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02X}");
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_of_the_bundle_sent_along_is_let_off_once() {
        let (a, b, x) = (
            CertificateDer::from(vec![1u8, 2, 3]),
            CertificateDer::from(vec![4u8, 5]),
            CertificateDer::from(vec![6u8]),
        );
        let anchors = [a.clone(), b.clone()];
        assert_eq!(counted(&[], &anchors), 0);
        assert_eq!(counted(std::slice::from_ref(&x), &anchors), 1);
        assert_eq!(counted(&[x.clone(), a.clone()], &anchors), 1);
        assert_eq!(counted(&[a.clone(), b.clone()], &anchors), 0);
        // Copies sent again count: a flood of them is refused by depth.
        assert_eq!(counted(&[a.clone(), a.clone(), a.clone()], &anchors), 2);
        assert_eq!(counted(&[x.clone(), a.clone()], &[]), 2);
        // A bundle that lists a CA twice (files concatenated) lets it off
        // once all the same.
        let twice = [a.clone(), a.clone()];
        assert_eq!(counted(std::slice::from_ref(&a), &twice), 0);
        assert_eq!(counted(&[a.clone(), x], &twice), 1);
        assert_eq!(counted(&[a.clone(), a], &twice), 1);
    }

    #[test]
    fn identity_reads_subject_names_and_fingerprint_and_escapes_controls() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["svc.example".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("10.0.0.9".parse().unwrap()));
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example/svc".try_into().unwrap(),
        ));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "svc\r\nX-Evil: 1");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        let cert = params.self_signed(&key).unwrap();
        let id = ClientIdentity::read(cert.der()).unwrap();
        assert_eq!(id.common_name.as_deref(), Some("svc\\x0D\\x0AX-Evil: 1"));
        assert!(
            id.subject.contains("CN=svc\\0D\\0AX-Evil: 1"),
            "{}",
            id.subject
        );
        assert!(id.subject.contains("O=Example"), "{}", id.subject);
        assert_eq!(
            &*id.sans,
            "DNS:svc.example, IP:10.0.0.9, URI:spiffe://example/svc"
        );
        assert_eq!(id.fingerprint.len(), 64);
        assert!(id
            .fingerprint
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(ClientIdentity::read(b"not a certificate").is_none());
    }

    #[test]
    fn subject_values_cannot_pose_as_other_attributes() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["svc.example".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mallory, O=Admins");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "#Users; <a+b> \"q\" ");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "https://a/x, URI:spiffe://admin".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        let id = ClientIdentity::read(cert.der()).unwrap();
        assert_eq!(
            &*id.subject,
            "CN=mallory\\, O=Admins, O=\\#Users\\; \\<a\\+b\\> \\\"q\\\"\\ "
        );
        assert_eq!(
            &*id.sans,
            "DNS:svc.example, URI:https://a/x\\x2C URI:spiffe://admin"
        );
    }
}
