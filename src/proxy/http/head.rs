//! Sans-IO HTTP/1.1 message heads: bytes in, a validated head (or the status
//! to answer with) out. Parsing is httparse's; the framing rules of RFC 9112
//! §6 are ours, because a proxy must never pass on a message that the
//! backend could frame differently (request smuggling).

use std::ops::Range;

use bytes::Bytes;

use super::body::Framing;

/// Limits on a request head, with nginx-like defaults.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request line (method, target, version). nginx:
    /// `large_client_header_buffers 4 8k` → 8 KiB. Over it: 414.
    pub request_line: usize,
    /// Longest single header line. Over it: 431.
    pub header_line: usize,
    /// Whole head, request line included. Over it: 431.
    pub head: usize,
    /// Most header fields. Over it: 431.
    pub headers: usize,
}

/// Most header fields any [`Limits`] may allow.
pub const MAX_FIELDS: usize = 128;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_line: 8 << 10,
            header_line: 8 << 10,
            head: 32 << 10,
            headers: 100,
        }
    }
}

/// Why a head was refused, as the status code to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// 400: malformed or ambiguous (RFC 9112 §2.2, §5, §6.3).
    #[error("400 bad request: {0}")]
    BadRequest(&'static str),
    /// 414: request line (URI) too long.
    #[error("414 URI too long")]
    UriTooLong,
    /// 431: a header line, all headers, or their count over the limit.
    #[error("431 request header fields too large: {0}")]
    HeadersTooLarge(&'static str),
    /// 501: a transfer coding other than chunked (RFC 9112 §6.1).
    #[error("501 not implemented: transfer coding")]
    UnknownCoding,
    /// 505: not HTTP/1.x.
    #[error("505 HTTP version not supported")]
    Version,
    /// 501: CONNECT (RFC 9110 §9.3.6): ktern is no forward proxy, and a
    /// backend's 2xx to one would open a tunnel its framing cannot follow.
    #[error("501 not implemented: CONNECT")]
    Connect,
}

impl HeadError {
    /// The status code to answer with.
    pub fn status(self) -> u16 {
        match self {
            HeadError::BadRequest(_) => 400,
            HeadError::UriTooLong => 414,
            HeadError::HeadersTooLarge(_) => 431,
            HeadError::UnknownCoding | HeadError::Connect => 501,
            HeadError::Version => 505,
        }
    }
}

/// One header field as received (name case kept for forwarding), borrowed
/// from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    /// Field name, as sent (a token: httparse checked it is ASCII, so
    /// it is compared as bytes, with no UTF-8 check per field per pass).
    pub name: &'a [u8],
    /// Field value, as sent (may hold obs-text bytes).
    pub value: &'a [u8],
}

/// Where one field lies in its head's bytes: name and value as start and
/// end offsets. `u32`s (a head is bounded by `Limits::head`, far below
/// 4 GiB; one that did not fit would read as empty, never panic): 16
/// bytes a field where two `Range<usize>` took 32. Kept on the heap, not
/// inline: heads sit in a request's boxed state several times over, and
/// 8 fields inline grew it by 800 bytes per request in flight
/// (`tests/request_cost.rs`) to save an allocation per head.
#[derive(Debug, Clone, Copy)]
struct Span([u32; 4]);

impl Span {
    fn new(name: Range<usize>, value: Range<usize>) -> Span {
        let at = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        Span([at(name.start), at(name.end), at(value.start), at(value.end)])
    }

    fn name(&self) -> Range<usize> {
        self.0[0] as usize..self.0[1] as usize
    }

    fn value(&self) -> Range<usize> {
        self.0[2] as usize..self.0[3] as usize
    }
}

/// A head's bytes, copied once (or taken whole: [`parse_request_in`]), and
/// where each part lies in them. One allocation per head at most, instead
/// of two per field: at tens of thousands of requests a second per shard,
/// the per-field strings showed in profiles.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    raw: Vec<u8>,
    /// Per field: name and value, as places in `raw`.
    spans: Vec<Span>,
}

impl Fields {
    /// Copies `head` (the bytes httparse parsed `headers` from) and
    /// records where each field lies in it.
    fn new(head: &[u8], headers: &[httparse::Header<'_>]) -> Fields {
        Fields {
            raw: head.to_vec(),
            spans: Fields::spans(head, headers),
        }
    }

    /// Where each field lies in `head`.
    fn spans(head: &[u8], headers: &[httparse::Header<'_>]) -> Vec<Span> {
        headers
            .iter()
            .map(|h| Span::new(span(head, h.name.as_bytes()), span(head, h.value)))
            .collect()
    }

    /// The text at `r` (empty if it is not there or not UTF-8, which the
    /// parser's own checks rule out for the parts read this way).
    fn text(&self, r: &Range<usize>) -> &str {
        std::str::from_utf8(self.bytes(r)).unwrap_or_default()
    }

    /// The bytes at `r` (empty if it is not there): [`Fields::text`]
    /// without the UTF-8 check, for a caller that copies them on (five
    /// checks per proxied request were 370 instructions, callgrind).
    fn bytes(&self, r: &Range<usize>) -> &[u8] {
        self.raw.get(r.clone()).unwrap_or_default()
    }

    /// The fields in order.
    pub fn iter(&self) -> impl Iterator<Item = Field<'_>> + '_ {
        self.spans.iter().map(|s| Field {
            name: self.raw.get(s.name()).unwrap_or_default(),
            value: self.raw.get(s.value()).unwrap_or_default(),
        })
    }

    /// Values of every field named `name` (case-insensitive).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        // Names compared as bytes: no UTF-8 check per field per lookup.
        self.spans
            .iter()
            .filter(move |s| {
                self.raw
                    .get(s.name())
                    .is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()))
            })
            .map(|s| self.raw.get(s.value()).unwrap_or_default())
    }

    /// The fields in order, each value a slice of one shared copy of the
    /// head (HTTP/2's `HeaderValue`s hold `Bytes`): one allocation for all
    /// of them, where `HeaderValue::from_bytes` made one per field.
    pub fn shared(&self) -> impl Iterator<Item = (&[u8], Bytes)> + '_ {
        let shared = match self.spans.is_empty() {
            true => Bytes::new(),
            false => Bytes::copy_from_slice(&self.raw),
        };
        self.spans.iter().map(move |s| {
            let name = self.raw.get(s.name()).unwrap_or_default();
            let value = match self.raw.get(s.value()) {
                Some(_) => shared.slice(s.value()),
                None => Bytes::new(),
            };
            (name, value)
        })
    }
}

/// Where `part` (a sub-slice of `head`, as httparse returns them) lies in
/// `head`. Computed from addresses, so no search; a slice from elsewhere
/// would give a range that `Fields` reads as empty, never a panic.
fn span(head: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(head.as_ptr() as usize);
    start..start.saturating_add(part.len())
}

/// What a response head tells the client about its connection (RFC 9112
/// §9.3, §9.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// ktern closes the connection after this response: `Connection: close`.
    Close,
    /// Kept, for an HTTP/1.1 client: no field, persistence is its default.
    Keep,
    /// Kept, for an HTTP/1.0 client that asked for it: `Connection:
    /// keep-alive`. HTTP/1.0 closes by default (RFC 9112 Appendix C.2.2),
    /// so without the field such a client (ApacheBench's `-k`) takes the
    /// response as the connection's last and waits for a close that only
    /// ktern's keep-alive timeout would bring.
    KeepHttp10,
}

