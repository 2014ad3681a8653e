//! Hostile bytes as an HTTP/1.1 request head, then as a response head, each
//! through its forwarding rewrite: refusals are fine, panics are not, and an
//! accepted head must re-parse to the same framing after rewriting.
#![no_main]

use ktern::proxy::http::{head, rewrite};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = head::Limits::default();
    // A connection's read buffer gives up exactly the head that
    // `parse_request` reads from the same bytes, and keeps what follows.
    let parsed = head::parse_request(data, &limits);
    let mut buf = data.to_vec();
    match (&parsed, head::parse_request_in(&mut buf, &limits)) {
        (Ok(None), Ok(None)) => assert_eq!(buf, data),
        (Ok(Some(a)), Ok(Some(b))) => {
            assert_eq!((a.len, a.framing, a.target()), (b.len, b.framing, b.target()));
            assert!(a.fields.iter().eq(b.fields.iter()));
            assert_eq!(buf, &data[a.len..]);
        }
        (Err(a), Err(b)) => assert_eq!(a, &b),
        (a, b) => panic!("parse_request {a:?} but parse_request_in {b:?}"),
    }
    // The same bytes arriving in pieces (cut where the input's own bytes
    // say), parsed when `HeadPacer` says: a head read whole is read the
    // same in pieces (less the empty lines before it, which the pacer
    // drops), and is never left waiting once all of it is there.
    if let Ok(Some(whole)) = &parsed {
        let (mut buf, mut pacer, mut fed, mut got) = (Vec::new(), head::HeadPacer::default(), 0, None);
        while got.is_none() && fed < data.len() {
            let step = 1 + usize::from(data[fed] % 7);
            let end = (fed + step).min(data.len());
            buf.extend_from_slice(&data[fed..end]);
            fed = end;
            if pacer.ready(&mut buf) {
                match head::parse_request_in(&mut buf, &limits) {
                    Ok(None) => {}
                    done => got = Some(done),
                }
            }
        }
        match got {
            Some(Ok(Some(paced))) => assert_eq!(
                (paced.framing, paced.target(), paced.method()),
                (whole.framing, whole.target(), whole.method())
            ),
            // Refused sooner in pieces: only for a limit, which a prefix can
            // already break (the whole is refused too when over it).
            Some(Err(e)) => assert_eq!(e.status(), 431, "{e:?}"),
            other => panic!("paced {other:?}, whole head at {}", whole.len),
        }
    }
    if let Ok(Some(req)) = parsed {
        let id = ktern::handshake::client_auth::ClientIdentity {
            subject: "CN=svc, O=Example".into(),
            common_name: Some("svc".into()),
            sans: "DNS:svc.example".into(),
            fingerprint: "00".repeat(32).into(),
        };
        let fwd = rewrite::Forwarding {
            client: std::net::SocketAddr::from(([192, 0, 2, 1], 1234)),
            trusted: data.len() % 2 == 0,
            x_forwarded: true,
            forwarded: true,
            // The client-certificate fields: forged ones always dropped,
            // ours added when the listener asks for a certificate.
            client_cert: match data.len() % 3 {
                0 => None,
                1 => Some(("NONE", None)),
                _ => Some(("SUCCESS", Some(&id))),
            },
        };
        let mut out = Vec::new();
        rewrite::request(&req, &fwd, &mut out);
        // What we send upstream must be framed exactly as what we accepted.
        // The rewrite adds up to nine fields and some bytes; allow for them.
        let relaxed = head::Limits { head: 1 << 20, headers: limits.headers + 12, ..limits };
        match head::parse_request(&out, &relaxed) {
            Ok(Some(again)) => assert_eq!(again.framing, req.framing),
            other => panic!("rewritten head does not parse: {other:?}\n{}", String::from_utf8_lossy(&out)),
        }
    }
    // A response ktern relays must be framed for the client exactly as
    // ktern read it from the backend.
    if let Ok(Some(resp)) = head::parse_response(data, "GET", 16 << 10) {
        let mut out = Vec::new();
        let persist = [head::Persist::Close, head::Persist::Keep, head::Persist::KeepHttp10];
        rewrite::response(&resp, persist[data.len() % 3], &[], &mut out);
        match head::parse_response(&out, "GET", 1 << 20) {
            Ok(Some(again)) => assert_eq!(again.framing, resp.framing),
            // The rewrite adds up to two fields, which can pass the
            // parser's 128 when the backend sent nearly that many.
            Err(head::ResponseError::TooLarge) if resp.fields.iter().count() > 124 => {}
            other => panic!("rewritten response does not parse: {other:?}\n{}", String::from_utf8_lossy(&out)),
        }
    }
});
