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
//! meanwhile) or it no longer covers the configured names. A CA that
//! offers ACME Renewal Information (RFC 9773) may ask for it sooner: its
//! suggested window for the certificate is fetched again after each
//! Retry-After, and renewal happens at a random time within it (now, if
//! that has passed), and the order names the certificate it replaces. A
//! failure is logged and counted and retried after `acme.retry`, doubling
//! up to `acme.retry_max`, each delay jittered so a fleet does not retry
//! in step. The old certificate keeps serving throughout.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use super::Control;
use crate::config::{AcmeCert, AcmeSettings, Config};
use crate::metrics::ShardMetrics as M;

mod order;

pub use order::{certificate_id, AcmeError};

/// The longest a whole order may take (account, validations, issuance)
/// before it counts as failed. Pebble answers in seconds; Let's Encrypt
/// in well under a minute.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);

/// How often the thread looks when nothing is due sooner.
const PERIOD: i64 = 3600;

/// How long a certificate obtained (or found on disk) may wait to be
/// served while more orders of the same pass run: their certificates go
/// live by one reload, at the pass's end or before the next order once
/// the first has waited this long (an order under way, up to
/// ORDER_TIMEOUT, finishes first).
/// One reload per certificate read every certificate of the config again
/// each time: a first start ordering n names did n full reloads, n² reads.
const RELOAD_EVERY: i64 = 30;

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
    // By state directory, in constant time (a fleet host may hold tens of
    // thousands of orders, and this runs at each reload).
    let mut dirs = std::collections::HashSet::new();
    for c in config.listeners.iter().flat_map(|l| &l.certificates) {
        let Some(a) = &c.acme else { continue };
        if !dirs.insert(a.dir.as_path()) {
            continue;
        }
        let held =
            (a.issued && a.from_this_ca(a.issued_by.as_deref()) && covers(&c.info, &a.domains))
                .then_some((c.info.not_before, c.info.not_after));
        out.push((a.clone(), held));
    }
    out
}

/// Whether a certificate names every domain of its order.
fn covers(info: &crate::config::CertInfo, domains: &[String]) -> bool {
    domains.iter().all(|d| {
        info.names
            .iter()
            .any(|n| crate::config::names::covers(n, d))
    })
}

/// What the thread knows about one order beyond the config; forgotten
/// when the order changes (new names, another CA), so the changed order
/// is judged afresh rather than waiting out an old backoff.
#[derive(Debug)]
struct Track {
    /// The order this is about.
    order: Arc<AcmeCert>,
    /// Failures since the last success.
    failures: u32,
    /// No order before this (Unix seconds).
    retry_at: i64,
    /// No reload (to serve a certificate on disk) before this.
    reload_at: i64,
    /// What the CA's renewal information says.
    ari: Ari,
    /// Failures to get it in a row.
    ari_failures: u32,
    /// An order that named the certificate it replaces failed.
    replaces_failed: bool,
    /// A certificate the CA issued that could not be written to the state
    /// directory (a full disk): the retry writes it again rather than
    /// ordering another (each order counts against the CA's limits: five
    /// of the same names a week, at Let's Encrypt).
    unkept: Option<Issued>,
}

/// ACME Renewal Information (RFC 9773) about one order's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ari {
    /// Not asked yet (or asked about another certificate).
    Unknown,
    /// The CA's directory offers none.
    Unsupported,
    /// For the certificate `id`: renew at `due`; ask again at `ask_at`.
    Known {
        id: instant_acme::CertificateIdentifier<'static>,
        due: Option<i64>,
        ask_at: i64,
    },
}

/// The renewal time within the CA's suggested window (RFC 9773 §4.2): a
/// uniformly random point, `r` in [0, 1), so a fleet does not renew in
/// step; a window that has passed means at once, as does a time in the
/// past.
pub fn ari_due(start: i64, end: i64, r: f64) -> i64 {
    if end <= start {
        return start;
    }
    start + ((end - start) as f64 * r.clamp(0.0, 1.0)) as i64
}

/// The longest wait before renewal information is asked again (RFC 9773
/// §4.3.2 asks clients to bound the CA's Retry-After).
const ARI_MAX: i64 = 6 * 3600;

