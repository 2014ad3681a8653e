//! Sans-IO message-body framing (RFC 9112 §6, §7.1): finds where a body
//! ends in a byte stream so the proxy can forward it unchanged, chunk
//! framing and trailers included, without buffering it.
//!
//! The chunk-size line is parsed here, strictly, rather than with
//! `httparse::parse_chunk_size`, which accepts any octet in chunk
//! extensions and whitespace after the size: a proxy must refuse what a
//! backend could read differently.

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (0: no body).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// Why a body's framing is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A malformed chunk-size line, chunk terminator or trailer.
    #[error("bad chunked framing: {0}")]
    Chunked(&'static str),
    /// The stream ended before the body did.
    #[error("body cut short")]
    Truncated,
}

/// Longest chunk-size line (size and extensions) we accept.
const MAX_SIZE_LINE: usize = 4096;
/// Largest trailer section we accept (nginx drops trailers; we pass them).
const MAX_TRAILERS: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line; bytes so far and whether a CR was seen.
    Size {
        len: usize,
        digits: u8,
        size: u64,
        in_ext: bool,
        cr: bool,
    },
    /// Inside chunk data.
    Data { left: u64 },
    /// Expecting the CRLF after chunk data (0 or 1 bytes of it seen).
    DataEnd { cr: bool },
    /// In the trailer section; bytes on the current line, total so far.
    Trailer { line: usize, total: usize, cr: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// Tracks one body through the stream.
///
/// Call order: `scan` each new slice of input; the returned count of bytes
/// belongs to the body (forward them); once [`BodyScanner::is_done`], the
/// rest of the input is the next message. On end of input call
/// [`BodyScanner::finish`].
#[derive(Debug, Clone)]
pub struct BodyScanner {
    state: State,
}

impl BodyScanner {
    /// A scanner for a body framed as `framing`.
    pub fn new(framing: Framing) -> BodyScanner {
        let state = match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size {
                len: 0,
                digits: 0,
                size: 0,
                in_ext: false,
                cr: false,
            }),
            Framing::UntilClose => State::UntilClose,
        };
        BodyScanner { state }
    }

    /// True once the whole body has been scanned.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes of the body still expected, when known (Content-Length).
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Bytes of the chunk being read that its size line declared and that
    /// have not come yet (0 outside chunk data): what a size line commits
    /// the body to before its data arrives, to check against a limit
    /// before the line is forwarded.
    pub fn chunk_left(&self) -> u64 {
        match self.state {
            State::Chunked(Chunk::Data { left }) => left,
            _ => 0,
        }
    }

    /// The input ended. Fine for a close-delimited body; otherwise the body
    /// was truncated (and must not look complete to the next hop).
    pub fn finish(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::Truncated),
        }
    }

    /// Scans `input`, returning how many leading bytes belong to the body.
    pub fn scan(&mut self, input: &[u8]) -> Result<usize, BodyError> {
        self.advance(input, None, false)
    }

    /// As [`BodyScanner::scan`], but stops where a chunked body's trailer
    /// section begins (after the last chunk's size line): the caller takes
    /// the section with [`BodyScanner::decode`] and forwards what it
    /// allows of it ([`BodyScanner::in_trailers`]).
    pub fn scan_to_trailers(&mut self, input: &[u8]) -> Result<usize, BodyError> {
        if self.in_trailers() {
            return Ok(0);
        }
        self.advance(input, None, true)
    }

    /// As [`BodyScanner::scan`], for a body forwarded as framed but for
    /// its trailer section, which is taken into `held` (at most 8 KiB, the
    /// scanner's bound) for the caller to filter and send once the body
    /// [`BodyScanner::is_done`]. Returns (bytes to forward, bytes used):
    /// those between the two were the trailer section's.
    pub fn scan_holding_trailers(
        &mut self,
        input: &[u8],
        held: &mut Option<Decoded>,
    ) -> Result<(usize, usize), BodyError> {
        let mut forward = 0;
        if held.is_none() {
            forward = self.scan_to_trailers(input)?;
            if !self.in_trailers() {
                return Ok((forward, forward));
            }
        }
        let section = held.get_or_insert_with(Decoded::default);
        let used = forward + self.decode(&input[forward..], section)?;
        Ok((forward, used))
    }

    /// In a chunked body's trailer section.
    pub fn in_trailers(&self) -> bool {
        matches!(self.state, State::Chunked(Chunk::Trailer { .. }))
    }

    /// As [`BodyScanner::scan`], also appending the body's content to
    /// `out`: the payload without chunk framing, and the trailer section's
    /// lines. For a peer that frames bodies its own way (HTTP/2 DATA
    /// frames and trailing HEADERS).
    pub fn decode(&mut self, input: &[u8], out: &mut Decoded) -> Result<usize, BodyError> {
        self.advance(input, Some(out), false)
    }

    fn advance(
        &mut self,
        input: &[u8],
        mut out: Option<&mut Decoded>,
        stop_at_trailers: bool,
    ) -> Result<usize, BodyError> {
        let mut used = 0;
        while used < input.len() {
            match &mut self.state {
                State::Done => break,
                State::UntilClose => {
                    if let Some(o) = out.as_deref_mut() {
                        o.data.extend_from_slice(&input[used..]);
                    }
                    return Ok(input.len());
                }
                State::Length(left) => {
                    let n = (*left).min((input.len() - used) as u64);
                    if let Some(o) = out.as_deref_mut() {
                        o.data.extend_from_slice(&input[used..used + n as usize]);
                    }
                    *left -= n;
                    used += n as usize;
                    if *left == 0 {
                        self.state = State::Done;
                    }
                }
                State::Chunked(chunk) => {
                    let (n, done) =
                        scan_chunked(chunk, &input[used..], out.as_deref_mut(), stop_at_trailers)?;
                    used += n;
                    if done {
                        self.state = State::Done;
                    } else if stop_at_trailers && self.in_trailers() {
                        break;
                    }
                }
            }
        }
        Ok(used)
    }
}

