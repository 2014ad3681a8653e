//! The `ktern` command line: parse, load and validate the config, probe kTLS,
//! start the shards, wait for a signal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ktern::config::{Config, KtlsMode, BUILTIN_BACKEND_PLACEHOLDER, EMBEDDED_DEFAULT};

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
    /// Validate a config file: exit 0, or print every problem and exit 1.
    Check {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
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
    let config = match config_path {
        Some(p) => Config::load(&p)?,
        None => embedded_default()?,
    };
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
    let config = Arc::new(config);
    let started = ktern::shard::start(config.clone(), Arc::new(support))?;
    let (shards, bound) = (&started.shards, &started.bound);
    tracing::info!(
        shards = shards.len(),
        "ktern {} started",
        env!("CARGO_PKG_VERSION")
    );
    for (l, addr) in config.listeners.iter().zip(bound) {
        println!("listening {} {}", l.name, addr);
    }
    for addr in &bound[config.listeners.len()..] {
        println!("redirecting {addr}");
    }
    if let Some(admin) = config.admin {
        let metrics = started.metrics.clone();
        let addr =
            ktern::metrics::serve(admin, metrics).context("cannot start the admin endpoint")?;
        println!("admin http://{addr}/metrics");
    }
    if embedded {
        if let Some(addr) = bound.first() {
            println!("try: curl -k https://localhost:{}/", addr.port());
        }
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "stopping");
    }
    Ok(())
}
