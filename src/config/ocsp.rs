//! OCSP stapling (RFC 6066 §8, RFC 6960): whether a response file may be
//! stapled to a certificate. Sans-IO: DER in, a verdict out, `now` given.
//!
//! Only a response that answers for this very certificate (its issuer's
//! name and key hash and its serial number), says `good`, and is fresh
//! (thisUpdate not in the future, nextUpdate not passed) is stapled. A
//! stale or mismatched staple is worse than none: a client that checks it
//! refuses the connection. The response's signature is the client's to
//! check (it trusts the issuer, not ktern).

use der::Decode;

use crate::provider::prims::digest;
use x509_ocsp::{BasicOcspResponse, CertStatus, OcspResponse, OcspResponseStatus};
use x509_parser::prelude::*;

/// Clock skew tolerated on thisUpdate (a responder a little ahead).
const SKEW_SECS: i64 = 300;

/// The response may be stapled until this Unix time (its nextUpdate), or
/// why it may not.
pub fn check(response: &[u8], chain: &[&[u8]], now: i64) -> Result<i64, String> {
    let resp =
        OcspResponse::from_der(response).map_err(|e| format!("not a DER OCSP response: {e}"))?;
    if resp.response_status != OcspResponseStatus::Successful {
        return Err(format!("response status is {:?}", resp.response_status));
    }
    let bytes = resp
        .response_bytes
        .ok_or("a successful response without a body")?;
    let basic = BasicOcspResponse::from_der(bytes.response.as_bytes())
        .map_err(|e| format!("not a basic OCSP response: {e}"))?;
    let leaf_der = chain.first().ok_or("no certificate")?;
    let (_, leaf) = X509Certificate::from_der(leaf_der).map_err(|e| format!("leaf: {e}"))?;
    let issuer = chain
        .get(1)
        .and_then(|d| X509Certificate::from_der(d).ok())
        .map(|(_, c)| c);
    let serial = strip_zeros(leaf.raw_serial());
    let single = basic
        .tbs_response_data
        .responses
        .iter()
        .find(|r| {
            strip_zeros(r.cert_id.serial_number.as_bytes()) == serial
                && hashed(
                    &r.cert_id.hash_algorithm.oid.to_string(),
                    leaf.issuer().as_raw(),
                )
                .is_some_and(|h| h == r.cert_id.issuer_name_hash.as_bytes())
                && issuer.as_ref().is_none_or(|i| {
                    hashed(
                        &r.cert_id.hash_algorithm.oid.to_string(),
                        &i.public_key().subject_public_key.data,
                    )
                    .is_some_and(|h| h == r.cert_id.issuer_key_hash.as_bytes())
                })
        })
        .ok_or("the response is for another certificate (serial or issuer differ)")?;
    match &single.cert_status {
        CertStatus::Good(_) => {}
        CertStatus::Revoked(_) => return Err("the certificate is REVOKED".into()),
        CertStatus::Unknown(_) => return Err("the responder does not know the certificate".into()),
    }
    let this_update = single.this_update.0.to_unix_duration().as_secs() as i64;
    if this_update > now + SKEW_SECS {
        return Err("thisUpdate is in the future".into());
    }
    let next_update = single
        .next_update
        .as_ref()
        .ok_or("no nextUpdate: freshness unknown")?
        .0
        .to_unix_duration()
        .as_secs() as i64;
    if next_update <= now {
        return Err(format!(
            "stale: nextUpdate passed {} s ago",
            now - next_update
        ));
    }
    Ok(next_update)
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

/// `data` hashed with the CertID's algorithm (SHA-1, as RFC 6960
/// responders use by default, or SHA-256).
fn hashed(oid: &str, data: &[u8]) -> Option<Vec<u8>> {
    let alg = match oid {
        "1.3.14.3.2.26" => &digest::SHA1_FOR_LEGACY_USE_ONLY,
        "2.16.840.1.101.3.4.2.1" => &digest::SHA256,
        _ => return None,
    };
    Some(digest::digest(alg, data).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    /// Made once with `openssl ocsp` (tests/fixtures/ocsp): `good` answers
    /// for `leaf` (serial 0x1001, issued by `ca`), thisUpdate
    /// 2026-12-01T03:40:35Z, nextUpdate a day later.
    const GOOD: &[u8] = include_bytes!("../../tests/fixtures/ocsp/good.der");
    const THIS_UPDATE: i64 = 1_796_096_435;
    const NEXT_UPDATE: i64 = 1_796_182_835;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_fresh_response_for_the_certificate_is_stapled_until_next_update() {
        let leaf = der(include_str!("../../tests/fixtures/ocsp/leaf.pem"));
        let ca = der(include_str!("../../tests/fixtures/ocsp/ca.pem"));
        let other = der(include_str!("../../tests/fixtures/ocsp/other.pem"));
        let now = THIS_UPDATE + 60;
        assert_eq!(check(GOOD, &[&leaf, &ca], now), Ok(NEXT_UPDATE));
        // Without the issuer in the chain, name hash and serial still match.
        assert_eq!(check(GOOD, &[&leaf], now), Ok(NEXT_UPDATE));
        let stale = check(GOOD, &[&leaf, &ca], NEXT_UPDATE).unwrap_err();
        assert!(stale.starts_with("stale"), "{stale}");
        let early = check(GOOD, &[&leaf, &ca], THIS_UPDATE - 3600).unwrap_err();
        assert!(early.contains("future"), "{early}");
        // Another certificate of the same CA: the serial differs.
        let mismatch = check(GOOD, &[&other, &ca], now).unwrap_err();
        assert!(mismatch.contains("another certificate"), "{mismatch}");
        // The right serial under another issuer key: the key hash differs.
        let (stranger, _) = crate::builtin::self_signed(&["x.test"]).unwrap();
        let stranger = der(&stranger);
        assert!(check(GOOD, &[&leaf, &stranger], now).is_err());
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        let leaf = der(include_str!("../../tests/fixtures/ocsp/leaf.pem"));
        for bad in [
            &b""[..],
            b"\x30\x03\x0a\x01\x00",
            &GOOD[..GOOD.len() / 2],
            b"not der",
        ] {
            assert!(check(bad, &[&leaf], THIS_UPDATE).is_err());
        }
        assert!(check(GOOD, &[], THIS_UPDATE).is_err());
    }
}
