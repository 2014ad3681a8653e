//! Metrics with labels and histograms, still one writer per shard.
//!
//! Label sets that are known in advance (TLS version × cipher suite × key
//! exchange group × resumed, userspace reasons, status classes) are dense
//! arrays of atomics indexed without a lookup. Label sets that depend on the
//! config (listener and upstream names) are resolved once per config
//! generation: the shard asks [`Families::responses_for`] when it builds a
//! generation and keeps the `Arc`, so a request does one relaxed add, and
//! counts survive reloads (the same names find the same counters).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::{CipherSuite, NamedGroup, ProtocolVersion};

/// Histogram bucket bounds in seconds: from a loopback handshake (~0.5 ms)
/// to a slow backend (10 s).
pub const BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram (seconds).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket (not cumulative) counts; the last is +Inf.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// Renders the sum of `hists` as one Prometheus histogram.
pub fn render_histogram(out: &mut String, name: &str, help: &str, hists: &[&Histogram]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0u64;
    for (i, bound) in BOUNDS.iter().map(Some).chain([None]).enumerate() {
        cumulative += hists
            .iter()
            .map(|h| h.buckets[i].load(Ordering::Relaxed))
            .sum::<u64>();
        match bound {
            Some(b) => {
                let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
            }
        }
    }
    let sum: u64 = hists
        .iter()
        .map(|h| h.sum_micros.load(Ordering::Relaxed))
        .sum();
    let _ = writeln!(
        out,
        "{name}_sum {}\n{name}_count {cumulative}",
        sum as f64 / 1e6
    );
}

