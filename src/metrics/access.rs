//! The access log: one line per HTTP request, in nginx's `combined` layout
//! extended with the TLS facts (SNI, version, cipher, kTLS), or as JSON.
//!
//! Every field that came from the client is escaped: a hostile path or
//! header cannot forge a second line or break the JSON.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::handshake::TlsInfo;

/// One finished request.
pub struct Record<'a> {
    /// When the request head arrived.
    pub time: SystemTime,
    /// The client address.
    pub client: SocketAddr,
    /// SNI, TLS version and cipher of the connection.
    pub tls: &'a TlsInfo,
    /// The kernel carried the connection's records when this request
    /// ended (a connection rustls carried at first moves at its first bulk
    /// response, `runtime.ktls_after`).
    pub kernel: bool,
    /// Request method.
    pub method: &'a str,
    /// Host header (as sent, port kept), or empty.
    pub host: &'a str,
    /// Request target as sent.
    pub target: &'a str,
    /// The request's protocol as logged: `HTTP/1.0`, `HTTP/1.1` or
    /// `HTTP/2.0` (nginx's `$server_protocol`).
    pub protocol: &'a str,
    /// Status sent to the client.
    pub status: u16,
    /// Bytes read from the client for this request (head and body).
    pub bytes_in: u64,
    /// Bytes sent to the client for this request (head and body).
    pub bytes_out: u64,
    /// `Referer` and `User-Agent`, if sent.
    pub referer: Option<&'a [u8]>,
    /// See `referer`.
    pub user_agent: Option<&'a [u8]>,
    /// The backend that answered, if one did.
    pub upstream: Option<SocketAddr>,
    /// Time from the request head to the end of the response.
    pub total: Duration,
    /// Time from the request head to the backend's response head.
    pub upstream_time: Option<Duration>,
}

pub use crate::config::AccessFormat as Format;

/// Where access lines go. Cheap to clone (one `Arc`).
///
/// Shards never write the log themselves: a full pipe on stdout (a stalled
/// journald, a paused `| less`) or a slow disk would stop every request of
/// every shard. Lines go into a bounded queue in memory that one writer
/// thread empties, gathering them into few `write` calls; what does not fit
/// is dropped and counted (`ktern_access_log_dropped_total`), as HAProxy
/// drops log lines rather than wait.
///
/// One queue and writer per target for the whole process: a reload that
/// keeps the target hands the writer its newly opened file (a log rotated
/// before the reload moves on to the new file) rather than start a second
/// writer, so lines stay in order across generations, and a target that
/// stalls holds one thread and one queue however often ktern reloads.
#[derive(Debug, Clone)]
pub struct Sink {
    queue: Arc<Handle>,
    format: Format,
}

