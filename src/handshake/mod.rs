//! The TLS handshake: a sans-IO driver around rustls' unbuffered server
//! connection ([`Handshake`]) and a thin monoio pump ([`pump::run`]).
//!
//! The driver takes ciphertext in and hands bytes to send out; it owns no
//! socket and no clock (the pump owns the deadline). When it reports
//! [`Step::Done`], every byte read from the socket has been consumed at a
//! record boundary, so the next byte in the socket starts a record and the
//! `ktls` stage can hand the socket to the kernel without losing or repeating
//! application data.

use std::sync::Arc;

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::ServerConfig;

use crate::config;

pub mod certs;
pub mod client;
pub mod client_auth;
pub mod hello;
pub mod memory;
pub mod pump;
pub mod sessions;
pub mod tickets;

pub use crate::provider::crypto_provider;

/// Random ticket keys rotating every 12 hours, for tools, benchmarks and
/// tests that build a server without a config. A running ktern makes its
/// keys per config generation ([`tickets::for_config`]) and binds them to
/// each listener ([`tickets::ListenerTickets`]); every shard shares them,
/// so a ticket issued by one shard resumes on any other (the kernel's
/// `SO_REUSEPORT` hash sends a client's next connection to any shard),
/// and with `[tickets] secret_file`, on any host.
pub fn ticketer() -> Arc<dyn rustls::server::ProducesTickets> {
    tickets::ListenerTickets::for_listener(
        &Arc::new(tickets::TicketKeys::random(
            config::DEFAULT_TICKET_ROTATION.as_secs(),
        )),
        b"standalone",
    )
}

#[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
compile_error!("enable the `aws-lc-rs` (default) or `ring` feature");

/// Largest TLS record on the wire: 5-byte header + 2^14 + 256 (RFC 8446 §5.2).
pub const MAX_RECORD: usize = 5 + (1 << 14) + 256;

/// Handshake input buffer cap. A ClientHello may span records and rustls
/// joins handshake messages in place, so allow a few records' worth (64 KiB,
/// the largest handshake message we accept, plus one record).
const MAX_INPUT: usize = (64 << 10) + MAX_RECORD;

/// What a shard needs for one listener's handshakes: its rustls config,
/// and the certificate store behind the config's resolver (the
/// `strict_sni` refusal happens before rustls sees the hello).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The rustls server config.
    pub config: Arc<ServerConfig>,
    /// The listener's certificates by name.
    pub certs: Arc<certs::CertStore>,
    /// For hellos offering `acme-tls/1`, when the listener answers
    /// TLS-ALPN-01 ([`acme_config`]).
    pub acme: Option<Arc<ServerConfig>>,
    /// For hellos offering a ticket: `config` issuing one new ticket
    /// instead of two.
    pub resumption: Arc<ServerConfig>,
    /// For hellos that list a ChaCha20-Poly1305 suite first, where the
    /// server's order decides otherwise: `config` and `resumption`
    /// following the client's order.
    pub client_order: Option<(Arc<ServerConfig>, Arc<ServerConfig>)>,
    /// The listener's client certificate verifier, which a resumed
    /// session's chain goes through again ([`client_auth::still_valid`]).
    pub client_auth: Option<Arc<client_auth::DepthLimited>>,
}

/// Builds the rustls server config for one listener, with a session-id
/// cache of its own ([`server_config_sharing`] shares one) whose sessions
/// last the default `tickets.rotation`.
pub fn server_config(
    listener: &config::Listener,
    certs: &Arc<certs::CertStore>,
    tickets: &Arc<dyn rustls::server::ProducesTickets>,
) -> Result<ServerTls, rustls::Error> {
    let sessions = session_cache(1, config::DEFAULT_TICKET_ROTATION);
    server_config_sharing(listener, certs, tickets, &sessions)
}

/// The TLS 1.2 session-id cache of one listener served by `shards` shards:
/// 1,024 sessions per shard (the size each shard's own cache had), about
/// 0.4 KiB each without client certificates (an entry keeps the client's
/// chain), each resumable for `lifetime` (`tickets.rotation`, the
/// lifetime a ticket's hint gives: [`sessions`]). rustls stores every TLS
/// 1.2 full handshake's session there, also of clients that take a ticket
/// (whose next hello offers the ticket, so their entries are never read),
/// and evicts the oldest first.
pub fn session_cache(
    shards: usize,
    lifetime: std::time::Duration,
) -> Arc<dyn rustls::server::StoresServerSessions> {
    Arc::new(sessions::SessionIds::new(1024 * shards.max(1), lifetime))
}

