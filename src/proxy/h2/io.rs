//! tokio's `AsyncRead`/`AsyncWrite` over ktern's TLS reader and writer,
//! the interface the `h2` crate drives.
//!
//! Under kTLS the common steps are one non-blocking syscall each, straight
//! between the kernel and h2's own buffers: `recv` into h2's read buffer
//! (the kernel decrypts into it) and a gathering `sendmsg` of h2's frame
//! heads and payloads (the kernel seals them as records). Everything else
//! — a readiness wait, a kTLS control record (alert, KeyUpdate), a
//! KeyUpdate to send first, and every step of the userspace record path —
//! runs as the reader's or writer's own async method in a boxed future
//! that owns the half and hands it back, so records are handled exactly
//! as on HTTP/1.1.
//!
//! Writes on the slow path are staged: h2 writes its frames one by one
//! and then flushes, so a flush seals and sends them as one batch.

use crate::proxy::LINGER;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::watch::{FrameWatch, OutWatch, Verdict};
use crate::ktls::stream::Attempt;
use crate::ktls::{StreamError, TlsReader, TlsWriter};

/// What the transport tells the connection loop beside h2's view.
#[derive(Default)]
pub struct Signals {
    /// The first client-side failure, kept typed for the connection's
    /// counter and log line (h2 only sees an `io::Error`).
    pub failed: RefCell<Option<StreamError>>,
    /// The frame watch saw a flood of control frames.
    pub flood: Cell<bool>,
    /// Streams reset as malformed since the connection loop last looked.
    pub malformed: Cell<u64>,
    /// No stream is open: a write that leaves nothing staged gives the
    /// userspace record buffer back rather than keep it while idle (while
    /// streams are open, one of a size the shard's cache keeps goes back to
    /// it after every write, `TlsWriter::write_all`; another is kept).
    pub idle: Cell<bool>,
    /// While rustls carries the connection until its first bulk transfer:
    /// that transfer's size (`runtime.ktls_after`, from the writer).
    pub after: Cell<Option<u64>>,
    /// The largest bulk response announced since the transport last
    /// looked ([`Signals::bulk_ahead`]): the keys go to the kernel at its
    /// next write.
    pub bulk: Cell<u64>,
    /// The keys went to the kernel mid-connection (the connection loop
    /// counts it once).
    pub promoted: Cell<bool>,
    /// The kernel carries the records now: at the handshake, or since a
    /// bulk transfer (each stream's access line says which).
    pub kernel: Cell<bool>,
    /// DATA payload bytes handed to the transport (the output watch's
    /// count).
    pub data_sent: Cell<u64>,
}

impl Signals {
    /// A stream is about to send `bytes` of response body (its length, or
    /// what it has sent so far of one of unknown length, more to come).
    /// `true` when that is a bulk transfer on a connection rustls carries
    /// until one: the keys go to the kernel before the response's next
    /// write, so it goes out on the kernel's records.
    pub fn bulk_ahead(&self, bytes: u64) -> bool {
        match self.after.get() {
            Some(after) if bytes >= after => {
                if bytes > self.bulk.get() {
                    self.bulk.set(bytes);
                }
                true
            }
            _ => false,
        }
    }
}

type Owned<T, R> = Pin<Box<dyn Future<Output = (T, R)>>>;

enum ReadState {
    Idle(TlsReader),
    /// A readiness wait (no buffer held; it yields an empty chunk) or the
    /// async read path (a control record, the userspace path); `None` is
    /// the end of the client's stream.
    Busy(Owned<TlsReader, Result<Option<Vec<u8>>, StreamError>>),
    Gone,
}

enum WriteState {
    Idle(TlsWriter),
    /// A readiness wait or a write; `closing`: close_notify and FIN, after
    /// which the writer is done.
    Busy {
        fut: Owned<TlsWriter, Result<(), StreamError>>,
        closing: bool,
    },
    Closed,
    Gone,
}

/// Most plaintext staged for one slow-path write: four records. Beyond
/// it h2 waits for the write in flight (its own send buffer is the limit
/// that matters: see `max_send_buffer_size`).
const STAGE_MAX: usize = 64 << 10;

