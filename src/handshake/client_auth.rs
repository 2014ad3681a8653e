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
/// intermediates. Counted on what the client sends, so a client that also
/// sends the root needs one more.
#[derive(Debug)]
pub struct DepthLimited {
    /// The WebPKI verifier.
    pub inner: Arc<dyn ClientCertVerifier>,
    /// The longest chain, the client certificate included.
    pub depth: u8,
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
        if intermediates.len() >= usize::from(self.depth) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(TooDeep {
                    sent: intermediates.len(),
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
