//! Server names, one set of rules for every place that reads them: the
//! config's `server_names`, certificates' subjectAltNames, the ClientHello
//! peek and the certificate store's lookup.
//!
//! A DNS name is 1 to 253 bytes of dot-separated labels, each 1 to 63 bytes
//! of letters, digits, `-` (not first or last) and `_` (RFC 1035 §2.3.1 and
//! §2.3.4; `_` as in service labels, which rustls also accepts in SNI).
//! Names compare case-insensitively (RFC 4343); ktern keeps them lower
//! case. A wildcard is `*.` and a DNS name, and covers exactly one whole,
//! non-empty left-most label (RFC 6125 §6.4.3). An IP address is never a
//! DNS name and never arrives as SNI (RFC 6066 §3).

/// Whether `name` is a DNS name (not a wildcard, not an IP address).
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The parent a wildcard would have to name to cover `name`: `b.c` for
/// `a.b.c`; `None` when the first label is empty or a `*`.
pub fn wildcard_parent(name: &str) -> Option<&str> {
    match name.split_once('.')? {
        ("", _) | ("*", _) => None,
        (_, parent) => Some(parent),
    }
}

/// Whether a certificate name (`pattern`, maybe a wildcard) covers `name`.
pub fn covers(pattern: &str, name: &str) -> bool {
    if pattern.eq_ignore_ascii_case(name) {
        return true;
    }
    match (pattern.strip_prefix("*."), wildcard_parent(name)) {
        (Some(p), Some(parent)) => p.eq_ignore_ascii_case(parent),
        _ => false,
    }
}

/// A name a certificate may be selected by: a DNS name or a one-label
/// wildcard. The reason otherwise.
pub fn check(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{name:?} is an IP address, which clients never send as SNI (RFC 6066 §3); \
             IP clients get the listener's first certificate"
        ));
    }
    if !is_dns_name(name.strip_prefix("*.").unwrap_or(name)) {
        return Err(format!(
            "{name:?} is not a DNS name or a one-label wildcard such as \"*.example.com\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_wildcards_and_ips() {
        for ok in ["a.test", "x", "_srv.a-b.test", &"a".repeat(63)] {
            assert!(is_dns_name(ok), "{ok}");
        }
        let long = format!("{}.test", "a".repeat(64));
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "-a.test",
            "a-.test",
            "a b",
            "127.0.0.1",
            "::1",
            &long,
        ] {
            assert!(!is_dns_name(bad), "{bad}");
        }
        assert!(check("*.a.test").is_ok());
        assert!(check("a.*.test").is_err());
        assert!(check("*").is_err());
        assert!(check("10.0.0.1").unwrap_err().contains("RFC 6066"));
        assert!(covers("a.test", "A.test"));
        assert!(covers("*.b.test", "x.b.test"));
        assert!(!covers("*.b.test", "b.test"));
        assert!(!covers("*.b.test", "x.y.b.test"));
        assert!(!covers("*.b.test", ".b.test"));
        assert!(covers("*.b.test", "*.b.test"));
        assert!(!covers("a.test", "*.test"));
        assert_eq!(wildcard_parent("a.b.c"), Some("b.c"));
        assert_eq!(wildcard_parent(".b.c"), None);
        assert_eq!(wildcard_parent("nodot"), None);
    }
}
