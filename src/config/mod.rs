//! Typed, validated configuration.
//!
//! A TOML file is parsed into `raw` structs (serde, unknown fields rejected),
//! then `validate` turns them into a [`Config`], collecting *every* problem
//! (file, field, reason) instead of stopping at the first. Nothing starts until
//! validation passes; shards get a read-only `Arc<Config>`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub mod lint;
pub mod names;
pub mod ocsp;
mod raw;

pub use raw::{Driver, KtlsMode, LogFormat, TaskRun};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the offending field, e.g. `listener[0].address`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Every problem found in one config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file the problems are in (`<embedded default>` for the built-in one).
    pub file: String,
    /// The problems, in the order found.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}: {}", self.file, p.field, p.reason)?;
        }
        Ok(())
    }
}

/// The validated configuration every shard reads.
#[derive(Debug)]
pub struct Config {
    /// Where it came from (a path, or `<embedded default>`).
    pub source: String,
    /// Process-wide settings.
    pub runtime: Runtime,
    /// Listening sockets and what is behind them.
    pub listeners: Vec<Listener>,
    /// Address of the plain-HTTP admin endpoint (`/metrics`), if any.
    pub admin: Option<SocketAddr>,
    /// Upstream groups for `http` routes.
    pub upstreams: Vec<Upstream>,
    /// Plain-HTTP listeners that answer every request with a 301 to https.
    pub redirects: Vec<Redirect>,
    /// Where HTTP access lines go (none when not configured). Opened when
    /// a generation starts, not by `ktern check`.
    pub access_log: Option<AccessLog>,
    /// Session ticket keys.
    pub tickets: Tickets,
    /// Where ACME state lives and how failed orders are retried.
    pub acme: AcmeSettings,
}

/// `[acme]`: process-wide ACME settings.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// Account keys and obtained certificates, one directory per
    /// certificate (files written then renamed).
    pub state_dir: PathBuf,
    /// The first retry's delay after a failed order; doubled per failure.
    pub retry: Duration,
    /// The longest delay between retries.
    pub retry_max: Duration,
}

/// How the CA checks that ktern controls a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// RFC 8737: answered in the TLS handshake (ALPN `acme-tls/1`) on the
    /// TLS listener, which must be the name's port 443.
    TlsAlpn01,
    /// RFC 8555 §8.3: answered on a `[[redirect]]` listener (port 80).
    Http01,
}

impl AcmeCert {
    /// Whether two entries ask for the same order (what is served now,
    /// `issued`, aside): the config check and the ACME thread's tracks
    /// both go by it.
    pub fn same_order(&self, other: &AcmeCert) -> bool {
        self.domains == other.domains
            && self.contact == other.contact
            && self.directory == other.directory
            && self.ca == other.ca
            && self.challenge == other.challenge
    }

    /// Whether a certificate kept by an order of `issued_by`'s directory
    /// is this order's: one from another CA (staging's, before a switch
    /// to production) is due for a new order at once, whatever its
    /// lifetime. A version kept before ktern recorded its directory
    /// (`None`) counts as this CA's.
    pub fn from_this_ca(&self, issued_by: Option<&str>) -> bool {
        issued_by.is_none_or(|d| d == self.directory)
    }
}

/// A certificate ktern obtains and renews itself (`certificate[].acme`).
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeCert {
    /// The names to order (DNS names, no wildcards: neither challenge can
    /// prove one), the first naming the state directory.
    pub domains: Vec<String>,
    /// Account contact URLs (`mailto:...`).
    pub contact: Vec<String>,
    /// The CA's directory URL (`https://...`).
    pub directory: String,
    /// PEM roots for the directory's HTTPS; `None`: the system's roots.
    pub ca: Option<PathBuf>,
    /// How the CA checks control of each name.
    pub challenge: AcmeChallenge,
    /// `state_dir/<first domain>`: `cert.pem` and `key.pem`.
    pub dir: PathBuf,
    /// Whether the certificate served now came from the CA (`false`: a
    /// self-signed stand-in until the first order succeeds).
    pub issued: bool,
    /// The directory URL that issued the served certificate, as its
    /// version recorded it (`None`: a stand-in, or a version kept before
    /// ktern recorded it).
    pub issued_by: Option<String>,
}

/// The shortest ticket secret accepted: 256 bits (RFC 5869 §3.3: the
/// input keying material must carry the derived keys' full strength).
pub const MIN_TICKET_SECRET: usize = 32;

/// Session tickets: where their keys come from and how often they turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tickets {
    /// The fleet's shared secret (`tickets.secret_file`); `None`: random
    /// keys of this process.
    pub secret: Option<TicketSecret>,
    /// Where the secret came from (for the lint's permission check).
    pub secret_file: Option<PathBuf>,
    /// Keys change every `rotation` (at the same moment on every host).
    pub rotation: Duration,
}

/// `tickets.rotation` when the config sets none: 12 hours.
pub const DEFAULT_TICKET_ROTATION: Duration = Duration::from_secs(43_200);

/// The longest `tickets.rotation`: 84 hours, so a ticket (open for up to
/// two rotations) never outlives 7 days.
pub const MAX_TICKET_ROTATION: u64 = 302_400;

/// The largest secret file read (a secret is 32 bytes).
const MAX_SECRET_FILE: u64 = 4096;

/// The largest file named by the config (and the config itself) that is
/// read whole: certificate chains, keys, CA bundles, CRLs, OCSP responses.
/// Far above any of them (every public root CA in one bundle is about
/// 200 KiB), so that a wrong path (a log, a disk image) is refused with a
/// reason instead of filling memory at a reload.
pub const MAX_CONFIG_FILE: u64 = 64 << 20;

/// Reads a regular file of at most `max` bytes whole. Anything else is
/// refused, not read: a device such as /dev/zero or /dev/urandom would be
/// read forever, a FIFO would block the reload, and a file over `max`
/// bytes (or one that grew past it while read) could fill memory. `what`
/// names the kind of file in the error.
pub fn read_capped(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    // The type from the path, before any open: opening a FIFO waits for a
    // writer, and opening some devices does something (a watchdog arms).
    if !std::fs::metadata(path).map_err(cannot)?.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    // No O_NONBLOCK: an open under a lease (an NFS delegation) must wait
    // for its break, not fail. O_NOCTTY, should the path be swapped for a
    // terminal after the check.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let too_big = |n: u64| {
        format!(
            "{} has {n} bytes; {what} holds at most {max}",
            path.display()
        )
    };
    if meta.len() > max {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).map_err(cannot)?;
    if bytes.len() as u64 > max {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_capped`] for text: a config file or a PEM file.
pub fn read_text_capped(path: &Path, what: &str) -> Result<String, String> {
    String::from_utf8(read_capped(path, MAX_CONFIG_FILE, what)?)
        .map_err(|_| format!("cannot read {}: not UTF-8 text", path.display()))
}

/// Reads a secret file: a regular file of at most [`MAX_SECRET_FILE`] bytes.
fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    read_capped(path, MAX_SECRET_FILE, "a ticket secret file")
}

/// Secret bytes, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketSecret(pub Vec<u8>);

impl fmt::Debug for TicketSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TicketSecret({} bytes)", self.0.len())
    }
}

/// The access log's destination and layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    /// A file (appended to, created if missing), or `-` for stdout.
    pub path: PathBuf,
    /// Line layout.
    pub format: AccessFormat,
    /// The most bytes of lines held in memory for the log's writer thread
    /// while the file or stdout's reader falls behind; lines beyond it are
    /// dropped (counted), and requests never wait for the log.
    pub queue: usize,
}

/// Access-log line layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFormat {
    /// nginx's `combined`, then `key=value` TLS and timing fields.
    Combined,
    /// One JSON object per line.
    Json,
}

/// A plain-HTTP listener answering every request with 301 to `https://`.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// Address to bind (one `SO_REUSEPORT` socket per shard).
    pub address: SocketAddr,
    /// Port for the `Location` (omitted when 443 or unset).
    pub https_port: Option<u16>,
}

/// Process-wide settings.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// CPUs to run one shard on each; empty means every CPU this process may use.
    pub cpus: Vec<usize>,
    /// Whether record crypto goes to the kernel.
    pub ktls: KtlsMode,
    /// With `ktls = "auto"`, a connection's records stay in userspace until
    /// its first bulk transfer of at least this many bytes (HTTP/1.1: a
    /// response body; a `tcp` route: the backend's bytes with nothing from
    /// the client between), then its keys go to the kernel for good; 0: at
    /// the handshake. For
    /// small records the kernel's record path costs more instructions than
    /// rustls' (bench/vm-http.sh); for bulk it costs less and allows
    /// sendfile and splice.
    pub ktls_after: u64,
    /// How long a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// io_uring submission queue entries per shard.
    pub uring_entries: u32,
    /// monoio driver choice.
    pub driver: Driver,
    /// io_uring setup flags for completion work (fall back to the
    /// kernel's default where the kernel lacks them).
    pub uring_taskrun: TaskRun,
    /// Connections one shard serves at once; more are closed at accept.
    pub max_connections: u64,
    /// After SIGTERM: how long listeners keep accepting while `/ready`
    /// answers 503 (time for health checks to withdraw the host).
    pub drain_delay: Duration,
    /// After the listeners close: how long open connections (tunnels, slow
    /// responses) get to finish before ktern exits.
    pub drain_timeout: Duration,
    /// User to switch to after binding, when started as root.
    pub user: Option<String>,
    /// Group to switch to after binding (default: the user's group).
    pub group: Option<String>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Unix socket a new binary takes the listening sockets from
    /// (`ktern run --upgrade-from`).
    pub upgrade_socket: Option<PathBuf>,
    /// Give freed heap memory back to the kernel after a burst of
    /// connections ends.
    pub memory_trim: bool,
}

/// A listening address with its certificates and route.
#[derive(Debug)]
pub struct Listener {
    /// Name used in logs and metrics.
    pub name: String,
    /// Address to bind (one `SO_REUSEPORT` socket per shard).
    pub address: SocketAddr,
    /// `listen(2)` backlog per shard socket.
    pub backlog: u32,
    /// Certificates; the first is the default when SNI matches none.
    pub certificates: Vec<Certificate>,
    /// Refuse a hello whose SNI is missing or matches no certificate
    /// (`unrecognized_name`) instead of serving the default.
    pub strict_sni: bool,
    /// Connections one client (an IPv4 address or IPv6 /64; the PROXY
    /// header's address where there is one) may hold open on this
    /// listener, counted across the process; more are closed at once.
    /// 0: no limit.
    pub max_conns_per_client: u32,
    /// Connections start with a PROXY protocol header (v1 or v2) from a
    /// load balancer in front; `None`: they do not.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Client certificates asked for and verified (mTLS).
    pub client_auth: Option<ClientAuth>,
    /// TLS versions offered.
    pub tls_versions: TlsVersions,
    /// Cipher suites offered (every one of them in the build's provider),
    /// most preferred first; empty: all of the provider's, AES-128-GCM
    /// before AES-256-GCM before ChaCha20-Poly1305
    /// (`handshake::listener_provider`).
    pub cipher_suites: Vec<rustls::CipherSuite>,
    /// The server's suite order decides, not the client's (nginx's
    /// `ssl_prefer_server_ciphers`), except for a client that lists a
    /// ChaCha20-Poly1305 suite first (no AES instructions, most likely):
    /// it gets its own order.
    pub prefer_server_ciphers: bool,
    /// Key exchange groups, most preferred first; empty: the provider's
    /// (X25519MLKEM768, X25519, P-256, P-384 with aws-lc-rs).
    pub kx_groups: Vec<rustls::NamedGroup>,
    /// ALPN protocol names offered, most preferred first (RFC 7301); empty:
    /// no ALPN (a client's offer is ignored).
    pub alpn: Vec<String>,
    /// Where decrypted bytes go.
    pub route: Route,
}

