//! Drain as a fleet sees it: two ktern hosts behind a real kernel ECMP
//! router (network namespaces, scripts/ecmp-netns.sh), a client load on the
//! shared VIP, one host drained with SIGTERM and its route withdrawn once
//! its `/ready` has said 503 for a while (what a health checker does).
//! Needs root and iproute2; skipped, and said so, without them.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

const VIP: &str = "10.78.9.9:8443";

fn script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ecmp-netns.sh").to_string()
}

/// One fleet's namespaces: `PREFIX-c`, `-r`, `-h1`, `-h2` (each test has
/// its own prefix, so the tests of this file run side by side). Torn
/// down on drop, whatever happened.
struct Fleet {
    prefix: &'static str,
}

impl Fleet {
    /// Brings the namespaces up; `None` (and said so) without root or
    /// iproute2.
    fn up(prefix: &'static str) -> Option<Fleet> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let fleet = Fleet { prefix };
        // Root is not enough in a container without CAP_SYS_ADMIN: a
        // scratch namespace says whether namespaces can be made at all
        // (`down` succeeds either way).
        let probe = format!("{prefix}probe{}", std::process::id());
        let can = root
            && Command::new("ip")
                .args(["netns", "add", &probe])
                .status()
                .is_ok_and(|s| s.success());
        if can {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
        }
        if !can || !fleet.netns(&["down"]) {
            eprintln!("skipped: needs root, iproute2 and the right to make network namespaces");
            return None;
        }
        assert!(fleet.netns(&["up"]), "scripts/ecmp-netns.sh up failed");
        Some(fleet)
    }

