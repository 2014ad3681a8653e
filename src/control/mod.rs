//! Live operations, off the shards: start-up, reload, drain.
//!
//! The control side owns what outlives a config generation: the listening
//! sockets (a copy of each shard's fd, so a socket kept across reloads is
//! never closed), the ticket keys, the health checker of the current
//! generation and the link to every shard. A reload parses the file, loads
//! every certificate and key, builds every rustls config and binds every new
//! socket here, on the caller's thread; only when all of that succeeded does
//! each shard get a pointer to swap. A refused reload changes nothing.

use crate::handshake::tickets::for_config;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::config::{Config, ConfigError, KtlsMode, Problem};
use crate::metrics::access::{OpenError, Sink};
use crate::metrics::ShardMetrics as M;
use crate::shard::{self, Command, Generation, ShardLink, Slot};
use crate::upstream::health::{self, Checks};

pub mod acme;
pub mod admin;
pub mod expiry;
pub mod notify;
pub mod upgrade;

/// How long a shard may take to confirm a command. Shards never block, so
/// this only fires if one is wedged (a bug).
const SHARD_ANSWER: Duration = Duration::from_secs(30);

/// How long the cut at the drain's end waits for the shards to drop their
/// connections (each drops them at its next turn: milliseconds).
const CUT_WAIT: Duration = Duration::from_secs(1);

/// Where the config comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file, re-read on every reload.
    File(PathBuf),
    /// The embedded default (nothing to re-read).
    Embedded,
}

/// Why a reload (or the start) was refused. Nothing was applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config file, a certificate or key, or a listener address is
    /// wrong: every problem with its file and field. Transparent: with
    /// `{0}` and `#[from]` the error was its own source too, and `main`'s
    /// `{:#}` printed every problem twice.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Started with the embedded default: there is no file to re-read.
    #[error("ktern runs the embedded default config: there is no file to reload")]
    NoFile,
    /// ktern is draining and takes no new config.
    #[error("ktern is draining (shutting down): reload refused")]
    Draining,
    /// rustls refused a config that validation passed (internal).
    #[error("internal: TLS config rejected: {0}")]
    Tls(#[from] rustls::Error),
    /// The ticket keys could not be made (internal: the config check
    /// already measured the secret).
    #[error("internal: session ticket keys: {0}")]
    Tickets(#[from] crate::handshake::tickets::TicketKeyError),
    /// A thread or socket could not be created (internal).
    #[error("internal: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A shard did not confirm the new generation (internal).
    #[error("internal: shard {0} did not answer")]
    Shard(usize),
}

/// Opens the access log for a new generation. The config check found its
/// place; a file that cannot be opened for appending (permissions, a
/// read-only filesystem) is still a config problem, reported the same way.
fn open_access_log(config: &Config) -> Result<Option<Sink>, ReloadError> {
    let Some(log) = &config.access_log else {
        return Ok(None);
    };
    Sink::open(log).map(Some).map_err(|e| match e {
        OpenError::File(_) | OpenError::NoReader => ReloadError::Config(ConfigError {
            file: config.source.clone(),
            problems: vec![Problem {
                field: "access_log.path".into(),
                reason: format!("cannot open {} for appending: {e}", log.path.display()),
            }],
        }),
        OpenError::Thread(source) => ReloadError::Io {
            what: "access log writer thread",
            source,
        },
    })
}

/// What a reload must not put in place of a certificate clients accept:
/// one that changed and that `ktern check` finds an error in (a renewal
/// written with the old intermediate or out of order, an expired file
/// copied back). Clients that do not fetch intermediates (curl, Go,
/// Python, Android) or check dates would refuse it, and the running
/// generation serves a good one. An unchanged certificate is served as
/// before whatever its date: refusing every reload once one expired
/// would also refuse the reload that replaces it.
fn broken_certificates(running: &Config, next: &Config, now: i64) -> Vec<Problem> {
    // A set: tens of thousands of certificates are each looked up once.
    let served: std::collections::HashSet<_> = running
        .listeners
        .iter()
        .flat_map(|l| &l.certificates)
        .map(|c| &c.key.cert[..])
        .collect();
    let mut out = Vec::new();
    for (i, l) in next.listeners.iter().enumerate() {
        for (j, c) in l.certificates.iter().enumerate() {
            if served.contains(&&c.key.cert[..]) {
                continue;
            }
            let at = format!("listener[{i}].certificate[{j}]");
            for f in crate::config::lint::certificate_errors(&at, c, now) {
                out.push(Problem {
                    field: f.field,
                    reason: f.message,
                });
            }
        }
    }
    out
}

/// Reopens `gen`'s access log (its running writer takes the new file):
/// whether there was one that opened.
fn reopen(gen: &Generation) -> bool {
    let Some(log) = &gen.config.access_log else {
        return false;
    };
    match Sink::open(log) {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(generation = gen.number, path = %log.path.display(), error = %e, "cannot reopen the access log; it goes on into the file it had");
            false
        }
    }
}

/// A reload that went live.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// The new generation number.
    pub generation: u64,
    /// Each TLS listener's name and bound address.
    pub listeners: Vec<(String, SocketAddr)>,
}

/// Process state the admin endpoint reports.
#[derive(Debug, Default)]
pub struct Status {
    /// Every shard listens (cleared while draining).
    pub ready: AtomicBool,
    /// SIGTERM received.
    pub draining: AtomicBool,
}

