//! The connection driver: the one place that knows the order of a
//! connection's life — handshake → record path (kTLS or userspace) → route.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;

use monoio::net::TcpStream;

use super::Shard;
use crate::config::Route;
use crate::handshake::{self, HandshakeError};
use crate::ktls::{self, Path, StreamError};
use crate::metrics::ShardMetrics as M;
use crate::proxy::tcp::{self, Moved, ProxyError};

/// Serves one accepted connection to its end. Never panics on peer input:
/// every failure becomes a log line and a counter.
pub async fn serve(shard: Rc<Shard>, listener: usize, mut socket: TcpStream, peer: SocketAddr) {
    let m = &shard.metrics;
    M::inc(&m.accepted);
    M::inc(&m.active);
    let _ = socket.set_nodelay(true);
    let tls = shard.tls[listener].clone();
    let deadline = shard.config.runtime.handshake_timeout;
    let hs = match handshake::Handshake::new(tls) {
        Ok(hs) => hs,
        Err(e) => {
            tracing::error!(%peer, error = %e, "internal: cannot start handshake");
            M::dec(&m.active);
            return;
        }
    };
    let est = match handshake::pump::run(&mut socket, hs, deadline).await {
        Ok(est) => est,
        Err(e) => {
            let counter = match &e {
                HandshakeError::Timeout => &m.hs_fail_timeout,
                HandshakeError::Eof | HandshakeError::Io(_) => &m.hs_fail_eof,
                HandshakeError::Tls(_) | HandshakeError::TooLarge => &m.hs_fail_tls,
            };
            M::inc(counter);
            tracing::info!(%peer, error = %e, "handshake failed");
            M::dec(&m.active);
            return;
        }
    };
    M::inc(&m.handshakes);
    let version = est.conn.protocol_version();
    let suite = est.conn.negotiated_cipher_suite().map(|s| s.suite());
    let conn = match ktls::establish(socket, est, shard.config.runtime.ktls, &shard.ktls) {
        Ok(c) => c,
        Err(e) => {
            M::inc(&m.ktls_offload_errors);
            tracing::warn!(%peer, error = %e, "internal: record path setup failed");
            M::dec(&m.active);
            return;
        }
    };
    let path = conn.path();
    M::inc(if path == Path::Kernel {
        &m.ktls_offloaded
    } else {
        &m.ktls_userspace
    });
    tracing::debug!(%peer, ?version, ?suite, ?path, "handshake done");

    let moved = Cell::new(Moved::default());
    let result = match &shard.config.listeners[listener].route {
        Route::Tcp(route) => {
            let balancer = &shard.balancers[listener];
            match balancer.connect(route.connect_timeout).await {
                Ok((backend, _addr)) => {
                    tcp::run(conn, backend, route.idle_timeout, &shard.pipes, &moved).await
                }
                Err(e) => {
                    M::inc(&m.upstream_connect_failures);
                    tracing::warn!(%peer, error = %e, "upstream connect failed");
                    // Tell the client we are closing; it gets no data.
                    let (_, mut writer) = conn.split();
                    let _ = writer.close().await;
                    Ok(())
                }
            }
        }
    };
    let moved = moved.get();
    M::add(&m.bytes_in, moved.up);
    M::add(&m.bytes_out, moved.down);
    M::add(&m.ktls_rekey_rx, moved.rekey_rx);
    M::add(&m.ktls_rekey_tx, moved.rekey_tx);
    if let Err(e) = result {
        let counter = match &e {
            ProxyError::Idle(_) => &m.idle_timeouts,
            ProxyError::Upstream(_) => &m.upstream_errors,
            ProxyError::Downstream(s) => match s {
                StreamError::RekeyUnsupported(_) => &m.ktls_rekey_unsupported,
                StreamError::Unexpected(_) => &m.tls_unexpected,
                StreamError::PeerAlert(_) => &m.tls_peer_alerts,
                StreamError::ConfidentialityLimit => &m.tls_limit_closes,
                _ => &m.downstream_errors,
            },
        };
        M::inc(counter);
        tracing::info!(%peer, ?path, up = moved.up, down = moved.down, error = %e, "connection ended with error");
    } else {
        tracing::debug!(%peer, ?path, up = moved.up, down = moved.down, "connection closed");
    }
    M::dec(&m.active);
}
