//! Live operations, off the shards: start-up, reload, drain.
//!
//! The control side owns what outlives a config generation: the listening
//! sockets (a copy of each shard's fd, so a socket kept across reloads is
//! never closed), the ticket keys, the health checker of the current
//! generation and the link to every shard. A reload parses the file, loads
//! every certificate and key, builds every rustls config and binds every new
//! socket here, on the caller's thread; only when all of that succeeded does
//! each shard get a pointer to swap. A refused reload changes nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::config::{Config, ConfigError, Problem};
use crate::metrics::ShardMetrics as M;
use crate::shard::{self, Command, Generation, ShardLink, Slot};
use crate::upstream::health::{self, Checks};

pub mod admin;
pub mod notify;

/// How long a shard may take to confirm a command. Shards never block, so
/// this only fires if one is wedged (a bug).
const SHARD_ANSWER: Duration = Duration::from_secs(30);

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
    /// wrong: every problem with its file and field.
    #[error("{0}")]
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
}

/// The running process, as the control side sees it.
pub struct Control {
    inner: Mutex<Inner>,
    /// Ready/draining.
    pub status: Status,
    /// Process-level counters (reloads, generation), beside the shards'.
    pub metrics: Arc<M>,
    health_metrics: Arc<M>,
    links: Vec<ShardLink>,
    source: Source,
    /// systemd notifications (no-op outside systemd).
    pub notify: notify::Notifier,
    tickets: Arc<dyn rustls::server::ProducesTickets>,
}

impl Control {
    /// Binds every listener, starts the health checker and one shard per
    /// CPU, and waits until every shard listens.
    pub fn start(
        config: Config,
        source: Source,
        support: Arc<crate::ktls::Support>,
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
        };
        let tickets = crate::handshake::ticketer()?;
        let health_metrics = Arc::new(M::default());
        let mut next_key = 1;
        let plan = plan_sockets(&[], &config, cpus.len(), &mut next_key)?;
        let checks =
            health::start(&config, health_metrics.clone()).map_err(|source| ReloadError::Io {
                what: "cannot start the health checker thread",
                source,
            })?;
        let gen = Arc::new(Generation {
            number: 1,
            tls: tls_configs(&config, cpus.len(), &tickets)?,
            health: checks.states.clone(),
            slots: plan.slots,
            config: Arc::new(config),
        });
        let mut links = Vec::new();
        let mut acks = Vec::new();
        for (i, cpu) in cpus.iter().enumerate() {
            let (done, ack) = mpsc::sync_channel(1);
            let sockets = fresh_for(&plan.picks, i)?;
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
            acks.push(ack);
        }
        wait_all(acks)?;
        let metrics = Arc::new(M::default());
        metrics.generation.store(1, Ordering::Relaxed);
        let control = Arc::new(Control {
            inner: Mutex::new(Inner {
                current: gen,
                sockets: commit(Vec::new(), plan.picks),
                checks,
                next_key,
            }),
            status: Status::default(),
            metrics,
            health_metrics,
            links,
            source,
            tickets,
            notify: notify::Notifier::from_env(),
        });
        control.status.ready.store(true, Ordering::Relaxed);
        tracing::info!(generation = 1, shards = cpus.len(), "config live");
        Ok(control)
    }

    /// The generation new connections get.
    pub fn current(&self) -> Arc<Generation> {
        self.lock().current.clone()
    }

    /// Bound address of each TLS listener (with its name), then of each
    /// redirect listener.
    pub fn bound(&self) -> (Vec<(String, SocketAddr)>, Vec<SocketAddr>) {
        bound_of(&self.lock())
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave Inner half updated
        // (every update is a set of whole-field assignments at the end), so
        // a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drain, second step (after `runtime.drain_delay`): every shard takes
    /// what its listeners' queues hold, closes them, and from then on closes
    /// idle keep-alive connections and answers `Connection: close`.
    pub fn stop_accepting(&self) -> Result<(), ReloadError> {
        let mut inner = self.lock();
        let mut acks = Vec::new();
        for (i, link) in self.links.iter().enumerate() {
            let (done, ack) = mpsc::sync_channel(1);
            link.send(Command::Drain { done })
                .map_err(|_| ReloadError::Shard(i))?;
            acks.push(ack);
        }
        let answered = wait_all(acks);
        inner.sockets.clear();
        answered
    }

    /// Re-reads the config file and every certificate and key; applies all
    /// of it or nothing. Logged and counted either way.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let mut inner = self.lock();
        self.notify.reloading();
        let result = self.try_reload(&mut inner);
        self.notify.ready(inner.current.number);
        match &result {
            Ok(r) => {
                M::inc(&self.metrics.reloads);
                self.metrics
                    .generation
                    .store(r.generation, Ordering::Relaxed);
                tracing::info!(generation = r.generation, "reload: new config live");
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
            }
        }
        result
    }

    fn try_reload(&self, inner: &mut Inner) -> Result<Reloaded, ReloadError> {
        if self.status.draining.load(Ordering::Relaxed) {
            return Err(ReloadError::Draining);
        }
        let Source::File(path) = &self.source else {
            return Err(ReloadError::NoFile);
        };
        let config = Config::load(path)?;
        unchangeable(&inner.current.config, &config)?;
        let shards = self.links.len();
        let tls = tls_configs(&config, shards, &self.tickets)?;
        let mut next_key = inner.next_key;
        let plan = plan_sockets(&inner.sockets, &config, shards, &mut next_key)?;
        let mut fresh = Vec::new();
        for i in 0..shards {
            fresh.push(fresh_for(&plan.picks, i)?);
        }
        let checks = health::start(&config, self.health_metrics.clone()).map_err(|source| {
            ReloadError::Io {
                what: "cannot start the health checker thread",
                source,
            }
        })?;
        // Nothing below can be refused: the generation goes live.
        let gen = Arc::new(Generation {
            number: inner.current.number + 1,
            tls,
            health: checks.states.clone(),
            slots: plan.slots,
            config: Arc::new(config),
        });
        let mut acks = Vec::new();
        for (i, (link, sockets)) in self.links.iter().zip(fresh).enumerate() {
            let (done, ack) = mpsc::sync_channel(1);
            link.send(Command::Update {
                gen: gen.clone(),
                sockets,
                done,
            })
            .map_err(|_| ReloadError::Shard(i))?;
            acks.push(ack);
        }
        let answered = wait_all(acks);
        // Even if a shard failed to answer, the others serve the new
        // generation: record it as current.
        inner.checks.retire();
        inner.checks = checks;
        inner.next_key = next_key;
        // The shards closed their copies of removed sockets after taking
        // what was queued; dropping ours lets the kernel free them.
        let old = std::mem::take(&mut inner.sockets);
        inner.sockets = commit(old, plan.picks);
        inner.current = gen;
        answered?;
        let (listeners, _) = bound_of(inner);
        Ok(Reloaded {
            generation: inner.current.number,
            listeners,
        })
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
    check("runtime.user", old.runtime.user == new.runtime.user);
    check("runtime.group", old.runtime.group == new.runtime.group);
    check("admin.address", old.admin == new.admin);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError {
            file: new.source.clone(),
            problems,
        })
    }
}

