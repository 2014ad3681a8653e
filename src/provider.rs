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
/// rustls' own `HkdfUsingHmac` does the same derivations (RFC 5869)
/// without the repeats, here over an HMAC on aws-lc's SHA states
/// (`sys::sha`), where aws-lc-rs's `hmac` spent about 40 k instructions of
/// a full handshake managing its contexts. The suites are otherwise
/// rustls' (same AEAD, hash, limits, kTLS key extraction).
#[cfg(feature = "aws-lc-rs")]
mod hkdf {
    use std::sync::LazyLock;

    use rustls::crypto::hash::HashAlgorithm;
    use rustls::crypto::hmac::{Hmac, Key, Tag};
    use rustls::crypto::tls13::HkdfUsingHmac;
    use rustls::{CipherSuiteCommon, SupportedCipherSuite, Tls13CipherSuite};

    use crate::sys::sha::{Sha, ShaState, MAX_OUT};

    /// HMAC (RFC 2104) over aws-lc's SHA states: keyed once into an inner
    /// and an outer state, which every tag copies (`sys::sha` says why not
    /// aws-lc-rs's `hmac`).
    struct ShaHmac(Sha);

    struct ShaKey {
        inner: ShaState,
        outer: ShaState,
    }

    impl Hmac for ShaHmac {
        fn with_key(&self, key: &[u8]) -> Box<dyn Key> {
            let sha = self.0;
            // RFC 2104 §2: a key longer than a block is hashed first; the
            // key is then padded with zeros to one block.
            let mut block = [0u8; 128];
            let block = &mut block[..sha.block_len()];
            if key.len() > block.len() {
                let mut h = ShaState::new(sha);
                h.update(key);
                let mut out = [0u8; MAX_OUT];
                let n = h.finish(&mut out);
                block[..n].copy_from_slice(&out[..n]);
                zeroize::Zeroize::zeroize(&mut out);
            } else {
                block[..key.len()].copy_from_slice(key);
            }
            let mut inner = ShaState::new(sha);
            let mut outer = ShaState::new(sha);
            block.iter_mut().for_each(|b| *b ^= 0x36);
            inner.update(block);
            // 0x36 ^ 0x5c: from the inner pad to the outer one.
            block.iter_mut().for_each(|b| *b ^= 0x36 ^ 0x5c);
            outer.update(block);
            zeroize::Zeroize::zeroize(block);
            Box::new(ShaKey { inner, outer })
        }
        fn hash_output_len(&self) -> usize {
            self.0.output_len()
        }
    }

    impl Key for ShaKey {
        fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> Tag {
            let mut inner = self.inner.clone();
            inner.update(first);
            for m in middle {
                inner.update(m);
            }
            inner.update(last);
            let mut out = [0u8; MAX_OUT];
            let n = inner.finish(&mut out);
            let mut outer = self.outer.clone();
            outer.update(&out[..n]);
            let n = outer.finish(&mut out);
            let tag = Tag::new(&out[..n]);
            zeroize::Zeroize::zeroize(&mut out);
            tag
        }
        fn tag_len(&self) -> usize {
            self.inner.sha().output_len()
        }
    }

    impl Drop for ShaKey {
        fn drop(&mut self) {
            self.inner.wipe();
            self.outer.wipe();
        }
    }

    static SHA256: ShaHmac = ShaHmac(Sha::Sha256);
    static SHA384: ShaHmac = ShaHmac(Sha::Sha384);
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

        fn tag(hmac: &super::ShaHmac, key: &[u8], parts: (&[u8], &[&[u8]], &[u8])) -> Vec<u8> {
            use rustls::crypto::hmac::Hmac;
            hmac.with_key(key)
                .sign_concat(parts.0, parts.1, parts.2)
                .as_ref()
                .to_vec()
        }

        /// RFC 4231 §4.2 and §4.7 (test cases 1 and 6: a short key, and
        /// a 131-byte key, longer than either hash's block), SHA-256 and
        /// SHA-384.
        #[test]
        fn hmac_matches_rfc4231() {
            let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            let case1 = ([0x0b; 20].as_slice(), b"Hi There".as_slice());
            let case6 = (
                [0xaa; 131].as_slice(),
                b"Test Using Larger Than Block-Size Key - Hash Key First".as_slice(),
            );
            for (hmac, (key, data), want) in [
                (&super::SHA256, case1, "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
                (&super::SHA384, case1, "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59cfaea9ea9076ede7f4af152e8b2fa9cb6"),
                (&super::SHA256, case6, "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
                (&super::SHA384, case6, "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c60c2ef6ab4030fe8296248df163f44952"),
            ] {
                assert_eq!(hex(tag(hmac, key, (data, &[], &[]))), want);
                // The same message in pieces gives the same tag.
                let (a, b) = data.split_at(3);
                let (b, c) = b.split_at(2);
                assert_eq!(hex(tag(hmac, key, (a, &[b], c))), want);
            }
        }

        /// Against aws-lc-rs's own HMAC, every key length around the
        /// block sizes, one key signing twice.
        #[test]
        fn hmac_matches_aws_lc_for_every_key_length() {
            use aws_lc_rs::hmac;
            use rustls::crypto::hmac::Hmac;
            for (ours, theirs) in [
                (&super::SHA256, hmac::HMAC_SHA256),
                (&super::SHA384, hmac::HMAC_SHA384),
            ] {
                for len in 0..=140 {
                    let key: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                    let k = ours.with_key(&key);
                    let want = hmac::Key::new(theirs, &key);
                    for msg in [&b"label"[..], &[0x42; 200][..]] {
                        let got = k.sign_concat(&[], &[msg], &[]);
                        assert_eq!(
                            got.as_ref(),
                            hmac::sign(&want, msg).as_ref(),
                            "key length {len}"
                        );
                    }
                }
            }
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
