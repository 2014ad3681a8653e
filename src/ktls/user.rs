//! The userspace record path: rustls seals and opens every record after
//! the handshake (no kTLS in the kernel, or a cipher it lacks). Sans-IO:
//! ciphertext in, plaintext out and the reverse; `stream.rs` moves the
//! bytes.

use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};

use super::stream::StreamError;
use crate::handshake::{self, complete_records, Unbuffered};

/// rustls' connection on the userspace path, for either end.
pub(super) enum UserConn {
    /// ktern is the server: a client's connection.
    Server(UnbufferedServerConnection),
    /// ktern is the client: a backend's connection.
    Client(UnbufferedClientConnection),
}

/// rustls state on the userspace path.
pub(super) struct User {
    pub(super) conn: UserConn,
    /// Ciphertext of a partly received record. Every `process_tls_records`
    /// call, from either half, must pass this same buffer: rustls remembers
    /// how far into it a fragmented handshake message was joined, and an
    /// empty slice in its place makes it index out of bounds (found by the
    /// `handshake` fuzz target).
    pub(super) inbuf: Vec<u8>,
    /// Ciphertext queued by either half. The writer sends it with its
    /// records; the reader sends what rustls queued while reading (a
    /// `no_renegotiation` warning; rustls holds a KeyUpdate reply itself,
    /// see `reply_owed`) at once, when no write is in flight.
    pub(super) tls_out: Vec<u8>,
    /// How many bytes at the start of `tls_out` may wait for the writer's
    /// first records: the handshake's held tickets (see
    /// `Established::unsent`). The reader sends `tls_out` itself only when
    /// there is more than these, or when a tunnel's client sends more
    /// before any answer (`TlsReader::release_held`).
    pub(super) lazy: usize,
    /// The writer has sealed records on their way out: the reader must not
    /// send (its bytes would land inside the writer's).
    pub(super) writing: bool,
    /// rustls failed on the client's bytes and queued its fatal alert:
    /// nothing may call rustls again (it would try to queue a second alert;
    /// a debug assertion in rustls), only `abort` sends what is queued.
    pub(super) failed: bool,
    /// The keys may still go to the kernel (`runtime.ktls_after`).
    pub(super) defer: Option<Deferral>,
    /// The client sent a record that was not application data (a TLS 1.3
    /// KeyUpdate) since ktern last sealed one. rustls answers a KeyUpdate
    /// asking for ours by switching its sending key at once and holding
    /// the reply, sealed under the old key, until it seals the next
    /// application record; the reply is not in what it queues to send, and
    /// a hand-over to the kernel then would give the kernel the new key
    /// while the reply was never sent (the client cannot read another
    /// record). The keys move only once a record went out after it.
    pub(super) reply_owed: bool,
}

/// A connection carried by rustls for now whose keys go to the kernel
/// when it starts a bulk transfer (`TlsWriter::bulk_ahead`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Deferral {
    /// Bytes of one bulk transfer (an HTTP/1.1 response, a tunnel's burst)
    /// from which the kernel takes over.
    pub(super) after: u64,
    /// The running kernel installs new keys (KeyUpdate, Linux 6.13+).
    pub(super) rekey: bool,
}

impl User {
    /// The userspace path for a connection rustls finished the handshake on.
    pub(super) fn new(conn: UserConn) -> User {
        User {
            conn,
            inbuf: Vec::new(),
            tls_out: Vec::new(),
            lazy: 0,
            writing: false,
            failed: false,
            defer: None,
            reply_owed: false,
        }
    }

    /// Queues records the handshake sealed but held back, to go out with
    /// the first records the writer sends.
    pub(super) fn hold(&mut self, sealed: Vec<u8>) {
        if !sealed.is_empty() {
            self.lazy = sealed.len();
            self.tls_out = sealed;
        }
    }

