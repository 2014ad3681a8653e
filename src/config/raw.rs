//! The config file as written: serde structs that mirror the TOML, with
//! defaults and unknown fields rejected. `super::Validator` turns them into
//! the typed [`super::Config`].

use serde::Deserialize;

/// `runtime.ktls`: where record encryption happens after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KtlsMode {
    /// Use kTLS where the kernel supports the negotiated cipher, else rustls in
    /// userspace (logged once).
    #[default]
    Auto,
    /// Refuse to start on a kernel without kTLS.
    Required,
    /// Always encrypt in userspace.
    Off,
}

/// `runtime.uring_taskrun`: how each shard's io_uring runs completion work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TaskRun {
    /// `IORING_SETUP_COOP_TASKRUN` with `SINGLE_ISSUER` (Linux 6.0+):
    /// completions run when the shard next enters the kernel, with no
    /// interrupt of the running shard to deliver them.
    #[default]
    Coop,
    /// `DEFER_TASKRUN` with `SINGLE_ISSUER` (Linux 6.1+): completions run
    /// only when the shard waits for them.
    Defer,
    /// The kernel's default (task work may interrupt the shard).
    Off,
}

/// `runtime.driver`: which monoio I/O driver the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// io_uring when the kernel allows it, else the legacy driver.
    #[default]
    Auto,
    /// io_uring only.
    IoUring,
    /// epoll (monoio's legacy driver).
    Legacy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub runtime: RuntimeSection,
    #[serde(default)]
    pub listener: Vec<ListenerSection>,
    pub admin: Option<AdminSection>,
    pub access_log: Option<AccessLogSection>,
    #[serde(default)]
    pub tickets: TicketsSection,
    #[serde(default)]
    pub acme: AcmeSection,
    #[serde(default)]
    pub redirect: Vec<RedirectSection>,
    /// Named upstream groups for `http` routes, in file order.
    #[serde(default)]
    pub upstream: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClientAuthSection {
    pub ca: String,
    #[serde(default = "default_client_auth_mode")]
    pub mode: String,
    #[serde(default = "default_verify_depth")]
    pub verify_depth: u8,
    pub crl: Option<String>,
}

fn default_client_auth_mode() -> String {
    "required".into()
}

/// nginx's `ssl_verify_depth` default: a client certificate issued by a
/// CA of the bundle, or through one intermediate the client sends.
fn default_verify_depth() -> u8 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProxyProtocolSection {
    pub trusted: Vec<String>,
    #[serde(default = "default_proxy_timeout")]
    pub timeout: String,
}

fn default_proxy_timeout() -> String {
    "5s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TicketsSection {
    pub secret_file: Option<String>,
    #[serde(default = "default_ticket_rotation")]
    pub rotation: String,
}

impl Default for TicketsSection {
    fn default() -> Self {
        TicketsSection {
            secret_file: None,
            rotation: default_ticket_rotation(),
        }
    }
}

