//! What happens to decrypted bytes: the route stages. `tcp` pipes them to a
//! TCP backend (layer 4); `http` is the HTTP/1.1 reverse proxy (and the
//! plain-HTTP redirect listener). Backends themselves are chosen in
//! `upstream`. `idle` (the per-shard idle-timeout sweeper) and `drain` (the
//! shard's graceful-shutdown flag) are what routes wait on besides I/O.

pub mod drain;
pub mod h2;
pub mod http;
pub mod idle;
pub mod tcp;

/// How long a closing connection keeps reading what the client still
/// sends, and how much of it (nginx's `lingering_close`): closing a socket
/// with the client's bytes unread sends a TCP reset, which can destroy
/// ktern's last answer (a GOAWAY, a 413 to an upload) before the client
/// reads it.
pub(crate) const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// See [`LINGER`].
pub(crate) const LINGER_BYTES: usize = 1 << 20;
