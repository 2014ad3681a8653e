//! Sans-IO TLS client handshake, for backends (`tls` on a route): bytes
//! in, bytes and steps out, no socket, no clock — the server [`Handshake`]'s
//! counterpart, pumped by the same [`pump`].
//!
//! [`Handshake`]: super::Handshake
//! [`pump`]: super::pump

use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use super::{advance, collect_alert, Stalled, Step, MAX_INPUT, MAX_RECORD};

/// Why a backend handshake failed; the backend's side of the story.
#[derive(Debug, thiserror::Error)]
pub enum BackendTlsError {
    /// TLS failed: the backend's certificate (unknown issuer, wrong name,
    /// expired, chain too deep), its alert, or bytes that are not TLS.
    #[error("backend TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The backend closed before the handshake finished.
    #[error("the backend closed the connection during the TLS handshake")]
    Eof,
    /// The backend did not finish within the connect timeout.
    #[error("the backend's TLS handshake did not finish in time")]
    Timeout,
    /// A socket read or write failed.
    #[error("backend socket error during the TLS handshake: {0}")]
    Io(#[from] std::io::Error),
    /// A handshake message larger than we buffer.
    #[error("backend handshake message larger than {MAX_INPUT} bytes")]
    TooLarge,
}

/// A finished client handshake.
pub struct ClientEstablished {
    /// rustls' connection, for the kernel or the userspace record path.
    pub conn: UnbufferedClientConnection,
    /// Application data the backend sent right after its handshake.
    pub early_plaintext: Vec<u8>,
    /// The backend already sent close_notify.
    pub peer_closed: bool,
}

/// Sans-IO TLS client handshake (same call order as the server's).
pub struct ClientHandshake {
    conn: UnbufferedClientConnection,
    input: Vec<u8>,
    output: Vec<u8>,
    early_plaintext: Vec<u8>,
    peer_closed: bool,
    eof: bool,
}

impl ClientHandshake {
    /// Starts a handshake with a backend known as `name` (the SNI sent and
    /// the name verified).
    pub fn new(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<ClientHandshake, rustls::Error> {
        Ok(ClientHandshake {
            conn: UnbufferedClientConnection::new(config, name)?,
            input: Vec::with_capacity(MAX_RECORD),
            output: Vec::new(),
            early_plaintext: Vec::new(),
            peer_closed: false,
            eof: false,
        })
    }

    /// Advances as far as the buffered input allows. On error, the output
    /// may hold rustls' alert for the backend (best effort).
    pub fn poll(&mut self) -> Result<Step, BackendTlsError> {
        // A backend's records after the handshake are its tickets: no
        // reply is owed (and its keys go to the kernel at once or never).
        let mut after_finished = super::AfterFinished::default();
        let result = advance(
            &mut self.conn,
            &mut self.input,
            &mut self.output,
            &mut self.early_plaintext,
            &mut self.peer_closed,
            &mut after_finished,
            self.eof,
        );
        match result {
            Ok(step) => Ok(step),
            Err(Stalled::Eof) => Err(BackendTlsError::Eof),
            Err(Stalled::Closed) => {
                collect_alert(&mut self.conn, &mut self.input, &mut self.output);
                Err(BackendTlsError::Eof)
            }
            Err(Stalled::Tls(e)) => {
                collect_alert(&mut self.conn, &mut self.input, &mut self.output);
                Err(BackendTlsError::Tls(e))
            }
        }
    }
}

impl super::pump::Driver for ClientHandshake {
    type Done = ClientEstablished;
    type Error = BackendTlsError;

    fn handle_input(&mut self, bytes: &[u8]) -> Result<(), BackendTlsError> {
        if bytes.is_empty() {
            self.eof = true;
            return Ok(());
        }
        if self.input.len() + bytes.len() > MAX_INPUT {
            return Err(BackendTlsError::TooLarge);
        }
        self.input.extend_from_slice(bytes);
        Ok(())
    }

