//! Counters. Each shard owns one [`ShardMetrics`] and is its only writer
//! (relaxed atomics on a cache line nobody else writes); the admin endpoint
//! sums all shards when scraped. Every unlabeled name is in [`COUNTERS`];
//! the labeled families and histograms are in `family.rs`; the README's
//! metrics table lists them all (a test keeps it complete).

pub mod access;
pub mod family;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

macro_rules! counters {
    ($( $field:ident => $name:literal, $help:literal; )*) => {
        /// One shard's counters.
        #[derive(Debug, Default)]
        pub struct ShardMetrics {
            $( #[doc = $help] pub $field: AtomicU64, )*
            /// Labeled families and histograms.
            pub families: family::Families,
        }

        /// (name, help, accessor) for every counter, in exposition order.
        pub const COUNTERS: &[(&str, &str, fn(&ShardMetrics) -> &AtomicU64)] = &[
            $( ($name, $help, |m| &m.$field), )*
        ];
    };
}

counters! {
    accepted => "ktern_connections_accepted_total", "TCP connections accepted (not those closed at once over runtime.max_connections).";
    active => "ktern_connections_active", "Connections open now (gauge: accepted minus closed).";
    refused_over_cap => "ktern_connections_refused_total", "Connections closed at accept: the shard was at runtime.max_connections.";
    refused_per_client => "ktern_connections_refused_per_client_total", "Connections closed before any TLS work: their client (an IPv4 address or IPv6 /64) had the listener's max_conns_per_client open.";
    handshakes => "ktern_handshakes_total", "TLS handshakes completed.";
    hs_fail_tls => "ktern_handshake_failures_tls_total", "Handshakes failed: client sent invalid TLS or negotiation failed (alert sent).";
    hs_fail_sni => "ktern_handshake_failures_unknown_sni_total", "Handshakes refused: strict_sni and the SNI was missing or matched no certificate (unrecognized_name sent).";
    client_cert_missing => "ktern_client_cert_failures_missing_total", "Handshakes refused by client_auth: no client certificate where one is required (certificate_required).";
    client_cert_unknown_ca => "ktern_client_cert_failures_unknown_ca_total", "Handshakes refused by client_auth: the client certificate is not from a CA of the bundle (unknown_ca).";
    client_cert_expired => "ktern_client_cert_failures_expired_total", "Handshakes refused by client_auth: the client certificate is expired or not yet valid (certificate_expired).";
    client_cert_revoked => "ktern_client_cert_failures_revoked_total", "Handshakes refused by client_auth: the client certificate is revoked by the CRL (certificate_revoked).";
    client_cert_bad => "ktern_client_cert_failures_bad_total", "Handshakes refused by client_auth: wrong usage (unsupported_certificate), malformed (bad_certificate), chain deeper than verify_depth (certificate_unknown), bad signature.";
    pp_headers => "ktern_proxy_protocol_headers_total", "PROXY protocol headers accepted (the client address they carry is the connection's).";
    pp_untrusted => "ktern_proxy_protocol_untrusted_total", "Connections closed on a PROXY protocol listener: the source is not in proxy_protocol.trusted.";
    pp_invalid => "ktern_proxy_protocol_invalid_total", "Connections closed on a PROXY protocol listener: missing, malformed or oversized header.";
    pp_timeout => "ktern_proxy_protocol_timeout_total", "Connections closed on a PROXY protocol listener: no complete header within proxy_protocol.timeout.";
    upstream_tls_handshakes => "ktern_upstream_tls_handshakes_total", "TLS handshakes with backends completed (tcp routes and upstream groups with tls).";
    upstream_tls_resumed => "ktern_upstream_tls_resumed_total", "Backend TLS handshakes that resumed a session (session_reuse).";
    upstream_tls_failures => "ktern_upstream_tls_failures_total", "Backend TLS handshakes failed (certificate refused, backend alert or close, not TLS, timeout); the client was closed (tcp), or the request went to the next backend, 502 when none was left (http).";
    upstream_ktls_offloaded => "ktern_upstream_ktls_offloaded_total", "Backend TLS connections whose record crypto went to the kernel.";
    passthrough_routed => "ktern_passthrough_connections_total", "Passthrough connections routed by their ClientHello to an upstream group.";
    passthrough_no_route => "ktern_passthrough_no_route_total", "Passthrough connections closed: no rule matched the SNI (or there was none) and no default is set.";
    passthrough_bad_hello => "ktern_passthrough_bad_hello_total", "Passthrough connections closed: the first bytes were not a TLS ClientHello, or it was larger than 64 KiB.";
    passthrough_hello_timeout => "ktern_passthrough_hello_timeout_total", "Passthrough connections closed: no whole ClientHello within hello_timeout.";
    hs_fail_timeout => "ktern_handshake_failures_timeout_total", "Handshakes failed: deadline passed.";
    hs_fail_eof => "ktern_handshake_failures_eof_total", "Handshakes failed: client closed or reset mid-handshake (on a passthrough listener: before its ClientHello ended).";
    ktls_offloaded => "ktern_ktls_offloaded_total", "Connections whose record crypto went to the kernel.";
    ktls_userspace => "ktern_ktls_userspace_total", "Connections kept on userspace rustls records.";
    ktls_deferred => "ktern_ktls_deferred_total", "Connections started on userspace records under ktls auto, their keys to go to the kernel at their first bulk transfer of `ktls_after` bytes.";
    http_spliced_bytes => "ktern_http_spliced_bytes_total", "Response body bytes an HTTP/1.1 connection moved from a plain backend to its kTLS socket by splice, never copied to userspace (bodies of known length from 64 KiB).";
    ktls_promoted => "ktern_ktls_promoted_total", "Deferred connections whose keys went to the kernel mid-connection (also counted in ktern_ktls_offloaded_total).";
    ktls_offload_errors => "ktern_ktls_offload_errors_total", "Connections closed because the kernel refused the keys.";
    ktls_rekey_rx => "ktern_ktls_rekey_rx_total", "RX keys replaced after a client KeyUpdate.";
    ktls_rekey_tx => "ktern_ktls_rekey_tx_total", "TX keys replaced (our KeyUpdate).";
    ktls_rekey_unsupported => "ktern_ktls_rekey_unsupported_total", "Connections closed with an alert: KeyUpdate but the kernel cannot rekey.";
    tls_unexpected => "ktern_tls_unexpected_records_total", "Connections closed with an alert: unexpected post-handshake record.";
    tls_peer_alerts => "ktern_tls_peer_alerts_total", "Connections the client aborted with a fatal alert.";
    tls_limit_closes => "ktern_tls_confidentiality_limit_closes_total", "Connections closed at the cipher's confidentiality limit for what ktern sends (where no rekey is possible).";
    downstream_errors => "ktern_downstream_errors_total", "Connections ended by a client-side error after the handshake.";
    upstream_connect_failures => "ktern_upstream_connect_failures_total", "Backend connects refused, failed or timed out.";
    upstream_full => "ktern_upstream_full_total", "Requests answered 503, and passthrough connections closed, because every backend of their upstream group had max_conns connections in use.";
    local_exhaustion => "ktern_local_resource_errors_total", "Accepts, backend connects and splice pipes that failed because ktern ran out of file descriptors, buffers or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), and requests that found no local port towards any backend (EADDRNOTAVAIL).";
    memory_trims => "ktern_memory_trims_total", "Times a shard gave freed heap memory back to the kernel after a burst of connections ended (runtime.memory_trim).";
    accept_errors => "ktern_accept_errors_total", "Accepts that failed (every kind; the log says so at most once per 10 s per shard).";
    upstream_errors => "ktern_upstream_errors_total", "Connections ended by a backend-side error after connecting.";
    internal_errors => "ktern_internal_errors_total", "Connections ended by ktern's own side failing: mid-response (a static file that could not be read or shrank while sent), or a bug caught in a connection's task (a panic, logged; it ends that connection only).";
    idle_timeouts => "ktern_idle_timeouts_total", "Connections closed after the idle timeout.";
    http_requests => "ktern_http_requests_total", "HTTP requests whose head was accepted.";
    http_local_errors => "ktern_http_local_responses_total", "HTTP responses generated by ktern (4xx/5xx: refused, no route, upstream failure).";
    access_log_dropped => "ktern_access_log_dropped_total", "Access log lines dropped: its writer (a slow disk, a stalled reader of stdout) was access_log.queue bytes behind. Requests never wait for the log.";
    h2_connections => "ktern_http2_connections_total", "Connections that negotiated HTTP/2 (ALPN h2).";
    h2_streams => "ktern_http2_streams_total", "HTTP/2 streams accepted (each one request).";
    h2_malformed => "ktern_http2_malformed_requests_total", "HTTP/2 requests reset as malformed (RFC 9113 §8.1.1: invalid fields, connection-specific fields, framing the HTTP/1.1 parser refuses).";
    h2_protocol_errors => "ktern_http2_protocol_errors_total", "HTTP/2 connections closed with GOAWAY for the client's protocol error (bad frames, invalid or connection-level field errors).";
    h2_floods => "ktern_http2_flood_closes_total", "HTTP/2 connections closed with GOAWAY ENHANCE_YOUR_CALM: rapid reset, CONTINUATION floods, streams the server had to reset, or a flood of control frames.";
    h2_stream_resets => "ktern_http2_stream_resets_total", "HTTP/2 streams the client reset before their response ended.";
    http_slow_bodies => "ktern_http_slow_request_bodies_total", "Requests answered 408 because their body stalled: nothing within head_timeout, or on average less than min_body_rate a second once head_timeout had passed.";
    http_send_timeouts => "ktern_http_send_timeouts_total", "HTTP connections aborted because the client took no response bytes within send_timeout (HTTP/2: also one that, after a GOAWAY, took no part in closing within it, and a stream reset alone because its window stayed shut while the client read others, or opened by less than 16 KiB over send_timeout of waiting).";
    upstream_timeouts => "ktern_upstream_timeouts_total", "Backend exchanges that timed out (no response head within response_timeout: 504).";
    pool_hits => "ktern_upstream_pool_hits_total", "Backend responses received on a pooled keep-alive connection.";
    pool_misses => "ktern_upstream_pool_misses_total", "Backend responses received on a new connection (none pooled, or the pooled one was stale).";
    bytes_in => "ktern_bytes_client_to_backend_total", "Plaintext bytes forwarded client to backend, counted as they move.";
    bytes_out => "ktern_bytes_backend_to_client_total", "Plaintext bytes forwarded backend to client, counted as they move.";
    health_checks => "ktern_health_checks_total", "Active health checks run (all upstream groups).";
    health_check_failures => "ktern_health_check_failures_total", "Active health checks that failed (refused, timeout, status outside 2xx/3xx).";
    health_marked_down => "ktern_health_marked_down_total", "Times a backend was marked down after `fall` failed checks.";
    backends_down => "ktern_upstream_backends_down", "Backends marked down by active health checks now (gauge).";
    reloads => "ktern_reloads_total", "Reloads that went live (SIGHUP, ktern reload, POST /reload).";
    reload_failures => "ktern_reload_failures_total", "Reloads refused (bad config, certificate, key or address); the running config stayed.";
    generation => "ktern_config_generation", "Config generation new connections get (gauge; 1 at start, +1 per reload).";
    acme_issued => "ktern_acme_certificates_issued_total", "ACME orders that ended with a certificate (written to the state directory and swapped in by a reload).";
    acme_failures => "ktern_acme_order_failures_total", "ACME orders that failed (CA unreachable or refusing, validation failed, state not writable); logged with the reason and retried with backoff.";
}

impl ShardMetrics {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to a counter.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one (gauges).
    #[inline]
    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Renders the Prometheus text exposition format (version 0.0.4) summed over shards.
pub fn render(shards: &[Arc<ShardMetrics>]) -> String {
    let mut out = String::new();
    render_into(&mut out, shards);
    out
}

/// [`render`], appending to `out`.
pub fn render_into(out: &mut String, shards: &[Arc<ShardMetrics>]) {
    for (name, help, get) in COUNTERS {
        let total: u64 = shards.iter().map(|s| get(s).load(Ordering::Relaxed)).sum();
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {total}"
        );
    }
    family::render(out, &shards.iter().map(|s| &s.families).collect::<Vec<_>>());
}

/// `ktern_build_info`: the version and build profile of the running
/// binary, as a constant 1 with labels (Prometheus' `*_build_info`
/// convention), so a dashboard can tell builds apart and the test
/// harness can check that its release pass started the release build
/// (`tests/common`, whenever `KTERN_TEST_BIN` names the binary).
pub fn render_build_info(out: &mut String) {
    let name = "ktern_build_info";
    let _ = writeln!(
        out,
        "# HELP {name} The running binary: version and build profile.\n# TYPE {name} gauge\n\
         {name}{{version=\"{}\",profile=\"{BUILD_PROFILE}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
}

/// The build profile `ktern_build_info` reports: `debug` with debug
/// assertions (cargo's `dev` profile), else `release`.
pub const BUILD_PROFILE: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

/// `ktern_certificate_expiry_timestamp_seconds`: each configured
/// certificate's notAfter (Unix time), so an alert can fire on
/// `... - time() < 14 * 86400`.
pub fn render_cert_expiry(out: &mut String, config: &crate::config::Config) {
    let name = "ktern_certificate_expiry_timestamp_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} notAfter of each certificate the current config serves (seconds since the Unix epoch).\n# TYPE {name} gauge"
    );
    for l in &config.listeners {
        // One series per (listener, file, certificate): the same file
        // listed twice (two ACME entries for one state directory) would
        // repeat it, which Prometheus refuses. A set: each scrape looked
        // through the listener's earlier certificates for each one
        // (quadratic: 50,000 certificates, about 10^9 comparisons).
        let mut seen = std::collections::HashSet::with_capacity(l.certificates.len());
        for c in &l.certificates {
            if !seen.insert((c.info.cert_file.as_str(), c.info.sha256.as_str())) {
                continue;
            }
            let _ = writeln!(
                out,
                "{name}{{listener=\"{}\",cert_file=\"{}\",sha256=\"{}\"}} {}",
                family::escape(&l.name),
                family::escape(&c.info.cert_file),
                c.info.sha256,
                c.info.not_after
            );
        }
    }
}

/// `ktern_upstream_backend_in_use` and `_max_conns`: each capped
/// backend's connections in use (process-wide) beside its `max_conns`,
/// as HAProxy's `scur` and `slim`: rows of (upstream, backend, in use,
/// cap).
pub fn render_backend_in_use<'a>(
    out: &mut String,
    rows: impl Iterator<Item = (&'a str, std::net::SocketAddr, u32, u32)> + Clone,
) {
    // No capped backend: no family (none of its samples can exist).
    if rows.clone().next().is_none() {
        return;
    }
    for (name, help, cap) in [
        (
            "ktern_upstream_backend_in_use",
            "Connections in use on each backend with a max_conns, for the whole process (gauge).",
            false,
        ),
        (
            "ktern_upstream_backend_max_conns",
            "The max_conns of each backend that has one.",
            true,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (upstream, backend, in_use, max) in rows.clone() {
            let _ = writeln!(
                out,
                "{name}{{upstream=\"{}\",backend=\"{backend}\"}} {}",
                family::escape(upstream),
                if cap { max } else { in_use }
            );
        }
    }
}

/// Mirrors the kernel's kTLS counters (`/proc/net/tls_stat`, Linux 5.6+)
/// as `ktern_kernel_tls_*`: `TlsCurrTxSw` becomes the gauge
/// `ktern_kernel_tls_curr_tx_sw`, `TlsTxSw` the counter
/// `ktern_kernel_tls_tx_sw_total`. Nothing when the file is absent (no kTLS).
pub fn render_kernel_tls(out: &mut String, stat: &str) {
    for line in stat.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        let Some(rest) = key.strip_prefix("Tls") else {
            continue;
        };
        let mut snake = String::from("ktern_kernel_tls");
        for c in rest.chars() {
            if c.is_ascii_uppercase() {
                snake.push('_');
            }
            snake.push(c.to_ascii_lowercase());
        }
        let (name, kind) = if rest.starts_with("Curr") {
            (snake, "gauge")
        } else {
            (snake + "_total", "counter")
        };
        let _ = writeln!(
            out,
            "# HELP {name} The kernel's {key} from /proc/net/tls_stat.\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate file listed twice on one listener is one series.
    #[test]
    fn a_certificate_listed_twice_is_one_expiry_series() {
        let (cert, key) = crate::builtin::self_signed(&["localhost"]).unwrap();
        let entry = "[[listener.certificate]]\ncert = \"inline:c\"\nkey = \"inline:k\"\n";
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n{entry}{entry}[listener.route]\nkind = \"tcp\"\nbackends = [\"127.0.0.1:9\"]\n"
        );
        let config = crate::config::Config::from_toml(
            &text,
            "t.toml",
            std::path::Path::new("."),
            &[("c".into(), cert), ("k".into(), key)],
        )
        .unwrap();
        assert_eq!(config.listeners[0].certificates.len(), 2);
        let mut out = String::new();
        render_cert_expiry(&mut out, &config);
        let series = out.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(series, 1, "{out}");
    }

    #[test]
    fn render_sums_shards_and_types_counters() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        ShardMetrics::add(&a.bytes_in, 5);
        ShardMetrics::add(&b.bytes_in, 7);
        ShardMetrics::inc(&b.active);
        let text = render(&[a, b]);
        assert!(text.contains("ktern_bytes_client_to_backend_total 12\n"));
        assert!(
            text.contains("# TYPE ktern_connections_active gauge\nktern_connections_active 1\n")
        );
        let names: std::collections::HashSet<_> = COUNTERS.iter().map(|c| c.0).collect();
        assert_eq!(names.len(), COUNTERS.len(), "metric names must be unique");
    }

    #[test]
    fn build_info_names_this_build() {
        let mut out = String::new();
        render_build_info(&mut out);
        // `cargo test` builds with debug assertions, as `dev` does.
        #[cfg(debug_assertions)]
        assert_eq!(BUILD_PROFILE, "debug");
        let line = format!(
            "ktern_build_info{{version=\"{}\",profile=\"{BUILD_PROFILE}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(out.contains("# TYPE ktern_build_info gauge\n"), "{out}");
        assert!(out.ends_with(&line), "{out}");
    }

    #[test]
    fn kernel_tls_stat_is_mirrored_with_types() {
        let mut out = String::new();
        render_kernel_tls(
            &mut out,
            "TlsCurrTxSw                     \t3\nTlsTxSw                         \t10\nTlsRxNoPadViolation 0\nbogus line here\n",
        );
        assert!(
            out.contains(
                "# TYPE ktern_kernel_tls_curr_tx_sw gauge\nktern_kernel_tls_curr_tx_sw 3\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "# TYPE ktern_kernel_tls_tx_sw_total counter\nktern_kernel_tls_tx_sw_total 10\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("ktern_kernel_tls_rx_no_pad_violation_total 0\n"),
            "{out}"
        );
        assert!(!out.contains("bogus"));
    }

    /// The README's metrics table names every metric ktern exposes.
    #[test]
    fn readme_lists_every_metric() {
        let readme = include_str!("../../README.md");
        let mut out = String::new();
        render_into(&mut out, &[Arc::new(ShardMetrics::default())]);
        let f = &ShardMetrics::default().families;
        f.responses_for("l", "u").record(200);
        f.active_for("l");
        family::render(&mut out, &[f]);
        let backend = std::net::SocketAddr::from(([127, 0, 0, 1], 80));
        render_backend_in_use(&mut out, [("u", backend, 1, 2)].into_iter());
        let mut missing = Vec::new();
        for line in out.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap();
            if !readme.contains(&format!("`{name}`")) {
                missing.push(name.to_string());
            }
        }
        for fixed in [
            "ktern_kernel_tls_*",
            "ktern_certificate_expiry_timestamp_seconds",
        ] {
            if !readme.contains(&format!("`{fixed}`")) {
                missing.push(fixed.into());
            }
        }
        assert!(missing.is_empty(), "README metrics table lacks {missing:?}");
    }
}
