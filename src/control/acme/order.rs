//! One ACME order, start to finish, on `instant-acme`: the account (kept
//! in the state directory), the order, one challenge per authorization
//! published to the shards while the CA validates, then the CSR for a key
//! made here and the issued chain.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, Der};

use super::{write_atomic, Issued};
use crate::challenges::Challenges;
use crate::config::{AcmeCert, AcmeChallenge, Certificate};

/// Why an order failed; the CA's side (`Ca`) or ours (the rest).
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA refused or could not be reached (its problem document, or
    /// the transport error).
    #[error("the CA ({step}): {source}")]
    Ca {
        /// What was being asked.
        step: &'static str,
        /// The CA's answer or the transport's error.
        #[source]
        source: instant_acme::Error,
    },
    /// A name failed validation: the CA's problem document.
    #[error("validation of {name} failed: {problem}")]
    Validation {
        /// The name being validated.
        name: String,
        /// What the CA said.
        problem: instant_acme::Problem,
    },
    /// An authorization the CA will not validate (deactivated, expired,
    /// revoked, or failed earlier).
    #[error("the authorization for {name} is {status:?}")]
    Authorization {
        /// The name.
        name: String,
        /// Its status.
        status: AuthorizationStatus,
    },
    /// The CA offered no challenge of the configured type.
    #[error("the CA offers no {challenge} challenge for {name}")]
    NoChallenge {
        /// The name being validated.
        name: String,
        /// The configured challenge type.
        challenge: &'static str,
    },
    /// The ACME client panicked on what the CA answered (instant-acme adds
    /// a CA's `Retry-After` seconds to the clock unchecked): ktern's side.
    /// The order counts as failed and is retried with backoff; the other
    /// orders go on.
    #[error("internal: the ACME client panicked: {0}")]
    Panicked(String),
    /// The order did not become ready or valid.
    #[error("the order ended {status:?}{}", .problem.as_ref().map(|p| format!(": {p}")).unwrap_or_default())]
    Order {
        /// The order's final status.
        status: OrderStatus,
        /// The CA's problem document, if it gave one.
        problem: Option<instant_acme::Problem>,
    },
    /// The roots for the directory's HTTPS.
    #[error("the CA roots ({what})")]
    Roots {
        /// The configured `acme.ca` file, or the system's store.
        what: String,
        /// What is wrong with them.
        #[source]
        source: RootsError,
    },
    /// Making a key, a CSR or a challenge certificate.
    #[error("internal: {what}: {source}")]
    Key {
        /// What was being made.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// What the CA issued does not load (a chain that does not match the
    /// key, or cannot be parsed).
    #[error("the issued certificate does not load")]
    Issued(#[source] rustls::Error),
    /// What the CA issued loads, but clients would refuse it (an expired
    /// certificate in its chain, a chain out of order): what a reload
    /// refuses too.
    #[error("the issued chain would be refused: {0}")]
    Unusable(String),
    /// The challenge certificate's key does not load (internal).
    #[error("internal: the challenge key does not load")]
    ChallengeKey(#[source] rustls::Error),
    /// Reading or writing the state directory.
    #[error("state file {}: {source}", .path.display())]
    State {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The saved account does not parse.
    #[error("account file {}: {source}", .path.display())]
    Account {
        /// The account file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The whole order took too long.
    #[error("no certificate within {0:?}")]
    Timeout(std::time::Duration),
}

/// What is wrong with the roots for the directory's HTTPS.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    /// The file is not PEM certificates.
    #[error("not PEM certificates: {0}")]
    Pem(rustls::pki_types::pem::Error),
    /// rustls refused a root or the config.
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    /// The system's store could not be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn ca(step: &'static str) -> impl FnOnce(instant_acme::Error) -> AcmeError {
    move |source| AcmeError::Ca { step, source }
}

/// The HTTPS client for the directory: rustls with ktern's provider,
/// trusting `ca` alone when given, else the system's roots.
fn http_client(ca: Option<&Path>) -> Result<Box<dyn HttpClient>, AcmeError> {
    let provider = Arc::new(crate::provider::crypto_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match ca {
        Some(path) => {
            let bad = |source: RootsError| AcmeError::Roots {
                what: path.display().to_string(),
                source,
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(RootsError::Pem(e)))? {
                roots
                    .add(cert.map_err(|e| bad(RootsError::Pem(e)))?)
                    .map_err(|e| bad(e.into()))?;
            }
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| bad(e.into()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(tls)
        }
        None => builder
            .with_provider_and_native_roots(provider)
            .map_err(|e| AcmeError::Roots {
                what: "the system's CA certificates".into(),
                source: e.into(),
            })?,
    };
    let connector = builder.https_only().enable_http1().build();
    let client: hyper_util::client::legacy::Client<_, instant_acme::BodyWrapper<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    Ok(Box::new(client))
}

/// The account for `order`'s directory: restored from the state
/// directory, or registered (terms of service agreed, as every ACME
/// client's non-interactive mode does) and saved there.
async fn account(order: &AcmeCert, path: &Path) -> Result<Account, AcmeError> {
    let path = path.to_path_buf();
    let state_dir = path.parent().unwrap_or(Path::new("."));
    let http = http_client(order.ca.as_deref())?;
    match std::fs::read_to_string(&path) {
        Ok(json) => {
            let creds: AccountCredentials =
                serde_json::from_str(&json).map_err(|source| AcmeError::Account {
                    path: path.clone(),
                    source,
                })?;
            Account::builder_with_http(http)
                .from_credentials(creds)
                .await
                .map_err(ca("account"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let contact: Vec<&str> = order.contact.iter().map(String::as_str).collect();
            let (account, creds) = Account::builder_with_http(http)
                .create(
                    &NewAccount {
                        contact: &contact,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    order.directory.clone(),
                    None,
                )
                .await
                .map_err(ca("new account"))?;
            let json = serde_json::to_vec(&creds).map_err(|source| AcmeError::Account {
                path: path.clone(),
                source,
            })?;
            std::fs::create_dir_all(state_dir).map_err(|source| AcmeError::State {
                path: state_dir.to_path_buf(),
                source,
            })?;
            // The account key: readable by ktern alone.
            write_atomic(&path, &json, 0o600)?;
            tracing::info!(directory = %order.directory, account = %account.id(), file = %path.display(), "ACME: account registered");
            Ok(account)
        }
        Err(source) => Err(AcmeError::State { path, source }),
    }
}

/// A file name for a directory URL: the first 16 hex digits of its
/// SHA-256 (one account per CA, whatever the URL's characters).
fn directory_id(url: &str) -> String {
    use crate::provider::prims::digest;
    digest::digest(&digest::SHA256, url.as_bytes()).as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What was published for one authorization, withdrawn when the order
/// ends however it ends.
struct Published<'a> {
    challenges: &'a Challenges,
    entries: Vec<(String, String)>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for (name, token) in &self.entries {
            self.challenges.remove(name, token);
        }
    }
}

/// The TLS-ALPN-01 certificate for `name` (RFC 8737 §3): self-signed,
/// one dNSName, and the critical acmeIdentifier extension holding the
/// SHA-256 of the key authorization.
fn tls_alpn_certificate(
    name: &str,
    digest: &[u8],
) -> Result<Arc<rustls::sign::CertifiedKey>, AcmeError> {
    let key_err = |what| move |source| AcmeError::Key { what, source };
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(key_err("challenge certificate"))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(key_err("challenge key"))?;
    let cert = params
        .self_signed(&key)
        .map_err(key_err("challenge certificate"))?;
    // Not `CertifiedKey::from_der`: its key check parses the leaf with
    // webpki, which refuses the (deliberately) critical acmeIdentifier.
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = crate::provider::crypto_provider()
        .key_provider
        .load_private_key(der)
        .map_err(AcmeError::ChallengeKey)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

/// The account file of `order`'s CA in the state directory.
fn account_file(order: &AcmeCert, state_dir: &Path) -> PathBuf {
    state_dir
        .join("accounts")
        .join(format!("{}.json", directory_id(&order.directory)))
}

/// A certificate's identifier for ACME Renewal Information (RFC 9773
/// §4.1): its Authority Key Identifier's keyIdentifier and its serial
/// number, each as the bytes of the DER value; `None` for a certificate
/// without that identifier.
pub fn certificate_id(leaf: &CertificateDer<'_>) -> Option<CertificateIdentifier<'static>> {
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref(),
            _ => None,
        })?;
    let serial = cert.tbs_certificate.raw_serial();
    Some(CertificateIdentifier::new(Der::from_slice(aki.0), Der::from_slice(serial)).into_owned())
}

/// The CA's suggested renewal window for a certificate (RFC 9773 §4.2),
/// in Unix seconds, and how long until it may be asked again (its
/// Retry-After).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: i64,
    pub end: i64,
    pub ask_again: std::time::Duration,
}

/// Asks `order`'s CA for the renewal window of the certificate `id`;
/// `None` when its directory offers no renewal information.
pub async fn renewal_window(
    order: &AcmeCert,
    state_dir: &Path,
    id: &CertificateIdentifier<'_>,
) -> Result<Option<Window>, AcmeError> {
    let account = account(order, &account_file(order, state_dir)).await?;
    match account.renewal_info(id).await {
        Ok((info, ask_again)) => Ok(Some(Window {
            start: info.suggested_window.start.unix_timestamp(),
            end: info.suggested_window.end.unix_timestamp(),
            ask_again,
        })),
        Err(instant_acme::Error::Unsupported(_)) => Ok(None),
        Err(e) => Err(ca("renewal information")(e)),
    }
}

/// Runs one order for `order.domains` and returns the issued chain with
/// its key; `replaces`: the certificate it renews, told to a CA that offers renewal information (RFC 9773
/// §5), which may then exempt the order from its rate limits.
pub async fn obtain(
    order: &AcmeCert,
    state_dir: &Path,
    challenges: &Challenges,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Issued, AcmeError> {
    let account_file = account_file(order, state_dir);
    let account = account(order, &account_file).await?;
    let ids: Vec<Identifier> = order
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut new_order = NewOrder::new(&ids);
    if let Some(id) = replaces {
        new_order = new_order.replaces(id);
    }
    let mut new = match account.new_order(&new_order).await {
        Ok(o) => o,
        Err(e) => {
            // The CA no longer knows the saved account (a test CA's restart,
            // a staging reset): forget it, and the retry registers anew.
            if let instant_acme::Error::Api(p) = &e {
                if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist") {
                    match std::fs::remove_file(&account_file) {
                        Ok(()) => {
                            tracing::warn!(file = %account_file.display(), "ACME: the CA does not know the saved account; it was removed and a new one is registered at the retry")
                        }
                        Err(e) => {
                            tracing::error!(file = %account_file.display(), error = %e, "ACME: the CA does not know the saved account, and it cannot be removed; remove it by hand")
                        }
                    }
                }
            }
            return Err(ca("new order")(e));
        }
    };
    let (kind, kind_name) = match order.challenge {
        AcmeChallenge::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
        AcmeChallenge::Http01 => (ChallengeType::Http01, "http-01"),
    };
    let mut published = Published {
        challenges,
        entries: Vec::new(),
    };
    let mut authorizations = new.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(ca("authorization"))?;
        let name = authz.identifier().to_string();
        match authz.status {
            AuthorizationStatus::Pending => {}
            // Validated earlier (CAs reuse authorizations for a while).
            AuthorizationStatus::Valid => continue,
            status => return Err(AcmeError::Authorization { name, status }),
        }
        let Some(mut challenge) = authz.challenge(kind.clone()) else {
            return Err(AcmeError::NoChallenge {
                name,
                challenge: kind_name,
            });
        };
        let key_authorization = challenge.key_authorization();
        let token = challenge.token.clone();
        match order.challenge {
            AcmeChallenge::TlsAlpn01 => challenges.put_tls_alpn(
                &name,
                tls_alpn_certificate(&name, key_authorization.digest().as_ref())?,
            ),
            AcmeChallenge::Http01 => challenges.put_http(&token, key_authorization.as_str()),
        }
        published.entries.push((name, token));
        challenge.set_ready().await.map_err(ca("challenge ready"))?;
    }
    let status = new
        .poll_ready(&patience())
        .await
        .map_err(ca("waiting for validation"))?;
    if status != OrderStatus::Ready {
        return Err(why_not_ready(&mut new, status).await);
    }
    drop(published);
    let key = rcgen::KeyPair::generate().map_err(|source| AcmeError::Key {
        what: "certificate key",
        source,
    })?;
    let mut params =
        rcgen::CertificateParams::new(order.domains.clone()).map_err(|source| AcmeError::Key {
            what: "CSR",
            source,
        })?;
    // The CA takes the names from the SANs; an empty subject is what RFC
    // 8555 §7.4 expects.
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|source| AcmeError::Key {
            what: "CSR",
            source,
        })?;
    new.finalize_csr(csr.der()).await.map_err(ca("finalize"))?;
    let chain_pem = new
        .poll_certificate(&patience())
        .await
        .map_err(ca("certificate"))?;
    let key_pem = key.serialize_pem();
    let validity = check_issued(&chain_pem, &key_pem, crate::clock::unix_now())?;
    Ok(Issued {
        chain_pem,
        key_pem,
        validity,
    })
}

/// How long to wait for the CA to validate and to issue: polls 1 s apart
/// at first, each wait 1.3 times the last, for as long as the order may
/// take (its caller bounds it with `ORDER_TIMEOUT`). instant-acme's default
/// gives up after about 16 s (250 ms doubling, within 30 s): a CA that
/// takes longer (ZeroSSL often does, and Let's Encrypt under load) failed
/// every order, and each withdrew its challenge while the CA validated,
/// a failed validation counted against the name.
fn patience() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(std::time::Duration::from_secs(1))
        .backoff(1.3)
        .timeout(super::ORDER_TIMEOUT)
}

/// An issued chain and key, loaded as the config will load them (a chain
/// the key does not match is refused here, not at the reload) and checked
/// as a reload checks a changed certificate (`lint::certificate_errors`):
/// kept, a chain clients would refuse would make every later reload fail,
/// the operator's too, until the next order. Its validity when usable.
fn check_issued(chain_pem: &str, key_pem: &str, now: i64) -> Result<(i64, i64), AcmeError> {
    let loaded = Certificate::from_pem(chain_pem, key_pem).map_err(AcmeError::Issued)?;
    let errors = crate::config::lint::certificate_errors("issued", &loaded, now);
    if let Some(e) = errors.first() {
        return Err(AcmeError::Unusable(e.message.clone()));
    }
    Ok((loaded.info.not_before, loaded.info.not_after))
}

/// The CA's reason an order did not become ready: the first failed
/// challenge's problem (each authorization fetched afresh: the copies the
/// order holds predate the validation), else the order's.
async fn why_not_ready(order: &mut instant_acme::Order, status: OrderStatus) -> AcmeError {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let name = authz.identifier().to_string();
        let Ok(state) = authz.refresh().await else {
            continue;
        };
        if let Some(problem) = state.challenges.iter().find_map(|c| c.error.clone()) {
            return AcmeError::Validation { name, problem };
        }
    }
    AcmeError::Order {
        status,
        problem: order.state().error.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_ids_are_the_authority_key_id_and_the_serial() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(vec![0xAB; 20]);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        leaf.use_authority_key_identifier_extension = true;
        // A serial whose top bit is set: its DER value keeps a leading
        // zero byte, which the identifier keeps too (RFC 9773 §4.1).
        leaf.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x87, 0x65, 0x43, 0x21]));
        let der = leaf.signed_by(&key, &issuer).unwrap().der().clone();
        let id = certificate_id(&der).unwrap();
        // base64url without padding of 20 x 0xAB, and of 00 87 65 43 21.
        assert_eq!(id.to_string(), "q6urq6urq6urq6urq6urq6urq6s.AIdlQyE");
        // A self-signed certificate carries no authority key identifier.
        let own = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(certificate_id(own.der()).is_none());
    }

    #[test]
    fn challenge_certificates_carry_the_acme_identifier() {
        let digest = [7u8; 32];
        let ck = tls_alpn_certificate("a.example", &digest).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(ck.cert[0].as_ref()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical, "RFC 8737 §3: critical");
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(ext.value, [&[0x04, 32][..], &digest].concat());
        let info = crate::config::CertInfo::from_leaf(ck.cert[0].as_ref()).unwrap();
        assert_eq!(info.names, vec!["a.example".to_string()]);
    }

    /// An issued chain clients would refuse (here an expired leaf: an
    /// expired intermediate fails the same check) is refused as the order's
    /// failure; one that holds is kept.
    #[test]
    fn an_issued_chain_a_reload_would_refuse_fails_the_order() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        let now = crate::clock::unix_now();
        let good = params.self_signed(&key).unwrap().pem();
        assert!(check_issued(&good, &key.serialize_pem(), now).is_ok());
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let expired = params.self_signed(&key).unwrap().pem();
        match check_issued(&expired, &key.serialize_pem(), now) {
            Err(AcmeError::Unusable(why)) => assert!(why.contains("expired"), "{why}"),
            other => panic!("{:?}", other.map_err(|e| e.to_string())),
        }
        // A key that does not match: it does not load.
        let other = rcgen::KeyPair::generate().unwrap();
        assert!(matches!(
            check_issued(&good, &other.serialize_pem(), now),
            Err(AcmeError::Issued(_))
        ));
    }

    #[test]
    fn accounts_are_named_by_directory() {
        let a = directory_id("https://127.0.0.1:14000/dir");
        assert_eq!(a.len(), 16);
        assert_eq!(a, directory_id("https://127.0.0.1:14000/dir"));
        assert_ne!(
            a,
            directory_id("https://acme-v02.api.letsencrypt.org/directory")
        );
    }
}