/// One rustls config per shard per listener.
fn tls_configs(
    config: &Config,
    shards: usize,
    tickets: &Arc<dyn rustls::server::ProducesTickets>,
) -> Result<Vec<Vec<Arc<rustls::ServerConfig>>>, rustls::Error> {
    (0..shards)
        .map(|_| {
            config
                .listeners
                .iter()
                .map(|l| crate::handshake::server_config(l, tickets))
                .collect()
        })
        .collect()
}

fn wait_all(acks: Vec<mpsc::Receiver<u64>>) -> Result<(), ReloadError> {
    for (i, ack) in acks.into_iter().enumerate() {
        ack.recv_timeout(SHARD_ANSWER)
            .map_err(|_| ReloadError::Shard(i))?;
    }
    Ok(())
}

/// A listening address of the new config: an existing socket kept, or a
/// new one bound.
#[derive(Debug)]
enum Pick {
    Keep(usize),
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
            if old[i].backlog != backlog {
                // listen(2) on a listening socket only resizes its queue.
                for fd in &old[i].fds {
                    if let Err(e) = socket2::SockRef::from(fd).listen(backlog as i32) {
                        tracing::warn!(address = %old[i].addr, error = %e, "cannot change the backlog");
                    }
                }
            }
            slots.push((old[i].key, slot));
            picks.push(Pick::Keep(i));
            continue;
        }
        // A new address: refuse one that another program listens on,
        // rather than joining its SO_REUSEPORT group.
        let ours = old.iter().any(|b| b.addr == configured);
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
            Pick::New(b) => Some((b.key, &b.fds[i])),
            Pick::Keep(_) => None,
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

/// The new socket table: kept sockets and new ones; the old sockets not
/// kept are dropped here.
fn commit(old: Vec<Bound>, picks: Vec<Pick>) -> Vec<Bound> {
    let mut old: Vec<Option<Bound>> = old.into_iter().map(Some).collect();
    picks
        .into_iter()
        .filter_map(|pick| match pick {
            Pick::Keep(i) => old.get_mut(i).and_then(Option::take),
            Pick::New(b) => Some(b),
        })
        .collect()
}