    fn netns(&self, cmd: &[&str]) -> bool {
        Command::new(script())
            .args(cmd)
            .env("PREFIX", self.prefix)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// Hosts `h1` and `h2`: each an HTTP backend (`ktern-load`) and a
    /// ktern on the VIP in front of it; `extra[i]` goes into host i's
    /// config before the listener, `runtime` is the `[runtime]` body.
    fn hosts(
        &self,
        pki: &Pki,
        runtime: &str,
        extra: &[&str; 2],
    ) -> (Vec<(String, Ktern)>, Vec<Reaper>) {
        let mut hosts = Vec::new();
        let mut backends = Vec::new();
        for (h, extra) in ["h1", "h2"].iter().zip(extra) {
            let ns = self.ns(h);
            backends.push(Reaper(
                Command::new("ip")
                    .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_ktern-load")])
                    .args([
                        "backend",
                        "--listen",
                        "127.0.0.1:18080",
                        "--kind",
                        "http",
                        "--body-bytes",
                        "16",
                        "--seconds",
                        "120",
                    ])
                    .spawn()
                    .unwrap(),
            ));
            // ktern answers 502 until its backend listens: start it only
            // once the backend accepts (under a loaded CI box the backend
            // came up after the clients' first requests).
            in_ns(&ns, || {
                let until = Instant::now() + Duration::from_secs(10);
                while std::net::TcpStream::connect("127.0.0.1:18080").is_err() {
                    assert!(Instant::now() < until, "backend in {ns} did not listen");
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let listeners = format!(
                "{extra}\n[[listener]]\nname = \"vip\"\naddress = \"{VIP}\"\n[[listener.certificate]]\ncert = \"@CERT@\"\nkey = \"@KEY@\"\n[listener.route]\nkind = \"http\"\n[[listener.route.rule]]\nupstream = \"app\"\n[upstream.app]\nbackends = [\"127.0.0.1:18080\"]\n"
            );
            let path = pki.dir.join(format!("{h}.toml"));
            std::fs::write(&path, Ktern::config_text(pki, runtime, &listeners)).unwrap();
            hosts.push((ns.clone(), Ktern::start_in_netns(&ns, &pki.dir, &path)));
        }
        (hosts, backends)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.netns(&["down"]);
    }
}

/// Kills a helper process on drop.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            ktern::sys::enter_netns(ns).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

#[derive(Default)]
struct Load {
    ok: AtomicU64,
    connects: AtomicU64,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
    pause: AtomicBool,
    idle: AtomicUsize,
}

/// A client that honours `Connection: close` and, like curl or a browser,
/// checks an idle connection before reusing it (a close_notify that came
/// while it was idle means: open a new one).
fn client(cfg: Arc<ClientConfig>, load: Arc<Load>) {
    let vip: SocketAddr = VIP.parse().unwrap();
    let mut conn: Option<Client> = None;
    let mut on_this = 0;
    while !load.stop.load(Ordering::Relaxed) {
        if load.pause.load(Ordering::Relaxed) {
            load.idle.fetch_add(1, Ordering::SeqCst);
            while load.pause.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            load.idle.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(c) = conn.as_mut() {
            c.sock.set_nonblocking(true).unwrap();
            let mut probe = [0u8; 1];
            let alive =
                matches!(c.read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            c.sock.set_nonblocking(false).unwrap();
            if !alive {
                conn = None;
            }
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                let sock = match std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(5))
                {
                    Ok(s) => s,
                    Err(e) => {
                        load.errors.lock().unwrap().push(format!("connect: {e}"));
                        continue;
                    }
                };
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let tls =
                    ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap())
                        .unwrap();
                load.connects.fetch_add(1, Ordering::Relaxed);
                conn.insert(StreamOwned::new(tls, sock))
            }
        };
        let res = c
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .and_then(|_| c.flush())
            .and_then(|_| {
                let mut r = std::io::BufReader::new(&mut *c);
                http::read_response(&mut r, false)
            });
        match res {
            Ok(r) if r.status == 200 => {
                load.ok.fetch_add(1, Ordering::Relaxed);
                on_this += 1;
                // Like browsers and HTTP libraries, a new connection now and
                // then (here every 20 requests), so flows spread over hosts.
                if r.header("connection") == Some("close") || on_this >= 20 {
                    on_this = 0;
                    if let Some(mut c) = conn.take() {
                        c.conn.send_close_notify();
                        let _ = c.flush();
                    }
                }
            }
            Ok(r) => {
                load.errors
                    .lock()
                    .unwrap()
                    .push(format!("status {}", r.status));
                conn = None;
            }
            Err(e) => {
                load.errors.lock().unwrap().push(format!("request: {e}"));
                conn = None;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn metric(k: &Ktern, ns: &str, name: &str) -> u64 {
    in_ns(ns, || k.metric(name))
}

#[test]
fn draining_host_behind_ecmp_loses_no_request_and_gets_no_new_connection_after_withdrawal() {
    let Some(fleet) = Fleet::up("ktfleet") else {
        return;
    };
    let pki = Pki::new("fleet");
    let (mut hosts, backends) = fleet.hosts(
        &pki,
        "cpus = [0]\ndrain_delay = \"3s\"\ndrain_timeout = \"5s\"",
        &["", ""],
    );
    let cfg = client_config(&[&pki.der]);
    let load = Arc::new(Load::default());
    let clients = 6;
    let client_ns = fleet.ns("c");
    let (l, c) = (load.clone(), cfg.clone());
    let driver = std::thread::spawn(move || {
        ktern::sys::enter_netns(&client_ns).unwrap();
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let (l, c) = (l.clone(), c.clone());
                std::thread::spawn(move || client(c, l))
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    });
    let (ns1, h1) = &hosts[0];
    let (ns2, h2) = &hosts[1];
    // The router spreads flows over both hosts (each new connection is a
    // new hash; a few seconds of churn make a miss vanishingly unlikely).
    let until = Instant::now() + Duration::from_secs(10);
    while metric(h1, ns1, "ktern_connections_accepted_total") == 0
        || metric(h2, ns2, "ktern_connections_accepted_total") == 0
    {
        assert!(Instant::now() < until, "ECMP sent every flow to one host");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Host 1 drains. Its /ready turns 503 at once; the "health checker"
    // withdraws the route after seeing 503 for a second (less than the
    // drain delay, during which host 1 still accepts).
    h1.signal("TERM");
    let until = Instant::now() + Duration::from_secs(2);
    while in_ns(ns1, || h1.admin_request("GET", "/ready").0) != 503 {
        assert!(Instant::now() < until, "/ready did not flip");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    // Withdraw between two requests of every client (a request in flight
    // at that instant would be reset by the other host whatever ktern did).
    load.pause.store(true, Ordering::SeqCst);
    while load.idle.load(Ordering::SeqCst) < clients {
        std::thread::sleep(Duration::from_millis(2));
    }
    // Host 1 has closed every client connection by now: idle ones at
    // SIGTERM, busy ones after their answer (Connection: close).
    assert_eq!(
        in_ns(ns1, || h1
            .wait_metric_down_to("ktern_connections_active", 0)),
        0
    );
    assert!(fleet.netns(&["withdraw", "1"]), "withdraw failed");
    let connects_at_withdrawal = load.connects.load(Ordering::SeqCst);
    let host2_before = metric(h2, ns2, "ktern_connections_accepted_total");
    let ok_at_withdrawal = load.ok.load(Ordering::SeqCst);
    load.pause.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    load.stop.store(true, Ordering::SeqCst);
    driver.join().unwrap();
    let errors = load.errors.lock().unwrap();
    let ok = load.ok.load(Ordering::SeqCst);
    assert!(
        errors.is_empty(),
        "{} failed requests out of {ok}: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(ok > ok_at_withdrawal, "no load after the withdrawal");
    // Every connection made after the withdrawal landed on host 2.
    let new_connects = load.connects.load(Ordering::SeqCst) - connects_at_withdrawal;
    let host2_after = metric(h2, ns2, "ktern_connections_accepted_total");
    assert_eq!(host2_after - host2_before, new_connects);
    // Host 1 exits 0 once its connections are gone.
    let (_, mut h1) = hosts.remove(0);
    let status = h1
        .wait_exit(Duration::from_secs(10))
        .expect("host 1 did not exit");
    assert!(status.success(), "{status:?}");
    assert!(
        h1.log().contains("drained: every connection finished"),
        "{}",
        h1.log()
    );
    drop(backends);
}

/// One request to the VIP on a new connection (call from the client
/// namespace); whether its handshake resumed a session.
fn vip_request(cfg: &Arc<ClientConfig>) -> bool {
    let vip: SocketAddr = VIP.parse().unwrap();
    let sock = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(5)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tls =
        ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut c = StreamOwned::new(tls, sock);
    c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    c.flush().unwrap();
    let r = http::read_response(&mut std::io::BufReader::new(&mut c), false).unwrap();
    assert_eq!(r.status, 200);
    c.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

#[test]
fn sessions_resume_on_whichever_host_shares_the_ticket_secret() {
    let Some(fleet) = Fleet::up("kttick") else {
        return;
    };
    let pki = Pki::new("fleet-tickets");
    let (one, two) = (pki.dir.join("one.key"), pki.dir.join("two.key"));
    std::fs::write(&one, [3u8; 48]).unwrap();
    std::fs::write(&two, [4u8; 48]).unwrap();
    let tickets = format!("[tickets]\nsecret_file = \"{}\"", one.display());
    let (hosts, backends) = fleet.hosts(&pki, "cpus = [0]", &[&tickets, &tickets]);
    let accepted = |i: usize| {
        let (ns, k) = &hosts[i];
        metric(k, ns, "ktern_connections_accepted_total")
    };
    let cfg = client_config(&[&pki.der]);
    let client = fleet.ns("c");
    let request = || in_ns(&client, || vip_request(&cfg));
    // The VIP routed to host 1 only, then to host 2 only.
    assert!(fleet.netns(&["withdraw", "2"]));
    assert!(!request(), "the first handshake is full");
    assert!(fleet.netns(&["withdraw", "1"]));
    assert!(request(), "host 2 resumes host 1's session");
    assert_eq!((accepted(0), accepted(1)), (1, 1));
    // Both routes: every new connection resumes wherever ECMP sends it.
    assert!(fleet.netns(&["restore"]));
    for i in 0..16 {
        assert!(request(), "connection {i} was not resumed");
    }
    assert!(
        accepted(0) > 1 && accepted(1) > 1,
        "ECMP sent all 16 flows to one host: {} / {}",
        accepted(0),
        accepted(1)
    );
    // Host 2 reloads with another secret: neither host opens the other's
    // tickets any more.
    let (ns2, h2) = &hosts[1];
    let text = std::fs::read_to_string(&h2.config_path).unwrap();
    let text = text.replace(&one.display().to_string(), &two.display().to_string());
    std::fs::write(&h2.config_path, text).unwrap();
    h2.signal("HUP");
    assert_eq!(
        in_ns(ns2, || h2.wait_metric("ktern_config_generation", 2)),
        2
    );
    assert!(fleet.netns(&["withdraw", "1"]));
    assert!(!request(), "host 2 opened a ticket of the old secret");
    assert!(fleet.netns(&["withdraw", "2"]));
    assert!(!request(), "host 1 opened a ticket of host 2's new secret");
    drop(backends);
}
