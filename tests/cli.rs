//! The command line: `check`, `--version`, `ktls = "required"`, and the
//! embedded default.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

fn ktern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ktern"))
}

#[test]
fn version_prints_the_crate_version() {
    let out = ktern().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ktern {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_accepts_a_good_file_and_lists_every_problem_of_a_bad_one() {
    let pki = Pki::new("check");
    let good = pki.dir.join("good.toml");
    std::fs::write(
        &good,
        tcp_listener("127.0.0.1:9".parse().unwrap(), "")
            .replace("@CERT@", "cert.pem")
            .replace("@KEY@", "key.pem"),
    )
    .unwrap();
    let out = ktern().args(["check", "-c"]).arg(&good).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = pki.dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[listener]]\naddress = \"nowhere\"\n[[listener.certificate]]\ncert = \"nope.pem\"\nkey = \"key.pem\"\n[listener.route]\nkind = \"tcp\"\nbackends = [\"x\"]\n",
    )
    .unwrap();
    let out = ktern().args(["check", "-c"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = bad.display().to_string();
    for field in [
        "listener[0].address",
        "listener[0].certificate[0].cert",
        "listener[0].route.backends[0]",
    ] {
        assert!(
            err.contains(&format!("{file}: {field}: ")),
            "missing {field}:\n{err}"
        );
    }

    let unknown = pki.dir.join("unknown.toml");
    std::fs::write(&unknown, "[runtime]\nktls = \"auto\"\nworkers = 4\n").unwrap();
    let out = ktern()
        .args(["check", "-c"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("workers") && err.contains("unknown field"),
        "{err}"
    );

    let out = ktern()
        .args(["check", "-c", "/nonexistent/ktern.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("/nonexistent/ktern.toml: (file): cannot read"));
}

fn kernel_has_ktls() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"))
}

#[test]
fn ktls_required_refuses_to_start_without_ktls() {
    let pki = Pki::new("required");
    let cfg = pki.dir.join("required.toml");
    let text = format!(
        "[runtime]\nktls = \"required\"\n{}",
        tcp_listener("127.0.0.1:9".parse().unwrap(), "")
            .replace("@CERT@", "cert.pem")
            .replace("@KEY@", "key.pem")
    );
    std::fs::write(&cfg, text).unwrap();
    let mut child = ktern()
        .args(["run", "-c"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if kernel_has_ktls() {
        let line = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .next()
            .unwrap()
            .unwrap();
        assert!(line.starts_with("listening "), "{line}");
        child.kill().unwrap();
        child.wait().unwrap();
    } else {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("ktls = \"required\" but this kernel has no kTLS"),
            "{err}"
        );
    }
}

#[test]
fn embedded_default_serves_the_builtin_backend() {
    let mut child = ktern()
        .arg("run")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let hint = lines.next().unwrap().unwrap();
    assert_eq!(first, "listening default 127.0.0.1:8443");
    assert_eq!(hint, "try: curl -k https://localhost:8443/");
    let pki = Pki::new("default");
    // The certificate is generated at start; trust nothing, just speak TLS.
    let res = std::process::Command::new("curl")
        .args(["-sSk", "https://localhost:8443/"])
        .output();
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = pki;
    match res {
        Ok(out) => assert_eq!(String::from_utf8_lossy(&out.stdout), ktern::builtin::BODY),
        Err(e) => eprintln!("curl not installed ({e}); skipped the request"),
    }
}

/// The systemd unit in the repository is valid for the systemd on this
/// machine (skipped, and said so, where systemd-analyze is missing).
#[test]
fn systemd_unit_verifies() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: unit not verified");
        return;
    };
    assert!(out.status.success());
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/systemd/ktern.service"
    ))
    .unwrap();
    let dir = std::env::temp_dir().join(format!("ktern-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ktern.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/ktern", env!("CARGO_BIN_EXE_ktern")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
    for want in [
        "Type=notify",
        "ExecReload=",
        "LimitNOFILE=",
        "LimitMEMLOCK=",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(want), "unit lacks {want}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