impl Persist {
    /// For the response to an HTTP/1.0 (`http10`) or HTTP/1.1 request,
    /// ending the connection after it or not.
    pub fn new(close: bool, http10: bool) -> Persist {
        match (close, http10) {
            (true, _) => Persist::Close,
            (false, true) => Persist::KeepHttp10,
            (false, false) => Persist::Keep,
        }
    }

    /// The `Connection` field's value, when one is sent.
    pub fn field(self) -> Option<&'static [u8]> {
        match self {
            Persist::Close => Some(b"close"),
            Persist::Keep => None,
            Persist::KeepHttp10 => Some(b"keep-alive"),
        }
    }

    /// ktern closes after this response.
    pub fn closes(self) -> bool {
        self == Persist::Close
    }
}

/// A parsed, validated request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// The head's bytes and its header fields, in order.
    pub fields: Fields,
    /// Method token, in `fields`' bytes.
    method: Range<usize>,
    /// Request target as sent, in `fields`' bytes.
    target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// How the body is delimited.
    pub framing: Framing,
    /// `Host` value, if any (lower-cased, port kept): see [`RequestHead::host`].
    host: Option<Host>,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    /// The client asks to switch protocols (`Connection: upgrade` + `Upgrade`).
    pub upgrade: bool,
    /// Bytes the head took in the input.
    pub len: usize,
}

/// Where a request's `Host` value is: in its head's bytes as sent when
/// that is already lower case (nearly always), else a lower-cased copy.
/// A `String` per request was one of a keep-alive request's allocations.
#[derive(Debug, Clone)]
enum Host {
    At(Range<usize>),
    Lowered(String),
}

impl RequestHead {
    /// What the response to this request tells the client about its
    /// connection, when ktern closes it after the response (`close`) or not.
    pub fn persist(&self, close: bool) -> Persist {
        Persist::new(close, self.minor == 0)
    }

    /// `Host` value, if any (lower-cased, surrounding spaces trimmed, port
    /// kept).
    pub fn host(&self) -> Option<&str> {
        match &self.host {
            None => None,
            Some(Host::At(r)) => Some(self.fields.text(r)),
            Some(Host::Lowered(h)) => Some(h),
        }
    }

    /// [`RequestHead::host`] as bytes (no UTF-8 check: the parser made one).
    pub fn host_bytes(&self) -> Option<&[u8]> {
        match &self.host {
            None => None,
            Some(Host::At(r)) => Some(self.fields.bytes(r)),
            Some(Host::Lowered(h)) => Some(h.as_bytes()),
        }
    }

    /// [`RequestHead::method`] as bytes.
    pub fn method_bytes(&self) -> &[u8] {
        self.fields.bytes(&self.method)
    }

    /// [`RequestHead::target`] as bytes.
    pub fn target_bytes(&self) -> &[u8] {
        self.fields.bytes(&self.target)
    }

    /// Method token.
    pub fn method(&self) -> &str {
        self.fields.text(&self.method)
    }

    /// Request target in origin form (an absolute-form target's origin
    /// part), or `*` for OPTIONS: [`origin_form`].
    pub fn target(&self) -> &str {
        self.fields.text(&self.target)
    }

    /// Values of every field named `name` (case-insensitive).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields.values(name)
    }
}

/// Whether a response head read so far in `buf` may have ended since
/// `scanned` bytes of it were parsed without one (0: never parsed), or
/// grown past `limit`: only then is it worth parsing again. A backend
/// that sent its head a byte per segment had the whole head parsed
/// after each one, quadratic in its length (a 60 KB head, about 2 GB
/// scanned on the shard); now each byte is looked at about once. A head
/// ends at an empty line (RFC 9112 §2.2 allows a bare LF).
pub fn may_end_head(buf: &[u8], scanned: usize, limit: usize) -> bool {
    scanned == 0
        || buf.len() > limit
        || buf[scanned.saturating_sub(2).min(buf.len())..]
            .windows(2)
            .any(|w| w == b"\n\n" || w == b"\n\r")
}

/// Parses a request head from the start of `buf`.
///
/// `Ok(None)`: incomplete, read more (the limits are already enforced on
/// what is there, so a client cannot grow the buffer past them).
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Option<RequestHead>, HeadError> {
    read_request(scan_request(buf, limits), |len| buf[..len].to_vec())
}

/// [`parse_request`] of a head ktern built itself (an HTTP/2 request
/// restated): the head keeps `buf` instead of a copy of it.
pub fn parse_request_owned(
    mut buf: Vec<u8>,
    limits: &Limits,
) -> Result<Option<RequestHead>, HeadError> {
    read_request(scan_request(&buf, limits), move |len| {
        buf.truncate(len);
        buf
    })
}

