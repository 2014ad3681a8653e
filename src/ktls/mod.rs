//! After the handshake: decide where record crypto happens, hand the keys to
//! the kernel (kTLS) when it can do the negotiated cipher, and give the proxy
//! stage one stream interface either way ([`stream::TlsReader`] /
//! [`stream::TlsWriter`]).
//!
//! The proxy stage owns what happens to the plaintext next.

use std::io;
use std::os::fd::AsFd;

use rustls::{CipherSuite, SupportedCipherSuite};

use crate::config::KtlsMode;
use crate::handshake::Established;
use crate::sys::{self, KeyDirection};

mod kernel;
pub mod record;
pub mod stream;
mod user;

pub use stream::{SendfileError, StreamError, TlsConn, TlsReader, TlsWriter};

/// The ciphers kTLS handles, as the kernel names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelCipher {
    /// TLS_CIPHER_AES_GCM_128.
    AesGcm128,
    /// TLS_CIPHER_AES_GCM_256.
    AesGcm256,
    /// TLS_CIPHER_CHACHA20_POLY1305 (Linux 5.11+).
    Chacha20Poly1305,
}

impl KernelCipher {
    const ALL: [KernelCipher; 3] = [
        KernelCipher::AesGcm128,
        KernelCipher::AesGcm256,
        KernelCipher::Chacha20Poly1305,
    ];

    /// The kernel cipher a rustls suite uses, if kTLS has one.
    pub fn of(suite: SupportedCipherSuite) -> Option<KernelCipher> {
        use CipherSuite::*;
        Some(match suite.suite() {
            TLS13_AES_128_GCM_SHA256
            | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => KernelCipher::AesGcm128,
            TLS13_AES_256_GCM_SHA384
            | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => KernelCipher::AesGcm256,
            TLS13_CHACHA20_POLY1305_SHA256
            | TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => KernelCipher::Chacha20Poly1305,
            _ => return None,
        })
    }
}

/// What this kernel's kTLS can do, found once at start by [`probe`].
#[derive(Debug, Clone, Default)]
pub struct Support {
    /// `TCP_ULP "tls"` attaches (CONFIG_TLS present, module loaded).
    pub ulp: bool,
    /// (TLS 1.3?, cipher) pairs whose TX and RX keys the kernel accepted.
    pub ciphers: Vec<(bool, KernelCipher)>,
    /// TLS 1.3 keys can be replaced after a KeyUpdate (Linux 6.13+; older
    /// kernels answer EBUSY on a second `TLS_RX`/`TLS_TX`).
    pub rekey: bool,
    /// Why the ULP probe failed, for the log.
    pub ulp_error: Option<String>,
}

impl Support {
    /// kTLS can carry a connection that negotiated `suite` (TLS 1.2 or 1.3).
    pub fn covers(&self, suite: SupportedCipherSuite) -> bool {
        let tls13 = matches!(suite, SupportedCipherSuite::Tls13(_));
        KernelCipher::of(suite).is_some_and(|c| self.ciphers.contains(&(tls13, c)))
    }

    /// The names of the `suites` kTLS cannot carry here.
    pub fn uncovered(&self, suites: &[SupportedCipherSuite]) -> Vec<&'static str> {
        suites
            .iter()
            .filter(|s| !self.covers(**s))
            .filter_map(|s| s.suite().as_str())
            .collect()
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        if !self.ulp {
            return format!(
                "kTLS unavailable ({})",
                self.ulp_error.as_deref().unwrap_or("TCP_ULP tls refused")
            );
        }
        let list: Vec<String> = self
            .ciphers
            .iter()
            .map(|(t13, c)| format!("{}:{c:?}", if *t13 { "1.3" } else { "1.2" }))
            .collect();
        format!("kTLS available: {} rekey={}", list.join(","), self.rekey)
    }
}

/// Probes kTLS on loopback sockets: attaches the ULP, then installs all-zero
/// TX and RX keys of each cipher for TLS 1.2 and 1.3, and tries a second TLS
/// 1.3 TX key to learn whether rekey works. Blocking; run once at start.
pub fn probe() -> Support {
    let mut support = Support::default();
    for tls13 in [true, false] {
        for cipher in KernelCipher::ALL {
            match probe_one(tls13, cipher) {
                Ok(rekey) => {
                    support.ulp = true;
                    support.ciphers.push((tls13, cipher));
                    if tls13 && cipher == KernelCipher::AesGcm128 {
                        support.rekey = rekey;
                    }
                }
                Err(ProbeError::Ulp(e)) => {
                    support.ulp_error = Some(format!("setsockopt(TCP_ULP, \"tls\"): {e}"));
                    return support;
                }
                Err(ProbeError::Cipher(_)) => {}
            }
        }
    }
    support
}

