//! ACME end to end against Debian's pebble (a test CA), started here on
//! loopback with its own HTTPS certificate, and pebble-challtestsrv as its
//! DNS (every name resolves to 127.0.0.1). Pebble validates by connecting
//! to ktern: TLS-ALPN-01 on ktern's TLS listener, HTTP-01 on its redirect
//! listener. Its issuing root changes at every start and is fetched from
//! its management port, so a handshake that verifies against it proves the
//! certificate came from the CA.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use common::*;

/// A loopback port free now (pebble and ktern's validated listeners need
/// their ports known before either starts).
///
/// Picked below the kernel's ephemeral range (`ip_local_port_range`,
/// 32768-60999 by default), which both `bind(0)` and every outgoing
/// connection draw from: a port found by binding 0 and letting go was
/// taken by a parallel test's connection before ktern bound it (CI,
/// 2026-12-05: "listener[0].address: cannot listen on 127.0.0.1:44649:
/// Address already in use"). Below that range only explicit binds compete:
/// the counter keeps this process's picks apart, the bind check skips a
/// port another process holds, and the start point moves with the pid.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 20000;
    const SPAN: u16 = 12000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) % SPAN;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN)
}

/// pebble and its DNS, killed on drop.
struct Pebble {
    pebble: Child,
    dns: Child,
    dir: PathBuf,
    /// Where pebble listens (the ACME directory) and its management API.
    acme: SocketAddr,
    management: SocketAddr,
    /// The config, to start the same CA again after an outage.
    config: PathBuf,
    dns_port: u16,
    /// Its port during an outage, bound (not listening) so that nothing
    /// else takes it before the restart.
    held: Option<socket2::Socket>,
}

