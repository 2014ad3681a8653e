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
    /// (the balancer picked the backend) that is still open and idle for
    /// less than `max_idle` at `now`; stale ones are closed on the way.
    pub fn take_for(
        &self,
        group: usize,
        addr: SocketAddr,
        max_idle: Duration,
        now: Instant,
    ) -> Option<TcpStream> {
        let mut groups = self.groups.borrow_mut();
        let idle = groups.get_mut(group)?;
        while let Some(i) = idle.iter().rposition(|c| c.addr == addr) {
            let c = idle.remove(i);
            if now.saturating_duration_since(c.since) < max_idle
                && sys::idle_socket_usable(sys::borrow_fd(&c.stream))
            {
                return Some(c.stream);
            }
        }
        None
    }

    /// Returns a connection whose last response ended cleanly. `since` is
    /// when its last request began (the caller's clock reading, a little
    /// early: the idle limit errs towards closing).
    pub fn put(
        &self,
        group: usize,
        stream: TcpStream,
        addr: SocketAddr,
        max: usize,
        since: Instant,
    ) {
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
                since,
            });
        }
    }

    /// Idle connections held for `group` (for tests and metrics).
    pub fn idle(&self, group: usize) -> usize {
        self.groups.borrow().get(group).map_or(0, Vec::len)
    }
}
