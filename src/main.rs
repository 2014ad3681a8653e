//! The `ktern` command line: parse, load and validate the config, probe kTLS,
//! start the shards, wait for a signal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ktern::config::{Config, KtlsMode, LogFormat, BUILTIN_BACKEND_PLACEHOLDER, EMBEDDED_DEFAULT};
use ktern::control::{Control, Source};

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
    /// Validate a config file: exit 0, or print every problem and exit 1.
    Check {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
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
        Command::Check { config } => match check(&config) {
            Ok(c) => {
                println!("{}: ok ({} listener(s))", c.source, c.listeners.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ktern: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check(config: &std::path::Path) -> Result<Config, ktern::config::ConfigError> {
    init_logs(LogFormat::Text);
    Config::load(config)
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

fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
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
    match (config.runtime.ktls, support.ulp) {
        (KtlsMode::Required, false) => anyhow::bail!(
            "{}: runtime.ktls = \"required\" but this kernel has no kTLS: {} \
             (load it with `modprobe tls`, or set ktls = \"auto\")",
            config.source,
            support.describe()
        ),
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
    // Handlers go in before any shard starts: from here on SIGHUP (whose
    // default action kills: a logrotate or `systemctl reload` must not stop
    // the server) and SIGTERM only wake the loop below, whichever thread
    // the kernel delivers them to.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let admin = config.admin;
    let control = Control::start(config, source, Arc::new(support))?;
    let (listeners, redirects) = control.bound();
    tracing::info!(
        shards = control.metric_sets().len() - 2,
        "ktern {} started",
        env!("CARGO_PKG_VERSION")
    );
    for (name, addr) in &listeners {
        println!("listening {name} {addr}");
    }
    for addr in &redirects {
        println!("redirecting {addr}");
    }
    if let Some(admin) = admin {
        let addr = ktern::control::admin::serve(admin, control.clone())
            .context("cannot start the admin endpoint")?;
        println!("admin http://{addr}/metrics");
    }
    drop_root(&control.current().config)?;
    if embedded {
        if let Some((_, addr)) = listeners.first() {
            println!("try: curl -k https://localhost:{}/", addr.port());
        }
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    control.notify.ready(1);
    for sig in signals.forever() {
        match sig {
            signal_hook::consts::SIGHUP => {
                // Logged and counted inside, success or not.
                let _ = control.reload();
            }
            _ if control.status.draining.load(Ordering::Relaxed) => {
                let left = control.active_connections();
                tracing::warn!(
                    signal = sig,
                    connections = left,
                    "second stop signal: exiting now"
                );
                std::process::exit(0);
            }
            _ => {
                let control = control.clone();
                std::thread::Builder::new()
                    .name("ktern-drain".into())
                    .spawn(move || drain(&control))
                    .context("cannot start the drain thread")?;
            }
        }
    }
    Ok(())
}

/// `runtime.user`/`group`: once every socket is bound, a ktern started as
/// root switches to that user for good (like nginx's workers, but for the
/// whole process: nothing keeps root). Reloads then read certificates and
/// keys as that user, and can bind ports below 1024 only with
/// CAP_NET_BIND_SERVICE.
fn drop_root(config: &Config) -> anyhow::Result<()> {
    let Some(user) = &config.runtime.user else {
        return Ok(());
    };
    if !ktern::sys::is_root() {
        tracing::warn!(user, "runtime.user ignored: ktern is not running as root");
        return Ok(());
    }
    let (uid, mut gid) = ktern::sys::lookup_user(user)
        .with_context(|| format!("{}: runtime.user: {user:?}", config.source))?;
    if let Some(group) = &config.runtime.group {
        gid = ktern::sys::lookup_group(group)
            .with_context(|| format!("{}: runtime.group: {group:?}", config.source))?;
    }
    ktern::sys::drop_privileges(uid, gid)
        .with_context(|| format!("cannot switch to user {user:?} (uid {uid}, gid {gid})"))?;
    tracing::info!(user, uid, gid, "dropped root: running as {user}");
    Ok(())
}

/// SIGTERM/SIGINT: `/ready` answers 503 at once; listeners keep accepting
/// for `runtime.drain_delay` (so health checks withdraw the host first),
/// then close; keep-alive connections are closed as they go idle; open
/// connections get `runtime.drain_timeout` to finish; then exit 0.
fn drain(control: &Control) {
    control.status.draining.store(true, Ordering::Relaxed);
    control.notify.stopping();
    let gen = control.current();
    let (delay, timeout) = (
        gen.config.runtime.drain_delay,
        gen.config.runtime.drain_timeout,
    );
    drop(gen);
    tracing::info!(
        ?delay,
        ?timeout,
        "draining: /ready answers 503, still accepting for the drain delay"
    );
    std::thread::sleep(delay);
    if let Err(e) = control.stop_accepting() {
        tracing::error!(error = %e, "drain: a shard did not stop accepting");
    }
    let open = control.active_connections();
    tracing::info!(
        connections = open,
        "drain: listeners closed, waiting for open connections"
    );
    let until = Instant::now() + timeout;
    while control.active_connections() > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = control.active_connections();
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain timeout: closing what is still open"
        );
    } else {
        tracing::info!("drained: every connection finished");
    }
    std::process::exit(0);
}

/// `ktern reload`: asks the running ktern (through the admin endpoint named
/// in the config, or `--admin`) to re-read its config. Exit 0 when the new
/// config is live, 1 with every reason when it was refused or nothing runs.
fn reload(config: &std::path::Path, admin: Option<String>) -> anyhow::Result<bool> {
    use std::io::{Read as _, Write as _};
    let admin = match admin {
        Some(a) => a,
        None => {
            let text = std::fs::read_to_string(config)
                .with_context(|| format!("{}: cannot read", config.display()))?;
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
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
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
