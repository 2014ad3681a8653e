//! systemd's notify protocol (`sd_notify(3)`, `Type=notify` and
//! `Type=notify-reload`): datagrams of `KEY=VALUE` lines to the unix socket
//! named by `NOTIFY_SOCKET`. A leading `@` names an abstract socket. Without
//! the variable every call is a no-op, so ktern runs the same outside
//! systemd. A few lines rather than a crate: the protocol is one `sendto`.

use std::os::unix::net::UnixDatagram;

/// Where notifications go, if anywhere.
pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`; a bad value is logged and ignored.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = address(path.as_encoded_bytes());
            match (UnixDatagram::unbound(), addr) {
                (Ok(sock), Ok(addr)) => Some((sock, addr)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "NOTIFY_SOCKET unusable: no systemd notifications");
                    None
                }
            }
        });
        Notifier { target }
    }

    /// Sends one notification (`READY=1`, `STOPPING=1`, …). Failures are
    /// logged: systemd may have gone away, ktern keeps serving.
    pub fn send(&self, state: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                tracing::warn!(error = %e, state, "systemd notification failed");
            }
        }
    }

    /// `READY=1` with our pid.
    pub fn ready(&self, generation: u64) {
        self.send(&format!(
            "READY=1\nMAINPID={}\nSTATUS=serving, config generation {generation}",
            std::process::id()
        ));
    }

    /// `RELOADING=1`, with the monotonic time `Type=notify-reload` wants.
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::sys::monotonic_usec()
        ));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining");
    }
}

fn address(path: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt as _;
    match path.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path)),
    }
}

use std::os::unix::ffi::OsStrExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("ktern-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                address(path.as_os_str().as_encoded_bytes()).unwrap(),
            )),
        };
        n.ready(3);
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.starts_with("READY=1\nMAINPID="), "{text}");
        assert!(text.contains("generation 3"), "{text}");
        n.reloading();
        let len = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
        let usec: u64 = text.rsplit('=').next().unwrap().parse().unwrap();
        assert!(usec > 0);

        let name = format!("ktern-notify-test-{}", std::process::id());
        let abs = address(format!("@{name}").as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&abs).unwrap();
        let n = Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), abs)),
        };
        n.stopping();
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=draining");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn no_socket_no_op() {
        Notifier { target: None }.ready(1);
    }
}