/// One listening address, bound once per shard.
#[derive(Debug)]
struct Bound {
    key: u64,
    /// The address as configured (port 0 stays 0), to match across reloads.
    configured: SocketAddr,
    redirect: bool,
    backlog: u32,
    /// The bound address (the real port).
    addr: SocketAddr,
    /// The control side's copy of each shard's socket.
    fds: Vec<std::net::TcpListener>,
}

struct Inner {
    current: Arc<Generation>,
    sockets: Vec<Bound>,
    checks: Checks,
    next_key: u64,
    /// This process's random ticket keys (one per epoch, forgotten after
    /// two): without a fleet secret every generation with the same
    /// rotation uses them, so a reload does not turn outstanding tickets
    /// into full handshakes. A reload that changes the rotation replaces
    /// them, and later reloads keep the new ones.
    own_tickets: Arc<crate::handshake::tickets::TicketKeys>,
}

/// The running process, as the control side sees it.
pub struct Control {
    inner: Mutex<Inner>,
    /// `inner.current`, readable while a reload holds `inner`.
    published: std::sync::RwLock<Arc<Generation>>,
    /// Ready/draining.
    pub status: Status,
    /// Process-level counters (reloads, generation), beside the shards'.
    pub metrics: Arc<M>,
    health_metrics: Arc<M>,
    links: Vec<ShardLink>,
    source: Source,
    /// systemd notifications (no-op outside systemd).
    pub notify: notify::Notifier,
    /// The admin endpoint's configured address, listener copy and stop flag.
    admin: Mutex<Option<(SocketAddr, std::net::TcpListener, Arc<AtomicBool>)>>,
    /// What the kernel can offload (`ktls = "required"` checks each
    /// reload's cipher suites against it).
    support: Arc<crate::ktls::Support>,
    /// Wakes the certificate expiry look after a reload.
    expiry_nudge: mpsc::Sender<()>,
    /// Wakes the ACME thread after a reload (its orders may have changed).
    acme_nudge: mpsc::Sender<()>,
    /// The ACME thread's end of `acme_nudge`, until [`Control::start_acme`].
    acme_nudged: Mutex<Option<mpsc::Receiver<()>>>,
    /// ACME challenge answers, published by the ACME thread, served by the
    /// shards (one table for the process: it outlives generations).
    pub challenges: Arc<crate::challenges::Challenges>,
}

impl Control {
    /// Binds every listener, starts the health checker and one shard per
    /// CPU, and waits until every shard listens.
    ///
    /// `inherited` are the listening sockets a running ktern handed over
    /// (binary upgrade): a listener whose configured address and kind match
    /// one of them serves on it instead of binding.
    pub fn start(
        config: Config,
        source: Source,
        support: Arc<crate::ktls::Support>,
        inherited: Vec<(upgrade::SocketMeta, Vec<std::net::TcpListener>)>,
    ) -> Result<Arc<Control>, ReloadError> {
        let cpus = shard::shard_cpus(&config);
        let uring = match config.runtime.driver {
            crate::config::Driver::Legacy => false,
            crate::config::Driver::IoUring => true,
            crate::config::Driver::Auto => monoio::utils::detect_uring(),
        };
        if !uring {
            tracing::warn!(
                "io_uring unavailable or disabled: shards use monoio's legacy (epoll) driver"
            );
        }
        let kind = shard::RuntimeKind {
            uring,
            entries: config.runtime.uring_entries,
            taskrun: config.runtime.uring_taskrun,
        };
        let own_tickets = Arc::new(crate::handshake::tickets::TicketKeys::random(
            config.tickets.rotation.as_secs(),
        ));
        let (expiry_nudge, nudged) = mpsc::channel();
        let (acme_nudge, acme_nudged) = mpsc::channel();
        let health_metrics = Arc::new(M::default());
        let mut next_key = 1;
        let inherited: Vec<Bound> = inherited
            .into_iter()
            .map(|(meta, fds)| {
                let key = next_key;
                next_key += 1;
                Bound {
                    key,
                    configured: meta.configured,
                    redirect: meta.redirect,
                    backlog: meta.backlog,
                    addr: meta.addr,
                    fds,
                }
            })
            .collect();
        let plan = plan_sockets(&inherited, &config, cpus.len(), &mut next_key)?;
        let checks = health::start(&config, health_metrics.clone(), None).map_err(|source| {
            ReloadError::Io {
                what: "cannot start the health checker thread",
                source,
            }
        })?;
        let challenges = Arc::new(crate::challenges::Challenges::default());
        let gen = Arc::new(Generation {
            number: 1,
            tls: tls_configs(
                &config,
                cpus.len(),
                &for_config(&config.tickets, &own_tickets)?,
                &challenges,
            )?,
            health: checks.states.clone(),
            in_use: crate::upstream::in_use_counts(&config.upstreams, &[], &[]),
            clients: Arc::default(),
            slots: plan.slots,
            access: open_access_log(&config)?,
            challenges: challenges.clone(),
            config: Arc::new(config),
        });
        let mut links = Vec::new();
        let mut acks = Vec::new();
        for (i, cpu) in cpus.iter().enumerate() {
            let (done, ack) = mpsc::sync_channel(1);
            let sockets = start_sockets(&plan.picks, &inherited, i, cpus.len())?;
            let first = Command::Update {
                gen: gen.clone(),
                sockets,
                done,
            };
            let link = shard::spawn(i, *cpu, kind, support.clone(), first).map_err(|source| {
                ReloadError::Io {
                    what: "cannot start a shard thread",
                    source,
                }
            })?;
            links.push(link);
            acks.push((i, ack));
        }
        wait_all(acks)?;
        let metrics = Arc::new(M::default());
        metrics.generation.store(1, Ordering::Relaxed);
        let control = Arc::new(Control {
            published: std::sync::RwLock::new(gen.clone()),
            inner: Mutex::new(Inner {
                current: gen,
                sockets: commit(inherited, plan.picks),
                checks,
                next_key,
                own_tickets,
            }),
            status: Status::default(),
            metrics,
            health_metrics,
            links,
            source,
            support: support.clone(),
            expiry_nudge,
            acme_nudge,
            acme_nudged: Mutex::new(Some(acme_nudged)),
            challenges,
            notify: notify::Notifier::from_env(),
            admin: Mutex::new(None),
        });
        control.status.ready.store(true, Ordering::Relaxed);
        tracing::info!(generation = 1, shards = cpus.len(), "config live");
        if let Err(e) = expiry::spawn(Arc::downgrade(&control), nudged) {
            tracing::error!(error = %e, "cannot start the certificate expiry thread: no expiry warnings in the log");
        }

        Ok(control)
    }