/// Bytes h2 may read in one go before the transport says "not now" (and
/// wakes the connection at once). h2 reads and decodes frames until a read
/// would block, so a client that keeps the socket full (cheap frames, or a
/// fast upload) held the shard's thread, every other connection and the
/// idle sweeper with it, for as long as it kept sending. With this budget
/// the connection loop runs at most eight such turns before it yields to
/// the shard's other tasks: 256 KiB, a few milliseconds of frame decoding.
const READ_BUDGET: usize = 32 << 10;

/// Reads and drops the client's bytes until it closes, [`LINGER`] passes
/// or [`LINGER_BYTES`](crate::proxy::LINGER_BYTES) were read (nginx's `lingering_close`: a client cut
/// off mid-flood, or whose last frames crossed our GOAWAY, would otherwise
/// get a reset). The read side may be mid-wait or
/// mid-read: that finishes first, within the same deadline.
async fn linger(read: ReadState) {
    let deadline = monoio::time::Instant::now() + LINGER;
    let mut reader = match read {
        ReadState::Idle(r) => r,
        ReadState::Busy(f) => match monoio::time::timeout_at(deadline, f).await {
            Ok((r, Ok(Some(chunk)))) => {
                crate::buffers::give(chunk);
                r
            }
            _ => return,
        },
        ReadState::Gone => return,
    };
    crate::proxy::linger(&mut reader, deadline).await;
}

/// The HTTP/2 connection's transport.
pub struct H2Io {
    read: ReadState,
    /// Plaintext the async read path returned that h2 has not taken yet.
    spill: Vec<u8>,
    spill_at: usize,
    /// Bytes handed to h2 since a read last returned `Pending`.
    read_run: usize,
    write: WriteState,
    /// Plaintext accepted from h2 and not yet handed to the writer.
    staged: Vec<u8>,
    watch: FrameWatch,
    sent: OutWatch,
    signals: Rc<Signals>,
}

impl H2Io {
    /// Wraps both halves of an established connection.
    pub fn new(
        reader: TlsReader,
        writer: TlsWriter,
        watch: FrameWatch,
        signals: Rc<Signals>,
    ) -> H2Io {
        signals.after.set(writer.defer_after());
        H2Io {
            read: ReadState::Idle(reader),
            spill: Vec::new(),
            spill_at: 0,
            read_run: 0,
            write: WriteState::Idle(writer),
            staged: Vec::new(),
            watch,
            sent: OutWatch::default(),
            signals,
        }
    }

    /// Keeps the first typed failure and gives h2 an `io::Error` of the
    /// same kind.
    fn fail(&self, e: StreamError) -> io::Error {
        let kind = match &e {
            StreamError::Io(io) => io.kind(),
            StreamError::Truncated => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        let mut slot = self.signals.failed.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        }
        io::Error::from(kind)
    }

    /// Drives the write in flight; starts the staged one when idle.
    /// `Ready(Ok)` once nothing is in flight (staged bytes remain only if
    /// `start` is false).
    fn drive_write(&mut self, cx: &mut Context<'_>, start: bool) -> Poll<io::Result<()>> {
        loop {
            if start && !self.staged.is_empty() && matches!(self.write, WriteState::Idle(_)) {
                self.promote()?;
            }
            match std::mem::replace(&mut self.write, WriteState::Gone) {
                WriteState::Idle(w) if start && !self.staged.is_empty() => {
                    let out = std::mem::take(&mut self.staged);
                    let mut w = w;
                    self.write = WriteState::Busy {
                        fut: Box::pin(async move {
                            let (r, buf) = w.write_all(out).await;
                            crate::buffers::give(buf);
                            (w, r)
                        }),
                        closing: false,
                    };
                }
                s @ (WriteState::Idle(_) | WriteState::Closed) => {
                    self.write = s;
                    return Poll::Ready(Ok(()));
                }
                WriteState::Busy { mut fut, closing } => match fut.as_mut().poll(cx) {
                    Poll::Pending => {
                        self.write = WriteState::Busy { fut, closing };
                        return Poll::Pending;
                    }
                    Poll::Ready((mut w, r)) => {
                        if self.staged.is_empty() && self.signals.idle.get() {
                            w.release_buffers();
                        }
                        self.write = if closing {
                            WriteState::Closed
                        } else {
                            WriteState::Idle(w)
                        };
                        r.map_err(|e| self.fail(e))?;
                    }
                },
                WriteState::Gone => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            }
        }
    }

