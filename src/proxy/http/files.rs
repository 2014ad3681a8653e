//! Sans-IO core of the static-file route: a request target becomes a file
//! under a root ([`resolve`]), the method and the request's validators and
//! Range become what to answer ([`plan`]), and that answer becomes a
//! response head and the byte range of the file to send ([`response_head`],
//! [`body_range`]).
//!
//! No sockets and no clock. `resolve` asks the filesystem (canonicalize,
//! metadata) and nothing else; the caller opens the file, writes the head,
//! sends the body range and adds `Date` (RFC 9110 §6.6.1: only a sender
//! with a clock sends it) through `extra`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::head::Persist;

/// The file served for a directory target ending in `/`.
const INDEX: &str = "index.html";

/// The one dot-prefixed name that is served: RFC 8615 well-known URIs
/// (`security.txt`, ACME challenges, app-site associations) live under it.
const WELL_KNOWN: &[u8] = b".well-known";

/// Latest time an HTTP-date can carry: 9999-12-31T23:59:59Z (RFC 9110
/// §5.6.7 gives the year four digits).
const MAX_DATE_SECS: u64 = 253_402_300_799;

/// Why a target is not served, as the status code to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// 400: the target cannot name a file (not origin-form, a bad or
    /// encoded-separator percent-escape, NUL, a control byte, a backslash,
    /// a `.` or `..` segment).
    #[error("400 bad request: {0}")]
    BadPath(&'static str),
    /// 403: a dotfile, a path whose symlinks lead out of the root, or the
    /// filesystem refused access.
    #[error("403 forbidden: {0}")]
    Forbidden(&'static str),
    /// 404: nothing there (also a file named with a trailing slash, a
    /// directory without `index.html`, or something not a regular file).
    #[error("404 not found")]
    NotFound,
    /// 500: any other filesystem error.
    #[error("500 file system error: {0:?}")]
    Io(io::ErrorKind),
}

impl FileError {
    /// The status code to answer with.
    pub fn status(self) -> u16 {
        match self {
            FileError::BadPath(_) => 400,
            FileError::Forbidden(_) => 403,
            FileError::NotFound => 404,
            FileError::Io(_) => 500,
        }
    }
}

impl From<io::Error> for FileError {
    /// nginx's mapping of `open` errors: missing, a file used as a
    /// directory, a name too long and a symlink loop are 404; no access is
    /// 403; anything else is 500. The caller maps its own `open` with it.
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::NotFound => FileError::NotFound,
            io::ErrorKind::PermissionDenied => FileError::Forbidden("permission denied"),
            kind => match e.raw_os_error() {
                Some(libc::ENOTDIR | libc::ENAMETOOLONG | libc::ELOOP) => FileError::NotFound,
                _ => FileError::Io(kind),
            },
        }
    }
}

/// What a request target resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A regular file under the root.
    File {
        /// Canonical path (inside the root, no symlinks left in it).
        path: PathBuf,
        /// Size when resolved; the caller checks it again on the open file.
        len: u64,
        /// Modification time, the source of `Last-Modified` (RFC 9110 §8.8.2).
        modified: SystemTime,
        /// From the requested name's extension ([`content_type`]).
        content_type: &'static str,
    },
    /// A directory named without its trailing slash: answer 301 with this
    /// `Location` (a path-absolute reference, RFC 9110 §10.2.2), as nginx
    /// does, so that relative links in its index resolve inside it.
    Redirect(String),
}

/// Maps an origin-form request target (`/path?query`) to a file under
/// `root`, which must be canonical (absolute, no symlinks): the check that
/// a file lies inside it compares canonical paths.
///
/// The path is percent-decoded once. Refused before the filesystem is
/// asked: an encoded `/` or `\` (it would let one segment act as two), a
/// raw `\` (browsers read it as `/` in a `Location`), NUL, control bytes,
/// `.` and `..` segments (a client removes them before sending, RFC 3986
/// §5.2.4) and dotfiles (`.git`, `.env`, `.htpasswd`: like the common
/// nginx `location ~ /\. { deny all; }`), except `.well-known`. Empty
/// segments (`//`) are skipped. After canonicalizing, a path outside the
/// root (through a symlink) or through a dot-named entry is refused.
/// The query is ignored.
pub fn resolve(root: &Path, target: &str) -> Result<Resolved, FileError> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(FileError::BadPath("not origin-form"));
    }
    // httparse already refuses these in a request line; a target from
    // elsewhere must not put them into a `Location` either.
    if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(FileError::BadPath("control byte or space"));
    }
    if path.contains('\\') {
        return Err(FileError::BadPath("backslash"));
    }
    let decoded = percent_decode(path)?;
    let mut requested = root.to_path_buf();
    for segment in decoded.split(|&b| b == b'/').filter(|s| !s.is_empty()) {
        check_name(segment)?;
        requested.push(OsStr::from_bytes(segment));
    }
    let canonical = std::fs::canonicalize(&requested)?;
    // Refused before anything else is told (even a redirect would say the
    // outside directory exists).
    inside(root, &canonical)?;
    let meta = std::fs::metadata(&canonical)?;
    if meta.is_dir() {
        if !path.ends_with('/') {
            return Ok(Resolved::Redirect(location(path, query)));
        }
        // index.html may itself be a symlink out of the root.
        let index = std::fs::canonicalize(canonical.join(INDEX))?;
        inside(root, &index)?;
        let meta = std::fs::metadata(&index)?;
        return regular(index, meta, content_type(Path::new(INDEX)));
    }
    if path.ends_with('/') {
        // `/file.txt/`: open(2) gives ENOTDIR, nginx a 404.
        return Err(FileError::NotFound);
    }
    regular(canonical, meta, content_type(&requested))
}

/// A `Resolved::File` when `meta` is a regular file: a FIFO would block
/// the reader and a device is no document (nginx: 404).
fn regular(
    path: PathBuf,
    meta: std::fs::Metadata,
    content_type: &'static str,
) -> Result<Resolved, FileError> {
    if !meta.is_file() {
        return Err(FileError::NotFound);
    }
    Ok(Resolved::File {
        path,
        len: meta.len(),
        modified: meta.modified()?,
        content_type,
    })
}