/// Builds the rustls server config for one listener. Each shard gets its
/// own (built off the shards, at start and on reload); the certificate
/// store, the ticket keys (see [`ticketer`]) and the session-id cache
/// `sessions` are the listener's, shared by every shard: `SO_REUSEPORT`
/// puts a client's next connection on any shard, and a per-shard cache
/// resumed a client without tickets only on the shard that stored its
/// session (9 of 15 attempts on 2 shards, `tests/live.rs`). Its lock is
/// taken once per TLS 1.2 full handshake and per session-id lookup, beside
/// a handshake's own crypto (nginx's `ssl_session_cache shared:` shares
/// one across workers the same way).
pub fn server_config_sharing(
    listener: &config::Listener,
    certs: &Arc<certs::CertStore>,
    tickets: &Arc<dyn rustls::server::ProducesTickets>,
    sessions: &Arc<dyn rustls::server::StoresServerSessions>,
) -> Result<ServerTls, rustls::Error> {
    let builder = ServerConfig::builder_with_provider(Arc::new(listener_provider(listener)))
        .with_protocol_versions(&listener_versions(listener))?;
    let client_auth = listener.client_auth.as_ref().map(|auth| {
        Arc::new(client_auth::DepthLimited {
            inner: auth.verifier.clone(),
            depth: auth.verify_depth,
            anchors: auth.anchors.clone(),
        })
    });
    let builder = match &client_auth {
        Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(certs.clone());
    // Needed for `dangerous_into_kernel_connection` (kTLS hand-over).
    cfg.enable_secret_extraction = true;
    // 0-RTT data would reach the backend before the handshake completes and is
    // replayable (RFC 8446 §8); not offered.
    cfg.max_early_data_size = 0;
    // Stateless resumption tickets (RFC 8446 §4.6.1; keys in
    // `tickets.rs`): no per-session server memory (a stateful cache costs
    // ~0.4 KiB per connection until full), and one key set for every
    // shard, so a ticket resumes on whichever shard the client's next
    // connection lands.
    cfg.ticketer = tickets.clone();
    // TLS 1.2 clients without ticket support get a small session-id cache.
    cfg.session_storage = sessions.clone();
    // ALPN (RFC 7301): the listener's names, in its order of preference. A
    // client that offers ALPN but none of these gets no_application_protocol
    // (rustls); one that offers none is served as before.
    cfg.alpn_protocols = listener
        .alpn
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    // A resuming client already holds tickets: it gets one new ticket (for
    // its next connection) where a full handshake gets rustls' two (one
    // spare for a parallel connection), as OpenSSL does. Each ticket costs
    // a key derivation, a seal and a record.
    let mut resumption = cfg.clone();
    resumption.send_tls13_tickets = 1;
    // The server's suite order decides (HAProxy's default; nginx's
    // `ssl_prefer_server_ciphers on`), so a client that lists AES-256-GCM
    // first (OpenSSL's and rustls' own order) gets AES-128-GCM. Except a
    // client that lists ChaCha20-Poly1305 first: without AES instructions
    // it seals several times slower with AES-GCM, so it gets its own
    // order (OpenSSL's `PRIORITIZE_CHACHA`, BoringSSL's equal-preference
    // groups), from configs that follow the client's order, picked by the
    // hello peek as the resumption config is.
    let chacha = |s: &rustls::SupportedCipherSuite| hello::is_chacha(u16::from(s.suite()));
    let client_order = (listener.prefer_server_ciphers
        && cfg.crypto_provider().cipher_suites.iter().any(chacha))
    .then(|| (Arc::new(cfg.clone()), Arc::new(resumption.clone())));
    cfg.ignore_client_order = listener.prefer_server_ciphers;
    resumption.ignore_client_order = listener.prefer_server_ciphers;
    Ok(ServerTls {
        config: Arc::new(cfg),
        certs: certs.clone(),
        acme: None,
        resumption: Arc::new(resumption),
        client_order,
        client_auth,
    })
}

/// The TLS versions a listener offers, newest first.
fn listener_versions(
    listener: &config::Listener,
) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    if listener.tls_versions.tls13 {
        versions.push(&rustls::version::TLS13);
    }
    if listener.tls_versions.tls12 {
        versions.push(&rustls::version::TLS12);
    }
    versions
}

