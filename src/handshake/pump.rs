//! The monoio pump around [`super::Handshake`]: owned-buffer reads and writes
//! on the accepted socket, bounded by the handshake deadline.

use std::time::Duration;

use monoio::buf::SliceMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::{Established, Handshake, HandshakeError, Step, MAX_RECORD};

/// Drives `hs` to completion on `stream`, or fails after `deadline`.
///
/// On failure the best-effort alert rustls produced has already been sent.
pub async fn run(
    stream: &mut TcpStream,
    hs: Handshake,
    deadline: Duration,
) -> Result<Established, HandshakeError> {
    run_after(stream, hs, deadline, &[]).await
}

/// [`run`], with `first_bytes` of the TLS stream already read from
/// `stream` (after a PROXY protocol header).
pub async fn run_after(
    stream: &mut TcpStream,
    hs: Handshake,
    deadline: Duration,
    first_bytes: &[u8],
) -> Result<Established, HandshakeError> {
    let mut hs = Some(hs);
    let res = monoio::time::timeout(deadline, drive(stream, &mut hs, first_bytes)).await;
    match res {
        Ok(Ok(())) => Ok(hs
            .take()
            .map(Handshake::finish)
            .ok_or(HandshakeError::Eof)?),
        Ok(Err(e)) => {
            if let Some(mut hs) = hs {
                let alert = hs.take_output();
                if !alert.is_empty() {
                    // Best effort, bounded: the client may be gone already.
                    let _ =
                        monoio::time::timeout(Duration::from_millis(100), stream.write_all(alert))
                            .await;
                }
            }
            Err(e)
        }
        Err(_) => Err(HandshakeError::Timeout),
    }
}

async fn drive(
    stream: &mut TcpStream,
    slot: &mut Option<Handshake>,
    first_bytes: &[u8],
) -> Result<(), HandshakeError> {
    let Some(hs) = slot.as_mut() else {
        return Err(HandshakeError::Eof);
    };
    if !first_bytes.is_empty() {
        hs.handle_input(first_bytes)?;
    }
    let mut buf = Vec::with_capacity(MAX_RECORD);
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
                let want = limit.unwrap_or(MAX_RECORD).min(MAX_RECORD);
                let (res, b) = stream.read(SliceMut::new(buf, 0, want)).await;
                buf = b.into_inner();
                let n = res?;
                hs.handle_input(&buf[..n])?;
            }
            Step::Done => return Ok(()),
        }
    }
}