/// Refuses a canonical path outside `root`, or one that reaches a dotfile
/// through a symlink inside it. `Path::starts_with` compares whole
/// components, so `/srv/www2` is not inside `/srv/www`.
fn inside(root: &Path, canonical: &Path) -> Result<(), FileError> {
    let rel = canonical
        .strip_prefix(root)
        .map_err(|_| FileError::Forbidden("outside the root"))?;
    for c in rel.components() {
        match c {
            Component::Normal(name) => check_name(name.as_bytes())?,
            _ => return Err(FileError::Forbidden("outside the root")),
        }
    }
    Ok(())
}

/// One decoded path segment: no dot segments, no dotfiles but `.well-known`.
fn check_name(name: &[u8]) -> Result<(), FileError> {
    if name == b"." || name == b".." {
        return Err(FileError::BadPath("dot segment"));
    }
    if name.starts_with(b".") && name != WELL_KNOWN {
        return Err(FileError::Forbidden("dotfile"));
    }
    Ok(())
}

/// Percent-decodes a path once (RFC 3986 §2.1). A `%` not followed by two
/// hex digits is refused rather than kept, so no two readings of the
/// target can differ; so are `%2F`, `%5C`, `%00` and the other control
/// bytes.
fn percent_decode(path: &str) -> Result<Vec<u8>, FileError> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let byte = match bytes.get(i + 1..i + 3) {
            Some(&[hi, lo]) => match (hex(hi), hex(lo)) {
                (Some(hi), Some(lo)) => (hi << 4) | lo,
                _ => return Err(FileError::BadPath("bad percent-escape")),
            },
            _ => return Err(FileError::BadPath("bad percent-escape")),
        };
        match byte {
            b'/' | b'\\' => return Err(FileError::BadPath("encoded path separator")),
            0 => return Err(FileError::BadPath("NUL")),
            // Refused encoded as they are raw: a file name with a line
            // break or an escape sequence is no web page's, and would
            // reach the logs that name the path.
            b if b < 0x20 || b == 0x7f => return Err(FileError::BadPath("encoded control byte")),
            _ => out.push(byte),
        }
        i += 3;
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The redirect target for a directory: the path as sent plus `/`, then
/// the query. Runs of `/` collapse to one: `//evil.example` must not
/// become a network-path reference to another host (RFC 3986 §4.2).
/// Non-ASCII bytes are percent-encoded (a field value is ASCII).
fn location(path: &str, query: Option<&str>) -> String {
    let mut out = String::with_capacity(path.len() + 2 + query.map_or(0, str::len));
    let mut push = |s: &str, collapse: bool| {
        for b in s.bytes() {
            if collapse && b == b'/' && out.ends_with('/') {
                continue;
            }
            if b.is_ascii() {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    };
    push(path, true);
    push("/", true);
    if let Some(q) = query {
        push("?", false);
        push(q, false);
    }
    out
}

/// The media type for a file name's extension (case-insensitive), or
/// `application/octet-stream`. Text types say UTF-8 so that a browser does
/// not guess the charset.
pub fn content_type(path: &Path) -> &'static str {
    const OCTET: &str = "application/octet-stream";
    const TABLE: &[(&str, &str)] = &[
        ("html", "text/html; charset=utf-8"),
        ("htm", "text/html; charset=utf-8"),
        ("css", "text/css; charset=utf-8"),
        // RFC 9239: text/javascript is the one JavaScript type.
        ("js", "text/javascript; charset=utf-8"),
        ("mjs", "text/javascript; charset=utf-8"),
        // RFC 8259 §11: application/json defines no charset parameter.
        ("json", "application/json"),
        ("txt", "text/plain; charset=utf-8"),
        ("svg", "image/svg+xml"),
        ("png", "image/png"),
        ("jpg", "image/jpeg"),
        ("jpeg", "image/jpeg"),
        ("gif", "image/gif"),
        ("webp", "image/webp"),
        ("ico", "image/x-icon"),
        ("wasm", "application/wasm"),
        ("pdf", "application/pdf"),
        // RFC 7303: the XML declaration carries the encoding.
        ("xml", "application/xml"),
        ("woff2", "font/woff2"),
        ("mp4", "video/mp4"),
    ];
    let Some(ext) = path.extension().and_then(OsStr::to_str) else {
        return OCTET;
    };
    TABLE
        .iter()
        .find(|(e, _)| ext.eq_ignore_ascii_case(e))
        .map_or(OCTET, |&(_, t)| t)
}

/// What to answer a request for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// 200 with the whole file.
    Full,
    /// 206 with bytes `start..=end_inclusive` (both inside the file).
    Partial {
        /// First byte sent.
        start: u64,
        /// Last byte sent.
        end_inclusive: u64,
    },
    /// 304: the client's copy is current (RFC 9110 §13.1.3).
    NotModified,
    /// 416 with `Content-Range: bytes */len` (RFC 9110 §15.5.17).
    Unsatisfiable,
    /// 405 with `Allow: GET, HEAD`: a file takes no other method.
    MethodNotAllowed,
    /// 412: an `If-Match` or `If-Unmodified-Since` that does not hold
    /// (RFC 9110 §13.2.2 steps 1 and 2): the client's copy is not this
    /// file (a resumed download whose file changed must not get a range of
    /// the new one).
    PreconditionFailed,
}

/// RFC 9110 §13.2.2 steps 1 and 2, for a file that exists: `If-Match`
/// (`Some(lists *)`) holds only for `*`, as ktern makes no ETags and so
/// no entity tag can match (§13.1.1); without it, `If-Unmodified-Since`
/// holds when the file is not newer than the date (an invalid date is
/// ignored, §13.1.4). Seconds, as for the other dates here.
pub fn preconditions_hold(
    if_match: Option<bool>,
    if_unmodified_since: Option<&[u8]>,
    modified: SystemTime,
) -> bool {
    match if_match {
        Some(any) => any,
        None => if_unmodified_since
            .and_then(parse_date)
            .is_none_or(|since| date_secs(modified) <= since),
    }
}