/// A body's content as [`BodyScanner::decode`] found it.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Payload bytes.
    pub data: Vec<u8>,
    /// The trailer section as received: field lines, each ending CRLF,
    /// then the final CRLF (that CRLF alone when there are none).
    pub trailers: Vec<u8>,
}

/// Advances the chunked state machine; returns (bytes used, body finished).
fn scan_chunked(
    chunk: &mut Chunk,
    input: &[u8],
    mut out: Option<&mut Decoded>,
    stop_at_trailers: bool,
) -> Result<(usize, bool), BodyError> {
    let mut i = 0;
    while i < input.len() {
        match chunk {
            Chunk::Data { left } => {
                let n = (*left).min((input.len() - i) as u64);
                if let Some(o) = out.as_deref_mut() {
                    o.data.extend_from_slice(&input[i..i + n as usize]);
                }
                *left -= n;
                i += n as usize;
                if *left == 0 {
                    *chunk = Chunk::DataEnd { cr: false };
                }
            }
            Chunk::DataEnd { cr } => {
                let b = input[i];
                i += 1;
                match (*cr, b) {
                    (false, b'\r') => *cr = true,
                    (true, b'\n') => {
                        *chunk = Chunk::Size {
                            len: 0,
                            digits: 0,
                            size: 0,
                            in_ext: false,
                            cr: false,
                        }
                    }
                    _ => return Err(BodyError::Chunked("chunk data not followed by CRLF")),
                }
            }
            Chunk::Size {
                len,
                digits,
                size,
                in_ext,
                cr,
            } => {
                let b = input[i];
                i += 1;
                *len += 1;
                if *len > MAX_SIZE_LINE {
                    return Err(BodyError::Chunked("chunk-size line too long"));
                }
                if *cr {
                    if b != b'\n' {
                        return Err(BodyError::Chunked("bare CR in chunk-size line"));
                    }
                    if *digits == 0 {
                        return Err(BodyError::Chunked("missing chunk size"));
                    }
                    *chunk = if *size == 0 {
                        Chunk::Trailer {
                            line: 0,
                            total: 0,
                            cr: false,
                        }
                    } else {
                        Chunk::Data { left: *size }
                    };
                    if stop_at_trailers && matches!(chunk, Chunk::Trailer { .. }) {
                        return Ok((i, false));
                    }
                    continue;
                }
                match b {
                    b'\r' => *cr = true,
                    b'\n' => return Err(BodyError::Chunked("bare LF in chunk-size line")),
                    _ if *in_ext => {
                        // chunk-ext: visible characters, SP and HTAB only.
                        if !(b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b) || b >= 0x80) {
                            return Err(BodyError::Chunked("control character in chunk extension"));
                        }
                    }
                    b';' if *digits > 0 => *in_ext = true,
                    _ => {
                        let v = match b {
                            b'0'..=b'9' => b - b'0',
                            b'a'..=b'f' => b - b'a' + 10,
                            b'A'..=b'F' => b - b'A' + 10,
                            _ => return Err(BodyError::Chunked("invalid chunk size")),
                        };
                        // 16 hex digits fill a u64; one more would overflow.
                        if *digits >= 16 {
                            return Err(BodyError::Chunked("chunk size too large"));
                        }
                        *digits += 1;
                        *size = (*size << 4) | u64::from(v);
                    }
                }
            }
            Chunk::Trailer { line, total, cr } => {
                let b = input[i];
                i += 1;
                *total += 1;
                if let Some(o) = out.as_deref_mut() {
                    o.trailers.push(b);
                }
                if *total > MAX_TRAILERS {
                    return Err(BodyError::Chunked("trailer section too large"));
                }
                if *cr {
                    if b != b'\n' {
                        return Err(BodyError::Chunked("bare CR in trailer"));
                    }
                    if *line == 0 {
                        return Ok((i, true));
                    }
                    *line = 0;
                    *cr = false;
                    continue;
                }
                match b {
                    b'\r' => *cr = true,
                    b'\n' => return Err(BodyError::Chunked("bare LF in trailer")),
                    0..=0x08 | 0x0a..=0x1f | 0x7f => {
                        return Err(BodyError::Chunked("control character in trailer"))
                    }
                    _ => *line += 1,
                }
            }
        }
    }
    Ok((i, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_line_declares_what_its_chunk_still_owes() {
        let mut s = BodyScanner::new(Framing::Chunked);
        assert_eq!(s.chunk_left(), 0);
        assert_eq!(s.scan(b"100000005\r\nhel").unwrap(), 14);
        assert_eq!(s.chunk_left(), 0x1_0000_0005 - 3);
        let mut s = BodyScanner::new(Framing::Chunked);
        assert_eq!(s.scan(b"5\r\nhello\r\n").unwrap(), 10);
        assert_eq!(s.chunk_left(), 0);
    }

    #[test]
    fn trailers_are_held_apart_from_what_is_forwarded() {
        let body = b"3\r\nabc\r\n0\r\nX-A: 1\r\n\r\nNEXT";
        let mut s = BodyScanner::new(Framing::Chunked);
        let mut held = None;
        assert_eq!(s.scan_holding_trailers(body, &mut held).unwrap(), (11, 21));
        assert!(s.is_done());
        assert_eq!(held.unwrap().trailers, b"X-A: 1\r\n\r\n");
        // Split anywhere, the same bytes forwarded and the same section.
        for cut in 1..body.len() - 4 {
            let mut s = BodyScanner::new(Framing::Chunked);
            let mut held = None;
            let (mut forwarded, mut used) = (Vec::new(), 0);
            for part in [&body[..cut], &body[cut..]] {
                let (f, u) = s.scan_holding_trailers(part, &mut held).unwrap();
                forwarded.extend_from_slice(&part[..f]);
                used += u;
                if s.is_done() {
                    break;
                }
            }
            assert_eq!(forwarded, b"3\r\nabc\r\n0\r\n", "cut at {cut}");
            assert_eq!(used, 21, "cut at {cut}");
            assert_eq!(held.unwrap().trailers, b"X-A: 1\r\n\r\n", "cut at {cut}");
        }
        // Framed by length: all forwarded, nothing held.
        let mut s = BodyScanner::new(Framing::Length(3));
        let mut held = None;
        assert_eq!(
            s.scan_holding_trailers(b"abcdef", &mut held).unwrap(),
            (3, 3)
        );
        assert!(held.is_none() && s.is_done());
    }

    #[test]
    fn scan_to_trailers_stops_where_the_trailer_section_begins() {
        let body = b"3\r\nabc\r\n0\r\nX-A: 1\r\n\r\nNEXT";
        let mut s = BodyScanner::new(Framing::Chunked);
        let n = s.scan_to_trailers(body).unwrap();
        assert_eq!(&body[..n], b"3\r\nabc\r\n0\r\n");
        assert!(s.in_trailers() && !s.is_done());
        assert_eq!(s.scan_to_trailers(&body[n..]).unwrap(), 0);
        let mut section = Decoded::default();
        let m = s.decode(&body[n..], &mut section).unwrap();
        assert_eq!(section.trailers, b"X-A: 1\r\n\r\n");
        assert!(s.is_done());
        assert_eq!(&body[n + m..], b"NEXT");
        // Byte by byte, the same stop.
        let mut s = BodyScanner::new(Framing::Chunked);
        let mut at = 0;
        while !s.in_trailers() {
            at += s.scan_to_trailers(&body[at..at + 1]).unwrap();
        }
        assert_eq!(at, n);
    }

    #[test]
    fn decode_strips_chunk_framing_and_keeps_trailers() {
        let input = b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nx-sum: 7\r\n\r\nNEXT";
        for cut in 0..input.len() {
            let mut s = BodyScanner::new(Framing::Chunked);
            let mut out = Decoded::default();
            let a = s.decode(&input[..cut], &mut out).unwrap();
            let b = s.decode(&input[a..], &mut out).unwrap();
            assert!(s.is_done());
            assert_eq!(a + b, input.len() - 4, "cut {cut}");
            assert_eq!(out.data, b"hello!");
            assert_eq!(out.trailers, b"x-sum: 7\r\n\r\n");
        }
        let mut s = BodyScanner::new(Framing::Chunked);
        let mut out = Decoded::default();
        s.decode(b"2\r\nok\r\n0\r\n\r\n", &mut out).unwrap();
        assert_eq!(
            (out.data.as_slice(), out.trailers.as_slice()),
            (&b"ok"[..], &b"\r\n"[..])
        );
        let mut s = BodyScanner::new(Framing::Length(3));
        let mut out = Decoded::default();
        assert_eq!(s.decode(b"abcdef", &mut out).unwrap(), 3);
        assert_eq!(out.data, b"abc");
    }

    /// Scans `input` split at every possible point; all splits must agree.
    fn scan_all(framing: Framing, input: &[u8]) -> Result<(usize, bool), BodyError> {
        let mut whole = BodyScanner::new(framing);
        let expect = whole.scan(input).map(|n| (n, whole.is_done()));
        for cut in 0..=input.len() {
            let mut s = BodyScanner::new(framing);
            let got = s.scan(&input[..cut]).and_then(|a| {
                if s.is_done() {
                    return Ok((a, true));
                }
                s.scan(&input[cut..]).map(|b| (a + b, s.is_done()))
            });
            assert_eq!(got, expect, "split at {cut}");
        }
        expect
    }

    #[test]
    fn content_length_stops_at_the_boundary() {
        assert_eq!(scan_all(Framing::Length(5), b"helloGET /"), Ok((5, true)));
        assert_eq!(scan_all(Framing::Length(5), b"hel"), Ok((3, false)));
        assert_eq!(scan_all(Framing::Length(0), b"GET"), Ok((0, true)));
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let body = b"5\r\nhello\r\nA;name=\"v\"\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\nNEXT";
        assert_eq!(scan_all(Framing::Chunked, body), Ok((body.len() - 4, true)));
        let body = b"0\r\n\r\n";
        assert_eq!(scan_all(Framing::Chunked, body), Ok((5, true)));
        let mut s = BodyScanner::new(Framing::Chunked);
        assert_eq!(s.scan(b"5\r\nhel"), Ok(6));
        assert_eq!(s.finish(), Err(BodyError::Truncated));
    }

    #[test]
    fn bad_chunk_framing_is_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"\r\n",
            b"-5\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5;a\x01\r\n",
            b"12345678901234567\r\n",
            b"0\r\nX: a\nb\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
            b"0x5\r\n",
        ] {
            let mut s = BodyScanner::new(Framing::Chunked);
            assert!(
                matches!(s.scan(bad), Err(BodyError::Chunked(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = format!("{}\r\n", "1".repeat(MAX_SIZE_LINE + 1));
        assert!(BodyScanner::new(Framing::Chunked)
            .scan(big.as_bytes())
            .is_err());
        // 16 hex digits is the largest size accepted.
        assert!(BodyScanner::new(Framing::Chunked)
            .scan(b"ffffffffffffffff\r\n")
            .is_ok());
    }

    #[test]
    fn until_close_takes_everything_and_ends_cleanly() {
        let mut s = BodyScanner::new(Framing::UntilClose);
        assert_eq!(s.scan(b"abc"), Ok(3));
        assert_eq!(s.finish(), Ok(()));
        assert!(s.is_done());
        let mut s = BodyScanner::new(Framing::Length(3));
        assert_eq!(s.scan(b"ab"), Ok(2));
        assert_eq!(s.remaining(), Some(1));
        assert_eq!(s.finish(), Err(BodyError::Truncated));
    }
}