    /// Starts the ACME thread (once; later calls do nothing). Called after
    /// the privilege drop: the state directory and the keys it writes must
    /// belong to the user ktern runs as, or a reload (as that user) could
    /// not read them.
    pub fn start_acme(self: &Arc<Self>) {
        let nudged = self
            .acme_nudged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(nudged) = nudged {
            if let Err(e) = acme::spawn(Arc::downgrade(self), nudged) {
                tracing::error!(error = %e, "cannot start the ACME thread: ACME certificates will not be obtained or renewed");
            }
        }
    }

    /// The generation new connections get. Never waits for a reload in
    /// progress (a scrape or `/certs` must not stall on one).
    pub fn current(&self) -> Arc<Generation> {
        self.published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Bound address of each TLS listener (with its name), then of each
    /// redirect listener.
    pub fn bound(&self) -> (Vec<(String, SocketAddr)>, Vec<SocketAddr>) {
        bound_of(&self.lock())
    }

    /// Sets the gauges taken from the current generation, before a scrape:
    /// `ktern_upstream_backends_down` is what its groups' checks found
    /// (a group a reload removed counts no more, at once).
    pub fn refresh_gauges(&self) {
        let down = self
            .current()
            .health
            .iter()
            .flatten()
            .map(|h| h.down())
            .sum();
        self.health_metrics
            .backends_down
            .store(down, Ordering::Relaxed);
    }

    /// Every counter set to sum on `/metrics`: shards, health checker,
    /// control.
    pub fn metric_sets(&self) -> Vec<Arc<M>> {
        self.links
            .iter()
            .map(|l| l.metrics.clone())
            .chain([self.health_metrics.clone(), self.metrics.clone()])
            .collect()
    }

    /// Connections open on all shards.
    pub fn active_connections(&self) -> u64 {
        self.links
            .iter()
            .map(|l| l.metrics.active.load(Ordering::Relaxed))
            .sum()
    }

    /// Records the admin endpoint's listener (with its configured address),
    /// so a binary upgrade can hand it over with the others.
    pub fn set_admin(
        &self,
        addr: SocketAddr,
        listener: std::net::TcpListener,
        stop: Arc<AtomicBool>,
    ) {
        *self.admin.lock().unwrap_or_else(|e| e.into_inner()) = Some((addr, listener, stop));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave Inner half updated
        // (every update is a set of whole-field assignments at the end), so
        // a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The drain sequence (SIGTERM/SIGINT, or after handing the sockets to
    /// a new binary with `delay` zero): `/ready` answers 503 at once, idle
    /// keep-alive connections close and busy ones get `Connection: close`
    /// on their next response, so clients move while the listeners keep
    /// accepting for `delay` (time for health checks to withdraw the
    /// host); then the listeners close; open connections get
    /// `runtime.drain_timeout` to finish; then the process exits 0.
    pub fn drain(&self, delay: Duration) -> ! {
        // Under the control lock: a reload under way finishes first (its
        // READY=1 before our STOPPING=1), and any later one sees the flag.
        {
            let _inner = self.lock();
            self.status.draining.store(true, Ordering::Relaxed);
            self.notify.stopping();
        }
        let timeout = self.current().config.runtime.drain_timeout;
        tracing::info!(
            ?delay,
            ?timeout,
            "draining: /ready answers 503, keep-alive ends, still accepting for the drain delay"
        );
        if let Err(e) = self.close_keep_alive() {
            tracing::error!(error = %e, "drain: a shard did not answer");
        }
        std::thread::sleep(delay);
        if let Err(e) = self.stop_accepting() {
            tracing::error!(error = %e, "drain: a shard did not stop accepting");
        }
        let open = self.active_connections();
        tracing::info!(
            connections = open,
            "drain: listeners closed, waiting for open connections"
        );
        let left = self.wait_connections(timeout);
        if left > 0 {
            tracing::warn!(
                connections = left,
                "drain timeout: closing what is still open"
            );
            self.cut();
        } else {
            tracing::info!("drained: every connection finished");
        }
        crate::metrics::access::flush(Duration::from_secs(2));
        std::process::exit(0)
    }

    /// Drain, last step: every shard drops the connections still open, so
    /// the requests in flight write their access lines (a cut request
    /// that got no response head is logged as 444, nginx's "closed without
    /// a response"; one cut mid-response with its status and the bytes
    /// sent). Waits until they are gone, at most [`CUT_WAIT`], with no
    /// answer awaited: a wedged shard does not hold the exit.
    pub fn cut(&self) {
        for link in &self.links {
            let (done, _unread) = mpsc::sync_channel(1);
            let _ = link.send(Command::Cut { done });
        }
        self.wait_connections(CUT_WAIT);
    }

    /// Waits until no connection is open, at most `limit` (checked every
    /// 5 ms); returns how many are still open.
    fn wait_connections(&self, limit: Duration) -> u64 {
        let until = std::time::Instant::now() + limit;
        while self.active_connections() > 0 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.active_connections()
    }

    /// Drain, second step (after `runtime.drain_delay`): every shard takes
    /// what its listeners' queues hold, closes them, and from then on closes
    /// idle keep-alive connections and answers `Connection: close`.
    pub fn stop_accepting(&self) -> Result<(), ReloadError> {
        // Our copies first, so that each shard's close, after it has taken
        // its queue, is the last one.
        self.lock().sockets.clear();
        self.tell_all(|done| Command::StopAccepting { done })
    }

    /// Drain, first step: idle keep-alive connections close, busy ones
    /// get `Connection: close` on their next response.
    pub fn close_keep_alive(&self) -> Result<(), ReloadError> {
        self.tell_all(|done| Command::Close { done })
    }

    /// Sends a command to every shard, in shard order (even if one has
    /// failed), and waits for every answer.
    fn tell_all(
        &self,
        mut cmd: impl FnMut(mpsc::SyncSender<u64>) -> Command,
    ) -> Result<(), ReloadError> {
        let mut acks = Vec::new();
        let mut failed = None;
        for (i, link) in self.links.iter().enumerate() {
            let (done, ack) = mpsc::sync_channel(1);
            match link.send(cmd(done)) {
                Ok(()) => acks.push((i, ack)),
                Err(_) => failed = Some(i),
            }
        }
        wait_all(acks)?;
        failed.map_or(Ok(()), |i| Err(ReloadError::Shard(i)))
    }

    /// Re-reads the config file and every certificate and key; applies all
    /// of it or nothing. Logged and counted either way.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let mut inner = self.lock();
        // Refused before systemd hears of it: RELOADING=1 and then READY=1
        // ("serving") after STOPPING=1 told it a stopping process serves.
        if self.status.draining.load(Ordering::Relaxed) {
            M::inc(&self.metrics.reload_failures);
            tracing::error!(generation = inner.current.number, error = %ReloadError::Draining, "reload refused");
            // Still logrotate's `postrotate` (below).
            reopen(&inner.current);
            return Err(ReloadError::Draining);
        }
        self.notify.reloading();
        let started = std::time::Instant::now();
        let result = self.try_reload(&mut inner);
        let took = started.elapsed();
        self.metrics.families.reload_seconds.observe(took);
        self.notify.ready(inner.current.number);
        match &result {
            Ok(r) => {
                M::inc(&self.metrics.reloads);
                self.metrics
                    .generation
                    .store(r.generation, Ordering::Relaxed);
                tracing::info!(generation = r.generation, ?took, "reload: new config live");
                let _ = self.expiry_nudge.send(());
                let _ = self.acme_nudge.send(());
            }
            Err(e) => {
                M::inc(&self.metrics.reload_failures);
                let generation = inner.current.number;
                match e {
                    ReloadError::Config(c) => {
                        for p in &c.problems {
                            tracing::error!(generation, file = %c.file, field = %p.field, reason = %p.reason, "reload refused");
                        }
                    }
                    other => tracing::error!(generation, error = %other, "reload refused"),
                }
                // A reload is also logrotate's `postrotate`: the running
                // log is reopened even when the new config is refused, or
                // its lines would go on into the rotated file (and, once
                // that is removed, into an unlinked one) until a reload
                // succeeds.
                reopen(&inner.current);
            }
        }
        result
    }

    /// Reopens the running generation's access log and changes nothing
    /// else: SIGUSR1, nginx's `postrotate` signal (logrotate configs
    /// written for nginx send it).
    pub fn reopen_access_log(&self) {
        let inner = self.lock();
        if reopen(&inner.current) {
            tracing::info!(generation = inner.current.number, "access log reopened");
        }
    }

    fn try_reload(&self, inner: &mut Inner) -> Result<Reloaded, ReloadError> {
        let Source::File(path) = &self.source else {
            return Err(ReloadError::NoFile);
        };
        let config = Config::load(path)?;
        unchangeable(&inner.current.config, &config)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let broken = broken_certificates(&inner.current.config, &config, now);
        if !broken.is_empty() {
            return Err(ReloadError::Config(ConfigError {
                file: config.source.clone(),
                problems: broken,
            }));
        }
        let gaps = crate::ktls::host_problems(&config, &self.support, true);
        if !gaps.is_empty() {
            return Err(ReloadError::Config(ConfigError {
                file: config.source.clone(),
                problems: gaps,
            }));
        }
        let shards = self.links.len();
        let keys = for_config(&config.tickets, &inner.own_tickets)?;
        let tls = tls_configs(&config, shards, &keys, &self.challenges)?;
        let mut next_key = inner.next_key;
        let plan = plan_sockets(&inner.sockets, &config, shards, &mut next_key)?;
        let mut fresh = Vec::new();
        for i in 0..shards {
            fresh.push(fresh_for(&plan.picks, i)?);
        }
        // Verdicts of unchanged groups carry over: a backend known to be
        // down does not get traffic again after every reload.
        let previous = Some((&*inner.current.config, &inner.checks));
        let checks =
            health::start(&config, self.health_metrics.clone(), previous).map_err(|source| {
                ReloadError::Io {
                    what: "cannot start the health checker thread",
                    source,
                }
            })?;
        // Opened (and created) last of what can refuse the reload, so a
        // refused reload leaves no new file behind, and the running log
        // (which a kept target shares) gets no queue size or file of a
        // refused generation's.
        let access = match open_access_log(&config) {
            Ok(a) => a,
            Err(e) => {
                checks.retire();
                return Err(e);
            }
        };
        // Nothing below can be refused: the generation goes live.
        if config.tickets.secret.is_none() {
            inner.own_tickets = keys;
        }
        let gen = Arc::new(Generation {
            number: inner.current.number + 1,
            tls,
            health: checks.states.clone(),
            in_use: crate::upstream::in_use_counts(
                &config.upstreams,
                &inner.current.config.upstreams,
                &inner.current.in_use,
            ),
            clients: inner.current.clients.clone(),
            slots: plan.slots,
            access,
            challenges: self.challenges.clone(),
            config: Arc::new(config),
        });
        // The control side first: our copies of removed sockets close now,
        // so that each shard's own close, after it has taken what its
        // queue holds, is the last one (the last close resets the queue).
        inner.checks.retire();
        inner.checks = checks;
        inner.next_key = next_key;
        let old = std::mem::take(&mut inner.sockets);
        inner.sockets = commit(old, plan.picks);
        inner.current = gen.clone();
        self.publish(gen.clone());
        // Every shard gets the generation, even if one has failed. The
        // generation is live by now (published, the sockets committed): a
        // shard that does not confirm it (only after a bug of its own) is
        // logged, and the reload reported as what it is, applied.
        let mut fresh = fresh.into_iter();
        if let Err(e) = self.tell_all(|done| Command::Update {
            gen: gen.clone(),
            sockets: fresh.next().unwrap_or_default(),
            done,
        }) {
            tracing::error!(generation = gen.number, error = %e, "reload live, but a shard did not confirm it");
        }
        let (listeners, _) = bound_of(inner);
        Ok(Reloaded {
            generation: inner.current.number,
            listeners,
        })
    }

    fn publish(&self, gen: Arc<Generation>) {
        *self.published.write().unwrap_or_else(|e| e.into_inner()) = gen;
    }
}

/// The bound address of each TLS listener (with its name), then of each
/// redirect listener, in config order.
fn bound_of(inner: &Inner) -> (Vec<(String, SocketAddr)>, Vec<SocketAddr>) {
    let config = &inner.current.config;
    let addr_of = |slot: Slot| {
        let key = inner.current.slots.iter().find(|(_, s)| *s == slot)?.0;
        inner.sockets.iter().find(|b| b.key == key).map(|b| b.addr)
    };
    let listeners = (0..config.listeners.len())
        .filter_map(|i| Some((config.listeners[i].name.clone(), addr_of(Slot::Tls(i))?)))
        .collect();
    let redirects = (0..config.redirects.len())
        .filter_map(|i| addr_of(Slot::Redirect(i)))
        .collect();
    (listeners, redirects)
}

/// Settings a running process cannot change: they shape threads and
/// rings, or the admin socket the reload itself may be arriving on.
fn unchangeable(old: &Config, new: &Config) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    let mut check = |field: &str, same: bool| {
        if !same {
            problems.push(Problem {
                field: field.into(),
                reason: "cannot change on reload (restart, or upgrade the binary)".into(),
            });
        }
    };
    check("runtime.cpus", old.runtime.cpus == new.runtime.cpus);
    check("runtime.driver", old.runtime.driver == new.runtime.driver);
    check(
        "runtime.uring_entries",
        old.runtime.uring_entries == new.runtime.uring_entries,
    );
    // The rings' setup flags: fixed when each shard's ring was built.
    check(
        "runtime.uring_taskrun",
        old.runtime.uring_taskrun == new.runtime.uring_taskrun,
    );
    // Started with `off`, the kernel's kTLS was never probed (nor its
    // module loaded): a later generation could not offload, and
    // `required` would be refused as if the kernel had none. Any other
    // change is a generation's own.
    check(
        "runtime.ktls",
        old.runtime.ktls != KtlsMode::Off || new.runtime.ktls == KtlsMode::Off,
    );
    check("runtime.user", old.runtime.user == new.runtime.user);
    check("runtime.group", old.runtime.group == new.runtime.group);
    check("admin.address", old.admin == new.admin);
    check(
        "runtime.log_format",
        old.runtime.log_format == new.runtime.log_format,
    );
    check(
        "runtime.upgrade_socket",
        old.runtime.upgrade_socket == new.runtime.upgrade_socket,
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError {
            file: new.source.clone(),
            problems,
        })
    }
}