/// The config a listener's TLS-ALPN-01 validations get (RFC 8737 §3): only
/// `acme-tls/1`, and the challenge certificate for the hello's SNI. A
/// separate config, picked per hello by [`Handshake`], so the listener's
/// own ALPN list never carries `acme-tls/1` (with an empty list, adding
/// it would make rustls refuse every client offering other protocols).
pub fn acme_config(
    listener: &config::Listener,
    challenges: &Arc<crate::challenges::Challenges>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    #[derive(Debug)]
    struct Answers(Arc<crate::challenges::Challenges>);
    impl rustls::server::ResolvesServerCert for Answers {
        fn resolve(
            &self,
            hello: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            self.0.tls_alpn(hello.server_name())
        }
    }
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(listener_provider(listener)))
        .with_protocol_versions(&listener_versions(listener))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Answers(challenges.clone())));
    cfg.alpn_protocols = vec![crate::challenges::ACME_TLS_ALPN.to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The build's crypto provider narrowed to a listener's `cipher_suites`
/// and `kx_groups`, in the listener's order (the config check made sure
/// each is in the provider).
pub fn listener_provider(listener: &config::Listener) -> rustls::crypto::CryptoProvider {
    /// `all` narrowed to `wanted` (by `id`), in `wanted`'s order; all of
    /// them when nothing is configured.
    fn pick<T: Copy, K: PartialEq>(all: &mut Vec<T>, wanted: &[K], id: impl Fn(&T) -> K) {
        if !wanted.is_empty() {
            *all = wanted
                .iter()
                .filter_map(|w| all.iter().find(|t| id(t) == *w).copied())
                .collect();
        }
    }
    let mut p = crypto_provider();
    if listener.cipher_suites.is_empty() {
        // rustls lists AES-256-GCM first. Served first (the server's order
        // decides, `prefer_server_ciphers`), AES-128-GCM: TLS 1.3's one
        // mandatory suite (RFC 8446 §9.1), about 15% faster per byte here
        // (`bench/RESULTS.md`: 5.85 against 5.04 GB/s), and its SHA-256 key
        // schedule runs on the SHA extensions that CPUs without SHA-512
        // ones have (SHA-384 was 14% of a resumed handshake's CPU on such
        // an AMD host, `bench/README.md`). A stable sort: TLS 1.3 and
        // ECDSA keep their places.
        p.cipher_suites.sort_by_key(|s| aes_rank(s.suite()));
    }
    pick(&mut p.cipher_suites, &listener.cipher_suites, |s| s.suite());
    pick(&mut p.kx_groups, &listener.kx_groups, |k| k.name());
    p
}

/// A default suite's place in the server's order: AES-128-GCM, then
/// AES-256-GCM, then the rest (ChaCha20-Poly1305).
fn aes_rank(suite: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite::*;
    match suite {
        TLS13_AES_128_GCM_SHA256
        | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        TLS13_AES_256_GCM_SHA384
        | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    }
}

/// The suites a listener may negotiate (its versions' share of
/// [`listener_provider`]).
pub fn listener_suites(listener: &config::Listener) -> Vec<rustls::SupportedCipherSuite> {
    let v = listener.tls_versions;
    listener_provider(listener)
        .cipher_suites
        .into_iter()
        .filter(|s| {
            if s.tls13().is_some() {
                v.tls13
            } else {
                v.tls12
            }
        })
        .collect()
}

/// The certificate store of `listener` alone (one per listener per config
/// generation; every shard's [`server_config_sharing`] shares it).
pub fn cert_store(listener: &config::Listener) -> Arc<certs::CertStore> {
    Arc::new(certs::CertStore::new(
        &listener.certificates,
        listener.strict_sni,
    ))
}

/// Whether a listener answers TLS-ALPN-01 (one of its certificates is
/// ordered with that challenge).
pub fn answers_tls_alpn(listener: &config::Listener) -> bool {
    listener.certificates.iter().any(|c| {
        c.acme
            .as_ref()
            .is_some_and(|a| a.challenge == config::AcmeChallenge::TlsAlpn01)
    })
}

/// A server config with a freshly generated self-signed certificate for
/// `localhost` (ECDSA P-256), for fuzzing and tools that need a server
/// without files.
pub fn self_signed_config() -> Result<ServerTls, Box<dyn std::error::Error + Send + Sync>> {
    let (cert, key) = crate::builtin::self_signed(&["localhost"])?;
    let both = config::TlsVersions {
        tls12: true,
        tls13: true,
    };
    let listener = config::Listener::standalone(
        "self-signed",
        config::Certificate::from_pem(&cert, &key)?,
        both,
    );
    Ok(server_config(
        &listener,
        &cert_store(&listener),
        &ticketer(),
    )?)
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client sent bytes rustls rejected (not TLS, bad record, failed
    /// negotiation). An alert, if rustls produced one, is in the driver's output.
    #[error("client sent invalid TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The client closed the TCP connection before the handshake finished.
    #[error("client closed the connection during the handshake")]
    Eof,
    /// The client did not finish within the handshake deadline.
    #[error("handshake deadline passed")]
    Timeout,
    /// A socket read or write failed.
    #[error("socket error during the handshake: {0}")]
    Io(#[from] std::io::Error),
    /// A handshake message larger than we buffer.
    #[error("handshake message larger than {MAX_INPUT} bytes")]
    TooLarge,
    /// `strict_sni`: the hello named no server this listener has a
    /// certificate for (or none); `unrecognized_name` was queued.
    #[error("unknown server name (strict_sni): {}", .0.as_deref().unwrap_or("none sent"))]
    UnknownName(Option<Box<str>>),
}

/// What the driver wants next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send [`Handshake::pending_output`], then call [`Handshake::output_sent`].
    Transmit,
    /// Read from the socket and pass the bytes to [`Handshake::handle_input`].
    /// With `Some(n)`, read at most `n` bytes: the handshake is over and only
    /// the rest of a partly received record may be taken from the socket.
    Read(Option<usize>),
    /// Handshake complete; call [`Handshake::finish`].
    Done,
}

/// The result of a completed handshake.
pub struct Established {
    /// The rustls connection, ready for `dangerous_into_kernel_connection` or
    /// userspace record processing.
    pub conn: UnbufferedServerConnection,
    /// Application data that arrived with the client's last flight and was
    /// decrypted in userspace; it must be delivered before anything read later.
    pub early_plaintext: Vec<u8>,
    /// Sealed records the client must get before anything else ktern
    /// sends on the connection, but is not waiting for: TLS 1.3
    /// NewSessionTickets (RFC 8446 §4.6.1), which rustls seals once the
    /// client's Finished is in, held when the client's first bytes came
    /// with it (see `advance`). They go out with ktern's first record, in
    /// the same `send` (two segments less per connection, the ticket's and
    /// its ACK, and a resumed handshake's kernel work is mostly segments),
    /// or first of all where the kernel takes the records.
    pub unsent: Vec<u8>,
    /// The client already sent close_notify.
    pub peer_closed: bool,
    /// What the client sent after its Finished that rustls read in the
    /// handshake: whether a KeyUpdate reply may be owed.
    pub after_finished: AfterFinished,
    /// The server name the client asked for (SNI), lower case.
    pub sni: Option<Box<str>>,
    /// A CA's TLS-ALPN-01 validation (the hello was switched to the
    /// validation config): nothing may be routed; close it.
    pub acme_validation: bool,
}

/// What the rest of a connection's life knows about its TLS session (for
/// routing by SNI and for the access log). Small: it lives as long as the
/// connection.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// The server name from the ClientHello, lower case.
    pub sni: Option<Box<str>>,
    /// Negotiated protocol version.
    pub version: Option<rustls::ProtocolVersion>,
    /// Negotiated cipher suite.
    pub suite: Option<rustls::CipherSuite>,
    /// The kernel carries the records (kTLS), not rustls in userspace.
    pub kernel: bool,
    /// ALPN chose `h2`: the connection speaks HTTP/2.
    pub alpn_h2: bool,
    /// The protocol ALPN chose, as its index in the listener's `alpn`
    /// (a `tcp` route with `tls` offers its backend the same).
    pub alpn: Option<u8>,
    /// The session was resumed (its client certificate, if any, was
    /// presented on an earlier connection).
    pub resumed: bool,
    /// The listener asks for client certificates (`client_auth`).
    pub client_auth: bool,
    /// The verified client certificate's identity, when one was sent.
    /// Boxed: most connections have none, and this lives as long as they.
    pub client: Option<Box<client_auth::ClientIdentity>>,
}

impl TlsInfo {
    /// `TLSv1.3`, `TLSv1.2` (nginx's `$ssl_protocol` spelling), or `-`.
    pub fn version_name(&self) -> &'static str {
        match self.version {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "-",
        }
    }

    /// nginx's `$ssl_client_verify`: `SUCCESS` for a verified client
    /// certificate (a refused one ends the handshake), `NONE` when the
    /// listener asks for one and none was sent, `None` when it asks not.
    pub fn client_verify(&self) -> Option<&'static str> {
        match (self.client_auth, &self.client) {
            (false, _) => None,
            (true, Some(_)) => Some("SUCCESS"),
            (true, None) => Some("NONE"),
        }
    }

    /// The IANA cipher suite name, or `-`.
    pub fn cipher_name(&self) -> &'static str {
        self.suite.and_then(|s| s.as_str()).unwrap_or("-")
    }
}