    /// A connection rustls carries until its first bulk transfer: when a
    /// stream announced one (`Signals::bulk_ahead`), the keys go to the
    /// kernel now, with no write in flight: before a direct write, or
    /// before a staged batch starts (staged bytes are plaintext, not yet
    /// sealed, so they go out on the kernel's records). The writer's
    /// `bulk_ahead` also waits for a record boundary on the read side: a
    /// later write tries again.
    fn promote(&mut self) -> io::Result<()> {
        let bytes = self.signals.bulk.get();
        if bytes == 0 {
            return Ok(());
        }
        let WriteState::Idle(w) = &mut self.write else {
            return Ok(());
        };
        // `Signals::bulk_ahead` keeps only announcements of `after` bytes or
        // more; the writer checks the size again, and the boundary.
        match w.bulk_ahead(bytes) {
            Ok(true) => {
                self.signals.bulk.set(0);
                self.signals.promoted.set(true);
                self.signals.kernel.set(true);
            }
            // Not deferred any more (the hand-over found the client gone and
            // left the connection on rustls): nothing more to announce.
            Ok(false) if w.defer_after().is_none() => {
                self.signals.bulk.set(0);
                self.signals.after.set(None);
            }
            // Not at a record boundary yet: the next write tries again.
            Ok(false) => {}
            Err(e) => return Err(self.fail(e)),
        }
        Ok(())
    }

    /// Records `n` bytes of `bufs` as sent (or staged: they go out in
    /// this order).
    fn sent(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let mut malformed = 0;
        for b in bufs {
            if n == 0 {
                break;
            }
            let k = b.len().min(n);
            malformed += self.sent.feed(&b[..k]);
            n -= k;
        }
        if malformed > 0 {
            let m = &self.signals.malformed;
            m.set(m.get() + malformed);
        }
        self.signals.data_sent.set(self.sent.data_sent());
    }