impl Listener {
    /// What binds this listener's session tickets: its name (a ticket
    /// issued on one listener never resumes on another), and whether it
    /// asks for client certificates and requires one, since rustls checks
    /// neither on resumption (a resumed session skips the certificate
    /// request): a session without a certificate must not resume where
    /// one became required. The CAs, CRLs and depth are not bound: a
    /// resumed session's chain is verified again against the current ones
    /// (`handshake::client_auth::still_valid`), so a CRL refreshed every
    /// few hours no longer sends every client to a full handshake, nor
    /// splits a fleet's tickets while its hosts reload at different times.
    pub fn ticket_context(&self) -> Vec<u8> {
        let mut context = self.name.as_bytes().to_vec();
        if let Some(auth) = &self.client_auth {
            context.extend_from_slice(b"\0client_auth\0");
            context.push(u8::from(auth.required));
        }
        context
    }

    /// A listener with one certificate and a `tcp` route to nowhere: what
    /// the handshake needs from a config, for tools, fuzzing, benchmarks
    /// and tests that build a server without a config file.
    pub fn standalone(name: &str, certificate: Certificate, tls_versions: TlsVersions) -> Listener {
        Listener {
            name: name.into(),
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            backlog: 16,
            certificates: vec![certificate],
            strict_sni: false,
            max_conns_per_client: 0,
            proxy_protocol: None,
            client_auth: None,
            tls_versions,
            cipher_suites: Vec::new(),
            prefer_server_ciphers: true,
            kx_groups: Vec::new(),
            alpn: Vec::new(),
            route: Route::Tcp(TcpRoute {
                backends: Vec::new(),
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
                send_proxy: None,
                tls: None,
            }),
        }
    }
}

/// The PROXY protocol on a listener (HAProxy's spec, v1 and v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// Who may send the header; connections from elsewhere are closed.
    pub trusted: Vec<Cidr>,
    /// The whole header must arrive within this.
    pub timeout: Duration,
}

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR` or `ADDR/PREFIX`. An IPv4-mapped IPv6 range
    /// (`::ffff:10.0.0.0/104`) becomes the IPv4 range it names, as peers
    /// are compared in IPv4 form; one wider than the mapped block (under
    /// /96) is refused, as it could never match an IPv4 peer as written.
    pub fn parse(text: &str) -> Option<Cidr> {
        use std::net::IpAddr::{V4, V6};
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (
                a.parse::<std::net::IpAddr>().ok()?,
                Some(p.parse::<u8>().ok()?),
            ),
            None => (text.parse().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return None;
        }
        match addr {
            V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => Some(Cidr {
                    addr: V4(v4),
                    prefix: prefix - 96,
                }),
                Some(_) => None,
                None => Some(Cidr { addr, prefix }),
            },
            V4(_) => Some(Cidr { addr, prefix }),
        }
    }

    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address, as a
    /// dual-stack listener reports IPv4 peers, counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        match (self.addr, ip.to_canonical()) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A certificate chain with its key, and the SNI names it answers for.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// Chain and signing key, already checked to match.
    pub key: Arc<CertifiedKey>,
    /// The names (lower case) that select this certificate: exact DNS
    /// names and one-label `*.` wildcards, from `server_names` when given,
    /// else from the certificate's subjectAltName (DNS and IP entries).
    pub server_names: Vec<String>,
    /// Where it came from and what its leaf says (for `/certs` and the
    /// expiry gauge).
    pub info: CertInfo,
    /// Set when ktern's ACME client obtains and renews this certificate.
    pub acme: Option<Arc<AcmeCert>>,
}

impl Certificate {
    /// A certificate from PEM text (the chain, then its key), answering
    /// for any name; the key must match the leaf.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Certificate, rustls::Error> {
        let bad = |what: &str| rustls::Error::General(format!("bad PEM {what}"));
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| bad("key"))?;
        // Text with no CERTIFICATE block parses as an empty chain: a CA's
        // answer that is no certificate, or an emptied state file.
        let leaf = chain
            .first()
            .ok_or_else(|| bad("certificate: none in it"))?;
        let mut info = CertInfo::from_leaf(leaf.as_ref()).unwrap_or_default();
        let key = CertifiedKey::from_der(chain, key, &crate::provider::crypto_provider())?;
        info.key_type = format!("{:?}", key.key.algorithm());
        Ok(Certificate {
            key: Arc::new(key),
            server_names: Vec::new(),
            info,
            acme: None,
        })
    }
}

/// The symlink in an ACME order's directory naming the version served.
pub const ACME_CURRENT: &str = "current";

/// The file in an ACME version naming the directory URL that issued it.
pub const ACME_ISSUED_BY: &str = "directory";

/// A certificate an ACME order kept, and the CA directory it came from
/// (`None` for a version kept before ktern recorded it).
pub struct Held {
    /// The certificate and key, ready to serve.
    pub certificate: Certificate,
    /// The directory URL recorded beside them.
    pub issued_by: Option<String>,
}

/// The certificate an ACME order left in `dir` (the version
/// `dir/current` links to: its `cert.pem` and `key.pem`), if there is one
/// that has not expired at `now`. The link is resolved once, so both files
/// come from one version even while a new one is swapped in. No link yet
/// is `Ok(None)`; a version whose files cannot be read, or do not make a
/// certificate and its key (a hand-edited or half-restored state
/// directory), is an error naming the file.
pub fn held_certificate(dir: &Path, now: i64) -> Result<Option<Held>, String> {
    let link = dir.join(ACME_CURRENT);
    let version = match std::fs::read_link(&link) {
        Ok(v) => dir.join(v),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", link.display())),
    };
    let (cert_file, key_file) = (version.join("cert.pem"), version.join("key.pem"));
    let read = |f: &Path| read_text_capped(f, "a PEM file");
    let (chain, key) = (read(&cert_file)?, read(&key_file)?);
    let mut c = Certificate::from_pem(&chain, &key)
        .map_err(|e| format!("{} with {}: {e}", cert_file.display(), key_file.display()))?;
    if c.info.not_after <= now {
        return Ok(None);
    }
    c.info.cert_file = cert_file.display().to_string();
    c.info.key_file = key_file.display().to_string();
    let issued_by = read_text_capped(&version.join(ACME_ISSUED_BY), "an ACME issuer file")
        .ok()
        .map(|d| d.trim().to_string());
    Ok(Some(Held {
        certificate: c,
        issued_by,
    }))
}

/// Facts about a certificate, read once when the config is loaded.
#[derive(Debug, Clone, Default)]
pub struct CertInfo {
    /// The certificate file as configured.
    pub cert_file: String,
    /// The key file as configured.
    pub key_file: String,
    /// Leaf subject (RFC 4514 string).
    pub subject: String,
    /// Leaf issuer.
    pub issuer: String,
    /// Leaf notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// Leaf notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// DNS names and IP addresses from the subjectAltName extension.
    pub names: Vec<String>,
    /// The key's signature algorithm (`ECDSA`, `RSA`, `ED25519`).
    pub key_type: String,
    /// SHA-256 of the leaf certificate (hex), as clients see it.
    pub sha256: String,
    /// The OCSP response file as configured.
    pub ocsp_file: Option<String>,
    /// The stapled OCSP response's nextUpdate (Unix time): not stapled
    /// from then on.
    pub ocsp_until: Option<i64>,
    /// Why the configured OCSP response is not stapled.
    pub ocsp_problem: Option<String>,
}

impl CertInfo {
    /// Reads the facts from a DER leaf certificate.
    pub fn from_leaf(der: &[u8]) -> Result<CertInfo, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("cannot parse the leaf certificate: {e}"))?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => names.push(d.to_string()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => names.push(
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                                .to_string(),
                        ),
                        16 => names.push(
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                                .to_string(),
                        ),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        let digest = sha256_hex(der);
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            names,
            sha256: digest,
            ..CertInfo::default()
        })
    }
}

/// SHA-256 in hex, from the build's crypto library.
fn sha256_hex(data: &[u8]) -> String {
    use crate::provider::prims::digest;
    digest::digest(&digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// TLS protocol versions a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsVersions {
    /// TLS 1.2 (RFC 5246).
    pub tls12: bool,
    /// TLS 1.3 (RFC 8446).
    pub tls13: bool,
}

/// What a listener does with the decrypted stream.
#[derive(Debug, Clone)]
pub enum Route {
    /// Layer 4: pipe bytes to a TCP backend both ways.
    Tcp(TcpRoute),
    /// HTTP/1.1 reverse proxy to upstream groups chosen by Host and path.
    Http(HttpRoute),
    /// TLS not terminated: the ClientHello's SNI (and ALPN) picks an
    /// upstream group, and the bytes go through untouched.
    Passthrough(PassthroughRoute),
}

impl Route {
    /// The idle timeout for connections on this route.
    pub fn idle_timeout(&self) -> Duration {
        match self {
            Route::Tcp(t) => t.idle_timeout,
            Route::Http(h) => h.keepalive_timeout,
            Route::Passthrough(p) => p.idle_timeout,
        }
    }
}

/// A `passthrough` route: routing by the ClientHello, bytes untouched.
#[derive(Debug, Clone)]
pub struct PassthroughRoute {
    /// Rules, most specific first (exact names, then the longest
    /// wildcard, then `*`); the first match wins.
    pub rules: Vec<PassthroughRule>,
    /// The upstream group (index into [`Config::upstreams`]) for a hello
    /// no rule matches, one without SNI included; `None`: closed.
    pub default: Option<usize>,
    /// A connection with no bytes moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed for the whole ClientHello to arrive.
    pub hello_timeout: Duration,
    /// A PROXY protocol header sent first on each backend connection.
    pub send_proxy: Option<ProxyVersion>,
}

/// One `passthrough` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughRule {
    /// The SNI it matches (a hello without SNI matches none).
    pub sni: HostMatch,
    /// Only hellos offering this ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// The upstream group (index into [`Config::upstreams`]).
    pub upstream: usize,
}

impl PassthroughRoute {
    /// The upstream group for a hello with `sni` offering `alpn`.
    pub fn pick(&self, sni: Option<&str>, alpn: &[Vec<u8>]) -> Option<usize> {
        let Some(name) = sni else {
            return self.default;
        };
        self.rules
            .iter()
            .find(|r| r.sni.matches(name) && r.alpn.as_ref().is_none_or(|a| alpn.contains(a)))
            .map(|r| r.upstream)
            .or(self.default)
    }
}

/// An `http` route.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    /// Routing rules, most specific first (exact host, then longest
    /// wildcard, then any host; longest path prefix first within each).
    pub rules: Vec<Rule>,
    /// Largest request body (413 above it).
    pub max_body: u64,
    /// Time allowed for a request head to arrive once started (408).
    pub head_timeout: Duration,
    /// Idle time allowed between requests on a kept-alive connection.
    pub keepalive_timeout: Duration,
    /// Time allowed for each write of response bytes to the client (a
    /// client that stops reading is aborted after it).
    pub send_timeout: Duration,
    /// Least average rate of a request body, in bytes a second, once
    /// `head_timeout` has passed since it began (408 below it); 0: none.
    pub min_body_rate: u64,
    /// Clients whose X-Forwarded-*/Forwarded fields are kept and extended.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Add X-Forwarded-For/-Proto/-Host.
    pub x_forwarded: bool,
    /// Add RFC 7239 Forwarded.
    pub forwarded: bool,
    /// `Strict-Transport-Security` value added to every response, if set
    /// (RFC 6797), e.g. `max-age=63072000; includeSubDomains`.
    pub hsts: Option<String>,
    /// HTTP/2 limits.
    pub http2: Http2,
}

/// HTTP/2 limits for one `http` route (RFC 9113 §6.5.2 settings and
/// ktern's flood defences).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2 {
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE; larger header blocks (CONTINUATION
    /// floods among them, CVE-2024-27316) end the connection.
    pub max_header_list_size: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE: request body bytes a stream may send
    /// ahead of the backend.
    pub stream_window: u32,
    /// The connection's receive window.
    pub connection_window: u32,
    /// Response bytes buffered per stream for a client that does not read.
    pub send_buffer: usize,
    /// Streams the client may reset before they are accepted (rapid
    /// reset, CVE-2023-44487); more is ENHANCE_YOUR_CALM.
    pub max_pending_resets: usize,
    /// Streams ktern may have to reset for the client's errors
    /// ("MadeYouReset"); more is ENHANCE_YOUR_CALM.
    pub max_error_resets: usize,
    /// Control frames (SETTINGS, PING, RST_STREAM, empty DATA or HEADERS)
    /// allowed per connection beyond ten per request; more is
    /// ENHANCE_YOUR_CALM.
    pub max_control_frames: u32,
    /// WebSocket over HTTP/2 (RFC 8441 extended CONNECT) to HTTP/1.1
    /// backends: SETTINGS_ENABLE_CONNECT_PROTOCOL is sent.
    pub websocket: bool,
}

impl Default for Http2 {
    /// The defaults a config without `[listener.route.http2]` gets.
    fn default() -> Self {
        let mut v = Validator {
            problems: Vec::new(),
            base: Path::new(""),
            inline_pems: &[],
            acme: None,
            upstream_names: Vec::new(),
        };
        v.http2("", &raw::Http2Section::default())
    }
}

/// Which hosts a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Exactly this name (lower case, no port).
    Exact(String),
    /// Any name ending in this suffix (`*.example.com` → `.example.com`).
    Suffix(String),
    /// Every host.
    Any,
}

impl HostMatch {
    /// Does `host` (lower case, port stripped) match?
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h == host,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            HostMatch::Any => true,
        }
    }

    /// Does a connection's SNI match? Without SNI only `Any` does.
    pub fn matches_sni(&self, sni: Option<&str>) -> bool {
        match sni {
            Some(name) => self.matches(name),
            None => *self == HostMatch::Any,
        }
    }

    fn rank(&self) -> (u8, usize) {
        match self {
            HostMatch::Exact(_) => (0, 0),
            HostMatch::Suffix(s) => (1, usize::MAX - s.len()),
            HostMatch::Any => (2, 0),
        }
    }
}

/// One routing rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Host match (the request's Host, port stripped).
    pub host: HostMatch,
    /// SNI match (the server name from the ClientHello; a connection
    /// without SNI matches only `Any`).
    pub sni: HostMatch,
    /// Path prefix.
    pub path: String,
    /// Where matching requests go.
    pub target: Target,
}

/// What a rule does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Proxy to this upstream group (index into [`Config::upstreams`]).
    Upstream(usize),
    /// Serve files under this directory (canonical path); the whole
    /// request path is looked up under it, as nginx's `root`.
    Static(PathBuf),
}

/// A backend and its share of the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightedBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Relative weight (1 unless `weight=N`).
    pub weight: u32,
    /// Connections in use at once, for the whole process (`max_conns=N`,
    /// or the group's `max_conns`; 0: no cap). Idle pooled connections
    /// are not counted, as in nginx.
    pub max_conns: u32,
}

/// How an upstream group picks a backend for each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round robin (nginx's).
    RoundRobin,
    /// Fewest in-flight requests per weight, on this shard.
    LeastConn,
    /// Consistent hashing: the same key goes to the same backend, on every
    /// shard and every host with the same backend list.
    Hash(HashKey),
}

/// What `balance = "hash"` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address.
    ClientIp,
    /// A request header's value (lower-case name); round robin without it.
    Header(String),
}

/// Active health checks: `GET path` (or a bare connect) on every backend
/// each `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What a check does.
    pub kind: HealthKind,
    /// Request path (`Http`).
    pub path: String,
    /// Host header (default: the backend's address; `Http`).
    pub host: Option<String>,
    /// Time between checks of one backend.
    pub interval: Duration,
    /// Time allowed for connect plus response head.
    pub timeout: Duration,
    /// Consecutive passes that bring a backend back.
    pub rise: u32,
    /// Consecutive failures that take it out.
    pub fall: u32,
}

