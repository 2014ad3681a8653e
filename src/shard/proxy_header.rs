//! The PROXY protocol header (HAProxy's spec, v1 text and v2 binary) a
//! load balancer in front sends before the TLS bytes, carrying the real
//! client's address. Sans-IO: the connection's first bytes in, a verdict
//! out; the `ppp` crate parses, this module decides.
//!
//! The driver reads until [`Verdict::Done`] or [`Verdict::Bad`] (bounded by
//! [`MAX_HEADER`] and the listener's timeout), then hands the bytes after
//! the header to the TLS handshake.

use std::net::SocketAddr;

use ppp::{v1, v2, HeaderResult, PartialResult};

/// The largest header read. v1 is at most 107 bytes (spec §2.1); v2 is 16
/// bytes plus addresses and TLVs, which load balancers keep small (AWS
/// and GCP add tens of bytes). Anything longer is refused, not buffered.
pub const MAX_HEADER: usize = 4096;

/// What the connection's first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A header has started but is not complete.
    NeedMore,
    /// A complete header of `len` bytes. `source` is the client's address
    /// it carries; `None` for `LOCAL` (a health check of the balancer
    /// itself) and `UNKNOWN`: the connection's own peer stands.
    Done {
        /// The client address carried.
        source: Option<SocketAddr>,
        /// Header length; what follows is the TLS stream.
        len: usize,
    },
    /// Not a PROXY header, malformed, or longer than [`MAX_HEADER`].
    Bad(String),
}

/// v1's longest line, CRLF included (spec §2.1).
const MAX_V1: usize = 107;

/// Judges the bytes read so far.
pub fn parse(input: &[u8]) -> Verdict {
    // A v1 line is judged whole: cut inside a port, "443" reads as a
    // complete "4" to the parser.
    let head = &input[..input.len().min(5)];
    if b"PROXY".starts_with(head) && !input.windows(2).any(|w| w == b"\r\n") {
        return if input.len() < MAX_V1 {
            Verdict::NeedMore
        } else {
            Verdict::Bad(format!("v1: no CRLF within {MAX_V1} bytes"))
        };
    }
    let result = HeaderResult::parse(input);
    if result.is_incomplete() {
        return if input.len() >= MAX_HEADER {
            Verdict::Bad(format!("no complete header in {MAX_HEADER} bytes"))
        } else {
            Verdict::NeedMore
        };
    }
    match result {
        HeaderResult::V1(Ok(h)) => Verdict::Done {
            len: h.header.len(),
            source: match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            },
        },
        HeaderResult::V2(Ok(h)) => {
            if h.len() > MAX_HEADER {
                return Verdict::Bad(format!("v2 header of {} bytes", h.len()));
            }
            let source = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            };
            Verdict::Done {
                source,
                len: h.len(),
            }
        }
        HeaderResult::V1(Err(e)) => Verdict::Bad(format!("v1: {e}")),
        HeaderResult::V2(Err(e)) => Verdict::Bad(format!("v2: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 PROXY header for TCP over IPv4, with one TLV.
    fn v2_tcp4(src: [u8; 4], sport: u16) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.extend_from_slice(&[0x21, 0x11]); // v2 PROXY, TCP over IPv4
        let tlv = [0x04, 0x00, 0x01, b'x']; // PP2_TYPE_NOOP
        h.extend_from_slice(&((12 + tlv.len()) as u16).to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&[10, 0, 0, 1]);
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&443u16.to_be_bytes());
        h.extend_from_slice(&tlv);
        h
    }

    #[test]
    fn v1_and_v2_headers_give_the_client_address_and_their_length() {
        let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 4242 443\r\n";
        let mut input = v1.to_vec();
        input.extend_from_slice(&[22, 3, 1]); // the ClientHello begins
        assert_eq!(
            parse(&input),
            Verdict::Done {
                source: Some("192.0.2.7:4242".parse().unwrap()),
                len: v1.len()
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 443\r\n";
        assert_eq!(
            parse(v6),
            Verdict::Done {
                source: Some("[2001:db8::7]:4242".parse().unwrap()),
                len: v6.len()
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Verdict::Done {
                source: None,
                len: 15
            }
        );
        let v2 = v2_tcp4([198, 51, 100, 9], 5555);
        assert_eq!(
            parse(&v2),
            Verdict::Done {
                source: Some("198.51.100.9:5555".parse().unwrap()),
                len: v2.len()
            }
        );
        // LOCAL: the balancer's own connection (a health check).
        let mut local = v2.clone();
        local[12] = 0x20;
        assert!(matches!(parse(&local), Verdict::Done { source: None, .. }));
    }

    #[test]
    fn every_prefix_needs_more_and_garbage_is_bad() {
        let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 4242 443\r\n";
        let v2 = v2_tcp4([198, 51, 100, 9], 5555);
        for header in [&v1[..], &v2[..]] {
            for cut in 1..header.len() {
                assert_eq!(parse(&header[..cut]), Verdict::NeedMore, "{cut}");
            }
        }
        for bad in [
            &b"PROXY TCP4 banana 10.0.0.1 1 2\r\n"[..],
            b"PROXY TCP4 192.0.2.7 10.0.0.1 99999 443\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            // A TLS ClientHello where the header should be.
            &[22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3, 0, 0, 0, 0, 0, 0, 0],
        ] {
            assert!(matches!(parse(bad), Verdict::Bad(_)), "{bad:?}");
        }
        // A v2 header announcing more than MAX_HEADER.
        let mut big = v2[..14].to_vec();
        big.extend_from_slice(&u16::MAX.to_be_bytes());
        big.resize(MAX_HEADER, 0);
        assert!(matches!(parse(&big), Verdict::Bad(_)));
        // A v1 line that never ends.
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(MAX_HEADER, b'1');
        assert!(matches!(parse(&long), Verdict::Bad(_)));
    }
}