/// How long until renewal information is asked again: the CA's
/// Retry-After, no sooner than `acme.retry` and no later than six hours
/// (RFC 9773 §4.3.2 asks clients to bound it).
/// An `acme.retry` above six hours gives six hours (`clamp` with its
/// bounds crossed panicked, and took the ACME thread with it).
fn ask_again(retry_after: Duration, min: i64) -> i64 {
    i64::try_from(retry_after.as_secs())
        .unwrap_or(ARI_MAX)
        .clamp(min.min(ARI_MAX), ARI_MAX)
}

/// When to ask again for renewal information the CA failed to give,
/// after `failures` failures in a row: `acme.retry` doubled per failure
/// and jittered, as an order's retry, up to `acme.retry_max` and six
/// hours. At a flat `acme.retry` (10 minutes by default) every
/// certificate asked that often for as long as the CA's endpoint failed.
fn ari_retry(failures: u32, acme: &AcmeSettings, jitter: f64) -> i64 {
    let max = acme.retry_max.min(Duration::from_secs(ARI_MAX as u64));
    backoff(failures, acme.retry, max, jitter).as_secs().max(1) as i64
}

/// What to do about one order now.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing before this time (Unix seconds).
    Wait(i64),
    /// The state directory holds a newer certificate than the one served
    /// (a refused reload, or another ktern process ordered it): reload.
    Reload,
    /// Order a certificate.
    Order,
}

/// The decision for one order (sans-IO): `live` is what the config
/// serves, `on_disk` what the state directory holds, `retry_at` and
/// `reload_at` the track's earliest times, `ari_due` when the CA's
/// renewal information asks for renewal (never later than two thirds of
/// the lifetime: a CA may only move it sooner here).
pub fn next(
    live: Option<Validity>,
    on_disk: Option<Validity>,
    retry_at: i64,
    reload_at: i64,
    ari_due: Option<i64>,
    now: i64,
) -> Next {
    let newer_on_disk = on_disk.filter(|d| live.is_none_or(|l| d.1 > l.1));
    if newer_on_disk.is_some() && now >= reload_at {
        return Next::Reload;
    }
    let best = newer_on_disk.or(live);
    let planned = renew_at(best, now);
    let due = ari_due.map_or(planned, |a| a.min(planned)).max(retry_at);
    if due > now {
        let wake = if newer_on_disk.is_some() {
            due.min(reload_at)
        } else {
            due
        };
        return Next::Wait(wake);
    }
    Next::Order
}

/// Starts the thread. It ends when the control side goes away or the
/// nudge channel closes. Called after the privilege drop, so the state
/// directory and its files belong to the user ktern runs as.
pub fn spawn(control: Weak<Control>, nudged: mpsc::Receiver<()>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ktern-acme".into())
        .spawn(move || {
            supervised(
                || run(&control, &nudged),
                || {
                    let Some(c) = control.upgrade() else {
                        return false;
                    };
                    M::inc(&c.metrics.internal_errors);
                    let pause = c.current().config.acme.retry.max(Duration::from_secs(1));
                    drop(c);
                    std::thread::sleep(pause);
                    control.upgrade().is_some_and(|c| !draining(&c))
                },
            )
        })?;
    Ok(())
}

/// Runs `pass` until it returns, and again each time it panics, once
/// `again` (which waits) says to go on. A panic in the ACME thread ended it
/// for good: no certificate was ordered or renewed again, and only stderr
/// said so. Its passes run crates on a CA's answers (instant-acme adds a
/// CA's `Retry-After` seconds to the clock unchecked, which panics on a
/// huge one), so a bug there must cost one pass, not every renewal to
/// come. What a pass learned (backoffs, renewal information) is
/// forgotten; the state directory keeps what matters. Returns the panics
/// caught.
fn supervised(mut pass: impl FnMut(), mut again: impl FnMut() -> bool) -> u32 {
    let mut panics = 0;
    loop {
        let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut pass)) else {
            return panics;
        };
        panics += 1;
        let what = panic_message(&*panic);
        tracing::error!(panic = %what, "internal: the ACME thread panicked; it starts again after acme.retry");
        if !again() {
            return panics;
        }
    }
}

