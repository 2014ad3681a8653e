//! Connections open per client, for a listener's `max_conns_per_client`
//! (nginx's `limit_conn` on `$binary_remote_addr`, HAProxy's `conn_cur`
//! on a stick table): without it one address can hold every connection
//! the shards take (`runtime.max_connections`), and everyone else is
//! refused.
//!
//! One table for the process, shared by every shard and carried from
//! generation to generation: `SO_REUSEPORT` spreads one client's
//! connections over the shards, so a per-shard count would let it hold the
//! limit once per CPU. Each listener (by name, which a reload keeps)
//! counts its own connections. The table is split into locked parts by the key's
//! hash, so shards taking connections from different clients rarely meet
//! on one lock; a client's entry exists only while it has a connection.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Locked parts: enough that two shards rarely wait on each other (a lock
/// is held for one hash-map update).
const PARTS: usize = 64;

/// Who a connection counts against: on one listener, an IPv4 address, or
/// an IPv6 /64 (the prefix a single host or customer is normally given,
/// RFC 6177: a per-address count would let one host use 2^64 addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The listener's name, hashed (a fixed hash: every shard agrees).
    listener: u64,
    client: Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    /// An IPv4 address (an IPv4-mapped IPv6 address counts as its IPv4).
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl ClientKey {
    /// The key of a connection from `ip` on the listener named `listener`.
    pub fn on(listener: &str, ip: IpAddr) -> ClientKey {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        listener.hash(&mut h);
        ClientKey {
            listener: h.finish(),
            client: match ip.to_canonical() {
                IpAddr::V4(a) => Client::V4(u32::from(a)),
                IpAddr::V6(a) => Client::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

/// One locked part, on cache lines of its own: two shards updating
/// neighbouring parts would otherwise pass lines back and forth (a part
/// is 56 bytes). 128, not 64: x86-64's and recent Arm cores' prefetchers
/// fetch lines in pairs (crossbeam's `CachePadded` pads to 128 there).
#[repr(align(128))]
#[derive(Default)]
struct Part(Mutex<HashMap<ClientKey, u32>>);

/// Connections open per client, for the whole process.
pub struct ClientTable {
    parts: Box<[Part]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for ClientTable {
    fn default() -> ClientTable {
        ClientTable {
            parts: (0..PARTS).map(|_| Part::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

/// Without the clients' addresses: a generation's `Debug` must not dump
/// them into a log.
impl std::fmt::Debug for ClientTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTable")
            .field("clients", &self.clients())
            .finish()
    }
}

impl ClientTable {
    fn part(&self, key: ClientKey) -> &Mutex<HashMap<ClientKey, u32>> {
        &self.parts[(self.hasher.hash_one(key) as usize) % PARTS].0
    }

    /// One more connection for `key`, if it has fewer than `limit` open;
    /// the slot is given back when the returned value drops. A poisoned
    /// lock (a panic elsewhere while holding it) is used as it is: the
    /// map is valid after any single update.
    pub fn admit(self: &Arc<Self>, key: ClientKey, limit: u32) -> Option<ClientSlot> {
        let mut map = self.part(key).lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= limit {
            if *n == 0 {
                map.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: self.clone(),
            key,
        })
    }

    /// Connections open for `key` now.
    pub fn open(&self, key: ClientKey) -> u32 {
        let map = self.part(key).lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key).copied().unwrap_or(0)
    }

    /// Clients with a connection open now.
    pub fn clients(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.0.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// One connection's place in its client's count.
#[derive(Debug)]
pub struct ClientSlot {
    table: Arc<ClientTable>,
    key: ClientKey,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self
            .table
            .part(self.key)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_up_to_its_limit_and_a_closed_connection_frees_a_place() {
        let t = Arc::new(ClientTable::default());
        let a = ClientKey::on("web", "192.0.2.1".parse().unwrap());
        let b = ClientKey::on("web", "192.0.2.2".parse().unwrap());
        let a_elsewhere = ClientKey::on("api", "192.0.2.1".parse().unwrap());
        let mut held: Vec<_> = (0..3).map(|_| t.admit(a, 3).unwrap()).collect();
        assert!(t.admit(a, 3).is_none());
        assert!(t.admit(b, 3).is_some(), "another client is not affected");
        assert!(
            t.admit(a_elsewhere, 3).is_some(),
            "each listener counts its own"
        );
        assert_eq!(t.open(a), 3);
        drop(held.pop());
        assert_eq!(t.open(a), 2);
        let again = t.admit(a, 3);
        assert!(again.is_some());
        drop(again);
        // Entries go when their last connection does: a flood of distinct
        // clients leaves nothing behind.
        drop(t.admit(b, 3));
        assert_eq!(t.clients(), 1);
        // A refused newcomer leaves no entry behind.
        assert!(t.admit(b, 0).is_none());
        assert_eq!(t.clients(), 1);
        assert!(format!("{t:?}").contains("clients: 1"));
        assert!(!format!("{t:?}").contains("192"));
    }

    #[test]
    fn ipv6_clients_count_by_their_64_bit_prefix_and_mapped_ipv4_as_ipv4() {
        let k = |s: &str| ClientKey::on("web", s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
        assert_ne!(k("192.0.2.7"), k("192.0.2.8"));
    }
}
