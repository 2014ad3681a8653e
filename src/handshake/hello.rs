//! ClientHello peek: reads the server name (SNI, RFC 6066 §3), the ALPN
//! list (RFC 7301 §3.1), whether a ticket is offered and whether
//! ChaCha20-Poly1305 is the most preferred suite from the first bytes a
//! client sends, without answering it. Sans-IO: a pure function of the connection's first bytes.
//!
//! rustls' unbuffered server API does not expose the SNI after the
//! handshake, and routing by SNI (and, later, passing TLS through by SNI
//! without terminating it) needs it. rustls stays the authority on what is
//! valid TLS: a hello this parser cannot read only means "no SNI known".

/// Largest ClientHello accepted (the handshake message, without record
/// headers). Real hellos are 0.5–2 KiB; post-quantum key shares add ~1.2 KiB.
pub const MAX_HELLO: usize = 64 << 10;

/// TLS record content type `handshake` (RFC 8446 §5.1).
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello` (RFC 8446 §4).
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// pre_shared_key (RFC 8446 §4.2.11): the client offers to resume.
const EXT_PRE_SHARED_KEY: u16 = 41;

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeked {
    /// Not enough bytes yet to see the whole ClientHello.
    NeedMore,
    /// A complete ClientHello.
    Hello(Hello),
    /// Not a TLS ClientHello, malformed, or larger than [`MAX_HELLO`].
    NotHello,
}

/// What ktern routes on, from a ClientHello.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// The host_name entry of server_name, lower case, trailing dot removed;
    /// `None` when absent or not a DNS name (an IP literal, bad bytes).
    pub sni: Option<Box<str>>,
    /// The offered ALPN protocol names, in the client's order.
    pub alpn: Vec<Vec<u8>>,
    /// The server_name extension is there but breaks RFC 6066 §3: bad
    /// lengths, an empty list, two host_name entries, or a name that is
    /// neither a DNS name nor an IP literal. rustls refuses such a hello
    /// with its own alert.
    pub sni_malformed: bool,
    /// The hello offers a TLS 1.3 PSK (a ticket): it asks to resume.
    pub psk: bool,
    /// The client's most preferred cipher suite (GREASE and signalling
    /// values aside) is a ChaCha20-Poly1305 one: a client that puts it
    /// first usually has no AES instructions, and AES-GCM in software is
    /// several times slower for it (OpenSSL's `PRIORITIZE_CHACHA` rule).
    pub chacha_first: bool,
}

/// Parses the ClientHello at the start of `input` (the connection's first
/// bytes, record headers included). The hello may span several records.
pub fn peek(input: &[u8]) -> Peeked {
    HelloPeek::default().feed(input)
}

/// [`peek`] over a connection's first bytes as they arrive: each call reads
/// only the records completed since the last one, so a hello cut into
/// 1-byte records, each its own TCP segment, costs O(n) over all the
/// reads rather than O(n²) (about 20 000 records fit the passthrough
/// peek's 128 KiB: re-reading them all on every read was seconds of a
/// shard's CPU per hostile connection).
#[derive(Debug, Default)]
pub struct HelloPeek {
    /// Bytes at the start of the input taken so far: whole records only.
    consumed: usize,
    /// Their fragments, joined: the handshake message so far.
    joined: Vec<u8>,
}

impl HelloPeek {
    /// Bytes held for a hello across records (its capacity).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.joined.capacity()
    }

    /// `input`: every byte of the connection so far (those an earlier call
    /// saw, then more). The common case, the whole hello in the first
    /// record, copies nothing.
    pub fn feed(&mut self, input: &[u8]) -> Peeked {
        let mut rest = input.get(self.consumed..).unwrap_or_default();
        loop {
            if rest.len() < 5 {
                return Peeked::NeedMore;
            }
            // Record header: type, legacy version (major must be 3), length.
            if rest[0] != CONTENT_HANDSHAKE || rest[1] != 3 {
                return Peeked::NotHello;
            }
            let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
            // RFC 8446 §5.1: handshake records are never empty; plaintext is
            // at most 2^14 bytes.
            if len == 0 || len > 1 << 14 {
                return Peeked::NotHello;
            }
            let Some(fragment) = rest.get(5..5 + len) else {
                return Peeked::NeedMore;
            };
            rest = &rest[5 + len..];
            self.consumed += 5 + len;
            // The joined message grows to its own length at most (once its
            // header is in), not to twice it.
            let msg: &[u8] = if self.joined.is_empty() {
                fragment
            } else {
                let cap = message_len(&self.joined)
                    .ok()
                    .flatten()
                    .unwrap_or(4 + MAX_HELLO);
                crate::buffers::extend_capped(&mut self.joined, fragment, cap);
                &self.joined
            };
            match message_len(msg) {
                Err(p) => return p,
                Ok(Some(end)) if msg.len() >= end => {
                    return match parse_hello(&msg[4..end]) {
                        Some(h) => Peeked::Hello(h),
                        None => Peeked::NotHello,
                    };
                }
                // Only the first record's fragment is still borrowed.
                Ok(end) if self.joined.is_empty() => crate::buffers::extend_capped(
                    &mut self.joined,
                    fragment,
                    end.unwrap_or(4 + MAX_HELLO),
                ),
                Ok(_) => {}
            }
        }
    }
}

/// The length of the ClientHello message starting `msg` (its 4-byte header
/// included), once the header is there.
fn message_len(msg: &[u8]) -> Result<Option<usize>, Peeked> {
    if msg.len() < 4 {
        return Ok(None);
    }
    if msg[0] != CLIENT_HELLO {
        return Err(Peeked::NotHello);
    }
    let body = u32::from_be_bytes([0, msg[1], msg[2], msg[3]]) as usize;
    if body > MAX_HELLO {
        return Err(Peeked::NotHello);
    }
    Ok(Some(4 + body))
}

/// A forward-only reader over a byte slice; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A vector with a `width`-byte length prefix (RFC 8446 §3.4).
    fn vec(&mut self, width: usize) -> Option<Reader<'a>> {
        let len = match width {
            1 => self.u8()? as usize,
            _ => self.u16()? as usize,
        };
        self.take(len).map(Reader)
    }
}

/// The most ALPN names a hello may offer (browsers and curl offer 2 or 3,
/// a GREASE value aside).
const MAX_ALPN: usize = 64;

/// ClientHello body (RFC 8446 §4.1.2; the TLS 1.2 layout is the same).
fn parse_hello(msg: &[u8]) -> Option<Hello> {
    let mut r = Reader(msg);
    r.take(2 + 32)?; // legacy_version, random
    r.vec(1)?; // legacy_session_id
    let mut suites = r.vec(2)?;
    r.vec(1)?; // legacy_compression_methods
    let mut hello = Hello::default();
    while let Some(suite) = suites.u16() {
        if !signalling(suite) {
            hello.chacha_first = is_chacha(suite);
            break;
        }
    }
    if r.0.is_empty() {
        // No extensions at all (old TLS 1.2 clients): no SNI.
        return Some(hello);
    }
    let mut exts = r.vec(2)?;
    // RFC 8446 §4.2: no two extensions of one type. Of those routed on, a
    // second would be read here while a backend's TLS stack reads the
    // first, or refuses the hello (rustls, OpenSSL, BoringSSL and Go do):
    // malformed.
    let (mut named, mut listed) = (false, false);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let mut body = exts.vec(2)?;
        let seen = match ty {
            EXT_SERVER_NAME => &mut named,
            EXT_ALPN => &mut listed,
            _ => &mut false,
        };
        if std::mem::replace(seen, true) {
            return None;
        }
        match ty {
            EXT_SERVER_NAME => match server_name(&mut body) {
                Ok(sni) => hello.sni = sni,
                Err(Malformed) => hello.sni_malformed = true,
            },
            EXT_ALPN => {
                let mut list = body.vec(2)?;
                while !list.0.is_empty() {
                    // RFC 7301 §3.1: a name is 1 to 255 bytes. And a list
                    // longer than any client sends is malformed here: 64 KiB
                    // of 1-byte names made 20 000 allocations per hello, held
                    // on a passthrough connection across its backend connect.
                    let name = list.vec(1)?.0;
                    if name.is_empty() || hello.alpn.len() == MAX_ALPN {
                        return None;
                    }
                    hello.alpn.push(name.to_vec());
                }
            }
            EXT_PRE_SHARED_KEY => hello.psk = true,
            _ => {}
        }
    }
    Some(hello)
}

/// A cipher suite value that names no cipher: GREASE (RFC 8701 §2:
/// 0x0A0A, 0x1A1A, ... 0xFAFA), the renegotiation SCSV (RFC 5746 §3.3)
/// and the fallback SCSV (RFC 7507 §2).
fn signalling(suite: u16) -> bool {
    let [hi, lo] = suite.to_be_bytes();
    (hi == lo && lo & 0x0f == 0x0a) || suite == 0x00ff || suite == 0x5600
}

/// TLS_CHACHA20_POLY1305_SHA256 (RFC 8446 §B.4) and the TLS 1.2
/// ChaCha20-Poly1305 suites (RFC 7905 §2: 0xCCA8 to 0xCCAE).
pub(crate) fn is_chacha(suite: u16) -> bool {
    suite == 0x1303 || (0xcca8..=0xccae).contains(&suite)
}

/// A server_name extension that breaks RFC 6066 §3.
struct Malformed;

/// The host_name of a ServerNameList: `Some` for a DNS name, `None` for
/// an IP literal (not permitted, so treated as no SNI, as rustls does).
fn server_name(body: &mut Reader<'_>) -> Result<Option<Box<str>>, Malformed> {
    let mut list = body.vec(2).ok_or(Malformed)?;
    if list.0.is_empty() || !body.0.is_empty() {
        return Err(Malformed);
    }
    let mut found = None;
    while !list.0.is_empty() {
        let ty = list.u8().ok_or(Malformed)?;
        let name = list.vec(2).ok_or(Malformed)?.0;
        // "MUST NOT contain more than one name of the same name_type."
        if ty == 0 && found.replace(name).is_some() {
            return Err(Malformed);
        }
    }
    let Some(name) = found else {
        return Ok(None);
    };
    match dns_name(name) {
        Some(n) => Ok(Some(n)),
        None if ip_literal(name) => Ok(None),
        None => Err(Malformed),
    }
}

fn ip_literal(name: &[u8]) -> bool {
    std::str::from_utf8(name).is_ok_and(|s| s.parse::<std::net::IpAddr>().is_ok())
}

/// Lower-cased DNS name (`config::names`' rules), or `None` for anything
/// else (RFC 6066 §3: IP literals are not permitted).
fn dns_name(name: &[u8]) -> Option<Box<str>> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    let s = std::str::from_utf8(name).ok()?;
    crate::config::names::is_dns_name(s).then(|| s.to_ascii_lowercase().into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a rustls client writes it, for `name` and `alpn`.
    fn client_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        use std::sync::Arc;
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            crate::handshake::crypto_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let server = rustls_pki_types::ServerName::try_from(name.to_string()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn reads_sni_and_alpn_from_a_rustls_hello() {
        let bytes = client_hello("App.Example.COM", &[b"h2", b"http/1.1"]);
        let Peeked::Hello(h) = peek(&bytes) else {
            panic!("not parsed");
        };
        assert_eq!(h.sni.as_deref(), Some("app.example.com"));
        assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    /// 64 names are read; one more, or an empty name (RFC 7301 §3.1),
    /// makes the hello malformed.
    #[test]
    fn alpn_lists_are_bounded() {
        let names = |n: usize, len: usize| -> Vec<Vec<u8>> {
            (0..n).map(|i| vec![b'a' + (i % 26) as u8; len]).collect()
        };
        let hello = |list: &[Vec<u8>]| {
            let refs: Vec<&[u8]> = list.iter().map(Vec::as_slice).collect();
            peek(&client_hello("a.test", &refs))
        };
        let Peeked::Hello(h) = hello(&names(64, 1)) else {
            panic!("64 names refused");
        };
        assert_eq!(h.alpn.len(), 64);
        assert_eq!(hello(&names(65, 1)), Peeked::NotHello);
        // ["h2", "x"] with "x" (length 1) made two empty names: the
        // lengths around them stay right (rustls makes no empty name).
        let mut bytes = client_hello("a.test", &[b"h2", b"x"]);
        let at = bytes
            .windows(5)
            .position(|w| w == b"\x02h2\x01x")
            .expect("the ALPN list");
        bytes[at + 3..at + 5].copy_from_slice(&[0, 0]);
        assert_eq!(peek(&bytes), Peeked::NotHello);
    }

    /// `bytes` (one record holding a ClientHello) with `ext` appended to
    /// its extensions, every length put right.
    fn with_extension(bytes: &[u8], ext: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        out.extend_from_slice(ext);
        let grow = |at: usize, width: usize, out: &mut Vec<u8>| {
            let mut n = 0usize;
            for b in &out[at..at + width] {
                n = n << 8 | usize::from(*b);
            }
            let n = (n + ext.len()).to_be_bytes();
            out[at..at + width].copy_from_slice(&n[n.len() - width..]);
        };
        // Record, handshake message, then the extensions' own length after
        // version and random, session id, suites and compression methods.
        grow(3, 2, &mut out);
        grow(6, 3, &mut out);
        let mut at = 9 + 2 + 32;
        at += 1 + usize::from(out[at]);
        at += 2 + usize::from(u16::from_be_bytes([out[at], out[at + 1]]));
        at += 1 + usize::from(out[at]);
        grow(at, 2, &mut out);
        out
    }

    #[test]
    fn a_second_server_name_or_alpn_extension_is_malformed() {
        let bytes = client_hello("a.test", &[b"h2"]);
        // An unknown extension appended: still read (the helper is right).
        let other = with_extension(&bytes, &[0xfe, 0xed, 0, 1, 0]);
        assert!(matches!(peek(&other), Peeked::Hello(h) if h.sni.as_deref() == Some("a.test")));
        // server_name for b.test: list length, host_name, name length, name.
        let sni = [&[0, 0, 0, 11, 0, 9, 0, 0, 6][..], b"b.test"].concat();
        assert_eq!(peek(&with_extension(&bytes, &sni)), Peeked::NotHello);
        let alpn = [&[0, 16, 0, 5, 0, 3, 2][..], b"h3"].concat();
        assert_eq!(peek(&with_extension(&bytes, &alpn)), Peeked::NotHello);
    }

    #[test]
    fn every_prefix_needs_more() {
        let bytes = client_hello("a.test", &[]);
        for n in 0..bytes.len() {
            assert_eq!(peek(&bytes[..n]), Peeked::NeedMore, "prefix {n}");
        }
        assert!(matches!(peek(&bytes), Peeked::Hello(_)));
    }

    #[test]
    fn hello_split_across_records_is_joined() {
        let bytes = client_hello("split.test", &[b"x"]);
        let body = &bytes[5..];
        // Re-frame the handshake message as 3-byte records.
        let mut framed = Vec::new();
        for part in body.chunks(3) {
            framed.extend_from_slice(&[22, 3, 1, 0, part.len() as u8]);
            framed.extend_from_slice(part);
        }
        let Peeked::Hello(h) = peek(&framed) else {
            panic!("not parsed");
        };
        assert_eq!(h.sni.as_deref(), Some("split.test"));
        assert_eq!(peek(&framed[..framed.len() - 1]), Peeked::NeedMore);
    }

    #[test]
    fn a_hello_split_into_two_records_at_every_offset_reads_the_same() {
        let bytes = client_hello("cut.test", &[b"h2", b"http/1.1"]);
        let whole = peek(&bytes);
        assert!(matches!(&whole, Peeked::Hello(h) if h.sni.as_deref() == Some("cut.test")));
        let body = &bytes[5..];
        for k in 1..body.len() {
            let mut framed = Vec::new();
            for part in [&body[..k], &body[k..]] {
                framed.extend_from_slice(&[22, 3, 1]);
                framed.extend_from_slice(&(part.len() as u16).to_be_bytes());
                framed.extend_from_slice(part);
            }
            assert_eq!(peek(&framed), whole, "split at {k}");
            // And the same bytes arriving in two reads cut at the same
            // place, into one incremental peek.
            let mut p = HelloPeek::default();
            let first = p.feed(&framed[..5 + k]);
            assert_eq!(first, Peeked::NeedMore, "split at {k}");
            assert_eq!(p.feed(&framed), whole, "split at {k}");
        }
    }

    #[test]
    fn fed_a_byte_at_a_time_each_record_is_read_once() {
        let bytes = client_hello("drip.test", &[b"h2"]);
        let mut framed = Vec::new();
        for b in &bytes[5..] {
            framed.extend_from_slice(&[22, 3, 1, 0, 1, *b]);
        }
        let mut p = HelloPeek::default();
        for n in 1..framed.len() {
            assert_eq!(p.feed(&framed[..n]), Peeked::NeedMore, "prefix {n}");
            // Only whole records are taken, and never read again.
            assert_eq!(p.consumed, n / 6 * 6);
            assert_eq!(p.joined.len(), n / 6);
        }
        assert_eq!(p.feed(&framed), peek(&bytes));
        assert!(matches!(peek(&bytes), Peeked::Hello(h) if h.sni.as_deref() == Some("drip.test")));
    }

    #[test]
    fn ip_literal_and_no_sni_give_none() {
        let bytes = client_hello("127.0.0.1", &[]);
        let Peeked::Hello(h) = peek(&bytes) else {
            panic!("not parsed");
        };
        assert_eq!(h.sni, None);
        assert_eq!(dns_name(b"bad name"), None);
        assert_eq!(dns_name(b"host.example."), Some("host.example".into()));
    }

    #[test]
    fn server_name_lists_that_break_rfc6066_are_flagged() {
        let sni = |body: &[u8]| server_name(&mut Reader(body)).map_err(|_| ());
        let entry = |n: &[u8]| {
            let mut e = vec![0];
            e.extend_from_slice(&(n.len() as u16).to_be_bytes());
            e.extend_from_slice(n);
            e
        };
        let list = |entries: &[Vec<u8>]| {
            let all: Vec<u8> = entries.concat();
            let mut out = (all.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&all);
            out
        };
        assert_eq!(sni(&list(&[entry(b"A.test")])), Ok(Some("a.test".into())));
        assert_eq!(sni(&list(&[entry(b"::1")])), Ok(None));
        assert_eq!(sni(&list(&[entry(b"a.test"), entry(b"b.test")])), Err(()));
        assert_eq!(sni(&list(&[])), Err(()));
        assert_eq!(sni(&list(&[entry(&[b'a'; 255])])), Err(()));
        assert_eq!(sni(&list(&[entry(b"bad name")])), Err(()));
        assert_eq!(sni(&[0, 9, 0, 0, 50, b'a']), Err(()));
        let mut trailing = list(&[entry(b"a.test")]);
        trailing.push(0);
        assert_eq!(sni(&trailing), Err(()));
    }

    #[test]
    fn a_client_that_lists_chacha20_first_is_seen() {
        // A hello record with these suites, no session id and no
        // extensions (the TLS 1.2 layout the peek reads).
        let hello = |suites: &[u16]| {
            let mut body = vec![3, 3];
            body.extend_from_slice(&[0; 32]);
            body.push(0);
            body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
            for s in suites {
                body.extend_from_slice(&s.to_be_bytes());
            }
            body.extend_from_slice(&[1, 0]);
            let mut msg = vec![1, 0];
            msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
            msg.extend_from_slice(&body);
            let mut rec = vec![22, 3, 1];
            rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            rec.extend_from_slice(&msg);
            match peek(&rec) {
                Peeked::Hello(h) => h.chacha_first,
                p => panic!("{p:?}"),
            }
        };
        // TLS 1.3 and TLS 1.2 ChaCha20 first, after GREASE and the SCSVs.
        assert!(hello(&[0x1303, 0x1301]));
        assert!(hello(&[0x3a3a, 0x00ff, 0x5600, 0xcca9, 0xc02b]));
        // AES first, ChaCha20 later or not at all, or no suite at all.
        assert!(!hello(&[0x1302, 0x1303]));
        assert!(!hello(&[0xfafa, 0xc02b, 0xcca9]));
        assert!(!hello(&[]));
        // 0x1313 is no GREASE value (its low nibble is not 0xa).
        assert!(!hello(&[0x1313, 0x1303]));
        // A rustls client in its default order (AES-256-GCM first) and
        // with ChaCha20 moved first.
        let rustls_hello = |chacha_first: bool| {
            let mut provider = crate::handshake::crypto_provider();
            if chacha_first {
                provider.cipher_suites.sort_by_key(|s| {
                    s.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                });
            }
            let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            let server = rustls_pki_types::ServerName::try_from("a.test").unwrap();
            let mut c = rustls::ClientConnection::new(std::sync::Arc::new(cfg), server).unwrap();
            let mut out = Vec::new();
            c.write_tls(&mut out).unwrap();
            match peek(&out) {
                Peeked::Hello(h) => h.chacha_first,
                p => panic!("{p:?}"),
            }
        };
        assert!(!rustls_hello(false));
        assert!(rustls_hello(true));
    }

    #[test]
    fn not_tls_and_wrong_message_are_refused() {
        assert_eq!(peek(b"GET / HTTP/1.1\r\n\r\n"), Peeked::NotHello);
        // A handshake record holding a ServerHello (type 2).
        assert_eq!(peek(&[22, 3, 3, 0, 4, 2, 0, 0, 0]), Peeked::NotHello);
        // An empty record and an oversized one.
        assert_eq!(peek(&[22, 3, 3, 0, 0]), Peeked::NotHello);
        assert_eq!(peek(&[22, 3, 3, 0x50, 0]), Peeked::NotHello);
        // A hello whose declared length exceeds the cap.
        assert_eq!(peek(&[22, 3, 3, 0, 4, 1, 0xff, 0, 0]), Peeked::NotHello);
        // A complete hello message with a truncated body.
        assert_eq!(peek(&[22, 3, 3, 0, 6, 1, 0, 0, 2, 3, 3]), Peeked::NotHello);
    }
}
