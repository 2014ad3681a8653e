//! A Rust HTTP/2 client (h2 over tokio-rustls on a current-thread tokio
//! runtime), for the HTTP/2 tests that also run in the kTLS VM, where
//! there is no curl, nghttp or Python.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;

use super::Pki;

/// The shared test client config (TLS 1.3, trusting `pki`), offering
/// `alpn`.
pub fn tls_config(pki: &Pki, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut cfg = (*super::client_config(&[&pki.der])).clone();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// A current-thread runtime for one test, whose tasks run on its thread
/// (`tokio::task::spawn_local`): ktern's h2 keeps a connection's stream
/// state in `Rc`s (`vendor/README.md`), so its handles are not `Send`.
pub struct Runtime {
    rt: tokio::runtime::Runtime,
    local: tokio::task::LocalSet,
}

impl Runtime {
    /// Runs `f` to its end, with the tasks it spawns.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.local.block_on(&self.rt, f)
    }
}

/// A [`Runtime`] for one test.
pub fn runtime() -> Runtime {
    Runtime {
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        local: tokio::task::LocalSet::new(),
    }
}

/// Connects, negotiates `h2` and starts the connection task.
pub async fn connect(addr: SocketAddr, pki: &Pki) -> SendRequest<Bytes> {
    connect_with(addr, pki, &h2::client::Builder::new()).await
}

/// [`connect`] with the client's settings from `builder`.
pub async fn connect_with(
    addr: SocketAddr,
    pki: &Pki,
    builder: &h2::client::Builder,
) -> SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls_config(pki, &[b"h2", b"http/1.1"]))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN");
    let (send, conn) = builder.handshake(tls).await.unwrap();
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    send
}

/// One finished exchange.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub trailers: Option<http::HeaderMap>,
}

/// Sends `method path` with `body` in `chunk`-sized DATA frames (declaring
/// its length when `declare`), reads the whole response.
pub async fn request(
    send: &mut SendRequest<Bytes>,
    method: &str,
    path: &str,
    body: &[u8],
    chunk: usize,
    declare: bool,
) -> Result<Reply, h2::Error> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"));
    if declare {
        req = req.header("content-length", body.len());
    }
    let req = req.body(()).unwrap();
    let ready = send.clone().ready().await?;
    *send = ready;
    let (resp, mut stream) = send.send_request(req, body.is_empty())?;
    if !body.is_empty() {
        for part in body.chunks(chunk) {
            stream.reserve_capacity(part.len());
            while stream.capacity() < part.len() {
                match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
            stream.send_data(Bytes::copy_from_slice(part), false)?;
        }
        stream.send_data(Bytes::new(), true)?;
    }
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut recv = resp.into_body();
    let mut out = Vec::new();
    while let Some(d) = recv.data().await {
        let d = d?;
        recv.flow_control().release_capacity(d.len()).unwrap();
        out.extend_from_slice(&d);
    }
    let trailers = recv.trailers().await?;
    Ok(Reply {
        status,
        headers,
        body: out,
        trailers,
    })
}

/// An open WebSocket over HTTP/2 (RFC 8441): the response's status and
/// fields, and the stream both ways.
pub struct WebSocket {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub recv: h2::RecvStream,
    pub send: h2::SendStream<Bytes>,
}

/// Whether the server's SETTINGS offer extended CONNECT (RFC 8441 §3),
/// read after one finished request (bounded as [`get`] is).
pub async fn extended_connect_offered(send: &mut SendRequest<Bytes>) -> bool {
    // A finished exchange means every SETTINGS sent before its response
    // was read.
    let _ = get(send, "/").await;
    send.is_extended_connect_protocol_enabled()
}

/// Opens a WebSocket to `path` with an extended CONNECT (`:protocol`
/// websocket, `sec-websocket-version: 13` and `fields`).
pub async fn websocket(
    send: &mut SendRequest<Bytes>,
    path: &str,
    fields: &[(&str, &str)],
) -> Result<WebSocket, h2::Error> {
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://localhost{path}"))
        .header("sec-websocket-version", "13");
    for (n, v) in fields {
        req = req.header(*n, *v);
    }
    let mut req = req.body(()).unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let ready = send.clone().ready().await?;
    *send = ready;
    let (resp, stream) = send.send_request(req, false)?;
    let resp = tokio::time::timeout(Duration::from_secs(20) * super::slow(), resp)
        .await
        .expect("WebSocket response in time")?;
    Ok(WebSocket {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        recv: resp.into_body(),
        send: stream,
    })
}

