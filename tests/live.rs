//! Live operations end to end: reload (good and bad, under load), listener
//! changes, drain, systemd notifications, cross-shard resumption, and the
//! refusal to share a port another program listens on.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::*;
use common::*;
use rustls::ClientConfig;

/// sha256 of the certificate the server presented.
fn served_cert(c: &Client) -> String {
    sha256(c.conn.peer_certificates().unwrap()[0].as_ref())
}

fn ktern_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ktern"))
}

/// A second certificate for `localhost` in `pki.dir`: (cert, key, der).
fn second_cert(
    pki: &Pki,
    tag: &str,
) -> (String, String, rustls::pki_types::CertificateDer<'static>) {
    use rustls::pki_types::pem::PemObject;
    let (cert, key) = ktern::builtin::self_signed(&["localhost"]).unwrap();
    let c = pki.dir.join(format!("{tag}.pem"));
    let k = pki.dir.join(format!("{tag}.key"));
    std::fs::write(&c, &cert).unwrap();
    std::fs::write(&k, &key).unwrap();
    (
        c.display().to_string(),
        k.display().to_string(),
        rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap(),
    )
}

/// An `http` listener on `address` with one rule to `upstream`, and the
/// upstream groups `(name, backend)`.
fn http_listener(
    address: &str,
    cert: &str,
    key: &str,
    upstream: &str,
    groups: &[(&str, SocketAddr)],
) -> String {
    let mut s = format!(
        "[[listener]]\nname = \"web\"\naddress = \"{address}\"\n[[listener.certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\n[listener.route]\nkind = \"http\"\n[[listener.route.rule]]\nupstream = \"{upstream}\"\n"
    );
    for (name, addr) in groups {
        s.push_str(&format!(
            "[upstream.{name}]\nbackends = [\"{addr}\"]\nresponse_timeout = \"10s\"\n"
        ));
    }
    s
}

fn runtime(extra: &str) -> String {
    format!("cpus = [0]\n{extra}")
}

/// Rewrites the running config's listeners part, keeping `[runtime]` and
/// `[admin]` (whose port 0 is fine: the admin address must not change,
/// and it does not, as written).
fn rewrite(k: &Ktern, pki: &Pki, rt: &str, listeners: &str) {
    std::fs::write(&k.config_path, Ktern::config_text(pki, rt, listeners)).unwrap();
}

fn reload_via_admin(k: &Ktern) -> (u16, serde_json::Value) {
    let (status, body) = k.admin_request("POST", "/reload");
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

#[derive(Default)]
struct LoadReport {
    ok: AtomicU64,
    errors: Mutex<Vec<String>>,
    names: Mutex<std::collections::BTreeSet<String>>,
}

impl LoadReport {
    fn error(&self, e: String) {
        self.errors.lock().unwrap().push(e);
    }

    /// Stops the workers, waits for them and asserts that not one request
    /// failed; returns how many succeeded.
    fn finish(&self, stop: &AtomicBool, workers: Vec<std::thread::JoinHandle<()>>) -> u64 {
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let errors = self.errors.lock().unwrap();
        let ok = self.ok.load(Ordering::Relaxed);
        assert!(
            errors.is_empty(),
            "{} failures out of {ok}: {:?}",
            errors.len(),
            &errors[..errors.len().min(10)]
        );
        ok
    }
}

/// Keep-alive client: request after request on one connection until the
/// server says `Connection: close` (after a reload or during a drain),
/// then a new connection. Every answer on one connection must come from
/// the same backend: a connection keeps the generation it started on.
fn keep_alive_worker(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    stop: Arc<AtomicBool>,
    rep: Arc<LoadReport>,
) {
    let mut conn: Option<(Client, Option<Vec<u8>>)> = None;
    while !stop.load(Ordering::Relaxed) {
        let (c, first) = match conn.as_mut() {
            Some(c) => c,
            None => match try_connect(addr, &cfg) {
                Ok(c) => conn.insert((c, None)),
                Err(e) => {
                    rep.error(format!("connect: {e}"));
                    continue;
                }
            },
        };
        match try_exchange(c, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n") {
            Ok(r) if r.status == 200 => {
                rep.ok.fetch_add(1, Ordering::Relaxed);
                match first {
                    None => *first = Some(r.body.clone()),
                    Some(f) if *f != r.body => rep.error(format!(
                        "keep-alive connection moved from {:?} to {:?}",
                        String::from_utf8_lossy(f),
                        String::from_utf8_lossy(&r.body)
                    )),
                    Some(_) => {}
                }
                if r.header("connection") == Some("close") {
                    conn = None;
                }
            }
            Ok(r) => rep.error(format!("keep-alive status {}", r.status)),
            Err(e) => {
                rep.error(format!("keep-alive request: {e}"));
                conn = None;
            }
        }
    }
}

/// New-connection client: connect, one request, close.
fn new_conn_worker(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    stop: Arc<AtomicBool>,
    rep: Arc<LoadReport>,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut c = match try_connect(addr, &cfg) {
            Ok(c) => c,
            Err(e) => {
                rep.error(format!("connect: {e}"));
                continue;
            }
        };
        match try_exchange(
            &mut c,
            "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ) {
            Ok(r) if r.status == 200 => {
                rep.ok.fetch_add(1, Ordering::Relaxed);
                rep.names
                    .lock()
                    .unwrap()
                    .insert(String::from_utf8_lossy(&r.body).into_owned());
            }
            Ok(r) => rep.error(format!("status {}", r.status)),
            Err(e) => rep.error(format!("request: {e}")),
        }
    }
}

