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

    // The access log's place is checked, but `check` creates nothing.
    let log = pki.dir.join("access.log");
    let with_log = pki.dir.join("with-log.toml");
    std::fs::write(
        &with_log,
        format!(
            "{}\n[access_log]\npath = \"{}\"\n",
            std::fs::read_to_string(&good).unwrap(),
            log.display()
        ),
    )
    .unwrap();
    let out = ktern()
        .args(["check", "-c"])
        .arg(&with_log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!log.exists(), "ktern check created the access log");
    let no_dir = pki.dir.join("no-dir.toml");
    std::fs::write(
        &no_dir,
        format!(
            "{}\n[access_log]\npath = \"{}/missing/access.log\"\n",
            std::fs::read_to_string(&good).unwrap(),
            pki.dir.display()
        ),
    )
    .unwrap();
    let out = ktern().args(["check", "-c"]).arg(&no_dir).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}: access_log.path: cannot create ",
            no_dir.display()
        )),
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
    // `ktern check` says so too, as an error: it passes only what `run`
    // would take on this host.
    let check = ktern().args(["check", "-c"]).arg(&cfg).output().unwrap();
    let said = String::from_utf8_lossy(&check.stderr);
    if kernel_has_ktls() {
        assert!(check.status.success(), "{said}");
    } else {
        assert_eq!(check.status.code(), Some(1), "{said}");
        assert!(
            said.contains("runtime.ktls: error: \"required\", but this kernel has no kTLS"),
            "{said}"
        );
    }
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
            err.contains("runtime.ktls: \"required\", but this kernel has no kTLS"),
            "{err}"
        );
    }
}

/// An address another program holds: ktern refuses to start, naming the
/// file, the field and the problem once.
#[test]
fn an_address_in_use_is_refused_once_with_its_file_and_field() {
    let pki = Pki::new("inuse");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let cfg = pki.dir.join("inuse.toml");
    let text = tcp_listener("127.0.0.1:9".parse().unwrap(), "")
        .replace("@CERT@", "cert.pem")
        .replace("@KEY@", "key.pem")
        .replace("127.0.0.1:0", &addr.to_string());
    std::fs::write(&cfg, text).unwrap();
    let out = ktern().args(["run", "-c"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let problem = format!("listener[0].address: cannot listen on {addr}");
    assert_eq!(err.matches(&problem).count(), 1, "{err}");
    assert!(
        err.contains(&format!("{}: {problem}", cfg.display())),
        "{err}"
    );
    // The admin endpoint's address, bound before the listeners: the same.
    let text = tcp_listener("127.0.0.1:9".parse().unwrap(), "")
        .replace("@CERT@", "cert.pem")
        .replace("@KEY@", "key.pem");
    std::fs::write(&cfg, format!("[admin]\naddress = \"{addr}\"\n{text}")).unwrap();
    let out = ktern().args(["run", "-c"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let problem = format!("{}: admin.address: cannot listen on {addr}", cfg.display());
    assert_eq!(err.matches(&problem).count(), 1, "{err}");
}

/// Root without CAP_SETUID and CAP_SETGID (a container that drops them)
/// cannot switch to `runtime.user`: refused before anything is bound,
/// naming the file and field, not after the shards took connections
/// (during an upgrade those would be reset).
#[test]
fn a_user_switch_that_cannot_happen_is_refused_before_binding() {
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if !root || !tool("setpriv") {
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let pki = Pki::new("nocaps");
    let cfg = pki.dir.join("nocaps.toml");
    let text = format!(
        "[runtime]\nuser = \"nobody\"\n{}",
        tcp_listener("127.0.0.1:9".parse().unwrap(), "")
            .replace("@CERT@", "cert.pem")
            .replace("@KEY@", "key.pem")
    );
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new("setpriv")
        .args(["--bounding-set=-setuid,-setgid", "--"])
        .arg(env!("CARGO_BIN_EXE_ktern"))
        .args(["run", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: runtime.user: cannot switch", cfg.display())),
        "{err}"
    );
    assert!(!err.contains("started"), "refused before the start: {err}");
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
        "GLIBC_TUNABLES=glibc.malloc.tcache_count=64",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(want), "unit lacks {want}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The module graph has no cycles and `config` (data) imports no stage
/// (ARCHITECTURE.md: "config is data"). Read from the sources: a `crate::X`
/// path outside test code is an edge.
#[test]
fn module_graph_has_no_cycles_and_config_imports_no_stage() {
    use std::collections::{BTreeMap, BTreeSet};
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let top = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" || rel.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests sit at the end of a file, after `#[cfg(test)]`.
        let code = text.split("#[cfg(test)]").next().unwrap();
        let deps = graph.entry(top.clone()).or_default();
        for part in code.split("crate::").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
    }
    let stages = ["shard", "handshake", "ktls", "proxy", "upstream", "control"];
    let config = &graph["config"];
    for s in stages {
        assert!(
            !config.contains(s),
            "config imports the {s} stage: {config:?}"
        );
    }
    fn reaches(
        g: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        g.get(from)
            .into_iter()
            .flatten()
            .any(|d| d == to || (seen.insert(d.clone()) && reaches(g, d, to, seen)))
    }
    for (m, deps) in &graph {
        for d in deps {
            assert!(
                !reaches(&graph, d, m, &mut BTreeSet::new()),
                "module cycle: {m} -> {d} -> ... -> {m}"
            );
        }
    }
}

/// `ktern-load crypto` (bench/vm-handshake.sh's crypto floor) does the
/// server's handshake crypto the given number of times and reports the
/// CPU time of each part.
#[test]
fn ktern_load_measures_the_handshake_crypto_floor() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ktern-load"))
        .args(["--json", "crypto", "--count", "20"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect(&text);
    assert_eq!(v["handshakes"].as_u64(), Some(20), "{v}");
    // 20 X25519 agreements and 20 P-256 signatures take well over a
    // microsecond each, whatever the machine.
    assert!(v["kx_ns"].as_u64().unwrap() >= 20_000, "{v}");
    assert!(v["sign_ns"].as_u64().unwrap() >= 20_000, "{v}");
}

/// `ktern-load --json` prints each summary as one JSON object whose
/// numbers are numbers (for scripts that collect results), the same
/// fields as the `key=value` line.
#[test]
fn ktern_load_reports_json_with_the_same_fields() {
    let load = env!("CARGO_BIN_EXE_ktern-load");
    // Listening once it has printed its address.
    let (_backend, addr) = load_backend(&["--kind", "echo", "--seconds", "30"]);
    let run = |json: bool| {
        let mut c = std::process::Command::new(load);
        if json {
            c.arg("--json");
        }
        let out = c
            .args(["handshakes", "--addr", &addr.to_string(), "--plain"])
            .args(["--threads", "1", "--seconds", "5", "--max", "20"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(true);
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect(&text);
    assert!(v["handshakes"].as_u64().unwrap() >= 20, "{v}");
    assert_eq!(v["failed"].as_u64(), Some(0), "{v}");
    assert!(v["rate"].is_number() && v["p99_us"].is_number(), "{v}");
    let line = run(false);
    let keys: Vec<&str> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
        .collect();
    let mut json_keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    json_keys.sort_unstable();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, json_keys);
}