impl Pebble {
    /// Starts pebble validating TLS-ALPN-01 on `tls_port` and HTTP-01 on
    /// `http_port`, issuing certificates valid for `validity` seconds.
    fn start(dir: &Path, tls_port: u16, http_port: u16, validity: u64) -> Pebble {
        for tool in ["pebble", "pebble-challtestsrv", "curl"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success(),
                "{tool} is needed (Debian: apt-get install pebble curl); .ci/run installs it"
            );
        }
        // Pebble's own HTTPS certificate: a non-CA leaf for 127.0.0.1,
        // which ktern's ACME client trusts through `acme.ca`.
        let (cert, key) = ktern::builtin::self_signed(&["localhost", "127.0.0.1"]).unwrap();
        std::fs::write(dir.join("pebble.pem"), cert).unwrap();
        std::fs::write(dir.join("pebble.key"), key).unwrap();
        let (dns, dns_port) = start_challtestsrv(dir);
        let port = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
        let mut p = Pebble {
            pebble: Command::new("true").spawn().unwrap(),
            dns,
            dir: dir.to_path_buf(),
            acme: port(),
            management: port(),
            config: dir.join("pebble.json"),
            dns_port,
            held: None,
        };
        // A port picked free can be taken by a parallel test before
        // pebble binds it (CI, 2026-12-03: its management port): then
        // the start is tried again on others.
        for attempt in 1.. {
            p.write_config(http_port, tls_port, validity);
            // The one before (a placeholder, or an attempt that exited)
            // is reaped.
            let _ = std::mem::replace(&mut p.pebble, spawn_pebble(dir, &p.config, dns_port)).wait();
            match p.wait_up() {
                Ok(()) => break,
                Err(log) if attempt < 5 && log.contains("address already in use") => {
                    (p.acme, p.management) = (port(), port());
                }
                Err(log) => panic!("pebble exited: {log}"),
            }
        }
        p
    }

    fn write_config(&self, http_port: u16, tls_port: u16, validity: u64) {
        std::fs::write(
            &self.config,
            format!(
                r#"{{"pebble": {{"listenAddress": "{acme}", "managementListenAddress": "{management}",
  "certificate": "{d}/pebble.pem", "privateKey": "{d}/pebble.key",
  "httpPort": {http_port}, "tlsPort": {tls_port}, "ocspResponderURL": "",
  "externalAccountBindingRequired": false, "certificateValidityPeriod": {validity}}}}}"#,
                acme = self.acme,
                management = self.management,
                d = self.dir.display()
            ),
        )
        .unwrap();
    }

    /// Waits for pebble to listen; its log if it exited first. The log is
    /// read afresh for each start (`spawn_pebble` truncates it).
    fn wait_up(&mut self) -> Result<(), String> {
        let until = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(self.acme).is_err() || TcpStream::connect(self.management).is_err()
        {
            assert!(
                Instant::now() < until,
                "pebble did not start: {}",
                self.log()
            );
            if self.pebble.try_wait().unwrap().is_some() {
                return Err(self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn directory(&self) -> String {
        format!("https://{}/dir", self.acme)
    }

    /// The root it issues under now (a new one at every start).
    fn root(&self) -> CertificateDer<'static> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(self.dir.join("pebble.pem"))
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        CertificateDer::from_pem_slice(&out.stdout).unwrap()
    }

    /// An outage: the CA goes away.
    fn stop(&mut self) {
        let _ = self.pebble.kill();
        let _ = self.pebble.wait();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // Past pebble's connections in TIME_WAIT.
        s.set_reuse_address(true).unwrap();
        s.bind(&self.acme.into()).unwrap();
        self.held = Some(s);
    }

    /// The CA back on the same address (with a new root and no memory of
    /// accounts, as pebble keeps nothing).
    fn restart(&mut self) {
        self.held = None;
        self.pebble = spawn_pebble(&self.dir, &self.config, self.dns_port);
        if let Err(log) = self.wait_up() {
            panic!("pebble exited: {log}");
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }
}

/// pebble-challtestsrv, pebble's DNS, on ports picked free, and its DNS
/// port once it is up. As for pebble, a port can be taken by a parallel
/// test before it binds it: it then exits, and starts again on others.
fn start_challtestsrv(dir: &Path) -> (Child, u16) {
    let log = dir.join("challtestsrv.log");
    for attempt in 1.. {
        let _ = std::fs::remove_file(&log);
        let (dns_port, management) = (free_port(), free_port());
        let mut dns = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{management}")])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log_file(dir, "challtestsrv"))
            .stderr(log_file(dir, "challtestsrv"))
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        let up = loop {
            // Its servers start together: once management answers, a
            // DNS port it could not bind has ended the process too.
            if TcpStream::connect(("127.0.0.1", management)).is_ok() {
                std::thread::sleep(Duration::from_millis(200));
            }
            if let Some(status) = dns.try_wait().unwrap() {
                break Err(format!(
                    "{status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            if TcpStream::connect(("127.0.0.1", management)).is_ok() {
                break Ok(());
            }
            assert!(Instant::now() < until, "pebble-challtestsrv did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        match up {
            Ok(()) => return (dns, dns_port),
            Err(why) if attempt < 5 && why.contains("address already in use") => {}
            Err(why) => panic!("pebble-challtestsrv exited: {why}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .unwrap()
}

fn spawn_pebble(dir: &Path, config: &Path, dns_port: u16) -> Child {
    let _ = std::fs::remove_file(dir.join("pebble.log"));
    Command::new("pebble")
        .arg("-config")
        .arg(config)
        .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
        // No random sleeps before validating, no refused nonces, and every
        // order validated afresh (no reused authorizations).
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .env("PEBBLE_AUTHZREUSE", "0")
        .stdout(log_file(dir, "pebble"))
        .stderr(log_file(dir, "pebble"))
        .spawn()
        .unwrap()
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [&mut self.pebble, &mut self.dns] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The leaf ktern serves for `name`, if it verifies against `roots` (so
/// `Some` means: issued by that CA, for that name).
fn served_leaf(
    addr: SocketAddr,
    name: &str,
    roots: &[CertificateDer<'static>],
) -> Option<CertificateDer<'static>> {
    let refs: Vec<&CertificateDer<'static>> = roots.iter().collect();
    let cfg = client_config(&refs);
    let conn =
        rustls::ClientConnection::new(cfg, ServerName::try_from(name.to_string()).unwrap()).ok()?;
    let sock = TcpStream::connect(addr).ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).ok()?;
    }
    s.conn.peer_certificates()?.first().cloned()
}

/// Polls `probe` until it gives a value; fails after `limit` with `what`
/// and ktern's log.
fn wait_for<T>(k: &Ktern, limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < until,
            "{what} within {limit:?}; ktern log:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to `limit`) for a leaf for `name` that verifies against
/// `roots` and is not `old`.
fn wait_for_new_leaf(
    k: &Ktern,
    name: &str,
    roots: &[CertificateDer<'static>],
    old: Option<&CertificateDer<'static>>,
    limit: Duration,
) -> CertificateDer<'static> {
    wait_for(
        k,
        limit,
        &format!("no new certificate from the CA for {name}"),
        || served_leaf(k.addr(), name, roots).filter(|leaf| Some(leaf) != old),
    )
}

fn acme_listener(
    port: u16,
    backend: SocketAddr,
    pebble: &Pebble,
    dir: &Path,
    extra: &str,
) -> String {
    format!(
        "[acme]\nstate_dir = \"{state}\"\nretry = \"1s\"\nretry_max = \"2s\"\n\n\
         [[listener]]\naddress = \"127.0.0.1:{port}\"\n\
         [[listener.certificate]]\nacme = {{ domains = [\"a.acme.test\", \"b.acme.test\"], contact = [\"mailto:ops@acme.test\"], directory = \"{url}\", ca = \"{ca}\"{extra} }}\n\
         [listener.route]\nkind = \"tcp\"\nbackends = [\"{backend}\"]\n",
        state = dir.join("acme").display(),
        url = pebble.directory(),
        ca = dir.join("pebble.pem").display(),
    )
}

/// An open connection through the tcp route's echo backend.
fn echo_conn(k: &Ktern, roots: &[CertificateDer<'static>]) -> Client {
    let refs: Vec<&CertificateDer<'static>> = roots.iter().collect();
    let cfg = client_config(&refs);
    let conn =
        rustls::ClientConnection::new(cfg, ServerName::try_from("b.acme.test").unwrap()).unwrap();
    let sock = TcpStream::connect(k.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut c = rustls::StreamOwned::new(conn, sock);
    c.write_all(b"ECHO\n").unwrap();
    echo(&mut c, b"before");
    c
}

fn echo(c: &mut Client, data: &[u8]) {
    c.write_all(data).unwrap();
    c.flush().unwrap();
    let mut got = vec![0u8; data.len()];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, data);
}

#[test]
fn tls_alpn_01_issues_renews_and_rides_out_a_ca_outage() {
    let pki = Pki::new("acme-alpn");
    let port = free_port();
    // 45 s certificates: renewal is due after 30 s (two thirds), and the
    // first one still verifies for 15 s after the failed renewal.
    let mut pebble = Pebble::start(&pki.dir, port, free_port(), 45);
    let backend = start_backend();
    let config = acme_listener(port, backend, &pebble, &pki.dir, "");
    let k = Ktern::start(&pki, "", &config);

    // Issued: the leaf verifies against the CA's root, for both names.
    let first_roots = [pebble.root()];
    let first = wait_for_new_leaf(
        &k,
        "a.acme.test",
        &first_roots,
        None,
        Duration::from_secs(30),
    );
    assert_eq!(
        served_leaf(k.addr(), "b.acme.test", &first_roots).as_ref(),
        Some(&first)
    );
    assert_eq!(k.metric("ktern_acme_certificates_issued_total"), 1);
    let state = pki.dir.join("acme");
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    let current = state.join("a.acme.test/current");
    assert_eq!(mode(&current.join("key.pem")), 0o600);
    let on_disk = std::fs::read(current.join("cert.pem")).unwrap();
    assert_eq!(CertificateDer::from_pem_slice(&on_disk).unwrap(), first);
    let accounts: Vec<_> = std::fs::read_dir(state.join("accounts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(mode(&accounts[0]), 0o600, "the account key");
    // No temporary file is left behind.
    for d in [current, state.join("a.acme.test"), state.join("accounts")] {
        for e in std::fs::read_dir(d).unwrap() {
            let name = e.unwrap().file_name();
            assert!(!name.to_string_lossy().contains(".tmp"), "{name:?}");
        }
    }

    // A connection open across everything below.
    let mut open = echo_conn(&k, &first_roots);

    // The CA goes away before the renewal is due: the order fails, is
    // logged and counted, and the old certificate keeps serving.
    pebble.stop();
    wait_for(
        &k,
        Duration::from_secs(40),
        "no failed order counted",
        || (k.metric("ktern_acme_order_failures_total") > 0).then_some(()),
    );
    assert!(k.log().contains("ACME: order failed"), "{}", k.log());
    assert_eq!(
        served_leaf(k.addr(), "a.acme.test", &first_roots).as_ref(),
        Some(&first),
        "the old certificate serves during the outage"
    );
    echo(&mut open, b"during the outage");

    // The CA is back: a retry renews (a new account, as pebble forgot the
    // old one), and the new certificate is swapped in by a reload.
    pebble.restart();
    let second_root = pebble.root();
    let second = wait_for_new_leaf(
        &k,
        "a.acme.test",
        &[second_root],
        Some(&first),
        Duration::from_secs(30),
    );
    assert_ne!(second, first);
    assert_eq!(k.metric("ktern_acme_certificates_issued_total"), 2);
    assert!(k.metric("ktern_reloads_total") >= 2);
    echo(&mut open, b"after the renewal");
    assert!(
        k.log().contains("ACME tls-alpn-01 validation answered"),
        "{}",
        k.log()
    );
}

/// Certificates obtained in one pass go live by one reload, not one each:
/// each reload reads every certificate of the config again, and a first
/// start ordering a thousand names did a thousand of them.
#[test]
fn certificates_obtained_together_go_live_by_one_reload() {
    let pki = Pki::new("acme-batch");
    let port = free_port();
    let pebble = Pebble::start(&pki.dir, port, free_port(), 3600);
    let mut config = acme_listener(port, start_backend(), &pebble, &pki.dir, "");
    // Two more certificates on the same listener (the last [[listener]]).
    for name in ["c.acme.test", "d.acme.test"] {
        config.push_str(&format!(
            "[[listener.certificate]]\nacme = {{ domains = [\"{name}\"], directory = \"{}\", ca = \"{}\" }}\n",
            pebble.directory(),
            pki.dir.join("pebble.pem").display()
        ));
    }
    let k = Ktern::start(&pki, "", &config);
    let roots = [pebble.root()];
    for name in ["a.acme.test", "c.acme.test", "d.acme.test"] {
        wait_for_new_leaf(&k, name, &roots, None, Duration::from_secs(60));
    }
    assert_eq!(k.metric("ktern_acme_certificates_issued_total"), 3);
    // One reload for the three (two, should the pass have run past
    // RELOAD_EVERY, 30 s, between them); it was three.
    let reloads = k.metric("ktern_reloads_total");
    assert!(
        (1..=2).contains(&reloads),
        "{reloads} reloads for 3 certificates"
    );
    assert!(
        k.log()
            .contains("ACME: reloaded to serve the new certificates"),
        "{}",
        k.log()
    );
}

/// The CA issued, but the certificate could not be written (a full disk;
/// here the order's state directory is a file in the way): the retry
/// writes the same certificate again, not a new order each time (every
/// order counts against the CA's limits: at Let's Encrypt, five of the
/// same names a week).
#[test]
fn a_certificate_that_could_not_be_written_is_written_again_not_ordered_again() {
    let pki = Pki::new("acme-unkept");
    let port = free_port();
    let pebble = Pebble::start(&pki.dir, port, free_port(), 3600);
    let config = acme_listener(port, start_backend(), &pebble, &pki.dir, "");
    let in_the_way = pki.dir.join("acme/a.acme.test");
    std::fs::create_dir_all(pki.dir.join("acme")).unwrap();
    std::fs::write(&in_the_way, "a file").unwrap();
    let k = Ktern::start(&pki, "", &config);
    wait_failure(&k, 0, &in_the_way.display().to_string());
    std::fs::remove_file(&in_the_way).unwrap();
    let roots = [pebble.root()];
    wait_for_new_leaf(&k, "a.acme.test", &roots, None, Duration::from_secs(30));
    let log = k.log();
    assert_eq!(
        log.matches("ACME: ordering a certificate").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("writing the certificate the CA issued again"),
        "{log}"
    );
    assert_eq!(k.metric("ktern_acme_certificates_issued_total"), 1);
}

/// ACME Renewal Information (RFC 9773): the CA's suggested window moves
/// a renewal sooner than two thirds of the lifetime. pebble 2.4 has no
/// ARI, so tests/common/ari_ca.py adds it in front of pebble: a window
/// that has passed for the certificates the test lists, one 30 days
/// ahead for the others. Then, on the same CA: a Retry-After that panics
/// the ACME client, and a renewal whose reload is refused.
#[test]
fn renewal_information_from_the_ca_brings_renewal_forward() {
    let pki = Pki::new("acme-ari");
    let port = free_port();
    // Hour-long certificates: the lifetime rule alone would not renew
    // within the test.
    let pebble = Pebble::start(&pki.dir, port, free_port(), 3600);
    let state = pki.dir.join("ari");
    let (cert, key) = (pki.dir.join("pebble.pem"), pki.dir.join("pebble.key"));
    let directory = pebble.directory();
    let (_ari, ari_port) = python_ca(
        "ari_ca.py",
        &[
            cert.as_os_str(),
            key.as_os_str(),
            directory.as_ref(),
            state.as_os_str(),
        ],
    );
    let backend = start_backend();
    let config = acme_listener(port, backend, &pebble, &pki.dir, "")
        .replace(&directory, &format!("https://127.0.0.1:{ari_port}/dir"));
    let k = Ktern::start(&pki, "", &config);
    let roots = [pebble.root()];
    let first = wait_for_new_leaf(&k, "a.acme.test", &roots, None, Duration::from_secs(30));
    // ktern asks about the certificate it was given, by its identifier
    // (the authority key identifier and the serial, RFC 9773 §4.1), and
    // a window 30 days ahead leaves it be: `issued` certificates so far.
    let asked_and_left_be = |leaf: &CertificateDer<'static>, issued: u64| -> String {
        let id = ktern::control::acme::certificate_id(leaf)
            .unwrap()
            .to_string();
        wait_for(&k, Duration::from_secs(20), "no ARI question", || {
            let asked = std::fs::read_to_string(state.with_extension("asked"));
            asked
                .unwrap_or_default()
                .lines()
                .any(|l| l == id)
                .then_some(())
        });
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(k.metric("ktern_acme_certificates_issued_total"), issued);
        id
    };
    let first_id = asked_and_left_be(&first, 1);

    // The CA moves the window into the past: ktern renews at once. Its
    // order names the certificate it replaces (RFC 9773 §5); pebble 2.4
    // does not echo that field back, which instant-acme refuses, so that
    // order fails (logged and counted) and the retry orders without it.
    std::fs::write(state.with_extension("now"), &first_id).unwrap();
    let second = wait_for_new_leaf(
        &k,
        "a.acme.test",
        &roots,
        Some(&first),
        Duration::from_secs(30),
    );
    assert_eq!(k.metric("ktern_acme_certificates_issued_total"), 2);
    let log = k.log();
    assert!(log.contains("the CA's renewal information"), "{log}");
    assert!(log.contains(&format!("replaces=\"{first_id}\"")), "{log}");
    assert!(log.contains("replaces field mismatch"), "{log}");
    assert_eq!(k.metric("ktern_acme_order_failures_total"), 1);
    // The new certificate is asked about in turn, and left be.
    let second_id = asked_and_left_be(&second, 2);
    assert_ne!(second_id, first_id);
    assert_eq!(k.metric("ktern_acme_order_failures_total"), 1);

    // A Retry-After that overflows the clock: instant-acme 0.8.5 adds it to
    // `SystemTime::now()` unchecked and panics. That question fails alone
    // (`guarded`), counted as ktern's own; the ACME thread goes on, and
    // once the CA answers sanely again it renews when the window says so.
    let internal = k.metric("ktern_internal_errors_total");
    std::fs::write(state.with_extension("retry"), u64::MAX.to_string()).unwrap();
    wait_for(&k, Duration::from_secs(20), "no panic caught", || {
        (k.metric("ktern_internal_errors_total") > internal).then_some(())
    });
    let log = k.log();
    assert!(log.contains("no renewal information from the CA"), "{log}");
    assert!(log.contains("the ACME client panicked"), "{log}");
    std::fs::remove_file(state.with_extension("retry")).unwrap();

    // A renewal while the config file is half edited: the certificate is
    // obtained, but the reload that would serve it is refused, and the old
    // one serves on. Once the file is whole a later pass reloads, with no
    // new order.
    let whole = std::fs::read_to_string(&k.config_path).unwrap();
    std::fs::write(&k.config_path, "[runtime\n").unwrap();
    let refused = k.metric("ktern_reload_failures_total");
    std::fs::write(state.with_extension("now"), &second_id).unwrap();
    wait_for(&k, Duration::from_secs(60), "no refused reload", || {
        (k.metric("ktern_reload_failures_total") > refused).then_some(())
    });
    assert!(
        k.log().contains("the reload to serve them was refused"),
        "{}",
        k.log()
    );
    assert_eq!(k.metric("ktern_acme_certificates_issued_total"), 3);
    assert_eq!(
        served_leaf(k.addr(), "a.acme.test", &roots).as_ref(),
        Some(&second)
    );
    std::fs::write(&k.config_path, whole).unwrap();
    wait_for_new_leaf(
        &k,
        "a.acme.test",
        &roots,
        Some(&second),
        Duration::from_secs(30),
    );
    assert_eq!(k.metric("ktern_acme_certificates_issued_total"), 3);
}

#[test]
fn http_01_is_answered_on_the_redirect_listener() {
    let pki = Pki::new("acme-http");
    let (port, http_port) = (free_port(), free_port());
    let pebble = Pebble::start(&pki.dir, port, http_port, 3600);
    let backend = start_backend();
    let config = format!(
        "{}\n[[redirect]]\naddress = \"127.0.0.1:{http_port}\"\n",
        acme_listener(
            port,
            backend,
            &pebble,
            &pki.dir,
            ", challenge = \"http-01\""
        )
    );
    let k = Ktern::start(&pki, "", &config);
    let root = pebble.root();
    wait_for_new_leaf(&k, "b.acme.test", &[root], None, Duration::from_secs(30));
    assert!(
        k.log().contains("ACME http-01 validation answered"),
        "{}",
        k.log()
    );
    // Other paths still redirect; unknown tokens are 404.
    let get = |path: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", http_port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: a.acme.test\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    assert!(get("/x").starts_with("HTTP/1.1 301 "));
    assert!(get("/.well-known/acme-challenge/unknown").starts_with("HTTP/1.1 404 "));
}

#[test]
fn before_the_first_order_a_stand_in_serves_and_bad_orders_are_config_errors() {
    let pki = Pki::new("acme-config");
    // No CA at this address: the order fails and is retried, while a
    // self-signed stand-in serves the names.
    let (_held, refusing) = refusing_port();
    // Port 0: nothing here needs to know it ahead (a port picked by
    // `free_port` can be taken by a parallel test before ktern binds it).
    let config = format!(
        "[acme]\nstate_dir = \"{}\"\nretry = \"1s\"\nretry_max = \"1s\"\n\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[listener.certificate]]\nacme = {{ domains = [\"c.acme.test\"], directory = \"https://{refusing}/dir\" }}\n\
         [listener.route]\nkind = \"tcp\"\nbackends = [\"{}\"]\n",
        pki.dir.join("acme").display(),
        start_backend()
    );
    let k = Ktern::start(&pki, "", &config);
    assert!(
        k.wait_metric("ktern_acme_order_failures_total", 2) >= 2,
        "{}",
        k.log()
    );
    assert!(k.log().contains("ACME: order failed"), "{}", k.log());
    let (_, body) = k.admin_request("GET", "/certs");
    assert!(body.contains("acme stand-in"), "{body}");
    assert!(body.contains("c.acme.test"), "{body}");

    // `ktern check` says the certificate is a stand-in (a warning: exit 0).
    let out = Command::new(env!("CARGO_BIN_EXE_ktern"))
        .arg("check")
        .arg("-c")
        .arg(&k.config_path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("listener[0].certificate[0].acme") && text.contains("not obtained yet"),
        "{text}"
    );
    assert!(
        text.contains("listener[0].certificate[0].acme.challenge")
            && text.contains("validated on port 443"),
        "{text}"
    );

    // What the config check refuses, each naming its field.
    for (acme, field, why) in [
        (
            "domains = [\"*.acme.test\"], directory = \"https://ca/dir\"",
            "acme.domains[0]",
            "wildcard",
        ),
        (
            "domains = [\"a.acme.test\"], directory = \"http://ca/dir\"",
            "acme.directory",
            "https://",
        ),
        (
            "domains = [\"a.acme.test\"], directory = \"https://ca/dir\", contact = [\"ops@x\"]",
            "acme.contact[0]",
            "mailto:",
        ),
        (
            "domains = [\"a.acme.test\"], directory = \"https://ca/dir\", challenge = \"dns-01\"",
            "acme.challenge",
            "dns-01",
        ),
        (
            "domains = [\"a.acme.test\"], directory = \"https://ca/dir\", challenge = \"http-01\"",
            "acme.challenge",
            "[[redirect]]",
        ),
        (
            "domains = [], directory = \"https://ca/dir\"",
            "acme.domains",
            "at least one",
        ),
    ] {
        let path = pki.dir.join(format!("bad-{}.toml", unique()));
        std::fs::write(
            &path,
            format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.certificate]]\nacme = {{ {acme} }}\n[listener.route]\nkind = \"tcp\"\nbackends = [\"127.0.0.1:1\"]\n"
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ktern"))
            .arg("check")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{acme}: accepted");
        assert!(err.contains(field) && err.contains(why), "{acme}: {err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}

/// A child process killed on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts one of the test CAs in tests/common (Python, HTTPS on
/// 127.0.0.1) with `args`; returns it (killed on drop) and its port.
fn python_ca(script: &str, args: &[&std::ffi::OsStr]) -> (Reaped, u16) {
    let mut child = Command::new("python3")
        .arg(format!(
            "{}/tests/common/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut port,
    )
    .unwrap();
    let reaped = Reaped(child);
    (reaped, port.trim().parse().unwrap())
}

/// Waits (up to 30 s) until `ktern_acme_order_failures_total` passes
/// `past` and the log says `why`.
fn wait_failure(k: &Ktern, past: u64, why: &str) -> u64 {
    wait_for(
        k,
        Duration::from_secs(30),
        &format!("no failure saying {why:?}"),
        || {
            let n = k.metric("ktern_acme_order_failures_total");
            (n > past && k.log().contains(why)).then_some(n)
        },
    )
}

/// The hostile test CA (`hostile_ca.py`, its certificate made in
/// `pki.dir`), answering what `pki.dir/answer` says (500 until a test
/// writes something else), and a config whose `tcp` listener orders one
/// name from it, retrying every second, with `state_dir`: the CA (killed
/// on drop) and the config.
fn hostile_ca_ordering(pki: &Pki, state_dir: &Path) -> (Reaped, String) {
    let (cert, key) = ktern::builtin::self_signed(&["localhost", "127.0.0.1"]).unwrap();
    let (ca_pem, ca_key) = (pki.dir.join("ca.pem"), pki.dir.join("ca.key"));
    std::fs::write(&ca_pem, cert).unwrap();
    std::fs::write(&ca_key, key).unwrap();
    let answer = pki.dir.join("answer");
    std::fs::write(&answer, "500\n").unwrap();
    let (ca, port) = python_ca(
        "hostile_ca.py",
        &[ca_pem.as_os_str(), ca_key.as_os_str(), answer.as_os_str()],
    );
    let config = format!(
        "[acme]\nstate_dir = \"{}\"\nretry = \"1s\"\nretry_max = \"1s\"\n\n\
         [[listener]]\naddress = \"127.0.0.1:{}\"\n\
         [[listener.certificate]]\nacme = {{ domains = [\"d.acme.test\"], directory = \"https://127.0.0.1:{port}/dir\", ca = \"{}\" }}\n\
         [listener.route]\nkind = \"tcp\"\nbackends = [\"{}\"]\n",
        state_dir.display(),
        free_port(),
        ca_pem.display(),
        start_backend()
    );
    (ca, config)
}

#[test]
fn garbage_rate_limits_and_an_unwritable_state_are_logged_counted_and_retried() {
    let pki = Pki::new("acme-hostile");
    let answer = pki.dir.join("answer");
    std::fs::write(pki.dir.join("answer.dir"), "200\nthis is not JSON").unwrap();
    // The state directory sits under a regular file: nothing can be
    // written there until the test removes the file.
    std::fs::write(pki.dir.join("blocked"), "a file").unwrap();
    let (_ca, config) = hostile_ca_ordering(&pki, &pki.dir.join("blocked/acme"));
    let mut k = Ktern::start(&pki, "", &config);

    // A state directory that cannot be made: an error naming the path,
    // before the CA is asked anything.
    let n = wait_failure(&k, 0, &pki.dir.join("blocked/acme").display().to_string());
    std::fs::remove_file(pki.dir.join("blocked")).unwrap();
    // A directory that is not JSON.
    let n = wait_failure(&k, n, "failed to (de)serialize JSON");
    // A CA that rate-limits new accounts (its problem document is logged).
    std::fs::remove_file(pki.dir.join("answer.dir")).unwrap();
    std::fs::write(
        &answer,
        "429\n{\"type\": \"urn:ietf:params:acme:error:rateLimited\", \"detail\": \"too many new accounts from 127.0.0.1\", \"status\": 429}",
    )
    .unwrap();
    let n = wait_failure(&k, n, "too many new accounts from 127.0.0.1");
    // A CA that accepts the account, then answers the order with
    // something that is not an order: the account is kept (the key
    // readable by ktern alone), the order fails.
    std::fs::write(&answer, "201\n{\"status\": \"valid\"}").unwrap();
    wait_failure(&k, n, "the CA (new order)");
    let accounts: Vec<_> = std::fs::read_dir(pki.dir.join("blocked/acme/accounts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&accounts[0])
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Through all of it the stand-in serves, and ktern keeps serving.
    let (_, body) = k.admin_request("GET", "/certs");
    assert!(body.contains("acme stand-in"), "{body}");
    assert_eq!(k.metric("ktern_acme_certificates_issued_total"), 0);
    assert!(k.child.try_wait().unwrap().is_none(), "ktern exited");
}

/// A draining process (SIGTERM here; the same after a binary upgrade's
/// hand-over) orders no more certificates: it may no longer answer the
/// CA's validation, and each failure counts against the CA's limits.
/// Before, it went on retrying through `drain_delay` and `drain_timeout`.
#[test]
fn a_draining_process_orders_no_more_certificates() {
    let pki = Pki::new("acme-drain");
    let (_ca, config) = hostile_ca_ordering(&pki, &pki.dir.join("acme"));
    let k = Ktern::start(&pki, "drain_delay = \"10s\"", &config);
    // Failing and retrying about once a second.
    let n = wait_failure(&k, 0, "ACME: order failed");
    wait_failure(&k, n, "ACME: order failed");
    k.signal("TERM");
    let until = Instant::now() + Duration::from_secs(5);
    while k.admin_request("GET", "/ready").0 != 503 {
        assert!(Instant::now() < until, "/ready did not flip");
        std::thread::sleep(Duration::from_millis(20));
    }
    // An order under way when the signal came may still fail; none after.
    let at_drain = k.metric("ktern_acme_order_failures_total");
    std::thread::sleep(Duration::from_secs(4));
    let after = k.metric("ktern_acme_order_failures_total");
    assert!(
        after <= at_drain + 1,
        "{} orders failed after the drain began",
        after - at_drain
    );
    assert!(
        k.log().contains("it orders no more certificates"),
        "{}",
        k.log()
    );
}