/// The client's records after its Finished that the handshake read. One
/// that was neither application data nor close_notify may be a KeyUpdate
/// (RFC 8446 §4.6.3), whose reply rustls holds, sealed under its old key,
/// until it seals the next record: the keys may go to the kernel only after
/// that record (`User::reply_owed`). TLS 1.3 hides the record's type, and
/// rustls does not say which it read; it may as well have been a warning
/// alert (`user_canceled`, which JDK clients send).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AfterFinished {
    /// Records counted after the Finished, all under the client's first
    /// traffic key unless one was a KeyUpdate. (Those read by the same call
    /// as the Finished are not counted: rustls hands back the tickets it
    /// seals then before it reads on, when it seals any.)
    pub records: u64,
    /// Of them, neither application data nor close_notify. Signed while
    /// the handshake counts: a close_notify is read by one `process` call
    /// and reported by the next.
    pub other: i64,
}

impl AfterFinished {
    /// Before the keys are extracted, all that is known: a record may have
    /// been a KeyUpdate.
    pub fn maybe_owed(&self) -> bool {
        self.other > 0
    }

    /// With the sequence numbers both keys had when rustls gave them up
    /// (`ExtractedSecrets::rx`, `::tx`). rustls restarts a number at each
    /// new key:
    /// - Read: without a KeyUpdate every counted record took a number under
    ///   the client's first key, so it is at least `records`; below it, one
    ///   was read (at or above it, the other records were alerts).
    /// - Write: a KeyUpdate that asked for ours made rustls seal the reply
    ///   under its old key and switch to a new one, at 0; the tickets it
    ///   sealed at the Finished put the number above 0 otherwise. Above 0,
    ///   no reply is held (the KeyUpdate asked for none); at 0 one may be
    ///   (or rustls sealed no ticket).
    pub fn owed(&self, rx_seq: u64, tx_seq: u64) -> bool {
        self.maybe_owed() && rx_seq < self.records && tx_seq == 0
    }
}