/// One rustls config per shard per listener, all of a listener's sharing
/// one certificate store, its ticket keys and one session-id cache.
fn tls_configs(
    config: &Config,
    shards: usize,
    keys: &Arc<crate::handshake::tickets::TicketKeys>,
    challenges: &Arc<crate::challenges::Challenges>,
) -> Result<Vec<Vec<crate::handshake::ServerTls>>, ReloadError> {
    use crate::handshake::tickets::ListenerTickets;
    if let (Some(secret), Some(file)) = (&config.tickets.secret, &config.tickets.secret_file) {
        tracing::info!(
            file = %file.display(),
            fingerprint = %crate::handshake::tickets::fingerprint(&secret.0),
            "session tickets: fleet secret (hosts that log the same fingerprint share tickets)"
        );
    }
    let now = crate::clock::unix_now();
    for l in &config.listeners {
        let crl_lapsed = l.client_auth.as_ref().and_then(|a| a.crl_next_update);
        if let Some(when) = crl_lapsed.filter(|&t| t <= now) {
            tracing::warn!(
                listener = %l.name, next_update = when,
                "client_auth: the CRL has expired: every client certificate is refused until a reload reads a fresh one"
            );
        }
        for c in &l.certificates {
            if let (Some(file), Some(why)) = (&c.info.ocsp_file, &c.info.ocsp_problem) {
                tracing::warn!(
                    listener = %l.name, cert_file = %c.info.cert_file, ocsp = %file,
                    "OCSP response not stapled: {why}"
                );
            }
        }
    }
    let stores: Vec<_> = config
        .listeners
        .iter()
        .map(|l| {
            let acme = crate::handshake::answers_tls_alpn(l)
                .then(|| crate::handshake::acme_config(l, challenges))
                .transpose()?;
            Ok((
                crate::handshake::cert_store(l),
                ListenerTickets::for_listener(keys, &l.ticket_context()),
                acme,
                crate::handshake::session_cache(shards, config.tickets.rotation),
            ))
        })
        .collect::<Result<_, rustls::Error>>()?;
    (0..shards)
        .map(|_| {
            config
                .listeners
                .iter()
                .zip(&stores)
                .map(|(l, (store, tickets, acme, sessions))| {
                    let mut tls =
                        crate::handshake::server_config_sharing(l, store, tickets, sessions)?;
                    tls.acme = acme.clone();
                    Ok(tls)
                })
                .collect::<Result<Vec<_>, rustls::Error>>()
        })
        .collect::<Result<_, _>>()
        .map_err(ReloadError::from)
}

