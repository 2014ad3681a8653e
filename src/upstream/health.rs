//! Active health checks: every `interval`, `GET path` (or with `check =
//! "tcp"`, a connect) on each backend of an upstream group that has
//! `[upstream.NAME.health]`; `rise` passes in a row
//! bring a backend back, `fall` failures in a row take it out (HAProxy's
//! model). Verdicts go to a [`HealthState`] that every shard's balancer
//! reads; a backend marked down is tried last, as with passive health.
//!
//! The decision logic ([`Tracker`], [`classify`]) is sans-IO; [`start`]
//! runs the probes on one thread with its own monoio runtime (the legacy
//! driver: a handful of sockets every few seconds needs no io_uring), so
//! checks never compete with a shard's connections and are not multiplied
//! by the number of shards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use super::HealthState;
use crate::config::{Config, HealthCheck, HealthKind};
use crate::metrics::ShardMetrics as M;

/// Largest response head read from a check (the body is ignored).
const MAX_HEAD: usize = 16 << 10;

/// One backend's pass/fail streaks.
#[derive(Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    up: bool,
    streak: u32,
}

/// A change of verdict.
#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    /// `rise` passes in a row.
    Up,
    /// `fall` failures in a row.
    Down,
}

impl Tracker {
    /// A backend considered up until `fall` checks fail.
    pub fn new(rise: u32, fall: u32) -> Tracker {
        Tracker {
            rise: rise.max(1),
            fall: fall.max(1),
            up: true,
            streak: 0,
        }
    }

    /// Starts from "down" (a verdict carried over across a reload): `rise`
    /// passes bring it back.
    pub fn mark_down(&mut self) {
        self.up = false;
        self.streak = 0;
    }

    /// Records one check; returns the transition it caused, if any.
    pub fn record(&mut self, pass: bool) -> Option<Transition> {
        // The streak counts checks that disagree with the current verdict.
        if pass == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let need = if self.up { self.fall } else { self.rise };
        if self.streak < need {
            return None;
        }
        self.up = pass;
        self.streak = 0;
        Some(if pass {
            Transition::Up
        } else {
            Transition::Down
        })
    }

    /// The current verdict.
    pub fn is_up(&self) -> bool {
        self.up
    }
}

/// What the bytes of a check response say so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// The head is incomplete.
    NeedMore,
    /// A 2xx or 3xx status.
    Pass,
    /// Anything else: the reason, for the log.
    Fail(String),
    /// The probe could not run: ktern is out of fds or memory (no verdict
    /// on the backend).
    Local(String),
}

/// Fields a check response head may have: as many as the proxy takes in
/// a backend's response (`proxy::http::head::MAX_FIELDS`; not imported:
/// `upstream` is below `proxy` in the module graph).
const MAX_FIELDS: usize = 128;

/// Classifies a check response from its first bytes. Interim (1xx)
/// responses before the final one are skipped, as the proxy skips them
/// (RFC 9110 §15.2: `103 Early Hints`, `102 Processing`).
pub fn classify(buf: &[u8]) -> Probe {
    let mut rest = buf;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut resp = httparse::Response::new(&mut headers);
        return match resp.parse(rest) {
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Probe::NeedMore,
            Ok(httparse::Status::Partial) => Probe::Fail("response head too large".into()),
            Ok(httparse::Status::Complete(len)) => match resp.code {
                Some(100..=199) if resp.code != Some(101) => {
                    rest = &rest[len..];
                    continue;
                }
                Some(200..=399) => Probe::Pass,
                Some(c) => Probe::Fail(format!("status {c}")),
                None => Probe::Fail("no status".into()),
            },
            Err(e) => Probe::Fail(format!("not HTTP/1.x: {e}")),
        };
    }
}

