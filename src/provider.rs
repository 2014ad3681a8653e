//! The crypto provider ktern was built with, in one place that every stage
//! and the config (certificate checks, fingerprints) can use without
//! depending on each other.

/// aws-lc-rs by default (its default key exchange groups put
/// X25519MLKEM768 first), ring with `--no-default-features --features ring`.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    #[cfg(feature = "aws-lc-rs")]
    {
        rustls::crypto::aws_lc_rs::default_provider()
    }
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    {
        rustls::crypto::ring::default_provider()
    }
}