/// Waits for each shard's answer; `Err` names the first shard (by its
/// number) that gave none.
fn wait_all(acks: Vec<(usize, mpsc::Receiver<u64>)>) -> Result<(), ReloadError> {
    for (i, ack) in acks {
        ack.recv_timeout(SHARD_ANSWER)
            .map_err(|_| ReloadError::Shard(i))?;
    }
    Ok(())
}

/// A listening address of the new config: an existing socket kept, or a
/// new one bound.
#[derive(Debug)]
enum Pick {
    /// Keep old socket set `i`, plus sockets for shards it lacks, with
    /// this backlog.
    Keep(usize, Vec<std::net::TcpListener>, u32),
    New(Bound),
}

struct Plan {
    picks: Vec<Pick>,
    slots: Vec<(u64, Slot)>,
}

/// Matches the config's listeners to the sockets already bound (same
/// configured address and kind: the socket is kept, so nothing queued on it
/// is lost) and binds the rest, one `SO_REUSEPORT` socket per shard. Any
/// bind error refuses the whole plan; what it bound is closed again.
fn plan_sockets(
    old: &[Bound],
    config: &Config,
    shards: usize,
    next_key: &mut u64,
) -> Result<Plan, ConfigError> {
    let wanted = config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            (
                format!("listener[{i}].address"),
                l.address,
                false,
                l.backlog,
                Slot::Tls(i),
            )
        })
        .chain(config.redirects.iter().enumerate().map(|(i, r)| {
            (
                format!("redirect[{i}].address"),
                r.address,
                true,
                4096,
                Slot::Redirect(i),
            )
        }));
    let mut used = vec![false; old.len()];
    let mut picks = Vec::new();
    let mut slots = Vec::new();
    let mut problems = Vec::new();
    for (field, configured, redirect, backlog, slot) in wanted {
        let same = old
            .iter()
            .enumerate()
            .position(|(i, b)| !used[i] && b.configured == configured && b.redirect == redirect);
        if let Some(i) = same {
            used[i] = true;
            // A socket set handed over by an older binary with fewer shards:
            // the shards it lacks get their own SO_REUSEPORT sockets.
            let mut extra = Vec::new();
            for _ in old[i].fds.len()..shards {
                match shard::bind(old[i].addr, backlog) {
                    Ok(s) => extra.push(s),
                    Err(e) => problems.push(Problem {
                        field: field.clone(),
                        reason: format!("cannot listen on {}: {e}", old[i].addr),
                    }),
                }
            }
            slots.push((old[i].key, slot));
            picks.push(Pick::Keep(i, extra, backlog));
            continue;
        }
        // A new address: refuse one that another program listens on,
        // rather than joining its SO_REUSEPORT group. Not when a socket of
        // ours overlaps it (the same address, or one of them the wildcard:
        // a move from `10.0.0.5:443` to `0.0.0.0:443`, or both in one
        // config): the probe would find ours, while the SO_REUSEPORT bind
        // below may share the port with them.
        let planned = picks.iter().filter_map(|p| match p {
            Pick::New(b) => Some(b.addr),
            Pick::Keep(..) => None,
        });
        let ours = old
            .iter()
            .map(|b| b.addr)
            .chain(planned)
            .any(|a| crate::config::overlaps(a, configured));
        if !ours {
            if let Err(e) = shard::probe_free(configured) {
                problems.push(Problem {
                    field,
                    reason: format!("cannot listen on {configured}: {e}"),
                });
                continue;
            }
        }
        let mut addr = configured;
        let mut fds = Vec::new();
        for _ in 0..shards {
            match shard::bind(addr, backlog) {
                Ok(s) => {
                    addr = s.local_addr().unwrap_or(addr);
                    fds.push(s);
                }
                Err(e) => {
                    problems.push(Problem {
                        field: field.clone(),
                        reason: format!("cannot listen on {addr}: {e}"),
                    });
                    break;
                }
            }
        }
        if fds.len() == shards {
            let key = *next_key;
            *next_key += 1;
            slots.push((key, slot));
            picks.push(Pick::New(Bound {
                key,
                configured,
                redirect,
                backlog,
                addr,
                fds,
            }));
        }
    }
    if problems.is_empty() {
        Ok(Plan { picks, slots })
    } else {
        Err(ConfigError {
            file: config.source.clone(),
            problems,
        })
    }
}

