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
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        for suite in &mut provider.cipher_suites {
            *suite = hkdf::keyed_once(*suite);
        }
        provider
    }
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    {
        rustls::crypto::ring::default_provider()
    }
}

/// TLS 1.3's key schedule on aws-lc-rs with HKDF-Extract run once per
/// secret and one keyed HMAC per secret for all its expansions.
///
/// rustls' aws-lc-rs suites derive keys with aws-lc-rs's `hkdf`, whose
/// extracted key (`Salt::extract`, aws-lc-rs 1.19) keeps the secret and the
/// salt and runs the whole HKDF, extract included, for every expansion, and
/// keys a new HMAC (two SHA-256 blocks) for each. A TLS 1.3 handshake
/// expands each of its three secrets several times; in the kTLS VM,
/// where the emulated CPU has no SHA extensions, SHA-256 was 36% of the
/// instructions of a resumed handshake (`bench/vm-handshake.sh --perf`).
/// rustls' own `HkdfUsingHmac` over aws-lc-rs's HMAC does the same
/// derivations (RFC 5869) without the repeats. The suites are otherwise
/// rustls' (same AEAD, hash, limits, kTLS key extraction).
#[cfg(feature = "aws-lc-rs")]
mod hkdf {
    use std::sync::LazyLock;

    use aws_lc_rs::hmac;
    use rustls::crypto::hash::HashAlgorithm;
    use rustls::crypto::hmac::{Hmac, Key, Tag};
    use rustls::crypto::tls13::HkdfUsingHmac;
    use rustls::{CipherSuiteCommon, SupportedCipherSuite, Tls13CipherSuite};

    struct AwsHmac(hmac::Algorithm);

    struct AwsKey(hmac::Key);

    impl Hmac for AwsHmac {
        fn with_key(&self, key: &[u8]) -> Box<dyn Key> {
            Box::new(AwsKey(hmac::Key::new(self.0, key)))
        }
        fn hash_output_len(&self) -> usize {
            self.0.digest_algorithm().output_len()
        }
    }

    impl Key for AwsKey {
        fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> Tag {
            // A copy of the keyed state: the key's two padded blocks were
            // hashed once, in `with_key`.
            let mut ctx = hmac::Context::with_key(&self.0);
            ctx.update(first);
            for m in middle {
                ctx.update(m);
            }
            ctx.update(last);
            Tag::new(ctx.sign().as_ref())
        }
        fn tag_len(&self) -> usize {
            self.0.algorithm().digest_algorithm().output_len()
        }
    }

    static SHA256: AwsHmac = AwsHmac(hmac::HMAC_SHA256);
    static SHA384: AwsHmac = AwsHmac(hmac::HMAC_SHA384);
    static HKDF_SHA256: HkdfUsingHmac<'static> = HkdfUsingHmac(&SHA256);
    static HKDF_SHA384: HkdfUsingHmac<'static> = HkdfUsingHmac(&SHA384);

    /// rustls' TLS 1.3 suites with the HKDF above, made once.
    static SUITES: LazyLock<Vec<&'static Tls13CipherSuite>> = LazyLock::new(|| {
        rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
            .iter()
            .filter_map(|s| match s {
                SupportedCipherSuite::Tls13(t) => {
                    let hkdf: &'static HkdfUsingHmac<'static> =
                        match t.common.hash_provider.algorithm() {
                            HashAlgorithm::SHA256 => &HKDF_SHA256,
                            HashAlgorithm::SHA384 => &HKDF_SHA384,
                            _ => return None,
                        };
                    Some(&*Box::leak(Box::new(Tls13CipherSuite {
                        common: CipherSuiteCommon {
                            suite: t.common.suite,
                            hash_provider: t.common.hash_provider,
                            confidentiality_limit: t.common.confidentiality_limit,
                        },
                        hkdf_provider: hkdf,
                        aead_alg: t.aead_alg,
                        quic: t.quic,
                    })))
                }
                SupportedCipherSuite::Tls12(_) => None,
            })
            .collect()
    });

    /// `suite`, with the HKDF above when it is a TLS 1.3 suite.
    pub(super) fn keyed_once(suite: SupportedCipherSuite) -> SupportedCipherSuite {
        let id = suite.suite();
        match suite {
            SupportedCipherSuite::Tls13(_) => SUITES
                .iter()
                .find(|t| t.common.suite == id)
                .map_or(suite, |t| SupportedCipherSuite::Tls13(t)),
            SupportedCipherSuite::Tls12(_) => suite,
        }
    }

    #[cfg(test)]
    mod tests {
        use rustls::crypto::tls13::Hkdf;

        /// RFC 5869 appendix A.1 (SHA-256, test case 1): the keyed-once
        /// HKDF derives what the RFC says, as aws-lc-rs's own does.
        #[test]
        fn hkdf_matches_rfc5869_and_aws_lc() {
            let ikm = [0x0b; 22];
            let salt: Vec<u8> = (0x00..=0x0c).collect();
            let info: Vec<u8> = (0xf0..=0xf9).collect();
            let mut okm = [0u8; 42];
            super::HKDF_SHA256
                .extract_from_secret(Some(&salt), &ikm)
                .expand_slice(&[&info], &mut okm)
                .unwrap();
            let want = "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865";
            let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, want);
            let mut theirs = [0u8; 42];
            struct Len(usize);
            impl aws_lc_rs::hkdf::KeyType for Len {
                fn len(&self) -> usize {
                    self.0
                }
            }
            aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &salt)
                .extract(&ikm)
                .expand(&[&info], Len(42))
                .unwrap()
                .fill(&mut theirs)
                .unwrap();
            assert_eq!(okm, theirs);
        }

        #[test]
        fn every_tls13_suite_gets_it_and_keeps_its_identity() {
            let provider = super::super::crypto_provider();
            let default = rustls::crypto::aws_lc_rs::default_provider();
            assert_eq!(provider.cipher_suites.len(), default.cipher_suites.len());
            for (ours, theirs) in provider.cipher_suites.iter().zip(&default.cipher_suites) {
                assert_eq!(ours.suite(), theirs.suite());
                if let (
                    rustls::SupportedCipherSuite::Tls13(o),
                    rustls::SupportedCipherSuite::Tls13(t),
                ) = (ours, theirs)
                {
                    assert!(
                        !std::ptr::eq(*o, *t),
                        "{:?} kept rustls' HKDF",
                        ours.suite()
                    );
                    // And the HKDF it carries is one of ours.
                    let carried = o.hkdf_provider as *const dyn Hkdf as *const u8;
                    let mine = [
                        &super::HKDF_SHA256 as *const _ as *const u8,
                        &super::HKDF_SHA384 as *const _ as *const u8,
                    ];
                    assert!(mine.contains(&carried), "{:?}", ours.suite());
                }
            }
        }
    }
}