/// The writer's queue, shared by every generation logging to its target:
/// the last one's drop lets the writer finish what is queued, close the
/// file and end.
#[derive(Debug)]
struct Handle(Arc<Queue>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

#[derive(Debug)]
struct Queue {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Pending {
    /// Whole lines, each ending in `\n`.
    bytes: Vec<u8>,
    /// Bytes of the batch being written: they count against `limit` too,
    /// so what the log holds in memory stays within it.
    writing: usize,
    /// `access_log.queue`, the newest generation's.
    limit: usize,
    /// Lines dropped since the writer last took the queue.
    dropped: u64,
    /// A reload's newly opened file, for the writer's next batch.
    reopen: Option<std::fs::File>,
    /// The writer waits for a shard's wake-up (it found no line for
    /// `IDLE_POLLS` polls); otherwise it polls, and shards never wake it.
    asleep: bool,
    /// Set by the last `Sink`'s drop.
    closed: bool,
}

impl Queue {
    /// A shard that panicked holding the lock left whole lines behind (the
    /// queue only ever grows by a whole line): the data is still good.
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
enum Target {
    Stdout,
    File(std::fs::File),
}

/// The writer looks for lines this often while they come, so that a busy
/// log costs one `write` per batch, not one per request, and the shards no
/// wake-up at all (a futex call): about what a line can lag behind its
/// request.
const GATHER: Duration = Duration::from_millis(20);
/// After this many polls that found nothing (1 s), the writer sleeps until
/// a shard wakes it with the next line: an idle ktern has no timer.
const IDLE_POLLS: u32 = 50;
/// A shard wakes a polling writer early when this much is queued (or half
/// the queue, if smaller).
const BATCH: usize = 64 << 10;
/// A writer's spare buffer is kept up to this size between bursts.
const KEEP: usize = 256 << 10;
/// A shard's line buffer is kept up to this size (a line with a 64 KiB
/// target escaped is four times that, once).
const LINE_KEEP: usize = 4 << 10;

fn batch(limit: usize) -> usize {
    BATCH.min(limit / 2)
}

/// The logs by target (`-` for stdout): a generation's handle, for a
/// reload to find, and the queue, alive while its writer runs, for
/// `flush` to wait on.
#[allow(clippy::type_complexity)]
static OPEN: Mutex<Vec<(std::path::PathBuf, Weak<Handle>, Weak<Queue>)>> = Mutex::new(Vec::new());

/// Why a log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file (a config problem: permissions, a read-only filesystem).
    #[error("{0}")]
    File(#[source] std::io::Error),
    /// A FIFO that no process reads (a config problem: start the reader
    /// first).
    #[error("a named pipe with no reader (start the process that reads it first)")]
    NoReader,
    /// The writer thread (internal).
    #[error("cannot start the access log's writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Opens a log file to append to, created if missing. Opened
/// non-blocking: a FIFO (a log shipper's) with no reader would block the
/// open for good, and with it the start or the reload (which holds the
/// control lock, and on SIGHUP the signal thread, so SIGTERM went
/// unheard). No reader is an error; then writes block again, so a slow
/// reader slows the writer thread, not the shards.
fn open_file(path: &std::path::Path) -> Result<std::fs::File, OpenError> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => OpenError::NoReader,
            _ => OpenError::File(e),
        })?;
    crate::sys::set_blocking(file.as_fd()).map_err(OpenError::File)?;
    Ok(file)
}

impl Sink {
    /// Opens the configured log (append mode, created if missing; `-` is
    /// stdout): a new writer thread for a target no generation logs to, or
    /// the running one, given the new file and queue size.
    pub fn open(log: &crate::config::AccessLog) -> Result<Sink, OpenError> {
        let target = if log.path.as_os_str() == "-" {
            Target::Stdout
        } else {
            Target::File(open_file(&log.path)?)
        };
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, _, q)| q.strong_count() > 0);
        // The target's live writer. An older one may still be listed for
        // it, stalled with no generation left (its queue lives while it
        // blocks): the live one is the one with a handle.
        let running = open
            .iter()
            .filter(|(path, ..)| *path == log.path)
            .find_map(|(_, h, _)| h.upgrade());
        if let Some(queue) = running {
            let mut p = queue.0.lock();
            p.limit = log.queue;
            if let Target::File(f) = target {
                p.reopen = Some(f);
            }
            drop(p);
            queue.0.wake.notify_one();
            return Ok(Sink {
                queue,
                format: log.format,
            });
        }
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                limit: log.queue,
                ..Pending::default()
            }),
            wake: Condvar::new(),
        });
        let writer = queue.clone();
        std::thread::Builder::new()
            .name("ktern-access-log".into())
            .spawn(move || write_out(&writer, target))
            .map_err(OpenError::Thread)?;
        let weak = Arc::downgrade(&queue);
        let queue = Arc::new(Handle(queue));
        open.push((log.path.clone(), Arc::downgrade(&queue), weak));
        Ok(Sink {
            queue,
            format: log.format,
        })
    }

    /// Formats `r` and queues it for the writer thread, or drops it (counted
    /// in `dropped`) when the log holds `access_log.queue` bytes already.
    /// Never waits for I/O, and never logs (a warning goes to stderr, which
    /// under systemd is the same journal as a stalled stdout): the writer
    /// says when dropping starts and ends. The lock is held for a copy of
    /// one line.
    pub fn write(&self, r: &Record<'_>, dropped: &AtomicU64) {
        thread_local! {
            static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            format(self.format, r, line);
            self.queue_line(line, dropped);
            if line.capacity() > LINE_KEEP {
                line.clear();
                line.shrink_to(LINE_KEEP / 4);
            }
        });
    }

    fn queue_line(&self, line: &[u8], dropped: &AtomicU64) {
        let queue = &self.queue.0;
        let mut p = queue.lock();
        let before = p.bytes.len();
        let held = before + p.writing;
        // An empty log takes any line, however long: only a backlog drops
        // lines.
        if held > 0 && held + line.len() > p.limit {
            p.dropped += 1;
            drop(p);
            crate::metrics::ShardMetrics::inc(dropped);
            return;
        }
        p.bytes.extend_from_slice(line);
        let batch = batch(p.limit);
        // A futex wake only for an asleep writer, or a batch's worth: a
        // polling writer finds the line within `GATHER`.
        let wake = std::mem::take(&mut p.asleep) || (before < batch && p.bytes.len() >= batch);
        drop(p);
        if wake {
            queue.wake.notify_one();
        }
    }
}