fn run(control: &Weak<Control>, nudged: &mpsc::Receiver<()>) {
    let mut runtime = None;
    let mut tracks: HashMap<PathBuf, Track> = HashMap::new();
    loop {
        let Some(c) = control.upgrade() else { return };
        if draining(&c) {
            return;
        }
        let config = c.current().config.clone();
        let (metrics, challenges) = (c.metrics.clone(), c.challenges.clone());
        drop(c);
        let orders = orders(&config);
        let by_dir: HashMap<&Path, &AcmeCert> = orders
            .iter()
            .map(|(o, _)| (o.dir.as_path(), &**o))
            .collect();
        tracks.retain(|dir, t| {
            by_dir
                .get(dir.as_path())
                .is_some_and(|o| o.same_order(&t.order))
        });
        drop(by_dir);
        let mut now = crate::clock::unix_now();
        let mut wake = now + PERIOD;
        let retry_secs = config.acme.retry.as_secs().max(1) as i64;
        // This pass's certificates waiting for their reload, and since
        // when. Each has its track's `reload_at` set: should the reload be
        // refused, the next pass finds it newer on disk than served
        // (`Next::Reload`) from then on.
        let mut unserved: Vec<PathBuf> = Vec::new();
        let mut unserved_since = now;
        for (order, live) in orders {
            if now - unserved_since >= RELOAD_EVERY && !serve(control, &mut unserved) {
                return;
            }
            let t = tracks.entry(order.dir.clone()).or_insert_with(|| Track {
                order: order.clone(),
                failures: 0,
                retry_at: 0,
                reload_at: 0,
                ari: Ari::Unknown,
                ari_failures: 0,
                replaces_failed: false,
                unkept: None,
            });
            // A state directory that cannot be read is as good as empty
            // (the config's load logged why); so is another CA's
            // certificate, or one that misses a name.
            let held = crate::config::held_certificate(&order.dir, now)
                .ok()
                .flatten()
                .filter(|h| order.from_this_ca(h.issued_by.as_deref()))
                .map(|h| h.certificate)
                .filter(|c| covers(&c.info, &order.domains));
            let on_disk = held.as_ref().map(|c| (c.info.not_before, c.info.not_after));
            // The certificate the CA gave (the one in the state directory),
            // as renewal information names it.
            let held_id = held
                .as_ref()
                .and_then(|c| c.key.cert.first())
                .and_then(order::certificate_id);
            let ask = match (&held_id, &t.ari) {
                (None, _) | (_, Ari::Unsupported) => false,
                (
                    Some(id),
                    Ari::Known {
                        id: known, ask_at, ..
                    },
                ) => id != known || now >= *ask_at,
                (Some(_), Ari::Unknown) => true,
            };
            let rt = if ask { runtime_for(&mut runtime) } else { None };
            if let (Some(id), Some(rt)) = (&held_id, rt) {
                let asked = guarded(rt, &metrics, async {
                    tokio::time::timeout(
                        ORDER_TIMEOUT,
                        order::renewal_window(&order, &config.acme.state_dir, id),
                    )
                    .await
                    .unwrap_or(Err(AcmeError::Timeout(ORDER_TIMEOUT)))
                });
                now = crate::clock::unix_now();
                t.ari_failures = if asked.is_err() {
                    t.ari_failures.saturating_add(1)
                } else {
                    0
                };
                t.ari = match asked {
                    Ok(None) => Ari::Unsupported,
                    Ok(Some(w)) => {
                        let due = ari_due(w.start, w.end, jitter());
                        tracing::info!(domains = ?order.domains, window_start = w.start, window_end = w.end, renew_at = due, "ACME: the CA's renewal information");
                        Ari::Known {
                            id: id.clone(),
                            due: Some(due),
                            ask_at: now + ask_again(w.ask_again, retry_secs),
                        }
                    }
                    // Not an order failure: the lifetime rule still holds,
                    // and the question is asked again later.
                    Err(e) => {
                        tracing::warn!(domains = ?order.domains, error = %chain(&e), "ACME: no renewal information from the CA; asking again later");
                        Ari::Known {
                            id: id.clone(),
                            due: None,
                            ask_at: now + ari_retry(t.ari_failures, &config.acme, jitter()),
                        }
                    }
                };
            }
            let ari = match &t.ari {
                Ari::Known { id, due, ask_at } if Some(id) == held_id.as_ref() => {
                    wake = wake.min(*ask_at);
                    *due
                }
                _ => None,
            };
            match next(live, on_disk, t.retry_at, t.reload_at, ari, now) {
                Next::Wait(at) => {
                    wake = wake.min(at);
                    continue;
                }
                Next::Reload => {
                    // Not asked again before the reload had its chance.
                    t.reload_at = now + retry_secs;
                    wake = wake.min(t.reload_at);
                    tracing::info!(dir = %order.dir.display(), "ACME: the state directory holds a newer certificate than the one served; served after the next reload");
                    if unserved.is_empty() {
                        unserved_since = now;
                    }
                    unserved.push(order.dir.clone());
                    continue;
                }
                Next::Order => {}
            }
            if control.upgrade().is_none_or(|c| draining(&c)) {
                return;
            }
            let Some(rt) = runtime_for(&mut runtime) else {
                serve(control, &mut unserved);
                return;
            };
            // One ordering process per state directory: during a binary
            // upgrade the old and the new ktern both run this thread.
            let lock = match lock_state(&config.acme.state_dir) {
                Ok(Some(lock)) => lock,
                Ok(None) => {
                    tracing::info!(dir = %config.acme.state_dir.display(), "ACME: another ktern process is ordering (a binary upgrade?); looking again later");
                    t.retry_at = now + retry_secs;
                    wake = wake.min(t.retry_at);
                    continue;
                }
                Err(e) => {
                    wake = wake.min(failed(t, &e, &config.acme, &metrics, now));
                    continue;
                }
            };
            // The certificate this one replaces, told to a CA that gave
            // renewal information for it (RFC 9773 §5). Not after an
            // order naming it failed: the CA may refuse it (already
            // replaced, or it does not echo the field back), and the
            // retry orders without it.
            let replaces = held_id
                .clone()
                .filter(|_| !t.replaces_failed && matches!(t.ari, Ari::Known { due: Some(_), .. }));
            let obtained = match t.unkept.take().filter(|i| i.validity.1 > now) {
                Some(issued) => {
                    tracing::info!(domains = ?order.domains, dir = %order.dir.display(), "ACME: writing the certificate the CA issued again");
                    Ok(issued)
                }
                None => {
                    // The certificates obtained before this order (which
                    // may take up to ORDER_TIMEOUT) go live first, once
                    // they have waited RELOAD_EVERY.
                    now = crate::clock::unix_now();
                    if now - unserved_since >= RELOAD_EVERY && !serve(control, &mut unserved) {
                        return;
                    }
                    tracing::info!(domains = ?order.domains, directory = %order.directory, reason = if live.is_some() { "renewal due" } else { "no certificate from the CA yet" }, replaces = replaces.as_ref().map(|r| r.to_string()), "ACME: ordering a certificate");
                    guarded(rt, &metrics, async {
                        match tokio::time::timeout(
                            ORDER_TIMEOUT,
                            order::obtain(
                                &order,
                                &config.acme.state_dir,
                                &challenges,
                                replaces.clone(),
                            ),
                        )
                        .await
                        {
                            Ok(r) => r,
                            Err(_) => Err(AcmeError::Timeout(ORDER_TIMEOUT)),
                        }
                    })
                }
            };
            let result =
                obtained.and_then(|issued| match keep(&order.dir, &order.directory, &issued) {
                    Ok(()) => Ok(issued),
                    Err(e) => {
                        t.unkept = Some(issued);
                        Err(e)
                    }
                });
            drop(lock);
            now = crate::clock::unix_now();
            match result {
                Ok(issued) => {
                    M::inc(&metrics.acme_issued);
                    t.failures = 0;
                    t.replaces_failed = false;
                    t.retry_at = 0;
                    tracing::info!(domains = ?order.domains, dir = %order.dir.display(), not_after = issued.validity.1, "ACME: certificate obtained; served after the next reload");
                    t.reload_at = now + retry_secs;
                    wake = wake.min(t.reload_at);
                    if unserved.is_empty() {
                        unserved_since = now;
                    }
                    unserved.push(order.dir.clone());
                }
                Err(e) => {
                    // Only the CA's refusal says anything about `replaces`.
                    t.replaces_failed |= replaces.is_some() && t.unkept.is_none();
                    wake = wake.min(failed(t, &e, &config.acme, &metrics, now));
                }
            }
        }
        if !serve(control, &mut unserved) {
            return;
        }
        let wait = Duration::from_secs((wake - now).clamp(1, PERIOD) as u64);
        match nudged.recv_timeout(wait) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Serves the certificates of `unserved` (state directories) by one
/// reload, and empties it; a refused one is tried again by a later pass
/// (their tracks' `reload_at`). Nothing to do when it is empty. `false`:
/// the process is gone or draining (a draining process serves nothing
/// new; the next one reads the state directory).
fn serve(control: &Weak<Control>, unserved: &mut Vec<PathBuf>) -> bool {
    if unserved.is_empty() {
        return true;
    }
    let Some(c) = control.upgrade() else {
        return false;
    };
    if draining(&c) {
        return false;
    }
    let dirs = std::mem::take(unserved);
    match c.reload() {
        Ok(_) => {
            tracing::info!(certificates = dirs.len(), dirs = ?dirs, "ACME: reloaded to serve the new certificates");
        }
        Err(e) => {
            tracing::error!(error = %e, dirs = ?dirs, "ACME: new certificates are on disk but the reload to serve them was refused; retrying");
        }
    }
    true
}

/// `fut` run to its end on `rt`. A panic in it (a dependency's, on what a
/// CA answered) is an error of this one order, counted as ktern's own:
/// caught only around the whole thread ([`supervised`]), the same answer
/// would end every pass at the same order, and no order listed after it
/// would ever be renewed.
fn guarded<T>(
    rt: &tokio::runtime::Runtime,
    metrics: &M,
    fut: impl std::future::Future<Output = Result<T, AcmeError>>,
) -> Result<T, AcmeError> {
    use futures_util::FutureExt as _;
    match rt.block_on(std::panic::AssertUnwindSafe(fut).catch_unwind()) {
        Ok(result) => result,
        Err(panic) => {
            M::inc(&metrics.internal_errors);
            Err(AcmeError::Panicked(panic_message(&*panic)))
        }
    }
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// A draining process (a stop signal, or its sockets handed to a new
/// binary) orders nothing more: it may no longer answer the CA's
/// validation on the listeners (a failure that counts against the CA's
/// limits), it would hold the state directory's lock the new process
/// needs, and a certificate it obtained would reload a process on its way
/// out. An order already under way runs to its end.
fn draining(c: &Control) -> bool {
    let draining = c.status.draining.load(std::sync::atomic::Ordering::Relaxed);
    if draining {
        tracing::info!(
            "ACME: this process drains: it orders no more certificates (the next process does)"
        );
    }
    draining
}

/// The ACME thread's runtime, made on first need: a config without ACME
/// never starts one. `None` (logged) if it cannot be made.
fn runtime_for(
    runtime: &mut Option<tokio::runtime::Runtime>,
) -> Option<&mut tokio::runtime::Runtime> {
    if runtime.is_none() {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => *runtime = Some(rt),
            Err(e) => {
                tracing::error!(error = %e, "internal: cannot start the ACME thread's runtime; ACME certificates will not be obtained");
                return None;
            }
        }
    }
    runtime.as_mut()
}

/// Counts and logs a failed order and schedules its retry: `acme.retry`
/// doubled per failure up to `acme.retry_max`, jittered. Returns the
/// retry time.
fn failed(t: &mut Track, e: &AcmeError, acme: &AcmeSettings, metrics: &M, now: i64) -> i64 {
    M::inc(&metrics.acme_failures);
    t.failures += 1;
    let delay = backoff(t.failures, acme.retry, acme.retry_max, jitter());
    t.retry_at = now + delay.as_secs().max(1) as i64;
    tracing::error!(domains = ?t.order.domains, directory = %t.order.directory, error = %chain(e), failures = t.failures, retry_in = ?delay, "ACME: order failed; the current certificate keeps serving");
    t.retry_at
}

/// Takes the state directory's lock (`.lock`, created with the
/// directory): `None` when another process holds it.
fn lock_state(state_dir: &Path) -> Result<Option<std::fs::File>, AcmeError> {
    let state = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AcmeError::State { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(state(state_dir))?;
    let path = state_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(state(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(state(&path)(e)),
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

/// Keeps a certificate and its key as one version: both files, and the
/// directory URL that issued them (`ACME_ISSUED_BY`), go into a new
/// directory `dir/v<notBefore>-<pid>[-n]`, then the symlink `dir/current`
/// is swapped to it by a rename. A reader (the config load) resolves the
/// link once and reads both files from the same version, so no crash or
/// concurrent reload ever sees a key with another version's chain. The
/// version it replaced stays (a load that resolved the link just before
/// still finds its files); older ones are removed. A name already taken
/// (two certificates with one notBefore, as CAs that start the validity
/// at midnight give; or what a failed write left) gets a suffix: an
/// existing version may be the one served.
fn keep(dir: &Path, directory: &str, issued: &Issued) -> Result<(), AcmeError> {
    use std::os::unix::fs::DirBuilderExt;
    let state = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AcmeError::State { path, source }
    };
    std::fs::create_dir_all(dir).map_err(state(dir))?;
    let base = format!("v{}-{}", issued.validity.0, std::process::id());
    let mut n = 0;
    let (name, version) = loop {
        let name = match n {
            0 => base.clone(),
            _ => format!("{base}-{n}"),
        };
        let version = dir.join(&name);
        match std::fs::DirBuilder::new().mode(0o700).create(&version) {
            Ok(()) => break (name, version),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(state(&version)(e)),
        }
    };
    write_atomic(&version.join("key.pem"), issued.key_pem.as_bytes(), 0o600)?;
    write_atomic(
        &version.join(crate::config::ACME_ISSUED_BY),
        directory.as_bytes(),
        0o644,
    )?;
    write_atomic(
        &version.join("cert.pem"),
        issued.chain_pem.as_bytes(),
        0o644,
    )?;
    let current = dir.join(crate::config::ACME_CURRENT);
    let previous = std::fs::read_link(&current).ok();
    let link = dir.join(format!(".current.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&name, &link).map_err(state(&link))?;
    std::fs::rename(&link, &current).map_err(state(&current))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(state(dir))?;
    // Versions older than the one just replaced.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name();
            let keep = n == std::ffi::OsStr::new(&name)
                || previous.as_deref() == Some(Path::new(&n))
                || !n.to_string_lossy().starts_with('v');
            if !keep && e.path().is_dir() {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(dir = %e.path().display(), error = %err, "ACME: cannot remove an old certificate version");
                }
            }
        }
    }
    Ok(())
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
        let almost = backoff(1, base, max, 0.999_999);
        assert!(
            almost > Duration::from_millis(59_999) && almost < base,
            "{almost:?}"
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
    fn the_next_step_weighs_the_served_and_the_kept_certificate() {
        let now = 1_000;
        // Nothing anywhere: order now (unless a retry waits).
        assert_eq!(next(None, None, 0, 0, None, now), Next::Order);
        assert_eq!(next(None, None, 1_500, 0, None, now), Next::Wait(1_500));
        // Served and fresh: wait for two thirds of its life.
        assert_eq!(
            next(Some((900, 1_200)), None, 0, 0, None, now),
            Next::Wait(1_100)
        );
        // Served, due: order.
        assert_eq!(next(Some((0, 1_200)), None, 0, 0, None, now), Next::Order);
        // Newer on disk than served (a refused reload, another process):
        // reload, not order; and not before the reload retry time.
        assert_eq!(
            next(Some((0, 1_200)), Some((900, 1_500)), 0, 0, None, now),
            Next::Reload
        );
        assert_eq!(
            next(None, Some((900, 1_500)), 0, 0, None, now),
            Next::Reload
        );
        assert_eq!(
            next(Some((0, 1_200)), Some((900, 1_500)), 0, 1_010, None, now),
            Next::Wait(1_010)
        );
        // The same on disk as served: nothing to reload.
        assert_eq!(
            next(Some((900, 1_500)), Some((900, 1_500)), 0, 0, None, now),
            Next::Wait(1_300)
        );
        // The CA's renewal information moves renewal sooner, never later
        // than two thirds of the lifetime; a retry still waits.
        assert_eq!(
            next(Some((900, 1_200)), None, 0, 0, Some(1_050), now),
            Next::Wait(1_050)
        );
        assert_eq!(
            next(Some((900, 1_200)), None, 0, 0, Some(990), now),
            Next::Order
        );
        assert_eq!(
            next(Some((900, 1_200)), None, 0, 0, Some(5_000), now),
            Next::Wait(1_100)
        );
        assert_eq!(
            next(Some((900, 1_200)), None, 1_020, 0, Some(990), now),
            Next::Wait(1_020)
        );
    }

    #[test]
    fn renewal_information_picks_a_time_in_its_window() {
        assert_eq!(ari_due(1_000, 2_000, 0.0), 1_000);
        assert_eq!(ari_due(1_000, 2_000, 0.5), 1_500);
        assert!(ari_due(1_000, 2_000, 0.999_999) < 2_000);
        // An empty or inverted window: its start.
        assert_eq!(ari_due(1_000, 1_000, 0.7), 1_000);
        assert_eq!(ari_due(1_000, 900, 0.7), 1_000);
        // Retry-After is bounded: not sooner than acme.retry, not later
        // than six hours.
        assert_eq!(ask_again(Duration::from_secs(0), 60), 60);
        assert_eq!(ask_again(Duration::from_secs(600), 60), 600);
        assert_eq!(ask_again(Duration::from_secs(86_400 * 7), 60), 6 * 3600);
        // An acme.retry above six hours (allowed: up to retry_max): six
        // hours, where the crossed bounds panicked; and a Retry-After past
        // i64 seconds.
        assert_eq!(ask_again(Duration::from_secs(60), 7 * 3600), 6 * 3600);
        assert_eq!(ask_again(Duration::MAX, 60), 6 * 3600);
    }

    #[test]
    fn renewal_information_that_fails_is_asked_for_less_and_less_often() {
        let acme = AcmeSettings {
            state_dir: PathBuf::new(),
            retry: Duration::from_secs(600),
            retry_max: Duration::from_secs(86_400),
        };
        // Jitter 1.0: the whole delay. Doubled per failure from
        // acme.retry, where it stayed at 600 s before.
        let delays: Vec<i64> = (1..=8).map(|n| ari_retry(n, &acme, 1.0)).collect();
        assert_eq!(
            delays,
            [600, 1200, 2400, 4800, 9600, 19_200, 21_600, 21_600],
            "at most six hours, below retry_max"
        );
        // Jittered between half and all of it, as an order's retry.
        assert_eq!(ari_retry(1, &acme, 0.0), 300);
    }

    #[test]
    fn a_panicking_pass_is_run_again_until_it_returns() {
        let mut passes = 0;
        let mut pauses = 0;
        let panics = supervised(
            || {
                passes += 1;
                if passes < 3 {
                    panic!("pass {passes}");
                }
            },
            || {
                pauses += 1;
                true
            },
        );
        assert_eq!((panics, passes, pauses), (2, 3, 2));
        // Told to stop (the process drains): no pass more.
        let mut passes = 0;
        let panics = supervised(
            || {
                passes += 1;
                panic!("always");
            },
            || false,
        );
        assert_eq!((panics, passes), (1, 1));
    }

    #[test]
    fn versions_are_swapped_by_one_link_and_old_ones_pruned() {
        let dir = std::env::temp_dir().join(format!("ktern-acme-keep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let now = crate::clock::unix_now();
        let (mut names, mut leaves) = (Vec::new(), Vec::new());
        let pid = std::process::id();
        // The last two share a notBefore (a CA that starts validity at
        // midnight, and a second order that day): the second gets its own
        // version, and the one it replaced stays.
        for (i, not_before, name) in [
            (0, 0, format!("v0-{pid}")),
            (1, 1, format!("v1-{pid}")),
            (2, 1, format!("v1-{pid}-1")),
        ] {
            let (chain_pem, key_pem) = crate::builtin::self_signed(&["a.example"]).unwrap();
            let issued = Issued {
                chain_pem,
                key_pem,
                validity: (not_before, now + 100),
            };
            keep(&dir, "https://ca.test/dir", &issued).unwrap();
            names.push(name);
            let held = crate::config::held_certificate(&dir, now)
                .unwrap()
                .expect("served");
            assert_eq!(held.issued_by.as_deref(), Some("https://ca.test/dir"));
            leaves.push(held.certificate.key.cert[0].clone());
            assert!(held
                .certificate
                .info
                .cert_file
                .ends_with(&format!("{}/cert.pem", names[i])));
        }
        assert_ne!(leaves[1], leaves[2]);
        // The current version and the one it replaced; the oldest is gone.
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec!["current".to_string(), names[1].clone(), names[2].clone()]
        );
        // A version whose certificate file holds no certificate (emptied,
        // half restored) is an error naming the file, not a crash.
        std::fs::write(dir.join(&names[2]).join("cert.pem"), "").unwrap();
        let why = crate::config::held_certificate(&dir, now).err().unwrap();
        assert!(
            why.contains("cert.pem") && why.contains("none in it"),
            "{why}"
        );
        std::fs::remove_dir_all(dir).unwrap();
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