/// Shard `i`'s copy of every newly bound socket.
fn fresh_for(picks: &[Pick], i: usize) -> Result<Vec<(u64, std::net::TcpListener)>, ReloadError> {
    picks
        .iter()
        .filter_map(|p| match p {
            Pick::New(b) => b.fds.get(i).map(|fd| (b.key, fd)),
            Pick::Keep(..) => None,
        })
        .map(|(key, fd)| {
            fd.try_clone()
                .map(|fd| (key, fd))
                .map_err(|source| ReloadError::Io {
                    what: "cannot duplicate a listening socket",
                    source,
                })
        })
        .collect()
}

/// At start every socket is new to the shards: shard `i` of `shards` gets
/// its own sockets of each new set, and of each inherited set the fds
/// `j` with `j % shards == i` (an older binary may have run more shards:
/// every inherited socket is still accepted from) plus any extra one bound
/// for it.
fn start_sockets(
    picks: &[Pick],
    inherited: &[Bound],
    i: usize,
    shards: usize,
) -> Result<Vec<(u64, std::net::TcpListener)>, ReloadError> {
    let mut out = Vec::new();
    for p in picks {
        let (key, fds): (u64, Vec<&std::net::TcpListener>) = match p {
            Pick::New(b) => (b.key, b.fds.get(i).into_iter().collect()),
            Pick::Keep(j, extra, _) => {
                let b = &inherited[*j];
                let mut fds: Vec<_> = b
                    .fds
                    .iter()
                    .enumerate()
                    .filter(|(n, _)| n % shards == i)
                    .map(|(_, fd)| fd)
                    .collect();
                let have = b.fds.len();
                if i >= have {
                    fds.extend(extra.get(i - have));
                }
                (b.key, fds)
            }
        };
        for fd in fds {
            let fd = fd.try_clone().map_err(|source| ReloadError::Io {
                what: "cannot duplicate a listening socket",
                source,
            })?;
            out.push((key, fd));
        }
    }
    Ok(out)
}