/// Whether the target is a pipe or FIFO (`| logger`, a log shipper's), or
/// a stream socket (systemd's default stdout: journald's), which old and
/// new ktern share during an upgrade as they would a pipe. A unix stream
/// socket takes a small write as one piece in practice (one skb), though
/// no standard promises it as pipe(7) does for a pipe.
fn is_pipe(target: &Target) -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    let meta = match target {
        // A duplicate of fd 1, closed again: the metadata of the file it is.
        Target::Stdout => std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .and_then(|fd| std::fs::File::from(fd).metadata()),
        Target::File(f) => f.metadata(),
    };
    meta.is_ok_and(|m| m.file_type().is_fifo() || m.file_type().is_socket())
}

/// Writes a batch of lines. Into a pipe, in writes of whole lines of at
/// most PIPE_BUF bytes: the kernel keeps each such write whole (pipe(7)),
/// so two processes on one pipe (an upgrade's old and new ktern on one
/// `| logger`) cannot interleave their lines mid-line; a larger write may
/// be split anywhere. (A file opened to append takes each write whole at
/// its end.)
fn write_batch(out: &mut impl std::io::Write, batch: &[u8], pipe: bool) -> std::io::Result<()> {
    if !pipe {
        return out.write_all(batch);
    }
    atomic_pieces(batch).try_for_each(|piece| out.write_all(piece))
}

/// `batch` cut at line ends into pieces of at most PIPE_BUF bytes; a line
/// longer than that is a piece of its own (no write keeps it whole).
fn atomic_pieces(batch: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = if rest.len() <= libc::PIPE_BUF {
            rest.len()
        } else {
            match memchr::memrchr(b'\n', &rest[..libc::PIPE_BUF]) {
                Some(i) => i + 1,
                None => memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1),
            }
        };
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// The writer thread: takes what is queued every `GATHER` and writes it
/// with one call (into a pipe, in pieces: `write_batch`); blocking here
/// holds no request. Idle for `IDLE_POLLS`
/// polls, it sleeps until a shard's next line (then gathers for `GATHER`
/// before it writes). It logs when lines start being dropped and when it
/// has caught up again.
fn write_out(queue: &Queue, mut target: Target) {
    let mut batch = Vec::new();
    let mut pipe = is_pipe(&target);
    // Lines dropped since dropping started (none: not dropping).
    let mut lost = 0u64;
    let mut idle = 0;
    loop {
        let dropped = {
            let mut p = queue.lock();
            let full = self::batch(p.limit);
            // Lines found after a poll (or a gather) are written.
            let mut polled = false;
            loop {
                // A reload's file, taken at once and before any line after
                // it (an idle log would otherwise keep a rotated file open
                // until its next line).
                if let Some(f) = p.reopen.take() {
                    target = Target::File(f);
                    pipe = is_pipe(&target);
                }
                if p.bytes.len() >= full || p.closed || (polled && !p.bytes.is_empty()) {
                    break;
                }
                if p.bytes.is_empty() && idle >= IDLE_POLLS {
                    p.asleep = true;
                    p = queue
                        .wake
                        .wait_while(p, |p| p.bytes.is_empty() && !p.closed && p.reopen.is_none())
                        .unwrap_or_else(|e| e.into_inner());
                    p.asleep = false;
                    idle = 0;
                    // The first line after a sleep gathers for a poll.
                    polled = false;
                    continue;
                }
                p = queue
                    .wake
                    .wait_timeout(p, GATHER)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                polled = true;
                if p.bytes.is_empty() {
                    idle += 1;
                }
            }
            if p.bytes.is_empty() {
                // Closed, with nothing left.
                return;
            }
            idle = 0;
            std::mem::swap(&mut p.bytes, &mut batch);
            p.writing = batch.len();
            std::mem::take(&mut p.dropped)
        };
        if dropped > 0 && lost == 0 {
            tracing::warn!(
                "access log: the writer is access_log.queue bytes behind (a slow disk, a stalled \
                 reader of stdout): dropping lines until it catches up \
                 (ktern_access_log_dropped_total)"
            );
        }
        lost += dropped;
        let res = match &mut target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                write_batch(&mut out, &batch, pipe).and_then(|()| out.flush())
            }
            Target::File(f) => write_batch(f, &batch, pipe),
        };
        if let Err(e) = res {
            // A rare path: the lines are counted here, not on every queue.
            let lines = batch.iter().filter(|&&b| b == b'\n').count();
            tracing::warn!(error = %e, lines, "access log write failed: lines lost");
        }
        batch.clear();
        batch.shrink_to(KEEP);
        let caught_up = {
            let mut p = queue.lock();
            p.writing = 0;
            p.dropped == 0 && p.bytes.len() < p.limit / 2
        };
        if lost > 0 && caught_up {
            tracing::warn!(dropped = lost, "access log: the writer caught up");
            lost = 0;
        }
    }
}