/// Sans-IO TLS server handshake.
///
/// Call order: loop on [`Handshake::poll`]; on `Transmit` send the output and
/// call `output_sent`; on `Read` feed what the socket gave to `handle_input`
/// (an empty slice means EOF); on `Done` call `finish`.
pub struct Handshake {
    conn: UnbufferedServerConnection,
    input: Vec<u8>,
    output: Vec<u8>,
    early_plaintext: Vec<u8>,
    peer_closed: bool,
    /// Client records read after the handshake.
    after_finished: AfterFinished,
    eof: bool,
    /// The ClientHello peek's progress through `input` (records already
    /// read), until it has an answer.
    hello_peek: hello::HelloPeek,
    hello_seen: bool,
    sni: Option<Box<str>>,
    /// The hello (or its server_name extension) is malformed: rustls
    /// refuses it with the protocol's alert, not `strict_sni`.
    sni_malformed: bool,
    /// The listener's certificates, for the `strict_sni` refusal.
    certs: Arc<certs::CertStore>,
    /// Some of our handshake bytes went out (from then on records may be
    /// protected, and only rustls can make an alert).
    transmitted: bool,
    /// The listener's TLS-ALPN-01 config, if it answers validations.
    acme: Option<Arc<ServerConfig>>,
    /// The hello offers `acme-tls/1`.
    acme_hello: bool,
    /// Switched to the validation config.
    acme_validation: bool,
    /// The listener's config for resuming hellos ([`ServerTls::resumption`]).
    resumption: Option<Arc<ServerConfig>>,
    /// The hello offers a ticket.
    psk_hello: bool,
    /// The listener's configs in the client's order, for a hello that lists
    /// ChaCha20-Poly1305 first ([`ServerTls::client_order`]).
    client_order: Option<(Arc<ServerConfig>, Arc<ServerConfig>)>,
    /// The hello lists a ChaCha20-Poly1305 suite first.
    chacha_hello: bool,
    /// [`ServerTls::client_auth`], and rustls' clock (the config's).
    client_auth: Option<(
        Arc<client_auth::DepthLimited>,
        Arc<dyn rustls::time_provider::TimeProvider>,
    )>,
    /// A resumed session's chain was checked.
    chain_checked: bool,
}

/// A plaintext fatal `handshake_failure` alert record (RFC 8446 §6; the
/// record version is the legacy 0x0303 in both TLS 1.2 and 1.3).
const HANDSHAKE_FAILURE: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40];

/// A plaintext fatal `unrecognized_name` alert (RFC 6066 §3: the server
/// "MAY" refuse a name it does not recognize with this alert).
const UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

impl Handshake {
    /// Starts a server handshake for a listener.
    pub fn new(tls: &ServerTls) -> Result<Handshake, rustls::Error> {
        Ok(Handshake {
            conn: UnbufferedServerConnection::new(tls.config.clone())?,
            acme: tls.acme.clone(),
            acme_hello: false,
            acme_validation: false,
            resumption: Some(tls.resumption.clone()),
            psk_hello: false,
            client_order: tls.client_order.clone(),
            chacha_hello: false,
            // Grown by what comes (`handle_input`): nothing is held for a
            // connection that has sent nothing yet.
            input: Vec::new(),
            output: Vec::new(),
            early_plaintext: Vec::new(),
            peer_closed: false,
            after_finished: AfterFinished::default(),
            eof: false,
            hello_peek: hello::HelloPeek::default(),
            hello_seen: false,
            sni: None,
            sni_malformed: false,
            certs: tls.certs.clone(),
            transmitted: false,
            client_auth: tls
                .client_auth
                .as_ref()
                .map(|v| (v.clone(), tls.config.time_provider.clone())),
            chain_checked: false,
        })
    }

    /// Feeds bytes read from the client. An empty slice means the client closed.
    pub fn handle_input(&mut self, bytes: &[u8]) -> Result<(), HandshakeError> {
        if bytes.is_empty() {
            self.eof = true;
            return Ok(());
        }
        if self.input.len() + bytes.len() > MAX_INPUT {
            return Err(HandshakeError::TooLarge);
        }
        crate::buffers::extend_capped(&mut self.input, bytes, MAX_INPUT);
        if !self.hello_seen {
            self.peek_hello();
            // A CA's TLS-ALPN-01 validation gets the challenge config. rustls
            // has seen no byte yet: on such a listener `poll` waits for the
            // whole hello (see there), however it is split.
            if self.hello_seen && self.acme_hello {
                if let Some(acme) = self.acme.take() {
                    self.conn = UnbufferedServerConnection::new(acme)?;
                    self.acme_validation = true;
                    return Ok(());
                }
            }
            if self.hello_seen {
                let client_order = self.client_order.take().filter(|_| self.chacha_hello);
                let picked = match (client_order, self.psk_hello) {
                    (Some((_, resumption)), true) => Some(resumption),
                    (Some((full, _)), false) => Some(full),
                    (None, true) => self.resumption.take(),
                    (None, false) => None,
                };
                if let Some(config) = picked {
                    self.conn = UnbufferedServerConnection::new(config)?;
                }
            }
            // A refused name is answered before rustls parses the hello
            // (rustls' resolver can only fail with access_denied).
            if self.hello_seen && !self.sni_malformed && self.certs.refuses(self.sni.as_deref()) {
                self.output.clear();
                self.output.extend_from_slice(&UNRECOGNIZED_NAME);
                return Err(HandshakeError::UnknownName(self.sni.take()));
            }
        }
        Ok(())
    }

    /// Runs the ClientHello peek over the bytes seen so far: `input`, which
    /// rustls has not touched until the peek's answer (`poll`), so no copy
    /// of it is kept. The common case (the whole hello in one record)
    /// copies nothing; a hello across records is joined by the peek.
    fn peek_hello(&mut self) {
        match self.hello_peek.feed(&self.input) {
            hello::Peeked::NeedMore => return,
            hello::Peeked::Hello(h) => {
                self.sni = h.sni;
                self.sni_malformed = h.sni_malformed;
                self.acme_hello = h.alpn.iter().any(|p| p == crate::challenges::ACME_TLS_ALPN);
                self.psk_hello = h.psk;
                self.chacha_hello = h.chacha_first;
            }
            // rustls judges what the peek cannot read.
            hello::Peeked::NotHello => self.sni_malformed = true,
        }
        self.hello_seen = true;
        self.hello_peek = hello::HelloPeek::default();
    }