/// What an active health check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthKind {
    /// `GET path` (over the group's PROXY header and TLS, if it has them);
    /// a 2xx or 3xx passes.
    Http,
    /// A TCP connect (and the group's PROXY header) passes, as HAProxy's
    /// plain `check`: for backends that speak no HTTP in the clear, such as
    /// a passthrough route's, which get the client's TLS.
    Tcp,
}

/// A named group of HTTP backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// Name from the config.
    pub name: String,
    /// Backends with their weights.
    pub backends: Vec<WeightedBackend>,
    /// How a backend is picked.
    pub balance: Balance,
    /// Active health checks, if configured.
    pub health: Option<HealthCheck>,
    /// Time allowed per TCP connect (502 after every backend failed).
    pub connect_timeout: Duration,
    /// Time allowed for the response head after the request went out (504).
    pub response_timeout: Duration,
    /// Idle connections kept per shard.
    pub pool_size: usize,
    /// Idle pooled connections older than this are closed, not reused.
    pub pool_idle_timeout: Duration,
    /// Consecutive failures that take a backend out of rotation (0: never).
    pub max_fails: u32,
    /// How long a failed backend stays out of rotation.
    pub fail_timeout: Duration,
    /// A PROXY protocol header first on each new backend connection. Such
    /// a connection speaks for one client, so it is reused only by that
    /// client's connection (HAProxy's "private" connections), never pooled
    /// for others.
    pub send_proxy: Option<ProxyVersion>,
    /// TLS to the backends (after the PROXY header, if any); `None`: plain
    /// HTTP.
    pub tls: Option<UpstreamTls>,
}

/// A layer-4 route.
#[derive(Debug, Clone)]
pub struct TcpRoute {
    /// Backends, tried round robin; a refused connect moves to the next one.
    pub backends: Vec<SocketAddr>,
    /// Time allowed for the TCP connect to one backend.
    pub connect_timeout: Duration,
    /// A connection with no bytes moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// A PROXY protocol header sent first on each backend connection.
    pub send_proxy: Option<ProxyVersion>,
    /// TLS to the backends; `None`: plain TCP.
    pub tls: Option<UpstreamTls>,
}

/// TLS to a route's or an upstream group's backends (`tls = { ... }`,
/// nginx's `proxy_ssl_*`). The verifier is built at load, so a bundle
/// rustls refuses is a config error; each shard builds its client configs
/// from this.
///
/// Equal only to itself (the same load): the `ca` and `client_cert`
/// files are read again at each reload, so an upstream group with `tls`
/// counts as changed then and gets new client configs with what the files
/// hold now.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// rustls' WebPKI verifier for the `ca` bundle.
    pub verifier: Arc<rustls::client::WebPkiServerVerifier>,
    /// The longest chain, the backend certificate included (as
    /// `client_auth.verify_depth`).
    pub verify_depth: u8,
    /// The `ca` bundle's certificates: a backend that sends one of them
    /// too does not have it counted against `verify_depth`.
    pub anchors: Arc<[CertificateDer<'static>]>,
    /// The name sent as SNI and verified; `None`: each backend's IP
    /// address (verified against IP SANs; no SNI is sent for an address).
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
    /// Check the certificate's names; off, a certificate for another name
    /// is accepted (the chain, dates and usage are still checked).
    pub verify_name: bool,
    /// A client certificate for backends that ask for one.
    pub client_cert: Option<Arc<CertifiedKey>>,
    /// TLS versions offered.
    pub versions: TlsVersions,
    /// Resume sessions with each backend (tickets kept per shard and per
    /// backend).
    pub session_reuse: bool,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &UpstreamTls) -> bool {
        Arc::ptr_eq(&self.verifier, &other.verifier)
    }
}

/// Client certificate authentication on a listener (`client_auth`).
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// `required`: a client without a certificate is refused
    /// (`certificate_required`); `optional`: it is served, unverified.
    pub required: bool,
    /// The longest chain, as nginx's `ssl_verify_depth`: 1 is a
    /// certificate issued by a CA of the bundle; each more allows one
    /// intermediate.
    pub verify_depth: u8,
    /// The bundle's certificates: a client that sends one of them too
    /// does not have it counted against `verify_depth`.
    pub anchors: Arc<[CertificateDer<'static>]>,
    /// rustls' verifier for the bundle and CRLs, built at load (so a
    /// bundle rustls refuses is a config error).
    pub verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// The earliest nextUpdate of the CRLs (Unix seconds), if any: past
    /// it every client certificate is refused, as OpenSSL (nginx,
    /// HAProxy) refuses on an expired CRL, until a reload reads a fresh one.
    pub crl_next_update: Option<i64>,
}

/// rustls' verifier for `roots` and `crls`.
fn client_verifier(
    roots: Vec<CertificateDer<'static>>,
    crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
    required: bool,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, rustls::server::VerifierBuilderError>
{
    let mut store = rustls::RootCertStore::empty();
    let (_added, _ignored) = store.add_parsable_certificates(roots);
    let mut builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        Arc::new(crate::provider::crypto_provider()),
    )
    .with_crls(crls)
    // An expired CRL no longer says which certificates are revoked (RFC
    // 5280 §5.1.2.5): rustls' default reads it as current for ever, so a
    // client revoked after it was issued would be let in with no sign.
    .enforce_revocation_expiration();
    if !required {
        builder = builder.allow_unauthenticated();
    }
    builder.build()
}

/// The PROXY protocol version ktern sends (`send_proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    /// The text line (spec §2.1).
    V1,
    /// The binary header (spec §2.2).
    V2,
}

/// The config `ktern run` uses when no file is given: 127.0.0.1:8443, a
/// self-signed certificate made at start, in front of the built-in backend.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// Placeholder in [`EMBEDDED_DEFAULT`] replaced by the built-in backend's address.
pub const BUILTIN_BACKEND_PLACEHOLDER: &str = "@builtin-backend@";

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = read_text_capped(path, "a config file").map_err(|reason| ConfigError {
            file: file.clone(),
            problems: vec![Problem {
                field: "(file)".into(),
                reason,
            }],
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::from_toml(&text, &file, &base, &[])
    }

    /// Parses and validates TOML text. Relative certificate paths resolve
    /// against `base`. `inline_pems` maps pseudo-paths (`inline:NAME`) to PEM
    /// text, used for the generated self-signed certificate of the default.
    pub fn from_toml(
        text: &str,
        file: &str,
        base: &Path,
        inline_pems: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: file.to_string(),
            problems,
        };
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            fail(vec![Problem {
                field: raw::toml_error_field(text, &e),
                reason: e.message().to_string() + &raw::toml_error_position(text, &e),
            }])
        })?;
        let mut v = Validator {
            problems: Vec::new(),
            base,
            inline_pems,
            acme: None,
            upstream_names: Vec::new(),
        };
        let config = v.config(raw, file);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(v.problems))
        }
    }
}

struct Validator<'a> {
    problems: Vec<Problem>,
    base: &'a Path,
    inline_pems: &'a [(String, String)],
    /// `[acme]`, read before the listeners (their ACME certificates live
    /// in its state directory).
    acme: Option<AcmeSettings>,
    /// Every `[upstream.NAME]` in the file, those with problems too: a
    /// rule naming one of those is not also told it is undefined.
    upstream_names: Vec<String>,
}