    /// Takes the queued ciphertext to send it.
    pub(super) fn take_out(&mut self) -> Vec<u8> {
        self.lazy = 0;
        std::mem::take(&mut self.tls_out)
    }
}

/// Runs rustls over `u.inbuf` until it needs more bytes, collecting plaintext.
pub(super) fn decrypt_available(
    u: &mut User,
    plain: &mut Vec<u8>,
    eof: &mut bool,
) -> Result<(), StreamError> {
    // Complete records now in `inbuf`: rustls consumes each whole (one
    // holding part of a handshake message stays, and is not counted again).
    let records = complete_records(&u.inbuf);
    let opened = match &mut u.conn {
        UserConn::Server(c) => decrypt(c, &mut u.inbuf, &mut u.tls_out, &mut u.failed, plain, eof),
        // Not counted: only a client's connection is deferred (a backend's
        // keys go to the kernel at its handshake or never), and a
        // backend's tickets (RFC 8446 §4.6.1) would read as owing a reply.
        UserConn::Client(c) => {
            decrypt(c, &mut u.inbuf, &mut u.tls_out, &mut u.failed, plain, eof)?;
            return Ok(());
        }
    }?;
    // Fewer application records than records read: one was a KeyUpdate
    // (the only post-handshake message a server takes), or an empty record
    // rustls does not hand on; either way the hand-over waits for the
    // next sealed record, which carries any reply out first.
    if opened < records.saturating_sub(complete_records(&u.inbuf)) {
        u.reply_owed = true;
    }
    Ok(())
}

/// Returns how many application records were opened.
fn decrypt<C: Unbuffered>(
    conn: &mut C,
    inbuf: &mut Vec<u8>,
    tls_out: &mut Vec<u8>,
    failed: &mut bool,
    plain: &mut Vec<u8>,
    eof: &mut bool,
) -> Result<usize, StreamError> {
    // Plaintext is never longer than the ciphertext holding it.
    plain.reserve(inbuf.len());
    // Records read so far: removed from `inbuf` once at the end. (Draining
    // after each record shifted the rest of the buffer every time: a 64 KiB
    // read of four records moved 96 KiB, the largest copy on the userspace
    // record path.)
    let mut consumed = 0;
    let mut opened = 0;
    let result = loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut inbuf[consumed..]);
        let mut stop = false;
        let res: Result<(), StreamError> = match state {
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                let mut res = Ok(());
                while let Some(rec) = r.next_record() {
                    match rec {
                        Ok(rec) => {
                            plain.extend_from_slice(rec.payload);
                            opened += 1;
                        }
                        Err(e) => {
                            res = Err(e.into());
                            break;
                        }
                    }
                }
                res
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                handshake::encode(tls_out, |o| enc.encode(o))
                    .map_err(|_| StreamError::Unexpected("encode"))
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                Ok(())
            }
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                *eof = true;
                stop = true;
                Ok(())
            }
            Ok(_) => {
                stop = true;
                Ok(())
            }
            Err(e) => Err(e.into()),
        };
        consumed += discard;
        if res.is_err() || stop {
            break res;
        }
    };
    inbuf.drain(..consumed);
    match result {
        Err(e) => {
            // rustls queued a fatal alert; the writer flushes it on abort.
            handshake::collect_alert(conn, inbuf, tls_out);
            *failed = true;
            Err(e)
        }
        Ok(()) => {
            if *eof {
                inbuf.clear();
            }
            Ok(opened)
        }
    }
}

/// What one writer-side step of rustls asked for.
enum WriteStep {
    /// Handshake data was queued; ask again.
    Again,
    /// Done (the closure ran against `WriteTraffic`).
    Done(Result<(), StreamError>),
}

/// What the writer asks of rustls once it offers `WriteTraffic`.
#[derive(Clone, Copy)]
enum WriteOp<'a> {
    /// Seal this plaintext (`guess`: the ciphertext size expected).
    Encrypt(&'a [u8], usize),
    /// Queue close_notify.
    CloseNotify,
}

