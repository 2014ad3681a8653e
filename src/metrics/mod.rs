//! Counters. Each shard owns one [`ShardMetrics`] and is its only writer
//! (relaxed atomics on a cache line nobody else writes); the admin endpoint
//! sums all shards when scraped. Every metric name is in [`COUNTERS`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

macro_rules! counters {
    ($( $field:ident => $name:literal, $help:literal; )*) => {
        /// One shard's counters.
        #[derive(Debug, Default)]
        pub struct ShardMetrics {
            $( #[doc = $help] pub $field: AtomicU64, )*
        }

        /// (name, help, accessor) for every counter, in exposition order.
        pub const COUNTERS: &[(&str, &str, fn(&ShardMetrics) -> &AtomicU64)] = &[
            $( ($name, $help, |m| &m.$field), )*
        ];
    };
}

counters! {
    accepted => "ktern_connections_accepted_total", "TCP connections accepted.";
    active => "ktern_connections_active", "Connections open now (gauge: accepted minus closed).";
    handshakes => "ktern_handshakes_total", "TLS handshakes completed.";
    hs_fail_tls => "ktern_handshake_failures_tls_total", "Handshakes failed: client sent invalid TLS or negotiation failed (alert sent).";
    hs_fail_timeout => "ktern_handshake_failures_timeout_total", "Handshakes failed: deadline passed.";
    hs_fail_eof => "ktern_handshake_failures_eof_total", "Handshakes failed: client closed or reset mid-handshake.";
    ktls_offloaded => "ktern_ktls_offloaded_total", "Connections whose record crypto went to the kernel.";
    ktls_userspace => "ktern_ktls_userspace_total", "Connections kept on userspace rustls records.";
    ktls_offload_errors => "ktern_ktls_offload_errors_total", "Connections closed because the kernel refused the keys.";
    ktls_rekey_rx => "ktern_ktls_rekey_rx_total", "RX keys replaced after a client KeyUpdate.";
    ktls_rekey_tx => "ktern_ktls_rekey_tx_total", "TX keys replaced (our KeyUpdate).";
    ktls_rekey_unsupported => "ktern_ktls_rekey_unsupported_total", "Connections closed with an alert: KeyUpdate but the kernel cannot rekey.";
    tls_unexpected => "ktern_tls_unexpected_records_total", "Connections closed with an alert: unexpected post-handshake record.";
    tls_peer_alerts => "ktern_tls_peer_alerts_total", "Connections the client aborted with a fatal alert.";
    tls_limit_closes => "ktern_tls_confidentiality_limit_closes_total", "Connections closed at the cipher's confidentiality limit.";
    downstream_errors => "ktern_downstream_errors_total", "Connections ended by a client-side error after the handshake.";
    upstream_connect_failures => "ktern_upstream_connect_failures_total", "Backend connects refused, failed or timed out.";
    upstream_errors => "ktern_upstream_errors_total", "Connections ended by a backend-side error after connecting.";
    idle_timeouts => "ktern_idle_timeouts_total", "Connections closed after the idle timeout.";
    bytes_in => "ktern_bytes_client_to_backend_total", "Plaintext bytes forwarded client to backend.";
    bytes_out => "ktern_bytes_backend_to_client_total", "Plaintext bytes forwarded backend to client.";
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
    out
}

/// Serves `GET /metrics` on a plain-HTTP admin address, on its own thread,
/// away from the shards.
pub fn serve(
    addr: std::net::SocketAddr,
    shards: Vec<Arc<ShardMetrics>>,
) -> std::io::Result<std::net::SocketAddr> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("ktern-admin".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut req = [0u8; 1024];
            let n = conn.read(&mut req).unwrap_or(0);
            let (status, body) = if req[..n].starts_with(b"GET /metrics") {
                ("200 OK", render(&shards))
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
