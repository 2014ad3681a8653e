//! The `ktern` command line: parse, load and validate the config, probe kTLS,
//! start the shards, wait for a signal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ktern::config::{Config, KtlsMode, LogFormat, BUILTIN_BACKEND_PLACEHOLDER, EMBEDDED_DEFAULT};
use ktern::control::{Control, Source};

/// How long a second stop signal waits for queued access lines (the
/// drain's own exit waits 2 s).
const SECOND_SIGNAL_FLUSH: Duration = Duration::from_millis(500);

#[derive(Parser)]
#[command(
    name = "ktern",
    version,
    about = "A per-core TLS terminator with kernel TLS offload"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the terminator (with the embedded default config when no -c is given).
    Run {
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Binary upgrade: take the listening sockets of the ktern serving
        /// this upgrade socket (its `runtime.upgrade_socket`), then tell it
        /// to drain.
        #[arg(long, value_name = "SOCKET")]
        upgrade_from: Option<PathBuf>,
    },
    /// Ask the running ktern to re-read its config: exit 0 when the new
    /// config is live, 1 with every reason when it was refused.
    Reload {
        /// The config file the running ktern was started with (its
        /// `[admin] address` is where the request goes).
        #[arg(short, long)]
        config: PathBuf,
        /// Admin endpoint address (instead of the config's).
        #[arg(long)]
        admin: Option<String>,
    },
    /// Validate and lint a config file: every problem and every error
    /// finding (expired certificate, broken chain, weak key) exits 1;
    /// warnings (names not covered, expiry within 30 days, shadowed
    /// names) are printed and exit 0.
    Check {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// A CA bundle (PEM) every certificate chain must verify to.
        #[arg(long, value_name = "PEM")]
        ca: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Reload { config, admin } => match reload(&config, admin) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("ktern reload: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check { config, ca } => match check(&config, ca.as_deref()) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            upgrade_from,
        } => match run(config, upgrade_from) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ktern: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// A line on stdout for whoever started ktern (addresses, the curl to
/// try). A closed or full stdout must not stop a running server: unlike
/// `println!`, errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `ktern check`: whether the config loads and has no error finding.
fn check(config: &std::path::Path, ca: Option<&std::path::Path>) -> anyhow::Result<bool> {
    use ktern::config::lint;
    use rustls_pki_types::pem::PemObject as _;
    init_logs(LogFormat::Text);
    let roots = match ca {
        None => None,
        Some(path) => {
            let pem =
                ktern::config::read_capped(path, ktern::config::MAX_CONFIG_FILE, "a CA bundle")
                    .map_err(|e| anyhow::anyhow!("--ca: {e}"))?;
            let mut roots = rustls::RootCertStore::empty();
            for der in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                let der = der.with_context(|| format!("--ca: {} is not PEM", path.display()))?;
                roots.add(der).with_context(|| {
                    format!("--ca: {}: unusable CA certificate", path.display())
                })?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "--ca: no certificate in {}",
                path.display()
            );
            Some(roots)
        }
    };
    let c = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(false);
        }
    };
    let mut findings = lint::lint(&c, ktern::clock::unix_now(), roots.as_ref());
    // What this host's kernel refuses (`ktls = "required"`), as `run`
    // would: an error here, not a refusal at the start after a deploy.
    // Only a process with CAP_NET_ADMIN makes the kernel load the `tls`
    // module on first use, as `run` (started as root) does: without root a
    // module not loaded yet reads as no kTLS, so that is only a warning.
    if c.runtime.ktls == KtlsMode::Required {
        let support = ktern::ktls::probe();
        let unsure = !support.ulp && !ktern::sys::is_root();
        let (severity, context) = if unsure {
            (
                lint::Severity::Warning,
                "on this host, checked without root: the kernel loads its tls module only for \
                 root, as ktern run starts; check as root to be sure",
            )
        } else {
            (lint::Severity::Error, "on this host")
        };
        findings.extend(
            ktern::ktls::host_problems(&c, &support, false)
                .into_iter()
                .map(|p| lint::Finding {
                    severity,
                    field: p.field,
                    message: format!("{} ({context})", p.reason),
                }),
        );
    }
    for f in &findings {
        eprintln!("{}: {f}", c.source);
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == lint::Severity::Error)
        .count();
    if errors > 0 {
        return Ok(false);
    }
    println!(
        "{}: ok ({} listener(s), {} warning(s))",
        c.source,
        c.listeners.len(),
        findings.len()
    );
    Ok(true)
}