enum ProbeError {
    Ulp(io::Error),
    Cipher(#[allow(dead_code)] io::Error),
}

fn probe_one(tls13: bool, cipher: KernelCipher) -> Result<bool, ProbeError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(ProbeError::Ulp)?;
    let client = std::net::TcpStream::connect(listener.local_addr().map_err(ProbeError::Ulp)?)
        .map_err(ProbeError::Ulp)?;
    let (_server, _) = listener.accept().map_err(ProbeError::Ulp)?;
    sys::set_ulp_tls(client.as_fd()).map_err(ProbeError::Ulp)?;
    let info = zero_crypto_info(tls13, cipher);
    sys::set_crypto_info(client.as_fd(), KeyDirection::Transmit, &info)
        .map_err(ProbeError::Cipher)?;
    sys::set_crypto_info(client.as_fd(), KeyDirection::Receive, &info)
        .map_err(ProbeError::Cipher)?;
    Ok(tls13 && sys::set_crypto_info(client.as_fd(), KeyDirection::Transmit, &info).is_ok())
}

fn zero_crypto_info(tls13: bool, cipher: KernelCipher) -> ktls::CryptoInfo {
    use ktls_sys::bindings as k;
    let info = |cipher_type: u32| k::tls_crypto_info {
        version: if tls13 { 0x0304 } else { 0x0303 },
        cipher_type: cipher_type as u16,
    };
    match cipher {
        KernelCipher::AesGcm128 => ktls::CryptoInfo::AesGcm128(k::tls12_crypto_info_aes_gcm_128 {
            info: info(k::TLS_CIPHER_AES_GCM_128),
            iv: [0; 8],
            key: [0; 16],
            salt: [0; 4],
            rec_seq: [0; 8],
        }),
        KernelCipher::AesGcm256 => ktls::CryptoInfo::AesGcm256(k::tls12_crypto_info_aes_gcm_256 {
            info: info(k::TLS_CIPHER_AES_GCM_256),
            iv: [0; 8],
            key: [0; 32],
            salt: [0; 4],
            rec_seq: [0; 8],
        }),
        KernelCipher::Chacha20Poly1305 => {
            ktls::CryptoInfo::Chacha20Poly1305(k::tls12_crypto_info_chacha20_poly1305 {
                info: info(k::TLS_CIPHER_CHACHA20_POLY1305),
                iv: [0; 12],
                key: [0; 32],
                salt: k::__IncompleteArrayField::new(),
                rec_seq: [0; 8],
            })
        }
    }
}

/// Why a completed handshake could not become a stream.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// rustls refused to export the secrets (internal: config or state bug).
    #[error("rustls would not hand over the session keys: {0}")]
    Extract(rustls::Error),
    /// The kernel refused the ULP or a key (internal: probe said it would work).
    #[error("kernel refused the kTLS {0}: {1}")]
    Kernel(&'static str, io::Error),
    /// The socket could not be made non-blocking (internal).
    #[error("socket setup failed: {0}")]
    Io(#[from] io::Error),
    /// Records sealed by rustls still wait to go out, so the kernel cannot
    /// take the keys (internal: the driver sends them first).
    #[error("handshake records still unsent")]
    Unsent,
    /// The client sent a KeyUpdate with its Finished, on a connection
    /// whose keys go to the kernel at the handshake: rustls holds the reply
    /// until it seals a record, and the kernel could not send it (the
    /// client's doing, not ktern's: [`crate::handshake::AfterFinished::owed`]).
    #[error("a KeyUpdate came with the client's Finished; its reply cannot reach the kernel")]
    ReplyOwed,
}

/// Where a connection's records are sealed and opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The kernel (kTLS): plain reads, writes and splice on the socket.
    Kernel,
    /// rustls in userspace.
    Userspace,
}

