//! The PROXY protocol header ktern sends first on a backend connection
//! (`send_proxy`, HAProxy's spec), so the backend sees the client's
//! address rather than ktern's. Sans-IO: addresses in, bytes out; the
//! `ppp` crate writes the format.

use std::net::{SocketAddr, SocketAddrV6};

use crate::config::ProxyVersion;
use crate::handshake::TlsInfo;

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
/// `destination` (the address it connected to) for a client that asked
/// for `sni`, over TLS that ktern terminated as `tls` says (`None`: passed
/// through, unread). v1 has addresses only; v2 also carries the SNI
/// (`PP2_TYPE_AUTHORITY`) and for terminated TLS its facts
/// (`PP2_TYPE_SSL`, below). Receivers skip TLV types they do not know
/// (the spec's §2.2), so these never break a backend.
pub fn header(
    version: ProxyVersion,
    source: SocketAddr,
    destination: SocketAddr,
    sni: Option<&str>,
    tls: Option<&TlsInfo>,
) -> std::io::Result<Vec<u8>> {
    use ppp::v2::Type;
    let addresses = one_family(source, destination);
    match version {
        ProxyVersion::V1 => Ok(ppp::v1::Addresses::from(addresses).to_string().into_bytes()),
        ProxyVersion::V2 => {
            let mut b = ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                ppp::v2::Protocol::Stream,
                addresses,
            );
            if let Some(sni) = sni {
                b = b.write_tlv(Type::Authority, sni.as_bytes())?;
            }
            if let Some(tls) = tls {
                b = b.write_tlv(Type::SSL, &ssl_tlv(tls))?;
            }
            b.build()
        }
    }
}

/// The header of a connection ktern makes on its own behalf (a health
/// check): v1 `UNKNOWN`, v2 the `LOCAL` command, both meaning "use the
/// connection's own addresses" (the spec's §2.1 and §2.2), so a backend
/// that requires the header still answers the check.
pub fn local(version: ProxyVersion) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::Unknown.to_string().into_bytes(),
        // 16 fixed bytes and no addresses: nothing in it can fail.
        ProxyVersion::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap_or_default(),
    }
}

/// `PP2_CLIENT_*` bits of `PP2_TYPE_SSL` (HAProxy's PROXY protocol spec,
/// §2.2.5): the client spoke TLS; sent a certificate on this connection;
/// sent one in the session this connection resumed (or on it).
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// The value of `PP2_TYPE_SSL`: the client bits, `verify` (0 only for a
/// verified client certificate), then the version, common name (when a
/// certificate names one) and cipher sub-TLVs.
fn ssl_tlv(tls: &TlsInfo) -> Vec<u8> {
    use ppp::v2::Type;
    let mut client = PP2_CLIENT_SSL;
    if tls.client.is_some() {
        client |= PP2_CLIENT_CERT_SESS;
        if !tls.resumed {
            client |= PP2_CLIENT_CERT_CONN;
        }
    }
    let verify: u32 = if tls.client.is_some() { 0 } else { 1 };
    let mut out = vec![client];
    out.extend_from_slice(&verify.to_be_bytes());
    let mut sub = |kind: Type, value: &[u8]| {
        out.push(kind as u8);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value);
    };
    sub(Type::SSLVersion, tls.version_name().as_bytes());
    if let Some(cn) = tls.client.as_ref().and_then(|c| c.common_name.as_deref()) {
        sub(Type::SSLCommonName, capped_name(cn.as_bytes()));
    }
    sub(Type::SSLCipher, tls.cipher_name().as_bytes());
    out
}

/// The most of a common name `PP2_SUBTYPE_SSL_CN` carries. The whole
/// header's length is 16 bits, and a CA may sign a CN of any length
/// (RFC 5280's bound, 64 characters, is not enforced): about 16 KB of
/// UTF-8, four times that as `\xHH`, made a header too long to build, and
/// every request of that client failed against its backend. 64 characters
/// of 4-byte UTF-8, escaped, fit.
const MAX_CN: usize = 1024;