    fn stage(&mut self, bufs: &[io::IoSlice<'_>]) -> usize {
        if self.staged.capacity() == 0 {
            self.staged = crate::buffers::take(STAGE_MAX);
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(STAGE_MAX.saturating_sub(self.staged.len()));
            self.staged.extend_from_slice(&b[..take]);
            n += take;
            if take < b.len() {
                break;
            }
        }
        self.sent(bufs, n);
        n
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A flood flagged: nothing more is read of it. The connection loop
        // checks the flag after this poll and closes with GOAWAY; no wake
        // is registered for reading (a wake here would spin while that
        // GOAWAY waits for a client that does not read).
        if this.signals.flood.get() {
            return Poll::Pending;
        }
        // This turn's budget spent: not now. The wake (the connection
        // loop's own, not the task's) brings the loop back at once; after a
        // few turns it lets the shard's other tasks run first.
        if this.read_run >= READ_BUDGET {
            this.read_run = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let polled = this.read_into(cx, buf);
        match polled {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                this.read_run += got.len();
                if this.watch.feed(got) == Verdict::Flood {
                    this.signals.flood.set(true);
                }
            }
            Poll::Pending => this.read_run = 0,
            Poll::Ready(Err(_)) => {}
        }
        polled
    }
}

impl H2Io {
    fn read_into(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self;
        loop {
            if this.spill_at < this.spill.len() {
                let n = buf.remaining().min(this.spill.len() - this.spill_at);
                buf.put_slice(&this.spill[this.spill_at..this.spill_at + n]);
                this.spill_at += n;
                if this.spill_at == this.spill.len() {
                    crate::buffers::give(std::mem::take(&mut this.spill));
                    this.spill_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match std::mem::replace(&mut this.read, ReadState::Gone) {
                ReadState::Idle(mut r) => match r.try_read(buf) {
                    Ok(Attempt::Done(_)) => {
                        this.read = ReadState::Idle(r);
                        return Poll::Ready(Ok(()));
                    }
                    Ok(Attempt::WouldBlock) => {
                        this.read = ReadState::Busy(Box::pin(async move {
                            let res = r.input().await.map(|()| Some(Vec::new()));
                            (r, res.map_err(StreamError::from))
                        }))
                    }
                    Ok(Attempt::Slow) => {
                        this.read = ReadState::Busy(Box::pin(async move {
                            let res = r.read_chunk().await;
                            (r, res)
                        }))
                    }
                    Err(e) => {
                        this.read = ReadState::Idle(r);
                        return Poll::Ready(Err(this.fail(e)));
                    }
                },
                ReadState::Busy(mut f) => match f.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.read = ReadState::Busy(f);
                        return Poll::Pending;
                    }
                    Poll::Ready((r, res)) => {
                        this.read = ReadState::Idle(r);
                        match res {
                            // Data to hand out, or (empty) readiness: try again.
                            Ok(Some(chunk)) => {
                                this.spill = chunk;
                                this.spill_at = 0;
                            }
                            // End of the client's stream: nothing added.
                            Ok(None) => return Poll::Ready(Ok(())),
                            Err(e) => return Poll::Ready(Err(this.fail(e))),
                        }
                    }
                },
                ReadState::Gone => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        loop {
            // Order: what is staged or in flight goes first.
            if !this.staged.is_empty() || !matches!(this.write, WriteState::Idle(_)) {
                if let WriteState::Closed = this.write {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
                if this.staged.len() < STAGE_MAX {
                    // Still drive the write in flight, so progress does
                    // not wait for h2's flush.
                    let _ = this.drive_write(cx, false)?;
                    if this.staged.is_empty() && matches!(this.write, WriteState::Idle(_)) {
                        // It finished: this write starts the next batch
                        // (straight to the kernel, or after a hand-over).
                        continue;
                    }
                    return Poll::Ready(Ok(this.stage(bufs)));
                }
                std::task::ready!(this.drive_write(cx, true))?;
                continue;
            }
            this.promote()?;
            let WriteState::Idle(mut w) = std::mem::replace(&mut this.write, WriteState::Gone)
            else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            match w.try_write(bufs) {
                Ok(Attempt::Done(n)) => {
                    this.write = WriteState::Idle(w);
                    this.sent(bufs, n);
                    return Poll::Ready(Ok(n));
                }
                Ok(Attempt::WouldBlock) => {
                    this.write = WriteState::Busy {
                        fut: Box::pin(async move {
                            let res = w.writable().await.map_err(StreamError::from);
                            (w, res)
                        }),
                        closing: false,
                    };
                    std::task::ready!(this.drive_write(cx, false))?;
                }
                Ok(Attempt::Slow) => {
                    this.write = WriteState::Idle(w);
                    return Poll::Ready(Ok(this.stage(bufs)));
                }
                Err(e) => {
                    this.write = WriteState::Idle(w);
                    return Poll::Ready(Err(this.fail(e)));
                }
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            std::task::ready!(this.drive_write(cx, true))?;
            if this.staged.is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(Pin::new(&mut *this).poll_flush(cx))?;
        // After the flush the writer is idle or already closed.
        if matches!(this.write, WriteState::Idle(_)) {
            if let WriteState::Idle(mut w) = std::mem::replace(&mut this.write, WriteState::Gone) {
                // h2 reads nothing more once it shuts down.
                let read = std::mem::replace(&mut this.read, ReadState::Gone);
                // close_notify, then FIN (RFC 8446 §6.1), by the writer's
                // own close; then a lingering read.
                this.write = WriteState::Busy {
                    fut: Box::pin(async move {
                        let r = w.end().await;
                        if r.is_ok() {
                            linger(read).await;
                        }
                        (w, r)
                    }),
                    closing: true,
                };
            }
        }
        this.drive_write(cx, false)
    }
}