/// Whether `modified`, as a Last-Modified date, is strong at `now`
/// (RFC 9110 §8.8.2.2): at least a second in the past, so no change
/// within the same second can hide behind it. A weak date makes an
/// `If-Range` false (§13.1.5): the whole file is sent.
pub fn strong_date(modified: SystemTime, now: SystemTime) -> bool {
    date_secs(modified) < date_secs(now)
}

/// Whether an `If-None-Match` or `If-Match` (its field lines) lists `*`,
/// which matches any file that exists (RFC 9110 §13.1.1, §13.1.2): an
/// If-None-Match is then false (304), an If-Match true. ktern makes no
/// ETags, so no other member can match.
pub fn lists_any<'a>(values: impl Iterator<Item = &'a [u8]>) -> bool {
    values
        .flat_map(super::head::list_tokens)
        .any(|member| member == "*")
}

/// Decides the answer to `method` for a file of `len` bytes last modified
/// at `modified`, given the request's `If-Modified-Since`, `Range` and
/// `If-Range` values (each `Some` only when the field came exactly once).
///
/// RFC 9110 §13.2.2 order: If-Modified-Since (GET and HEAD only), then
/// If-Range and Range (GET only). No ETag is made, so the caller passes
/// no If-Modified-Since when If-None-Match is present (§13.1.3: it is
/// then ignored). Dates compare at one-second resolution, the resolution
/// of the `Last-Modified` sent (§8.8.2).
pub fn plan(
    method: &str,
    if_modified_since: Option<&[u8]>,
    range: Option<&[u8]>,
    if_range: Option<&[u8]>,
    len: u64,
    modified: SystemTime,
) -> Plan {
    // Methods are case-sensitive (RFC 9110 §9.1).
    let get = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return Plan::MethodNotAllowed,
    };
    let modified = date_secs(modified);
    // 304 only for the date this file was sent with (nginx's default,
    // `if_modified_since exact`). §13.1.3 allows "not newer than the
    // date", but with no ETag nothing else would catch a file replaced by
    // an older one (a rollback, a deploy by `rsync -t`, `cp -p` or a
    // tarball keeps the old mtimes): clients kept the newer version. An
    // invalid date is ignored.
    if let Some(since) = if_modified_since.and_then(parse_date) {
        if modified == since {
            return Plan::NotModified;
        }
    }
    // §14.2: range handling is defined for GET only.
    let Some(range) = range.filter(|_| get) else {
        return Plan::Full;
    };
    // §13.1.5: with no ETag, If-Range holds only for a date equal to
    // Last-Modified; an entity tag or anything else sends the whole file.
    // (Whether that date is strong, §8.8.2.2, needs a clock: the caller
    // passes no Range when it is not, [`strong_date`].)
    if let Some(v) = if_range {
        if parse_date(v) != Some(modified) {
            return Plan::Full;
        }
    }
    match parse_range(range, len) {
        RangeSpec::Ignore => Plan::Full,
        RangeSpec::Unsatisfiable => Plan::Unsatisfiable,
        RangeSpec::Bytes(start, end_inclusive) => Plan::Partial {
            start,
            end_inclusive,
        },
    }
}

/// A `Range` value read against a length.
#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// Serve the whole file: invalid syntax, another unit, or more than one
    /// range (§14.2 lets a server ignore Range; one body stays simple and
    /// no overlapping-ranges request can multiply the work).
    Ignore,
    /// Valid, but no byte of the file in it (§14.1.2).
    Unsatisfiable,
    /// First and last byte, clamped to the file.
    Bytes(u64, u64),
}

/// RFC 9110 §14.1.1 `ranges-specifier` with exactly one `range-spec`.
fn parse_range(value: &[u8], len: u64) -> RangeSpec {
    let Ok(value) = std::str::from_utf8(value) else {
        return RangeSpec::Ignore;
    };
    let Some((unit, set)) = value.trim_matches(is_ows).split_once('=') else {
        return RangeSpec::Ignore;
    };
    // §14.1: range units compare case-insensitively.
    if !unit.eq_ignore_ascii_case("bytes") {
        return RangeSpec::Ignore;
    }
    // §5.6.1: empty list elements are accepted and not counted.
    let mut specs = set
        .split(',')
        .map(|s| s.trim_matches(is_ows))
        .filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return RangeSpec::Ignore;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return RangeSpec::Ignore;
    };
    if first.is_empty() {
        // suffix-range: the last `n` bytes, all of them if the file is
        // shorter; §14.1.2: a zero suffix-length is unsatisfiable. A
        // non-zero one is satisfiable even for an empty file, whose whole
        // (empty) body no 206 can describe: the 200 with it, which a
        // player or download tool probing with a suffix range takes, where
        // a 416 failed them (nginx answers 200 too).
        return match digits(last) {
            None => RangeSpec::Ignore,
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if len == 0 => RangeSpec::Ignore,
            Some(n) => RangeSpec::Bytes(len.saturating_sub(n), len - 1),
        };
    }
    let Some(start) = digits(first) else {
        return RangeSpec::Ignore;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match digits(last) {
            // §14.1.1: last-pos below first-pos makes the spec invalid.
            Some(end) if end >= start => end,
            _ => return RangeSpec::Ignore,
        }
    };
    // §14.1.2: satisfiable when first-pos is inside the file; a last-pos
    // past the end (or none) means "to the end".
    if start >= len {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Bytes(start, end.min(len - 1))
}

/// `1*DIGIT`; a number past u64 saturates, which keeps its meaning (past
/// any file's end).
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// An HTTP-date in any of its three forms (RFC 9110 §5.6.7: a recipient
/// must accept all three) as seconds since the epoch; `None` if invalid.
fn parse_date(value: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(value).ok()?.trim_matches(is_ows);
    let t = httpdate::parse_http_date(s).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// A modification time as whole seconds, clamped to what an HTTP-date can
/// say: files dated before 1970 (or past 9999) exist, and httpdate panics
/// on them.
fn date_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .min(MAX_DATE_SECS)
}