/// `cn` cut to [`MAX_CN`] bytes, not inside a `\xHH` escape.
fn capped_name(cn: &[u8]) -> &[u8] {
    if cn.len() <= MAX_CN {
        return cn;
    }
    let cut = &cn[..MAX_CN];
    match cut[MAX_CN - 3..].iter().rposition(|&b| b == b'\\') {
        Some(i) => &cut[..MAX_CN - 3 + i],
        None => cut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::proxy_header::{parse, Verdict};

    fn tls() -> TlsInfo {
        TlsInfo {
            sni: Some("app.example".into()),
            version: Some(rustls::ProtocolVersion::TLSv1_3),
            suite: Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
            kernel: false,
            alpn_h2: false,
            alpn: None,
            resumed: false,
            client_auth: true,
            client: None,
        }
    }

    /// The TLVs of a v2 header, as ppp reads them: (type, value).
    fn tlvs(h: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let parsed = ppp::v2::Header::try_from(h).unwrap();
        parsed
            .tlvs()
            .map(|t| {
                let t = t.unwrap();
                (t.kind, t.value.to_vec())
            })
            .collect()
    }

    /// The sub-TLVs of a `PP2_TYPE_SSL` value, after its 5 fixed bytes.
    fn sub_tlvs(mut v: &[u8]) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        while !v.is_empty() {
            let len = usize::from(u16::from_be_bytes([v[1], v[2]]));
            out.push((v[0], String::from_utf8(v[3..3 + len].to_vec()).unwrap()));
            v = &v[3 + len..];
        }
        out
    }

    #[test]
    fn v2_carries_the_sni_and_the_tls_facts_with_the_certificates_name() {
        use crate::handshake::client_auth::ClientIdentity;
        let src: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let mut info = tls();
        // No certificate: TLS, verify non-zero, no CN.
        let t =
            tlvs(&header(ProxyVersion::V2, src, dst, info.sni.as_deref(), Some(&info)).unwrap());
        assert_eq!(t[0], (0x02, b"app.example".to_vec()));
        assert_eq!(t[1].0, 0x20);
        assert_eq!(&t[1].1[..5], &[0x01, 0, 0, 0, 1]);
        assert_eq!(
            sub_tlvs(&t[1].1[5..]),
            [
                (0x21, "TLSv1.3".to_string()),
                (0x23, "TLS13_AES_256_GCM_SHA384".to_string())
            ]
        );
        // A verified certificate, on this connection then on a resumed one.
        info.client = Some(Box::new(ClientIdentity {
            subject: "CN=svc.internal, O=Example".into(),
            common_name: Some("svc.internal".into()),
            sans: "".into(),
            fingerprint: "00".repeat(32).into(),
        }));
        for (resumed, bits) in [(false, 0x07), (true, 0x05)] {
            info.resumed = resumed;
            let t = tlvs(
                &header(ProxyVersion::V2, src, dst, info.sni.as_deref(), Some(&info)).unwrap(),
            );
            assert_eq!(&t[1].1[..5], &[bits, 0, 0, 0, 0]);
            assert_eq!(
                sub_tlvs(&t[1].1[5..])[1],
                (0x22, "svc.internal".to_string())
            );
        }
        // A CA-signed name far past RFC 5280's bound, every byte escaped:
        // cut, so the header still builds (it did not, and the backend was
        // blamed), and not inside an escape.
        for pad in 0..4 {
            let long = format!("{}{}", "a".repeat(pad), "\\xC3\\xA9".repeat(9000));
            info.client.as_mut().unwrap().common_name = Some(long.into());
            let h = header(ProxyVersion::V2, src, dst, info.sni.as_deref(), Some(&info)).unwrap();
            let t = tlvs(&h);
            let cn = &sub_tlvs(&t[1].1[5..])[1];
            assert_eq!(cn.0, 0x22);
            assert!(
                cn.1.len() <= MAX_CN && cn.1.len() > MAX_CN - 4,
                "{}",
                cn.1.len()
            );
            assert!(
                cn.1[pad..].len().is_multiple_of(4),
                "cut inside an escape: {pad}"
            );
        }
        info.client.as_mut().unwrap().common_name = Some("svc.internal".into());
        // Passed-through TLS: the SNI, no TLS facts.
        let t = tlvs(&header(ProxyVersion::V2, src, dst, Some("app.example"), None).unwrap());
        assert_eq!(t, [(0x02, b"app.example".to_vec())]);
        // Still read back by ktern's own PROXY-in parser.
        let h = header(ProxyVersion::V2, src, dst, info.sni.as_deref(), Some(&info)).unwrap();
        assert!(
            matches!(parse(&h), Verdict::Done { len, addresses: Some(a) } if len == h.len() && a.source == src && a.destination == dst)
        );
    }

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
                let h = header(v, src, dst, None, Some(&tls())).unwrap();
                match parse(&h) {
                    Verdict::Done { addresses, len } => {
                        assert_eq!(len, h.len(), "{v:?}");
                        let a = addresses.unwrap();
                        assert_eq!(a.source, want.parse().unwrap(), "{v:?}");
                        assert_eq!(a.destination, dst, "{v:?}");
                    }
                    other => panic!("{v:?}: {other:?}"),
                }
            }
        }
        let v1 = header(
            ProxyVersion::V1,
            "192.0.2.7:51000".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
            None,
            None,
        )
        .unwrap();
        assert_eq!(v1, b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n");
    }

    #[test]
    fn local_headers_name_no_client_and_read_back() {
        assert_eq!(local(ProxyVersion::V1), b"PROXY UNKNOWN\r\n");
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            let h = local(v);
            assert!(
                matches!(parse(&h), Verdict::Done { len, addresses: None } if len == h.len()),
                "{v:?}: {:?}",
                parse(&h)
            );
        }
        assert_eq!(local(ProxyVersion::V2).len(), 16);
    }

    #[test]
    fn a_mixed_pair_goes_as_mapped_ipv6() {
        let h = header(
            ProxyVersion::V1,
            "192.0.2.7:51000".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 51000 443\r\n"
        );
    }
}