/// [`parse_request`] of the head at the start of a connection's read
/// buffer. The head leaves `buf` once it has been read whole, even when a
/// later rule refuses it (a refused head ends the connection); an
/// incomplete head, or one refused while it is read (httparse, the
/// limits, a bare CR), leaves `buf` as it was. When the head is all `buf`
/// holds, in a small buffer (a request without a body, nothing pipelined
/// behind it: nearly every keep-alive request on the userspace record
/// path), the head takes the buffer itself instead of a copy: one
/// allocation and a copy fewer per request. A large buffer (the kTLS path
/// reads 16 KiB at a time) is not held for the exchange: the head is
/// copied out of it.
pub fn parse_request_in(
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> Result<Option<RequestHead>, HeadError> {
    read_request(scan_request(buf, limits), |len| {
        if len == buf.len() && buf.capacity() <= crate::buffers::SMALL {
            std::mem::take(buf)
        } else {
            let raw = buf[..len].to_vec();
            buf.drain(..len);
            raw
        }
    })
}

/// Paces the parsing of a request head that arrives in pieces: say when
/// the bytes read so far are worth parsing again.
///
/// Parsing is linear in the head, so parsing it again after every read
/// made a head trickled in small records quadratic: 32 KiB (the head
/// limit) at a byte per record was half a billion bytes scanned, about a
/// second of a shard's CPU per connection. A head can only be complete
/// where a line ends in an empty one, so the head is parsed again when
/// new bytes hold such an end, or once the bytes have grown by a quarter
/// (and at least `RESCAN`) since the last parse: the parses' lengths then
/// grow geometrically and sum to a few times the head's, and a line over
/// its limit, or a head over its own, is refused at most a quarter of
/// the limit (and at least `RESCAN`) later. Empty lines before the
/// request line are dropped (RFC 9112 §2.2: a server SHOULD ignore at
/// least one), or a flood of them would end a "head" at every byte.
#[derive(Debug, Default)]
pub struct HeadPacer {
    /// How much of the buffer the last parse saw (0: none yet).
    parsed: usize,
    /// How much of it the last call looked through for a head's end: an
    /// end in those bytes would have made that call parse, so each call
    /// searches only what came since.
    seen: usize,
}

impl HeadPacer {
    /// New bytes that make a parse worthwhile without a head's end in
    /// them, at the least.
    const RESCAN: usize = 1 << 10;

    /// Whether `buf` (the head's bytes so far; the caller parses it when
    /// this says so) is worth parsing now. Drops empty lines before the
    /// request line.
    pub fn ready(&mut self, buf: &mut Vec<u8>) -> bool {
        if self.parsed == 0 {
            // Whole empty lines only: a bare CR is left for the parser to
            // refuse (RFC 9112 §2.2), and a CR whose LF has not come yet
            // waits for it.
            let mut lead = 0;
            loop {
                match &buf[lead..] {
                    [b'\n', ..] => lead += 1,
                    [b'\r', b'\n', ..] => lead += 2,
                    _ => break,
                }
            }
            buf.drain(..lead);
            if buf.is_empty() || buf.as_slice() == b"\r" {
                return false;
            }
        }
        // Two bytes back: an end may straddle the last read.
        let new = buf.get(self.seen.saturating_sub(2)..).unwrap_or(buf);
        let ready = self.parsed == 0
            || buf.len() >= self.parsed + Self::RESCAN.max(self.parsed / 4)
            || memchr::memmem::find(new, b"\n\n").is_some()
            || memchr::memmem::find(new, b"\n\r\n").is_some();
        if ready {
            self.parsed = buf.len();
        }
        self.seen = buf.len();
        ready
    }
}

/// The three `parse_request*` differ only in where the head's bytes come
/// from: `raw(len)` hands over the first `len` bytes once a whole head has
/// been scanned.
fn read_request(
    scanned: Result<Option<Scan>, HeadError>,
    raw: impl FnOnce(usize) -> Vec<u8>,
) -> Result<Option<RequestHead>, HeadError> {
    match scanned? {
        Some(scan) => build_request(raw(scan.len), scan).map(Some),
        None => Ok(None),
    }
}

/// What parsing a request head's bytes found, as places in them: no
/// borrow of the input, so the caller then decides whether the head
/// takes those bytes or a copy.
struct Scan {
    len: usize,
    method: Range<usize>,
    target: Range<usize>,
    minor: u8,
    spans: Vec<Span>,
}

/// httparse's part, and the limits and bytes it does not check.
fn scan_request(buf: &[u8], limits: &Limits) -> Result<Option<Scan>, HeadError> {
    check_lines(buf, limits)?;
    // On the stack (4 KiB): a heap allocation of this size per request
    // showed in profiles (glibc consolidates its fast bins for it).
    // Uninitialised: httparse writes only the entries it fills, where
    // zeroing all 128 took about 650 instructions per parse (callgrind).
    let mut storage = [const { std::mem::MaybeUninit::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = req.parse_with_uninit_headers(buf, &mut storage[..limits.headers.min(MAX_FIELDS)]);
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.head {
                return Err(HeadError::HeadersTooLarge("head over the limit"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::HeadersTooLarge("too many fields"))
        }
        Err(httparse::Error::Version) => return Err(HeadError::Version),
        Err(httparse::Error::HeaderName) => {
            return Err(HeadError::BadRequest("invalid field name"))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(HeadError::BadRequest("invalid field value"))
        }
        Err(httparse::Error::NewLine) => return Err(HeadError::BadRequest("invalid line ending")),
        Err(_) => return Err(HeadError::BadRequest("malformed request line")),
    };
    if len > limits.head {
        return Err(HeadError::HeadersTooLarge("head over the limit"));
    }
    let head = &buf[..len];
    // httparse accepts a bare LF as a line end (RFC 9112 §2.2 lets a
    // recipient do so); a bare CR anywhere is invalid and must be refused.
    // (memchr: a few instructions per 32 bytes, where a byte loop took
    // several per byte of every head.)
    if memchr::memchr_iter(b'\r', head).any(|i| head.get(i + 1) != Some(&b'\n')) {
        return Err(HeadError::BadRequest("bare CR"));
    }
    Ok(Some(Scan {
        len,
        method: span(head, req.method.unwrap_or_default().as_bytes()),
        target: span(head, req.path.unwrap_or_default().as_bytes()),
        minor: req.version.unwrap_or(1),
        spans: Fields::spans(head, req.headers),
    }))
}

/// The framing, Host and connection rules over a scanned head, whose
/// bytes `raw` now are.
fn build_request(raw: Vec<u8>, scan: Scan) -> Result<RequestHead, HeadError> {
    let Scan {
        len,
        method,
        target,
        minor,
        spans,
    } = scan;
    let fields = Fields { raw, spans };
    let framing = request_framing(&fields)?;
    if minor == 0 && framing == Framing::Chunked {
        // RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means
        // faulty framing; forwarding it would invite a different reading.
        return Err(HeadError::BadRequest("Transfer-Encoding in HTTP/1.0"));
    }
    let mut host = None;
    let (mut conn_close, mut conn_keep) = (false, false);
    let mut conn_upgrade = false;
    let mut expect_continue = false;
    let mut has_upgrade = false;
    let mut h2c = false;
    for f in fields.iter() {
        if f.name.eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                // RFC 9112 §3.2: more than one Host is a 400.
                return Err(HeadError::BadRequest("repeated Host"));
            }
            let v = std::str::from_utf8(f.value)
                .map_err(|_| HeadError::BadRequest("non-ASCII Host"))?
                .trim_matches([' ', '\t']);
            if !valid_host(v.as_bytes()) {
                return Err(HeadError::BadRequest("invalid Host"));
            }
            host = Some(match v.bytes().any(|b| b.is_ascii_uppercase()) {
                true => Host::Lowered(v.to_ascii_lowercase()),
                false => Host::At(span(&fields.raw, v.as_bytes())),
            });
        } else if f.name.eq_ignore_ascii_case(b"connection") {
            for token in list_tokens(f.value) {
                if token.eq_ignore_ascii_case("close") {
                    conn_close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    conn_keep = true;
                } else if token.eq_ignore_ascii_case("upgrade") {
                    conn_upgrade = true;
                }
            }
        } else if f.name.eq_ignore_ascii_case(b"expect") {
            expect_continue |= f.value.eq_ignore_ascii_case(b"100-continue");
        } else if f.name.eq_ignore_ascii_case(b"upgrade") {
            // h2c (RFC 7540 §3.2; gone from RFC 9113, §3.1): a backend that
            // took it would serve HTTP/2 requests ktern never sees, past
            // its rules and forwarding fields ("h2c smuggling"). The
            // request goes on without the upgrade, as to a server that
            // offers no h2c (HAProxy and Envoy do the same).
            if list_tokens(f.value).any(|t| t.eq_ignore_ascii_case("h2c")) {
                h2c = true;
            }
            has_upgrade = true;
        }
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400.
    if minor == 1 && host.is_none() {
        return Err(HeadError::BadRequest("missing Host"));
    }
    let host_text = match &host {
        None => None,
        Some(Host::At(r)) => Some(fields.bytes(r)),
        Some(Host::Lowered(h)) => Some(h.as_bytes()),
    };
    let target = origin_form(&fields, &method, target, host_text)?;
    Ok(RequestHead {
        fields,
        method,
        target,
        minor,
        framing,
        host,
        // `close` wins wherever it stands (RFC 9112 §9.6); an HTTP/1.0
        // connection persists only if asked to (§9.3).
        keep_alive: !conn_close && (minor == 1 || conn_keep),
        expect_continue,
        // RFC 9110 §7.8: Upgrade in an HTTP/1.0 request is ignored.
        upgrade: conn_upgrade && has_upgrade && !h2c && minor == 1,
        len,
    })
}

/// The request target as origin-form (RFC 9112 §3.2), where every later
/// stage (routing, the line sent upstream, the log) reads it. Before, any
/// target httparse took went through as it came: a target not starting
/// with `/` routed as `/`, while the backend may read it otherwise.
/// - origin-form (`/path?query`): as it is;
/// - asterisk-form (`*`): with OPTIONS only (§3.2.4);
/// - absolute-form (`http://authority/path`, a client talking to a proxy):
///   its origin-form part. The authority names the host, and a recipient
///   ignores Host (§3.2.2), so ktern, which routes by Host, takes it only
///   when Host is identical to it, as a client MUST send (§3.2). With
///   another Host, ktern would route by one host while the backend served
///   the other (past a rule that matches on Host or SNI): 400. So is
///   userinfo (RFC 9110 §4.2.4) and an empty path;
/// - anything else, CONNECT's authority-form too (a tunnel ktern does not
///   open, as over HTTP/2): 400.
fn origin_form(
    fields: &Fields,
    method: &Range<usize>,
    target: Range<usize>,
    host: Option<&[u8]>,
) -> Result<Range<usize>, HeadError> {
    let t = fields.bytes(&target);
    if fields.bytes(method) == b"CONNECT" {
        return Err(HeadError::Connect);
    }
    // RFC 9112 §3.2.1: origin-form is a path and a query; a fragment is
    // never sent. Dot segments are looked for up to a `#` (past it is no
    // path), while a backend that takes `#` into its path would resolve
    // `/v2/#/../admin` to `/admin`, past the rule that routed `/v2/`.
    if t.contains(&b'#') {
        return Err(HeadError::BadRequest("fragment in the request target"));
    }
    match t {
        [b'/', ..] => return Ok(target),
        b"*" if fields.bytes(method) == b"OPTIONS" => return Ok(target),
        b"*" => {
            return Err(HeadError::BadRequest(
                "* target on a method other than OPTIONS",
            ))
        }
        _ => {}
    }
    let scheme = |s: &[u8]| t.len() > s.len() && t[..s.len()].eq_ignore_ascii_case(s);
    let rest = match () {
        () if scheme(b"http://") => &t[7..],
        () if scheme(b"https://") => &t[8..],
        () => return Err(HeadError::BadRequest("request target not in origin form")),
    };
    let end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains(&b'@') {
        return Err(HeadError::BadRequest("userinfo in the request target"));
    }
    if !path.starts_with(b"/") {
        return Err(HeadError::BadRequest("absolute-form target without a path"));
    }
    if !host.is_some_and(|h| h.eq_ignore_ascii_case(authority)) {
        return Err(HeadError::BadRequest(
            "Host differs from the request target's authority",
        ));
    }
    Ok(target.end - path.len()..target.end)
}

/// RFC 9112 §3.2: `Host = uri-host [ ":" port ]`; anything else is a 400.
/// uri-host is an IP-literal in brackets or a name. RFC 3986 §3.2.2's
/// reg-name also allows sub-delims (`,;=!$&'()*+`), `~` and
/// percent-encoding, but no DNS name has them, and a host that ends in
/// `.example.com` must name a host under it: routing matches `*.example.com`
/// on this value and the backend gets it, in Host and in the forwarding
/// fields, where `evil.tld,x.example.com` reads as `evil.tld` to the
/// frameworks that split lists (Express's `req.hostname`, Spring's
/// `X-Forwarded-Host`), and `evil.tld/.example.com` as a path. So a name is
/// letters, digits, `-`, `.` and `_` (as in internal service names), as
/// HAProxy's and Envoy's strict modes require. Empty is allowed (an
/// HTTP/1.0 request, or a URI without authority).
fn valid_host(host: &[u8]) -> bool {
    let (name, port) = match host {
        [b'[', ..] => match host.iter().position(|&b| b == b']') {
            Some(end) => {
                let inside = &host[1..end];
                let literal = !inside.is_empty()
                    && inside
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
                if !literal {
                    return false;
                }
                (&host[..0], &host[end + 1..])
            }
            None => return false,
        },
        _ => match host.iter().position(|&b| b == b':') {
            Some(colon) => (&host[..colon], &host[colon..]),
            None => (host, &host[host.len()..]),
        },
    };
    let name_ok = name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    name_ok && port_ok
}

/// Whether the path part of an origin-form target has a `.` or `..`
/// segment, literal or percent-encoded (`%2e`): rules match the target's
/// path as sent, and a backend that resolves `/v2/../admin` would serve a
/// path outside the rule that routed it (RFC 3986 §5.2.4; browsers remove
/// them before sending, so only a crafted request has one). Segments end
/// where some backend ends them, not only at `/`: at `\` (IIS), at `%2f`
/// and `%5c` (a backend that decodes before it resolves, as nginx does
/// `%2F`), and a segment's dots end at `;` (path parameters, RFC 3986 §3.3,
/// which Tomcat drops first: `/app/..;/admin` is its `/admin`).
pub fn has_dot_segment(target: &[u8]) -> bool {
    let path = match target.iter().position(|&b| matches!(b, b'?' | b'#')) {
        Some(end) => &target[..end],
        None => target,
    };
    // The length of the separator at the start of `rest` (0: none).
    let separator = |rest: &[u8]| match rest {
        [b'/' | b'\\', ..] => 1,
        [b'%', b'2', c, ..] if c | 0x20 == b'f' => 3,
        [b'%', b'5', c, ..] if c | 0x20 == b'c' => 3,
        _ => 0,
    };
    let dots_only = |segment: &[u8]| {
        let mut rest = segment.split(|&b| b == b';').next().unwrap_or_default();
        let mut dots = 0;
        while !rest.is_empty() {
            if rest[0] == b'.' {
                rest = &rest[1..];
            } else if rest.len() >= 3
                && rest[0] == b'%'
                && rest[1] == b'2'
                && (rest[2] | 0x20) == b'e'
            {
                rest = &rest[3..];
            } else {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    };
    let (mut start, mut i) = (0, 0);
    while i < path.len() {
        match separator(&path[i..]) {
            0 => i += 1,
            n => {
                if dots_only(&path[start..i]) {
                    return true;
                }
                i += n;
                start = i;
            }
        }
    }
    dots_only(&path[start..])
}

/// Enforces line-length limits on whatever part of the head has arrived:
/// every line up to the blank one that ends the head, and a last line
/// still incomplete. One pass over the line ends.
fn check_lines(buf: &[u8], limits: &Limits) -> Result<(), HeadError> {
    let check = |line: usize, first: bool| match first {
        true if line > limits.request_line => Err(HeadError::UriTooLong),
        false if line > limits.header_line => {
            Err(HeadError::HeadersTooLarge("field line over the limit"))
        }
        _ => Ok(()),
    };
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', buf) {
        let line = &buf[start..nl];
        check(line.len(), start == 0)?;
        // A blank line after the first ends the head.
        if start > 0 && (line.is_empty() || line == b"\r") {
            return Ok(());
        }
        start = nl + 1;
    }
    check(buf.len() - start, start == 0)
}

/// Comma-separated list elements (RFC 9110 §5.6.1), trimmed, empties
/// dropped. An element that is not UTF-8 stays in the list as U+FFFD,
/// which names no coding or option: dropped, it let a backend's
/// `chunked, \xff` (a final coding that is not chunked, so a client reads
/// to the close) read as chunked here while the value went on as it came.
pub fn list_tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    value
        .split(|&b| b == b',')
        .map(|t| std::str::from_utf8(t).unwrap_or("\u{fffd}"))
        .map(|t| t.trim_matches(|c| c == ' ' || c == '\t'))
        .filter(|t| !t.is_empty())
}

/// RFC 9112 §6.3 for requests: Transfer-Encoding wins only when it is
/// exactly a final `chunked`; Content-Length must be one valid number
/// (repeats allowed only if identical); both together are refused.
fn request_framing(fields: &Fields) -> Result<Framing, HeadError> {
    let (te, cl) = framing_fields(fields).map_err(HeadError::BadRequest)?;
    if !te.is_empty() {
        if cl.is_some() {
            // §6.3 (3): a server MAY reject; a proxy forwarding it risks smuggling.
            return Err(HeadError::BadRequest(
                "Content-Length with Transfer-Encoding",
            ));
        }
        return match te.as_slice() {
            [only] if only == "chunked" => Ok(Framing::Chunked),
            // chunked applied twice, or not last: §6.3 (4) → 400.
            list if list.iter().any(|t| t == "chunked") => {
                Err(HeadError::BadRequest("chunked is not the final coding"))
            }
            _ => Err(HeadError::UnknownCoding),
        };
    }
    Ok(Framing::Length(cl.unwrap_or(0)))
}

/// The framing fields of a message: every transfer coding (lower case, in
/// order) and the Content-Length, which must be one valid number (repeats
/// only if identical, RFC 9110 §8.6). A framing field's name spelled with
/// `_` for `-` (`Transfer_Encoding`) is refused: ktern does not frame by
/// it, but servers whose parsers come from Mongrel's (Puma before 6.4.3,
/// unicorn) read `_` as `-` and would frame by it, so the request would end
/// elsewhere for them (CVE-2024-45614); nginx drops such names by default.
fn framing_fields(fields: &Fields) -> Result<(Vec<String>, Option<u64>), &'static str> {
    let mut te: Vec<String> = Vec::new();
    let mut cl: Option<u64> = None;
    for f in fields.iter() {
        if underscored(f.name, b"transfer-encoding") || underscored(f.name, b"content-length") {
            return Err("a framing field named with an underscore");
        }
        if f.name.eq_ignore_ascii_case(b"transfer-encoding") {
            if list_tokens(f.value).next().is_none() {
                return Err("empty Transfer-Encoding");
            }
            te.extend(list_tokens(f.value).map(|t| t.to_ascii_lowercase()));
        } else if f.name.eq_ignore_ascii_case(b"content-length") {
            for v in f.value.split(|&b| b == b',') {
                let n = parse_content_length(v).ok_or("invalid Content-Length")?;
                match cl {
                    Some(prev) if prev != n => return Err("conflicting Content-Length"),
                    _ => cl = Some(n),
                }
            }
        }
    }
    Ok((te, cl))
}

/// Whether `name` is `field` (lower case, with `-`) with at least one `-`
/// written as `_`.
fn underscored(name: &[u8], field: &[u8]) -> bool {
    name.len() == field.len()
        && name.contains(&b'_')
        && name
            .iter()
            .zip(field)
            .all(|(&n, &f)| n.to_ascii_lowercase() == f || (n == b'_' && f == b'-'))
}

/// `1*DIGIT` with optional surrounding whitespace, no sign, no overflow.
fn parse_content_length(v: &[u8]) -> Option<u64> {
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !blank(b))?;
    let end = v.iter().rposition(|b| !blank(b))? + 1;
    let digits = &v[start..end];
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// A parsed backend response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Reason phrase as sent, in `fields`' bytes.
    reason: Range<usize>,
    /// 0 or 1.
    pub minor: u8,
    /// The head's bytes and its header fields, in order.
    pub fields: Fields,
    /// How the body is delimited (given the request method).
    pub framing: Framing,
    /// The backend will keep the connection open afterwards.
    pub keep_alive: bool,
    /// Bytes the head took.
    pub len: usize,
}