/// IMF-fixdate (RFC 9110 §5.6.7) of a modification time, clamped as
/// [`date_secs`] does.
fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(date_secs(t)))
}

/// The HTTP/1.1 response head for `plan` on a file of `len` bytes, ending
/// with the blank line.
///
/// 200 and 206 carry the body's `content-length`, the type,
/// `last-modified` (RFC 9110 §8.8.2) and `accept-ranges: bytes` (§14.3);
/// 206 adds `content-range: bytes a-b/len` (§14.4). 304 carries only
/// `last-modified` (§15.4.5: no representation metadata but what guides a
/// cache update; there is no ETag). 416 carries `content-range: bytes
/// */len` (§15.5.17) and 405 `allow: GET, HEAD` (§15.5.6), both with an
/// empty body. A HEAD request gets the same head as GET (§9.3.2).
///
/// `extra` fields (e.g. `Strict-Transport-Security`, and `Date`, which
/// needs the caller's clock) follow; one whose name or value could break
/// the head (CR, LF, NUL, `:` or space in the name) is dropped. No clock
/// here also means no clamping of a future `modified` to now (§8.8.2.1):
/// that too is the caller's.
pub fn response_head(
    plan: &Plan,
    len: u64,
    modified: SystemTime,
    content_type: &str,
    persist: Persist,
    extra: &[(&str, &[u8])],
) -> Vec<u8> {
    let status = match plan {
        Plan::Full => "200 OK",
        Plan::Partial { .. } => "206 Partial Content",
        Plan::NotModified => "304 Not Modified",
        Plan::Unsatisfiable => "416 Range Not Satisfiable",
        Plan::MethodNotAllowed => "405 Method Not Allowed",
        Plan::PreconditionFailed => "412 Precondition Failed",
    };
    let mut out = format!("HTTP/1.1 {status}\r\n").into_bytes();
    let last_modified = http_date(modified);
    match *plan {
        Plan::Full => {
            push_field(&mut out, "content-type", content_type.as_bytes());
            push_field(&mut out, "content-length", len.to_string().as_bytes());
            push_field(&mut out, "last-modified", last_modified.as_bytes());
            push_field(&mut out, "accept-ranges", b"bytes");
        }
        Plan::Partial {
            start,
            end_inclusive,
        } => {
            debug_assert!(start <= end_inclusive && end_inclusive < len);
            let count = end_inclusive - start + 1;
            push_field(&mut out, "content-type", content_type.as_bytes());
            push_field(&mut out, "content-length", count.to_string().as_bytes());
            let range = format!("bytes {start}-{end_inclusive}/{len}");
            push_field(&mut out, "content-range", range.as_bytes());
            push_field(&mut out, "last-modified", last_modified.as_bytes());
            push_field(&mut out, "accept-ranges", b"bytes");
        }
        Plan::NotModified => {
            push_field(&mut out, "last-modified", last_modified.as_bytes());
        }
        Plan::Unsatisfiable => {
            push_field(
                &mut out,
                "content-range",
                format!("bytes */{len}").as_bytes(),
            );
            push_field(&mut out, "content-length", b"0");
            push_field(&mut out, "accept-ranges", b"bytes");
        }
        Plan::MethodNotAllowed => {
            push_field(&mut out, "allow", b"GET, HEAD");
            push_field(&mut out, "content-length", b"0");
        }
        Plan::PreconditionFailed => {
            push_field(&mut out, "content-length", b"0");
        }
    }
    for &(name, value) in extra {
        let bad_name = name.is_empty() || name.bytes().any(|b| b <= b' ' || b == b':' || b == 0x7f);
        let bad_value = value.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0));
        if !bad_name && !bad_value {
            push_field(&mut out, name, value);
        }
    }
    if let Some(v) = persist.field() {
        push_field(&mut out, "connection", v);
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The part of the file to send after the head, as (offset, count):
/// the whole file for 200, the range for 206, `None` for bodiless
/// answers (304, 416, 405). A HEAD request sends no body whatever this
/// says (RFC 9110 §9.3.2); this function does not know the method.
pub fn body_range(plan: &Plan, len: u64) -> Option<(u64, u64)> {
    match *plan {
        Plan::Full => Some((0, len)),
        Plan::Partial {
            start,
            end_inclusive,
        } => Some((start, end_inclusive - start + 1)),
        Plan::NotModified
        | Plan::Unsatisfiable
        | Plan::MethodNotAllowed
        | Plan::PreconditionFailed => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::http::body::Framing;
    use crate::proxy::http::head::parse_response;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory under the system temp dir, removed on drop; unique per
    /// process and per call (tests run on several threads).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("ktern-files-{}-{tag}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            // temp_dir() may itself sit behind a symlink; the root must be
            // canonical, as the caller guarantees.
            Scratch(std::fs::canonicalize(dir).unwrap())
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write(path: &Path, body: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }

    /// base/www is the root; base/www-evil and base/outside lie beside it.
    fn site(tag: &str) -> (Scratch, PathBuf) {
        let base = Scratch::new(tag);
        let root = base.0.join("www");
        let out = base.0.join("outside");
        write(&root.join("index.html"), "home");
        write(&root.join("a.txt"), "hello");
        write(&root.join("sub/index.html"), "sub");
        write(&root.join("sub/page.css"), "p {}");
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::create_dir_all(root.join("evil.example")).unwrap();
        write(&root.join(".git/config"), "secret");
        write(&root.join(".well-known/security.txt"), "Contact: x");
        write(&root.join("%2e%2e/x"), "literal");
        write(&out.join("secret.txt"), "secret");
        write(&base.0.join("www-evil/secret.txt"), "secret");
        symlink(root.join("a.txt"), root.join("link-in.txt")).unwrap();
        symlink("sub", root.join("link-dir-in")).unwrap();
        symlink(out.join("secret.txt"), root.join("link-out.txt")).unwrap();
        symlink("../outside", root.join("link-out-dir")).unwrap();
        symlink("../www-evil/secret.txt", root.join("link-prefix.txt")).unwrap();
        symlink(".git/config", root.join("link-dot")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        std::fs::create_dir_all(root.join("sub2")).unwrap();
        symlink(out.join("secret.txt"), root.join("sub2/index.html")).unwrap();
        (base, root)
    }

    fn file_path(r: Result<Resolved, FileError>) -> PathBuf {
        match r {
            Ok(Resolved::File { path, .. }) => path,
            other => panic!("not a file: {other:?}"),
        }
    }

    #[test]
    fn traversal_and_bad_paths_are_refused() {
        let (_base, root) = site("bad");
        let cases = [
            "/../etc/passwd",
            "/../outside/secret.txt",
            "/a/%2e%2e/b",
            "/%2e%2e/",
            "/%2E%2E/outside/secret.txt",
            "/sub/..",
            "/./a.txt",
            "/%2e/a.txt",
            "/a%2Fb",
            "/a%2fb",
            "/..%2f..%2fetc/passwd",
            "/a%5Cb",
            "/a%5cb",
            "/a\\b",
            "/..\\..\\etc/passwd",
            "/a%00b",
            "/a.txt%00.html",
            "/a%0ab",
            "/a%0D%0Ab",
            "/a%1bb",
            "/a%7fb",
            "/a%zz",
            "/a%4",
            "/a%",
            "/a b",
            "/a\r\nx",
            "a.txt",
            "",
            "*",
            "?/a.txt",
            "http://h/a.txt",
        ];
        for target in cases {
            match resolve(&root, target) {
                Err(FileError::BadPath(_)) => {}
                other => panic!("{target:?}: {other:?}"),
            }
        }
        // Decoded once: `%252e%252e` names a file literally called `%2e%2e`.
        let p = file_path(resolve(&root, "/%252e%252e/x"));
        assert_eq!(p, root.join("%2e%2e/x"));
    }

    #[test]
    fn dotfiles_are_forbidden_but_well_known_is_served() {
        let (_base, root) = site("dot");
        for target in [
            "/.git/config",
            "/%2egit/config",
            "/.env",
            "/sub/.htpasswd",
            "/link-dot",
        ] {
            assert_eq!(
                resolve(&root, target),
                Err(FileError::Forbidden("dotfile")),
                "{target}"
            );
        }
        let p = file_path(resolve(&root, "/.well-known/security.txt"));
        assert_eq!(p, root.join(".well-known/security.txt"));
    }

    #[test]
    fn symlinks_out_of_the_root_are_forbidden() {
        let (_base, root) = site("out");
        for target in [
            "/link-out.txt",
            "/link-out-dir/secret.txt",
            "/link-out-dir/",
            // Not even a redirect: it would say the directory exists.
            "/link-out-dir",
            // /www-evil shares a prefix with /www, not a component.
            "/link-prefix.txt",
            // The index of a directory inside, pointing outside.
            "/sub2/",
        ] {
            assert_eq!(
                resolve(&root, target),
                Err(FileError::Forbidden("outside the root")),
                "{target}"
            );
        }
    }

    #[test]
    fn symlinks_inside_the_root_are_served() {
        let (_base, root) = site("in");
        match resolve(&root, "/link-in.txt").unwrap() {
            Resolved::File {
                path,
                len,
                content_type,
                ..
            } => {
                assert_eq!(path, root.join("a.txt"));
                assert_eq!(len, 5);
                assert_eq!(content_type, "text/plain; charset=utf-8");
            }
            other => panic!("{other:?}"),
        }
        let p = file_path(resolve(&root, "/link-dir-in/page.css"));
        assert_eq!(p, root.join("sub/page.css"));
        let p = file_path(resolve(&root, "/link-dir-in/"));
        assert_eq!(p, root.join("sub/index.html"));
    }

    #[test]
    fn files_carry_metadata_and_type() {
        let (_base, root) = site("meta");
        let meta = std::fs::metadata(root.join("sub/page.css")).unwrap();
        assert_eq!(
            resolve(&root, "/sub/page.css").unwrap(),
            Resolved::File {
                path: root.join("sub/page.css"),
                len: 4,
                modified: meta.modified().unwrap(),
                content_type: "text/css; charset=utf-8",
            }
        );
        // Percent-decoded names and empty segments.
        let p = file_path(resolve(&root, "/%61.txt"));
        assert_eq!(p, root.join("a.txt"));
        let p = file_path(resolve(&root, "//sub//page.css"));
        assert_eq!(p, root.join("sub/page.css"));
    }

    #[test]
    fn directories_serve_index_html() {
        let (_base, root) = site("index");
        match resolve(&root, "/").unwrap() {
            Resolved::File {
                path, content_type, ..
            } => {
                assert_eq!(path, root.join("index.html"));
                assert_eq!(content_type, "text/html; charset=utf-8");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            file_path(resolve(&root, "/sub/")),
            root.join("sub/index.html")
        );
        assert_eq!(file_path(resolve(&root, "/?x=1")), root.join("index.html"));
        assert_eq!(resolve(&root, "/empty/"), Err(FileError::NotFound));
    }

    #[test]
    fn directories_without_slash_redirect() {
        let (_base, root) = site("redir");
        let cases = [
            ("/sub", "/sub/"),
            ("/sub?x=1&y=2", "/sub/?x=1&y=2"),
            ("/empty", "/empty/"),
            ("/%73ub", "/%73ub/"),
            // Never a network-path reference to another host.
            ("//evil.example", "/evil.example/"),
            ("///evil.example?a", "/evil.example/?a"),
        ];
        for (target, loc) in cases {
            assert_eq!(
                resolve(&root, target),
                Ok(Resolved::Redirect(loc.to_string())),
                "{target}"
            );
        }
    }

    #[test]
    fn queries_are_ignored() {
        let (_base, root) = site("query");
        for target in [
            "/a.txt?",
            "/a.txt?x=1",
            "/a.txt?p=/../../etc/passwd",
            "/a.txt?%00",
        ] {
            assert_eq!(
                file_path(resolve(&root, target)),
                root.join("a.txt"),
                "{target}"
            );
        }
    }

    #[test]
    fn missing_things_are_not_found() {
        let (_base, root) = site("missing");
        let long = format!("/{}", "n".repeat(300));
        for target in [
            "/missing",
            "/missing/",
            "/sub/missing.css",
            "/a.txt/",
            "/a.txt/x",
            "/loop",
            long.as_str(),
        ] {
            assert_eq!(resolve(&root, target), Err(FileError::NotFound), "{target}");
        }
    }

    #[test]
    fn error_statuses_and_io_mapping() {
        assert_eq!(FileError::BadPath("x").status(), 400);
        assert_eq!(FileError::Forbidden("x").status(), 403);
        assert_eq!(FileError::NotFound.status(), 404);
        assert_eq!(FileError::Io(io::ErrorKind::Other).status(), 500);
        let map = |e: io::Error| FileError::from(e);
        assert_eq!(map(io::ErrorKind::NotFound.into()), FileError::NotFound);
        assert_eq!(
            map(io::Error::from_raw_os_error(libc::EACCES)),
            FileError::Forbidden("permission denied")
        );
        assert_eq!(
            map(io::Error::from_raw_os_error(libc::ENOTDIR)),
            FileError::NotFound
        );
        assert_eq!(
            map(io::Error::from_raw_os_error(libc::ENAMETOOLONG)),
            FileError::NotFound
        );
        assert_eq!(map(io::Error::from_raw_os_error(libc::EIO)).status(), 500);
    }

    #[test]
    fn content_types() {
        let cases = [
            ("a.html", "text/html; charset=utf-8"),
            ("a.HTM", "text/html; charset=utf-8"),
            ("a.css", "text/css; charset=utf-8"),
            ("a.js", "text/javascript; charset=utf-8"),
            ("a.json", "application/json"),
            ("a.txt", "text/plain; charset=utf-8"),
            ("a.svg", "image/svg+xml"),
            ("a.png", "image/png"),
            ("a.jpg", "image/jpeg"),
            ("a.JPEG", "image/jpeg"),
            ("a.gif", "image/gif"),
            ("a.webp", "image/webp"),
            ("favicon.ico", "image/x-icon"),
            ("a.wasm", "application/wasm"),
            ("a.pdf", "application/pdf"),
            ("a.xml", "application/xml"),
            ("a.woff2", "font/woff2"),
            ("a.mp4", "video/mp4"),
            ("a.tar.gz", "application/octet-stream"),
            ("Makefile", "application/octet-stream"),
            (".html", "application/octet-stream"),
            ("dir.html/file", "application/octet-stream"),
        ];
        for (name, ty) in cases {
            assert_eq!(content_type(Path::new(name)), ty, "{name}");
        }
    }

    /// Sun, 06 Nov 1994 08:49:37 GMT, plus half a second the dates cannot say.
    fn mtime() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(784_111_777_500)
    }

    const DATE: &[u8] = b"Sun, 06 Nov 1994 08:49:37 GMT";

    fn get(range: &str) -> Plan {
        plan("GET", None, Some(range.as_bytes()), None, 100, mtime())
    }

    #[test]
    fn methods() {
        let p = |m: &str| plan(m, None, None, None, 100, mtime());
        assert_eq!(p("GET"), Plan::Full);
        assert_eq!(p("HEAD"), Plan::Full);
        for m in ["POST", "PUT", "DELETE", "OPTIONS", "get", "head", ""] {
            assert_eq!(p(m), Plan::MethodNotAllowed, "{m}");
        }
        // Validators and ranges do not change a 405.
        assert_eq!(
            plan("POST", Some(DATE), Some(b"bytes=0-0"), None, 100, mtime()),
            Plan::MethodNotAllowed
        );
    }

    #[test]
    fn if_none_match_star_matches_any_file() {
        let any = |v: &[&[u8]]| lists_any(v.iter().copied());
        assert!(any(&[b"*"]));
        assert!(any(&[b" * "]));
        assert!(any(&[b"\"x\"", b"*"]));
        assert!(any(&[b"\"x\", *"]));
        assert!(!any(&[b"\"x\""]));
        assert!(!any(&[b"W/\"*\""]));
        assert!(!any(&[b"\"*\""]));
        assert!(!any(&[]));
    }

    #[test]
    fn if_match_and_if_unmodified_since() {
        let hold = |m: Option<bool>, ius: Option<&[u8]>| preconditions_hold(m, ius, mtime());
        // If-Match: only `*` matches a file without an ETag; it wins over
        // If-Unmodified-Since (RFC 9110 §13.2.2).
        assert!(hold(Some(true), None));
        assert!(!hold(Some(false), None));
        assert!(!hold(Some(false), Some(DATE)));
        assert!(hold(Some(true), Some(b"Thu, 01 Jan 1970 00:00:00 GMT")));
        // If-Unmodified-Since: holds unless the file is newer.
        assert!(hold(None, Some(DATE)));
        assert!(hold(None, Some(b"Sun, 01 Jan 2090 00:00:00 GMT")));
        assert!(!hold(None, Some(b"Thu, 01 Jan 1970 00:00:00 GMT")));
        // An invalid date is ignored (§13.1.4), as is no field.
        assert!(hold(None, Some(b"yesterday")));
        assert!(hold(None, None));
    }

    #[test]
    fn a_last_modified_in_the_current_second_is_weak() {
        let m = mtime();
        assert!(!strong_date(m, m));
        assert!(!strong_date(m, m + Duration::from_millis(999) - subsec(m)));
        assert!(strong_date(m, m + Duration::from_secs(1)));
        // A file dated in the future (a clock set back) is weak too.
        assert!(!strong_date(m + Duration::from_secs(60), m));
    }

    /// The fraction of a second in `t`.
    fn subsec(t: SystemTime) -> Duration {
        Duration::from_nanos(t.duration_since(UNIX_EPOCH).unwrap().subsec_nanos().into())
    }

    #[test]
    fn if_modified_since() {
        let ims = |v: &[u8], m: &str| plan(m, Some(v), None, None, 100, mtime());
        // Equal at one-second resolution: not modified.
        assert_eq!(ims(DATE, "GET"), Plan::NotModified);
        assert_eq!(ims(DATE, "HEAD"), Plan::NotModified);
        // A later date: the client holds another version (the file was
        // rolled back to an older one), so it gets this one.
        assert_eq!(ims(b"Sun, 06 Nov 1994 08:49:38 GMT", "GET"), Plan::Full);
        assert_eq!(ims(b"Mon, 01 Jan 2024 00:00:00 GMT", "GET"), Plan::Full);
        assert_eq!(
            ims(b"  Sun, 06 Nov 1994 08:49:37 GMT\t", "GET"),
            Plan::NotModified
        );
        // The obsolete forms are accepted (RFC 9110 §5.6.7).
        assert_eq!(
            ims(b"Sunday, 06-Nov-94 08:49:37 GMT", "GET"),
            Plan::NotModified
        );
        assert_eq!(ims(b"Sun Nov  6 08:49:37 1994", "GET"), Plan::NotModified);
        // Older: modified since.
        assert_eq!(ims(b"Sun, 06 Nov 1994 08:49:36 GMT", "GET"), Plan::Full);
        assert_eq!(ims(b"Thu, 01 Jan 1970 00:00:00 GMT", "GET"), Plan::Full);
        // Invalid: ignored.
        for bad in [
            &b"garbage"[..],
            b"",
            b"Mon, 06 Nov 1994 08:49:37 GMT",
            b"Sun, 06 Nov 1994 08:49:37 UTC",
            b"Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT",
            b"784111777",
            b"Sun, 06 Nov 1994 08:49:37 GMT\xff",
        ] {
            assert_eq!(ims(bad, "GET"), Plan::Full, "{bad:?}");
        }
        // Not modified wins over Range (RFC 9110 §13.2.2).
        assert_eq!(
            plan("GET", Some(DATE), Some(b"bytes=0-0"), None, 100, mtime()),
            Plan::NotModified
        );
        // A file dated before 1970 compares as the epoch, without a panic.
        let old = UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(
            plan(
                "GET",
                Some(b"Thu, 01 Jan 1970 00:00:00 GMT"),
                None,
                None,
                1,
                old
            ),
            Plan::NotModified
        );
    }

    #[test]
    fn ranges() {
        let part = |start, end_inclusive| Plan::Partial {
            start,
            end_inclusive,
        };
        let cases = [
            ("bytes=0-0", part(0, 0)),
            ("bytes=0-", part(0, 99)),
            ("bytes=-5", part(95, 99)),
            ("bytes=-100", part(0, 99)),
            ("bytes=-500", part(0, 99)),
            ("bytes=10-19", part(10, 19)),
            ("bytes=99-99", part(99, 99)),
            ("bytes=99-", part(99, 99)),
            ("bytes=0-99999", part(0, 99)),
            ("bytes=0-99999999999999999999999", part(0, 99)),
            ("BYTES=1-2", part(1, 2)),
            (" bytes=1-2 ", part(1, 2)),
            ("bytes= 1-2 ,", part(1, 2)),
            ("bytes=,1-2", part(1, 2)),
            // Unsatisfiable (RFC 9110 §14.1.2).
            ("bytes=-0", Plan::Unsatisfiable),
            ("bytes=100-", Plan::Unsatisfiable),
            ("bytes=100-200", Plan::Unsatisfiable),
            ("bytes=99999999999999999999999-", Plan::Unsatisfiable),
            // Invalid or not handled: the whole file.
            ("bytes=5-2", Plan::Full),
            ("bytes=0-1,5-6", Plan::Full),
            ("bytes=0-0,-1", Plan::Full),
            ("bytes=200-300,400-500", Plan::Full),
            ("items=0-1", Plan::Full),
            ("bytes = 0-1", Plan::Full),
            ("bytes=", Plan::Full),
            ("bytes=,", Plan::Full),
            ("bytes=-", Plan::Full),
            ("bytes=abc", Plan::Full),
            ("bytes=1", Plan::Full),
            ("bytes=1-2-3", Plan::Full),
            ("bytes=+1-2", Plan::Full),
            ("bytes=1-+2", Plan::Full),
            ("bytes=--1", Plan::Full),
            ("bytes=0x1-2", Plan::Full),
            ("bytes=1 -2", Plan::Full),
            ("bytes", Plan::Full),
            ("", Plan::Full),
        ];
        for (range, want) in cases {
            assert_eq!(get(range), want, "{range:?}");
        }
        assert_eq!(
            plan("GET", None, Some(b"bytes=\xff-1"), None, 100, mtime()),
            Plan::Full
        );
    }

    #[test]
    fn ranges_of_an_empty_file() {
        let p = |r: &[u8]| plan("GET", None, Some(r), None, 0, mtime());
        assert_eq!(p(b"bytes=0-"), Plan::Unsatisfiable);
        assert_eq!(p(b"bytes=0-0"), Plan::Unsatisfiable);
        assert_eq!(p(b"bytes=-5"), Plan::Full);
        assert_eq!(p(b"bytes=-0"), Plan::Unsatisfiable);
        assert_eq!(plan("GET", None, None, None, 0, mtime()), Plan::Full);
    }

    #[test]
    fn head_ignores_range() {
        assert_eq!(
            plan("HEAD", None, Some(b"bytes=0-0"), None, 100, mtime()),
            Plan::Full
        );
        assert_eq!(
            plan("HEAD", None, Some(b"bytes=500-"), None, 100, mtime()),
            Plan::Full
        );
    }

    #[test]
    fn if_range() {
        let p = |if_range: &[u8], range: &[u8]| {
            plan("GET", None, Some(range), Some(if_range), 100, mtime())
        };
        let part = Plan::Partial {
            start: 0,
            end_inclusive: 9,
        };
        assert_eq!(p(DATE, b"bytes=0-9"), part);
        assert_eq!(p(b"Sun Nov  6 08:49:37 1994", b"bytes=0-9"), part);
        assert_eq!(p(DATE, b"bytes=100-"), Plan::Unsatisfiable);
        // Another date, earlier or later, an entity tag or garbage: the
        // whole file.
        for v in [
            &b"Sun, 06 Nov 1994 08:49:36 GMT"[..],
            b"Sun, 06 Nov 1994 08:49:38 GMT",
            b"\"abc\"",
            b"W/\"abc\"",
            b"garbage",
            b"",
        ] {
            assert_eq!(p(v, b"bytes=0-9"), Plan::Full, "{v:?}");
            assert_eq!(p(v, b"bytes=100-"), Plan::Full, "{v:?}");
        }
        // Without Range, If-Range is ignored (§13.1.5).
        assert_eq!(
            plan("GET", None, None, Some(b"\"abc\""), 100, mtime()),
            Plan::Full
        );
    }

    fn text(head: Vec<u8>) -> String {
        String::from_utf8(head).unwrap()
    }

    #[test]
    fn head_206_exact() {
        let plan = Plan::Partial {
            start: 10,
            end_inclusive: 19,
        };
        let head = response_head(
            &plan,
            100,
            mtime(),
            "text/plain; charset=utf-8",
            Persist::Keep,
            &[("Strict-Transport-Security", b"max-age=63072000")],
        );
        assert_eq!(
            text(head),
            "HTTP/1.1 206 Partial Content\r\n\
             content-type: text/plain; charset=utf-8\r\n\
             content-length: 10\r\n\
             content-range: bytes 10-19/100\r\n\
             last-modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
             accept-ranges: bytes\r\n\
             Strict-Transport-Security: max-age=63072000\r\n\
             \r\n"
        );
        assert_eq!(body_range(&plan, 100), Some((10, 10)));
    }

    #[test]
    fn head_304_exact() {
        let head = response_head(
            &Plan::NotModified,
            100,
            mtime(),
            "text/html; charset=utf-8",
            Persist::Close,
            &[],
        );
        assert_eq!(
            text(head),
            "HTTP/1.1 304 Not Modified\r\n\
             last-modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
             connection: close\r\n\
             \r\n"
        );
        assert_eq!(body_range(&Plan::NotModified, 100), None);
    }

    #[test]
    fn head_200_416_405_exact() {
        let h = |plan: Plan| {
            text(response_head(
                &plan,
                100,
                mtime(),
                "image/png",
                Persist::Keep,
                &[],
            ))
        };
        assert_eq!(
            h(Plan::Full),
            "HTTP/1.1 200 OK\r\n\
             content-type: image/png\r\n\
             content-length: 100\r\n\
             last-modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
             accept-ranges: bytes\r\n\
             \r\n"
        );
        assert_eq!(
            h(Plan::Unsatisfiable),
            "HTTP/1.1 416 Range Not Satisfiable\r\n\
             content-range: bytes */100\r\n\
             content-length: 0\r\n\
             accept-ranges: bytes\r\n\
             \r\n"
        );
        assert_eq!(
            h(Plan::MethodNotAllowed),
            "HTTP/1.1 405 Method Not Allowed\r\n\
             allow: GET, HEAD\r\n\
             content-length: 0\r\n\
             \r\n"
        );
        assert_eq!(body_range(&Plan::Full, 100), Some((0, 100)));
        assert_eq!(body_range(&Plan::Full, 0), Some((0, 0)));
        assert_eq!(body_range(&Plan::Unsatisfiable, 100), None);
        assert_eq!(body_range(&Plan::MethodNotAllowed, 100), None);
    }

    #[test]
    fn heads_frame_like_their_bodies() {
        let plans = [
            Plan::Full,
            Plan::Partial {
                start: 0,
                end_inclusive: 0,
            },
            Plan::Partial {
                start: 3,
                end_inclusive: 99,
            },
            Plan::NotModified,
            Plan::Unsatisfiable,
            Plan::MethodNotAllowed,
        ];
        for plan in plans {
            for persist in [Persist::Keep, Persist::KeepHttp10, Persist::Close] {
                let head = response_head(&plan, 100, mtime(), "a/b", persist, &[]);
                let parsed = parse_response(&head, "GET", 8192).unwrap().unwrap();
                assert_eq!(parsed.len, head.len(), "{plan:?}");
                assert_eq!(parsed.keep_alive, !persist.closes(), "{plan:?}");
                let count = body_range(&plan, 100).map_or(0, |(_, n)| n);
                assert_eq!(parsed.framing, Framing::Length(count), "{plan:?}");
            }
        }
    }

    #[test]
    fn dates_out_of_range_are_clamped() {
        let last_modified = |t: SystemTime| {
            let head = text(response_head(
                &Plan::NotModified,
                1,
                t,
                "",
                Persist::Keep,
                &[],
            ));
            head.lines().nth(1).unwrap().to_string()
        };
        assert_eq!(
            last_modified(UNIX_EPOCH - Duration::from_secs(1)),
            "last-modified: Thu, 01 Jan 1970 00:00:00 GMT"
        );
        assert_eq!(
            last_modified(UNIX_EPOCH + Duration::from_secs(400_000_000_000)),
            "last-modified: Fri, 31 Dec 9999 23:59:59 GMT"
        );
    }

    #[test]
    fn unsafe_extra_fields_are_dropped() {
        let head = text(response_head(
            &Plan::MethodNotAllowed,
            0,
            mtime(),
            "",
            Persist::Keep,
            &[
                ("x-ok", b"1"),
                ("x-bad", b"1\r\nset-cookie: a=b"),
                ("x-nul", b"a\0b"),
                ("x bad", b"1"),
                ("x:bad", b"1"),
                ("", b"1"),
            ],
        ));
        assert_eq!(
            head,
            "HTTP/1.1 405 Method Not Allowed\r\n\
             allow: GET, HEAD\r\n\
             content-length: 0\r\n\
             x-ok: 1\r\n\
             \r\n"
        );
    }
}
