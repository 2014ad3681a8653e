//! Choosing and connecting to backends. Each shard owns its own
//! [`Balancer`]s: no state is shared between shards.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use monoio::net::TcpStream;

pub mod pool;

/// Why no backend connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Every backend refused or failed the connect; the last error is kept.
    #[error("all {tried} backends failed, last {addr}: {source}")]
    Connect {
        /// Backends tried.
        tried: usize,
        /// The last backend tried.
        addr: SocketAddr,
        /// Its error.
        source: io::Error,
    },
}

/// Round robin over a route's backends; a failed connect moves to the next.
#[derive(Debug)]
pub struct Balancer {
    backends: Vec<SocketAddr>,
    next: Cell<usize>,
}

impl Balancer {
    /// A balancer over `backends` (at least one; config validation ensures it).
    pub fn new(backends: Vec<SocketAddr>, start: usize) -> Balancer {
        let start = if backends.is_empty() {
            0
        } else {
            start % backends.len()
        };
        Balancer {
            backends,
            next: Cell::new(start),
        }
    }

    /// The order to try backends for one connection.
    pub fn plan(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let n = self.backends.len();
        let first = self.next.get();
        if n > 0 {
            self.next.set((first + 1) % n);
        }
        (0..n).map(move |i| self.backends[(first + i) % n])
    }

    /// Connects to the next backend, trying each once.
    pub async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let mut last = None;
        let mut tried = 0;
        for addr in self.plan() {
            tried += 1;
            let res = match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            };
            match res {
                Ok(s) => {
                    // Proxied bytes are already batched by the client; do not
                    // add Nagle delay on top (same as nginx proxy_socket_keepalive…/tcp_nodelay).
                    let _ = s.set_nodelay(true);
                    return Ok((s, addr));
                }
                Err(e) => {
                    tracing::debug!(backend = %addr, error = %e, "backend connect failed");
                    last = Some((addr, e));
                }
            }
        }
        let (addr, source) = last.unwrap_or_else(|| {
            (
                SocketAddr::from(([0, 0, 0, 0], 0)),
                io::Error::new(io::ErrorKind::NotFound, "no backends configured"),
            )
        });
        Err(UpstreamError::Connect {
            tried,
            addr,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_rotates_and_covers_every_backend() {
        let addrs: Vec<SocketAddr> = (1..=3)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        let b = Balancer::new(addrs.clone(), 0);
        let first: Vec<_> = b.plan().collect();
        let second: Vec<_> = b.plan().collect();
        assert_eq!(first, addrs);
        assert_eq!(second, vec![addrs[1], addrs[2], addrs[0]]);
        let empty = Balancer::new(Vec::new(), 5);
        assert_eq!(empty.plan().count(), 0);
    }
}
