//! The PROXY protocol header ktern sends first on a backend connection
//! (`send_proxy`, HAProxy's spec), so the backend sees the client's
//! address rather than ktern's. Sans-IO: addresses in, bytes out; the
//! `ppp` crate writes the format.

use std::net::{SocketAddr, SocketAddrV6};

use crate::config::ProxyVersion;

/// Both addresses in one family, as the header has one: a mixed pair (an
/// IPv4 client on a dual-stack listener) goes as IPv6 with the IPv4
/// address mapped (RFC 4291 §2.5.5.2), rather than as `UNKNOWN`, which
/// would hide the client.
fn one_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        v6 => v6,
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

/// The header announcing a TCP connection from `source` (the client) to
/// `destination` (the address it connected to).
pub fn header(
    version: ProxyVersion,
    source: SocketAddr,
    destination: SocketAddr,
) -> std::io::Result<Vec<u8>> {
    let addresses = one_family(source, destination);
    match version {
        ProxyVersion::V1 => Ok(ppp::v1::Addresses::from(addresses).to_string().into_bytes()),
        ProxyVersion::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            addresses,
        )
        .build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::proxy_header::{parse, Verdict};

    #[test]
    fn headers_carry_the_client_and_read_back() {
        let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
        for (src, want) in [
            ("192.0.2.7:51000", "192.0.2.7:51000"),
            ("[2001:db8::7]:51000", "[2001:db8::7]:51000"),
        ] {
            let src: SocketAddr = src.parse().unwrap();
            let dst6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
            let dst = if src.is_ipv4() { dst } else { dst6 };
            for v in [ProxyVersion::V1, ProxyVersion::V2] {
                let h = header(v, src, dst).unwrap();
                match parse(&h) {
                    Verdict::Done { source, len } => {
                        assert_eq!(len, h.len(), "{v:?}");
                        assert_eq!(source, Some(want.parse().unwrap()), "{v:?}");
                    }
                    other => panic!("{v:?}: {other:?}"),
                }
            }
        }
        let v1 = header(
            ProxyVersion::V1,
            "192.0.2.7:51000".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(v1, b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n");
    }

    #[test]
    fn a_mixed_pair_goes_as_mapped_ipv6() {
        let h = header(
            ProxyVersion::V1,
            "192.0.2.7:51000".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 51000 443\r\n"
        );
    }
}
