//! The crypto provider ktern was built with, in one place that every stage
//! and the config (certificate checks, fingerprints) can use without
//! depending on each other.

/// The primitives library behind the provider (aws-lc-rs and ring share
/// one API: `hkdf`, `aead`, `digest`, `rand`), for ktern's own uses:
/// ticket keys and OCSP CertIDs. One crypto library per build.
#[cfg(feature = "aws-lc-rs")]
pub use aws_lc_rs as prims;
#[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
pub use ring as prims;

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