/// Waits until every queued line is written, or `timeout` passes (a log
/// whose reader has stopped): called before the process exits.
pub fn flush(timeout: Duration) {
    let until = std::time::Instant::now() + timeout;
    let queues: Vec<Arc<Queue>> = OPEN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|(_, _, q)| q.upgrade())
        .collect();
    for q in queues {
        while std::time::Instant::now() < until {
            let p = q.lock();
            if p.bytes.is_empty() && p.writing == 0 {
                break;
            }
            drop(p);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Appends `r` to `out` as one line in `format`, newline included (what
/// the log writes; public for `bench/`).
pub fn format(format: Format, r: &Record<'_>, out: &mut Vec<u8>) {
    match format {
        Format::Combined => combined(r, out),
        Format::Json => json(r, out),
    }
    out.push(b'\n');
}

/// `client - - [time] "request" status bytes "referer" "agent"` (nginx's
/// combined), then `key=value` pairs for what combined lacks.
fn combined(r: &Record<'_>, out: &mut Vec<u8>) {
    ip(r.client.ip(), out);
    out.extend_from_slice(b" - - [");
    clf_time(r.time, out);
    out.extend_from_slice(b"] \"");
    escape_text(r.method.as_bytes(), out);
    out.push(b' ');
    escape_text(r.target.as_bytes(), out);
    out.push(b' ');
    out.extend_from_slice(r.protocol.as_bytes());
    out.extend_from_slice(b"\" ");
    num(r.status, out);
    out.push(b' ');
    num(r.bytes_out, out);
    out.extend_from_slice(b" \"");
    escape_text(r.referer.unwrap_or(b"-"), out);
    out.extend_from_slice(b"\" \"");
    escape_text(r.user_agent.unwrap_or(b"-"), out);
    out.extend_from_slice(b"\" host=\"");
    escape_text(r.host.as_bytes(), out);
    out.extend_from_slice(b"\" sni=");
    out.extend_from_slice(r.tls.sni.as_deref().unwrap_or("-").as_bytes());
    out.extend_from_slice(b" tls=");
    out.extend_from_slice(r.tls.version_name().as_bytes());
    out.extend_from_slice(b" cipher=");
    out.extend_from_slice(r.tls.cipher_name().as_bytes());
    out.extend_from_slice(if r.kernel {
        b" ktls=1 in="
    } else {
        b" ktls=0 in="
    });
    num(r.bytes_in, out);
    out.extend_from_slice(b" out=");
    num(r.bytes_out, out);
    out.extend_from_slice(b" upstream=");
    match r.upstream {
        Some(a) if a.is_ipv4() => {
            ip(a.ip(), out);
            out.push(b':');
            num(a.port(), out);
        }
        Some(a) => {
            let _ = write!(out, "{a}");
        }
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" rt=");
    seconds(r.total, out);
    out.extend_from_slice(b" urt=");
    match r.upstream_time {
        Some(t) => seconds(t, out),
        None => out.push(b'-'),
    }
    // Only on listeners that ask for client certificates.
    if let Some(verify) = r.tls.client_verify() {
        out.extend_from_slice(b" client_verify=");
        out.extend_from_slice(verify.as_bytes());
        if let Some(id) = &r.tls.client {
            out.extend_from_slice(b" client_dn=\"");
            escape_text(id.subject.as_bytes(), out);
            out.extend_from_slice(b"\" client_fp=");
            out.extend_from_slice(id.fingerprint.as_bytes());
        }
    }
}

/// The line is built from byte pieces and integers by `itoa` (already in
/// the tree, under serde_json), not `write!`: each `core::fmt` call costs a
/// few hundred instructions, and a combined line made with a dozen of them
/// took about 9 k, a third of a proxied request's own.
fn num(n: impl itoa::Integer, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `n` with at least `width` digits, zeros in front.
fn padded(n: u32, width: usize, out: &mut Vec<u8>) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(n).as_bytes();
    out.extend(std::iter::repeat_n(
        b'0',
        width.saturating_sub(digits.len()),
    ));
    out.extend_from_slice(digits);
}

/// An IPv4 address by its octets; IPv6 through `Display` (RFC 5952's
/// compressed form is not worth a copy here).
fn ip(addr: std::net::IpAddr, out: &mut Vec<u8>) {
    match addr {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            num(a, out);
            for o in [b, c, d] {
                out.push(b'.');
                num(o, out);
            }
        }
        v6 => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `1.234`: seconds to the millisecond, as nginx's `$request_time`, from
/// integers.
fn seconds(t: Duration, out: &mut Vec<u8>) {
    let ms = t.as_millis();
    num(ms / 1000, out);
    out.push(b'.');
    padded((ms % 1000) as u32, 3, out);
}

/// Bytes outside printable ASCII, `"` and `\` become `\xHH` (as nginx
/// escapes its variables), so a line is always one line.
fn escape_text(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            out.push(b);
        } else {
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]);
        }
    }
}