fn embedded_default() -> anyhow::Result<Config> {
    let backend = ktern::builtin::start().context("cannot start the built-in backend")?;
    let (cert, key) = ktern::builtin::self_signed(&["localhost", "127.0.0.1"])
        .context("cannot generate the self-signed certificate")?;
    let pems = vec![
        ("self-signed-cert".to_string(), cert),
        ("self-signed-key".to_string(), key),
    ];
    let text = EMBEDDED_DEFAULT.replace(BUILTIN_BACKEND_PLACEHOLDER, &backend.to_string());
    Ok(Config::from_toml(
        &text,
        "<embedded default>",
        std::path::Path::new("."),
        &pems,
    )?)
}

fn run(config_path: Option<PathBuf>, upgrade_from: Option<PathBuf>) -> anyhow::Result<()> {
    // Handlers go in first, before the config is read (seconds with many
    // certificates) or an upgrade takes sockets: from here on SIGHUP (whose
    // default action kills: a logrotate or `systemctl reload` must not stop
    // a server that is starting) and SIGTERM only wake the loop below,
    // whichever thread the kernel delivers them to. So do the signals nginx
    // gives meanings to, whose default actions kill (QUIT with a core dump,
    // which holds private keys): an operator's habit or a logrotate config
    // written for nginx must not cut every connection.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGQUIT,
        signal_hook::consts::SIGUSR1,
        signal_hook::consts::SIGUSR2,
    ])
    .context("cannot install signal handlers")?;
    let embedded = config_path.is_none();
    let (config, source) = match config_path {
        Some(p) => (Config::load(&p)?, Source::File(p)),
        None => (embedded_default()?, Source::Embedded),
    };
    init_logs(config.runtime.log_format);
    let support = match config.runtime.ktls {
        KtlsMode::Off => ktern::ktls::Support::default(),
        _ => ktern::ktls::probe(),
    };
    let problems = ktern::ktls::host_problems(&config, &support, false);
    if !problems.is_empty() {
        return Err(ktern::config::ConfigError {
            file: config.source.clone(),
            problems,
        }
        .into());
    }
    match (config.runtime.ktls, support.ulp) {
        (KtlsMode::Off, _) => {
            tracing::info!("kTLS off by config: records are encrypted in userspace")
        }
        (_, false) => tracing::warn!(
            "{}; records will be encrypted in userspace by rustls",
            support.describe()
        ),
        (_, true) => tracing::info!("{}", support.describe()),
    }
    match ktern::sys::raise_nofile_limit() {
        Ok((soft, _)) => tracing::info!(open_files = soft, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let admin = config.admin;
    let file = config.source.clone();
    let upgrade_socket = config.runtime.upgrade_socket.clone();
    // The switch to runtime.user comes once the shards listen: one that
    // cannot happen (root without CAP_SETUID/CAP_SETGID, as in a container
    // that drops them) is refused now, before a socket is bound or an
    // upgrade takes one, not after connections were accepted.
    if let Some(user) = &config.runtime.user {
        if ktern::sys::is_root() && !ktern::sys::can_change_ids() {
            anyhow::bail!(
                "{}: runtime.user: cannot switch to {user:?}: ktern runs as root without CAP_SETUID and CAP_SETGID",
                config.source
            );
        }
    }
    // The ids too: an unknown user or group, or a switch the kernel would
    // refuse, refuses the start (or the upgrade) now. The switch itself
    // comes after an upgrade's old process was released.
    let switch_to = switch_to(&config)?;
    if let Some((user, uid, gid)) = &switch_to {
        ktern::sys::try_privileges(*uid, *gid).with_context(|| {
            format!(
                "{}: runtime.user: cannot switch to {user:?} (uid {uid}, gid {gid})",
                config.source
            )
        })?;
    }
    // Binary upgrade: the running ktern's sockets, before binding anything.
    let mut inherited = match &upgrade_from {
        Some(path) => {
            let i = ktern::control::upgrade::take_over(path)?;
            tracing::info!(
                pid = i.pid,
                sockets = i.sockets.len(),
                "upgrade: took the listening sockets of the running ktern"
            );
            Some(i)
        }
        None => None,
    };
    // Signals that came while this process started, handled once it
    // serves (below). A stop signal in an upgrade means "abort it" (an
    // operator's Ctrl-C, a deploy script's timeout): before anything of
    // ours accepts, the process ends here, and the old one reads the
    // socket's close and keeps serving (its upgrade socket still at its
    // path). Released, both would drain and nothing would listen.
    let mut early: Vec<i32> = signals.pending().collect();
    if inherited.is_some() && early.iter().any(|&s| is_stop(s)) {
        anyhow::bail!(
            "upgrade aborted: a stop signal came before this process served (the running ktern keeps serving)"
        );
    }
    let sockets = inherited
        .as_mut()
        .map(|i| std::mem::take(&mut i.sockets))
        .unwrap_or_default();
    let inherited_admin = inherited.as_mut().and_then(|i| i.admin.take());
    // Every socket of our own is bound before the shards start: a failure
    // then refuses the start (or the upgrade) before a connection was taken.
    let admin_listener = match (admin, inherited_admin) {
        // The same configured address: serve the socket the old binary
        // served (a fresh bind would fail while it lives).
        (Some(admin), Some((configured, l))) if configured == admin => Some(l),
        (admin, unused) => {
            // Another address, or none: the old binary's socket closes now.
            // Kept, it listened where nobody accepted: a scrape or `ktern
            // reload` there waited for its timeout instead of being
            // refused, and an upgrade back to that address could not bind.
            drop(unused);
            admin
                .map(|admin| {
                    std::net::TcpListener::bind(admin)
                        .with_context(|| format!("{file}: admin.address: cannot listen on {admin}"))
                })
                .transpose()?
        }
    };
    let upgrade_listening = match &upgrade_socket {
        Some(path) => Some(ktern::control::upgrade::bind(path).with_context(|| {
            format!(
                "{file}: runtime.upgrade_socket: cannot listen on {}",
                path.display()
            )
        })?),
        None => None,
    };
    let control = Control::start(config, source, Arc::new(support), sockets)?;
    let (listeners, redirects) = control.bound();
    tracing::info!(
        shards = control.metric_sets().len() - 2,
        "ktern {} started",
        env!("CARGO_PKG_VERSION")
    );
    // A stop signal while the shards started, in an upgrade: aborted as
    // above, but the shards may have taken connections from the shared
    // accept queues already. This process drains them at once (no drain
    // delay: the old process still accepts), without the admin endpoint
    // it would share with the old process (whose /ready it would turn
    // 503), and does nothing else its start would have done. A signal
    // after this check and before the release goes to the upgraded
    // process, as one right after it would.
    early.extend(signals.pending());
    let aborted = inherited.is_some() && early.iter().any(|&s| is_stop(s));
    if aborted {
        tracing::warn!("upgrade aborted: a stop signal came while this process started; the running ktern keeps serving, this one drains the connections it took");
        drop(inherited.take());
        // Gone now, not at exit (the drain ends in `exit`, which runs no
        // destructor): the upgrade socket's private directory, and an
        // admin listener of our own that nobody would accept on (a scrape
        // or `ktern reload` there would wait for its timeout).
        drop(upgrade_listening);
        drop(admin_listener);
        // Nothing left needs root while the taken connections finish.
        if let Some((user, uid, gid)) = switch_to {
            if let Err(e) = ktern::sys::drop_privileges(uid, gid) {
                tracing::error!(user, uid, gid, error = %e, "cannot switch user; draining as root");
            }
        }
        start_drain(&control, Duration::ZERO)?;
        for sig in signals.forever() {
            if is_stop(sig) {
                exit_now(&control, sig);
            }
        }
        return Ok(());
    }
    let admin_addr = match (admin, admin_listener) {
        (Some(admin), Some(listener)) => Some(
            ktern::control::admin::serve(admin, listener, control.clone())
                .context("cannot start the admin endpoint")?,
        ),
        _ => None,
    };
    if let (Some(old), Some(path)) = (inherited, &upgrade_from) {
        // From here on this process serves whatever happens: the old one
        // may already have stopped accepting.
        match old.release(path) {
            Ok(pid) => {
                tracing::info!(pid, "upgrade: the old ktern stopped accepting and drains");
                say!("upgraded from pid {pid}");
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade: no confirmation from the old ktern; serving anyway")
            }
        }
    }
    // Published while still root, if started so: the socket waits in a
    // 0700 directory root made, and goes to a path (`/run/ktern`) root may
    // own; as runtime.user the rename failed, and no upgrade ever found
    // the process.
    if let Some(listening) = upgrade_listening {
        if let Err(e) = listening.serve(Arc::new(ktern::control::UpgradeOffer(control.clone()))) {
            tracing::error!(error = %e, "runtime.upgrade_socket: cannot serve it; upgrades will not find this process");
        }
    }
    if let Some((user, uid, gid)) = switch_to {
        ktern::sys::drop_privileges(uid, gid)
            .with_context(|| format!("cannot switch to user {user:?} (uid {uid}, gid {gid})"))?;
        tracing::info!(user, uid, gid, "dropped root: running as {user}");
    }
    // After the switch: the ACME client writes keys and certificates as
    // runtime.user.
    // Not in a process told to stop while it started: its drain begins
    // below, and an order would race it.
    let stopping = early.iter().any(|&s| is_stop(s));
    if !stopping {
        control.start_acme();
    }
    // Several stop signals while it started are one stop (replayed as two,
    // the second would exit at once instead of draining).
    let mut stops = 0;
    early.retain(|&s| {
        !is_stop(s) || {
            stops += 1;
            stops == 1
        }
    });
    // Said once everything is up, the upgrade socket included: whoever reads
    // these lines (an operator, a script, the tests) may upgrade at once.
    for (name, addr) in &listeners {
        say!("listening {name} {addr}");
    }
    for addr in &redirects {
        say!("redirecting {addr}");
    }
    if let Some(addr) = admin_addr {
        say!("admin http://{addr}/metrics");
    }
    if embedded {
        if let Some((_, addr)) = listeners.first() {
            say!("try: curl -k https://localhost:{}/", addr.port());
        }
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    control.notify.ready(1);
    // Whether a stop signal came: a process that handed its sockets to a
    // new binary is draining already, and the first SIGTERM it gets
    // (`systemctl stop`, a deploy script's `kill`) means "drain", as it
    // does for any process, not "second signal: exit now".
    let mut stop_signalled = false;
    for sig in early.into_iter().chain(signals.forever()) {
        match sig {
            signal_hook::consts::SIGHUP => {
                // Logged and counted inside, success or not.
                let _ = control.reload();
            }
            // nginx: reopen the log files.
            signal_hook::consts::SIGUSR1 => control.reopen_access_log(),
            // nginx: start a new binary. ktern's upgrade is started by the
            // new binary itself.
            signal_hook::consts::SIGUSR2 => tracing::warn!(
                "SIGUSR2 ignored: a binary upgrade is `ktern run --upgrade-from <runtime.upgrade_socket>`"
            ),
            // SIGQUIT (nginx's graceful stop), SIGINT and SIGTERM: drain.
            _ if !stop_signalled && control.status.draining.load(Ordering::Relaxed) => {
                stop_signalled = true;
                tracing::info!(
                    signal = sig,
                    connections = control.active_connections(),
                    "stop signal: already draining (handed over to a new process); a second one exits now"
                );
            }
            _ if stop_signalled => exit_now(&control, sig),
            _ => {
                stop_signalled = true;
                start_drain(&control, control.current().config.runtime.drain_delay)?;
            }
        }
    }
    Ok(())
}

/// Drains on a thread of its own (the signal loop goes on, for a second
/// stop signal); the drain ends the process.
fn start_drain(control: &Arc<Control>, delay: Duration) -> anyhow::Result<()> {
    let control = control.clone();
    std::thread::Builder::new()
        .name("ktern-drain".into())
        .spawn(move || control.drain(delay))
        .context("cannot start the drain thread")?;
    Ok(())
}

/// A second stop signal: exits now. The connections still open are cut
/// first (`Control::cut`: their requests in flight get access lines), and
/// the access lines queued go out: a log that keeps up takes them in milliseconds, and a stalled
/// one does not hold the exit past `SECOND_SIGNAL_FLUSH`.
fn exit_now(control: &Control, sig: i32) -> ! {
    tracing::warn!(
        signal = sig,
        connections = control.active_connections(),
        "second stop signal: exiting now"
    );
    control.cut();
    ktern::metrics::access::flush(SECOND_SIGNAL_FLUSH);
    std::process::exit(0)
}

/// SIGINT, SIGTERM and SIGQUIT (nginx's graceful stop): each drains.
fn is_stop(sig: i32) -> bool {
    [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGQUIT,
    ]
    .contains(&sig)
}

/// `runtime.user`/`group`: once every socket is bound (and the upgrade
/// socket published), a ktern started as root switches to that user for
/// good (like nginx's workers, but for the whole process: nothing keeps
/// root). Reloads then read certificates and keys as that user, and can
/// bind ports below 1024 only with CAP_NET_BIND_SERVICE. The user's ids
/// (and group's), or `None` when there is no switch.
fn switch_to(config: &Config) -> anyhow::Result<Option<(String, u32, u32)>> {
    let Some(user) = &config.runtime.user else {
        return Ok(None);
    };
    if !ktern::sys::is_root() {
        tracing::warn!(user, "runtime.user ignored: ktern is not running as root");
        return Ok(None);
    }
    let (uid, mut gid) = ktern::sys::lookup_user(user)
        .with_context(|| format!("{}: runtime.user: {user:?}", config.source))?;
    if let Some(group) = &config.runtime.group {
        gid = ktern::sys::lookup_group(group)
            .with_context(|| format!("{}: runtime.group: {group:?}", config.source))?;
    }
    Ok(Some((user.clone(), uid, gid)))
}

/// `ktern reload`: asks the running ktern (through the admin endpoint named
/// in the config, or `--admin`) to re-read its config. Exit 0 when the new
/// config is live, 1 with every reason when it was refused or nothing runs.
fn reload(config: &std::path::Path, admin: Option<String>) -> anyhow::Result<bool> {
    use std::io::{Read as _, Write as _};
    let admin = match admin {
        Some(a) => a,
        None => {
            let text = ktern::config::read_text_capped(config, "a config file")
                .map_err(anyhow::Error::msg)?;
            let table: toml::Table = toml::from_str(&text)
                .with_context(|| format!("{}: not valid TOML", config.display()))?;
            table
                .get("admin")
                .and_then(|a| a.get("address"))
                .and_then(|a| a.as_str())
                .map(str::to_string)
                .with_context(|| {
                    format!(
                        "{}: no [admin] address: `ktern reload` talks to the running ktern \
                         through its admin endpoint (or send it SIGHUP)",
                        config.display()
                    )
                })?
        }
    };
    let mut addr: std::net::SocketAddr = admin
        .parse()
        .with_context(|| format!("admin address {admin:?} is not ip:port"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("no running ktern answers at {addr}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    conn.write_all(
        b"POST /reload HTTP/1.1\r\nHost: ktern\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .with_context(|| format!("ktern at {addr} did not answer"))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let value: serde_json::Value = serde_json::from_str(body)
        .with_context(|| format!("ktern at {addr} answered something else: {answer:?}"))?;
    let generation = value["generation"].as_u64().unwrap_or(0);
    if value["status"] == "live" {
        println!("reloaded: config generation {generation} is live");
        Ok(true)
    } else {
        eprintln!("reload refused; config generation {generation} still serving:");
        for e in value["errors"].as_array().into_iter().flatten() {
            match (e["file"].as_str(), e["field"].as_str()) {
                (Some(file), Some(field)) => {
                    eprintln!("{file}: {field}: {}", e["reason"].as_str().unwrap_or(""))
                }
                _ => eprintln!("{}", e["reason"].as_str().unwrap_or("")),
            }
        }
        Ok(false)
    }
}

/// Log lines on stderr: JSON when configured, or (`auto`) when stderr is
/// not a terminal (journald, a file, a collector), text otherwise.
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            // h2's own warnings are about what a client sent (an
            // unsolicited PING acknowledgement, one line per frame, with no
            // peer address): ktern logs and counts those itself, once.
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=error"))
    };
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
