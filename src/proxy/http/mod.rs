//! HTTP/1.1 (RFC 9112) sans-IO pieces for the `http` route: request and
//! response heads ([`head`]), body framing ([`body`]) and forwarding
//! rewrites ([`rewrite`]). They take bytes and hand back heads, byte counts
//! and bytes to send; no sockets, no clocks. The forwarding loop that pumps
//! them is [`forward`].

pub mod body;
pub mod files;
pub mod forward;
pub mod head;
pub mod redirect;
pub mod rewrite;
