//! Binary upgrade: a new ktern takes the running one's listening sockets
//! over a unix socket (`SCM_RIGHTS`, as HAProxy's `-x` and Envoy's hot
//! restart do), so not one connection attempt fails: both processes accept
//! from the same kernel sockets until the old one has stopped.
//!
//! The old process serves `runtime.upgrade_socket` (mode 0600). The new one
//! (`ktern run --upgrade-from PATH`) connects and sends `FDS`; the old
//! answers with one JSON line describing its sockets; the new one says
//! `SEND` (so the line was read without buffering past it: a plain read of
//! a byte that carries fds would close them) and the old one sends the fds
//! in batches (each message one byte of payload plus up to 250 fds). The new
//! process starts its shards on those sockets (a listener whose configured
//! address and kind match keeps its socket; others are bound fresh) and
//! sends `DRAIN`: the old process stops accepting at once (no drain delay: the sockets stay open in the new
//! process, so nothing queued is lost), answers `OK <pid>`, then drains
//! its open connections as on SIGTERM and exits. Only then does the new
//! process put its own upgrade socket at the path (see [`Listening`]).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sys;

/// A listening socket set handed from one process to the next.
#[derive(Debug, Serialize, Deserialize)]
pub struct SocketMeta {
    /// The address as configured (port 0 stays 0).
    pub configured: SocketAddr,
    /// A plain-HTTP redirect listener.
    pub redirect: bool,
    /// Its listen(2) backlog.
    pub backlog: u32,
    /// The bound address.
    pub addr: SocketAddr,
    /// How many fds (one per shard of the old process).
    pub fds: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    pid: u32,
    sockets: Vec<SocketMeta>,
    /// The admin endpoint's listener comes last, if there is one.
    admin: Option<SocketAddr>,
}

/// What a new process received.
pub struct Inherited {
    /// The old process's pid.
    pub pid: u32,
    /// Each socket set with its fds.
    pub sockets: Vec<(SocketMeta, Vec<std::net::TcpListener>)>,
    /// The admin endpoint's listener.
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    conn: UnixStream,
}

/// Reads one line a byte at a time, so that nothing after it (fds ride on
/// the bytes that follow) is consumed by a plain read. A signal (a
/// logrotate's SIGHUP, a stop signal that aborts the upgrade once the
/// process has started) interrupts a read with a timeout however its
/// handler was installed (signal(7)): the read goes on.
fn read_line_unbuffered(stream: &UnixStream) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1 << 20 {
        match (&*stream).read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    String::from_utf8(line).map_err(std::io::Error::other)
}

/// Why an upgrade could not go on.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The socket could not be reached or broke.
    #[error("upgrade socket {path}: {source}")]
    Io {
        /// The unix socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The old process answered something else.
    #[error("upgrade socket {path}: unexpected answer: {what}")]
    Protocol {
        /// The unix socket.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> UpgradeError + '_ {
    move |source| UpgradeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// New process: asks the old one at `path` for its sockets.
pub fn take_over(path: &Path) -> Result<Inherited, UpgradeError> {
    let protocol = |what: String| UpgradeError::Protocol {
        path: path.to_path_buf(),
        what,
    };
    let stream = UnixStream::connect(path).map_err(io_err(path))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err(path))?;
    (&stream).write_all(b"FDS\n").map_err(io_err(path))?;
    let line = read_line_unbuffered(&stream).map_err(io_err(path))?;
    let offer: Offer =
        serde_json::from_str(&line).map_err(|e| protocol(format!("{e}: {line:?}")))?;
    (&stream).write_all(b"SEND\n").map_err(io_err(path))?;
    let want =
        offer.sockets.iter().map(|s| s.fds).sum::<usize>() + usize::from(offer.admin.is_some());
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(want);
    while fds.len() < want {
        let mut byte = [0u8; 1];
        let (n, got) = match sys::recv_fds(stream.as_fd(), &mut byte, want - fds.len()) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.map_err(io_err(path))?,
        };
        if n == 0 {
            return Err(protocol(format!(
                "closed after {} of {want} fds",
                fds.len()
            )));
        }
        fds.extend(got);
    }
    let mut fds = fds.into_iter();
    let mut sockets = Vec::new();
    for meta in offer.sockets {
        let set: Vec<std::net::TcpListener> = fds
            .by_ref()
            .take(meta.fds)
            .map(std::net::TcpListener::from)
            .collect();
        // Accepted connections inherit Nagle's flag from their listener
        // (`shard::no_nagle`); an older ktern's listeners lack it.
        for l in &set {
            if let Err(e) = crate::shard::no_nagle(l) {
                tracing::warn!(addr = %meta.addr, error = %e, "upgrade: cannot set TCP_NODELAY on an inherited listener");
            }
        }
        sockets.push((meta, set));
    }
    let admin = offer
        .admin
        .and_then(|a| fds.next().map(|fd| (a, std::net::TcpListener::from(fd))));
    Ok(Inherited {
        pid: offer.pid,
        sockets,
        admin,
        conn: stream,
    })
}

