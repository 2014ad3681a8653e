//! The PROXY protocol header (HAProxy's spec, v1 text and v2 binary) a
//! load balancer in front sends before the TLS bytes, carrying the real
//! client's address. Sans-IO: the connection's first bytes in, a verdict
//! out; the `ppp` crate parses, this module decides.
//!
//! The driver reads until [`Verdict::Done`] or [`Verdict::Bad`] (bounded by
//! [`MAX_HEADER`] and the listener's timeout), then hands the bytes after
//! the header to the TLS handshake.

use std::net::SocketAddr;

use ppp::{v1, v2, PartialResult};

/// The largest header read. v1 is at most 107 bytes (spec §2.1); v2 is 16
/// bytes plus addresses and TLVs, which load balancers keep small (AWS
/// and GCP add tens of bytes). Anything longer is refused, not buffered.
pub const MAX_HEADER: usize = 4096;

/// What the connection's first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A header has started but is not complete.
    NeedMore,
    /// A complete header of `len` bytes, with the addresses it carries;
    /// `None` for `LOCAL` (a health check of the balancer itself) and
    /// `UNKNOWN`: the connection's own stand.
    Done {
        /// The client's address, and the one it connected to.
        addresses: Option<Addresses>,
        /// Header length; what follows is the TLS stream.
        len: usize,
    },
    /// Not a PROXY header, malformed, or longer than [`MAX_HEADER`].
    Bad(String),
}

/// What a header says of the connection it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client.
    pub source: SocketAddr,
    /// The address the client connected to (the balancer's), which a
    /// PROXY header of ktern's to a backend passes on, as HAProxy's
    /// `accept-proxy` with `send-proxy` does.
    pub destination: SocketAddr,
}

impl Addresses {
    fn of(
        source: impl Into<std::net::IpAddr>,
        source_port: u16,
        destination: impl Into<std::net::IpAddr>,
        destination_port: u16,
    ) -> Addresses {
        Addresses {
            source: SocketAddr::new(source.into(), source_port),
            destination: SocketAddr::new(destination.into(), destination_port),
        }
    }
}

/// v1's longest line, CRLF included (spec §2.1).
const MAX_V1: usize = 107;

/// v2's 12-byte signature (spec §2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Judges the bytes read so far. Each version is parsed on its own, so an
/// error names the version the bytes claim to be.
pub fn parse(input: &[u8]) -> Verdict {
    let starts = |sig: &[u8]| sig.starts_with(&input[..input.len().min(sig.len())]);
    if starts(b"PROXY") {
        v1_verdict(input)
    } else if starts(V2_SIGNATURE) {
        v2_verdict(input)
    } else {
        Verdict::Bad("not a PROXY protocol header".into())
    }
}

/// v1 is judged only as a whole line (cut inside a port, "443" would read
/// as a complete "4"); once the CRLF is there, any error is final.
fn v1_verdict(input: &[u8]) -> Verdict {
    let window = &input[..input.len().min(MAX_V1)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if input.len() < MAX_V1 {
            Verdict::NeedMore
        } else {
            Verdict::Bad(format!("v1: no CRLF within {MAX_V1} bytes"))
        };
    };
    match v1::Header::try_from(&input[..end + 2]) {
        Ok(h) => Verdict::Done {
            len: end + 2,
            addresses: match h.addresses {
                v1::Addresses::Tcp4(a) => Some(Addresses::of(
                    a.source_address,
                    a.source_port,
                    a.destination_address,
                    a.destination_port,
                )),
                v1::Addresses::Tcp6(a) => Some(Addresses::of(
                    a.source_address,
                    a.source_port,
                    a.destination_address,
                    a.destination_port,
                )),
                v1::Addresses::Unknown => None,
            },
        },
        Err(e) => Verdict::Bad(format!("v1: {e}")),
    }
}

