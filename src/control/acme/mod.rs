//! ACME (RFC 8555): certificates ktern obtains and renews itself.
//!
//! One control thread, off the shards, owns every order. It reads the
//! orders from the live config (`certificate[].acme`), works out when each
//! is due, and runs the protocol (`order.rs`, on `instant-acme`) in a
//! current-thread tokio runtime that lives on this thread only: the shards
//! never wait for a CA. A certificate it obtains is written to the state
//! directory (written, synced, then renamed: a crash leaves the old file
//! or the new one, never half of either) and goes live through an
//! ordinary reload, so connections in flight keep their generation and
//! nothing is dropped.
//!
//! When: at two thirds of the served certificate's lifetime (Let's
//! Encrypt's advice for 90-day certificates: renew with 30 days left), at
//! once when there is none yet (a self-signed stand-in serves the names
//! meanwhile) or it no longer covers the configured names. A failure is
//! logged and counted and retried after `acme.retry`, doubling up to
//! `acme.retry_max`, each delay jittered so a fleet does not retry in step.
//! The old certificate keeps serving throughout.
//!
//! Not done: ACME Renewal Information (RFC 9773). The CA used in the tests
//! (Debian's pebble 2.4.0) does not offer it, so it could not be tested.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use super::Control;
use crate::config::{AcmeCert, Config};
use crate::metrics::ShardMetrics as M;

mod order;

pub use order::AcmeError;

/// The longest a whole order may take (account, validations, issuance)
/// before it counts as failed. Pebble answers in seconds; Let's Encrypt
/// in well under a minute.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);

/// How often the thread looks when nothing is due sooner.
const PERIOD: i64 = 3600;

/// The validity of the certificate being served: notBefore, notAfter.
pub type Validity = (i64, i64);

/// When a certificate with `held` validity should be renewed: at two
/// thirds of its lifetime; at once when there is none.
pub fn renew_at(held: Option<Validity>, now: i64) -> i64 {
    match held {
        None => now,
        Some((not_before, not_after)) if not_after > not_before => {
            not_before + (not_after - not_before) * 2 / 3
        }
        Some(_) => now,
    }
}