/// The kernel takes a connection's records: kTLS is not off and this
/// kernel can carry the negotiated suite.
pub fn kernel_carries(
    mode: KtlsMode,
    suite: Option<SupportedCipherSuite>,
    support: &Support,
) -> bool {
    mode != KtlsMode::Off && suite.is_some_and(|s| support.covers(s))
}

/// Attaches the `tls` ULP while rustls still holds the keys, so that a
/// refusal can still fall back. Linux attaches it only to an ESTABLISHED
/// socket (`tls_init` in net/tls/tls_main.c returns ENOTCONN otherwise): a
/// peer that sent its last flight and its FIN (a backend's
/// `certificate_required` alert and close, a client's request and
/// shutdown) has moved the socket to CLOSE_WAIT before the handshake
/// returns. `false` for that case: the connection stays on userspace
/// records, where its last records and the close are read as on any other.
fn attach_ulp(socket: std::os::fd::BorrowedFd<'_>) -> Result<bool, OffloadError> {
    match sys::set_ulp_tls(socket) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(OffloadError::Kernel("ULP", e)),
    }
}

/// Decides the record path for a finished handshake and builds the stream.
/// `defer`: where the kernel could take the keys, rustls keeps the records
/// until the connection starts a bulk transfer of that many bytes (an
/// HTTP/1.1 response, a tunnel's burst from its backend;
/// `runtime.ktls_after`; see `TlsWriter::bulk_ahead`).
pub fn establish(
    socket: monoio::net::TcpStream,
    established: Established,
    (mode, support): (KtlsMode, &Support),
    defer: Option<u64>,
) -> Result<TlsConn, OffloadError> {
    if !kernel_carries(mode, established.conn.negotiated_cipher_suite(), support) {
        return stream::TlsConn::userspace(socket, established);
    }
    if let Some(after) = defer {
        return stream::TlsConn::deferred(socket, established, after, support.rekey);
    }
    if attach_ulp(sys::borrow_fd(&socket))? {
        stream::TlsConn::kernel(socket, established, support.rekey)
    } else {
        stream::TlsConn::userspace(socket, established)
    }
}

/// [`establish`] for a backend connection (ktern the client, `tls` on a
/// route): its keys go to the kernel too when it can carry the suite the
/// backend chose, so a `tcp` route splices kTLS socket to kTLS socket.
/// (A backend's choice of a suite the kernel lacks keeps that side in
/// userspace, whatever `ktls` says: ktern does not pick the backend's.)
pub fn establish_client(
    socket: monoio::net::TcpStream,
    established: crate::handshake::client::ClientEstablished,
    mode: KtlsMode,
    support: &Support,
) -> Result<TlsConn, OffloadError> {
    if kernel_carries(mode, established.conn.negotiated_cipher_suite(), support)
        && attach_ulp(sys::borrow_fd(&socket))?
    {
        stream::TlsConn::kernel_client(socket, established, support.rekey)
    } else {
        stream::TlsConn::userspace_client(socket, established)
    }
}

/// What this host's kernel refuses of `config` (`support`, from
/// [`probe`]): with `ktls = "required"`, a kernel without kTLS at all, or
/// a listener's suites it cannot offload ([`offload_gaps`]). `ktern run`
/// refuses to start on them and a reload to go live; `ktern check` reports
/// them as errors, so that it passes only a config `run` would take on the
/// host it runs on.
///
/// `running`: the probe was made when this process started, and a reload
/// is asking (a running ktern probes once, so loading the module later
/// takes a restart or a binary upgrade to be seen).
pub fn host_problems(
    config: &crate::config::Config,
    support: &Support,
    running: bool,
) -> Vec<crate::config::Problem> {
    if config.runtime.ktls == crate::config::KtlsMode::Required && !support.ulp {
        let remedy = if running {
            "this process found none at its start: load it (`modprobe tls`) and restart or \
             upgrade ktern, or set ktls = \"auto\""
        } else {
            "load it with `modprobe tls`, or set ktls = \"auto\""
        };
        return vec![crate::config::Problem {
            field: "runtime.ktls".into(),
            reason: format!(
                "\"required\", but this kernel has no kTLS: {} ({remedy})",
                support.describe()
            ),
        }];
    }
    offload_gaps(config, support)
}

