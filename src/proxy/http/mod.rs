//! The `http` route. Sans-IO pieces: request and response heads
//! ([`head`], RFC 9112), body framing ([`body`]), forwarding rewrites
//! ([`rewrite`]), static-file decisions ([`files`]) and every per-request
//! decision of an exchange ([`exchange`]: route, local answers, retry,
//! response framing, keep-alive, pool reuse). They take bytes or parsed
//! heads and hand back decisions and bytes to send; no sockets, no clocks.
//! The HTTP/1.1 pump that does the I/O is [`forward`].

pub mod body;
pub mod exchange;
pub mod files;
pub mod forward;
pub mod head;
pub mod redirect;
pub mod rewrite;
