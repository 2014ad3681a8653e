//! ktern: a per-core TLS terminator for Linux.
//!
//! The pipeline, in the order a connection meets it (see ARCHITECTURE.md):
//! [`shard`] accepts → [`handshake`] runs rustls → [`ktls`] hands the keys to
//! the kernel (or keeps rustls) → [`proxy`] moves the plaintext →
//! [`upstream`] picks and connects the backend. [`config`], [`metrics`] and
//! [`sys`] (the only module with `unsafe`) sit beside the pipeline, with
//! [`buffers`], the per-shard cache of large I/O buffers, and [`control`]:
//! start-up, reload, drain and the admin endpoint, all off the shards.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod buffers;
pub mod builtin;
pub mod challenges;
pub mod clock;
pub mod config;
pub mod control;
pub mod handshake;
pub mod ktls;
pub mod metrics;
pub mod provider;
pub mod proxy;
pub mod shard;
pub mod sys;
pub mod upstream;