/// POSTs `n` bytes to `path` (declaring their length when `declare`), all
/// queued at once (h2 sends them as the windows open, and drops what is
/// left when the stream ends), and waits for the response head: for
/// answers given before the body is read.
#[allow(dead_code)] // Not every test binary uploads.
pub async fn upload_queued(
    c: &mut SendRequest<Bytes>,
    path: &str,
    n: usize,
    declare: bool,
) -> http::Response<h2::RecvStream> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"));
    if declare {
        req = req.header("content-length", n);
    }
    let req = req.body(()).unwrap();
    *c = c.clone().ready().await.unwrap();
    let (resp, mut upload) = c.send_request(req, false).unwrap();
    upload.send_data(vec![7u8; n].into(), true).unwrap();
    tokio::time::timeout(Duration::from_secs(30) * super::slow(), resp)
        .await
        .expect("an answer in time")
        .expect("the backend's answer, not a reset")
}

/// The whole body of `resp`, and when it ended.
#[allow(dead_code)] // Not every test binary reads bodies this way.
pub async fn body_ended(resp: http::Response<h2::RecvStream>) -> (Vec<u8>, std::time::Instant) {
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(d) = next_data(&mut body).await {
        got.extend_from_slice(&d);
    }
    (got, std::time::Instant::now())
}

/// The next bytes `recv` carries (their window released; empty DATA
/// frames, as an END_STREAM of its own, are skipped), `None` at
/// END_STREAM; fails the test after 20 s.
pub async fn next_data(recv: &mut h2::RecvStream) -> Option<Bytes> {
    loop {
        let d = tokio::time::timeout(Duration::from_secs(20) * super::slow(), recv.data())
            .await
            .expect("DATA in time")?
            .expect("DATA");
        if !d.is_empty() {
            recv.flow_control().release_capacity(d.len()).unwrap();
            return Some(d);
        }
    }
}

/// A WebSocket over HTTP/2 to the test backend's `/ws`
/// (`http::start_http_backend`): its greeting ("hi", sent with its 101),
/// an echo of each message (one larger than a DATA frame), and after the
/// client's END_STREAM, a half-close, the backend's "bye" and the stream's
/// end. The response's fields (status 200 checked).
pub async fn websocket_round_trip(
    send: &mut SendRequest<Bytes>,
    fields: &[(&str, &str)],
) -> http::HeaderMap {
    let mut ws = websocket(send, "/ws", fields).await.unwrap();
    assert_eq!(ws.status, 200);
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend_from_slice(&next_data(&mut ws.recv).await.unwrap());
    }
    assert_eq!(got, b"hi");
    let big = super::pattern(200_000, 3);
    for msg in [&b"ping"[..], &big] {
        ws.send
            .send_data(Bytes::copy_from_slice(msg), false)
            .unwrap();
        let mut echo = Vec::new();
        while echo.len() < msg.len() {
            echo.extend_from_slice(&next_data(&mut ws.recv).await.unwrap());
        }
        assert_eq!(echo, msg);
    }
    ws.send.send_data(Bytes::new(), true).unwrap();
    let mut after = Vec::new();
    while let Some(d) = next_data(&mut ws.recv).await {
        after.extend_from_slice(&d);
    }
    assert_eq!(after, b"bye");
    ws.headers
}

/// `request` with a deadline, for tests that must not hang (four times
/// longer in the VM, whose emulated CPU moves a 64 MiB body in about a
/// minute).
pub async fn get(send: &mut SendRequest<Bytes>, path: &str) -> Reply {
    tokio::time::timeout(
        Duration::from_secs(60) * super::slow(),
        request(send, "GET", path, b"", 1, false),
    )
    .await
    .expect("response in time")
    .expect("response")
}

/// The TLS stream under an h2 client, able to send a TLS 1.3 KeyUpdate
/// (with update_requested) before its next write.
pub struct Rekeying {
    inner: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    pub trigger: Arc<std::sync::atomic::AtomicBool>,
}

impl tokio::io::AsyncRead for Rekeying {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rekeying {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self
            .trigger
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.inner.get_mut().1.refresh_traffic_keys().unwrap();
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// [`connect`] over a [`Rekeying`] stream; set the flag to send a
/// KeyUpdate before the next request.
pub async fn connect_rekeying(
    addr: SocketAddr,
    pki: &Pki,
) -> (SendRequest<Bytes>, Arc<std::sync::atomic::AtomicBool>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls_config(pki, &[b"h2"]))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let trigger = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = Rekeying {
        inner: tls,
        trigger: trigger.clone(),
    };
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    (send, trigger)
}