/// One JSON line, serialized straight into the line buffer: borrowed
/// fields and `Display` values, no `serde_json::Value` (a map of owned keys
/// and strings: dozens of allocations a line).
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    time: Shown<Rfc3339>,
    client: Shown<std::net::IpAddr>,
    client_port: u16,
    sni: Option<&'a str>,
    tls_version: &'static str,
    cipher: &'static str,
    ktls: bool,
    client_verify: Option<&'static str>,
    client_dn: Option<&'a str>,
    client_fingerprint: Option<&'a str>,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    protocol: &'a str,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    referer: Option<std::borrow::Cow<'a, str>>,
    user_agent: Option<std::borrow::Cow<'a, str>>,
    upstream: Option<Shown<SocketAddr>>,
    duration_ms: f64,
    upstream_ms: Option<f64>,
}

/// A value serialized as a JSON string of its `Display`, escaped as it is
/// formatted (serde_json's `collect_str`), with no `String` of its own.
struct Shown<T>(T);

impl<T: std::fmt::Display> serde::Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// `2026-11-23T10:00:00.123Z`.
struct Rfc3339(SystemTime);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (y, mo, d, h, mi, s, ms) = civil(self.0);
        write!(f, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
    }
}

fn json(r: &Record<'_>, out: &mut Vec<u8>) {
    let client = r.tls.client.as_deref();
    let line = JsonLine {
        time: Shown(Rfc3339(r.time)),
        client: Shown(r.client.ip()),
        client_port: r.client.port(),
        sni: r.tls.sni.as_deref(),
        tls_version: r.tls.version_name(),
        cipher: r.tls.cipher_name(),
        ktls: r.kernel,
        client_verify: r.tls.client_verify(),
        client_dn: client.map(|c| &*c.subject),
        client_fingerprint: client.map(|c| &*c.fingerprint),
        method: r.method,
        host: r.host,
        path: r.target,
        protocol: r.protocol,
        status: r.status,
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        referer: r.referer.map(String::from_utf8_lossy),
        user_agent: r.user_agent.map(String::from_utf8_lossy),
        upstream: r.upstream.map(Shown),
        duration_ms: r.total.as_secs_f64() * 1e3,
        upstream_ms: r.upstream_time.map(|t| t.as_secs_f64() * 1e3),
    };
    let start = out.len();
    if serde_json::to_writer(&mut *out, &line).is_err() {
        // Not reached (a `Vec` takes every write): a line cut short would
        // be no JSON at all.
        out.truncate(start);
        out.extend_from_slice(b"{}");
    }
}

/// UTC civil date and time from a Unix time (Howard Hinnant's
/// days-from-civil inverse; proleptic Gregorian).
fn civil(t: SystemTime) -> (i64, u32, u32, u32, u32, u32, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    (
        year,
        month,
        day,
        h as u32,
        m as u32,
        s as u32,
        d.subsec_millis(),
    )
}