const VERSIONS: [&str; 2] = ["TLSv1.2", "TLSv1.3"];
const SUITES: [(CipherSuite, &str); 9] = [
    (
        CipherSuite::TLS13_AES_128_GCM_SHA256,
        "TLS13_AES_128_GCM_SHA256",
    ),
    (
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        "TLS13_AES_256_GCM_SHA384",
    ),
    (
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        "TLS13_CHACHA20_POLY1305_SHA256",
    ),
    (
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ),
    (
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    ),
    (
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
    (
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    ),
    (
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    ),
    (
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
];
const GROUPS: [(NamedGroup, &str); 6] = [
    (NamedGroup::X25519, "X25519"),
    (NamedGroup::secp256r1, "secp256r1"),
    (NamedGroup::secp384r1, "secp384r1"),
    (NamedGroup::secp521r1, "secp521r1"),
    (NamedGroup::X25519MLKEM768, "X25519MLKEM768"),
    (NamedGroup::MLKEM768, "MLKEM768"),
];
/// Suites and groups outside the lists count under "other" (and the
/// "none" group: a TLS 1.2 resumption negotiates no key exchange).
const N_SUITES: usize = SUITES.len() + 1;
const N_GROUPS: usize = GROUPS.len() + 2;
const N_HANDSHAKES: usize = VERSIONS.len() * N_SUITES * N_GROUPS * 2;

/// Completed handshakes by version, cipher suite, key exchange group and
/// whether they resumed.
#[derive(Debug)]
pub struct HandshakeCounters {
    counts: Box<[AtomicU64]>,
}

impl Default for HandshakeCounters {
    fn default() -> Self {
        HandshakeCounters {
            counts: (0..N_HANDSHAKES).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl HandshakeCounters {
    /// Counts one completed handshake.
    pub fn record(
        &self,
        version: Option<ProtocolVersion>,
        suite: Option<CipherSuite>,
        group: Option<NamedGroup>,
        resumed: bool,
    ) {
        let v = usize::from(version == Some(ProtocolVersion::TLSv1_3));
        let s = suite
            .and_then(|s| SUITES.iter().position(|(c, _)| *c == s))
            .unwrap_or(SUITES.len());
        let g = match group {
            None => GROUPS.len() + 1,
            Some(g) => GROUPS
                .iter()
                .position(|(n, _)| *n == g)
                .unwrap_or(GROUPS.len()),
        };
        let i = ((v * N_SUITES + s) * N_GROUPS + g) * 2 + usize::from(resumed);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Renders the sum of `all` (only label sets that occurred).
pub fn render_handshakes(out: &mut String, all: &[&HandshakeCounters]) {
    let name = "ktern_tls_handshakes_total";
    let _ = writeln!(
        out,
        "# HELP {name} TLS handshakes completed, by version, cipher suite, key exchange group and resumption.\n# TYPE {name} counter"
    );
    for i in 0..N_HANDSHAKES {
        let n: u64 = all
            .iter()
            .map(|h| h.counts[i].load(Ordering::Relaxed))
            .sum();
        if n == 0 {
            continue;
        }
        let resumed = i % 2 == 1;
        let g = (i / 2) % N_GROUPS;
        let s = (i / 2 / N_GROUPS) % N_SUITES;
        let v = i / 2 / N_GROUPS / N_SUITES;
        let suite = SUITES.get(s).map_or("other", |x| x.1);
        let group = match GROUPS.get(g) {
            Some(x) => x.1,
            None if g == GROUPS.len() => "other",
            None => "none",
        };
        let _ = writeln!(
            out,
            "{name}{{version=\"{}\",cipher=\"{suite}\",group=\"{group}\",resumed=\"{resumed}\"}} {n}",
            VERSIONS[v]
        );
    }
}

/// Why a connection's records stayed in userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserspaceReason {
    /// `runtime.ktls = "off"`.
    Config,
    /// The kernel has no kTLS (no `tls` ULP).
    NoKernelTls,
    /// The kernel cannot do the negotiated version and cipher.
    Cipher,
    /// The peer closed (or reset) during the handshake, before the keys
    /// could go to the kernel, which takes only an established socket.
    PeerClosed,
}

impl UserspaceReason {
    const ALL: [(UserspaceReason, &'static str); 4] = [
        (UserspaceReason::Config, "config"),
        (UserspaceReason::NoKernelTls, "no_kernel_tls"),
        (UserspaceReason::Cipher, "cipher"),
        (UserspaceReason::PeerClosed, "peer_closed"),
    ];
}

/// HTTP responses by status class, for one (listener, upstream) pair.
#[derive(Debug, Default)]
pub struct ClassCounters {
    class: [AtomicU64; 5],
}

impl ClassCounters {
    /// Counts one response with `status` (100-599).
    pub fn record(&self, status: u16) {
        let i = usize::from(status / 100).clamp(1, 5) - 1;
        self.class[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Label value for responses ktern made from a `static` rule.
pub const STATIC: &str = "(static)";
/// Label value for ktern's own answers with no upstream (no route, refused
/// requests).
pub const NONE: &str = "(none)";

/// A shard's labeled metrics and histograms.
#[derive(Debug, Default)]
pub struct Families {
    /// Completed handshakes by TLS facts.
    pub handshakes: HandshakeCounters,
    /// Accept to handshake done.
    pub handshake_seconds: Histogram,
    /// HTTP request head to the end of the response.
    pub request_seconds: Histogram,
    /// HTTP request head sent to the backend's response head.
    pub upstream_ttfb_seconds: Histogram,
    /// One reload, read to live (control side only).
    pub reload_seconds: Histogram,
    userspace: [AtomicU64; 4],
    responses: Mutex<BTreeMap<(String, String), Arc<ClassCounters>>>,
    active: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

impl Families {
    /// Counts a connection kept in userspace.
    pub fn userspace(&self, reason: UserspaceReason) {
        let i = UserspaceReason::ALL
            .iter()
            .position(|(r, _)| *r == reason)
            .unwrap_or(0);
        self.userspace[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The response counters of (listener, upstream); made on first use.
    /// Called when a shard builds a generation, not per request.
    pub fn responses_for(&self, listener: &str, upstream: &str) -> Arc<ClassCounters> {
        let mut map = self.responses.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((listener.to_string(), upstream.to_string()))
            .or_default()
            .clone()
    }

    /// The open-connections gauge of `listener`; made on first use.
    pub fn active_for(&self, listener: &str) -> Arc<AtomicU64> {
        let mut map = self.active.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(listener.to_string()).or_default().clone()
    }
}

/// Renders the labeled families and histograms summed over `all`.
pub fn render(out: &mut String, all: &[&Families]) {
    render_handshakes(out, &all.iter().map(|f| &f.handshakes).collect::<Vec<_>>());
    render_histogram(
        out,
        "ktern_handshake_duration_seconds",
        "Time from accept to a completed TLS handshake.",
        &all.iter().map(|f| &f.handshake_seconds).collect::<Vec<_>>(),
    );
    let name = "ktern_ktls_userspace_reason_total";
    let _ = writeln!(
        out,
        "# HELP {name} Connections kept on userspace records, by reason (config: ktls = \"off\"; no_kernel_tls; cipher: the kernel lacks the negotiated version and cipher; peer_closed: the client closed before the keys could go to the kernel).\n# TYPE {name} counter"
    );
    for (i, (_, label)) in UserspaceReason::ALL.iter().enumerate() {
        let n: u64 = all
            .iter()
            .map(|f| f.userspace[i].load(Ordering::Relaxed))
            .sum();
        let _ = writeln!(out, "{name}{{reason=\"{label}\"}} {n}");
    }
    let name = "ktern_http_responses_total";
    let _ = writeln!(
        out,
        "# HELP {name} HTTP responses sent, by listener, the upstream group the request was routed to (also for ktern's own 413/502/504 answers; \"(static)\": files; \"(none)\": no rule matched or refused before routing) and status class.\n# TYPE {name} counter"
    );
    let mut sums: BTreeMap<(String, String), [u64; 5]> = BTreeMap::new();
    for f in all {
        let map = f.responses.lock().unwrap_or_else(|e| e.into_inner());
        for (key, c) in map.iter() {
            let s = sums.entry(key.clone()).or_default();
            for (i, v) in c.class.iter().enumerate() {
                s[i] += v.load(Ordering::Relaxed);
            }
        }
    }
    for ((listener, upstream), counts) in &sums {
        for (i, n) in counts.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{listener=\"{}\",upstream=\"{}\",class=\"{}xx\"}} {n}",
                escape(listener),
                escape(upstream),
                i + 1
            );
        }
    }
    render_histogram(
        out,
        "ktern_http_request_duration_seconds",
        "Time from an HTTP request head to the end of its response.",
        &all.iter().map(|f| &f.request_seconds).collect::<Vec<_>>(),
    );
    render_histogram(
        out,
        "ktern_upstream_response_time_seconds",
        "Time from the request head's arrival to the backend's response head (includes the backend connect and the request body).",
        &all.iter()
            .map(|f| &f.upstream_ttfb_seconds)
            .collect::<Vec<_>>(),
    );
    render_histogram(
        out,
        "ktern_reload_duration_seconds",
        "Time a reload took: reading the config, certificates and keys, building the TLS configs and sockets, until every shard serves the new generation (or the refusal).",
        &all.iter().map(|f| &f.reload_seconds).collect::<Vec<_>>(),
    );
    let name = "ktern_listener_connections_active";
    let _ = writeln!(
        out,
        "# HELP {name} Connections open now, by listener.\n# TYPE {name} gauge"
    );
    let mut active: BTreeMap<String, u64> = BTreeMap::new();
    for f in all {
        let mut map = f.active.lock().unwrap_or_else(|e| e.into_inner());
        // A listener no generation serves any more (a reload removed it,
        // and the last connection of the generation that had it ended):
        // only this map holds its gauge, and its series goes, as the
        // listener did, rather than say 0 until the process ends.
        map.retain(|_, v| Arc::strong_count(v) > 1);
        for (k, v) in map.iter() {
            *active.entry(k.clone()).or_default() += v.load(Ordering::Relaxed);
        }
    }
    for (listener, n) in &active {
        let _ = writeln!(out, "{name}{{listener=\"{}\"}} {n}", escape(listener));
    }
}

/// Escapes a label value (Prometheus text format: backslash, quote, newline).
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let a = Histogram::default();
        let b = Histogram::default();
        a.observe(Duration::from_micros(300));
        a.observe(Duration::from_millis(7));
        b.observe(Duration::from_secs(60));
        let mut out = String::new();
        render_histogram(&mut out, "x_seconds", "h", &[&a, &b]);
        assert!(out.contains("x_seconds_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 60.0073\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        assert_eq!(a.count() + b.count(), 3);
    }

    #[test]
    fn handshakes_render_only_what_happened_with_every_label() {
        let h = HandshakeCounters::default();
        h.record(
            Some(ProtocolVersion::TLSv1_3),
            Some(CipherSuite::TLS13_AES_256_GCM_SHA384),
            Some(NamedGroup::X25519),
            false,
        );
        h.record(
            Some(ProtocolVersion::TLSv1_3),
            Some(CipherSuite::TLS13_AES_256_GCM_SHA384),
            Some(NamedGroup::X25519),
            false,
        );
        h.record(
            Some(ProtocolVersion::TLSv1_2),
            Some(CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
            None,
            true,
        );
        h.record(
            Some(ProtocolVersion::TLSv1_3),
            Some(CipherSuite::Unknown(0x1305)),
            Some(NamedGroup::FFDHE2048),
            true,
        );
        let mut out = String::new();
        render_handshakes(&mut out, &[&h]);
        let lines: Vec<_> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "ktern_tls_handshakes_total{version=\"TLSv1.2\",cipher=\"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\",group=\"none\",resumed=\"true\"} 1",
                "ktern_tls_handshakes_total{version=\"TLSv1.3\",cipher=\"TLS13_AES_256_GCM_SHA384\",group=\"X25519\",resumed=\"false\"} 2",
                "ktern_tls_handshakes_total{version=\"TLSv1.3\",cipher=\"other\",group=\"other\",resumed=\"true\"} 1",
            ]
        );
    }

    #[test]
    fn labeled_counters_survive_a_new_lookup_and_sum_over_shards() {
        let (a, b) = (Families::default(), Families::default());
        a.responses_for("web", "api").record(200);
        // A reload looks the same names up again: same counters.
        a.responses_for("web", "api").record(204);
        b.responses_for("web", "api").record(503);
        b.responses_for("web\"x", NONE).record(404);
        let web = a.active_for("web");
        web.fetch_add(2, Ordering::Relaxed);
        // Held by no generation: not rendered.
        b.active_for("gone");
        a.userspace(UserspaceReason::Cipher);
        let mut out = String::new();
        render(&mut out, &[&a, &b]);
        assert!(!out.contains("listener=\"gone\""), "{out}");
        assert!(
            out.contains(
                "ktern_http_responses_total{listener=\"web\",upstream=\"api\",class=\"2xx\"} 2\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "ktern_http_responses_total{listener=\"web\",upstream=\"api\",class=\"5xx\"} 1\n"
            ),
            "{out}"
        );
        assert!(out.contains("ktern_http_responses_total{listener=\"web\\\"x\",upstream=\"(none)\",class=\"4xx\"} 1\n"), "{out}");
        assert!(
            out.contains("ktern_listener_connections_active{listener=\"web\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("ktern_ktls_userspace_reason_total{reason=\"cipher\"} 1\n"),
            "{out}"
        );
    }
}
