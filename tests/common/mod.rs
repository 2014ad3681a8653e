//! Shared test support: a certificate, a test backend, a running ktern
//! process, a rustls client, and the admin metrics.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, StreamOwned};

pub mod h2;
pub mod http;

/// A scratch directory with a self-signed certificate for `localhost`.
pub struct Pki {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("ktern-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Extra names for the SNI routing tests.
        let (cert, key) =
            ktern::builtin::self_signed(&["localhost", "a.sni.test", "*.wild.test"]).unwrap();
        std::fs::write(dir.join("cert.pem"), &cert).unwrap();
        std::fs::write(dir.join("key.pem"), &key).unwrap();
        Pki {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            der: CertificateDer::from_pem_slice(cert.as_bytes()).unwrap(),
            dir,
        }
    }
}

/// The scratch directory goes with the test (some hold 48 MiB files; a
/// suite run left thousands behind). `KTERN_KEEP_TEST_DIRS=1` keeps them
/// for a post-mortem.
impl Drop for Pki {
    fn drop(&mut self) {
        if std::env::var_os("KTERN_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A loopback port that refuses connections, and the socket holding it:
/// bound but not listening, so no other test can take the port while it
/// lives (a port merely noted and closed was once reused by a concurrent
/// test's backend, and the "refused" connection succeeded).
pub fn refusing_port() -> (socket2::Socket, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}

/// The key algorithm of a test certificate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyKind {
    /// ECDSA P-256 (rcgen's default).
    Ecdsa,
    /// RSA 2048 (one key made with openssl, in `tests/fixtures`: rcgen
    /// cannot make RSA keys with ring).
    Rsa,
}

/// A self-signed certificate for `names` written to `dir/<tag>.{crt,key}`;
/// returns the two paths and the leaf.
pub fn write_cert(
    dir: &std::path::Path,
    tag: &str,
    names: &[&str],
    kind: KeyKind,
) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let (cert, key) = match kind {
        KeyKind::Ecdsa => {
            let c = rcgen::generate_simple_self_signed(names).unwrap();
            (c.cert.pem(), c.signing_key.serialize_pem())
        }
        KeyKind::Rsa => {
            let pem = include_str!("../fixtures/rsa-2048.key");
            let key = rcgen::KeyPair::from_pem(pem).unwrap();
            let cert = rcgen::CertificateParams::new(names)
                .unwrap()
                .self_signed(&key)
                .unwrap();
            (cert.pem(), pem.to_string())
        }
    };
    let (c, k) = (
        dir.join(format!("{tag}.crt")),
        dir.join(format!("{tag}.key")),
    );
    std::fs::write(&c, &cert).unwrap();
    std::fs::write(&k, &key).unwrap();
    (
        c,
        k,
        CertificateDer::from_pem_slice(cert.as_bytes()).unwrap(),
    )
}

/// Deterministic test bytes (xorshift64*), so both ends can hash the same stream.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545F4914F6CDD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> String {
    use ktern::provider::prims::digest;
    digest::digest(&digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A `ktern-load backend` with `args` (its `--kind` and so on) on a
/// port the kernel picks, and its address: no free port picked and
/// released first, which another process could take in between. Killed
/// when dropped.
pub fn load_backend(args: &[&str]) -> (LoadBackend, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ktern-load"))
        .args(["backend", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start ktern-load backend");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let backend = LoadBackend(child);
    let addr = line
        .strip_prefix("backend ")
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("ktern-load backend printed {line:?}, not its address"));
    (backend, addr)
}

/// [`load_backend`]'s process.
pub struct LoadBackend(Child);

impl Drop for LoadBackend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A backend speaking a tiny protocol, one command per connection:
/// - `DOWN <n> <seed>\n`: sends `pattern(n, seed)` and closes.
/// - `UP\n`: reads to EOF (the client's half-close), then replies with the
///   byte count and sha256 of everything after the command, and closes.
/// - `ECHO\n`: echoes until EOF, then closes.
/// - `RESET\n`: resets the connection (RST).
pub fn start_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = backend_conn(conn);
            });
        }
    });
    addr
}