    fn poll(&mut self) -> Result<Step, BackendTlsError> {
        ClientHandshake::poll(self)
    }

    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    fn output_sent(&mut self, mut buf: Vec<u8>) {
        buf.clear();
        self.output = buf;
    }

    fn finish(self) -> ClientEstablished {
        ClientEstablished {
            conn: self.conn,
            early_plaintext: self.early_plaintext,
            peer_closed: self.peer_closed,
        }
    }

    fn eof() -> BackendTlsError {
        BackendTlsError::Eof
    }

    fn timeout() -> BackendTlsError {
        BackendTlsError::Timeout
    }
}

/// rustls' WebPKI verifier for a route's `tls.ca`, with `verify_depth` on
/// top and, with `verify_name = false`, a certificate for another name
/// accepted (its chain, dates and usage are still checked).
#[derive(Debug)]
struct BackendVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    depth: u8,
    anchors: Arc<[rustls::pki_types::CertificateDer<'static>]>,
    verify_name: bool,
}

impl rustls::client::danger::ServerCertVerifier for BackendVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as C;
        let sent = super::client_auth::counted(intermediates, &self.anchors);
        if sent >= usize::from(self.depth) {
            return Err(rustls::Error::InvalidCertificate(C::Other(
                rustls::OtherError(Arc::new(super::client_auth::TooDeep {
                    sent,
                    depth: self.depth,
                })),
            )));
        }
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            )) if !self.verify_name => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The route's `client_cert`, offered whenever a backend asks.
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Sessions remembered per backend: a handful of TLS 1.3 tickets (a
/// server sends two by default; each is single-use) and one TLS 1.2 id.
const SESSIONS_PER_BACKEND: usize = 8;

/// [`client_config`] once per protocol a `tcp` route's client may have
/// chosen: `[0]` offers no ALPN (a client that offered none), `[1 + i]`
/// offers the listener's `alpn[i]` alone, so the backend is asked for
/// what the client speaks (a gRPC server refuses a connection without
/// `h2`). They share one session store: a backend's tickets serve each.
pub fn client_configs_by_alpn(
    tls: &crate::config::UpstreamTls,
    alpn: &[String],
) -> Result<Vec<Arc<ClientConfig>>, rustls::Error> {
    let base = client_config(tls, &[])?;
    let mut out = vec![base.clone()];
    for name in alpn {
        let mut c = (*base).clone();
        c.alpn_protocols = vec![name.as_bytes().to_vec()];
        out.push(Arc::new(c));
    }
    Ok(out)
}

/// A rustls client config for one backend of a route with `tls`, with its
/// own session store (built per shard and per backend, so a ticket is
/// only offered to the server that issued it, and no lock is shared),
/// offering `alpn`: `http/1.1` to an upstream group's backends (what ktern
/// speaks to them; a backend that requires ALPN, as gRPC servers do, or
/// one that would pick h2 otherwise, then knows; RFC 7301 also keeps one
/// service's connection from being taken for another's, ALPACA), none on
/// a `tcp` route, whose bytes ktern does not read.
pub fn client_config(
    tls: &crate::config::UpstreamTls,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    if tls.versions.tls13 {
        versions.push(&rustls::version::TLS13);
    }
    if tls.versions.tls12 {
        versions.push(&rustls::version::TLS12);
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(crate::provider::crypto_provider()))
        .with_protocol_versions(&versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(BackendVerifier {
            inner: tls.verifier.clone(),
            depth: tls.verify_depth,
            anchors: tls.anchors.clone(),
            verify_name: tls.verify_name,
        }));
    let mut config = match &tls.client_cert {
        Some(key) => builder.with_client_cert_resolver(Arc::new(ClientCert(key.clone()))),
        None => builder.with_no_client_auth(),
    };
    config.resumption = if tls.session_reuse {
        rustls::client::Resumption::in_memory_sessions(SESSIONS_PER_BACKEND)
    } else {
        rustls::client::Resumption::disabled()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Secrets leave rustls for the kernel (kTLS).
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}
