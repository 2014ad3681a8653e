//! Certificate expiry warnings. Each certificate the current config serves
//! is logged once as it comes within 30, 7 and 1 days of its notAfter, and
//! once more when it has expired, by a control thread that looks at start,
//! after every reload, and every hour.
//! Alerting should use the gauge `ktern_certificate_expiry_timestamp_seconds`;
//! the log line is for operators who read logs.

use std::collections::HashMap;
use std::sync::{mpsc, Weak};
use std::time::Duration;

use super::Control;
use crate::config::Config;

/// Days before notAfter at which a warning is logged, widest first.
pub const WARN_DAYS: [i64; 3] = [30, 7, 1];

const DAY: i64 = 86_400;

/// How often the thread looks.
const PERIOD: Duration = Duration::from_secs(3600);

/// The warning stage a certificate is in at `now`: the narrowest of
/// [`WARN_DAYS`] it is within, `Some(0)` once expired, `None` while it has
/// more than 30 days left.
pub fn stage(not_after: i64, now: i64) -> Option<i64> {
    let left = not_after - now;
    if left <= 0 {
        return Some(0);
    }
    WARN_DAYS.iter().rev().copied().find(|d| left <= d * DAY)
}

/// The stage each certificate (by listener and SHA-256) was last warned
/// at, so a line is logged once per stage, not once per look.
#[derive(Debug, Default)]
pub struct Warned(HashMap<String, i64>);

impl Warned {
    /// The stage to warn about now, if it is new for this key.
    pub fn due(&mut self, key: &str, not_after: i64, now: i64) -> Option<i64> {
        let st = stage(not_after, now)?;
        match self.0.get(key) {
            Some(&prev) if prev <= st => None,
            _ => {
                self.0.insert(key.to_string(), st);
                Some(st)
            }
        }
    }
}

/// Logs what is due for every certificate of `config`, and forgets the
/// certificates it no longer has.
pub fn check(config: &Config, now: i64, warned: &mut Warned) {
    let mut seen = std::collections::HashSet::new();
    for l in &config.listeners {
        for c in &l.certificates {
            let key = format!("{} {}", l.name, c.info.sha256);
            if let Some(until) = c.info.ocsp_until {
                // Stale from its nextUpdate: the store stops stapling it.
                let ocsp = format!("ocsp {key}");
                if now >= until && warned.0.insert(ocsp.clone(), 0).is_none() {
                    tracing::warn!(
                        listener = %l.name, cert_file = %c.info.cert_file,
                        ocsp = c.info.ocsp_file.as_deref().unwrap_or("-"),
                        "OCSP response went stale (nextUpdate passed): no longer stapled; fetch a fresh one and reload"
                    );
                }
                seen.insert(ocsp);
            }
            let due = warned.due(&key, c.info.not_after, now);
            seen.insert(key);
            let Some(st) = due else {
                continue;
            };
            // An ACME certificate is renewed with a third of its life left
            // (30 days of 90; 2 of 6 for short-lived ones): only a renewal
            // that is overdue is news.
            let renewal = super::acme::renew_at(Some((c.info.not_before, c.info.not_after)), now);
            if c.acme.is_some() && now < renewal {
                continue;
            }
            let days_left = (c.info.not_after - now).div_euclid(DAY);
            if st == 0 {
                tracing::error!(
                    listener = %l.name, cert_file = %c.info.cert_file, subject = %c.info.subject,
                    not_after = c.info.not_after,
                    "certificate has expired: clients that check dates refuse it"
                );
            } else {
                tracing::warn!(
                    listener = %l.name, cert_file = %c.info.cert_file, subject = %c.info.subject,
                    not_after = c.info.not_after, days_left,
                    "certificate expires within {st} day(s)"
                );
            }
        }
    }
    warned.0.retain(|k, _| seen.contains(k));
}

/// Starts the look: now, on each message on `nudge` (a reload went
/// live), and hourly; the thread ends with the process's control.
pub fn spawn(control: Weak<Control>, nudge: mpsc::Receiver<()>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ktern-cert-expiry".into())
        .spawn(move || {
            let mut warned = Warned::default();
            while let Some(c) = control.upgrade() {
                check(&c.current().config, crate::clock::unix_now(), &mut warned);
                drop(c);
                if let Err(mpsc::RecvTimeoutError::Disconnected) = nudge.recv_timeout(PERIOD) {
                    return;
                }
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_logged_once_each_narrowest_first() {
        let now = 1_000_000_000;
        assert_eq!(stage(now + 31 * DAY, now), None);
        assert_eq!(stage(now + 30 * DAY, now), Some(30));
        assert_eq!(stage(now + 8 * DAY, now), Some(30));
        assert_eq!(stage(now + 7 * DAY, now), Some(7));
        assert_eq!(stage(now + DAY, now), Some(1));
        assert_eq!(stage(now, now), Some(0));
        let mut w = Warned::default();
        let na = now + 10 * DAY;
        assert_eq!(w.due("a", na, now), Some(30));
        assert_eq!(w.due("a", na, now + DAY), None);
        assert_eq!(w.due("a", na, now + 3 * DAY), Some(7));
        // A look that skipped a stage warns the narrowest one only.
        assert_eq!(w.due("a", na, now + 10 * DAY + 1), Some(0));
        assert_eq!(w.due("a", na, now + 11 * DAY), None);
        // A certificate first seen close to expiry.
        assert_eq!(w.due("b", now + DAY / 2, now), Some(1));
        assert_eq!(w.due("c", now + 60 * DAY, now), None);
    }
}