/// The new socket table: kept sockets and new ones; the old sockets not
/// kept are dropped here.
fn commit(old: Vec<Bound>, picks: Vec<Pick>) -> Vec<Bound> {
    let mut old: Vec<Option<Bound>> = old.into_iter().map(Some).collect();
    picks
        .into_iter()
        .filter_map(|pick| match pick {
            Pick::Keep(i, extra, backlog) => old.get_mut(i).and_then(Option::take).map(|mut b| {
                b.fds.extend(extra);
                if b.backlog != backlog {
                    // listen(2) on a listening socket only resizes its
                    // queue (the config allows at most 65535).
                    for fd in &b.fds {
                        let n = backlog.min(i32::MAX as u32) as i32;
                        if let Err(e) = socket2::SockRef::from(fd).listen(n) {
                            tracing::warn!(address = %b.addr, error = %e, "cannot change the backlog");
                        }
                    }
                    b.backlog = backlog;
                }
                b
            }),
            Pick::New(b) => Some(b),
        })
        .collect()
}

/// The running process's side of a binary upgrade.
pub struct UpgradeOffer(pub Arc<Control>);

impl upgrade::Offerer for UpgradeOffer {
    fn sockets(&self) -> Vec<(upgrade::SocketMeta, Vec<std::net::TcpListener>)> {
        let inner = self.0.lock();
        inner
            .sockets
            .iter()
            .map(|b| {
                let meta = upgrade::SocketMeta {
                    configured: b.configured,
                    redirect: b.redirect,
                    backlog: b.backlog,
                    addr: b.addr,
                    fds: b.fds.len(),
                };
                (
                    meta,
                    b.fds.iter().filter_map(|f| f.try_clone().ok()).collect(),
                )
            })
            .collect()
    }