fn default_ticket_rotation() -> String {
    "12h".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AccessLogSection {
    pub path: String,
    #[serde(default = "default_access_format")]
    pub format: String,
    #[serde(default = "default_access_queue")]
    pub queue: String,
}

fn default_access_queue() -> String {
    "4m".into()
}

fn default_access_format() -> String {
    "combined".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuntimeSection {
    pub cpus: Option<Vec<usize>>,
    #[serde(default)]
    pub ktls: KtlsMode,
    #[serde(default = "default_ktls_after")]
    pub ktls_after: String,
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: String,
    #[serde(default = "default_uring_entries")]
    pub uring_entries: u32,
    #[serde(default)]
    pub driver: Driver,
    #[serde(default)]
    pub uring_taskrun: TaskRun,
    #[serde(default = "default_max_connections")]
    pub max_connections: u64,
    #[serde(default = "default_drain_delay")]
    pub drain_delay: String,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: String,
    pub user: Option<String>,
    pub group: Option<String>,
    #[serde(default)]
    pub log_format: LogFormat,
    pub upgrade_socket: Option<String>,
    #[serde(default = "default_true")]
    pub memory_trim: bool,
}

/// 64 KiB: see `Runtime::ktls_after` for the measurements behind it.
fn default_ktls_after() -> String {
    "64k".into()
}

fn default_true() -> bool {
    true
}

fn default_drain_delay() -> String {
    "5s".into()
}

fn default_drain_timeout() -> String {
    "30s".into()
}

/// How ktern writes its own log lines (not the access log).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, text otherwise.
    #[default]
    Auto,
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection {
            cpus: None,
            ktls: KtlsMode::Auto,
            ktls_after: default_ktls_after(),
            handshake_timeout: default_handshake_timeout(),
            uring_entries: default_uring_entries(),
            driver: Driver::Auto,
            uring_taskrun: TaskRun::default(),
            max_connections: default_max_connections(),
            drain_delay: default_drain_delay(),
            drain_timeout: default_drain_timeout(),
            user: None,
            group: None,
            log_format: LogFormat::Auto,
            upgrade_socket: None,
            memory_trim: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenerSection {
    pub name: Option<String>,
    pub address: String,
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    #[serde(default)]
    pub certificate: Vec<CertificateSection>,
    #[serde(default)]
    pub strict_sni: bool,
    pub prefer_server_ciphers: Option<bool>,
    #[serde(default)]
    pub max_conns_per_client: u32,
    pub proxy_protocol: Option<ProxyProtocolSection>,
    pub client_auth: Option<ClientAuthSection>,
    #[serde(default = "default_tls_versions")]
    pub tls_versions: Vec<String>,
    /// ALPN protocols offered, most preferred first (default: `http/1.1`
    /// on `http` routes, none on `tcp`).
    pub alpn: Option<Vec<String>>,
    /// IANA cipher suite names, most preferred first (default: the
    /// provider's, AES-128-GCM first: `handshake::listener_provider`).
    pub cipher_suites: Option<Vec<String>>,
    /// Key exchange groups, most preferred first (default: the
    /// provider's).
    pub kx_groups: Option<Vec<String>>,
    pub route: RouteSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CertificateSection {
    /// Chain and key files; absent when `acme` obtains them.
    pub cert: Option<String>,
    pub key: Option<String>,
    /// Obtained and renewed by ktern's ACME client.
    pub acme: Option<AcmeCertSection>,
    #[serde(default)]
    pub server_names: Vec<String>,
    /// A DER OCSP response to staple.
    pub ocsp: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AcmeCertSection {
    pub domains: Vec<String>,
    #[serde(default)]
    pub contact: Vec<String>,
    pub directory: String,
    /// PEM roots for the directory's HTTPS (else the system's).
    pub ca: Option<String>,
    #[serde(default = "default_acme_challenge")]
    pub challenge: String,
}

fn default_acme_challenge() -> String {
    "tls-alpn-01".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AcmeSection {
    #[serde(default = "default_acme_state_dir")]
    pub state_dir: String,
    #[serde(default = "default_acme_retry")]
    pub retry: String,
    #[serde(default = "default_acme_retry_max")]
    pub retry_max: String,
}

impl Default for AcmeSection {
    fn default() -> Self {
        AcmeSection {
            state_dir: default_acme_state_dir(),
            retry: default_acme_retry(),
            retry_max: default_acme_retry_max(),
        }
    }
}

fn default_acme_state_dir() -> String {
    "/var/lib/ktern/acme".into()
}

/// Ten minutes, doubling: at most 3 failed validations of a name in the
/// first hour, under Let's Encrypt's limit of 5 per name per hour.
fn default_acme_retry() -> String {
    "10m".into()
}

fn default_acme_retry_max() -> String {
    "6h".into()
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub(super) enum RouteSection {
    Tcp(TcpRouteSection),
    // Boxed: parsed once per load, and the http section is four times the
    // tcp one.
    Http(Box<HttpRouteSection>),
    Passthrough(PassthroughRouteSection),
}

/// `kind = "passthrough"`: TLS routed by its ClientHello, not terminated.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PassthroughRouteSection {
    #[serde(default)]
    pub rule: Vec<PassthroughRuleSection>,
    /// The upstream group for a hello no rule matches (no SNI included);
    /// absent: such connections are closed.
    pub default: Option<String>,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
    /// How long a client has to send its whole ClientHello.
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout: String,
    pub send_proxy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PassthroughRuleSection {
    /// `app.example`, `*.example` or `*`.
    pub sni: String,
    /// Matches only hellos offering this ALPN protocol.
    pub alpn: Option<String>,
    pub upstream: String,
}

/// A ClientHello is one or two packets; seconds cover a slow mobile link,
/// and a client that sends nothing is closed as a handshake would be.
fn default_hello_timeout() -> String {
    "10s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HttpRouteSection {
    #[serde(default)]
    pub rule: Vec<RuleSection>,
    #[serde(default = "default_max_body")]
    pub max_body: String,
    #[serde(default = "default_head_timeout")]
    pub head_timeout: String,
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: String,
    #[serde(default = "default_send_timeout")]
    pub send_timeout: String,
    #[serde(default = "default_min_body_rate")]
    pub min_body_rate: String,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default = "yes")]
    pub x_forwarded: bool,
    #[serde(default = "yes")]
    pub forwarded: bool,
    pub hsts: Option<String>,
    #[serde(default)]
    pub http2: Http2Section,
}

/// `[listener.route.http2]`: HTTP/2 limits (defaults in the README).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Http2Section {
    #[serde(default = "default_h2_streams")]
    pub max_concurrent_streams: u32,
    #[serde(default = "default_h2_header_list")]
    pub max_header_list_size: String,
    #[serde(default = "default_h2_stream_window")]
    pub stream_window: String,
    #[serde(default = "default_h2_connection_window")]
    pub connection_window: String,
    #[serde(default = "default_h2_send_buffer")]
    pub send_buffer: String,
    #[serde(default = "default_h2_pending_resets")]
    pub max_pending_resets: usize,
    #[serde(default = "default_h2_error_resets")]
    pub max_error_resets: usize,
    #[serde(default = "default_h2_control_frames")]
    pub max_control_frames: u32,
    #[serde(default = "default_true")]
    pub websocket: bool,
}

impl Default for Http2Section {
    fn default() -> Self {
        Http2Section {
            max_concurrent_streams: default_h2_streams(),
            max_header_list_size: default_h2_header_list(),
            stream_window: default_h2_stream_window(),
            connection_window: default_h2_connection_window(),
            send_buffer: default_h2_send_buffer(),
            max_pending_resets: default_h2_pending_resets(),
            max_error_resets: default_h2_error_resets(),
            max_control_frames: default_h2_control_frames(),
            websocket: true,
        }
    }
}

/// nginx's `http2_max_concurrent_streams`.
fn default_h2_streams() -> u32 {
    100
}
/// The HTTP/1.1 head limit (`head::Limits::head`): a request is no larger
/// over HTTP/2 than over HTTP/1.1.
fn default_h2_header_list() -> String {
    "32k".into()
}
/// What a stream may send before the body is read: an upload runs at the
/// backend's pace with at most this much per stream in ktern.
fn default_h2_stream_window() -> String {
    "64k".into()
}
/// `auto`: `max_concurrent_streams` × `stream_window` (`config::Http2`).
fn default_h2_connection_window() -> String {
    "auto".into()
}
/// Response bytes h2 buffers per stream for a client that has not opened
/// its window (h2's default is 400 KiB).
fn default_h2_send_buffer() -> String {
    "64k".into()
}
/// h2's defence against rapid reset (CVE-2023-44487): streams reset by
/// the client before they were accepted, at once.
fn default_h2_pending_resets() -> usize {
    20
}
/// h2's defence against "MadeYouReset" (CVE-2025-8671): streams the server
/// had to reset for the client's errors.
fn default_h2_error_resets() -> usize {
    1024
}
/// SETTINGS, PING, RST_STREAM and empty DATA/HEADERS frames per
/// connection, over every ten requests: more is a flood.
fn default_h2_control_frames() -> u32 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleSection {
    pub host: Option<String>,
    pub sni: Option<String>,
    #[serde(default = "default_path")]
    pub path: String,
    pub upstream: Option<String>,
    #[serde(rename = "static")]
    pub static_root: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamSection {
    pub backends: Vec<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    #[serde(default = "default_response_timeout")]
    pub response_timeout: String,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default = "default_pool_idle")]
    pub pool_idle_timeout: String,
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    #[serde(default = "default_fail_timeout")]
    pub fail_timeout: String,
    #[serde(default)]
    pub max_conns: u32,
    #[serde(default = "default_balance")]
    pub balance: String,
    pub hash_key: Option<String>,
    pub health: Option<HealthSection>,
    pub send_proxy: Option<String>,
    pub tls: Option<UpstreamTlsSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthSection {
    /// "http" (the default) or "tcp".
    pub check: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    #[serde(default = "default_health_interval")]
    pub interval: String,
    #[serde(default = "default_health_timeout")]
    pub timeout: String,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_balance() -> String {
    "round_robin".into()
}

/// HAProxy's `inter` default.
fn default_health_interval() -> String {
    "2s".into()
}

fn default_health_timeout() -> String {
    "1s".into()
}

/// HAProxy's `rise` default.
fn default_rise() -> u32 {
    2
}

/// HAProxy's `fall` default.
fn default_fall() -> u32 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TcpRouteSection {
    pub backends: Vec<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
    /// `"v1"` or `"v2"`: a PROXY header first on each backend connection.
    pub send_proxy: Option<String>,
    /// TLS to the backends (nginx's `proxy_ssl_*`).
    pub tls: Option<UpstreamTlsSection>,
}

/// `tls = { ... }` on a route: ktern speaks TLS to its backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamTlsSection {
    /// PEM bundle of the CAs a backend certificate must chain to.
    pub ca: String,
    #[serde(default = "default_verify_depth")]
    pub verify_depth: u8,
    /// The name sent as SNI and checked against the certificate (default:
    /// the backend's IP address, checked against its IP SANs; no SNI).
    pub server_name: Option<String>,
    #[serde(default = "yes")]
    pub verify_name: bool,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    #[serde(default = "default_tls_versions")]
    pub versions: Vec<String>,
    #[serde(default = "yes")]
    pub session_reuse: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RedirectSection {
    pub address: String,
    pub https_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminSection {
    pub address: String,
}

/// Per shard. Each connection costs a few KiB of memory and one or two fds; the
/// cap keeps a flood from exhausting either (HAProxy's `maxconn`).
fn default_max_connections() -> u64 {
    100_000
}

/// nginx's `max_fails` default.
fn default_max_fails() -> u32 {
    1
}
/// nginx's `fail_timeout` default.
fn default_fail_timeout() -> String {
    "10s".into()
}

fn yes() -> bool {
    true
}
/// nginx's `client_max_body_size` default.
fn default_max_body() -> String {
    "1m".into()
}
/// nginx's `client_header_timeout` default.
fn default_head_timeout() -> String {
    "60s".into()
}
/// nginx's `keepalive_timeout` default.
fn default_keepalive_timeout() -> String {
    "75s".into()
}
/// nginx's `send_timeout` default.
fn default_send_timeout() -> String {
    "60s".into()
}
/// Apache mod_reqtimeout's default `MinRate`: far below any real upload
/// (a slow mobile link moves tens of KiB a second), far above a trickle.
fn default_min_body_rate() -> String {
    "500".into()
}
fn default_path() -> String {
    "/".into()
}
/// nginx's `proxy_read_timeout` default: time to the response head.
fn default_response_timeout() -> String {
    "60s".into()
}
/// Idle backend connections kept per upstream per shard.
fn default_pool_size() -> usize {
    32
}
/// Shorter than common backend keep-alive timeouts (nginx 75 s, Node 5 s
/// is the outlier: lower this for Node backends), so ktern drops an idle
/// connection before the backend does.
fn default_pool_idle() -> String {
    "4s".into()
}

fn default_handshake_timeout() -> String {
    "10s".into()
}
/// 1024 entries: enough for every shard's in-flight accepts, reads and writes
/// in one submission batch without -EBUSY; memory is ~64 KiB per ring.
fn default_uring_entries() -> u32 {
    1024
}
/// Matches nginx's `listen ... backlog` default on Linux (net.core.somaxconn).
fn default_backlog() -> u32 {
    4096
}
fn default_tls_versions() -> Vec<String> {
    vec!["1.2".into(), "1.3".into()]
}
fn default_connect_timeout() -> String {
    "5s".into()
}
/// HAProxy's common `timeout tunnel` for L4 is minutes; 5 minutes here.
fn default_idle_timeout() -> String {
    "300s".into()
}

/// Names the field a TOML/serde error is about, as the config's other
/// problems do (`listener[0].route.backends`): the key its span falls on,
/// under the table headers before it. "(syntax)" where the text says
/// nothing (a broken header, no span).
pub(super) fn toml_error_field(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message();
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|p| msg.strip_prefix(p)?.split('`').next());
    let Some(span) = e.span() else {
        return named.map_or_else(|| "(syntax)".into(), str::to_string);
    };
    let mut at = span.start.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    // A span that starts at a table's header (a missing key's; any error
    // in a table serde reads whole first, such as a route, tagged by its
    // `kind`) is about that table: the one the header opens.
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    if text[at..].starts_with('[') && text[line_start..at].trim().is_empty() {
        at = text[at..].find('\n').map_or(text.len(), |i| at + i + 1);
    }
    let (table, key) = table_and_key_at(text, at);
    match named.map(str::to_string).or(key) {
        Some(k) if table.is_empty() => k,
        Some(k) => format!("{table}.{k}"),
        None if !table.is_empty() => table,
        None => "(syntax)".into(),
    }
}

/// The table path (`listener[1].route`) in force at byte `at` of `text`,
/// from the `[table]` and `[[array]]` headers before it (each array
/// element numbered, a nested array restarting per element of its
/// parent), and the key whose value `at` falls in: the last `key =` before
/// it, on its line or the lines above (a value written across lines),
/// with the keys of the inline tables it sits in (`tls.ca`).
fn table_and_key_at(text: &str, at: usize) -> (String, Option<String>) {
    let mut counts: Vec<(String, usize)> = Vec::new();
    let mut table = String::new();
    let mut since_header = 0;
    let mut offset = 0;
    for line in text[..at].split_inclusive('\n') {
        let t = line.trim();
        let header = if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let prefix = format!("{name}.");
            counts.retain(|(k, _)| !k.starts_with(&prefix));
            match counts.iter_mut().find(|(k, _)| *k == name) {
                Some((_, n)) => *n += 1,
                None => counts.push((name.clone(), 1)),
            }
            Some(name)
        } else {
            t.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .map(|n| n.trim().to_string())
        };
        // A header line that ends before `at` starts a new table.
        if let Some(name) = header.filter(|_| offset + line.len() <= at) {
            let mut path = String::new();
            let mut prefix = String::new();
            for part in name.split('.') {
                if !prefix.is_empty() {
                    prefix.push('.');
                    path.push('.');
                }
                prefix.push_str(part.trim());
                path.push_str(part.trim());
                if let Some((_, n)) = counts.iter().find(|(k, _)| *k == prefix) {
                    path.push_str(&format!("[{}]", n - 1));
                }
            }
            table = path;
            since_header = offset + line.len();
        }
        offset += line.len();
    }
    (table, key_before(&text[since_header..at]))
}

/// The key of the value that `body` (a table's text up to a point in a
/// value) ends in: the last `key =` outside strings, with the keys of the
/// inline tables still open around it.
fn key_before(body: &str) -> Option<String> {
    let mut open: Vec<Option<String>> = Vec::new();
    let (mut key, mut token) = (None::<String>, String::new());
    let (mut quote, mut comment) = (None, false);
    for c in body.chars() {
        // A comment runs to its line's end (an apostrophe in one, as in
        // "nginx's", opens no string); a one-line string ends there too.
        if c == '\n' {
            comment = false;
            quote = None;
        }
        if comment {
            continue;
        }
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '#') => comment = true,
            (None, '"' | '\'') => quote = Some(c),
            (None, '=') => {
                key = Some(token.trim().trim_matches('"').to_string());
                token.clear();
            }
            (None, '{') => {
                open.push(key.take());
                token.clear();
            }
            (None, '}') => {
                key = open.pop().flatten();
                token.clear();
            }
            (None, ',' | '\n' | '[' | ']') => token.clear(),
            (None, c) => token.push(c),
        }
    }
    let key = key.filter(|k| !k.is_empty())?;
    let mut path: Vec<String> = open.into_iter().flatten().collect();
    path.push(key);
    Some(path.join("."))
}

/// " (line L, column C)" for a toml error with a span.
pub(super) fn toml_error_position(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!(" (line {line}, column {col})")
        }
        None => String::new(),
    }
}