impl ResponseHead {
    /// Reason phrase as sent.
    pub fn reason(&self) -> &str {
        self.fields.text(&self.reason)
    }
}

/// Why a backend response head is refused (the client gets 502).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not an HTTP/1.x response, or malformed.
    #[error("malformed response head")]
    Malformed,
    /// Head larger than the limit.
    #[error("response head too large")]
    TooLarge,
    /// Ambiguous framing (RFC 9112 §6.3).
    #[error("ambiguous response framing: {0}")]
    Framing(&'static str),
}

/// Parses a response head to a request with `method` (HEAD responses and
/// 1xx/204/304 have no body, RFC 9112 §6.3 (1)).
pub fn parse_response(
    buf: &[u8],
    method: &str,
    max_head: usize,
) -> Result<Option<ResponseHead>, ResponseError> {
    // Uninitialised, as for requests.
    let mut storage = [const { std::mem::MaybeUninit::uninit() }; MAX_FIELDS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut storage,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err(ResponseError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooLarge),
        Err(_) => return Err(ResponseError::Malformed),
    };
    if len > max_head {
        return Err(ResponseError::TooLarge);
    }
    let status = res.code.unwrap_or(0);
    // httparse takes any three digits; RFC 9110 §15 defines 100-599, and
    // a code under 100 has no class to frame or relay it by.
    if status < 100 {
        return Err(ResponseError::Malformed);
    }
    let minor = res.version.unwrap_or(1);
    let head = &buf[..len];
    let reason = span(head, res.reason.unwrap_or_default().as_bytes());
    let fields = Fields::new(head, res.headers);
    // `close` wins wherever it stands (RFC 9112 §9.6); an HTTP/1.0
    // connection persists only if asked to (§9.3).
    let (mut close, mut keep) = (false, false);
    for value in fields.values("connection") {
        for t in list_tokens(value) {
            close |= t.eq_ignore_ascii_case("close");
            keep |= t.eq_ignore_ascii_case("keep-alive");
        }
    }
    let mut keep_alive = !close && (minor == 1 || keep);
    let (te, cl) = framing_fields(&fields).map_err(ResponseError::Framing)?;
    // §6.1: an HTTP/1.0 message with a Transfer-Encoding has faulty
    // framing; the connection closes after it.
    if minor == 0 && !te.is_empty() {
        keep_alive = false;
    }
    // §6.3 (1): a 204 or 304 has no body whatever its fields say, but one
    // that declares a body (a 304's Content-Length is the resource's, not
    // a body) may send it anyway, after the head and past any check of
    // the pool: the next request on that connection would read it as its
    // response. Such a connection is not reused.
    if (status == 204 && (!te.is_empty() || cl.is_some_and(|n| n > 0)))
        || (status == 304 && !te.is_empty())
    {
        keep_alive = false;
    }
    // Methods are case-sensitive (RFC 9110 §9.1): a `head` request is not
    // HEAD, and a backend may answer it with a body, which read as
    // bodiless would be left on a pooled connection for the next request.
    let bodiless =
        method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::Length(0)
    } else if !te.is_empty() {
        if cl.is_some() {
            return Err(ResponseError::Framing(
                "Content-Length with Transfer-Encoding",
            ));
        }
        match te.last().map(String::as_str) {
            Some("chunked") if te.iter().filter(|t| *t == "chunked").count() == 1 => {
                Framing::Chunked
            }
            // §6.3 (4): a response whose final coding is not chunked is
            // delimited by the connection close.
            Some(_) if !te.iter().any(|t| t == "chunked") => Framing::UntilClose,
            _ => return Err(ResponseError::Framing("misplaced chunked")),
        }
    } else {
        match cl {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    if framing == Framing::UntilClose {
        keep_alive = false;
    }
    Ok(Some(ResponseHead {
        status,
        reason,
        minor,
        fields,
        framing,
        keep_alive,
        len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(text.as_bytes(), &Limits::default())
    }

    #[test]
    fn host_is_trimmed_and_lower_cased_whether_sent_so_or_not() {
        for (sent, want) in [
            ("app.example:8443", "app.example:8443"),
            ("  app.example \t", "app.example"),
            ("App.Example", "app.example"),
            ("", ""),
        ] {
            let h = req(&format!("GET / HTTP/1.1\r\nX: y\r\nHost: {sent}\r\n\r\n"))
                .unwrap()
                .unwrap();
            assert_eq!(h.host(), Some(want), "{sent:?}");
            assert_eq!(h.host_bytes(), Some(want.as_bytes()), "{sent:?}");
            // The head's bytes are forwarded as sent.
            assert_eq!(h.values("host").next(), Some(sent.trim().as_bytes()));
        }
        let h = req("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.host(), None);
        assert_eq!(h.host_bytes(), None);
    }

    #[test]
    fn simple_get_with_defaults() {
        let h = req("GET /a?b=1 HTTP/1.1\r\nHost: Example.COM:443\r\nAccept: */*\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(h.method(), "GET");
        assert_eq!(h.target(), "/a?b=1");
        assert_eq!(h.host(), Some("example.com:443"));
        assert_eq!(
            (h.method_bytes(), h.target_bytes()),
            (&b"GET"[..], &b"/a?b=1"[..])
        );
        assert!(h.keep_alive);
        assert_eq!(h.framing, Framing::Length(0));
        assert_eq!(
            h.len,
            "GET /a?b=1 HTTP/1.1\r\nHost: Example.COM:443\r\nAccept: */*\r\n\r\n".len()
        );
    }

    #[test]
    fn fields_keep_order_case_and_raw_bytes() {
        let text =
            b"PUT /x HTTP/1.1\r\nHost: h\r\nX-Raw: caf\xe9 \r\nx-raw:  two\r\nEmpty:\r\n\r\n";
        let h = parse_request(text, &Limits::default()).unwrap().unwrap();
        let all: Vec<(&[u8], &[u8])> = h.fields.iter().map(|f| (f.name, f.value)).collect();
        assert_eq!(
            all,
            vec![
                (&b"Host"[..], &b"h"[..]),
                (&b"X-Raw"[..], &b"caf\xe9"[..]),
                (&b"x-raw"[..], &b"two"[..]),
                (&b"Empty"[..], &b""[..]),
            ]
        );
        assert_eq!(
            h.values("X-RAW").collect::<Vec<_>>(),
            vec![&b"caf\xe9"[..], &b"two"[..]]
        );
        assert_eq!((h.method(), h.target()), ("PUT", "/x"));
        let r = parse_response(b"HTTP/1.1 404 Not  Here\r\nA: 1\r\n\r\n", "GET", 1024)
            .unwrap()
            .unwrap();
        assert_eq!(r.reason(), "Not  Here");
        assert_eq!(r.fields.values("a").collect::<Vec<_>>(), vec![&b"1"[..]]);
    }

    #[test]
    fn shared_values_are_slices_of_one_copy_of_the_head() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A: one\r\nEmpty:\r\n\r\n",
            "GET",
            1024,
        )
        .unwrap()
        .unwrap();
        let shared: Vec<(&[u8], Bytes)> = r.fields.shared().collect();
        let plain: Vec<(&[u8], &[u8])> = r.fields.iter().map(|f| (f.name, f.value)).collect();
        assert_eq!(shared.len(), plain.len());
        for ((n, v), (pn, pv)) in shared.iter().zip(&plain) {
            assert_eq!((*n, &v[..]), (*pn, *pv));
        }
        // One copy: the second value lies as far after the first in the
        // shared bytes as in the head.
        let gap = |a: &[u8], b: &[u8]| b.as_ptr() as usize - a.as_ptr() as usize;
        assert_eq!(gap(&shared[0].1, &shared[1].1), gap(plain[0].1, plain[1].1));
        assert!(shared[2].1.is_empty());
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert!(req("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        assert!(req("GET / HT").unwrap().is_none());
    }

    #[test]
    fn connection_semantics() {
        assert!(
            !req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        assert!(!req("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(
            req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        let up = req("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap().unwrap();
        assert!(up.upgrade);
        // h2c is not upgraded to, alone or among others.
        for offer in ["h2c", "websocket, H2C"] {
            let h2c = req(&format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {offer}\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")).unwrap().unwrap();
            assert!(!h2c.upgrade, "{offer}");
        }
        let e =
            req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(e.expect_continue);
        assert_eq!(e.framing, Framing::Length(3));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let cases: &[(&str, u16)] = &[
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            // Framing fields spelled with `_`: some backends read `-`.
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 39\r\nTransfer_Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nCONTENT_LENGTH: 5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            ("CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n", 501),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHo(st: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
        ];
        for (text, status) in cases {
            let got = req(text).map(|h| h.map(|h| h.framing));
            match got {
                Err(e) => assert_eq!(e.status(), *status, "{text:?}: {e}"),
                Ok(h) => panic!("{text:?} accepted as {h:?}"),
            }
        }
        // Identical repeats are allowed (RFC 9110 §8.6).
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(3));
        let h = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
    }

    #[test]
    fn dot_segments_are_found_literal_or_encoded() {
        for path in [
            "/v2/../admin",
            "/v2/%2e%2E/admin",
            "/v2/.%2e",
            "/./x",
            "/x/..",
            "/x/.?a",
            // Where backends end a segment: path parameters, `\\`, and
            // an encoded `/` or `\\`.
            "/app/..;/admin",
            "/app/.;x/admin",
            "/app/..\\admin",
            "/app/..%2fadmin",
            "/app/%2e%2e%2Fadmin",
            "/app/..%5Cadmin",
            "/app%2f..%2fadmin",
        ] {
            assert!(has_dot_segment(path.as_bytes()), "{path}");
        }
        // Dots inside names, and after the path, are no segments.
        for path in [
            "/",
            "/a.b/..c/.../x",
            "/x?../",
            "/x#/../",
            "/%2e%2e%2e/",
            "/.well-known/x",
            "/a%2fb/c;d/e\\f",
            "/a/..b;../c",
            "/x;..",
        ] {
            assert!(!has_dot_segment(path.as_bytes()), "{path}");
        }
    }

    #[test]
    fn targets_are_origin_form_or_refused() {
        let target = |text: &str| req(text).map(|h| h.map(|h| h.target().to_string()));
        for (text, want) in [
            ("GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n", "/a?b"),
            ("OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", "*"),
            // Absolute-form naming the Host: its origin-form part.
            (
                "GET http://x.example/a?b HTTP/1.1\r\nHost: x.example\r\n\r\n",
                "/a?b",
            ),
            (
                "GET HTTPS://X.example:8443/ HTTP/1.1\r\nHost: x.EXAMPLE:8443\r\n\r\n",
                "/",
            ),
            ("GET / HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n", "/"),
            ("GET / HTTP/1.1\r\nHost: a_b.example\t\r\n\r\n", "/"),
            ("GET / HTTP/1.0\r\nHost:\r\n\r\n", "/"),
        ] {
            assert_eq!(target(text).unwrap().as_deref(), Some(want), "{text:?}");
        }
        for text in [
            // Another host than Host's: routing and backend would disagree.
            "GET http://internal.example/admin HTTP/1.1\r\nHost: public.example\r\n\r\n",
            "GET http://x.example/a HTTP/1.1\r\nHost: x.example:443\r\n\r\n",
            "GET http://x.example/a HTTP/1.0\r\n\r\n",
            "GET http://u@x.example/a HTTP/1.1\r\nHost: x.example\r\n\r\n",
            "GET http://x.example HTTP/1.1\r\nHost: x.example\r\n\r\n",
            "GET http://x.example?a HTTP/1.1\r\nHost: x.example\r\n\r\n",
            "GET ftp://x.example/a HTTP/1.1\r\nHost: x.example\r\n\r\n",
            "GET http:// HTTP/1.1\r\nHost: x.example\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET ?x HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET foo HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET @evil/x HTTP/1.1\r\nHost: x\r\n\r\n",
            // Host must be uri-host [":" port] (RFC 9112 §3.2).
            "GET / HTTP/1.1\r\nHost: evil.tld/.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: evil.tld#.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
            // Sub-delims and percent-encoding: in no DNS name, and a list
            // or parameter separator to whoever reads the forwarded host.
            "GET / HTTP/1.1\r\nHost: evil.tld,x.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: evil.tld;x.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: evil.tld%2cx.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a=b.example.com\r\n\r\n",
            // A fragment is no part of a request target (RFC 9112 §3.2.1).
            "GET /v2/#/../admin HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http://x.example/a#b HTTP/1.1\r\nHost: x.example\r\n\r\n",
        ] {
            match target(text) {
                Err(e) => assert_eq!(e.status(), 400, "{text:?}: {e}"),
                Ok(t) => panic!("{text:?} accepted as {t:?}"),
            }
        }
    }

    #[test]
    fn limits_give_414_and_431_before_the_head_is_complete() {
        let limits = Limits {
            request_line: 64,
            header_line: 64,
            head: 256,
            headers: 4,
        };
        let long_uri = format!("GET /{} HTTP/1.1\r\n", "a".repeat(100));
        assert_eq!(
            parse_request(long_uri.as_bytes(), &limits)
                .unwrap_err()
                .status(),
            414
        );
        let long_field = format!("GET / HTTP/1.1\r\nX: {}", "b".repeat(100));
        assert_eq!(
            parse_request(long_field.as_bytes(), &limits)
                .unwrap_err()
                .status(),
            431
        );
        let many = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\n\r\n";
        assert_eq!(
            parse_request(many.as_bytes(), &limits)
                .unwrap_err()
                .status(),
            431
        );
        let big: String = std::iter::once("GET / HTTP/1.1\r\n".to_string())
            .chain((0..10).map(|i| format!("X{i}: {}\r\n", "c".repeat(40))))
            .collect();
        assert_eq!(
            parse_request(big.as_bytes(), &limits).unwrap_err().status(),
            431
        );
    }

    #[test]
    fn a_trickled_response_head_is_parsed_once_it_may_have_ended() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Long: aaaaaaaa\r\n\r\nok";
        // Fed a byte at a time, as the read loop does: parsed at the first
        // byte, then only where an empty line may have come.
        let mut scanned = 0;
        let mut parses = Vec::new();
        for n in 1..=head.len() {
            if may_end_head(&head[..n], scanned, 1024) {
                parses.push(n);
                if parse_response(&head[..n], "GET", 1024).unwrap().is_some() {
                    break;
                }
            }
            scanned = n;
        }
        let end = head.len() - 2;
        assert_eq!(parses, [1, end - 1, end], "{parses:?}");
        // A bare LF ends a head too; and past the limit, the parser says
        // it is too large.
        assert!(may_end_head(b"HTTP/1.1 200 OK\nA: b\n\n", 20, 1024));
        assert!(!may_end_head(b"HTTP/1.1 200 OK\r\nA: b\r\n", 10, 1024));
        assert!(may_end_head(&[b'a'; 30], 29, 20));
    }

    #[test]
    fn response_framing() {
        let r = |t: &str, m: &str| parse_response(t.as_bytes(), m, 8192);
        let h = r("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "GET")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (200, Framing::Length(5), true)
        );
        let h = r("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        // Methods are case-sensitive: `head` is another method, whose
        // answer has the body its length says.
        let h = r("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "head")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        // A status under 100 has no class to relay it by.
        for status in ["000 Zero", "099 Low"] {
            let t = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            assert!(
                matches!(r(&t, "GET"), Err(ResponseError::Malformed)),
                "{status}"
            );
        }
        for status in ["204 No Content", "304 Not Modified", "100 Continue"] {
            let h = r(
                &format!("HTTP/1.1 {status}\r\nContent-Length: 5\r\n\r\n"),
                "GET",
            )
            .unwrap()
            .unwrap();
            assert_eq!(h.framing, Framing::Length(0), "{status}");
        }
        let h = r(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let h = r("HTTP/1.1 200 OK\r\n\r\n", "GET").unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        // A final coding that is not UTF-8 is not chunked, so chunked is
        // misplaced (502), as in `chunked, gzip`; it read as chunked here
        // while the client, given the value as it came, read to the close.
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, \xff\r\n\r\n",
                "GET",
                8192,
            ),
            Err(ResponseError::Framing("misplaced chunked"))
        ));
        let h = r("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", "GET")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        assert!(matches!(
            r(
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "GET"
            ),
            Err(ResponseError::Framing(_))
        ));
        assert!(matches!(
            r(
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "GET"
            ),
            Err(ResponseError::Framing(_))
        ));
        assert!(matches!(
            r("SSH-2.0-OpenSSH\r\n\r\n", "GET"),
            Err(ResponseError::Malformed)
        ));
        assert!(matches!(
            r(
                &format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(9000)),
                "GET"
            ),
            Err(ResponseError::TooLarge)
        ));
        assert!(r("HTTP/1.1 200 OK\r\nX: 1\r\n", "GET").unwrap().is_none());
    }

    #[test]
    fn a_read_buffer_gives_up_its_head_and_keeps_what_follows() {
        let limits = Limits::default();
        // The head is all a small buffer holds: taken whole, no copy.
        let mut buf = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let at = buf.as_ptr();
        let h = parse_request_in(&mut buf, &limits).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!((h.target(), h.host()), ("/a", Some("x")));
        assert_eq!(h.fields.raw.as_ptr(), at, "the head took the buffer");
        // A body and a pipelined request behind the head stay in the buffer.
        let mut buf =
            b"POST /b HTTP/1.1\r\nHost: y\r\nContent-Length: 2\r\n\r\nhiGET /c HTTP/1.1\r\n"
                .to_vec();
        let h = parse_request_in(&mut buf, &limits).unwrap().unwrap();
        assert_eq!((h.method(), h.framing), ("POST", Framing::Length(2)));
        assert_eq!(buf, b"hiGET /c HTTP/1.1\r\n");
        // Incomplete: nothing taken.
        let mut rest = buf.split_off(2);
        assert!(parse_request_in(&mut rest, &limits).unwrap().is_none());
        assert_eq!(rest, b"GET /c HTTP/1.1\r\n");
        // A large buffer (the kTLS path's 16 KiB reads) is not held by the
        // head: copied out, and the buffer left empty for reuse.
        let mut buf = Vec::with_capacity(16 << 10);
        buf.extend_from_slice(b"GET /d HTTP/1.1\r\nHost: z\r\n\r\n");
        let h = parse_request_in(&mut buf, &limits).unwrap().unwrap();
        assert!(buf.is_empty() && buf.capacity() == 16 << 10);
        assert_eq!(h.fields.raw.capacity(), h.len);
        assert_eq!(h.target(), "/d");
        // A refused head: the status, as from `parse_request`.
        let mut buf = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec();
        assert_eq!(
            parse_request_in(&mut buf, &limits).unwrap_err().status(),
            400
        );
    }

    #[test]
    fn every_field_keeps_its_place_in_requests_and_responses() {
        for n in [0, 1, 8, 40] {
            let mut text = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
            for i in 0..n {
                text.push_str(&format!("X-F{i}: v{i}\r\n"));
            }
            text.push_str("\r\n");
            let h = req(&text).unwrap().unwrap();
            assert_eq!(h.fields.iter().count(), n + 1);
            for i in 0..n {
                let want = format!("v{i}");
                assert_eq!(
                    h.values(&format!("x-f{i}")).collect::<Vec<_>>(),
                    [want.as_bytes()]
                );
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n{}\r\n",
                (0..n)
                    .map(|i| format!("Y-{i}: w{i}\r\n"))
                    .collect::<String>()
            );
            let r = parse_response(resp.as_bytes(), "GET", 8192)
                .unwrap()
                .unwrap();
            assert_eq!(r.fields.iter().count(), n + 1);
            assert_eq!(r.fields.values("y-0").next(), (n > 0).then_some(&b"w0"[..]));
        }
    }

    /// Feeds `input` a byte at a time as the connection's read loop does;
    /// returns the parse's outcome, how many bytes it took, and how many
    /// bytes the parses looked at in all.
    fn trickle(input: &[u8]) -> (Result<Option<RequestHead>, HeadError>, usize, usize) {
        let limits = Limits::default();
        let (mut buf, mut pacer, mut scanned) = (Vec::new(), HeadPacer::default(), 0);
        for (i, &b) in input.iter().enumerate() {
            buf.push(b);
            if pacer.ready(&mut buf) {
                scanned += buf.len();
                match parse_request_in(&mut buf, &limits) {
                    Ok(None) => {}
                    done => return (done, i + 1, scanned),
                }
            }
        }
        (Ok(None), input.len(), scanned)
    }

    #[test]
    fn a_trickled_head_is_parsed_a_bounded_number_of_times() {
        // Near the head limit: 30 KiB of fields, a byte per read. Parsing
        // after every byte scanned about 470 M bytes; paced, a few times
        // the head.
        let mut text = String::from("GET /p HTTP/1.1\r\nHost: a\r\n");
        for i in 0..60 {
            text.push_str(&format!("x-{i:02}: {}\r\n", "v".repeat(500)));
        }
        text.push_str("\r\n");
        let (head, took, scanned) = trickle(text.as_bytes());
        let head = head.unwrap().unwrap();
        assert_eq!((head.target(), took), ("/p", text.len()));
        assert!(
            scanned < 8 * text.len(),
            "{scanned} bytes scanned for {}",
            text.len()
        );
        // The end is seen however the last bytes split, a bare LF too.
        for end in ["\r\n\r\n", "\n\n", "\r\n\n"] {
            let text = format!("GET / HTTP/1.1\r\nHost: a{end}");
            let (head, took, _) = trickle(text.as_bytes());
            assert!(head.unwrap().is_some(), "{end:?}");
            assert_eq!(took, text.len());
        }
    }

    #[test]
    fn empty_lines_before_a_request_are_dropped_not_rescanned() {
        let text = format!("{}GET / HTTP/1.1\r\nHost: a\r\n\r\n", "\r\n".repeat(20_000));
        let (head, took, scanned) = trickle(text.as_bytes());
        assert!(head.unwrap().is_some());
        assert_eq!(took, text.len());
        assert!(scanned < 200, "{scanned}");
        // Given at once, too (a client's CRLF after a body, RFC 9112 §2.2).
        let mut buf = b"\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        assert!(HeadPacer::default().ready(&mut buf));
        assert!(parse_request_in(&mut buf, &Limits::default())
            .unwrap()
            .is_some());
        // A bare CR is not an empty line: the parser refuses it.
        for bare in [
            "\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "\r\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            let (refused, _, _) = trickle(bare.as_bytes());
            assert_eq!(refused.unwrap_err().status(), 400, "{bare:?}");
        }
    }

    #[test]
    fn limits_still_hold_for_a_trickled_head() {
        let limits = Limits::default();
        let late = |limit: usize| limit + (limit / 4).max(HeadPacer::RESCAN) + 1;
        // A request line that never ends: 414, at most a quarter late.
        let line = format!("GET /{}", "a".repeat(2 * limits.request_line));
        let (refused, took, _) = trickle(line.as_bytes());
        assert_eq!(refused.unwrap_err(), HeadError::UriTooLong);
        assert!(
            (limits.request_line..=late(limits.request_line)).contains(&took),
            "{took}"
        );
        // A head that never ends (fewer fields than their limit): 431,
        // at most a quarter late.
        let mut endless = String::from("GET / HTTP/1.1\r\n");
        while endless.len() < 2 * limits.head {
            endless.push_str(&format!("x: {}\r\n", "y".repeat(500)));
        }
        let (refused, took, _) = trickle(endless.as_bytes());
        assert_eq!(
            refused.unwrap_err(),
            HeadError::HeadersTooLarge("head over the limit")
        );
        assert!((limits.head..=late(limits.head)).contains(&took), "{took}");
    }
}