/// `23/Nov/2026:10:00:00 +0000` (Common Log Format).
fn clf_time(t: SystemTime, out: &mut Vec<u8>) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, mo, d, h, mi, s, _) = civil(t);
    padded(d, 2, out);
    out.push(b'/');
    out.extend_from_slice(MONTHS[(mo - 1) as usize].as_bytes());
    out.push(b'/');
    padded(y.clamp(0, 9999) as u32, 4, out);
    for v in [h, mi, s] {
        out.push(b':');
        padded(v, 2, out);
    }
    out.extend_from_slice(b" +0000");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// Whether `done` holds within 5 s, asked every 10 ms (the writer
    /// thread works on its own time).
    fn eventually(mut done: impl FnMut() -> bool) -> bool {
        (0..500).any(|_| {
            done() || {
                std::thread::sleep(Duration::from_millis(10));
                false
            }
        })
    }

    /// A log file `access.log` in a directory of this test's own.
    fn file_log(tag: &str, format: Format) -> (std::path::PathBuf, crate::config::AccessLog) {
        let dir = std::env::temp_dir().join(format!("ktern-access-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = crate::config::AccessLog {
            path: dir.join("access.log"),
            format,
            queue: 1 << 20,
        };
        (dir, log)
    }

    /// A JSON log into a pipe of this process's (its number names the
    /// target while the write end is open): the two ends and the config.
    fn pipe_log(
        queue: usize,
    ) -> (
        std::io::PipeReader,
        std::io::PipeWriter,
        crate::config::AccessLog,
    ) {
        use std::os::fd::AsRawFd as _;
        let (reader, writer) = std::io::pipe().unwrap();
        let log = crate::config::AccessLog {
            path: format!("/proc/self/fd/{}", writer.as_raw_fd()).into(),
            format: Format::Json,
            queue,
        };
        (reader, writer, log)
    }

    fn info() -> TlsInfo {
        TlsInfo {
            sni: Some("app.test".into()),
            version: Some(rustls::ProtocolVersion::TLSv1_3),
            suite: Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            kernel: true,
            alpn_h2: false,
            alpn: None,
            resumed: false,
            client_auth: false,
            client: None,
        }
    }

    fn record<'a>(tls: &'a TlsInfo, target: &'a str) -> Record<'a> {
        Record {
            // 2026-11-23T10:20:30.456Z
            time: UNIX_EPOCH + Duration::from_millis(1_795_429_230_456),
            client: "192.0.2.7:5555".parse().unwrap(),
            tls,
            kernel: tls.kernel,
            method: "GET",
            host: "app.test",
            target,
            protocol: "HTTP/1.1",
            status: 200,
            bytes_in: 80,
            bytes_out: 1100,
            referer: None,
            user_agent: Some(b"curl/8 \"x\""),
            upstream: Some("127.0.0.1:9000".parse().unwrap()),
            total: Duration::from_millis(3),
            upstream_time: Some(Duration::from_millis(2)),
        }
    }

    /// A reader that stops reading (a full pipe) never holds the caller:
    /// lines beyond the queue are dropped and counted, the others all
    /// arrive whole once the reader reads again, and none is lost unseen.
    #[test]
    fn a_stalled_reader_drops_counted_lines_and_never_blocks() {
        use std::io::Read as _;
        let (mut reader, writer, log) = pipe_log(4096);
        let sink = Sink::open(&log).unwrap();
        let tls = info();
        let dropped = AtomicU64::new(0);
        // ~400-byte lines: 400 KB, six times what a pipe holds.
        const N: u64 = 1000;
        for i in 0..N {
            sink.write(&record(&tls, &format!("/{i}")), &dropped);
        }
        let dropped = dropped.load(Ordering::Relaxed);
        assert!(dropped > N / 2, "only {dropped} of {N} lines dropped");
        // The last handle closes the queue: the writer writes the rest and
        // closes its end, so the read below ends. (Our own end is kept open
        // until then: its number names the log's target while it is open.)
        drop(sink);
        drop(writer);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        let mut paths = Vec::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a whole line");
            paths.push(v["path"].as_str().unwrap()[1..].parse::<u64>().unwrap());
        }
        assert_eq!(paths.len() as u64 + dropped, N);
        assert!(paths.windows(2).all(|w| w[0] < w[1]), "lines in order");
        assert_eq!(paths[0], 0, "the first lines are kept, later ones dropped");
        assert!(text.ends_with('\n'));
    }

    /// A batch for a pipe is cut at line ends into writes of at most
    /// PIPE_BUF bytes, in order and losing nothing; a longer line goes
    /// whole.
    #[test]
    fn pipe_writes_are_whole_lines_within_pipe_buf() {
        let line = |n: usize| [vec![b'x'; n - 1], vec![b'\n']].concat();
        let mut batch = Vec::new();
        for n in [100, 4000, 50, 4096, 9000, 1, 3000, 2000] {
            batch.extend(line(n));
        }
        batch.extend(b"no end");
        let pieces: Vec<&[u8]> = atomic_pieces(&batch).collect();
        let lens: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        assert_eq!(lens, [100, 4050, 4096, 9000, 3001, 2006]);
        assert_eq!(pieces.concat(), batch);
        assert!(pieces[..5].iter().all(|p| p.ends_with(b"\n")));
        assert_eq!(atomic_pieces(b"").count(), 0);
    }

    /// Two processes' writers on one pipe (an upgrade's old and new ktern
    /// on one `| logger`; here two writer threads, the pipe named by two
    /// descriptors) never interleave their lines mid-line.
    #[test]
    fn two_writers_on_one_pipe_keep_their_lines_whole() {
        use std::io::Read as _;
        use std::os::fd::AsRawFd as _;
        let (mut reader, writer, log) = pipe_log(16 << 20);
        let second = writer.try_clone().unwrap();
        let log2 = crate::config::AccessLog {
            path: format!("/proc/self/fd/{}", second.as_raw_fd()).into(),
            ..log.clone()
        };
        let tls = info();
        let reading = std::thread::spawn(move || {
            let mut text = String::new();
            reader.read_to_string(&mut text).unwrap();
            text
        });
        let dropped = AtomicU64::new(0);
        let sinks = [Sink::open(&log).unwrap(), Sink::open(&log2).unwrap()];
        assert!(
            !Arc::ptr_eq(&sinks[0].queue, &sinks[1].queue),
            "two writers"
        );
        // ~400-byte lines, 2.4 MB from each writer, while the pipe (64 KiB)
        // is read as it fills: each write meets the other's.
        const N: usize = 6000;
        std::thread::scope(|s| {
            for sink in &sinks {
                s.spawn(|| {
                    for i in 0..N {
                        sink.write(&record(&tls, &format!("/{i}")), &dropped);
                    }
                });
            }
        });
        drop(sinks);
        drop((writer, second));
        let text = reading.join().unwrap();
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
        let mut lines = 0;
        for line in text.lines() {
            let v: Result<serde_json::Value, _> = serde_json::from_str(line);
            assert!(v.is_ok(), "a line cut by the other writer: {line}");
            lines += 1;
        }
        assert_eq!(lines, 2 * N);
    }

    /// A writer stalled with no generation left (its target's reader
    /// stopped) stays listed while it blocks; the target's next writer is
    /// the one later reloads share, not a new one per reload.
    #[test]
    fn reloads_share_the_live_writer_past_a_stalled_one() {
        use std::io::Read as _;
        let (mut reader, writer, log) = pipe_log(1 << 20);
        let tls = info();
        let dropped = AtomicU64::new(0);
        let stalled = Sink::open(&log).unwrap();
        // More than the pipe holds: the writer blocks in its write.
        for i in 0..1000 {
            stalled.write(&record(&tls, &format!("/{i}")), &dropped);
        }
        let queue = Arc::downgrade(&stalled.queue.0);
        drop(stalled);
        assert!(
            queue.upgrade().is_some(),
            "the stalled writer's queue lives"
        );
        let live = Sink::open(&log).unwrap();
        let again = Sink::open(&log).unwrap();
        assert!(Arc::ptr_eq(&live.queue, &again.queue), "one live writer");
        drop((live, again, writer));
        // Reading lets every writer finish; the pipe then ends.
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(
            text.lines().count() as u64 + dropped.load(Ordering::Relaxed),
            1000
        );
    }

    /// A reload that keeps the target shares the running writer, which
    /// moves to the newly opened file: a log rotated (renamed) before the
    /// reload keeps the lines before it, the new file gets those after.
    #[test]
    fn a_reload_hands_the_running_writer_its_new_file() {
        let (dir, log) = file_log("reload", Format::Json);
        let tls = info();
        let dropped = AtomicU64::new(0);
        // (`flush` waits for every log of the process, other tests' too.)
        let written = |name: &str, n: usize| {
            let lines = || std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            assert!(
                eventually(|| lines().lines().count() >= n),
                "{name}: {:?}",
                lines()
            );
        };
        let first = Sink::open(&log).unwrap();
        first.write(&record(&tls, "/1"), &dropped);
        written("access.log", 1);
        std::fs::rename(&log.path, dir.join("access.log.1")).unwrap();
        let second = Sink::open(&log).unwrap();
        assert!(Arc::ptr_eq(&first.queue, &second.queue), "one writer");
        second.write(&record(&tls, "/2"), &dropped);
        // The old generation still logs, in order with the new one.
        first.write(&record(&tls, "/3"), &dropped);
        drop(first);
        drop(second);
        written("access.log", 2);
        let paths = |name: &str| -> Vec<String> {
            std::fs::read_to_string(dir.join(name))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v["path"].as_str().unwrap().to_string()
                })
                .collect()
        };
        assert_eq!(paths("access.log.1"), ["/1"]);
        assert_eq!(paths("access.log"), ["/2", "/3"]);
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
        // Every handle gone: the next open starts a writer of its own.
        let third = Sink::open(&log).unwrap();
        assert_eq!(Arc::strong_count(&third.queue), 1);
        drop(third);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// After a second with no line the writer sleeps; the next line wakes
    /// it, and a reload's file replaces the old one without waiting for a
    /// line (a rotated file is not held open by an idle log).
    #[test]
    fn a_sleeping_writer_wakes_for_a_line_and_for_a_reload() {
        let (dir, log) = file_log("sleep", Format::Combined);
        let tls = info();
        let dropped = AtomicU64::new(0);
        let sink = Sink::open(&log).unwrap();
        let asleep = || eventually(|| sink.queue.0.lock().asleep);
        assert!(asleep(), "the writer sleeps once idle");
        sink.write(&record(&tls, "/woken"), &dropped);
        let text = || std::fs::read_to_string(&log.path).unwrap();
        assert!(eventually(|| text().contains("/woken")), "{:?}", text());
        // Asleep again, then a reload: the writer takes the new file now.
        assert!(asleep());
        std::fs::rename(&log.path, dir.join("access.log.1")).unwrap();
        let reloaded = Sink::open(&log).unwrap();
        assert!(
            eventually(|| reloaded.queue.0.lock().reopen.is_none()),
            "the reload's file waited for a line"
        );
        drop((sink, reloaded));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn civil_dates() {
        let rfc3339 = |t| Rfc3339(t).to_string();
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day), 2024-12-31 23:59:59.
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_735_689_599)),
            "2024-12-31T23:59:59.000Z"
        );
    }

    #[test]
    fn combined_line_has_tls_fields_and_escapes_client_bytes() {
        let tls = info();
        let mut line = Vec::new();
        combined(&record(&tls, "/a\"b\n"), &mut line);
        let line = String::from_utf8(line).unwrap();
        assert_eq!(
            line,
            "192.0.2.7 - - [23/Nov/2026:10:20:30 +0000] \"GET /a\\x22b\\x0A HTTP/1.1\" 200 1100 \
             \"-\" \"curl/8 \\x22x\\x22\" host=\"app.test\" sni=app.test tls=TLSv1.3 \
             cipher=TLS13_AES_128_GCM_SHA256 ktls=1 in=80 out=1100 upstream=127.0.0.1:9000 \
             rt=0.003 urt=0.002"
        );
        assert!(!line.contains('\n'));
        // Zero-padded dates, IPv6 peers, a userspace connection, no backend.
        let mut r = record(&tls, "/");
        r.time = UNIX_EPOCH + Duration::from_secs(3_723);
        r.client = "[2001:db8::7]:443".parse().unwrap();
        r.kernel = false;
        r.upstream = Some("[2001:db8::9]:8080".parse().unwrap());
        r.upstream_time = None;
        r.total = Duration::from_millis(12_345);
        let mut line = Vec::new();
        combined(&r, &mut line);
        let line = String::from_utf8(line).unwrap();
        assert!(
            line.starts_with(
                "2001:db8::7 - - [01/Jan/1970:01:02:03 +0000] \"GET / HTTP/1.1\" 200 1100 "
            ),
            "{line}"
        );
        assert!(
            line.ends_with(" ktls=0 in=80 out=1100 upstream=[2001:db8::9]:8080 rt=12.345 urt=-"),
            "{line}"
        );
    }

    #[test]
    fn json_line_parses_back() {
        let tls = info();
        let mut line = Vec::new();
        json(&record(&tls, "/\u{0}\"}"), &mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["path"], "/\u{0}\"}");
        assert_eq!(v["time"], "2026-11-23T10:20:30.456Z");
        assert_eq!(v["sni"], "app.test");
        assert_eq!(v["tls_version"], "TLSv1.3");
        assert_eq!(v["ktls"], true);
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_in"], 80);
        assert_eq!(v["upstream"], "127.0.0.1:9000");
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(v["client_verify"], serde_json::Value::Null);
        assert_eq!(v["user_agent"], "curl/8 \"x\"");
        assert_eq!(v["duration_ms"], 3.0);
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut want = [
            "time",
            "client",
            "client_port",
            "sni",
            "tls_version",
            "cipher",
            "ktls",
            "client_verify",
            "client_dn",
            "client_fingerprint",
            "method",
            "host",
            "path",
            "protocol",
            "status",
            "bytes_in",
            "bytes_out",
            "referer",
            "user_agent",
            "upstream",
            "duration_ms",
            "upstream_ms",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        // Bytes that are not UTF-8 come out as U+FFFD, the line still JSON.
        let mut r = record(&tls, "/");
        r.user_agent = Some(b"a\xff\"b");
        line.clear();
        json(&r, &mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["user_agent"], "a\u{fffd}\"b");
    }

    #[test]
    fn client_certificate_fields_appear_where_the_listener_asks_for_one() {
        use crate::handshake::client_auth::ClientIdentity;
        let mut tls = info();
        tls.client_auth = true;
        let mut line = Vec::new();
        combined(&record(&tls, "/"), &mut line);
        let text = String::from_utf8_lossy(&line);
        assert!(text.ends_with(" urt=0.002 client_verify=NONE"), "{text}");
        tls.client = Some(Box::new(ClientIdentity {
            subject: "CN=svc \"x\", O=Example".into(),
            common_name: Some("svc".into()),
            sans: "DNS:svc.example".into(),
            fingerprint: "ab".repeat(32).into(),
        }));
        line.clear();
        combined(&record(&tls, "/"), &mut line);
        let text = String::from_utf8_lossy(&line);
        assert!(
            text.ends_with(&format!(
                " client_verify=SUCCESS client_dn=\"CN=svc \\x22x\\x22, O=Example\" client_fp={}",
                "ab".repeat(32)
            )),
            "{text}"
        );
        line.clear();
        json(&record(&tls, "/"), &mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["client_verify"], "SUCCESS");
        assert_eq!(v["client_dn"], "CN=svc \"x\", O=Example");
        assert_eq!(v["client_fingerprint"], "ab".repeat(32));
    }
}
