//! The monoio pump around a sans-IO handshake ([`super::Handshake`] with a
//! client, [`super::client::ClientHandshake`] with a backend): owned-buffer
//! reads and writes on the socket, bounded by a deadline.

use std::time::Duration;

use monoio::buf::SliceMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::{Established, Handshake, HandshakeError, Step, MAX_RECORD};

/// The handshake's first read (see `drive`).
const FIRST_READ: usize = 4 << 10;

/// What the pump needs of a sans-IO handshake.
pub trait Driver: Sized {
    /// The finished handshake.
    type Done;
    /// Why it failed.
    type Error: From<std::io::Error>;
    /// Feeds bytes read from the peer (empty: the peer closed).
    fn handle_input(&mut self, bytes: &[u8]) -> Result<(), Self::Error>;
    /// Advances; says what the pump must do next.
    fn poll(&mut self) -> Result<Step, Self::Error>;
    /// The bytes to send now (given back with `output_sent`).
    fn take_output(&mut self) -> Vec<u8>;
    /// The output went out; its buffer, for reuse.
    fn output_sent(&mut self, buf: Vec<u8>);
    /// After `Step::Done`.
    fn finish(self) -> Self::Done;
    /// The error for a handshake that vanished (no driver left).
    fn eof() -> Self::Error;
    /// The error for a passed deadline.
    fn timeout() -> Self::Error;
}

impl Driver for Handshake {
    type Done = Established;
    type Error = HandshakeError;
    fn handle_input(&mut self, bytes: &[u8]) -> Result<(), HandshakeError> {
        Handshake::handle_input(self, bytes)
    }
    fn poll(&mut self) -> Result<Step, HandshakeError> {
        Handshake::poll(self)
    }
    fn take_output(&mut self) -> Vec<u8> {
        Handshake::take_output(self)
    }
    fn output_sent(&mut self, buf: Vec<u8>) {
        Handshake::output_sent(self, buf)
    }
    fn finish(self) -> Established {
        Handshake::finish(self)
    }
    fn eof() -> HandshakeError {
        HandshakeError::Eof
    }
    fn timeout() -> HandshakeError {
        HandshakeError::Timeout
    }
}

/// Drives `hs` to completion on `stream`, or fails after `deadline`.
///
/// On failure the best-effort alert rustls produced has already been sent.
pub async fn run<H: Driver>(
    stream: &mut TcpStream,
    hs: H,
    deadline: Duration,
) -> Result<H::Done, H::Error> {
    run_after(stream, hs, deadline, &[]).await
}

/// [`run`], with `first_bytes` of the TLS stream already read from
/// `stream` (after a PROXY protocol header).
pub async fn run_after<H: Driver>(
    stream: &mut TcpStream,
    hs: H,
    deadline: Duration,
    first_bytes: &[u8],
) -> Result<H::Done, H::Error> {
    let mut hs = Some(hs);
    let res = monoio::time::timeout(deadline, drive(stream, &mut hs, first_bytes)).await;
    match res {
        Ok(Ok(())) => hs.take().map(H::finish).ok_or_else(H::eof),
        Ok(Err(e)) => {
            if let Some(mut hs) = hs {
                let alert = hs.take_output();
                if !alert.is_empty() {
                    // Best effort, bounded: the peer may be gone already.
                    let _ =
                        monoio::time::timeout(Duration::from_millis(100), stream.write_all(alert))
                            .await;
                }
            }
            Err(e)
        }
        Err(_) => Err(H::timeout()),
    }
}

async fn drive<H: Driver>(
    stream: &mut TcpStream,
    slot: &mut Option<H>,
    first_bytes: &[u8],
) -> Result<(), H::Error> {
    let Some(hs) = slot.as_mut() else {
        return Err(H::eof());
    };
    if !first_bytes.is_empty() {
        hs.handle_input(first_bytes)?;
    }
    // The first read waits for the client's first bytes, for as long as
    // the deadline allows: a small buffer for it, so a connection that
    // sends nothing (a slowloris, or a flood of them) holds 4 KiB, not a
    // full record. A ClientHello fits (about 2 KiB with a post-quantum key
    // share); what follows gets a full record's room.
    let mut buf = Vec::with_capacity(FIRST_READ);
    let mut first = true;
    loop {
        match hs.poll()? {
            Step::Transmit => {
                let out = hs.take_output();
                let (res, out) = stream.write_all(out).await;
                res?;
                hs.output_sent(out);
            }
            Step::Read(limit) => {
                buf.clear();
                let mut want = limit.unwrap_or(MAX_RECORD).min(MAX_RECORD);
                if first {
                    want = want.min(FIRST_READ);
                    first = false;
                } else {
                    buf.reserve(want);
                }
                let (res, b) = stream.read(SliceMut::new(buf, 0, want)).await;
                buf = b.into_inner();
                let n = res?;
                hs.handle_input(&buf[..n])?;
            }
            Step::Done => return Ok(()),
        }
    }
}