/// With `ktls = "required"`: one problem per listener whose cipher suites
/// include one the kernel cannot offload (ChaCha20-Poly1305 before Linux
/// 5.11). Such a connection would be served on userspace records, which
/// `required` promises never happens; so the start or the reload is
/// refused instead, naming the suites.
fn offload_gaps(config: &crate::config::Config, support: &Support) -> Vec<crate::config::Problem> {
    if config.runtime.ktls != crate::config::KtlsMode::Required {
        return Vec::new();
    }
    config
        .listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let gaps = support.uncovered(&crate::handshake::listener_suites(l));
            (!gaps.is_empty()).then(|| crate::config::Problem {
                field: format!("listener[{i}].cipher_suites"),
                reason: format!(
                    "runtime.ktls = \"required\" but this kernel cannot offload {} ({}); \
                     list only suites it can, or set ktls = \"auto\"",
                    gaps.join(", "),
                    support.describe()
                ),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rustls_aead_suite_maps_to_a_kernel_cipher() {
        let provider = crate::handshake::crypto_provider();
        for suite in provider.cipher_suites {
            assert!(KernelCipher::of(suite).is_some(), "{:?}", suite.suite());
        }
    }

    #[test]
    fn covers_needs_the_exact_version_and_cipher() {
        let provider = crate::handshake::crypto_provider();
        let s13 = provider
            .cipher_suites
            .iter()
            .copied()
            .find(|s| s.suite() == CipherSuite::TLS13_AES_128_GCM_SHA256)
            .unwrap();
        let mut support = Support {
            ulp: true,
            ciphers: vec![(false, KernelCipher::AesGcm128)],
            ..Support::default()
        };
        assert!(!support.covers(s13));
        support.ciphers.push((true, KernelCipher::AesGcm128));
        assert!(support.covers(s13));
    }

    #[test]
    fn a_listener_suite_the_kernel_lacks_is_named() {
        // A kernel before 5.11: AES-GCM only, no ChaCha20-Poly1305.
        let support = Support {
            ulp: true,
            ciphers: [true, false]
                .into_iter()
                .flat_map(|v| [(v, KernelCipher::AesGcm128), (v, KernelCipher::AesGcm256)])
                .collect(),
            ..Support::default()
        };
        let (cert, key) = crate::builtin::self_signed(&["x.test"]).unwrap();
        let both = crate::config::TlsVersions {
            tls12: true,
            tls13: true,
        };
        let mut l = crate::config::Listener::standalone(
            "t",
            crate::config::Certificate::from_pem(&cert, &key).unwrap(),
            both,
        );
        let all = support.uncovered(&crate::handshake::listener_suites(&l));
        assert!(all.contains(&"TLS13_CHACHA20_POLY1305_SHA256"), "{all:?}");
        assert!(all.iter().all(|n| n.contains("CHACHA20")), "{all:?}");
        l.cipher_suites = vec![
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ];
        assert!(support
            .uncovered(&crate::handshake::listener_suites(&l))
            .is_empty());
        // Start and reload: a problem naming the listener's field, under
        // `required` only.
        let pems = vec![("c".to_string(), cert), ("k".to_string(), key)];
        let text = |mode: &str| {
            format!(
                "[runtime]\nktls = \"{mode}\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
                 [[listener.certificate]]\ncert = \"inline:c\"\nkey = \"inline:k\"\n\
                 [listener.route]\nkind = \"tcp\"\nbackends = [\"127.0.0.1:9\"]\n"
            )
        };
        let load = |mode: &str| {
            crate::config::Config::from_toml(
                &text(mode),
                "t.toml",
                std::path::Path::new("."),
                &pems,
            )
            .unwrap()
        };
        let gaps = offload_gaps(&load("required"), &support);
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].field, "listener[0].cipher_suites");
        assert!(
            gaps[0].reason.contains("TLS13_CHACHA20_POLY1305_SHA256"),
            "{}",
            gaps[0].reason
        );
        assert!(offload_gaps(&load("auto"), &support).is_empty());
    }

    #[test]
    fn probe_never_panics_and_reports_consistently() {
        let s = probe();
        // Without the ULP no cipher can be listed; with it, the log says which.
        if !s.ulp {
            assert!(s.ciphers.is_empty() && s.ulp_error.is_some());
            assert!(s.describe().starts_with("kTLS unavailable"));
        } else {
            assert!(s.describe().starts_with("kTLS available"));
        }
    }
}