fn backend_conn(conn: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["DOWN", n, seed] => {
            let data = pattern(n.parse().unwrap(), seed.parse().unwrap());
            out.write_all(&data)?;
        }
        ["UP"] => {
            let mut all = Vec::new();
            reader.read_to_end(&mut all)?;
            writeln!(out, "{} {}", all.len(), sha256(&all))?;
        }
        ["RESET"] => {
            // Abort: SO_LINGER 0 turns the close into a TCP RST.
            socket2::SockRef::from(&out).set_linger(Some(std::time::Duration::ZERO))?;
            return Ok(());
        }
        ["LINES"] => {
            // Many exchanges on one connection: `DOWN n seed` sends n
            // pattern bytes, `DRIP n size seed` the same in writes of
            // `size` bytes 5 ms apart (a backend pushing small messages),
            // `UP n` reads n bytes and answers their length and sha256;
            // any other line comes back as it came.
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    break;
                }
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["DOWN", n, seed] => {
                        out.write_all(&pattern(n.parse().unwrap(), seed.parse().unwrap()))?
                    }
                    ["DRIP", n, size, seed] => {
                        let data = pattern(n.parse().unwrap(), seed.parse().unwrap());
                        for piece in data.chunks(size.parse().unwrap()) {
                            out.write_all(piece)?;
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                    }
                    ["UP", n] => {
                        let mut all = vec![0; n.parse().unwrap()];
                        reader.read_exact(&mut all)?;
                        writeln!(out, "{} {}", all.len(), sha256(&all))?;
                    }
                    _ => out.write_all(line.as_bytes())?,
                }
            }
        }
        ["ECHO"] => {
            let mut buf = [0u8; 16384];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
            }
        }
        _ => {}
    }
    out.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// A running `ktern run -c` child process, killed on drop.
pub struct Ktern {
    pub child: Child,
    pub addrs: Vec<SocketAddr>,
    pub redirects: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub stderr_path: PathBuf,
    /// The config file it runs (rewrite it, then reload).
    pub config_path: PathBuf,
    /// The kernel's kTLS counters when it started (empty outside the VM).
    pub tls_stat_at_start: std::collections::HashMap<String, u64>,
}

impl Ktern {
    /// Starts ktern with `listeners` (TOML `[[listener]]` tables; `@CERT@` and
    /// `@KEY@` are replaced) and an admin endpoint. `runtime` is the body of
    /// the `[runtime]` table.
    pub fn start(pki: &Pki, runtime: &str, listeners: &str) -> Ktern {
        Ktern::start_env(pki, runtime, listeners, &[])
    }

    /// The config text [`Ktern::start`] would write (for rewriting it).
    pub fn config_text(pki: &Pki, runtime: &str, listeners: &str) -> String {
        let log = if runtime.contains("log_format") {
            ""
        } else {
            "log_format = \"text\"\n"
        };
        // The suites check the kernel's record path from a connection's
        // first byte (ktls_after = 0); the default hand-over at the first
        // bulk response has its own tests (tests/http.rs, `ktls_after`).
        let after = if runtime.contains("ktls_after") {
            ""
        } else {
            "ktls_after = \"0\"\n"
        };
        format!(
            "[runtime]\n{log}{after}{runtime}\n\n[admin]\naddress = \"127.0.0.1:0\"\n\n{}",
            listeners
                .replace("@CERT@", &pki.cert.display().to_string())
                .replace("@KEY@", &pki.key.display().to_string())
        )
    }

    /// Like [`Ktern::start`], with extra environment variables.
    pub fn start_env(pki: &Pki, runtime: &str, listeners: &str, env: &[(&str, &str)]) -> Ktern {
        let config = Ktern::config_text(pki, runtime, listeners);
        let path = pki.dir.join(format!("ktern-{}.toml", unique()));
        std::fs::write(&path, config).unwrap();
        Ktern::start_file(&pki.dir, &path, env)
    }

