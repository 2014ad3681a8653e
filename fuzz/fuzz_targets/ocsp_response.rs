//! Hostile OCSP response files: whatever the bytes, the staple check
//! answers (staple until, or why not) and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{pem::PemObject, CertificateDer};

fuzz_target!(|data: &[u8]| {
    let leaf = CertificateDer::from_pem_slice(
        include_bytes!("../../tests/fixtures/ocsp/leaf.pem"),
    )
    .expect("fixture");
    let ca = CertificateDer::from_pem_slice(include_bytes!("../../tests/fixtures/ocsp/ca.pem"))
        .expect("fixture");
    let _ = ktern::config::ocsp::check(data, &[leaf.as_ref(), ca.as_ref()], 1_796_096_500);
});