impl Validator<'_> {
    fn problem(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn config(&mut self, raw: raw::RawConfig, file: &str) -> Config {
        self.acme = self.acme_settings(raw.acme);
        let runtime = self.runtime(raw.runtime);
        let upstreams = self.upstreams(raw.upstream);
        if raw.listener.is_empty() {
            self.problem("listener", "at least one [[listener]] is required");
        }
        let listeners = raw
            .listener
            .into_iter()
            .enumerate()
            .filter_map(|(i, l)| self.listener(i, l, &upstreams))
            .collect::<Vec<_>>();
        for (i, a) in listeners.iter().enumerate() {
            // (Port 0 asks the kernel for a free port each: no clash.)
            if a.address.port() != 0 && listeners[..i].iter().any(|b| b.address == a.address) {
                self.problem(
                    format!("listener[{i}].address"),
                    format!("{} is already used by another listener", a.address),
                );
            }
            // The name binds a listener's session tickets (a ticket issued
            // on one never resumes on another, handshake::tickets), its
            // metrics and its log lines: two listeners of one name would
            // let a ticket from one resume on the other, skipping the
            // other's required client certificate.
            if listeners[..i].iter().any(|b| b.name == a.name) {
                self.problem(
                    format!("listener[{i}].name"),
                    format!(
                        "{:?} is already the name of another listener (unnamed listeners are \"listener<index>\")",
                        a.name
                    ),
                );
            }
        }
        let admin = raw
            .admin
            .and_then(|a| self.addr("admin.address", &a.address));
        // The admin socket is bound first, without SO_REUSEPORT: a listener
        // sharing its port (the same address, or either one the wildcard)
        // would fail to bind at start, blamed on "another program". An
        // IPv6 wildcard admin socket takes IPv4 too (it is dual-stack;
        // listeners are IPv6-only).
        if let Some(a) = admin.filter(|a| a.port() != 0) {
            let clash = |b: SocketAddr| {
                overlaps(a, b)
                    || (a.ip() == std::net::Ipv6Addr::UNSPECIFIED && a.port() == b.port())
            };
            if listeners.iter().any(|l| clash(l.address))
                || raw
                    .redirect
                    .iter()
                    .any(|r| r.address.parse().is_ok_and(clash))
            {
                self.problem(
                    "admin.address",
                    format!("{a} shares its port with a listener or redirect on the same or a wildcard address"),
                );
            }
        }
        let redirects: Vec<Redirect> = raw
            .redirect
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let at = format!("redirect[{i}].address");
                let address = self.addr(&at, &r.address)?;
                // Sockets of one address join one SO_REUSEPORT group: a
                // redirect there would take a share of the TLS listener's
                // connections (on a reload; at start the bind fails).
                // (Port 0 asks the kernel for a free port each: no clash.)
                if address.port() != 0 && listeners.iter().any(|l| l.address == address) {
                    self.problem(&at, format!("{address} is already used by a listener"));
                }
                if r.https_port == Some(0) {
                    self.problem(
                        format!("redirect[{i}].https_port"),
                        "must be from 1 to 65535 (the port clients are sent to)",
                    );
                }
                Some(Redirect {
                    address,
                    https_port: r.https_port,
                })
            })
            .collect();
        for (i, r) in redirects.iter().enumerate() {
            if r.address.port() != 0 && redirects[..i].iter().any(|b| b.address == r.address) {
                self.problem(
                    format!("redirect[{i}].address"),
                    format!("{} is already used by another redirect", r.address),
                );
            }
        }
        self.acme_orders(&listeners, &redirects);
        let access_log = raw.access_log.and_then(|a| self.access_log(a));
        let tickets = self.tickets(raw.tickets);
        Config {
            source: file.to_string(),
            runtime,
            listeners,
            admin,
            upstreams,
            redirects,
            access_log,
            tickets: tickets.unwrap_or(Tickets {
                secret: None,
                secret_file: None,
                rotation: DEFAULT_TICKET_ROTATION,
            }),
            acme: self.acme.clone().unwrap_or(AcmeSettings {
                state_dir: PathBuf::from("/var/lib/ktern/acme"),
                retry: Duration::from_secs(600),
                retry_max: Duration::from_secs(6 * 3600),
            }),
        }
    }

    /// Checks the ACME orders against each other and the listeners: an
    /// HTTP-01 order needs a redirect listener to answer on, and two
    /// orders sharing a state directory (their first name) must be the
    /// same order.
    fn acme_orders(&mut self, listeners: &[Listener], redirects: &[Redirect]) {
        // By state directory: tens of thousands of orders are looked up
        // in constant time each (a list made each load quadratic).
        let mut seen: std::collections::HashMap<&Path, &AcmeCert> = Default::default();
        for (i, l) in listeners.iter().enumerate() {
            for (j, c) in l.certificates.iter().enumerate() {
                let Some(a) = &c.acme else { continue };
                let at = format!("listener[{i}].certificate[{j}].acme");
                if a.challenge == AcmeChallenge::Http01 && redirects.is_empty() {
                    self.problem(
                        format!("{at}.challenge"),
                        "http-01 is answered on a [[redirect]] listener (port 80): add one, or use tls-alpn-01",
                    );
                }
                match seen.get(a.dir.as_path()) {
                    Some(s) if !s.same_order(a) => {
                        self.problem(
                            format!("{at}.domains"),
                            format!(
                                "another acme certificate starts with {:?} but differs (the state directory is named by the first domain, so they are one order): make them identical, or start one with another name",
                                a.domains[0]
                            ),
                        )
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(&a.dir, a);
                    }
                }
            }
        }
    }

    fn acme_settings(&mut self, raw: raw::AcmeSection) -> Option<AcmeSettings> {
        let retry = self.duration("acme.retry", &raw.retry);
        let retry_max = self.duration("acme.retry_max", &raw.retry_max);
        let (retry, retry_max) = (retry?, retry_max?);
        if retry.is_zero() || retry > retry_max {
            self.problem(
                "acme.retry",
                "must be more than zero and at most acme.retry_max",
            );
            return None;
        }
        Some(AcmeSettings {
            state_dir: self.base.join(raw.state_dir),
            retry,
            retry_max,
        })
    }

    /// An ACME certificate entry: the order as data, and what to serve
    /// now: the last certificate obtained (from the state directory) while
    /// it is valid, else a self-signed stand-in for the names until the
    /// first order succeeds. Nothing is created here (`ktern check` must
    /// not); the ACME thread makes the directory.
    fn acme_certificate(&mut self, at: &str, raw: &raw::AcmeCertSection) -> Option<Certificate> {
        let field = format!("{at}.acme");
        let mut ok = true;
        if raw.domains.is_empty() {
            self.problem(format!("{field}.domains"), "at least one name is required");
            ok = false;
        }
        let mut domains = Vec::with_capacity(raw.domains.len());
        for (k, d) in raw.domains.iter().enumerate() {
            let d = d.to_ascii_lowercase();
            if d.starts_with("*.") {
                self.problem(
                    format!("{field}.domains[{k}]"),
                    "a wildcard cannot be proven by tls-alpn-01 or http-01 (RFC 8737 §3, RFC 8555 §8.3); list the names",
                );
                ok = false;
            } else if let Err(why) = names::check(&d) {
                self.problem(format!("{field}.domains[{k}]"), why);
                ok = false;
            } else if domains.contains(&d) {
                self.problem(
                    format!("{field}.domains[{k}]"),
                    format!("{d:?} is listed twice"),
                );
                ok = false;
            } else {
                domains.push(d);
            }
        }
        for (k, c) in raw.contact.iter().enumerate() {
            if !c.starts_with("mailto:") || c.len() <= "mailto:".len() {
                self.problem(
                    format!("{field}.contact[{k}]"),
                    format!("{c:?} is not a mailto: URL (e.g. \"mailto:ops@example.com\")"),
                );
                ok = false;
            }
        }
        if !raw.directory.starts_with("https://") || raw.directory.len() <= "https://".len() {
            self.problem(
                format!("{field}.directory"),
                format!(
                    "{:?} is not an https:// URL (RFC 8555 §6.1 requires HTTPS), e.g. \"https://acme-v02.api.letsencrypt.org/directory\"",
                    raw.directory
                ),
            );
            ok = false;
        }
        let challenge = match raw.challenge.as_str() {
            "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
            "http-01" => AcmeChallenge::Http01,
            other => {
                self.problem(
                    format!("{field}.challenge"),
                    format!("{other:?} is not a challenge ktern answers (\"tls-alpn-01\" or \"http-01\")"),
                );
                ok = false;
                AcmeChallenge::TlsAlpn01
            }
        };
        let ca = match &raw.ca {
            None => None,
            Some(file) => {
                let path = self.base.join(file);
                let roots = read_capped(&path, MAX_CONFIG_FILE, "a CA bundle").and_then(|pem| {
                    match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
                        Ok(c) if !c.is_empty() => Ok(()),
                        Ok(_) => Err(format!("{}: no CERTIFICATE block found", path.display())),
                        Err(e) => Err(format!("{}: not PEM certificates: {e}", path.display())),
                    }
                });
                if let Err(why) = roots {
                    self.problem(format!("{field}.ca"), why);
                    ok = false;
                }
                Some(path)
            }
        };
        let settings = self.acme.clone()?;
        if !ok {
            return None;
        }
        let dir = settings.state_dir.join(&domains[0]);
        let kept = held_certificate(&dir, crate::clock::unix_now()).unwrap_or_else(|why| {
            // The ACME thread orders anew, as for an empty state directory;
            // meanwhile the stand-in serves.
            tracing::warn!(field = %field, problem = %why, "ACME: the state directory's certificate cannot be served; serving the stand-in and ordering anew");
            None
        });
        let (held, issued, issued_by) = match kept {
            Some(h) => (h.certificate, true, h.issued_by),
            None => {
                let names: Vec<&str> = domains.iter().map(String::as_str).collect();
                let stand_in = crate::builtin::self_signed(&names)
                    .map_err(|e| format!("cannot make the stand-in certificate: {e}"))
                    .and_then(|(c, k)| {
                        Certificate::from_pem(&c, &k)
                            .map_err(|e| format!("cannot load the stand-in certificate: {e}"))
                    });
                match stand_in {
                    Ok(mut c) => {
                        c.info.cert_file =
                            format!("acme stand-in (self-signed until {} is issued)", domains[0]);
                        (c, false, None)
                    }
                    Err(why) => {
                        self.problem(field, why);
                        return None;
                    }
                }
            }
        };
        Some(Certificate {
            server_names: domains.clone(),
            acme: Some(Arc::new(AcmeCert {
                domains,
                contact: raw.contact.clone(),
                directory: raw.directory.clone(),
                ca,
                challenge,
                dir,
                issued,
                issued_by,
            })),
            ..held
        })
    }

    fn tickets(&mut self, raw: raw::TicketsSection) -> Option<Tickets> {
        let rotation = self.duration("tickets.rotation", &raw.rotation)?;
        // A ticket opens for up to two rotations, and RFC 8446 §4.6.1 caps
        // a ticket's lifetime at 7 days.
        if rotation < Duration::from_secs(1) || rotation > Duration::from_secs(MAX_TICKET_ROTATION)
        {
            self.problem(
                "tickets.rotation",
                "must be between 1s and 84h (a ticket opens for up to two rotations, and at most 7 days: RFC 8446 §4.6.1)",
            );
            return None;
        }
        let Some(file) = raw.secret_file else {
            return Some(Tickets {
                secret: None,
                secret_file: None,
                rotation,
            });
        };
        let path = self.base.join(&file);
        match read_secret(&path) {
            Ok(bytes) if bytes.len() >= MIN_TICKET_SECRET => Some(Tickets {
                secret: Some(TicketSecret(bytes)),
                secret_file: Some(path),
                rotation,
            }),
            Ok(bytes) => {
                self.problem(
                    "tickets.secret_file",
                    format!(
                        "{} holds {} bytes; a ticket secret needs at least {MIN_TICKET_SECRET} \
                         (e.g. head -c 32 /dev/urandom > {})",
                        path.display(),
                        bytes.len(),
                        path.display()
                    ),
                );
                None
            }
            Err(reason) => {
                self.problem("tickets.secret_file", reason);
                None
            }
        }
    }

    /// Checks the access log's place without creating anything (`ktern
    /// check` must not leave a file behind): an existing file, or a
    /// directory that exists for a new one. Opening it (and so a
    /// permission problem) is the generation's start.
    fn access_log(&mut self, raw: raw::AccessLogSection) -> Option<AccessLog> {
        let format = match raw.format.as_str() {
            "combined" => AccessFormat::Combined,
            "json" => AccessFormat::Json,
            other => {
                self.problem(
                    "access_log.format",
                    format!("{other:?} is not a format (\"combined\" or \"json\")"),
                );
                return None;
            }
        };
        let queue = match parse_size(&raw.queue) {
            Some(n) if (MIN_ACCESS_QUEUE..=MAX_ACCESS_QUEUE).contains(&n) => n as usize,
            _ => {
                self.problem(
                    "access_log.queue",
                    format!(
                        "{:?} is not a size from 4k to 1g (\"4m\", \"64k\")",
                        raw.queue
                    ),
                );
                return None;
            }
        };
        let path = if raw.path == "-" {
            PathBuf::from("-")
        } else {
            self.base.join(&raw.path)
        };
        if path.as_os_str() == "-" {
            return Some(AccessLog {
                path,
                format,
                queue,
            });
        }
        let problem = match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => Some(format!("{} is a directory", path.display())),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    None => None,
                    Some(dir) => match std::fs::metadata(dir) {
                        Ok(m) if m.is_dir() => None,
                        Ok(_) => Some(format!(
                            "cannot create {}: {} is not a directory",
                            path.display(),
                            dir.display()
                        )),
                        Err(e) => Some(format!(
                            "cannot create {}: directory {}: {e}",
                            path.display(),
                            dir.display()
                        )),
                    },
                }
            }
            Err(e) => Some(format!("{}: {e}", path.display())),
        };
        match problem {
            Some(reason) => {
                self.problem("access_log.path", reason);
                None
            }
            None => Some(AccessLog {
                path,
                format,
                queue,
            }),
        }
    }

    fn upstreams(&mut self, table: toml::Table) -> Vec<Upstream> {
        let mut out = Vec::new();
        self.upstream_names = table.keys().cloned().collect();
        for (name, value) in table {
            let at = format!("upstream.{name}");
            let raw: raw::UpstreamSection = match value.try_into() {
                Ok(r) => r,
                Err(e) => {
                    // toml keeps the key's path within the section only in
                    // its Display ("...\nin `health.rise`"): the field.
                    let shown = e.to_string();
                    let field = match shown.trim_end().rsplit_once("\nin `") {
                        Some((_, path)) => format!("{at}.{}", path.trim_end_matches('`')),
                        None => at,
                    };
                    self.problem(field, e.message().to_string());
                    continue;
                }
            };
            if raw.backends.is_empty() {
                self.problem(format!("{at}.backends"), "at least one backend is required");
            }
            let backends: Vec<WeightedBackend> = raw
                .backends
                .iter()
                .enumerate()
                .filter_map(|(i, b)| {
                    self.weighted(&format!("{at}.backends[{i}]"), b, raw.max_conns)
                })
                .collect();
            for (i, b) in backends.iter().enumerate() {
                // Health and in-flight counts are kept per address: a
                // second entry would share nothing with the first.
                if backends[..i].iter().any(|o| o.addr == b.addr) {
                    self.problem(
                        format!("{at}.backends"),
                        format!("{} is listed twice (use weight=N instead)", b.addr),
                    );
                }
            }
            let balance = self.balance(&at, &raw.balance, raw.hash_key.as_deref());
            let health = raw
                .health
                .and_then(|h| self.health(&format!("{at}.health"), h));
            let connect_timeout =
                self.timeout(&format!("{at}.connect_timeout"), &raw.connect_timeout);
            let response_timeout =
                self.timeout(&format!("{at}.response_timeout"), &raw.response_timeout);
            let pool_idle_timeout =
                self.duration(&format!("{at}.pool_idle_timeout"), &raw.pool_idle_timeout);
            let fail_timeout = self.duration(&format!("{at}.fail_timeout"), &raw.fail_timeout);
            let send_proxy = self
                .send_proxy(&at, raw.send_proxy.as_deref())
                .ok()
                .flatten();
            let tls = raw
                .tls
                .and_then(|t| self.upstream_tls(&format!("{at}.tls"), t));
            out.push(Upstream {
                name,
                backends,
                connect_timeout: connect_timeout.unwrap_or_default(),
                response_timeout: response_timeout.unwrap_or_default(),
                pool_size: raw.pool_size,
                pool_idle_timeout: pool_idle_timeout.unwrap_or_default(),
                max_fails: raw.max_fails,
                fail_timeout: fail_timeout.unwrap_or_default(),
                balance: balance.unwrap_or(Balance::RoundRobin),
                health,
                send_proxy,
                tls,
            });
        }
        out
    }

    /// `ip:port`, then optionally `weight=N` (1..=1000) and `max_conns=N`
    /// (nginx's spellings); `max_conns` is the group's unless given.
    fn weighted(&mut self, field: &str, raw: &str, max_conns: u32) -> Option<WeightedBackend> {
        let mut parts = raw.split_whitespace();
        let addr = self.backend_addr(field, parts.next().unwrap_or(""))?;
        let mut b = WeightedBackend {
            addr,
            weight: 1,
            max_conns,
        };
        for p in parts {
            if let Some(w) = p.strip_prefix("weight=") {
                match w.parse::<u32>() {
                    Ok(w) if (1..=1000).contains(&w) => b.weight = w,
                    _ => {
                        self.problem(field, format!("{p:?}: weight must be from 1 to 1000"));
                        return None;
                    }
                }
            } else if let Some(m) = p.strip_prefix("max_conns=") {
                match m.parse::<u32>() {
                    Ok(m) => b.max_conns = m,
                    Err(_) => {
                        self.problem(
                            field,
                            format!("{p:?}: max_conns must be a whole number (0: no cap)"),
                        );
                        return None;
                    }
                }
            } else {
                self.problem(
                    field,
                    format!("{p:?}: expected \"weight=N\" or \"max_conns=N\" after the address"),
                );
                return None;
            }
        }
        Some(b)
    }

    fn balance(&mut self, at: &str, raw: &str, key: Option<&str>) -> Option<Balance> {
        let field = format!("{at}.balance");
        let b = match raw {
            "round_robin" => Balance::RoundRobin,
            "least_conn" => Balance::LeastConn,
            "hash" => {
                let key = match key {
                    None | Some("client_ip") => HashKey::ClientIp,
                    Some(k) => match k.strip_prefix("header:") {
                        Some(h)
                            if !h.is_empty()
                                && h.bytes().all(|b| b.is_ascii_graphic() && b != b':') =>
                        {
                            HashKey::Header(h.to_ascii_lowercase())
                        }
                        _ => {
                            self.problem(
                                format!("{at}.hash_key"),
                                format!("{k:?}: expected \"client_ip\" or \"header:NAME\""),
                            );
                            return None;
                        }
                    },
                };
                Balance::Hash(key)
            }
            other => {
                self.problem(
                    field,
                    format!("{other:?}: expected \"round_robin\", \"least_conn\" or \"hash\""),
                );
                return None;
            }
        };
        if key.is_some() && !matches!(b, Balance::Hash(_)) {
            self.problem(
                format!("{at}.hash_key"),
                "only used with balance = \"hash\"",
            );
        }
        Some(b)
    }

    fn health(&mut self, at: &str, raw: raw::HealthSection) -> Option<HealthCheck> {
        let interval = self.duration(&format!("{at}.interval"), &raw.interval);
        let timeout = self.duration(&format!("{at}.timeout"), &raw.timeout);
        let kind = match raw.check.as_deref() {
            None | Some("http") => HealthKind::Http,
            Some("tcp") => HealthKind::Tcp,
            Some(other) => {
                self.problem(
                    format!("{at}.check"),
                    format!("{other:?}: \"http\" (GET path) or \"tcp\" (a connect)"),
                );
                return None;
            }
        };
        if kind == HealthKind::Tcp {
            for (name, set) in [("path", raw.path.is_some()), ("host", raw.host.is_some())] {
                if set {
                    self.problem(
                        format!("{at}.{name}"),
                        "a check = \"tcp\" sends no request: leave it out, or use check = \"http\"",
                    );
                    return None;
                }
            }
        }
        let path = raw.path.unwrap_or_else(|| "/".into());
        if !path.starts_with('/') || path.bytes().any(|b| !b.is_ascii_graphic()) {
            self.problem(
                format!("{at}.path"),
                "an origin-form path: starts with /, no spaces or control bytes",
            );
            return None;
        }
        if let Some(h) = &raw.host {
            if h.is_empty() || h.bytes().any(|b| !b.is_ascii_graphic()) {
                self.problem(
                    format!("{at}.host"),
                    "a host name without spaces or control bytes",
                );
                return None;
            }
        }
        for (name, v) in [("rise", raw.rise), ("fall", raw.fall)] {
            if v == 0 {
                self.problem(format!("{at}.{name}"), "must be at least 1");
                return None;
            }
        }
        let (interval, timeout) = (interval?, timeout?);
        for (name, d) in [("interval", interval), ("timeout", timeout)] {
            if d.is_zero() {
                self.problem(format!("{at}.{name}"), "must be more than 0");
                return None;
            }
        }
        Some(HealthCheck {
            kind,
            path,
            host: raw.host,
            interval,
            timeout,
            rise: raw.rise,
            fall: raw.fall,
        })
    }

    /// A rule's `host` or (`sni`) server-name pattern: absent or `*` (any),
    /// an exact name, or `*.example.com`. Both are matched
    /// without a trailing dot (the Host a request is routed by loses it,
    /// as in nginx, and the ClientHello's server name never has one, RFC
    /// 6066 §3), so a pattern with one names the same host. What no
    /// request's name can be is refused: a rule that could never match.
    fn host_match(&mut self, field: &str, raw: Option<&str>, sni: bool) -> Option<HostMatch> {
        let Some(h) = raw.map(str::to_ascii_lowercase) else {
            return Some(HostMatch::Any);
        };
        if h == "*" {
            return Some(HostMatch::Any);
        }
        let h = h.strip_suffix('.').unwrap_or(&h);
        // An IPv6 address comes in brackets, as a Host carries it.
        let bare = h.strip_prefix('[').and_then(|v| v.strip_suffix(']'));
        if let Some(parent) = h.strip_prefix("*.") {
            if names::is_dns_name(parent) {
                return Some(HostMatch::Suffix(format!(".{parent}")));
            }
        } else if names::is_dns_name(h)
            || (!sni && h.parse::<std::net::Ipv4Addr>().is_ok())
            || (!sni && bare.is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok()))
        {
            // A Host may be an IP address (a request by address; IPv6 in
            // brackets, as the Host carries it); a server name never is.
            return Some(HostMatch::Exact(h.to_string()));
        }
        let what = if h.contains('*') {
            "wildcards must look like \"*.example.com\"".to_string()
        } else if sni && bare.unwrap_or(h).parse::<std::net::IpAddr>().is_ok() {
            format!("{h:?} is an IP address, which clients never send as SNI (RFC 6066 §3)")
        } else if h.contains(':') {
            format!("{h:?}: a host name without a port (an IPv6 address in brackets: \"[::1]\")")
        } else {
            format!(
                "{h:?} is not a host name (dot-separated labels of letters, digits, - and _){}",
                if sni { "" } else { " or an IP address" }
            )
        };
        self.problem(field, what);
        None
    }

    fn http_route(
        &mut self,
        at: &str,
        raw: raw::HttpRouteSection,
        upstreams: &[Upstream],
    ) -> Option<Route> {
        if raw.rule.is_empty() {
            self.problem(
                format!("{at}.rule"),
                "at least one [[listener.route.rule]] is required",
            );
        }
        let mut rules = Vec::new();
        for (i, r) in raw.rule.iter().enumerate() {
            let field = format!("{at}.rule[{i}]");
            let (Some(host), Some(sni)) = (
                self.host_match(&format!("{field}.host"), r.host.as_deref(), false),
                self.host_match(&format!("{field}.sni"), r.sni.as_deref(), true),
            ) else {
                continue;
            };
            if !r.path.starts_with('/') {
                self.problem(format!("{field}.path"), "a path prefix must start with /");
                continue;
            }
            let target = match (&r.upstream, &r.static_root) {
                (Some(name), None) => {
                    match self.upstream_index(&format!("{field}.upstream"), name, upstreams) {
                        Some(i) => Target::Upstream(i),
                        None => continue,
                    }
                }
                (None, Some(dir)) => {
                    let full = self.base.join(dir);
                    // Canonical, so the escape check compares real paths.
                    match std::fs::canonicalize(&full) {
                        Ok(root) if root.is_dir() => Target::Static(root),
                        Ok(_) => {
                            self.problem(
                                format!("{field}.static"),
                                format!("{} is not a directory", full.display()),
                            );
                            continue;
                        }
                        Err(e) => {
                            self.problem(
                                format!("{field}.static"),
                                format!("{}: {e}", full.display()),
                            );
                            continue;
                        }
                    }
                }
                _ => {
                    self.problem(
                        field,
                        "a rule needs exactly one of upstream = \"NAME\" or static = \"DIR\"",
                    );
                    continue;
                }
            };
            rules.push(Rule {
                host,
                sni,
                path: r.path.clone(),
                target,
            });
        }
        // Most specific first: the first match wins at request time. Host
        // outranks SNI (the Host names the application, RFC 9110 §7.2),
        // then the longest path prefix.
        rules.sort_by(|a, b| {
            a.host
                .rank()
                .cmp(&b.host.rank())
                .then(a.sni.rank().cmp(&b.sni.rank()))
                .then(b.path.len().cmp(&a.path.len()))
        });
        let max_body = match parse_size(&raw.max_body) {
            Some(n) => n,
            None => {
                self.problem(
                    format!("{at}.max_body"),
                    format!(
                        "{:?} is not a size (e.g. \"1m\", \"512k\", \"10485760\")",
                        raw.max_body
                    ),
                );
                0
            }
        };
        let head_timeout = self.timeout(&format!("{at}.head_timeout"), &raw.head_timeout);
        // More than 0: a WebSocket's tunnel is idle after it too, and 0
        // ended every one at the first sweep. (nginx's 0 turns keep-alive
        // off; ktern has no such switch: a short timeout comes closest.)
        let keepalive_timeout = match parse_duration(&raw.keepalive_timeout) {
            Some(d) if d.is_zero() => {
                self.problem(
                    format!("{at}.keepalive_timeout"),
                    "must be more than 0s (it also bounds an idle WebSocket; to keep connections briefly, set a short one such as \"1s\")",
                );
                None
            }
            _ => self.duration(&format!("{at}.keepalive_timeout"), &raw.keepalive_timeout),
        };
        let send_timeout = self.timeout(&format!("{at}.send_timeout"), &raw.send_timeout);
        let min_body_rate = parse_size(&raw.min_body_rate).or_else(|| {
            self.problem(
                format!("{at}.min_body_rate"),
                format!(
                    "{:?} is not a rate in bytes a second (e.g. \"500\", \"1k\"; \"0\" for none)",
                    raw.min_body_rate
                ),
            );
            None
        });
        let mut trusted = Vec::new();
        for (i, t) in raw.trusted_proxies.iter().enumerate() {
            match t.parse() {
                Ok(ip) => trusted.push(ip),
                Err(_) => self.problem(
                    format!("{at}.trusted_proxies[{i}]"),
                    format!("{t:?} is not an IP address"),
                ),
            }
        }
        let http2 = self.http2(&format!("{at}.http2"), &raw.http2);
        Some(Route::Http(HttpRoute {
            http2,
            rules,
            max_body,
            head_timeout: head_timeout?,
            keepalive_timeout: keepalive_timeout?,
            send_timeout: send_timeout?,
            min_body_rate: min_body_rate?,
            trusted_proxies: trusted,
            x_forwarded: raw.x_forwarded,
            forwarded: raw.forwarded,
            hsts: raw.hsts.filter(|h| {
                let ok = h.starts_with("max-age=") && h.bytes().all(|b| (0x20..0x7f).contains(&b));
                if !ok {
                    self.problem(
                        format!("{at}.hsts"),
                        "must be a Strict-Transport-Security value starting with max-age=",
                    );
                }
                ok
            }),
        }))
    }

    fn runtime(&mut self, raw: raw::RuntimeSection) -> Runtime {
        let available = core_affinity::get_core_ids()
            .map(|ids| ids.into_iter().map(|c| c.id).collect::<Vec<_>>())
            .unwrap_or_default();
        let cpus = raw.cpus.unwrap_or_default();
        for (i, cpu) in cpus.iter().enumerate() {
            if !available.is_empty() && !available.contains(cpu) {
                self.problem(
                    format!("runtime.cpus[{i}]"),
                    format!("CPU {cpu} is not available to this process (allowed: {available:?})"),
                );
            }
        }
        if raw.max_connections == 0 {
            // Elsewhere 0 means "no limit" (max_conns, max_conns_per_client);
            // here it would close every connection at accept.
            self.problem("runtime.max_connections", "must be at least 1");
        }
        let handshake_timeout = self
            .timeout("runtime.handshake_timeout", &raw.handshake_timeout)
            .unwrap_or(Duration::from_secs(10));
        let drain_delay = self
            .duration("runtime.drain_delay", &raw.drain_delay)
            .unwrap_or(Duration::from_secs(5));
        let drain_timeout = self
            .duration("runtime.drain_timeout", &raw.drain_timeout)
            .unwrap_or(Duration::from_secs(30));
        if let Some(user) = &raw.user {
            if let Err(e) = crate::sys::lookup_user(user) {
                self.problem("runtime.user", format!("{user:?}: {e}"));
            }
        }
        match (&raw.group, &raw.user) {
            (Some(_), None) => self.problem("runtime.group", "needs runtime.user"),
            (Some(group), Some(_)) => {
                if let Err(e) = crate::sys::lookup_group(group) {
                    self.problem("runtime.group", format!("{group:?}: {e}"));
                }
            }
            _ => {}
        }
        if !(8..=32768).contains(&raw.uring_entries) || !raw.uring_entries.is_power_of_two() {
            self.problem(
                "runtime.uring_entries",
                "must be a power of two between 8 and 32768",
            );
        }
        let ktls_after = parse_size(&raw.ktls_after).unwrap_or_else(|| {
            self.problem(
                "runtime.ktls_after",
                format!(
                    "{:?} is not a size (e.g. \"64k\", \"1m\", \"0\")",
                    raw.ktls_after
                ),
            );
            0
        });
        Runtime {
            cpus,
            ktls: raw.ktls,
            ktls_after,
            handshake_timeout,
            uring_entries: raw.uring_entries,
            driver: raw.driver,
            uring_taskrun: raw.uring_taskrun,
            max_connections: raw.max_connections,
            drain_delay,
            drain_timeout,
            user: raw.user,
            group: raw.group,
            log_format: raw.log_format,
            upgrade_socket: raw.upgrade_socket.map(|p| self.base.join(p)),
            memory_trim: raw.memory_trim,
        }
    }

    fn listener(
        &mut self,
        i: usize,
        raw: raw::ListenerSection,
        upstreams: &[Upstream],
    ) -> Option<Listener> {
        let at = format!("listener[{i}]");
        let address = self.addr(&format!("{at}.address"), &raw.address);
        if raw.backlog == 0 || raw.backlog > 65535 {
            self.problem(format!("{at}.backlog"), "must be between 1 and 65535");
        }
        let passthrough = matches!(raw.route, raw::RouteSection::Passthrough(_));
        if passthrough {
            // Nothing TLS is configured where TLS is not terminated: a
            // setting here would silently do nothing.
            let terminating = [
                ("certificate", !raw.certificate.is_empty()),
                ("client_auth", raw.client_auth.is_some()),
                ("alpn", raw.alpn.is_some()),
                ("cipher_suites", raw.cipher_suites.is_some()),
                ("prefer_server_ciphers", raw.prefer_server_ciphers.is_some()),
                ("kx_groups", raw.kx_groups.is_some()),
                ("strict_sni", raw.strict_sni),
            ];
            for (field, set) in terminating {
                if set {
                    self.problem(
                        format!("{at}.{field}"),
                        "a passthrough listener does not terminate TLS: its backends hold the certificates and TLS settings",
                    );
                }
            }
        } else if raw.certificate.is_empty() {
            self.problem(
                format!("{at}.certificate"),
                "at least one [[listener.certificate]] (cert + key) is required",
            );
        }
        let certificates = raw
            .certificate
            .iter()
            .enumerate()
            .filter_map(|(j, c)| self.certificate(&format!("{at}.certificate[{j}]"), c))
            .collect::<Vec<_>>();
        let mut tls_versions = TlsVersions {
            tls12: false,
            tls13: false,
        };
        for (j, v) in raw.tls_versions.iter().enumerate() {
            match v.as_str() {
                "1.2" => tls_versions.tls12 = true,
                "1.3" => tls_versions.tls13 = true,
                other => self.problem(
                    format!("{at}.tls_versions[{j}]"),
                    format!("unknown TLS version {other:?} (use \"1.2\" or \"1.3\")"),
                ),
            }
        }
        if raw.tls_versions.is_empty() {
            self.problem(
                format!("{at}.tls_versions"),
                "must name at least one version",
            );
        }
        let http = matches!(raw.route, raw::RouteSection::Http(_));
        let alpn = self.alpn(&format!("{at}.alpn"), raw.alpn, http);
        let proxy_protocol = match raw.proxy_protocol {
            None => None,
            Some(p) => self.proxy_protocol(&format!("{at}.proxy_protocol"), p),
        };
        let client_auth = match raw.client_auth {
            None => None,
            Some(c) => self.client_auth(&format!("{at}.client_auth"), c),
        };
        let cipher_suites = self.cipher_suites(
            &format!("{at}.cipher_suites"),
            raw.cipher_suites,
            tls_versions,
        );
        let kx_groups = self.kx_groups(&format!("{at}.kx_groups"), raw.kx_groups);
        if tls_versions.tls12
            && !kx_groups.is_empty()
            && kx_groups
                .iter()
                .all(|g| *g == rustls::NamedGroup::X25519MLKEM768)
        {
            self.problem(
                format!("{at}.kx_groups"),
                "TLS 1.2 is enabled but X25519MLKEM768 is TLS 1.3 only: add X25519, P-256 or P-384, or set tls_versions = [\"1.3\"]",
            );
        }
        let route = match raw.route {
            raw::RouteSection::Tcp(t) => self.tcp_route(&format!("{at}.route"), t),
            raw::RouteSection::Http(h) => self.http_route(&format!("{at}.route"), *h, upstreams),
            raw::RouteSection::Passthrough(p) => {
                self.passthrough_route(&format!("{at}.route"), p, upstreams)
            }
        };
        Some(Listener {
            name: raw.name.unwrap_or_else(|| format!("listener{i}")),
            address: address?,
            backlog: raw.backlog,
            certificates,
            strict_sni: raw.strict_sni,
            max_conns_per_client: raw.max_conns_per_client,
            proxy_protocol,
            client_auth,
            tls_versions,
            cipher_suites,
            prefer_server_ciphers: raw.prefer_server_ciphers.unwrap_or(true),
            kx_groups,
            alpn,
            route: route?,
        })
    }

    /// The HTTP/2 limits, each checked against RFC 9113's range.
    fn http2(&mut self, at: &str, raw: &raw::Http2Section) -> Http2 {
        let size = |this: &mut Self, field: &str, text: &str, min: u64, max: u64| -> u64 {
            match parse_size(text) {
                Some(n) if (min..=max).contains(&n) => n,
                _ => {
                    this.problem(
                        format!("{at}.{field}"),
                        format!("{text:?} must be a size from {min} to {max} bytes"),
                    );
                    min
                }
            }
        };
        // RFC 9113 §6.9.1: windows are at most 2^31-1; the initial stream
        // window at least what an empty body needs.
        const WINDOW_MAX: u64 = (1 << 31) - 1;
        let stream_window = size(self, "stream_window", &raw.stream_window, 1024, WINDOW_MAX);
        // `auto`: room for every stream's window at once, so uploads that
        // backends take slowly (whose DATA ktern releases only as they do)
        // never close the connection's window on its other streams (nginx
        // opens its to 2^31-1 at once). ktern then holds at most a
        // stream's window per stream, 6.25 MiB for a connection by default.
        let connection_window = match parse_size(&raw.connection_window) {
            _ if raw.connection_window == "auto" => {
                (u64::from(raw.max_concurrent_streams) * stream_window).clamp(65_535, WINDOW_MAX)
            }
            Some(n) if (65_535..=WINDOW_MAX).contains(&n) => n,
            _ => {
                self.problem(
                    format!("{at}.connection_window"),
                    format!(
                        "{:?} must be \"auto\" or a size from 65535 to {WINDOW_MAX} bytes",
                        raw.connection_window
                    ),
                );
                65_535
            }
        };
        let http2 = Http2 {
            max_concurrent_streams: raw.max_concurrent_streams,
            max_header_list_size: size(
                self,
                "max_header_list_size",
                &raw.max_header_list_size,
                1024,
                1 << 20,
            ) as u32,
            stream_window: stream_window as u32,
            connection_window: connection_window as u32,
            send_buffer: size(self, "send_buffer", &raw.send_buffer, 1024, 16 << 20) as usize,
            max_pending_resets: raw.max_pending_resets,
            max_error_resets: raw.max_error_resets,
            max_control_frames: raw.max_control_frames,
            websocket: raw.websocket,
        };
        // 0 would not mean "no limit": the first SETTINGS, or the first
        // stream a client resets, would end the connection.
        for (field, value) in [
            ("max_pending_resets", http2.max_pending_resets as u64),
            ("max_error_resets", http2.max_error_resets as u64),
            ("max_control_frames", u64::from(http2.max_control_frames)),
        ] {
            if value == 0 {
                self.problem(format!("{at}.{field}"), "must be at least 1");
            }
        }
        if !(1..=10_000).contains(&http2.max_concurrent_streams) {
            self.problem(
                format!("{at}.max_concurrent_streams"),
                "must be from 1 to 10000",
            );
        }
        http2
    }

    /// ALPN names (RFC 7301 §3.1: 1-255 bytes each). An `http` route
    /// offers `http/1.1` unless told otherwise and may offer nothing it
    /// does not speak; a `tcp` route passes bytes it does not read, so any
    /// name its backends speak may be offered, and none is by default.
    fn alpn(&mut self, at: &str, raw: Option<Vec<String>>, http: bool) -> Vec<String> {
        let Some(names) = raw else {
            // h2 first: a client offering both gets HTTP/2 (RFC 7301
            // §3.2 lets the server pick; browsers list h2 first too).
            return if http {
                vec!["h2".into(), "http/1.1".into()]
            } else {
                Vec::new()
            };
        };
        let mut out = Vec::new();
        for (j, name) in names.into_iter().enumerate() {
            if name.is_empty() || name.len() > 255 {
                self.problem(format!("{at}[{j}]"), "must be 1 to 255 bytes (RFC 7301)");
            } else if http && name != "http/1.1" && name != "h2" {
                self.problem(
                    format!("{at}[{j}]"),
                    format!("{name:?}: an http route speaks h2 and http/1.1 only"),
                );
            } else if out.contains(&name) {
                self.problem(format!("{at}[{j}]"), format!("{name:?} is listed twice"));
            } else {
                out.push(name);
            }
        }
        out
    }

    fn client_auth(&mut self, at: &str, raw: raw::ClientAuthSection) -> Option<ClientAuth> {
        let required = match raw.mode.as_str() {
            "required" => true,
            "optional" => false,
            other => {
                self.problem(
                    format!("{at}.mode"),
                    format!("{other:?} is not a mode (\"required\" or \"optional\")"),
                );
                return None;
            }
        };
        if raw.verify_depth == 0 {
            self.problem(
                format!("{at}.verify_depth"),
                "must be at least 1 (1: issued by a CA of the bundle)",
            );
        }
        let roots = self.ca_bundle(&format!("{at}.ca"), &raw.ca);
        let crls = match &raw.crl {
            None => Some(Vec::new()),
            Some(path) => self.read_pem(&format!("{at}.crl"), path, |pem| {
                use rustls_pki_types::CertificateRevocationListDer as Crl;
                match Crl::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>() {
                    Ok(c) if !c.is_empty() => Ok(c),
                    Ok(_) => Err("no X509 CRL block found".to_string()),
                    Err(e) => Err(format!("not PEM CRLs: {e}")),
                }
            }),
        };
        let (roots, crls) = (roots?, crls?);
        if raw.verify_depth == 0 {
            return None;
        }
        let crl_next_update = crls
            .iter()
            .filter_map(|c| {
                let (_, crl) = x509_parser::parse_x509_crl(c.as_ref()).ok()?;
                Some(crl.next_update()?.timestamp())
            })
            .min();
        let anchors: Arc<[CertificateDer<'static>]> = roots.clone().into();
        match client_verifier(roots, crls, required) {
            Ok(verifier) => Some(ClientAuth {
                required,
                verify_depth: raw.verify_depth,
                anchors,
                verifier,
                crl_next_update,
            }),
            Err(e) => {
                self.problem(
                    format!("{at}.ca"),
                    format!("unusable CA bundle or CRL: {e}"),
                );
                None
            }
        }
    }

    fn proxy_protocol(
        &mut self,
        at: &str,
        raw: raw::ProxyProtocolSection,
    ) -> Option<ProxyProtocol> {
        let timeout = self.duration(&format!("{at}.timeout"), &raw.timeout);
        if timeout == Some(Duration::ZERO) {
            self.problem(format!("{at}.timeout"), "must be more than 0s");
        }
        if raw.trusted.is_empty() {
            self.problem(
                format!("{at}.trusted"),
                "list the addresses of the load balancers that send the header (e.g. [\"10.0.0.0/8\"]); \
                 a header from anyone else would let them pick their own address",
            );
        }
        let mut trusted = Vec::new();
        for (j, t) in raw.trusted.iter().enumerate() {
            match Cidr::parse(t) {
                Some(c) => trusted.push(c),
                None => self.problem(
                    format!("{at}.trusted[{j}]"),
                    format!("{t:?} is not an address or CIDR range (e.g. \"10.0.0.0/8\", \"::1\")"),
                ),
            }
        }
        Some(ProxyProtocol {
            trusted,
            timeout: timeout?,
        })
    }

    /// Cipher suites by IANA name, each in this build's provider; every
    /// enabled version needs one of its own (rustls' TLS 1.2 suites are
    /// all ECDHE with AES-GCM or ChaCha20-Poly1305: forward secret).
    fn cipher_suites(
        &mut self,
        at: &str,
        raw: Option<Vec<String>>,
        versions: TlsVersions,
    ) -> Vec<rustls::CipherSuite> {
        let Some(names) = raw else {
            return Vec::new();
        };
        let provider = crate::provider::crypto_provider();
        let mut out = Vec::new();
        let (mut tls13, mut tls12) = (false, false);
        for (j, name) in names.iter().enumerate() {
            let found = provider.cipher_suites.iter().find(|s| {
                s.suite()
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            });
            match found {
                Some(s) if out.contains(&s.suite()) => {
                    self.problem(format!("{at}[{j}]"), format!("{name:?} is listed twice"))
                }
                Some(s) => {
                    tls13 |= s.tls13().is_some();
                    tls12 |= s.tls13().is_none();
                    out.push(s.suite());
                }
                None => self.problem(
                    format!("{at}[{j}]"),
                    format!(
                        "{name:?} is not a cipher suite of this build (it has: {})",
                        provider
                            .cipher_suites
                            .iter()
                            .filter_map(|s| s.suite().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            }
        }
        if versions.tls13 && !tls13 && !out.is_empty() {
            self.problem(at, "TLS 1.3 is enabled but no TLS13_* suite is listed");
        }
        if versions.tls12 && !tls12 && !out.is_empty() {
            self.problem(
                at,
                "TLS 1.2 is enabled but no TLS 1.2 suite (TLS_ECDHE_*) is listed: \
                 list one or set tls_versions = [\"1.3\"]",
            );
        }
        if names.is_empty() {
            self.problem(at, "must name at least one suite (or be left out)");
        }
        out
    }

    /// Key exchange groups by name (`X25519MLKEM768`, `X25519`, `P-256`
    /// or `secp256r1`, `P-384` or `secp384r1`), each in this build's
    /// provider, in the order given.
    fn kx_groups(&mut self, at: &str, raw: Option<Vec<String>>) -> Vec<rustls::NamedGroup> {
        use rustls::NamedGroup as G;
        let Some(names) = raw else {
            return Vec::new();
        };
        let provider = crate::provider::crypto_provider();
        let mut out = Vec::new();
        for (j, name) in names.iter().enumerate() {
            let group = match name.to_ascii_uppercase().as_str() {
                "X25519MLKEM768" => Some(G::X25519MLKEM768),
                "X25519" => Some(G::X25519),
                "P-256" | "SECP256R1" => Some(G::secp256r1),
                "P-384" | "SECP384R1" => Some(G::secp384r1),
                _ => None,
            };
            match group {
                None => self.problem(
                    format!("{at}[{j}]"),
                    format!("{name:?} is not a key exchange group (X25519MLKEM768, X25519, P-256, P-384)"),
                ),
                Some(g) if !provider.kx_groups.iter().any(|k| k.name() == g) => self.problem(
                    format!("{at}[{j}]"),
                    format!("{name:?} is not offered by this build's crypto provider (X25519MLKEM768 needs aws-lc-rs)"),
                ),
                Some(g) if out.contains(&g) => {
                    self.problem(format!("{at}[{j}]"), format!("{name:?} is listed twice"))
                }
                Some(g) => out.push(g),
            }
        }
        if names.is_empty() {
            self.problem(at, "must name at least one group (or be left out)");
        }
        out
    }

    fn tcp_route(&mut self, at: &str, raw: raw::TcpRouteSection) -> Option<Route> {
        if raw.backends.is_empty() {
            self.problem(format!("{at}.backends"), "at least one backend is required");
        }
        let backends: Vec<_> = raw
            .backends
            .iter()
            .enumerate()
            .filter_map(|(i, b)| self.backend_addr(&format!("{at}.backends[{i}]"), b))
            .collect();
        let connect_timeout = self.timeout(&format!("{at}.connect_timeout"), &raw.connect_timeout);
        let idle_timeout = self.timeout(&format!("{at}.idle_timeout"), &raw.idle_timeout);
        let send_proxy = self.send_proxy(at, raw.send_proxy.as_deref()).ok()?;
        let tls = match raw.tls {
            None => None,
            Some(t) => Some(self.upstream_tls(&format!("{at}.tls"), t)?),
        };
        Some(Route::Tcp(TcpRoute {
            backends,
            connect_timeout: connect_timeout?,
            idle_timeout: idle_timeout?,
            send_proxy,
            tls,
        }))
    }

    fn upstream_tls(&mut self, at: &str, raw: raw::UpstreamTlsSection) -> Option<UpstreamTls> {
        if raw.verify_depth == 0 {
            self.problem(
                format!("{at}.verify_depth"),
                "must be at least 1 (1: issued by a CA of the bundle)",
            );
        }
        let roots = self.ca_bundle(&format!("{at}.ca"), &raw.ca);
        let server_name = match raw.server_name.as_deref() {
            None => Some(None),
            Some(name) => match rustls::pki_types::ServerName::try_from(name.to_string()) {
                Ok(n) => Some(Some(n)),
                Err(e) => {
                    self.problem(format!("{at}.server_name"), format!("{name:?}: {e}"));
                    None
                }
            },
        };
        let mut versions = TlsVersions {
            tls12: false,
            tls13: false,
        };
        for (j, v) in raw.versions.iter().enumerate() {
            match v.as_str() {
                "1.2" => versions.tls12 = true,
                "1.3" => versions.tls13 = true,
                other => self.problem(
                    format!("{at}.versions[{j}]"),
                    format!("unknown TLS version {other:?} (use \"1.2\" or \"1.3\")"),
                ),
            }
        }
        if raw.versions.is_empty() {
            self.problem(format!("{at}.versions"), "must name at least one version");
        }
        let client_cert = match (&raw.client_cert, &raw.client_key) {
            (None, None) => Some(None),
            (Some(cert), Some(key)) => {
                let pair = raw::CertificateSection {
                    cert: Some(cert.clone()),
                    key: Some(key.clone()),
                    acme: None,
                    server_names: Vec::new(),
                    ocsp: None,
                };
                // The listener certificate loader: same PEM forms, the
                // same key-match check, errors under `client_cert`.
                self.certificate(&format!("{at}.client_cert"), &pair)
                    .map(|c| Some(c.key))
            }
            _ => {
                self.problem(
                    at,
                    "client_cert and client_key go together (a certificate and its key)",
                );
                None
            }
        };
        let (roots, server_name, client_cert) = (roots?, server_name?, client_cert?);
        if raw.verify_depth == 0 || !(versions.tls12 || versions.tls13) {
            return None;
        }
        let anchors: Arc<[CertificateDer<'static>]> = roots.clone().into();
        let mut store = rustls::RootCertStore::empty();
        let (_added, _ignored) = store.add_parsable_certificates(roots);
        match rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(crate::provider::crypto_provider()),
        )
        .build()
        {
            Ok(verifier) => Some(UpstreamTls {
                verifier,
                verify_depth: raw.verify_depth,
                anchors,
                server_name,
                verify_name: raw.verify_name,
                client_cert,
                versions,
                session_reuse: raw.session_reuse,
            }),
            Err(e) => {
                self.problem(format!("{at}.ca"), format!("unusable CA bundle: {e}"));
                None
            }
        }
    }

    fn send_proxy(&mut self, at: &str, raw: Option<&str>) -> Result<Option<ProxyVersion>, ()> {
        match raw {
            None => Ok(None),
            Some("v1") => Ok(Some(ProxyVersion::V1)),
            Some("v2") => Ok(Some(ProxyVersion::V2)),
            Some(other) => {
                self.problem(
                    format!("{at}.send_proxy"),
                    format!("{other:?} is not a PROXY protocol version (\"v1\" or \"v2\")"),
                );
                Err(())
            }
        }
    }

    /// The index of upstream group `name`, or a problem at `at`.
    fn upstream_index(&mut self, at: &str, name: &str, upstreams: &[Upstream]) -> Option<usize> {
        let i = upstreams.iter().position(|u| u.name == name);
        // One with problems of its own is defined: those name it.
        if i.is_none() && !self.upstream_names.iter().any(|n| n == name) {
            self.problem(at, format!("no [upstream.{name}] is defined"));
        }
        i
    }

    /// [`Self::upstream_index`] for a passthrough route, whose groups carry
    /// the client's own TLS unread: a group's `tls` would wrap it in a
    /// second layer, and its `send_proxy` is the route's to set.
    fn passthrough_upstream(
        &mut self,
        at: &str,
        name: &str,
        upstreams: &[Upstream],
    ) -> Option<usize> {
        let i = self.upstream_index(at, name, upstreams)?;
        let u = &upstreams[i];
        if u.tls.is_some() {
            self.problem(
                at,
                format!("[upstream.{name}] has tls, but a passthrough route sends the client's own TLS unread; use a group without tls"),
            );
        }
        if u.send_proxy.is_some() {
            self.problem(
                at,
                format!("[upstream.{name}] has send_proxy; on a passthrough listener set send_proxy on the route"),
            );
        }
        // A GET in the clear to backends that expect the client's TLS
        // fails every time: all of them would be marked down.
        if u.health
            .as_ref()
            .is_some_and(|h| h.kind == HealthKind::Http)
        {
            self.problem(
                at,
                format!("[upstream.{name}.health] sends an HTTP request in the clear, but a passthrough route's backends get the client's TLS; set check = \"tcp\" there (a connect check)"),
            );
        }
        Some(i)
    }

    fn passthrough_route(
        &mut self,
        at: &str,
        raw: raw::PassthroughRouteSection,
        upstreams: &[Upstream],
    ) -> Option<Route> {
        if raw.rule.is_empty() && raw.default.is_none() {
            self.problem(
                at,
                "at least one [[listener.route.rule]] (sni, upstream) or a default upstream is required",
            );
        }
        let mut rules = Vec::new();
        for (i, r) in raw.rule.iter().enumerate() {
            let field = format!("{at}.rule[{i}]");
            let sni = self.host_match(&format!("{field}.sni"), Some(&r.sni), true);
            let upstream =
                self.passthrough_upstream(&format!("{field}.upstream"), &r.upstream, upstreams);
            let alpn = match &r.alpn {
                Some(a) if a.is_empty() || a.len() > 255 => {
                    self.problem(format!("{field}.alpn"), "must be 1 to 255 bytes (RFC 7301)");
                    continue;
                }
                a => a.as_ref().map(|a| a.as_bytes().to_vec()),
            };
            if let (Some(sni), Some(upstream)) = (sni, upstream) {
                rules.push(PassthroughRule {
                    sni,
                    alpn,
                    upstream,
                });
            }
        }
        // Most specific name first; within one name, rules with an ALPN
        // condition before the one without (stable: config order after).
        rules.sort_by(|a, b| {
            a.sni
                .rank()
                .cmp(&b.sni.rank())
                .then(b.alpn.is_some().cmp(&a.alpn.is_some()))
        });
        let default = raw
            .default
            .as_ref()
            .map(|name| self.passthrough_upstream(&format!("{at}.default"), name, upstreams));
        let idle_timeout = self.timeout(&format!("{at}.idle_timeout"), &raw.idle_timeout);
        let hello_timeout = self.timeout(&format!("{at}.hello_timeout"), &raw.hello_timeout);
        let send_proxy = self.send_proxy(at, raw.send_proxy.as_deref()).ok()?;
        Some(Route::Passthrough(PassthroughRoute {
            rules,
            default: match default {
                None => None,
                Some(found) => Some(found?),
            },
            idle_timeout: idle_timeout?,
            hello_timeout: hello_timeout?,
            send_proxy,
        }))
    }

    fn certificate(&mut self, at: &str, raw: &raw::CertificateSection) -> Option<Certificate> {
        let (cert_file, key_file) = match (&raw.cert, &raw.key, &raw.acme) {
            (Some(c), Some(k), None) => (c, k),
            (None, None, Some(acme)) => {
                if !raw.server_names.is_empty() || raw.ocsp.is_some() {
                    self.problem(
                        at,
                        "an acme certificate takes its names from acme.domains and staples no OCSP file; drop server_names and ocsp",
                    );
                    return None;
                }
                return self.acme_certificate(at, acme);
            }
            (_, _, Some(_)) => {
                self.problem(
                    at,
                    "either cert and key, or acme: an acme certificate's files live in acme.state_dir",
                );
                return None;
            }
            (None, _, None) => {
                self.problem(format!("{at}.cert"), "missing (or set acme = { ... })");
                return None;
            }
            (Some(_), None, None) => {
                self.problem(
                    format!("{at}.key"),
                    "missing: the certificate's private key file",
                );
                return None;
            }
        };
        let chain = self.read_pem(&format!("{at}.cert"), cert_file, |pem| {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("not a PEM certificate chain: {e}"))
                .and_then(|c| {
                    if c.is_empty() {
                        Err("no CERTIFICATE block found".to_string())
                    } else {
                        Ok(c)
                    }
                })
        });
        let key = self.read_pem(&format!("{at}.key"), key_file, |pem| {
            PrivateKeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"))
        });
        let (chain, key) = (chain?, key?);
        let mut info = match CertInfo::from_leaf(chain[0].as_ref()) {
            Ok(i) => i,
            Err(reason) => {
                self.problem(format!("{at}.cert"), reason);
                return None;
            }
        };
        let provider = crate::provider::crypto_provider();
        let leaf = chain[0].clone();
        let server_names = if raw.server_names.is_empty() {
            info.names.iter().map(|n| n.to_ascii_lowercase()).collect()
        } else {
            let mut names = Vec::with_capacity(raw.server_names.len());
            for (k, n) in raw.server_names.iter().enumerate() {
                match names::check(n) {
                    Ok(()) => names.push(n.to_ascii_lowercase()),
                    Err(why) => self.problem(format!("{at}.server_names[{k}]"), why),
                }
            }
            names
        };
        let ocsp = match &raw.ocsp {
            None => None,
            Some(file) => {
                let full = self.base.join(file);
                match read_capped(&full, MAX_CONFIG_FILE, "an OCSP response") {
                    Ok(der) => Some(der),
                    Err(e) => {
                        self.problem(format!("{at}.ocsp"), e);
                        return None;
                    }
                }
            }
        };
        if let Some(der) = &ocsp {
            let now = crate::clock::unix_now();
            let ders: Vec<&[u8]> = chain.iter().map(|c| c.as_ref()).collect();
            info.ocsp_file = raw.ocsp.clone();
            match ocsp::check(der, &ders, now) {
                Ok(until) => info.ocsp_until = Some(until),
                Err(why) => info.ocsp_problem = Some(why),
            }
        }
        match CertifiedKey::from_der(chain, key, &provider) {
            Ok(mut ck) => Some(Certificate {
                server_names,
                info: {
                    info.cert_file = cert_file.clone();
                    info.key_file = key_file.clone();
                    info.key_type = format!("{:?}", ck.key.algorithm());
                    if info.ocsp_until.is_some() {
                        ck.ocsp = ocsp;
                    }
                    info
                },
                key: Arc::new(ck),
                acme: None,
            }),
            Err(rustls::Error::InconsistentKeys(_)) => {
                self.problem(
                    format!("{at}.key"),
                    format!("key {key_file:?} does not match certificate {cert_file:?}"),
                );
                None
            }
            Err(e) => {
                let reason = match lint::rsa_bits(leaf.as_ref()) {
                    Some(bits) if bits < lint::MIN_RSA_BITS => format!(
                        "RSA key of {bits} bits: at least {} are needed (the crypto provider refuses smaller keys)",
                        lint::MIN_RSA_BITS
                    ),
                    _ => format!("unusable key: {e}"),
                };
                self.problem(format!("{at}.key"), reason);
                None
            }
        }
    }

    /// A PEM bundle of CA certificates (at least one).
    fn ca_bundle(&mut self, field: &str, path: &str) -> Option<Vec<CertificateDer<'static>>> {
        self.read_pem(field, path, |pem| {
            match CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>() {
                Ok(c) if !c.is_empty() => {
                    // The verifier's store drops a block it cannot parse in
                    // silence, and a chain through that CA is then refused
                    // with no hint of why.
                    let (_, ignored) =
                        rustls::RootCertStore::empty().add_parsable_certificates(c.iter().cloned());
                    if ignored > 0 {
                        return Err(format!(
                            "{ignored} of its {} CERTIFICATE blocks do not parse as certificates",
                            c.len()
                        ));
                    }
                    Ok(c)
                }
                Ok(_) => Err("no CERTIFICATE block found".to_string()),
                Err(e) => Err(format!("not PEM certificates: {e}")),
            }
        })
    }

    fn read_pem<T>(
        &mut self,
        field: &str,
        path: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = if let Some(name) = path.strip_prefix("inline:") {
            self.inline_pems
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, pem)| Ok(pem.clone()))
                .unwrap_or_else(|| Err(format!("no inline PEM named {name:?}")))
        } else {
            let full: PathBuf = self.base.join(path);
            read_text_capped(&full, "a PEM file")
        };
        match text.and_then(|t| parse(&t)) {
            Ok(v) => Some(v),
            Err(reason) => {
                self.problem(field, reason);
                None
            }
        }
    }

    fn addr(&mut self, field: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    field,
                    format!("{text:?} is not an IP:port address (e.g. 0.0.0.0:443 or [::]:443)"),
                );
                None
            }
        }
    }

    /// A backend's address: one ktern can connect to (port 0 and the
    /// unspecified address `0.0.0.0`/`[::]` name none: a connect there
    /// fails, or reaches whatever listens on the host's loopback).
    fn backend_addr(&mut self, field: &str, text: &str) -> Option<SocketAddr> {
        let a = self.addr(field, text)?;
        if a.port() == 0 || a.ip().is_unspecified() {
            self.problem(
                field,
                format!("{a} names no backend (a port from 1 to 65535 and an address other than 0.0.0.0 or [::])"),
            );
            return None;
        }
        Some(a)
    }

    /// A duration that bounds a wait: 0 would end every handshake,
    /// connect or request at once, a silent outage rather than "no
    /// limit", so it is refused (nginx takes no 0 for its timeouts either).
    fn timeout(&mut self, field: &str, text: &str) -> Option<Duration> {
        let d = self.duration(field, text)?;
        if d.is_zero() {
            self.problem(field, "must be more than 0s");
            return None;
        }
        Some(d)
    }

    fn duration(&mut self, field: &str, text: &str) -> Option<Duration> {
        match parse_duration(text) {
            // Deadlines are `Instant + duration`, which panics past the
            // clock's range: a bound far above any sane setting keeps that
            // out of reach.
            Some(d) if d > MAX_DURATION => {
                self.problem(
                    field,
                    format!("{text:?} is longer than the longest duration ktern takes (365 days)"),
                );
                None
            }
            Some(d) => Some(d),
            None => {
                self.problem(
                    field,
                    format!("{text:?} is not a duration (e.g. \"500ms\", \"10s\", \"5m\", \"1h\")"),
                );
                None
            }
        }
    }
}

/// `access_log.queue` bounds: a few lines at least, and no more memory
/// than an operator would mean.
const MIN_ACCESS_QUEUE: u64 = 4 << 10;
const MAX_ACCESS_QUEUE: u64 = 1 << 30;

/// Parses a byte size: `"1048576"`, `"512k"`, `"1m"`, `"2g"` (binary units).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let (num, mult) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 1u64 << 10),
        'm' => (&t[..t.len() - 1], 1 << 20),
        'g' => (&t[..t.len() - 1], 1 << 30),
        _ => (t.as_str(), 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// The longest duration a setting takes: a year.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `"250ms"`, `"10s"`, `"5m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Whether two listening addresses share a port: the same family and
/// port, and the same address or either one the wildcard.
pub fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests;