/// The delay before retry number `failures` (1 after the first failure):
/// `base` doubled per failure, at most `max`, then "equal jitter": half
/// fixed, half scaled by `jitter` in [0, 1), so retries spread out while
/// the wait still grows.
pub fn backoff(failures: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let doubled = base
        .checked_mul(1u32 << failures.saturating_sub(1).min(20))
        .unwrap_or(max)
        .min(max);
    doubled / 2 + doubled.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// A uniform number in [0, 1) from the build's crypto library.
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if crate::provider::crypto_provider()
        .secure_random
        .fill(&mut b)
        .is_err()
    {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// Each distinct order of `config` (two listeners may share one) with the
/// validity of what it serves now: `None` for the self-signed stand-in or
/// a certificate that does not cover every configured name.
pub fn orders(config: &Config) -> Vec<(Arc<AcmeCert>, Option<Validity>)> {
    let mut out: Vec<(Arc<AcmeCert>, Option<Validity>)> = Vec::new();
    for c in config.listeners.iter().flat_map(|l| &l.certificates) {
        let Some(a) = &c.acme else { continue };
        if out.iter().any(|(o, _)| o.dir == a.dir) {
            continue;
        }
        let covers = a
            .domains
            .iter()
            .all(|d| c.info.names.iter().any(|n| n.eq_ignore_ascii_case(d)));
        let held = (a.issued && covers).then_some((c.info.not_before, c.info.not_after));
        out.push((a.clone(), held));
    }
    out
}

/// What the thread knows about one order beyond the config.
#[derive(Debug, Default)]
struct Track {
    /// Failures since the last success.
    failures: u32,
    /// No attempt before this (Unix seconds).
    retry_at: i64,
    /// The validity of the certificate this thread last obtained: the
    /// schedule goes by it even while a reload to serve it is refused
    /// (else a refused reload would order again and again).
    obtained: Option<Validity>,
}

/// Starts the thread. It ends when the control side goes away or the
/// nudge channel closes.
pub fn spawn(control: Weak<Control>, nudged: mpsc::Receiver<()>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ktern-acme".into())
        .spawn(move || run(control, nudged))?;
    Ok(())
}

fn run(control: Weak<Control>, nudged: mpsc::Receiver<()>) {
    let mut runtime = None;
    let mut tracks: HashMap<PathBuf, Track> = HashMap::new();
    loop {
        let Some(c) = control.upgrade() else { return };
        let config = c.current().config.clone();
        let (metrics, challenges) = (c.metrics.clone(), c.challenges.clone());
        drop(c);
        let orders = orders(&config);
        tracks.retain(|dir, _| orders.iter().any(|(o, _)| &o.dir == dir));
        let mut now = crate::clock::unix_now();
        let mut wake = now + PERIOD;
        for (order, held) in orders {
            let t = tracks.entry(order.dir.clone()).or_default();
            let held = match (held, t.obtained) {
                (Some(h), Some(o)) => Some(if o.1 > h.1 { o } else { h }),
                (h, o) => h.or(o),
            };
            let due = renew_at(held, now).max(t.retry_at);
            if due > now {
                wake = wake.min(due);
                continue;
            }
            // The runtime is made on first need: a config without ACME
            // never starts one.
            let rt = match &mut runtime {
                Some(rt) => rt,
                None => match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => runtime.insert(rt),
                    Err(e) => {
                        tracing::error!(error = %e, "internal: cannot start the ACME thread's runtime; ACME certificates will not be obtained");
                        return;
                    }
                },
            };
            tracing::info!(domains = ?order.domains, directory = %order.directory, reason = if held.is_some() { "renewal due" } else { "no certificate from the CA yet" }, "ACME: ordering a certificate");
            let result = rt
                .block_on(async {
                    match tokio::time::timeout(
                        ORDER_TIMEOUT,
                        order::obtain(&order, &config.acme.state_dir, &challenges),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(AcmeError::Timeout(ORDER_TIMEOUT)),
                    }
                })
                .and_then(|issued| keep(&order.dir, &issued).map(|()| issued));
            now = crate::clock::unix_now();
            match result {
                Ok(issued) => {
                    M::inc(&metrics.acme_issued);
                    t.failures = 0;
                    t.retry_at = 0;
                    t.obtained = Some(issued.validity);
                    tracing::info!(domains = ?order.domains, dir = %order.dir.display(), not_after = issued.validity.1, "ACME: certificate obtained; reloading to serve it");
                    wake = wake.min(renew_at(t.obtained, now));
                    let Some(c) = control.upgrade() else { return };
                    if let Err(e) = c.reload() {
                        tracing::error!(error = %e, dir = %order.dir.display(), "ACME: the new certificate is on disk but the reload to serve it was refused; it goes live with the next successful reload");
                    }
                }
                Err(e) => {
                    M::inc(&metrics.acme_failures);
                    t.failures += 1;
                    let delay = backoff(
                        t.failures,
                        config.acme.retry,
                        config.acme.retry_max,
                        jitter(),
                    );
                    t.retry_at = now + delay.as_secs().max(1) as i64;
                    wake = wake.min(t.retry_at);
                    tracing::error!(domains = ?order.domains, directory = %order.directory, error = %chain(&e), failures = t.failures, retry_in = ?delay, "ACME: order failed; the current certificate keeps serving");
                }
            }
        }
        let wait = Duration::from_secs((wake - now).clamp(1, PERIOD) as u64);
        match nudged.recv_timeout(wait) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// An error with its causes, `outer: inner: innermost`, each cause left
/// out when the text before already says it (hyper's "client error
/// (Connect)" alone does not tell an operator the port was refused).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// A certificate the CA issued, with the key made for it.
#[derive(Debug)]
pub struct Issued {
    /// Leaf then intermediates, PEM.
    pub chain_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    /// The leaf's notBefore and notAfter.
    pub validity: Validity,
}

/// Writes the key, then the chain, into `dir`, each atomically; the
/// config loader takes the pair only if they match, so a crash between
/// the two renames serves the old certificate until the next order.
fn keep(dir: &Path, issued: &Issued) -> Result<(), AcmeError> {
    std::fs::create_dir_all(dir).map_err(|source| AcmeError::State {
        path: dir.to_path_buf(),
        source,
    })?;
    write_atomic(&dir.join("key.pem"), issued.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join("cert.pem"), issued.chain_pem.as_bytes(), 0o644)
}

/// Writes `path` by a synced temporary file renamed over it, then syncs
/// the directory so the rename survives a crash.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), AcmeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let state = |source| AcmeError::State {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime_or_at_once() {
        assert_eq!(renew_at(None, 500), 500);
        // 90 days: renew with 30 left.
        let day = 86_400;
        assert_eq!(renew_at(Some((0, 90 * day)), 5), 60 * day);
        // A certificate whose dates make no sense is replaced at once.
        assert_eq!(renew_at(Some((100, 100)), 7), 7);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_equal_jitter() {
        let (base, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        assert_eq!(backoff(1, base, max, 0.0), Duration::from_secs(30));
        assert_eq!(
            backoff(1, base, max, 0.999_999),
            Duration::from_secs(60) - Duration::from_micros(30)
        );
        assert_eq!(backoff(2, base, max, 0.0), Duration::from_secs(60));
        assert_eq!(backoff(3, base, max, 0.5), Duration::from_secs(180));
        // Capped, and no overflow however many failures.
        assert_eq!(backoff(10, base, max, 0.0), Duration::from_secs(1800));
        assert_eq!(backoff(u32::MAX, base, max, 0.0), Duration::from_secs(1800));
        let j = jitter();
        assert!((0.0..1.0).contains(&j), "{j}");
    }

    #[test]
    fn error_chains_name_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = AcmeError::State {
            path: PathBuf::from("/x"),
            source: io,
        };
        assert_eq!(chain(&e), "state file /x: connection refused");
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other(
            "tcp connect error: Connection refused",
        ));
        assert_eq!(
            chain(&e),
            "client error (Connect): tcp connect error: Connection refused"
        );
    }

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_no_temporary() {
        let dir = std::env::temp_dir().join(format!("ktern-acme-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key.pem");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key.pem")]);
        // A directory that is not there is an error naming the file.
        let e = write_atomic(&dir.join("no/such/file"), b"x", 0o600).unwrap_err();
        assert!(e.to_string().contains("no/such/file"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
