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