impl Inherited {
    /// Tells the old process to stop accepting and drain; returns once it
    /// has stopped accepting (its answer), with its pid.
    pub fn release(self, path: &Path) -> Result<u32, UpgradeError> {
        (&self.conn).write_all(b"DRAIN\n").map_err(io_err(path))?;
        let line = read_line_unbuffered(&self.conn).map_err(io_err(path))?;
        match line.trim().strip_prefix("OK ") {
            Some(pid) if pid.parse() == Ok(self.pid) => Ok(self.pid),
            _ => Err(UpgradeError::Protocol {
                path: path.to_path_buf(),
                what: format!("{line:?} to DRAIN"),
            }),
        }
    }
}

/// What the old process offers and does, given by the control side.
pub trait Offerer: Send + Sync + 'static {
    /// Every listening socket set (meta and a borrowed fd per shard).
    fn sockets(&self) -> Vec<(SocketMeta, Vec<std::net::TcpListener>)>;
    /// The admin endpoint's listener, if any.
    fn admin(&self) -> Option<(SocketAddr, std::net::TcpListener)>;
    /// Stop accepting now (returns when no shard accepts any more), then
    /// drain in the background and exit.
    fn hand_over(&self);
}

/// The upgrade socket, bound under a private name until [`Listening::serve`]
/// puts it at its path. A new process binds it before it starts anything
/// (a failure then changes nothing) and publishes it only once the old
/// process has answered `DRAIN`: if the upgrade fails before that, the
/// path still reaches the old process, which can be upgraded again.
pub struct Listening {
    listener: UnixListener,
    /// A 0700 directory of ours holding the socket until it is published,
    /// so nobody can connect to it or swap it meanwhile.
    dir: PathBuf,
    tmp: PathBuf,
    path: PathBuf,
}

/// Binds the upgrade socket for `path` (mode 0600), not yet reachable there.
pub fn bind(path: &Path) -> std::io::Result<Listening> {
    use std::os::unix::fs::DirBuilderExt as _;
    let parent = path.parent().unwrap_or(Path::new("."));
    let dir = parent.join(format!(".ktern-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let tmp = dir.join("upgrade.sock");
    let bound = UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map(|()| l)
    });
    match bound {
        Ok(listener) => Ok(Listening {
            listener,
            dir,
            tmp,
            path: path.to_path_buf(),
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

impl Listening {
    /// Puts the socket at its path (an atomic rename over whatever is
    /// there) and serves it on a `ktern-upgrade` thread.
    pub fn serve(self, offerer: std::sync::Arc<dyn Offerer>) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        let (listener, path) = (self.listener.try_clone()?, self.path.clone());
        drop(self);
        std::thread::Builder::new()
            .name("ktern-upgrade".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    match offer(conn, &*offerer) {
                        Ok(true) => return,
                        Ok(false) => {}
                        Err(e) => tracing::warn!(path = %path.display(), error = %e, "upgrade: a new process failed to take over"),
                    }
                }
            })?;
        Ok(())
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        // Never published (a failed start): leave nothing behind.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One new process: `Ok(true)` once it took over (this process drains).
fn offer(conn: UnixStream, offerer: &dyn Offerer) -> std::io::Result<bool> {
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim() != "FDS" {
        return Err(std::io::Error::other(format!(
            "unexpected request {line:?}"
        )));
    }
    let sockets = offerer.sockets();
    let admin = offerer.admin();
    let offer = Offer {
        pid: std::process::id(),
        sockets: sockets
            .iter()
            .map(|(m, fds)| SocketMeta {
                configured: m.configured,
                redirect: m.redirect,
                backlog: m.backlog,
                addr: m.addr,
                fds: fds.len(),
            })
            .collect(),
        admin: admin.as_ref().map(|(a, _)| *a),
    };
    let mut text = serde_json::to_string(&offer).map_err(std::io::Error::other)?;
    text.push('\n');
    (&conn).write_all(text.as_bytes())?;
    line.clear();
    reader.read_line(&mut line)?;
    if line.trim() != "SEND" {
        return Err(std::io::Error::other(format!(
            "unexpected request {line:?}"
        )));
    }
    let all: Vec<_> = sockets
        .iter()
        .flat_map(|(_, fds)| fds.iter().map(|f| f.as_fd()))
        .chain(admin.as_ref().map(|(_, l)| l.as_fd()))
        .collect();
    for batch in all.chunks(sys::MAX_FDS_PER_MESSAGE) {
        sys::send_fds(conn.as_fd(), b"F", batch)?;
    }
    tracing::info!(
        sockets = all.len(),
        "upgrade: listening sockets sent to a new process"
    );
    line.clear();
    if reader.read_line(&mut line)? == 0 {
        // The new process gave up before taking over: keep serving.
        tracing::warn!("upgrade: the new process went away before taking over");
        return Ok(false);
    }
    if line.trim() != "DRAIN" {
        return Err(std::io::Error::other(format!(
            "unexpected request {line:?}"
        )));
    }
    offerer.hand_over();
    // Draining now, whether or not the answer arrives: offer nothing more.
    if let Err(e) = (&conn).write_all(format!("OK {}\n", std::process::id()).as_bytes()) {
        tracing::warn!(error = %e, "upgrade: cannot confirm the hand-over (draining anyway)");
    }
    Ok(true)
}