/// The check request: HTTP/1.1 with `Connection: close`, so a backend
/// never keeps a check connection open.
pub fn request(check: &HealthCheck, addr: SocketAddr) -> Vec<u8> {
    let host = check.host.clone().unwrap_or_else(|| addr.to_string());
    format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ktern-health\r\nConnection: close\r\n\r\n",
        check.path
    )
    .into_bytes()
}

/// How a check reaches its backend: what the group's requests go
/// through too, so a check passes only where requests can.
struct Way {
    /// With `send_proxy`: a PROXY header naming no client, first (the
    /// backend expects one on every connection; HAProxy's
    /// `check-send-proxy`).
    preface: Vec<u8>,
    /// With `tls`: the group's TLS settings and a client config of the
    /// check's own (records in userspace: a check moves a few hundred
    /// bytes).
    tls: Option<(crate::config::UpstreamTls, Arc<rustls::ClientConfig>)>,
}

/// Per-upstream verdicts (`None` for groups without checks), indexed like
/// `Config::upstreams`.
pub struct Checks {
    /// Indexed like `Config::upstreams`.
    pub states: Vec<Option<Arc<HealthState>>>,
    /// Cleared to stop this generation's probes.
    alive: Arc<std::sync::atomic::AtomicBool>,
}

impl Checks {
    /// Stops this generation's probes (their thread ends when all have).
    pub fn retire(&self) {
        self.alive
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts a checker thread for every upstream group with `health` (one
/// per config generation; [`Checks::retire`] stops it). `metrics` is the
/// process's health counter set, shared across generations.
///
/// `previous` (the replaced generation's config and checks): an unchanged
/// group keeps its verdicts (the same [`HealthState`], which the shards'
/// carried-over balancers read), now written by this generation's probes.
pub fn start(
    config: &Config,
    metrics: Arc<M>,
    previous: Option<(&Config, &Checks)>,
) -> std::io::Result<Checks> {
    let states: Vec<Option<Arc<HealthState>>> = config
        .upstreams
        .iter()
        .map(|u| {
            u.health.as_ref()?;
            // The same backends checked the same way: any other change to
            // the group (its timeouts, its pool, its TLS, whose verifier is
            // new at every reload) leaves what the checks found true.
            let old = previous.and_then(|(c, checks)| {
                let i = c.upstreams.iter().position(|o| {
                    o.name == u.name && o.backends == u.backends && o.health == u.health
                })?;
                checks.states.get(i)?.clone()
            });
            Some(old.unwrap_or_else(|| Arc::new(HealthState::new(u.backends.len()))))
        })
        .collect();
    let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
    if states.iter().all(Option::is_none) {
        return Ok(Checks { states, alive });
    }
    let mut jobs = Vec::new();
    for (u, state) in config.upstreams.iter().zip(&states) {
        if let (Some(check), Some(state)) = (&u.health, state) {
            for (i, b) in u.backends.iter().enumerate() {
                jobs.push(Job {
                    upstream: u.name.clone(),
                    index: i,
                    addr: b.addr,
                    check: check.clone(),
                    way: way(u),
                    state: state.clone(),
                    alive: alive.clone(),
                });
            }
        }
    }
    let m = metrics.clone();
    std::thread::Builder::new()
        .name("ktern-health".into())
        .spawn(move || {
            let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build();
            match rt {
                Ok(mut rt) => rt.block_on(async move {
                    let tasks: Vec<_> = jobs
                        .into_iter()
                        .map(|job| monoio::spawn(run(job, m.clone())))
                        .collect();
                    for t in tasks {
                        t.await;
                    }
                }),
                Err(e) => tracing::error!(error = %e, "internal: health checker did not start"),
            }
        })?;
    Ok(Checks { states, alive })
}

struct Job {
    upstream: String,
    index: usize,
    addr: SocketAddr,
    check: HealthCheck,
    way: Way,
    state: Arc<HealthState>,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

/// Checks one backend forever.
async fn run(job: Job, metrics: Arc<M>) {
    let mut tracker = Tracker::new(job.check.rise, job.check.fall);
    let req = (job.check.kind == HealthKind::Http).then(|| request(&job.check, job.addr));
    // A verdict carried over from the replaced generation. (The down
    // gauge is counted from the current generation's verdicts at each
    // scrape, `Control::refresh_gauges`: counted here, a backend found down
    // counted twice from a reload until the old probe noticed it was
    // retired, up to a second later.)
    let mut down = !job.state.is_up(job.index);
    if down {
        tracker.mark_down();
    }
    loop {
        if !job.alive.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let started = Instant::now();
        let probe = probe(job.addr, &job.way, req.as_deref(), job.check.timeout);
        let verdict = match monoio::time::timeout(job.check.timeout, probe).await {
            Ok(v) => v,
            Err(_) => Probe::Fail(format!("no response within {:?}", job.check.timeout)),
        };
        // Replaced while probing: the new generation's probe owns the
        // verdict now.
        if !job.alive.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        // ktern itself out of fds or memory says nothing about the backend.
        if let Probe::Local(e) = &verdict {
            tracing::debug!(upstream = %job.upstream, backend = %job.addr, error = %e, "health check skipped: local resources exhausted");
            pause(job.check.interval, &job.alive).await;
            continue;
        }
        M::inc(&metrics.health_checks);
        let pass = verdict == Probe::Pass;
        if !pass {
            M::inc(&metrics.health_check_failures);
            tracing::debug!(upstream = %job.upstream, backend = %job.addr, ?verdict, "health check failed");
        }
        match tracker.record(pass) {
            Some(Transition::Down) => {
                job.state.set(job.index, false);
                down = true;
                M::inc(&metrics.health_marked_down);
                tracing::warn!(upstream = %job.upstream, backend = %job.addr, ?verdict, fall = job.check.fall, "backend marked down by health checks");
            }
            Some(Transition::Up) => {
                job.state.set(job.index, true);
                down = false;
                tracing::info!(upstream = %job.upstream, backend = %job.addr, rise = job.check.rise, "backend back up by health checks");
            }
            None => {}
        }
        // Every check writes the verdict, not only a transition: an older
        // generation's probe that finished a check after this one started
        // cannot leave a stale verdict behind for long.
        job.state.set(job.index, !down);
        let next = job.check.interval.saturating_sub(started.elapsed());
        pause(next.max(Duration::from_millis(10)), &job.alive).await;
    }
}

/// Sleeps `d`, or less once a reload retired the checks: a replaced
/// generation's checker (a thread with its own runtime) then ends within
/// a second, not an `interval` later (up to a year), so reloads more
/// frequent than the interval do not pile them up.
async fn pause(d: Duration, alive: &std::sync::atomic::AtomicBool) {
    let until = Instant::now() + d;
    while alive.load(std::sync::atomic::Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        monoio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
}

/// The way to `u`'s backends.
fn way(u: &crate::config::Upstream) -> Way {
    let tls = u.tls.as_ref().and_then(|t| {
        match crate::handshake::client::client_config(t, &[b"http/1.1"]) {
            Ok(c) => Some((t.clone(), c)),
            Err(e) => {
                // Not expected (both providers do TLS 1.2 and 1.3); the
                // checks then go without TLS and fail, which shows.
                tracing::error!(upstream = %u.name, error = %e, "internal: cannot build the health check TLS config");
                None
            }
        }
    });
    Way {
        preface: u
            .send_proxy
            .map(super::proxy_out::local)
            .unwrap_or_default(),
        tls,
    }
}

/// One check: connect and the PROXY header when the group has one; then,
/// with a request (`check = "http"`), TLS when the group has it, send,
/// read until the status is known. Without one the connect passes.
async fn probe(addr: SocketAddr, way: &Way, req: Option<&[u8]>, timeout: Duration) -> Probe {
    use super::conn::BackendConn;
    let mut stream = match TcpStream::connect_addr(addr).await {
        Ok(s) => s,
        Err(e)
            if crate::upstream::is_local_exhaustion(&e) || crate::upstream::is_out_of_ports(&e) =>
        {
            return Probe::Local(e.to_string())
        }
        Err(e) => return Probe::Fail(format!("connect: {e}")),
    };
    if !way.preface.is_empty() {
        if let Err(e) = stream.write_all(way.preface.clone()).await.0 {
            return Probe::Fail(format!("PROXY header: {e}"));
        }
    }
    let Some(req) = req else {
        return Probe::Pass;
    };
    let mut conn = match &way.tls {
        None => BackendConn::Plain(stream),
        Some((tls, config)) => {
            let off = (
                crate::config::KtlsMode::Off,
                &crate::ktls::Support::default(),
            );
            match super::conn::start_tls(stream, config.clone(), tls, addr, timeout, off).await {
                Ok(s) => s.conn.into(),
                Err(e) => return Probe::Fail(e.to_string()),
            }
        }
    };
    let (res, _) = conn.write_all(req.to_vec()).await;
    if let Err(e) = res {
        return Probe::Fail(format!("write: {e}"));
    }
    let mut head: Vec<u8> = Vec::new();
    loop {
        match conn.read_some(4096).await {
            Ok(buf) if buf.is_empty() => {
                return Probe::Fail("closed before a response head".into())
            }
            Ok(buf) => head.extend_from_slice(&buf),
            Err(e) => return Probe::Fail(format!("read: {e}")),
        }
        match classify(&head) {
            Probe::NeedMore => continue,
            verdict => return verdict,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_and_rise_need_streaks() {
        let mut t = Tracker::new(2, 3);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a pass resets the failure streak");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(Transition::Down));
        assert!(!t.is_up());
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None, "a failure resets the pass streak");
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(Transition::Up));
        assert!(t.is_up());
    }

    #[test]
    fn responses_are_classified_by_status() {
        assert_eq!(classify(b"HTTP/1.1 200 OK\r\n\r\n"), Probe::Pass);
        assert_eq!(
            classify(b"HTTP/1.0 301 Moved\r\nLocation: /\r\n\r\n"),
            Probe::Pass
        );
        assert_eq!(classify(b"HTTP/1.1 200 OK\r\nConte"), Probe::NeedMore);
        assert_eq!(
            classify(b"HTTP/1.1 503 Busy\r\n\r\n"),
            Probe::Fail("status 503".into())
        );
        assert!(matches!(classify(b"SSH-2.0-OpenSSH\r\n"), Probe::Fail(_)));
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        big.resize(MAX_HEAD + 1, b'a');
        assert!(matches!(classify(&big), Probe::Fail(_)));
    }

    #[test]
    fn interim_responses_are_skipped_for_the_final_status() {
        let hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
        assert_eq!(classify(hints), Probe::NeedMore);
        let mut ok = hints.to_vec();
        ok.extend_from_slice(b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(classify(&ok), Probe::Pass);
        let mut bad = hints.to_vec();
        bad.extend_from_slice(b"HTTP/1.1 500 Oops\r\n\r\n");
        assert_eq!(classify(&bad), Probe::Fail("status 500".into()));
        // 101 is final for a check that asked no upgrade: a failure.
        assert_eq!(
            classify(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            Probe::Fail("status 101".into())
        );
        // More fields than the old 64-field array held.
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(classify(&many), Probe::Pass);
    }

    #[test]
    fn request_names_path_and_host() {
        let check = HealthCheck {
            kind: HealthKind::Http,
            path: "/healthz".into(),
            host: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 1,
            fall: 1,
        };
        let addr: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let req = String::from_utf8(request(&check, addr)).unwrap();
        assert!(req.starts_with("GET /healthz HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n"));
        assert!(req.ends_with("Connection: close\r\n\r\n"));
    }
}