/// Drives rustls until it offers `WriteTraffic`, encoding anything it
/// queued first, then does `op` on it (rustls writes a KeyUpdate reply it
/// holds inside `encrypt`, before the record).
fn with_write_traffic(u: &mut User, op: WriteOp<'_>) -> Result<(), StreamError> {
    if u.failed {
        return Err(StreamError::Unexpected("the connection failed"));
    }
    match &mut u.conn {
        UserConn::Server(c) => write_traffic(c, &mut u.inbuf, &mut u.tls_out, op),
        UserConn::Client(c) => write_traffic(c, &mut u.inbuf, &mut u.tls_out, op),
    }
}

fn write_traffic<C: Unbuffered>(
    conn: &mut C,
    inbuf: &mut Vec<u8>,
    tls_out: &mut Vec<u8>,
    op: WriteOp<'_>,
) -> Result<(), StreamError> {
    loop {
        let UnbufferedStatus { discard, state } = conn.process(inbuf);
        let step = match state {
            Err(e) => WriteStep::Done(Err(e.into())),
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                match handshake::encode(tls_out, |o| enc.encode(o)) {
                    Ok(()) => WriteStep::Again,
                    Err(_) => WriteStep::Done(Err(StreamError::Unexpected("encode"))),
                }
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                WriteStep::Again
            }
            Ok(ConnectionState::WriteTraffic(mut wt)) => WriteStep::Done(match op {
                WriteOp::Encrypt(plain, guess) => handshake::encode_sized(tls_out, guess, |o| {
                    wt.encrypt(plain, o)
                })
                .map_err(|e| match e {
                    handshake::HandshakeError::Tls(t) => StreamError::Tls(t),
                    _ => StreamError::ConfidentialityLimit,
                }),
                WriteOp::CloseNotify => handshake::encode(tls_out, |o| wt.queue_close_notify(o))
                    .map_err(|_| StreamError::Unexpected("close_notify")),
            }),
            // Peer closed its side; we may still send (half-close).
            Ok(ConnectionState::PeerClosed) => WriteStep::Again,
            Ok(_) => WriteStep::Done(Err(StreamError::Unexpected(
                "cannot write in this TLS state",
            ))),
        };
        // The reader leaves no complete record in `inbuf`, so nothing is
        // processed here; honour a discard anyway.
        if discard > 0 {
            inbuf.drain(..discard);
        }
        if let WriteStep::Done(r) = step {
            return r;
        }
    }
}

/// Encrypts `plain` (after any handshake messages rustls has queued, e.g. a
/// KeyUpdate reply) into `u.tls_out`.
pub(super) fn seal_userspace(u: &mut User, plain: &[u8]) -> Result<(), StreamError> {
    // Per record: 5-byte header, content type byte, 16-byte tag (RFC 8446
    // §5.2); TLS 1.2 adds an 8-byte explicit nonce. 32 covers both.
    let guess = plain.len() + 32 * (plain.len() / (16 << 10) + 1);
    if u.tls_out.is_empty() && u.tls_out.capacity() < guess {
        // Seal into a buffer of the shard's cache where the batch fits a
        // class: a large batch into the one large size (`buffers::CLASS`),
        // a small one (a small response, after the connection gave its
        // buffer back while idle) into a 4 KiB one, not a fresh
        // allocation of this size each time.
        let old = std::mem::replace(&mut u.tls_out, crate::buffers::take(guess));
        crate::buffers::give(old);
    }
    with_write_traffic(u, WriteOp::Encrypt(plain, guess))?;
    // rustls writes a held KeyUpdate reply before a record it seals (not
    // for an empty write, which seals nothing).
    u.reply_owed &= plain.is_empty();
    Ok(())
}

pub(super) fn queue_close_notify(u: &mut User) -> Result<(), StreamError> {
    with_write_traffic(u, WriteOp::CloseNotify)
}
