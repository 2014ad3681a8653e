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

/// Reads and drops the client's bytes until it closes, `deadline` passes
/// or [`LINGER_BYTES`] were read: the lingering close of both HTTP
/// versions, after their close_notify. A timer of its own rather than the
/// idle sweeper's, which could let it run a sweep period (up to 1 s) past
/// [`LINGER`]; callers box it, so an idle connection never holds it.
pub(crate) async fn linger(reader: &mut crate::ktls::TlsReader, deadline: monoio::time::Instant) {
    let mut taken = 0;
    while taken < LINGER_BYTES {
        match monoio::time::timeout_at(deadline, reader.read_chunk()).await {
            Ok(Ok(Some(chunk))) => {
                taken += chunk.len();
                crate::buffers::give(chunk);
            }
            _ => return,
        }
    }
}