    /// The SNI from the ClientHello, once it has arrived.
    pub fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// Bytes that must be sent to the client now (handshake flights, alerts).
    pub fn pending_output(&self) -> &[u8] {
        &self.output
    }

    /// Takes the pending output buffer (for owned-buffer writes); give it back
    /// with [`Handshake::output_sent`].
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Marks the pending output as written, returning the buffer for reuse.
    pub fn output_sent(&mut self, mut buf: Vec<u8>) {
        self.transmitted |= !buf.is_empty();
        buf.clear();
        self.output = buf;
    }

    /// Advances the handshake as far as the buffered input allows.
    ///
    /// On error, [`Handshake::pending_output`] may hold an alert worth sending
    /// (best effort) before closing.
    pub fn poll(&mut self) -> Result<Step, HandshakeError> {
        // The rustls config is picked from the whole hello (TLS-ALPN-01
        // validations, resuming clients), so rustls gets nothing before the
        // peek has judged it (rustls reassembles a hello split over records
        // inside its input buffer: a config swapped after it started would
        // see half a hello). rustls cannot answer a partial hello anyway.
        if !self.hello_seen {
            return if self.eof {
                Err(HandshakeError::Eof)
            } else {
                Ok(Step::Read(None))
            };
        }
        let result = advance(
            &mut self.conn,
            &mut self.input,
            &mut self.output,
            &mut self.early_plaintext,
            &mut self.peer_closed,
            &mut self.after_finished,
            self.eof,
        );
        match result {
            // rustls restores a resumed session's chain and says it resumed
            // while it answers the hello, before its answer goes out: the
            // check comes then, so nothing of the resumption reaches the
            // client (in TLS 1.2 the new ticket rides in that answer).
            Ok(step)
                if self.chain_checked
                    || self.conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) =>
            {
                Ok(step)
            }
            Ok(step) => {
                self.chain_checked = true;
                match self.resumed_chain_holds() {
                    Ok(()) => Ok(step),
                    Err(e) => {
                        // Instead of the ServerHello (still plaintext, after
                        // a HelloRetryRequest too): the alert a full
                        // handshake would end with. The client gets no
                        // ticket, and a fatal alert makes it drop the
                        // session (OpenSSL), so its next connection is a
                        // full handshake, with a renewed certificate if it
                        // has one.
                        self.output.clear();
                        let code = match &e {
                            rustls::Error::InvalidCertificate(c) => {
                                u8::from(rustls::AlertDescription::from(c.clone()))
                            }
                            _ => HANDSHAKE_FAILURE[6],
                        };
                        self.output.extend_from_slice(&HANDSHAKE_FAILURE[..6]);
                        self.output.push(code);
                        Err(HandshakeError::Tls(e))
                    }
                }
            }
            Err(Stalled::Eof) => Err(HandshakeError::Eof),
            Err(Stalled::Closed) => {
                self.collect_alert();
                Err(HandshakeError::Eof)
            }
            Err(Stalled::Tls(e)) => {
                self.collect_alert();
                // Some failures queue no alert (rustls' "incompatible
                // signing key" when the client's signature schemes fit no
                // key, in TLS 1.2): before anything of ours went out the
                // client still gets a plaintext handshake_failure instead
                // of a bare close.
                if self.output.is_empty() && !self.transmitted {
                    self.output.extend_from_slice(&HANDSHAKE_FAILURE);
                }
                Err(HandshakeError::Tls(e))
            }
        }
    }

    fn collect_alert(&mut self) {
        collect_alert(&mut self.conn, &mut self.input, &mut self.output);
    }

    /// A resumed session's client certificate chain, verified again, on
    /// rustls' clock, the config's time provider, as rustls reads it
    /// itself ([`client_auth::still_valid`]).
    fn resumed_chain_holds(&self) -> Result<(), rustls::Error> {
        let Some((verifier, clock)) = &self.client_auth else {
            return Ok(());
        };
        let now = clock
            .current_time()
            .ok_or(rustls::Error::FailedToGetCurrentTime)?;
        client_auth::still_valid(verifier, self.conn.peer_certificates(), now)
    }

    /// Finishes a handshake that reported [`Step::Done`].
    pub fn finish(self) -> Established {
        debug_assert!(self.input.is_empty());
        Established {
            conn: self.conn,
            early_plaintext: self.early_plaintext,
            unsent: self.output,
            peer_closed: self.peer_closed,
            after_finished: self.after_finished,
            sni: self.sni,
            acme_validation: self.acme_validation,
        }
    }
}

