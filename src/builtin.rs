//! The small HTTP/1.1 backend behind the embedded default config, so that
//! `ktern run` with no config answers a browser or curl. It runs on its own
//! plain thread, outside the shards; it is a demo, not a web server.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

/// The body every request gets.
pub const BODY: &str = "hello from ktern's built-in backend\n";

/// A self-signed certificate and key (PEM) for `names`, made with rcgen: the
/// embedded default's certificate, and the one tests trust directly.
pub fn self_signed(names: &[&str]) -> Result<(String, String), rcgen::Error> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::generate_simple_self_signed(names)?;
    Ok((cert.cert.pem(), cert.signing_key.serialize_pem()))
}

/// Starts the backend on an ephemeral loopback port and returns its address.
pub fn start() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("ktern-builtin-backend".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = std::thread::Builder::new()
                    .name("ktern-builtin-conn".into())
                    .spawn(move || serve(conn));
            }
        })?;
    Ok(addr)
}

/// Answers each request head on a keep-alive connection with 200 and [`BODY`].
/// Request bodies are not expected (GET/HEAD); the connection closes on EOF.
fn serve(conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(60)));
    // `&TcpStream` reads and writes: one fd for both directions.
    let mut out = io::BufWriter::new(&conn);
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    loop {
        // Read one request head (up to the blank line), capped at 64 KiB.
        let mut head_len = 0;
        let mut first = true;
        let mut head_only = false;
        let mut close = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(n) => head_len += n,
            }
            if first {
                head_only = line.starts_with("HEAD ");
                first = false;
            }
            close |= line.to_ascii_lowercase().starts_with("connection: close");
            if line == "\r\n" || line == "\n" || head_len > 64 << 10 {
                break;
            }
        }
        let body = if head_only { "" } else { BODY };
        let res = write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            BODY.len()
        )
        .and_then(|_| out.flush());
        if res.is_err() || close {
            return;
        }
    }
}