#[test]
fn reload_under_load_changes_certificate_backend_and_route_with_no_failure() {
    let pki = Pki::new("live-reload-load");
    let (cert2, key2, der2) = second_cert(&pki, "second");
    let (a, b, c) = (
        start_http_backend("a"),
        start_http_backend("b"),
        start_http_backend("c"),
    );
    let (cert1, key1) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let rt = runtime("");
    // Version i: certificate 1 or 2, route to "a" or "b", and group b's
    // backend is b or c.
    let version = |i: usize| {
        let (cert, key) = if i.is_multiple_of(2) {
            (&cert1, &key1)
        } else {
            (&cert2, &key2)
        };
        let upstream = if i.is_multiple_of(3) { "a" } else { "b" };
        let b_backend = if i % 4 < 2 { b.addr } else { c.addr };
        http_listener(
            "127.0.0.1:0",
            cert,
            key,
            upstream,
            &[("a", a.addr), ("b", b_backend)],
        )
    };
    let mut k = Ktern::start(&pki, &rt, &version(0));
    let addr = k.addr();
    let cfg = client_config(&[&pki.der, &der2]);
    let stop = Arc::new(AtomicBool::new(false));
    let rep = Arc::new(LoadReport::default());
    let mut workers = Vec::new();
    for i in 0..4 {
        let (cfg, stop, rep) = (cfg.clone(), stop.clone(), rep.clone());
        workers.push(std::thread::spawn(move || {
            if i < 2 {
                keep_alive_worker(addr, cfg, stop, rep)
            } else {
                new_conn_worker(addr, cfg, stop, rep)
            }
        }));
    }
    for i in 1..=100usize {
        rewrite(&k, &pki, &rt, &version(i));
        let generation = i as u64 + 1;
        if i % 10 == 0 {
            // The command line: exit 0 and the generation.
            let out = ktern_cmd()
                .args(["reload", "--admin", &k.admin.to_string(), "-c"])
                .arg(&k.config_path)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                stdout.contains(&format!("generation {generation} is live")),
                "{stdout}"
            );
        } else if i % 7 == 0 {
            k.signal("HUP");
            assert_eq!(
                k.wait_metric("ktern_config_generation", generation),
                generation
            );
        } else {
            let (status, v) = reload_via_admin(&k);
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["generation"], generation, "{v}");
            assert_eq!(v["listeners"][0]["address"], addr.to_string(), "{v}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ok = rep.finish(&stop, workers);
    assert!(ok > 100, "too little load ran: {ok} requests");
    let names = rep.names.lock().unwrap();
    assert!(
        names.len() >= 2,
        "new connections should have seen the route and backend change: {names:?}"
    );
    // The last version (100) is live: certificate 1, route to b, b's backend b.
    // (A fresh client: a resumed session reports the certificate of the
    // session it resumed.)
    let mut client = try_connect(addr, &client_config(&[&pki.der, &der2])).unwrap();
    assert_eq!(served_cert(&client), sha256(pki.der.as_ref()));
    let r = try_exchange(&mut client, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    assert_eq!(r.body, b"b");
    assert_eq!(k.metric("ktern_reloads_total"), 100);
    assert_eq!(k.metric("ktern_reload_failures_total"), 0);
    assert_offloaded_in_vm(&k);
    assert!(k.wait_exit(Duration::ZERO).is_none(), "ktern exited");
}

/// Writes an RSA certificate and key with openssl: (cert, key).
fn rsa_cert(pki: &Pki) -> (String, String) {
    let c = pki.dir.join("rsa.pem");
    let k = pki.dir.join("rsa.key");
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&k)
        .arg("-out")
        .arg(&c)
        .output()
        .expect("openssl is needed for the RSA row (.ci/run installs it)")
        .status
        .success();
    assert!(ok, "openssl req failed");
    (c.display().to_string(), k.display().to_string())
}

#[test]
fn bad_reloads_are_refused_named_counted_and_the_old_certificate_keeps_serving() {
    let pki = Pki::new("live-bad-reload");
    let a = start_http_backend("a");
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let rt = runtime("");
    let good = http_listener("127.0.0.1:0", &cert, &key, "a", &[("a", a.addr)]);
    let k = Ktern::start(&pki, &rt, &good);
    let fingerprint = served_cert(&try_connect(k.addr(), &client_config(&[&pki.der])).unwrap());
    assert_eq!(fingerprint, sha256(pki.der.as_ref()));

    let (rsa_c, _rsa_key) = rsa_cert(&pki);
    let (_, other_key, _) = second_cert(&pki, "other");
    let garbage = pki.dir.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let unreadable = pki.dir.join("unreadable.key");
    std::fs::write(&unreadable, std::fs::read(&pki.key).unwrap()).unwrap();
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    let unreadable = if root {
        // root reads any file whatever its mode: a directory cannot be read
        // as one either, which takes the same error path.
        let d = pki.dir.join("unreadable-dir.key");
        std::fs::create_dir_all(&d).unwrap();
        d
    } else {
        Command::new("chmod")
            .arg("000")
            .arg(&unreadable)
            .status()
            .unwrap();
        unreadable
    };
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let g = garbage.display().to_string();
    let u = unreadable.display().to_string();
    let second_listener = |address: &str| {
        format!(
            "{good}[[listener]]\naddress = \"{address}\"\n[[listener.certificate]]\ncert = \"{cert}\"\nkey = \"{key}\"\n[listener.route]\nkind = \"tcp\"\nbackends = [\"{}\"]\n",
            a.addr
        )
    };
    let rows: Vec<(&str, String, &str, &str)> = vec![
        (
            "RSA certificate, EC key",
            http_listener("127.0.0.1:0", &rsa_c, &key, "a", &[("a", a.addr)]),
            "listener[0].certificate[0].key",
            "does not match",
        ),
        (
            "EC key of another certificate",
            http_listener("127.0.0.1:0", &cert, &other_key, "a", &[("a", a.addr)]),
            "listener[0].certificate[0].key",
            "does not match",
        ),
        (
            "garbage PEM",
            http_listener("127.0.0.1:0", &g, &key, "a", &[("a", a.addr)]),
            "listener[0].certificate[0].cert",
            "",
        ),
        (
            "missing file",
            http_listener(
                "127.0.0.1:0",
                "/nonexistent/ktern.pem",
                &key,
                "a",
                &[("a", a.addr)],
            ),
            "listener[0].certificate[0].cert",
            "/nonexistent/ktern.pem",
        ),
        (
            "unreadable file",
            http_listener("127.0.0.1:0", &cert, &u, "a", &[("a", a.addr)]),
            "listener[0].certificate[0].key",
            "",
        ),
        (
            "TOML syntax error",
            format!("{good}\n[[listener]\n"),
            "",
            "",
        ),
        (
            "unknown field",
            good.replace("kind = \"http\"", "kind = \"http\"\nfrobnicate = 1"),
            "listener[0].route.frobnicate",
            "unknown field `frobnicate`",
        ),
        (
            "address in use by another program",
            second_listener(&busy_addr.to_string()),
            "listener[1].address",
            "in use",
        ),
    ];
    let file = k.config_path.display().to_string();
    for (n, (what, listeners, field, reason)) in rows.iter().enumerate() {
        rewrite(&k, &pki, &rt, listeners);
        let (status, v) = reload_via_admin(&k);
        assert_eq!(status, 422, "{what}: {v}");
        assert_eq!(v["status"], "refused", "{what}: {v}");
        assert_eq!(v["generation"], 1, "{what}: {v}");
        let errors = v["errors"].as_array().unwrap();
        assert!(!errors.is_empty(), "{what}");
        assert!(
            errors.iter().any(|e| e["file"] == file.as_str()
                && e["field"].as_str().unwrap().starts_with(field)
                && e["reason"].as_str().unwrap().contains(reason)),
            "{what}: want {field} / {reason:?} in {v}"
        );
        // The command line says the same and exits 1.
        let out = ktern_cmd()
            .args(["reload", "--admin", &k.admin.to_string(), "-c"])
            .arg(&k.config_path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains("reload refused") && stderr.contains(&file),
            "{what}: {stderr}"
        );
        assert_eq!(
            k.metric("ktern_reload_failures_total"),
            2 * (n as u64 + 1),
            "{what}"
        );
        assert_eq!(k.metric("ktern_config_generation"), 1, "{what}");
        // A fresh client each time, so the handshake is full and the
        // certificate is really sent.
        let c = try_connect(k.addr(), &client_config(&[&pki.der]))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(c.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(
            served_cert(&c),
            fingerprint,
            "{what}: the old certificate must keep serving"
        );
    }
    // Each refusal is in the log with file, field and reason.
    let log = k.log();
    assert!(
        log.contains("reload refused") && log.contains("listener[1].address"),
        "{log}"
    );
    // The busy port is still the other program's alone.
    assert_eq!(
        TcpListener::bind(busy_addr).unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse
    );
    drop(busy);
    // And a good reload still works afterwards.
    rewrite(&k, &pki, &rt, &good);
    assert_eq!(reload_via_admin(&k).0, 200);
    assert_eq!(k.metric("ktern_config_generation"), 2);
}

#[test]
fn reload_without_a_running_ktern_says_so_and_exits_1() {
    let pki = Pki::new("live-no-ktern");
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let path = pki.dir.join("alone.toml");
    std::fs::write(&path, format!("[admin]\naddress = \"{free}\"\n")).unwrap();
    let out = ktern_cmd()
        .args(["reload", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("no running ktern answers at {free}")),
        "{stderr}"
    );
    // Without an [admin] address there is nothing to talk to: it says so.
    std::fs::write(&path, "[runtime]\n").unwrap();
    let out = ktern_cmd()
        .args(["reload", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [admin] address"));
}

#[test]
fn a_second_ktern_or_any_program_on_the_address_makes_start_fail() {
    let pki = Pki::new("live-busy");
    let backend = start_backend();
    let first = Ktern::start(&pki, "cpus = [0]", &tcp_listener(backend, ""));
    let taken = first.addr();
    // A running ktern's address.
    let listeners = tcp_listener(backend, "").replace("127.0.0.1:0", &taken.to_string());
    let path = pki.dir.join("second.toml");
    std::fs::write(&path, Ktern::config_text(&pki, "cpus = [0]", &listeners)).unwrap();
    let out = ktern_cmd().args(["run", "-c"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("listener[0].address") && stderr.contains("in use"),
        "{stderr}"
    );
    // Any other program's.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let listeners =
        tcp_listener(backend, "").replace("127.0.0.1:0", &other.local_addr().unwrap().to_string());
    let path = pki.dir.join("third.toml");
    std::fs::write(&path, Ktern::config_text(&pki, "cpus = [0]", &listeners)).unwrap();
    let out = ktern_cmd().args(["run", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    // The first ktern still gets every connection.
    download(taken, &pki, ClientOpts::default(), 1000);
}

#[test]
fn sighup_flood_ends_with_the_last_config_live_and_no_leak() {
    let pki = Pki::new("live-hup-flood");
    let (a, b) = (start_http_backend("a"), start_http_backend("b"));
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let rt = runtime("");
    let to = |u: &str| {
        http_listener(
            "127.0.0.1:0",
            &cert,
            &key,
            u,
            &[("a", a.addr), ("b", b.addr)],
        )
    };
    let k = Ktern::start(&pki, &rt, &to("a"));
    let cfg = client_config(&[&pki.der]);
    let ask = || {
        let mut c = try_connect(k.addr(), &cfg).unwrap();
        try_exchange(
            &mut c,
            "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .unwrap()
        .body
    };
    assert_eq!(ask(), b"a");
    let settle = |k: &Ktern| {
        // Reloads run one at a time; signals that arrive during one are
        // merged. Wait until the count stops moving.
        let mut last = k.metric("ktern_reloads_total");
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = k.metric("ktern_reloads_total");
            if now == last {
                return now;
            }
            last = now;
        }
    };
    let flood = |k: &Ktern, last: &str| {
        let started = Instant::now();
        for i in 0..100 {
            if i == 99 {
                rewrite(k, &pki, &rt, &to(last));
            }
            k.signal("HUP");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        settle(k)
    };
    flood(&k, "b");
    assert_eq!(ask(), b"b", "the last config must be live");
    // fds and threads once nothing is in flight (admin connections end on
    // their own thread, client connections close after their answer).
    let steady = |k: &Ktern| {
        let mut last = (0, 0);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = (k.fds(), k.threads());
            if now == last {
                return now;
            }
            last = now;
        }
    };
    let (fds, threads) = steady(&k);
    let rss = k.rss();
    let reloads = flood(&k, "a");
    assert_eq!(ask(), b"a", "the last config must be live");
    assert!(reloads >= 2);
    assert_eq!(k.metric("ktern_reload_failures_total"), 0);
    assert_eq!(
        steady(&k),
        (fds, threads),
        "fds and threads must not grow across reloads"
    );
    let rss2 = k.rss();
    assert!(
        rss2 < rss + (4 << 20),
        "RSS grew from {rss} to {rss2} over a second flood of reloads"
    );
    assert!(k.log().contains("reload: new config live"));
}

#[test]
fn listeners_are_added_and_removed_by_reload() {
    let pki = Pki::new("live-listeners");
    let backend = start_backend();
    let rt = runtime("");
    let one = tcp_listener(backend, "name = \"gone\"");
    let k = Ktern::start(&pki, &rt, &one);
    let first = k.addr();
    let spare = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let second = tcp_listener(backend, "").replace("127.0.0.1:0", &spare.to_string());
    rewrite(&k, &pki, &rt, &format!("{one}{second}"));
    let (status, v) = reload_via_admin(&k);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["listeners"][0]["address"], first.to_string(), "{v}");
    assert_eq!(v["listeners"][1]["address"], spare.to_string(), "{v}");
    download(first, &pki, ClientOpts::default(), 5000);
    download(spare, &pki, ClientOpts::default(), 5000);
    // A connection open on the listener about to go keeps working after
    // (a tunnel runs on across reloads).
    let mut open = connect(first, &pki, ClientOpts::default());
    rewrite(&k, &pki, &rt, &second);
    let (status, v) = reload_via_admin(&k);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["listeners"].as_array().unwrap().len(), 1, "{v}");
    writeln!(open, "DOWN 3000 5").unwrap();
    open.flush().unwrap();
    assert_eq!(read_to_close_notify(&mut open), pattern(3000, 5));
    download(spare, &pki, ClientOpts::default(), 5000);
    let until = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(first).is_ok() {
        assert!(Instant::now() < until, "the removed listener still accepts");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its connections over, its open-connections series goes too (it
    // said 0 until the process ended).
    drop(open);
    let until = Instant::now() + Duration::from_secs(5);
    while k
        .admin_request("GET", "/metrics")
        .1
        .contains("ktern_listener_connections_active{listener=\"gone\"}")
    {
        assert!(Instant::now() < until, "the removed listener's gauge stays");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn resumption_works_on_every_shard_and_across_reloads() {
    let pki = Pki::new("live-resume");
    let backend = start_backend();
    // Two shards (two SO_REUSEPORT sockets, two ServerConfigs), on CPU 0
    // both so that the test also runs in the one-CPU kTLS VM.
    let rt = "cpus = [0, 0]";
    let k = Ktern::start(&pki, rt, &tcp_listener(backend, ""));
    let cfg = client_config(&[&pki.der]);
    let mut resumed = 0;
    let total = 60;
    for i in 0..total {
        if i == total / 2 {
            // The ticket keys outlive the generation.
            assert_eq!(reload_via_admin(&k).0, 200);
        }
        let mut c = try_connect(k.addr(), &cfg).unwrap();
        writeln!(c, "DOWN 10 1").unwrap();
        c.flush().unwrap();
        read_to_close_notify(&mut c);
        if c.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            resumed += 1;
        }
    }
    // Every connection after the first resumes, whichever of the two
    // shards the kernel hashed it to (both took some).
    assert_eq!(resumed, total - 1);
    assert_offloaded_in_vm(&k);
    assert_handshakes_on_both_shards(&k);
    assert_eq!(
        k.metric_labeled("ktern_tls_handshakes_total", "resumed=\"true\""),
        total as u64 - 1
    );
}

/// Both shards of a two-shard ktern finished handshakes (the kernel's
/// hash spread the connections), so a test of resumption across shards
/// tested something.
fn assert_handshakes_on_both_shards(k: &Ktern) {
    let log = k.log();
    for shard in ["shard=0", "shard=1"] {
        assert!(
            log.lines()
                .any(|l| l.contains("handshake done") && l.contains(shard)),
            "no handshake on {shard}"
        );
    }
}

/// A TLS 1.2 client that takes no tickets resumes by session id on any
/// shard: the listener's session-id cache is shared by its shards (a
/// cache per shard resumed it only where the kernel happened to put the
/// connection that stored the session: with two shards, each attempt had
/// one chance in two).
#[test]
fn tls12_session_ids_resume_on_every_shard() {
    let pki = Pki::new("live-session-id");
    let backend = start_backend();
    let k = Ktern::start(&pki, "cpus = [0, 0]", &tcp_listener(backend, ""));
    let cfg = tls12_session_id_client(&pki.der);
    let total = 16;
    let mut kinds = Vec::new();
    for _ in 0..total {
        let mut c = try_connect(k.addr(), &cfg).unwrap();
        writeln!(c, "DOWN 10 1").unwrap();
        c.flush().unwrap();
        read_to_close_notify(&mut c);
        kinds.push(c.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
    }
    // The first is full; every later one resumes, on whichever shard.
    assert_eq!(kinds.iter().filter(|r| **r).count(), total - 1, "{kinds:?}");
    assert_offloaded_in_vm(&k);
    assert_handshakes_on_both_shards(&k);
}

fn drain_setup(tag: &str, extra: &str) -> (Pki, Ktern, Arc<ClientConfig>) {
    let pki = Pki::new(tag);
    let a = start_http_backend("a");
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let k = Ktern::start(
        &pki,
        &runtime(extra),
        &http_listener("127.0.0.1:0", &cert, &key, "a", &[("a", a.addr)]),
    );
    let cfg = client_config(&[&pki.der]);
    (pki, k, cfg)
}

#[test]
fn drain_answers_503_keeps_accepting_then_finishes_requests_and_exits_0() {
    let delay = Duration::from_millis(1000) * slow();
    let (_pki, mut k, cfg) = drain_setup(
        "live-drain",
        &format!(
            "drain_delay = \"{}ms\"\ndrain_timeout = \"20s\"",
            delay.as_millis()
        ),
    );
    let addr = k.addr();
    assert_eq!(k.admin_request("GET", "/ready").0, 200);
    // An idle keep-alive connection, and one with a request in flight.
    let mut idle = try_connect(addr, &cfg).unwrap();
    assert_eq!(
        try_exchange(&mut idle, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .status,
        200
    );
    let mut inflight = try_connect(addr, &cfg).unwrap();
    // Answered after the drain delay: the drain starts while it is in flight.
    let wait = (delay + Duration::from_millis(800) * slow()).as_millis();
    inflight
        .write_all(format!("GET /wait/{wait} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    inflight.flush().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_offloaded_in_vm(&k);
    let sent = Instant::now();
    k.signal("TERM");
    // /ready flips at once; the process is still alive and healthy.
    let until = Instant::now() + Duration::from_millis(300) * slow();
    while k.admin_request("GET", "/ready").0 != 503 {
        assert!(Instant::now() < until, "/ready did not flip at once");
    }
    assert_eq!(k.admin_request("GET", "/healthz").0, 200);
    // The idle keep-alive connection is closed at once, cleanly
    // (close_notify), so its client moves while the listeners still accept.
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest)
        .expect("idle connection: close_notify");
    assert!(rest.is_empty());
    // Still accepting during the drain delay; each answer ends its
    // connection (Connection: close, then close_notify).
    let mut late = try_connect(addr, &cfg).unwrap();
    let r = try_exchange(&mut late, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    late.read_to_end(&mut rest)
        .expect("close_notify after the answer");
    assert!(
        sent.elapsed() < delay * 9 / 10,
        "took too long to test the delay"
    );
    // The in-flight response completes, with Connection: close, then close_notify.
    let r = read_response(&mut std::io::BufReader::new(&mut inflight), false).unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, b"a".as_slice()));
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    inflight
        .read_to_end(&mut rest)
        .expect("close_notify after the last response");
    assert!(rest.is_empty());
    assert!(sent.elapsed() >= delay, "answered before the drain delay");
    // After the delay the listeners are closed.
    let until = Instant::now() + Duration::from_secs(2) * slow();
    while TcpStream::connect(addr).is_ok() {
        assert!(
            Instant::now() < until,
            "still accepting after the drain delay"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = k
        .wait_exit(Duration::from_secs(5) * slow())
        .expect("ktern did not exit after draining");
    assert!(status.success(), "{status:?}");
    assert!(TcpStream::connect(addr).is_err());
    assert!(
        k.log().contains("drained: every connection finished"),
        "{}",
        k.log()
    );
}

#[test]
fn drain_gives_tunnels_the_timeout_and_a_second_signal_exits_at_once() {
    let pki = Pki::new("live-drain-tunnel");
    let backend = start_backend();
    let timeout = Duration::from_millis(1500) * slow();
    let mut k = Ktern::start(
        &pki,
        &runtime(&format!(
            "drain_delay = \"200ms\"\ndrain_timeout = \"{}ms\"",
            timeout.as_millis()
        )),
        &tcp_listener(backend, ""),
    );
    let mut tunnel = connect(k.addr(), &pki, ClientOpts::default());
    tunnel.write_all(b"ECHO\n").unwrap();
    tunnel.flush().unwrap();
    assert_offloaded_in_vm(&k);
    let sent = Instant::now();
    k.signal("TERM");
    std::thread::sleep(timeout / 2);
    // Past the drain delay the tunnel still carries bytes.
    tunnel.write_all(b"still here").unwrap();
    tunnel.flush().unwrap();
    let mut buf = [0u8; 10];
    tunnel.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    let status = k
        .wait_exit(Duration::from_secs(5) * slow())
        .expect("no exit after the drain timeout");
    assert!(status.success());
    let took = sent.elapsed();
    assert!(took >= timeout, "exited before the drain timeout: {took:?}");
    assert!(k.log().contains("drain timeout"), "{}", k.log());

    let mut k = Ktern::start(
        &pki,
        &runtime("drain_delay = \"30s\""),
        &tcp_listener(backend, ""),
    );
    k.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    let sent = Instant::now();
    k.signal("TERM");
    let status = k
        .wait_exit(Duration::from_secs(2))
        .expect("a second SIGTERM must exit at once");
    assert!(status.success());
    assert!(sent.elapsed() < Duration::from_secs(2));
}

#[test]
fn systemd_notify_protocol_ready_reloading_stopping() {
    let pki = Pki::new("live-notify");
    let sock_path = pki.dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let backend = start_backend();
    let k = Ktern::start_env(
        &pki,
        &runtime("drain_delay = \"3s\""),
        &tcp_listener(backend, ""),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let next = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(
        ready.starts_with("READY=1\n") && ready.contains(&format!("MAINPID={}", k.pid())),
        "{ready}"
    );
    k.signal("HUP");
    assert!(next().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    let again = next();
    assert!(
        again.starts_with("READY=1") && again.contains("generation 2"),
        "{again}"
    );
    k.signal("TERM");
    assert!(next().starts_with("STOPPING=1"));
    // A reload while draining is refused without a word to systemd: its
    // RELOADING=1 and READY=1 ("serving") said a stopping process serves.
    k.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !k.log().contains("reload refused") {
        assert!(std::time::Instant::now() < deadline, "{}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 512];
    let after = sock
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    assert!(after.is_err(), "{after:?}");
}

#[test]
fn sighup_without_a_config_change_never_kills_and_admin_answers_bad_requests() {
    let pki = Pki::new("live-admin");
    let backend = start_backend();
    let k = Ktern::start(&pki, &runtime(""), &tcp_listener(backend, ""));
    k.signal("HUP");
    assert_eq!(k.wait_metric("ktern_config_generation", 2), 2);
    download(k.addr(), &pki, ClientOpts::default(), 100);
    assert_eq!(k.admin_request("GET", "/healthz"), (200, "ok\n".into()));
    assert_eq!(k.admin_request("GET", "/nope").0, 404);
    assert_eq!(k.admin_request("GET", "/reload").0, 405);
    let mut s = TcpStream::connect(k.admin).unwrap();
    s.write_all(b"\x16\x03\x01 not http\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    // What a web page's script or form sends is refused (DNS rebinding,
    // cross-site POST); what the operator types into a browser is not.
    let raw = |head: &str| {
        let mut s = TcpStream::connect(k.admin).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let reload = "POST /reload HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\n\r\n";
    assert!(raw(reload).starts_with("HTTP/1.1 403 "));
    let rebound =
        "GET /metrics HTTP/1.1\r\nHost: evil.example:9090\r\nSec-Fetch-Site: same-origin\r\n\r\n";
    assert!(raw(rebound).starts_with("HTTP/1.1 403 "));
    let typed = "GET /healthz HTTP/1.1\r\nHost: x\r\nSec-Fetch-Site: none\r\n\r\n";
    assert!(raw(typed).starts_with("HTTP/1.1 200 "));
    // Metrics still answer afterwards, and the refused reload did nothing.
    assert_eq!(k.metric("ktern_config_generation"), 2);
}

/// Every admin slot taken (32 connections that send nothing): one more
/// is told so with a 503, not closed unanswered; and the slots come back
/// once the silent ones reach their head deadline (2 s), so a scrape
/// then gets its answer.
#[test]
fn busy_admin_slots_answer_503_and_come_back() {
    let pki = Pki::new("live-admin-busy");
    let backend = start_backend();
    let k = Ktern::start(&pki, &runtime(""), &tcp_listener(backend, ""));
    let silent: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect(k.admin).unwrap())
        .collect();
    // The accept loop takes them in order: the 33rd finds none free.
    std::thread::sleep(Duration::from_millis(300));
    let mut s = TcpStream::connect(k.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 503 "), "{text:?}");
    assert!(
        text.ends_with("busy: every admin slot is taken\n"),
        "{text:?}"
    );
    let until = Instant::now() + Duration::from_secs(10) * slow();
    loop {
        // A 503 closes at once, unread: the request may meet a reset.
        let answer = TcpStream::connect(k.admin).and_then(|mut s| {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        });
        if answer.is_ok_and(|t| t.starts_with("HTTP/1.1 200 ")) {
            break;
        }
        assert!(Instant::now() < until, "the slots never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(silent);
}

#[test]
fn started_as_root_every_thread_runs_as_the_runtime_user() {
    let pki = Pki::new("live-user");
    let backend = start_backend();
    let k = Ktern::start(
        &pki,
        &runtime("user = \"nobody\""),
        &tcp_listener(backend, ""),
    );
    download(k.addr(), &pki, ClientOpts::default(), 1000);
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if !root {
        assert!(k.log().contains("runtime.user ignored"), "{}", k.log());
        return;
    }
    let nobody = Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .unwrap()
        .stdout;
    let nobody = String::from_utf8_lossy(&nobody).trim().to_string();
    let tasks = std::fs::read_dir(format!("/proc/{}/task", k.pid())).unwrap();
    let mut n = 0;
    for t in tasks {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        let ids: Vec<_> = uids.split_whitespace().skip(1).collect();
        assert!(ids.iter().all(|id| *id == nobody), "{uids}");
        let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert!(!groups.split_whitespace().any(|g| g == "0"), "{groups}");
        n += 1;
    }
    assert!(n >= 3, "shard, admin and main threads expected");
    assert!(k.log().contains("dropped root"));
}

/// An upgrade whose config moves the admin endpoint closes the old
/// binary's admin socket: kept, it listened where nobody accepted, so a
/// scrape or `ktern reload` there hung until its timeout instead of being
/// refused.
#[test]
fn an_upgrade_that_moves_the_admin_endpoint_closes_the_old_one() {
    let (pki, _a, sock, mut old) = upgradable("live-upgrade-admin", "10s");
    // A request in flight keeps the old process draining meanwhile.
    let slow_request = in_flight(&old, &pki, &format!("/wait/{}", 3000 * slow()));
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&old.config_path).unwrap();
    let moved = text.replace(
        "[admin]\naddress = \"127.0.0.1:0\"",
        "[admin]\naddress = \"127.0.0.2:0\"",
    );
    assert_ne!(moved, text);
    let path = pki.dir.join("moved-admin.toml");
    std::fs::write(&path, moved).unwrap();
    let new = upgrade_from(&pki, &path, &sock);
    assert_ne!(new.admin, old.admin);
    assert_eq!(new.admin_request("GET", "/healthz").0, 200);
    // Refused while the old process still drains (its admin thread stops
    // within its 200 ms poll).
    let until = std::time::Instant::now() + Duration::from_secs(2);
    let refused = loop {
        match TcpStream::connect(old.admin) {
            Err(e) => break e,
            Ok(_) => assert!(std::time::Instant::now() < until, "still listening"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(old.wait_exit(Duration::ZERO).is_none(), "drained already");
    assert_eq!(slow_request.join().unwrap().unwrap().status, 200);
    assert!(old
        .wait_exit(Duration::from_secs(10) * slow())
        .expect("the old process drains after the upgrade")
        .success());
}

/// Started as root with `runtime.user`, the upgrade socket is published
/// before the switch: as the user, the rename out of the 0700 directory
/// root made failed ("cannot serve it"), no upgrade ever found the
/// process, and each start left its directory behind.
#[test]
fn started_as_root_with_a_user_the_upgrade_socket_still_serves() {
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if !root {
        eprintln!("skipped: needs root");
        return;
    }
    let pki = Pki::new("live-user-upgrade");
    let backend = start_backend();
    let sock = pki.dir.join("upgrade.sock");
    let rt = runtime(&format!(
        "user = \"nobody\"\nupgrade_socket = \"{}\"",
        sock.display()
    ));
    let mut old = Ktern::start(&pki, &rt, &tcp_listener(backend, ""));
    assert!(old.log().contains("dropped root"), "{}", old.log());
    assert!(!old.log().contains("cannot serve it"), "{}", old.log());
    let new = upgrade_from(&pki, &old.config_path, &sock);
    assert_eq!(new.addr(), old.addr());
    assert_drained(&mut old);
    download(new.addr(), &pki, ClientOpts::default(), 1000);
    assert!(new.log().contains("dropped root"), "{}", new.log());
    assert!(!new.log().contains("cannot serve it"), "{}", new.log());
    assert_no_private_socket_dir(&pki);
}

/// A new binary that could not switch to `runtime.user` finds out before
/// it tells the old process to drain: in a user namespace where `nobody`
/// is unmapped, `setuid` is EINVAL though every capability is there. The
/// switch used to be tried after the hand-over, so the new process exited
/// while the old one drained: neither served.
#[test]
fn an_upgrade_that_cannot_switch_user_leaves_the_old_process_serving() {
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    let userns = Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !root || !userns {
        eprintln!("skipped: needs root and user namespaces");
        return;
    }
    let (pki, _a, sock, mut old) = upgradable("live-upgrade-userns", "5s");
    let text = std::fs::read_to_string(&old.config_path).unwrap();
    let with_user = text.replace("[runtime]\n", "[runtime]\nuser = \"nobody\"\n");
    assert_ne!(with_user, text);
    let path = pki.dir.join("userns.toml");
    std::fs::write(&path, with_user).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--user",
        "--map-root-user",
        env!("CARGO_BIN_EXE_ktern"),
        "run",
        "-c",
    ])
    .arg(&path);
    let stderr = refused_upgrade(cmd, &sock);
    assert!(
        stderr.contains("runtime.user: cannot switch to \"nobody\""),
        "{stderr}"
    );
    // The old process was not told to drain: it serves, and stays ready.
    std::thread::sleep(Duration::from_millis(300));
    assert!(old.wait_exit(Duration::ZERO).is_none());
    assert_eq!(old.admin_request("GET", "/ready").0, 200);
    let mut c = try_connect(old.addr(), &client_config(&[&pki.der])).unwrap();
    let r = try_exchange(&mut c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!((r.status, r.header("connection")), (200, None));
}

/// `max_conns` across a reload that changes the group (its cap lowered,
/// a timeout changed): a request in flight under the old configuration
/// still holds its backend's slot under the new one, so the next request
/// gets 503; once it ends the slot is free again.
#[test]
fn max_conns_counts_carry_across_a_reload() {
    let pki = Pki::new("live-max-conns");
    let a = start_http_backend("a");
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let listeners = |cap: u32, timeout: &str| {
        http_listener("127.0.0.1:0", &cert, &key, "a", &[("a", a.addr)]).replace(
            "response_timeout = \"10s\"",
            &format!("max_conns = {cap}\nresponse_timeout = \"{timeout}\""),
        )
    };
    let k = Ktern::start(&pki, &runtime(""), &listeners(2, "60s"));
    let cfg = client_config(&[&pki.der]);
    let mut slow_client = try_connect(k.addr(), &cfg).unwrap();
    let sleep = format!("GET /sleep/{} HTTP/1.1\r\nHost: h\r\n\r\n", 3000 * slow());
    let slow_request = std::thread::spawn(move || try_exchange(&mut slow_client, &sleep));
    let deadline = Instant::now() + Duration::from_secs(10) * slow();
    while a.accepted.load(Ordering::SeqCst) < 1 {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the backend"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    rewrite(&k, &pki, &runtime(""), &listeners(1, "61s"));
    let (status, body) = reload_via_admin(&k);
    assert_eq!(status, 200, "{body}");
    let series = |name: &str| format!("{name}{{upstream=\"a\",backend=\"{}\"}}", a.addr);
    assert_eq!(k.metric(&series("ktern_upstream_backend_max_conns")), 1);
    assert_eq!(k.metric(&series("ktern_upstream_backend_in_use")), 1);
    let mut c = try_connect(k.addr(), &cfg).unwrap();
    let r = try_exchange(&mut c, "GET /x HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert_eq!(
        r.status, 503,
        "the old generation's request holds the one slot"
    );
    let r = slow_request.join().unwrap().unwrap();
    assert_eq!((r.status, &r.body[..]), (200, &b"late"[..]));
    let r = try_exchange(&mut c, "GET /x HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(k.metric("ktern_upstream_full_total"), 1);
}

#[test]
fn metrics_after_known_traffic_are_exact_and_pass_promtool() {
    let pki = Pki::new("live-metrics");
    let a = start_http_backend("a");
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    // A `max_conns` too, so its gauges are in the exposition.
    let listeners = http_listener("127.0.0.1:0", &cert, &key, "a", &[("a", a.addr)])
        .replace(
            "[[listener.route.rule]]\n",
            "[[listener.route.rule]]\npath = \"/api/\"\n",
        )
        .replace("response_timeout", "max_conns = 8\nresponse_timeout");
    let k = Ktern::start(&pki, &runtime(""), &listeners);
    let cfg = client_config(&[&pki.der]);
    // Connection 1 (full handshake): three proxied requests on one
    // backend connection (one pool miss, two hits), one 404 (no rule).
    let mut c = try_connect(k.addr(), &cfg).unwrap();
    for _ in 0..3 {
        let r = try_exchange(&mut c, "GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        assert_eq!(r.status, 200);
    }
    let r = try_exchange(&mut c, "GET /nope HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert_eq!(r.status, 404);
    drop(c);
    // Connection 2 resumes the first's session.
    let mut c = try_connect(k.addr(), &cfg).unwrap();
    assert_eq!(
        c.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let r = try_exchange(
        &mut c,
        "GET /api/y HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    drop(c);
    assert_eq!(k.wait_metric_down_to("ktern_connections_active", 0), 0);
    let (status, body) = k.admin_request("GET", "/metrics");
    assert_eq!(status, 200);
    let value = |series: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no series {series} in\n{body}"))
            .parse()
            .unwrap()
    };
    let tls13 = "version=\"TLSv1.3\"";
    assert_eq!(
        k.metric_labeled("ktern_tls_handshakes_total", "resumed=\"false\""),
        1
    );
    assert_eq!(
        k.metric_labeled("ktern_tls_handshakes_total", "resumed=\"true\""),
        1
    );
    assert_eq!(k.metric_labeled("ktern_tls_handshakes_total", tls13), 2);
    assert_eq!(value("ktern_handshakes_total"), 2);
    assert_eq!(value("ktern_handshake_duration_seconds_count"), 2);
    assert_eq!(value("ktern_http_requests_total"), 5);
    assert_eq!(
        value("ktern_http_responses_total{listener=\"web\",upstream=\"a\",class=\"2xx\"}"),
        4
    );
    assert_eq!(
        value("ktern_http_responses_total{listener=\"web\",upstream=\"(none)\",class=\"4xx\"}"),
        1
    );
    assert_eq!(
        value("ktern_http_responses_total{listener=\"web\",upstream=\"a\",class=\"5xx\"}"),
        0
    );
    assert_eq!(value("ktern_http_request_duration_seconds_count"), 5);
    assert_eq!(value("ktern_upstream_response_time_seconds_count"), 4);
    // Connection 2 is a new client connection but the backend connection
    // of connection 1 waits in the pool: four hits in all but the first.
    assert_eq!(value("ktern_upstream_pool_misses_total"), 1);
    assert_eq!(value("ktern_upstream_pool_hits_total"), 3);
    assert_eq!(
        value("ktern_listener_connections_active{listener=\"web\"}"),
        0
    );
    assert_eq!(value("ktern_connections_accepted_total"), 2);
    assert_eq!(value("ktern_config_generation"), 1);
    let backend = format!("{{upstream=\"a\",backend=\"{}\"}}", a.addr);
    assert_eq!(
        value(&format!("ktern_upstream_backend_max_conns{backend}")),
        8
    );
    assert_eq!(value(&format!("ktern_upstream_backend_in_use{backend}")), 0);
    if std::env::var_os("KTERN_IN_VM").is_some() {
        assert_eq!(value("ktern_ktls_offloaded_total"), 2);
    } else {
        assert_eq!(
            value("ktern_ktls_userspace_reason_total{reason=\"no_kernel_tls\"}")
                + value("ktern_ktls_offloaded_total"),
            2
        );
    }
    // /certs describes the served certificate; the expiry gauge agrees.
    let (status, certs) = k.admin_request("GET", "/certs");
    assert_eq!(status, 200);
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    let c0 = &certs[0];
    assert_eq!(c0["listener"], "web");
    assert_eq!(c0["sha256"], sha256(pki.der.as_ref()));
    assert_eq!(c0["key_type"], "ECDSA");
    assert_eq!(c0["cert_file"], cert);
    assert_eq!(c0["generation"], 1);
    assert!(
        c0["names"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "localhost"),
        "{c0}"
    );
    let not_after = c0["not_after_unix"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(not_after > now, "{c0}");
    let series = format!(
        "ktern_certificate_expiry_timestamp_seconds{{listener=\"web\",cert_file=\"{cert}\",sha256=\"{}\"}}",
        sha256(pki.der.as_ref())
    );
    assert_eq!(value(&series), not_after as u64);
    // promtool (Debian's prometheus package) accepts the exposition.
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Err(_) => eprintln!("promtool not installed: exposition not checked (.ci/run installs it)"),
        Ok(mut p) => {
            p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
            let out = p.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "promtool: {text}");
            assert!(text.trim().is_empty(), "promtool lint: {text}");
        }
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    let pki = Pki::new("live-json");
    let backend = start_backend();
    let k = Ktern::start(
        &pki,
        &runtime("log_format = \"json\""),
        &tcp_listener(backend, ""),
    );
    download(k.addr(), &pki, ClientOpts::default(), 100);
    k.signal("HUP");
    k.wait_metric("ktern_config_generation", 2);
    let log = k.log();
    let mut seen_reload = false;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["message"] == "reload: new config live" {
            assert_eq!(v["generation"], 2, "{line}");
            seen_reload = true;
        }
    }
    assert!(seen_reload, "{log}");
}

/// A ktern with an upgrade socket and `drain_timeout`, its HTTP listener
/// in front of backend "a": its PKI, the backend, the socket's path and
/// the process.
/// A new ktern of `config` taking over the sockets of the one behind the
/// upgrade socket `sock`.
fn upgrade_from(pki: &Pki, config: &std::path::Path, sock: &std::path::Path) -> Ktern {
    Ktern::start_args(
        &pki.dir,
        config,
        &[],
        &["--upgrade-from", sock.to_str().unwrap()],
    )
}

/// No upgrade socket's private directory is left in `pki`'s.
fn assert_no_private_socket_dir(pki: &Pki) {
    let leftovers: Vec<_> = std::fs::read_dir(&pki.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".ktern-upgrade-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `GET path` to `k` on a thread: the answer, when it comes.
fn in_flight(k: &Ktern, pki: &Pki, path: &str) -> std::thread::JoinHandle<std::io::Result<Resp>> {
    let mut c = try_connect(k.addr(), &client_config(&[&pki.der])).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    std::thread::spawn(move || try_exchange(&mut c, &request))
}

/// `cmd` (a `ktern run`) taking over from the process behind `sock`,
/// refused: it exits 1; its stderr.
fn refused_upgrade(mut cmd: Command, sock: &std::path::Path) -> String {
    let out = cmd
        .args(["--upgrade-from", sock.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// `old` drains after an upgrade and exits 0.
fn assert_drained(old: &mut Ktern) {
    let status = old
        .wait_exit(Duration::from_secs(10) * slow())
        .expect("the old process drains after the upgrade and exits");
    assert!(status.success(), "{status:?}");
}

fn upgradable(tag: &str, drain_timeout: &str) -> (Pki, Backend, std::path::PathBuf, Ktern) {
    let pki = Pki::new(tag);
    let a = start_http_backend("a");
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let sock = pki.dir.join("upgrade.sock");
    let rt = runtime(&format!(
        "upgrade_socket = \"{}\"\ndrain_timeout = \"{drain_timeout}\"",
        sock.display()
    ));
    let k = Ktern::start(
        &pki,
        &rt,
        &http_listener("127.0.0.1:0", &cert, &key, "a", &[("a", a.addr)]),
    );
    (pki, a, sock, k)
}

#[test]
fn binary_upgrade_under_load_fails_no_connection() {
    let (pki, _a, sock, mut old) = upgradable("live-upgrade", "5s");
    let addr = old.addr();
    let cfg = client_config(&[&pki.der]);
    let stop = Arc::new(AtomicBool::new(false));
    let rep = Arc::new(LoadReport::default());
    let mut workers = Vec::new();
    for i in 0..3 {
        let (cfg, stop, rep) = (cfg.clone(), stop.clone(), rep.clone());
        workers.push(std::thread::spawn(move || {
            if i == 0 {
                keep_alive_worker(addr, cfg, stop, rep)
            } else {
                new_conn_worker(addr, cfg, stop, rep)
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = rep.ok.load(Ordering::Relaxed);
    // The new binary (the same one here) takes the sockets over.
    let new = upgrade_from(&pki, &old.config_path, &sock);
    assert_eq!(new.addr(), addr, "the new process serves the same sockets");
    assert_eq!(new.admin, old.admin, "and the same admin socket");
    assert_drained(&mut old);
    let at_exit = rep.ok.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    let ok = rep.finish(&stop, workers);
    assert!(
        before > 0 && at_exit > before && ok > at_exit,
        "load ran before, during and after: {before} {at_exit} {ok}"
    );
    assert!(
        old.log()
            .contains("upgrade: a new process serves the listeners"),
        "{}",
        old.log()
    );
    assert!(
        new.log().contains("upgrade: took the listening sockets"),
        "{}",
        new.log()
    );
    assert!(new.metric("ktern_connections_accepted_total") > 0);
    assert_eq!(new.admin_request("GET", "/ready").0, 200);
    // The new process serves the upgrade socket for the next upgrade.
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
}

/// After a binary upgrade the old process drains. The first SIGTERM it
/// then gets (`systemctl stop`, a deploy script's `kill` of the old pid)
/// lets it drain on: a request in flight still gets its whole answer. It
/// was read as a second stop signal (the hand-over had set "draining"),
/// and the old process exited at once under the request.
#[test]
fn a_stop_signal_to_a_handed_over_process_lets_it_drain() {
    let (pki, _a, sock, mut old) = upgradable("live-upgrade-term", "20s");
    let in_flight = in_flight(&old, &pki, &format!("/wait/{}", 2500 * slow()));
    std::thread::sleep(Duration::from_millis(200));
    let new = upgrade_from(&pki, &old.config_path, &sock);
    assert!(
        !in_flight.is_finished(),
        "the request ended before the upgrade: make it wait longer"
    );
    old.signal("TERM");
    let r = in_flight.join().unwrap().expect("the answer in flight");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"a"[..]));
    let status = old
        .wait_exit(Duration::from_secs(20) * slow())
        .expect("the old process must drain and exit");
    assert!(status.success(), "{status:?}");
    assert!(old.log().contains("already draining"), "{}", old.log());
    assert_eq!(new.admin_request("GET", "/ready").0, 200);
}

#[test]
fn after_a_reload_old_keep_alive_connections_run_on_for_a_keepalive_timeout_and_pools_stay() {
    let pki = Pki::new("live-reload-idle");
    let a = start_http_backend("a");
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let rt = runtime("");
    // Long enough that the steps between the reload and the first check
    // below fit in half of it under the VM's emulation (a 1 s timeout
    // failed there: 6.18, CI).
    let keepalive = Duration::from_secs(2) * slow();
    let version = |timeout: &str| {
        http_listener("127.0.0.1:0", &cert, &key, "a", &[("a", a.addr)])
            .replace(
                "kind = \"http\"\n",
                &format!(
                    "kind = \"http\"\nkeepalive_timeout = \"{}ms\"\n",
                    keepalive.as_millis()
                ),
            )
            // The pooled backend connection outlives the waits below (the
            // 4 s default did not, with the VM's longer keep-alive).
            .replace(
                "response_timeout = \"10s\"",
                &format!(
                    "response_timeout = \"{timeout}\"\npool_idle_timeout = \"{}ms\"",
                    (keepalive * 4).as_millis()
                ),
            )
    };
    let k = Ktern::start(&pki, &rt, &version("10s"));
    let cfg = client_config(&[&pki.der]);
    let get = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut old = try_connect(k.addr(), &cfg).unwrap();
    let r = try_exchange(&mut old, get).unwrap();
    assert_eq!((r.status, r.header("connection")), (200, None));
    assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(reload_via_admin(&k).0, 200);
    let reloaded = Instant::now();
    // The old connection runs on (closing it under a request that may be
    // on its way would fail that request, and frequent reloads would make
    // every client reconnect each time).
    let r = try_exchange(&mut old, get).unwrap();
    assert_eq!((r.status, r.header("connection")), (200, None));
    // A new connection of the new generation reuses the pooled backend
    // connection: the upstream group did not change.
    let mut new = try_connect(k.addr(), &cfg).unwrap();
    assert_eq!(try_exchange(&mut new, get).unwrap().status, 200);
    assert_eq!(
        a.accepted.load(Ordering::SeqCst),
        1,
        "the backend pool survives an unchanged reload"
    );
    drop(new);
    // Within the keep-alive timeout of the reload it still runs on; once
    // replaced for longer, the old connection's next answer ends it. (Each
    // wait is shorter than the timeout, so it never idles out instead.)
    std::thread::sleep((reloaded + keepalive / 2).saturating_duration_since(Instant::now()));
    assert!(
        reloaded.elapsed() < keepalive * 3 / 4,
        "the steps since the reload took {:?}",
        reloaded.elapsed()
    );
    assert_eq!(
        try_exchange(&mut old, get).unwrap().header("connection"),
        None
    );
    std::thread::sleep(
        (reloaded + keepalive + keepalive / 4).saturating_duration_since(Instant::now()),
    );
    let r = try_exchange(&mut old, get).unwrap();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    let mut rest = Vec::new();
    old.read_to_end(&mut rest).expect("close_notify");
    assert!(rest.is_empty());
    // A changed group gets a new pool: its idle connections were closed.
    rewrite(&k, &pki, &rt, &version("9s"));
    assert_eq!(reload_via_admin(&k).0, 200);
    let mut c = try_connect(k.addr(), &cfg).unwrap();
    assert_eq!(try_exchange(&mut c, get).unwrap().status, 200);
    assert_eq!(
        a.accepted.load(Ordering::SeqCst),
        2,
        "a changed group starts a new pool"
    );
    assert_offloaded_in_vm(&k);
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving_and_upgradable() {
    let pki = Pki::new("live-upgrade-fail");
    let backend = start_backend();
    let sock = pki.dir.join("upgrade.sock");
    let rt = runtime(&format!("upgrade_socket = \"{}\"", sock.display()));
    let one = tcp_listener(backend, "");
    let mut old = Ktern::start(&pki, &rt, &one);
    // The new process's config wants an address another program holds:
    // it takes the sockets, fails to start, and never says DRAIN.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad = format!(
        "{one}{}",
        tcp_listener(backend, "").replace("127.0.0.1:0", &busy.local_addr().unwrap().to_string())
    );
    let bad_path = pki.dir.join("bad.toml");
    std::fs::write(&bad_path, Ktern::config_text(&pki, &rt, &bad)).unwrap();
    let mut cmd = ktern_cmd();
    cmd.args(["run", "-c"]).arg(&bad_path);
    let stderr = refused_upgrade(cmd, &sock);
    assert!(
        stderr.contains("listener[1].address") && stderr.contains("in use"),
        "{stderr}"
    );
    // The old process still serves, and the path still reaches it.
    download(old.addr(), &pki, ClientOpts::default(), 2000);
    assert!(old.wait_exit(Duration::ZERO).is_none());
    let new = upgrade_from(&pki, &old.config_path, &sock);
    assert_eq!(new.addr(), old.addr());
    assert_drained(&mut old);
    download(new.addr(), &pki, ClientOpts::default(), 2000);
    // No private socket directory is left behind.
    assert_no_private_socket_dir(&pki);
}

/// A stop signal to a new process while it starts an upgrade (an
/// operator's Ctrl-C, a deploy script's timeout) aborts the upgrade: the
/// old process is never told to drain, and the new one, which has not
/// served, exits 1 saying so. Released, both processes drained and nothing
/// listened. The old process here is the test, speaking the upgrade
/// protocol: it sends no sockets, and sees whether DRAIN comes (a real old
/// process keeps serving when the socket closes instead:
/// `a_failed_upgrade_leaves_...`).
#[test]
fn a_stop_signal_while_an_upgrade_starts_leaves_the_old_process_serving() {
    use std::io::{BufRead, BufReader};
    let pki = Pki::new("live-upgrade-abort");
    let backend = start_backend();
    let sock = pki.dir.join("old.sock");
    let old = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let config = pki.dir.join("new.toml");
    let rt = runtime("drain_delay = \"0s\"");
    std::fs::write(
        &config,
        Ktern::config_text(&pki, &rt, &tcp_listener(backend, "")),
    )
    .unwrap();
    let log = pki.dir.join("new.log");
    let mut new = ktern_cmd()
        .args(["run", "-c"])
        .arg(&config)
        .arg("--upgrade-from")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let (conn, _) = old.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30) * slow()))
        .unwrap();
    let mut lines = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "FDS\n");
    // Its handlers are in by now (they come before the request), and it
    // waits for the offer: neither signal interrupts that (EINTR ended it,
    // with another error), and the TERM aborts the upgrade once it has the
    // offer.
    for sig in ["-HUP", "-TERM"] {
        let killed = Command::new("kill")
            .args([sig, &new.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }
    (&conn)
        .write_all(b"{\"pid\":1,\"sockets\":[],\"admin\":null}\n")
        .unwrap();
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "SEND\n");
    line.clear();
    let n = lines.read_line(&mut line).unwrap();
    assert_eq!(
        (n, line.as_str()),
        (0, ""),
        "the old process must not be told to drain"
    );
    let until = Instant::now() + Duration::from_secs(20) * slow();
    let status = loop {
        if let Some(status) = new.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < until, "the new process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("upgrade aborted: a stop signal came before this process served"),
        "{log}"
    );
}