/// Runs an `encode`/`encrypt` call against the end of `out`, growing it when
/// rustls says the space is too small.
pub(crate) fn encode<E>(
    out: &mut Vec<u8>,
    f: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(), HandshakeError>
where
    E: EncodeLike,
{
    encode_sized(out, 1024, f)
}

/// After rustls failed (in the handshake or later, on either record path),
/// moves what it queued for the peer to `output`: the fatal alert, and
/// anything queued before it (a ServerHello and ChangeCipherSpec, when the
/// failure comes after the ServerHello), in order. `input` must be the
/// buffer rustls was reading: it may hold progress into it (a partly joined
/// handshake message), and an empty slice would make it index out of
/// bounds.
pub(crate) fn collect_alert<C: Unbuffered>(
    conn: &mut C,
    input: &mut Vec<u8>,
    output: &mut Vec<u8>,
) {
    // Each call pops one queued message; once the queue is empty
    // (`wants_write`) it must not be called again: it would deframe the
    // same bad input and try to queue a second fatal alert (a rustls debug
    // assertion). Bounded all the same.
    for _ in 0..16 {
        if !conn.wants_write() {
            break;
        }
        let UnbufferedStatus { discard, state } = conn.process(input);
        let more = match state {
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                encode(output, |out| enc.encode(out)).is_ok()
            }
            _ => false,
        };
        if discard > 0 {
            input.drain(..discard);
        }
        if !more {
            break;
        }
    }
}

/// Why [`advance`] stopped short of a step.
pub(crate) enum Stalled {
    /// rustls failed; its alert, if it made one, is still queued (take it
    /// with [`collect_alert`]).
    Tls(rustls::Error),
    /// The peer sent close_notify before the handshake finished (an
    /// abort).
    Closed,
    /// The peer closed the connection with the handshake unfinished.
    Eof,
}

/// Runs rustls' handshake state machine, on either end, as far as `input`
/// allows: the core of both drivers' `poll`. Queues what must be sent in
/// `output`, application data that came with the last flight in `early`;
/// counts in `after_finished` the records read after the handshake ended,
/// and those that were neither application data nor the close_notify
/// ([`AfterFinished`]: one may be a KeyUpdate).
pub(crate) fn advance<C: Unbuffered>(
    conn: &mut C,
    input: &mut Vec<u8>,
    output: &mut Vec<u8>,
    early: &mut Vec<u8>,
    peer_closed: &mut bool,
    after_finished: &mut AfterFinished,
    eof: bool,
) -> Result<Step, Stalled> {
    loop {
        // Records read by a call that starts after the handshake ended
        // are the client's traffic. rustls hands back the tickets it
        // seals at the client's Finished before it reads on, so a
        // KeyUpdate in the same flight is read by a later call (without
        // tickets it may be read by the Finished's own, and is missed).
        let traffic = !conn.is_handshaking();
        let records = if traffic { complete_records(input) } else { 0 };
        let mut opened = 0;
        let UnbufferedStatus { discard, state } = conn.process(input);
        let mut flush = false;
        let mut blocked = false;
        let mut done = false;
        let result: Result<(), Stalled> = match state {
            Err(e) => Err(Stalled::Tls(e)),
            Ok(ConnectionState::EncodeTlsData(mut enc)) => encode(output, |out| enc.encode(out))
                .map_err(|e| match e {
                    HandshakeError::Tls(t) => Stalled::Tls(t),
                    _ => Stalled::Tls(rustls::Error::General("encode".into())),
                }),
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                flush = true;
                Ok(())
            }
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                let mut res = Ok(());
                while let Some(rec) = r.next_record() {
                    match rec {
                        Ok(rec) => {
                            early.extend_from_slice(rec.payload);
                            opened += 1;
                        }
                        Err(e) => {
                            res = Err(Stalled::Tls(e));
                            break;
                        }
                    }
                }
                res
            }
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                *peer_closed = true;
                // The close_notify record is the client's last: no
                // KeyUpdate, nothing owed for it.
                if traffic {
                    opened += 1;
                }
                // Before the handshake finishes a close_notify is an abort;
                // after it, the stream stage reports EOF.
                if conn.is_handshaking() {
                    Err(Stalled::Closed)
                } else {
                    done = true;
                    Ok(())
                }
            }
            Ok(ConnectionState::WriteTraffic(_)) => {
                // A TLS 1.3 server may write once its own Finished is out,
                // before the client's Finished arrives: not done yet. (A
                // client is done once its Finished is queued; the
                // server's tickets come later, to the record path.)
                if conn.is_handshaking() {
                    blocked = true;
                } else {
                    done = true;
                }
                Ok(())
            }
            Ok(ConnectionState::BlockedHandshake) => {
                blocked = true;
                Ok(())
            }
            Ok(_) => Err(Stalled::Tls(rustls::Error::General(
                "unexpected early data state".into(),
            ))),
        };
        if discard > 0 {
            input.drain(..discard);
        }
        if traffic {
            let read = records.saturating_sub(complete_records(input));
            after_finished.records += read as u64;
            after_finished.other += read as i64 - opened as i64;
        }
        result?;
        // What rustls sealed after the handshake (TLS 1.3 tickets) waits
        // for the connection's first record only when that record is on its
        // way: the client's first bytes came with its Finished, so ktern
        // answers soon, and that answer acknowledges them. A client that
        // sent its Finished alone gets the tickets at once: they carry the
        // ACK its next write may wait for (Nagle's algorithm held a Python
        // client's request for the 40 ms of a delayed ACK when they waited).
        // Records after the tickets are read first, to know which case
        // this is. See `Established::unsent`.
        let may_wait = conn.output_may_wait();
        if flush && !output.is_empty() && !may_wait {
            return Ok(Step::Transmit);
        }
        if blocked || done {
            let held = done && may_wait && !early.is_empty();
            if !output.is_empty() && !held {
                return Ok(Step::Transmit);
            }
            if done && *peer_closed {
                // Records after close_notify are ignored (RFC 8446 §6.1).
                input.clear();
            }
            if done {
                // rustls leaves a complete record in `input` only while a
                // handshake message in it is unfinished: it joins a message
                // that spans records (RFC 8446 §5.1) in place, and its
                // offsets point into this buffer. After the handshake that
                // is a post-handshake message (a KeyUpdate) cut across
                // records. The record paths start from a buffer of their
                // own, where rustls' next call indexed past the end (a
                // panic of the shard's thread), and the kernel path would
                // lose the bytes: the handshake fails instead.
                if !input.is_empty() && partial_record_remaining(input) == 0 {
                    return Err(Stalled::Tls(rustls::Error::General(
                        "a post-handshake message cut across records at the handshake's end".into(),
                    )));
                }
                return match partial_record_remaining(input) {
                    0 => Ok(Step::Done),
                    _ if eof => Err(Stalled::Eof),
                    n => Ok(Step::Read(Some(n))),
                };
            }
            if eof {
                return Err(Stalled::Eof);
            }
            return Ok(Step::Read(None));
        }
    }
}

