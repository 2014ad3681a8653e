//! Per-shard pools of idle keep-alive connections to HTTP backends. Never
//! shared between shards; a connection the backend closed while idle is
//! detected before reuse (`sys::idle_socket_usable`) and dropped.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use crate::sys;

struct Idle {
    stream: TcpStream,
    addr: SocketAddr,
    since: Instant,
}

/// Idle connections for each upstream group, newest last.
#[derive(Default)]
pub struct Pool {
    groups: RefCell<Vec<Vec<Idle>>>,
}

impl Pool {
    /// A pool for `groups` upstream groups.
    pub fn new(groups: usize) -> Pool {
        Pool {
            groups: RefCell::new((0..groups).map(|_| Vec::new()).collect()),
        }
    }

    /// The most recently used idle connection to backend `addr` of `group`
    /// (the balancer picked the backend) that is still open and younger
    /// than `max_idle`; stale ones are closed on the way.
    pub fn take_for(
        &self,
        group: usize,
        addr: SocketAddr,
        max_idle: Duration,
    ) -> Option<TcpStream> {
        let mut groups = self.groups.borrow_mut();
        let idle = groups.get_mut(group)?;
        while let Some(i) = idle.iter().rposition(|c| c.addr == addr) {
            let c = idle.remove(i);
            if c.since.elapsed() < max_idle && sys::idle_socket_usable(sys::borrow_fd(&c.stream)) {
                return Some(c.stream);
            }
        }
        None
    }

    /// Returns a connection whose last response ended cleanly.
    pub fn put(&self, group: usize, stream: TcpStream, addr: SocketAddr, max: usize) {
        let mut groups = self.groups.borrow_mut();
        let Some(idle) = groups.get_mut(group) else {
            return;
        };
        if idle.len() >= max {
            // Oldest out: it is the likeliest to be closed by the backend.
            idle.remove(0);
        }
        if max > 0 {
            idle.push(Idle {
                stream,
                addr,
                since: Instant::now(),
            });
        }
    }

    /// Idle connections held for `group` (for tests and metrics).
    pub fn idle(&self, group: usize) -> usize {
        self.groups.borrow().get(group).map_or(0, Vec::len)
    }
}