    fn admin(&self) -> Option<(SocketAddr, std::net::TcpListener)> {
        let admin = self.0.admin.lock().unwrap_or_else(|e| e.into_inner());
        let (addr, listener, _) = admin.as_ref()?;
        Some((*addr, listener.try_clone().ok()?))
    }

    fn hand_over(&self) {
        // The new process serves the admin socket from now on, or (moved
        // or dropped by its config) closed its copy: ours closes too (the
        // admin thread drops its own as it stops), or the address would
        // listen unserved for the whole drain.
        let admin = self
            .0
            .admin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((_, listener, stop)) = admin {
            stop.store(true, Ordering::Relaxed);
            drop(listener);
        }
        self.0.status.draining.store(true, Ordering::Relaxed);
        if let Err(e) = self.0.stop_accepting() {
            tracing::error!(error = %e, "upgrade: a shard did not stop accepting");
        }
        tracing::info!("upgrade: a new process serves the listeners; draining");
        let control = self.0.clone();
        let spawned = std::thread::Builder::new()
            .name("ktern-drain".into())
            .spawn(move || control.drain(Duration::ZERO));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the drain thread: exiting now");
            std::process::exit(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(runtime: &str) -> Config {
        let (cert, key) = crate::builtin::self_signed(&["localhost"]).unwrap();
        let text = format!(
            "[runtime]\n{runtime}\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.certificate]]\ncert = \"inline:c\"\nkey = \"inline:k\"\n[listener.route]\nkind = \"tcp\"\nbackends = [\"127.0.0.1:9\"]\n"
        );
        Config::from_toml(
            &text,
            "t.toml",
            std::path::Path::new("."),
            &[("c".into(), cert), ("k".into(), key)],
        )
        .unwrap()
    }

    /// A listener moved from an address to its port's wildcard (or the
    /// reverse) is planned, not refused: the free-port probe found ktern's
    /// own socket. Another program's socket on a port is still refused.
    #[test]
    fn a_listener_moves_between_an_address_and_its_ports_wildcard() {
        let free = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let at = |addr: String| {
            let mut c = config("");
            c.listeners[0].address = addr.parse().unwrap();
            c
        };
        let port = free();
        let mut key = 0;
        let first = plan_sockets(&[], &at(format!("127.0.0.1:{port}")), 1, &mut key).unwrap();
        let old = commit(Vec::new(), first.picks);
        let moved = plan_sockets(&old, &at(format!("0.0.0.0:{port}")), 1, &mut key);
        assert!(moved.is_ok(), "{:?}", moved.err());
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = other.local_addr().unwrap().port();
        let Err(e) = plan_sockets(&old, &at(format!("0.0.0.0:{taken}")), 1, &mut key) else {
            panic!("another program's port was planned");
        };
        assert_eq!(e.problems[0].field, "listener[0].address", "{e}");
        assert!(crate::config::overlaps(
            "0.0.0.0:1".parse().unwrap(),
            "10.0.0.5:1".parse().unwrap()
        ));
        assert!(!crate::config::overlaps(
            "10.0.0.6:1".parse().unwrap(),
            "10.0.0.5:1".parse().unwrap()
        ));
        assert!(!crate::config::overlaps(
            "[::]:1".parse().unwrap(),
            "10.0.0.5:1".parse().unwrap()
        ));
        assert!(!crate::config::overlaps(
            "0.0.0.0:2".parse().unwrap(),
            "10.0.0.5:1".parse().unwrap()
        ));
    }

    /// What shapes the shards' threads and rings is refused by a reload,
    /// naming each field (README: "Reload").
    #[test]
    fn a_reload_refuses_what_only_a_restart_changes() {
        let old = config("uring_taskrun = \"coop\"\nuring_entries = 1024");
        assert!(unchangeable(
            &old,
            &config("uring_taskrun = \"coop\"\nuring_entries = 1024")
        )
        .is_ok());
        let e = unchangeable(
            &old,
            &config("uring_taskrun = \"defer\"\nuring_entries = 2048"),
        )
        .unwrap_err();
        let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["runtime.uring_entries", "runtime.uring_taskrun"],
            "{e}"
        );
        // kTLS cannot be turned on after a start without it; any other
        // change is fine.
        for (from, to) in [("off", "auto"), ("off", "required")] {
            let e = unchangeable(
                &config(&format!("ktls = \"{from}\"")),
                &config(&format!("ktls = \"{to}\"")),
            )
            .unwrap_err();
            assert_eq!(e.problems[0].field, "runtime.ktls", "{from} -> {to}");
        }
        for (from, to) in [("auto", "required"), ("required", "off"), ("auto", "off")] {
            assert!(
                unchangeable(
                    &config(&format!("ktls = \"{from}\"")),
                    &config(&format!("ktls = \"{to}\""))
                )
                .is_ok(),
                "{from} -> {to}"
            );
        }
    }
}