/// rustls' unbuffered connection on either end, as the record paths use
/// it (rustls has one `process_tls_records` per end, not a shared trait).
pub(crate) trait Unbuffered {
    /// rustls' per-end connection data.
    type Data;
    /// `process_tls_records`.
    fn process<'c, 'i>(&'c mut self, input: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// rustls has queued bytes for the peer.
    fn wants_write(&self) -> bool;
    /// The handshake is not over yet.
    fn is_handshaking(&self) -> bool;
    /// What rustls queues now need not go out before the handshake
    /// returns: a TLS 1.3 server's NewSessionTickets, sealed after the
    /// client's Finished (RFC 8446 §4.6.1), which the client does not wait
    /// for. Not TLS 1.2's last server flight (CCS and Finished), nor
    /// anything a client sends.
    fn output_may_wait(&self) -> bool {
        false
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, input: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(input)
    }
    fn wants_write(&self) -> bool {
        rustls::CommonState::wants_write(self)
    }
    fn is_handshaking(&self) -> bool {
        rustls::CommonState::is_handshaking(self)
    }
    fn output_may_wait(&self) -> bool {
        !self.is_handshaking() && self.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
    }
}

impl Unbuffered for rustls::client::UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, input: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(input)
    }
    fn wants_write(&self) -> bool {
        rustls::CommonState::wants_write(self)
    }
    fn is_handshaking(&self) -> bool {
        rustls::CommonState::is_handshaking(self)
    }
}

/// [`encode`] with a first guess of the space needed (e.g. the plaintext
/// length plus record overhead), so the common case calls rustls once.
pub(crate) fn encode_sized<E>(
    out: &mut Vec<u8>,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(), HandshakeError>
where
    E: EncodeLike,
{
    let start = out.len();
    let mut want = guess.max(64);
    loop {
        // Exactly: amortized growth would double a 64 KiB batch's buffer
        // to 128 KiB, and a slow reader's connection holds it for as long
        // as the client takes (issue 12's slow readers).
        out.reserve_exact((start + want).saturating_sub(out.len()));
        out.resize(start + want, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match e.required_size() {
                Some(n) if n > want => want = n,
                _ => {
                    out.truncate(start);
                    return Err(HandshakeError::Tls(rustls::Error::General(e.describe())));
                }
            },
        }
    }
}

/// The two rustls error types that can ask for a bigger buffer.
pub(crate) trait EncodeLike {
    fn required_size(&self) -> Option<usize>;
    fn describe(&self) -> String;
}

impl EncodeLike for EncodeError {
    fn required_size(&self) -> Option<usize> {
        match self {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Some(*required_size)
            }
            _ => None,
        }
    }
    fn describe(&self) -> String {
        self.to_string()
    }
}

impl EncodeLike for rustls::unbuffered::EncryptError {
    fn required_size(&self) -> Option<usize> {
        match self {
            rustls::unbuffered::EncryptError::InsufficientSize(InsufficientSizeError {
                required_size,
            }) => Some(*required_size),
            _ => None,
        }
    }
    fn describe(&self) -> String {
        self.to_string()
    }
}

/// How many more bytes complete the record that starts `buf` (0 if `buf` is
/// empty, or starts with a complete record). rustls consumes every complete
/// record except one holding part of a handshake message (which `advance`
/// refuses at the handshake's end), so whatever is left after the handshake
/// is at most one partial record.
pub fn partial_record_remaining(buf: &[u8]) -> usize {
    match buf.len() {
        0 => 0,
        n if n < 5 => 5 - n,
        n => {
            let total = 5 + u16::from_be_bytes([buf[3], buf[4]]) as usize;
            total.saturating_sub(n)
        }
    }
}

/// How many complete TLS records `buf` starts with.
pub(crate) fn complete_records(mut buf: &[u8]) -> usize {
    let mut n = 0;
    while let [_, _, _, hi, lo, ..] = *buf {
        let len = 5 + usize::from(u16::from_be_bytes([hi, lo]));
        match buf.get(len..) {
            Some(rest) => buf = rest,
            None => break,
        }
        n += 1;
    }
    n
}

/// Session data type the rest of the crate names.
pub type ServerData = ServerConnectionData;

#[cfg(test)]
mod tests;