fn v2_verdict(input: &[u8]) -> Verdict {
    // The length is known from byte 16: refuse an oversized header before
    // waiting for it.
    if input.len() >= 16 {
        let announced = 16 + usize::from(u16::from_be_bytes([input[14], input[15]]));
        if announced > MAX_HEADER {
            return Verdict::Bad(format!(
                "v2: header of {announced} bytes (at most {MAX_HEADER})"
            ));
        }
    }
    match v2::Header::try_from(input) {
        Ok(h) => {
            // Addresses are taken only from PROXY over TCP (family/protocol
            // 0x11 or 0x21, as HAProxy does); LOCAL (a health check of the
            // balancer itself), UNSPEC, UDP and UNIX keep the connection's.
            let addresses = match (h.command, h.protocol, h.addresses) {
                (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv4(a)) => {
                    Some(Addresses::of(
                        a.source_address,
                        a.source_port,
                        a.destination_address,
                        a.destination_port,
                    ))
                }
                (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv6(a)) => {
                    Some(Addresses::of(
                        a.source_address,
                        a.source_port,
                        a.destination_address,
                        a.destination_port,
                    ))
                }
                _ => None,
            };
            Verdict::Done {
                addresses,
                len: h.len(),
            }
        }
        Err(e) if e.is_incomplete() => Verdict::NeedMore,
        Err(e) => Verdict::Bad(format!("v2: {e}")),
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
    fn v1_and_v2_headers_give_both_addresses_and_their_length() {
        let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 4242 443\r\n";
        let mut input = v1.to_vec();
        input.extend_from_slice(&[22, 3, 1]); // the ClientHello begins
        assert_eq!(
            parse(&input),
            Verdict::Done {
                addresses: Some(Addresses {
                    source: "192.0.2.7:4242".parse().unwrap(),
                    destination: "10.0.0.1:443".parse().unwrap(),
                }),
                len: v1.len()
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 443\r\n";
        assert_eq!(
            parse(v6),
            Verdict::Done {
                addresses: Some(Addresses {
                    source: "[2001:db8::7]:4242".parse().unwrap(),
                    destination: "[2001:db8::1]:443".parse().unwrap(),
                }),
                len: v6.len()
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Verdict::Done {
                addresses: None,
                len: 15
            }
        );
        let v2 = v2_tcp4([198, 51, 100, 9], 5555);
        assert_eq!(
            parse(&v2),
            Verdict::Done {
                addresses: Some(Addresses {
                    source: "198.51.100.9:5555".parse().unwrap(),
                    destination: "10.0.0.1:443".parse().unwrap(),
                }),
                len: v2.len()
            }
        );
        // LOCAL: the balancer's own connection (a health check).
        let mut local = v2.clone();
        local[12] = 0x20;
        assert!(matches!(
            parse(&local),
            Verdict::Done {
                addresses: None,
                ..
            }
        ));
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
        // Lines that end but are cut short: bad at once, never a wait.
        for cut in [
            &b"PROXY TCP4 1.2.3.4\r\n"[..],
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n",
            b"PROXY UNKNOWN a b c d e f\r\n",
        ] {
            assert!(matches!(parse(cut), Verdict::Bad(_)), "{cut:?}");
        }
        // A v2 error names v2.
        let mut bad_version = v2.clone();
        bad_version[12] = 0x31;
        assert!(matches!(parse(&bad_version), Verdict::Bad(w) if w.starts_with("v2:")));
        // UNSPEC family (LOCAL or not) and UDP keep the connection's address.
        let mut unspec = v2[..16].to_vec();
        unspec[13] = 0x00;
        unspec[14..16].copy_from_slice(&[0, 0]);
        assert_eq!(
            parse(&unspec),
            Verdict::Done {
                addresses: None,
                len: 16
            }
        );
        let mut udp = v2.clone();
        udp[13] = 0x12;
        assert!(matches!(
            parse(&udp),
            Verdict::Done {
                addresses: None,
                ..
            }
        ));
        // A v2 header announcing more than MAX_HEADER: refused at byte 16.
        let mut early = v2[..16].to_vec();
        early[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(parse(&early), Verdict::Bad(_)));
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