    /// Starts `ktern run -c path`; its log goes to a file in `dir`.
    pub fn start_file(
        dir: &std::path::Path,
        path: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Ktern {
        Ktern::start_args(dir, path, env, &[])
    }

    /// [`Ktern::start_file`] with extra `ktern run` arguments.
    pub fn start_args(
        dir: &std::path::Path,
        path: &std::path::Path,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Ktern {
        Ktern::spawn(dir, path, env, args, &[])
    }

    /// Like [`Ktern::start`], run under `prefix` (e.g. `prlimit --nofile=64`).
    pub fn start_prefixed(pki: &Pki, runtime: &str, listeners: &str, prefix: &[&str]) -> Ktern {
        let path = pki.dir.join(format!("ktern-{}.toml", unique()));
        std::fs::write(&path, Ktern::config_text(pki, runtime, listeners)).unwrap();
        Ktern::spawn(&pki.dir, &path, &[], &[], prefix)
    }

    /// Starts `ktern run -c path` in the network namespace `ns` (through
    /// `ip netns exec`, which execs: the child's pid is ktern's).
    pub fn start_in_netns(ns: &str, dir: &std::path::Path, path: &std::path::Path) -> Ktern {
        Ktern::spawn(dir, path, &[], &[], &["ip", "netns", "exec", ns])
    }

    fn spawn(
        dir: &std::path::Path,
        path: &std::path::Path,
        env: &[(&str, &str)],
        args: &[&str],
        prefix: &[&str],
    ) -> Ktern {
        let stderr_path = dir.join(format!("ktern-{}.log", unique()));
        // KTERN_TEST_BIN: another build of ktern to start (scripts/test.sh
        // runs the memory budgets against the release build, the one
        // operators run: its futures, so its idle connections, differ in
        // size from the debug build's).
        let ktern = std::env::var_os("KTERN_TEST_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_ktern").into());
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(ktern);
                c
            }
            None => Command::new(ktern),
        };
        let tls_stat_at_start = tls_stat();
        // Memory bounds count 4 KiB pages: no huge page collapsed under
        // them on khugepaged's schedule (see the function). Inherited by
        // every ktern started from here on.
        ktern::sys::disable_transparent_huge_pages().unwrap();
        let mut child = cmd
            .args(["run", "-c"])
            .arg(path)
            .args(args)
            .env("RUST_LOG", "ktern=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut addrs = Vec::new();
        let mut redirects = Vec::new();
        let mut admin = None;
        for line in stdout.lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("redirecting ") {
                redirects.push(rest.trim().parse().unwrap());
            } else if let Some(rest) = line.strip_prefix("listening ") {
                addrs.push(rest.split_whitespace().nth(1).unwrap().parse().unwrap());
            } else if let Some(rest) = line.strip_prefix("admin http://") {
                admin = Some(rest.trim_end_matches("/metrics").parse().unwrap());
                break;
            }
        }
        let Some(admin) = admin else {
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!("ktern did not start:\n{log}");
        };
        let ktern = Ktern {
            child,
            addrs,
            redirects,
            admin,
            stderr_path,
            config_path: path.to_path_buf(),
            tls_stat_at_start,
        };
        // The release pass (scripts/test.sh, scripts/vm-tests.sh) names the
        // release binary: check that the ktern it started is one, so a
        // wrong path cannot pass the memory budgets on the debug build's
        // figures unseen.
        if std::env::var_os("KTERN_TEST_BIN").is_some() {
            let (_, body) = ktern.admin_request("GET", "/metrics");
            let build = body.lines().find(|l| l.starts_with("ktern_build_info{"));
            assert!(
                build.is_some_and(|l| l.contains("profile=\"release\"")),
                "KTERN_TEST_BIN started {build:?}, not a release build"
            );
        }
        ktern
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// ktern's resident memory in bytes, for the memory budgets. Checks that
    /// it runs without transparent huge pages, which would move the figure
    /// by 2 MiB at a time (`THP_enabled`, Linux 5.0+; older kernels do not
    /// say).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        if let Some(thp) = status.lines().find_map(|l| l.strip_prefix("THP_enabled:")) {
            assert_eq!(thp.trim(), "0", "ktern runs with transparent huge pages");
        }
        ktern::sys::rss_of(self.pid()).unwrap()
    }

    /// Sends a signal by name (`HUP`, `TERM`, …) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// One admin request: (status, body).
    pub fn admin_request(&self, method: &str, path: &str) -> (u16, String) {
        admin_request(self.admin, method, path)
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Open file descriptors of the process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Threads of the process.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .count()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// One counter or gauge from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no metric {name}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// The sum of a labeled metric's series whose labels contain `labels`
    /// (e.g. `class="2xx"`).
    pub fn metric_labeled(&self, name: &str, labels: &str) -> u64 {
        let (_, body) = self.admin_request("GET", "/metrics");
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| l.contains(labels))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// Waits until `name` reaches at least `want` (counters move after the
    /// connection's last byte, so give the shard a moment).
    pub fn wait_metric(&self, name: &str, want: u64) -> u64 {
        let until = Instant::now() + Duration::from_secs(10) * slow();
        loop {
            let v = self.metric(name);
            if v >= want || Instant::now() > until {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Ktern::wait_metric`], for a gauge going down to `want`.
    pub fn wait_metric_down_to(&self, name: &str, want: u64) -> u64 {
        let until = Instant::now() + Duration::from_secs(10) * slow();
        loop {
            let v = self.metric(name);
            if v <= want || Instant::now() > until {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Ktern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain-HTTP request to an admin endpoint: (status, body).
pub fn admin_request(admin: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, body.to_string())
}

pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// ktern under `strace -f -ttt` for the syscall guards (issue 13: a bound
/// on what does not jitter). strace starts ktern, so no ptrace-attach
/// rights are needed.
pub struct Traced {
    pub ktern: Ktern,
    trace: PathBuf,
}

impl Traced {
    /// Like [`Ktern::start`], traced. Panics without strace (scripts/test.sh
    /// and .ci/run install it).
    pub fn start(pki: &Pki, runtime: &str, listeners: &str) -> Traced {
        assert!(
            Command::new("strace").arg("-V").output().is_ok(),
            "strace is not installed (scripts/test.sh installs it)"
        );
        let trace = pki.dir.join(format!("strace-{}.out", unique()));
        let arg = trace.display().to_string();
        let ktern = Ktern::start_prefixed(
            pki,
            runtime,
            listeners,
            &["strace", "-f", "-qq", "-ttt", "-o", &arg],
        );
        Traced { ktern, trace }
    }

    /// Runs `work`, then stops ktern and counts, by name, the syscalls
    /// its shard threads entered while `work` ran. Only the shards: the
    /// control, health and expiry threads wake on their own timers, and
    /// a guard that counted them failed on what ran beside it, not on the
    /// data path (CI, 2026-12-02: 16 `poll` and a thread start in the
    /// window).
    pub fn count(self, work: impl FnOnce()) -> std::collections::BTreeMap<String, u64> {
        let shards = self.shard_tids();
        assert!(!shards.is_empty(), "no ktern-shard thread under strace");
        let from = Traced::now();
        work();
        let to = Traced::now();
        self.calls_between(&shards, from, to)
    }

    /// The pid of ktern itself: strace's child.
    fn traced_pid(&self) -> String {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.ktern.pid()))
                .unwrap();
        children
            .split_whitespace()
            .next()
            .expect("ktern under strace")
            .to_string()
    }

    /// The thread ids of ktern's shards (threads named `ktern-shard-N`).
    fn shard_tids(&self) -> std::collections::BTreeSet<String> {
        let pid = self.traced_pid();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|e| {
                let tid = e.ok()?.file_name().into_string().ok()?;
                let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
                comm.starts_with("ktern-shard").then_some(tid)
            })
            .collect()
    }

    /// Now, in the trace's clock (Unix seconds).
    fn now() -> f64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    }

    /// Stops ktern (strace writes its last lines when its tracee is gone)
    /// and counts, by name, the syscalls the threads `tids` entered
    /// between `from` and `to`.
    fn calls_between(
        self,
        tids: &std::collections::BTreeSet<String>,
        from: f64,
        to: f64,
    ) -> std::collections::BTreeMap<String, u64> {
        let pid = self.traced_pid();
        let Traced { mut ktern, trace } = self;
        Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        ktern
            .wait_exit(Duration::from_secs(10))
            .expect("strace exits with ktern");
        let mut calls = std::collections::BTreeMap::new();
        for line in std::fs::read_to_string(&trace).unwrap().lines() {
            // "<tid> <secs.micros> <name>(..." (strace pads the tid when tids
            // differ in length); a call split by another thread's shows again
            // as "<... name resumed>": count it once.
            let Some((tid, after_tid)) = line.trim_start().split_once(' ') else {
                continue;
            };
            if !tids.contains(tid) {
                continue;
            }
            let Some((t, rest)) = after_tid.trim_start().split_once(' ') else {
                continue;
            };
            let Ok(t) = t.parse::<f64>() else { continue };
            // Log lines (stderr; the tests run ktern at debug level) are
            // not the data path.
            if t < from
                || t > to
                || rest.starts_with("write(2,")
                || rest.starts_with("<...")
                || rest.starts_with("+++")
                || rest.starts_with("---")
            {
                continue;
            }
            let name = rest.split('(').next().unwrap_or(rest).to_string();
            *calls.entry(name).or_default() += 1;
        }
        calls
    }
}

/// A listener table for a layer-4 route to `backend`.
pub fn tcp_listener(backend: SocketAddr, extra: &str) -> String {
    format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n{extra}\n[[listener.certificate]]\ncert = \"@CERT@\"\nkey = \"@KEY@\"\n[listener.route]\nkind = \"tcp\"\nbackends = [\"{backend}\"]\n"
    )
}

pub fn provider() -> rustls::crypto::CryptoProvider {
    ktern::handshake::crypto_provider()
}

/// Client options: protocol version and cipher suite to force.
#[derive(Clone, Copy, Default)]
pub struct ClientOpts {
    pub tls12: bool,
    pub suite: Option<rustls::CipherSuite>,
    /// SNI to send (default `localhost`).
    pub server_name: Option<&'static str>,
}

pub type Client = StreamOwned<ClientConnection, TcpStream>;

/// A TLS 1.3 client config (with its own resumption cache) trusting every certificate in `roots`.
pub fn client_config(
    roots: &[&rustls::pki_types::CertificateDer<'static>],
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth(),
    )
}

/// A TLS 1.2 client trusting `root` that resumes by session id only (no
/// tickets), with its own session cache.
pub fn tls12_session_id_client(
    root: &rustls::pki_types::CertificateDer<'static>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(8)
        .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
    Arc::new(cfg)
}

/// Connects with `cfg` and completes the handshake; errors instead of
/// panicking (load tests count them).
pub fn try_connect(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> std::io::Result<Client> {
    let conn = ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap())
        .map_err(std::io::Error::other)?;
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// A connected rustls client that trusts `pki`, handshake completed.
pub fn connect(addr: SocketAddr, pki: &Pki, opts: ClientOpts) -> Client {
    connect_over(TcpStream::connect(addr).unwrap(), pki, opts)
}

/// [`connect`] from the local address `source` (loopback has all of
/// 127.0.0.0/8: a second client on one machine).
pub fn connect_from(source: std::net::IpAddr, addr: SocketAddr, pki: &Pki) -> Client {
    connect_over(tcp_from(source, addr).unwrap(), pki, ClientOpts::default())
}

/// A TCP connection to `addr` from the local address `source`.
pub fn tcp_from(source: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.bind(&SocketAddr::new(source, 0).into())?;
    s.connect(&addr.into())?;
    Ok(s.into())
}

/// Runs `conn`'s handshake over `sock` until its Finished is queued
/// (rustls counts the handshake done then) but not yet sent: the caller
/// sends that last flight, with what it adds ([`pending_tls`]).
pub fn until_the_finished(conn: &mut ClientConnection, sock: &mut TcpStream) {
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(sock).unwrap();
        }
        assert!(conn.read_tls(sock).unwrap() > 0, "the server closed");
        conn.process_new_packets().unwrap();
    }
}

/// The TLS bytes `conn` has queued (records sealed, not yet sent).
pub fn pending_tls(conn: &mut ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Reads until the server's first TLS 1.3 ticket has come: it goes out
/// once the handshake is done, so what the client writes next cannot
/// reach the server in one read with its Finished. (A client whose data
/// and close came with its Finished has closed before ktern could hand
/// the keys to the kernel, and stays on userspace records: in the VM an
/// offload check then fails; seen in CI.)
pub fn until_a_ticket(c: &mut Client) {
    while c.conn.tls13_tickets_received() == 0 {
        assert!(
            c.conn.read_tls(&mut c.sock).unwrap() > 0,
            "the server closed"
        );
        c.conn.process_new_packets().unwrap();
    }
}

/// `data` sealed by `c` as it would send it, not sent: to send in parts.
pub fn sealed_by(c: &mut Client, data: &[u8]) -> Vec<u8> {
    c.conn.writer().write_all(data).unwrap();
    pending_tls(&mut c.conn)
}

/// The TLS client handshake over `sock`, trusting `pki`.
pub fn connect_over(sock: TcpStream, pki: &Pki, opts: ClientOpts) -> Client {
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut s = StreamOwned::new(client_conn(pki, opts), sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

/// A rustls client connection (no handshake yet) trusting `pki`, with
/// `opts`' version, suite and SNI.
pub fn client_conn(pki: &Pki, opts: ClientOpts) -> ClientConnection {
    let mut provider = provider();
    if let Some(suite) = opts.suite {
        provider.cipher_suites.retain(|s| s.suite() == suite);
        assert!(
            !provider.cipher_suites.is_empty(),
            "provider lacks {suite:?}"
        );
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.der.clone()).unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] = if opts.tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ClientConnection::new(
        Arc::new(cfg),
        ServerName::try_from(opts.server_name.unwrap_or("localhost")).unwrap(),
    )
    .unwrap()
}

/// Reads to the end of the TLS stream. Returns the bytes; panics unless the
/// server ended with close_notify (rustls reports a bare FIN as an error).
pub fn read_to_close_notify(c: &mut Client) -> Vec<u8> {
    let mut all = Vec::new();
    c.read_to_end(&mut all)
        .expect("stream must end with close_notify");
    all
}

/// Downloads `n` pattern bytes through ktern and checks them byte for byte.
pub fn download(addr: SocketAddr, pki: &Pki, opts: ClientOpts, n: usize) {
    let mut c = connect(addr, pki, opts);
    let seed = n as u64 + 7;
    writeln!(c, "DOWN {n} {seed}").unwrap();
    c.flush().unwrap();
    let got = read_to_close_notify(&mut c);
    assert_eq!(got.len(), n, "download length");
    assert_eq!(sha256(&got), sha256(&pattern(n, seed)), "download bytes");
}

/// Uploads `n` pattern bytes, half-closes (close_notify + FIN), and checks
/// the backend's count and sha256 of what arrived.
pub fn upload(addr: SocketAddr, pki: &Pki, opts: ClientOpts, n: usize) {
    let mut c = connect(addr, pki, opts);
    let data = pattern(n, 99);
    c.write_all(b"UP\n").unwrap();
    c.write_all(&data).unwrap();
    c.conn.send_close_notify();
    c.flush().unwrap();
    while c.conn.wants_write() {
        c.conn.write_tls(&mut c.sock).unwrap();
    }
    c.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let reply = String::from_utf8(read_to_close_notify(&mut c)).unwrap();
    assert_eq!(reply, format!("{} {}\n", n, sha256(&data)), "upload digest");
}

/// Running inside the kTLS VM (scripts/vm-tests.sh sets KTERN_IN_VM).
pub fn in_vm() -> bool {
    std::env::var_os("KTERN_IN_VM").is_some()
}

/// Whether the outside tool `name` is installed: it must be on the host
/// (scripts/test.sh installs each one); the VM has none of them.
pub fn tool(name: &str) -> bool {
    let found = Command::new(name).arg("--version").output().is_ok();
    assert!(found || in_vm(), "{name} is not installed");
    found
}

/// Under qemu's TCG everything is several times slower: timing margins grow.
pub fn slow() -> u32 {
    if in_vm() {
        4
    } else {
        1
    }
}

/// The kernel's kTLS counters (`/proc/net/tls_stat`; empty without kTLS).
pub fn tls_stat() -> std::collections::HashMap<String, u64> {
    std::fs::read_to_string("/proc/net/tls_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// How far `/proc/net/tls_stat`'s `counter` moved since `before` (a
/// [`tls_stat`] snapshot).
pub fn tls_stat_since(before: &std::collections::HashMap<String, u64>, counter: &str) -> u64 {
    tls_stat().get(counter).copied().unwrap_or(0) - before.get(counter).copied().unwrap_or(0)
}

/// How far the kernel's software kTLS sessions (`TlsTxSw`, `TlsRxSw`)
/// moved since `before` (a [`tls_stat`] snapshot): one each per connection
/// whose keys went to the kernel.
pub fn software_sessions_since(before: &std::collections::HashMap<String, u64>) -> [u64; 2] {
    ["TlsTxSw", "TlsRxSw"].map(|c| tls_stat_since(before, c))
}

/// Two active health checks ran, and none failed.
pub fn assert_health_checks_pass(k: &Ktern) {
    assert!(
        k.wait_metric("ktern_health_checks_total", 2) >= 2,
        "{}",
        k.log()
    );
    assert_eq!(
        k.metric("ktern_health_check_failures_total"),
        0,
        "{}",
        k.log()
    );
}

/// Connections served on userspace records other than those whose client
/// closed before the keys could go to the kernel (the last of a warm-up
/// batch, dropped right after its handshake, can be one).
pub fn userspace_while_open(k: &Ktern) -> u64 {
    k.metric("ktern_ktls_userspace_total")
        - k.metric_labeled(
            "ktern_ktls_userspace_reason_total",
            "reason=\"peer_closed\"",
        )
}

/// In the kTLS VM, the connections so far were offloaded: at least one
/// went to the kernel, none stayed on userspace records (a silent
/// fallback fails the test), and the kernel's own counters agree: since
/// `k` started, it set up software TX and RX crypto for at least as many
/// sockets as `k` says it offloaded (the VM suites run one test at a
/// time, so no other test's sockets count; another ktern of the same test
/// can only add). On the host, nothing to check.
pub fn assert_offloaded_in_vm(k: &Ktern) {
    if in_vm() {
        let offloaded = k.wait_metric("ktern_ktls_offloaded_total", 1);
        assert!(offloaded > 0);
        assert_eq!(userspace_while_open(k), 0);
        assert_kernel_sessions_at_least(k, offloaded, "client legs");
    }
}

/// /proc/net/tls_stat's software TX and RX sessions moved by at least
/// `sockets` since `k` started (the kernel's word beside ktern's count).
fn assert_kernel_sessions_at_least(k: &Ktern, sockets: u64, what: &str) {
    for (counter, delta) in ["TlsTxSw", "TlsRxSw"]
        .into_iter()
        .zip(software_sessions_since(&k.tls_stat_at_start))
    {
        assert!(
            delta >= sockets,
            "/proc/net/tls_stat {counter} moved by {delta} since ktern started; it says it offloaded {sockets} ({what})"
        );
    }
}

/// In the kTLS VM, `k`'s backend TLS connections, `n` of them, went to
/// the kernel too: ktern counted `n` (a backend leg that stayed on
/// userspace records counts none), and the kernel set up software TX and
/// RX crypto for at least the client legs and those `n` together. Called
/// beside [`assert_offloaded_in_vm`], which checks the client legs alone.
/// On the host, nothing to check.
pub fn assert_upstream_offloaded_in_vm(k: &Ktern, n: u64) {
    if in_vm() {
        let upstream = k.wait_metric("ktern_upstream_ktls_offloaded_total", n);
        assert_eq!(upstream, n, "backend legs offloaded");
        let sockets = k.metric("ktern_ktls_offloaded_total") + upstream;
        assert_kernel_sessions_at_least(k, sockets, "client and backend legs");
    }
}

/// A backend that reads a PROXY header (v1 to its CRLF, v2 by its length
/// field), answers with the header's length on a line and the header, then
/// echoes what follows (read back with [`read_proxy_header_echo`]).
pub fn start_proxy_reading_backend() -> SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut header = Vec::new();
                let mut b = [0u8; 1];
                // Byte by byte: the header's end, not a byte more.
                while conn.read_exact(&mut b).is_ok() {
                    header.push(b[0]);
                    let v2_done = header.len() >= 16
                        && header.starts_with(b"\r\n\r\n\0\r\nQUIT\n")
                        && header.len()
                            == 16 + u16::from_be_bytes([header[14], header[15]]) as usize;
                    if header.ends_with(b"\r\n") && header.starts_with(b"PROXY") || v2_done {
                        break;
                    }
                    if header.len() > 600 {
                        return;
                    }
                }
                let _ = conn.write_all(format!("{}\n", header.len()).as_bytes());
                let _ = conn.write_all(&header);
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The PROXY header a [`start_proxy_reading_backend`] backend received,
/// read from its answer on `c` (the bytes echoed after it stay unread).
pub fn read_proxy_header_echo(c: &mut impl std::io::Read) -> Vec<u8> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        c.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    let len: usize = String::from_utf8_lossy(&line).trim().parse().unwrap();
    let mut header = vec![0u8; len];
    c.read_exact(&mut header).unwrap();
    header
}

/// A TLS backend (rustls, `pki`'s certificate, ALPN h2 and http/1.1) for
/// passthrough tests: after its handshake it says
/// `NAME sni=SNI alpn=ALPN` on a line, then echoes until the client ends.
pub fn start_tls_backend(name: &'static str, pki: &Pki) -> SocketAddr {
    start_tls_backend_with(name, pki, None)
}

/// [`start_tls_backend`] that requires a client certificate issued by a
/// CA in `client_cas`, when given.
pub fn start_tls_backend_with(
    name: &'static str,
    pki: &Pki,
    client_cas: Option<&[CertificateDer<'static>]>,
) -> SocketAddr {
    start_tls_backend_on(name, tls_server_config(pki, client_cas))
}

/// [`start_tls_backend`] with its rustls config given.
pub fn start_tls_backend_on(name: &'static str, cfg: Arc<rustls::ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let _ = sock.set_read_timeout(Some(Duration::from_secs(20)));
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut s = StreamOwned::new(conn, sock);
                while s.conn.is_handshaking() {
                    if s.conn.complete_io(&mut s.sock).is_err() {
                        return;
                    }
                }
                let hello = format!(
                    "{name} sni={} alpn={}\n",
                    s.conn.server_name().unwrap_or("-"),
                    s.conn
                        .alpn_protocol()
                        .map_or("-".into(), |a| String::from_utf8_lossy(a).into_owned())
                );
                if s.write_all(hello.as_bytes()).is_err() {
                    return;
                }
                let mut buf = [0u8; 16 << 10];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                s.conn.send_close_notify();
                let _ = s.conn.complete_io(&mut s.sock);
            });
        }
    });
    addr
}

/// A rustls server config for a test's TLS backend: `pki`'s certificate,
/// ALPN h2 and http/1.1, and a client certificate from `client_cas`
/// required when given.
pub fn tls_server_config(
    pki: &Pki,
    client_cas: Option<&[CertificateDer<'static>]>,
) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::PrivateKeyDer;
    let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_cas {
        None => builder.with_no_client_auth(),
        Some(cas) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in cas {
                roots.add(ca.clone()).unwrap();
            }
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::new(provider()),
                )
                .build()
                .unwrap(),
            )
        }
    };
    let mut cfg = builder
        .with_single_cert(vec![pki.der.clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// nginx started by a test as an HTTP backend that takes PROXY headers
/// (`listen … proxy_protocol`): it answers every request with
/// `pp=CLIENT>SERVER conn=$connection`, the PROXY header's two addresses
/// (`$proxy_protocol_addr:$proxy_protocol_port` and the `_server_` pair),
/// and logs the same line. Killed on drop.
pub struct NginxProxyBackend {
    child: Child,
    pub addr: SocketAddr,
    pub access_log: PathBuf,
}

impl NginxProxyBackend {
    /// `None` where nginx is not installed (the kTLS VM's minimal guest);
    /// the host run, where CI installs it, requires it.
    pub fn start(tag: &str) -> Option<NginxProxyBackend> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(bin) = bin else {
            assert!(
                in_vm(),
                "nginx is required for this test (apt-get install nginx)"
            );
            return None;
        };
        let dir = std::env::temp_dir().join(format!("ktern-nginx-{tag}-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        // A free port: bound, read, released (nginx binds it next).
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let d = dir.display();
        let access_log = dir.join("access.log");
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 log_format pp 'pp=$proxy_protocol_addr:$proxy_protocol_port>$proxy_protocol_server_addr:$proxy_protocol_server_port conn=$connection';\n  access_log {d}/access.log pp;\n\
                 keepalive_requests 1000;\n\
                 server {{\n    listen {addr} proxy_protocol;\n    location / {{ return 200 \"pp=$proxy_protocol_addr:$proxy_protocol_port>$proxy_protocol_server_addr:$proxy_protocol_server_port conn=$connection\\n\"; }}\n  }}\n}}\n"
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut n = NginxProxyBackend {
            child,
            addr,
            access_log,
        };
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = n.child.try_wait() {
                panic!(
                    "nginx exited ({status}): {}",
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < until, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(n)
    }
}

impl Drop for NginxProxyBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
