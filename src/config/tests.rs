use std::path::Path;

use super::*;

fn pems() -> Vec<(String, String)> {
    let (cert, key) = crate::builtin::self_signed(&["localhost"]).unwrap();
    vec![("c".into(), cert), ("k".into(), key)]
}

/// `GOOD` with `extra` lines in its listener table, loaded.
fn load_with(extra: &str) -> Result<Config, ConfigError> {
    let text = GOOD.replace("[[listener]]", &format!("[[listener]]\n{extra}"));
    Config::from_toml(&text, "t.toml", Path::new("."), &pems())
}

const GOOD: &str = r#"
[[listener]]
address = "127.0.0.1:0"
[[listener.certificate]]
cert = "inline:c"
key = "inline:k"
[listener.route]
kind = "tcp"
backends = ["127.0.0.1:9"]
"#;

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = Config::from_toml(GOOD, "t.toml", Path::new("."), &pems()).unwrap();
    assert_eq!(c.runtime.ktls, KtlsMode::Auto);
    assert_eq!(c.runtime.handshake_timeout, Duration::from_secs(10));
    let l = &c.listeners[0];
    assert_eq!(l.backlog, 4096);
    assert_eq!(
        l.tls_versions,
        TlsVersions {
            tls12: true,
            tls13: true
        }
    );
    let Route::Tcp(t) = &l.route else {
        panic!("tcp route expected")
    };
    assert_eq!(t.connect_timeout, Duration::from_secs(5));
    assert_eq!(t.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.runtime.drain_delay, Duration::from_secs(5));
    assert_eq!(c.runtime.drain_timeout, Duration::from_secs(30));
    assert_eq!(c.runtime.log_format, LogFormat::Auto);
    assert_eq!(c.runtime.user, None);
    assert_eq!(c.runtime.ktls_after, 64 << 10);
}

#[test]
fn ktls_after_is_a_size() {
    let load = |v: &str| {
        let text = format!("[runtime]\nktls_after = \"{v}\"\n{GOOD}");
        Config::from_toml(&text, "t.toml", Path::new("."), &pems())
    };
    assert_eq!(load("0").unwrap().runtime.ktls_after, 0);
    assert_eq!(load("1m").unwrap().runtime.ktls_after, 1 << 20);
    let e = load("lots").unwrap_err();
    assert_eq!(e.problems[0].field, "runtime.ktls_after");
    assert!(e.problems[0].reason.contains("not a size"), "{e}");
}

#[test]
fn runtime_user_group_and_drain_settings_are_checked() {
    let text = format!(
        "[runtime]\nuser = \"ktern-no-such-user\"\ngroup = \"ktern-no-such-group\"\ndrain_delay = \"soon\"\nlog_format = \"json\"\n{GOOD}"
    );
    let e = Config::from_toml(&text, "t.toml", Path::new("."), &pems()).unwrap_err();
    let fields: Vec<_> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        ["runtime.drain_delay", "runtime.user", "runtime.group"],
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("t.toml: runtime.user: \"ktern-no-such-user\": no user"),
        "{e}"
    );
    let text = format!("[runtime]\ngroup = \"root\"\n{GOOD}");
    let e = Config::from_toml(&text, "t.toml", Path::new("."), &pems()).unwrap_err();
    assert_eq!(e.problems[0].field, "runtime.group");
    assert_eq!(e.problems[0].reason, "needs runtime.user");
    let text =
        format!("[runtime]\nuser = \"root\"\ndrain_delay = \"0s\"\nlog_format = \"text\"\n{GOOD}");
    let c = Config::from_toml(&text, "t.toml", Path::new("."), &pems()).unwrap();
    assert_eq!(c.runtime.user.as_deref(), Some("root"));
    assert_eq!(c.runtime.drain_delay, Duration::ZERO);
    assert_eq!(c.runtime.log_format, LogFormat::Text);
}

#[test]
fn embedded_default_is_valid() {
    let text = EMBEDDED_DEFAULT.replace(BUILTIN_BACKEND_PLACEHOLDER, "127.0.0.1:1");
    let pems = pems()
        .into_iter()
        .map(|(n, p)| {
            (
                if n == "c" {
                    "self-signed-cert"
                } else {
                    "self-signed-key"
                }
                .to_string(),
                p,
            )
        })
        .collect::<Vec<_>>();
    let c = Config::from_toml(&text, "<embedded default>", Path::new("."), &pems).unwrap();
    assert_eq!(c.listeners[0].address.to_string(), "127.0.0.1:8443");
}

#[test]
fn unknown_field_is_named_with_its_position() {
    let text = GOOD.replace("kind = \"tcp\"", "kind = \"tcp\"\nbakends = []");
    let e = Config::from_toml(&text, "t.toml", Path::new("."), &pems()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("t.toml: listener[0].route.bakends:"),
        "{msg}"
    );
    assert!(msg.contains("line "), "{msg}");
}

/// A value of the wrong type, or a key missing, in the main file is named
/// by its full path, as every other problem is; it was "(syntax)".
#[test]
fn toml_errors_name_the_field_by_its_path() {
    let field = |text: &str| {
        let e = Config::from_toml(text, "t.toml", Path::new("."), &pems()).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(e.problems[0].reason.contains("line "), "{e}");
        e.problems[0].field.clone()
    };
    let second = format!("{GOOD}{}", GOOD.replace("127.0.0.1:0", "127.0.0.1:1"));
    assert_eq!(
        field(&second.replacen("[[listener]]\n", "[[listener]]\nbacklog = \"4096\"\n", 1)),
        "listener[0].backlog"
    );
    let last = second.rfind("[[listener]]").unwrap();
    let mut text = second.clone();
    text.insert_str(last + "[[listener]]\n".len(), "backlog = \"4096\"\n");
    assert_eq!(field(&text), "listener[1].backlog");
    assert_eq!(
        field(&format!("[runtime]\nmax_connections = \"5\"\n{GOOD}")),
        "runtime.max_connections"
    );
    // A value across lines, and one in an inline table.
    // A value across lines, and one in an inline table (a listener's).
    let text = GOOD.replace(
        "address = \"127.0.0.1:0\"",
        "address = \"127.0.0.1:0\"\nalpn = [\n  \"h2\",\n  2,\n]",
    );
    assert_eq!(field(&text), "listener[0].alpn");
    let text = GOOD.replace(
        "address = \"127.0.0.1:0\"",
        "address = \"127.0.0.1:0\"\nproxy_protocol = { trusted = 5 }",
    );
    assert_eq!(field(&text), "listener[0].proxy_protocol.trusted");
    // A route is read whole (tagged by its kind): its table is as far as
    // toml's span tells.
    let text = GOOD.replace("backends = [\"127.0.0.1:9\"]", "backends = [9]");
    assert_eq!(field(&text), "listener[0].route");
    // Comments before it, an apostrophe in one, do not mislead it.
    let text = GOOD.replace(
        "address = \"127.0.0.1:0\"",
        "address = \"127.0.0.1:0\"   # nginx's listen\nname = \"a\" # it's\nbacklog = \"x\"",
    );
    assert_eq!(field(&text), "listener[0].backlog");
    // A missing key: its table's path.
    let text = GOOD.replace("address = \"127.0.0.1:0\"\n", "");
    assert_eq!(field(&text), "listener[0].address");
}

#[test]
fn every_problem_is_reported_with_file_and_field() {
    let dir = std::env::temp_dir().join(format!("ktern-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_a, _) = crate::builtin::self_signed(&["a"]).unwrap();
    let (_, key_b) = crate::builtin::self_signed(&["b"]).unwrap();
    std::fs::write(dir.join("a.pem"), cert_a).unwrap();
    std::fs::write(dir.join("b.key"), key_b).unwrap();
    let text = r#"
[runtime]
handshake_timeout = "ten seconds"
[[listener]]
address = "localhost:443"
tls_versions = ["1.3", "1.1"]
[[listener.certificate]]
cert = "a.pem"
key = "b.key"
[[listener.certificate]]
cert = "missing.pem"
key = "b.key"
[listener.route]
kind = "tcp"
backends = ["10.0.0.1"]
idle_timeout = "5 fortnights"
"#;
    let e = Config::from_toml(text, "bad.toml", &dir, &[]).unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    for want in [
        "runtime.handshake_timeout",
        "listener[0].address",
        "listener[0].tls_versions[1]",
        "listener[0].certificate[0].key",
        "listener[0].certificate[1].cert",
        "listener[0].route.backends[0]",
        "listener[0].route.idle_timeout",
    ] {
        assert!(fields.contains(&want), "missing {want} in {fields:?}");
    }
    let text = e.to_string();
    assert!(text.contains("bad.toml: listener[0].certificate[0].key: key \"b.key\" does not match certificate \"a.pem\""), "{text}");
    assert!(text.lines().all(|l| l.starts_with("bad.toml: ")));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn no_listener_is_a_problem() {
    let e = Config::from_toml("", "empty.toml", Path::new("."), &[]).unwrap_err();
    assert_eq!(e.problems[0].field, "listener");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
    assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_duration("10"), None);
    assert_eq!(parse_duration("s"), None);
    assert_eq!(parse_duration("-1s"), None);
    assert_eq!(parse_duration("99999999999999999999h"), None);
    // Parsed, but past what a deadline (`Instant + duration`) can hold:
    // refused at load, naming the field, not a panic at the first request.
    let idle = |d: &str| {
        let text = GOOD.replace(
            "kind = \"tcp\"",
            &format!("kind = \"tcp\"\nidle_timeout = \"{d}\""),
        );
        Config::from_toml(&text, "t.toml", Path::new("."), &pems())
    };
    let e = idle("10000000000000000000s").unwrap_err();
    assert_eq!(e.problems[0].field, "listener[0].route.idle_timeout", "{e}");
    assert!(e.problems[0].reason.contains("365 days"), "{e}");
    assert!(idle("8760h").is_ok());
}

/// `min_body_rate` is bytes a second, written as a size; 0 turns it off.
#[test]
fn a_body_rate_is_a_size() {
    let rate = |r: &str| {
        let text = HTTP.replace(
            "kind = \"http\"",
            &format!("kind = \"http\"\nmin_body_rate = \"{r}\""),
        );
        Config::from_toml(&text, "t.toml", Path::new("."), &pems())
    };
    let e = rate("500B/s").unwrap_err();
    assert_eq!(
        e.problems[0].field, "listener[0].route.min_body_rate",
        "{e}"
    );
    assert!(e.problems[0].reason.contains("bytes a second"), "{e}");
    let http = |c: Config| match &c.listeners[0].route {
        crate::config::Route::Http(h) => h.min_body_rate,
        _ => unreachable!(),
    };
    assert_eq!(http(rate("1k").unwrap()), 1024);
    assert_eq!(http(rate("0").unwrap()), 0);
    let default = Config::from_toml(HTTP, "t.toml", Path::new("."), &pems()).unwrap();
    assert_eq!(http(default), 500);
}

/// An HTTP/2 connection's window is by default every stream's window at
/// once, and follows both; a size set is kept, within RFC 9113's bounds.
#[test]
fn the_http2_connection_window_is_auto_or_a_size() {
    let window = |section: &str| {
        let text = format!("{HTTP}\n[listener.route.http2]\n{section}\n");
        Config::from_toml(&text, "t.toml", Path::new("."), &pems()).map(|c| {
            match &c.listeners[0].route {
                crate::config::Route::Http(h) => h.http2.connection_window,
                _ => unreachable!(),
            }
        })
    };
    assert_eq!(window("").unwrap(), 100 * 65_536);
    assert_eq!(
        window("max_concurrent_streams = 2\nstream_window = \"16k\"").unwrap(),
        65_535,
        "at least the protocol's initial window"
    );
    assert_eq!(
        window("max_concurrent_streams = 10000\nstream_window = \"1m\"").unwrap(),
        (1 << 31) - 1,
        "at most 2^31-1"
    );
    assert_eq!(
        window("connection_window = \"auto\"\nstream_window = \"128k\"").unwrap(),
        100 * 131_072
    );
    assert_eq!(window("connection_window = \"1m\"").unwrap(), 1 << 20);
    let e = window("connection_window = \"automatic\"").unwrap_err();
    assert_eq!(
        e.problems[0].field, "listener[0].route.http2.connection_window",
        "{e}"
    );
    assert!(e.problems[0].reason.contains("\"auto\" or a size"), "{e}");
}

/// A zero timeout or connection limit would end every handshake,
/// connect, request or connection at once: refused, naming the field,
/// not a config that loads and serves nothing.
#[test]
fn zero_timeouts_and_connection_limits_are_refused() {
    let problem = |text: String| {
        let e = Config::from_toml(&text, "t.toml", Path::new("."), &pems()).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.problems[0].reason.contains("more than 0s")
                || e.problems[0].reason.contains("at least 1"),
            "{e}"
        );
        e.problems[0].field.clone()
    };
    let tcp = |field: &str| {
        GOOD.replace(
            "kind = \"tcp\"",
            &format!("kind = \"tcp\"\n{field} = \"0s\""),
        )
    };
    assert_eq!(
        problem(tcp("idle_timeout")),
        "listener[0].route.idle_timeout"
    );
    assert_eq!(
        problem(tcp("connect_timeout")),
        "listener[0].route.connect_timeout"
    );
    for field in ["head_timeout", "send_timeout"] {
        let text = HTTP.replace(
            "kind = \"http\"",
            &format!("kind = \"http\"\n{field} = \"0s\""),
        );
        assert_eq!(problem(text), format!("listener[0].route.{field}"));
    }
    for field in ["connect_timeout", "response_timeout"] {
        let text = HTTP.replace("pool_size = 8", &format!("pool_size = 8\n{field} = \"0s\""));
        assert_eq!(problem(text), format!("upstream.api.{field}"));
    }
    assert_eq!(
        problem(format!("[runtime]\nhandshake_timeout = \"0s\"\n{GOOD}")),
        "runtime.handshake_timeout"
    );
    assert_eq!(
        problem(format!("[runtime]\nmax_connections = 0\n{GOOD}")),
        "runtime.max_connections"
    );
    // It also bounds an idle WebSocket, which 0 ended at the first sweep.
    let text = HTTP.replace(
        "kind = \"http\"",
        "kind = \"http\"\nkeepalive_timeout = \"0s\"",
    );
    assert_eq!(problem(text), "listener[0].route.keepalive_timeout");
    // 0 would end a connection at its first SETTINGS or reset stream.
    for field in [
        "max_pending_resets",
        "max_error_resets",
        "max_control_frames",
    ] {
        let text = format!("{HTTP}[listener.route.http2]\n{field} = 0\n");
        assert_eq!(problem(text), format!("listener[0].route.http2.{field}"));
    }
}

/// Addresses that name nothing ktern can use, or that clash with another
/// of its own sockets, are refused with the field that holds them; two
/// listeners on port 0 get a free port each and do not clash.
#[test]
fn addresses_must_be_usable_and_their_own() {
    let problems = |text: &str| -> Vec<String> {
        match Config::from_toml(text, "t.toml", Path::new("."), &pems()) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.field.clone()).collect(),
        }
    };
    for bad in ["127.0.0.1:0", "0.0.0.0:80", "[::]:80"] {
        assert_eq!(
            problems(&GOOD.replace("127.0.0.1:9", bad)),
            ["listener[0].route.backends[0]"],
            "{bad}"
        );
        let text = HTTP.replace("127.0.0.1:9001", bad);
        assert_eq!(problems(&text), ["upstream.web.backends[0]"], "{bad}");
    }
    assert!(problems(&format!("{GOOD}{GOOD}")).is_empty());
    // The admin socket shares no port with a listener or redirect through
    // a wildcard either (it is bound first, without SO_REUSEPORT), and an
    // IPv6 wildcard one is dual-stack; an IPv6-only listener or another
    // port does not clash.
    for (admin, listener, clash) in [
        ("127.0.0.1:8443", "127.0.0.1:8443", true),
        ("0.0.0.0:8443", "127.0.0.1:8443", true),
        ("127.0.0.1:8443", "0.0.0.0:8443", true),
        ("[::]:8443", "0.0.0.0:8443", true),
        ("[::]:8443", "[::1]:8443", true),
        ("127.0.0.1:8443", "[::]:8443", false),
        ("0.0.0.0:8443", "127.0.0.1:8444", false),
    ] {
        let want: &[&str] = if clash { &["admin.address"] } else { &[] };
        let text = format!(
            "[admin]\naddress = \"{admin}\"\n{}",
            GOOD.replace("127.0.0.1:0", listener)
        );
        assert_eq!(
            problems(&text),
            want,
            "{admin} with a listener on {listener}"
        );
        let redirect = format!(
            "[admin]\naddress = \"{admin}\"\n{GOOD}\n[[redirect]]\naddress = \"{listener}\"\n"
        );
        assert_eq!(problems(&redirect), want, "{admin} with a redirect");
    }
    assert_eq!(
        problems(&format!(
            "{GOOD}\n[[redirect]]\naddress = \"127.0.0.1:0\"\nhttps_port = 0\n"
        )),
        ["redirect[0].https_port"]
    );
}

#[test]
fn listener_names_and_redirect_addresses_are_unique() {
    let two = |first: &str, second: &str| {
        let text = format!(
            "{}{}",
            GOOD.replace("[[listener]]", &format!("[[listener]]\n{first}")),
            GOOD.replace("[[listener]]", &format!("[[listener]]\n{second}"))
                .replace("127.0.0.1:0", "127.0.0.1:1")
        );
        Config::from_toml(&text, "t.toml", Path::new("."), &pems())
    };
    assert!(two("name = \"a\"", "name = \"b\"").is_ok());
    // Named alike by hand, or like an unnamed one's default.
    for (first, second) in [
        ("name = \"a\"", "name = \"a\""),
        ("", "name = \"listener0\""),
    ] {
        let e = two(first, second).unwrap_err();
        let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["listener[1].name"], "{e}");
    }
    let redirect = |address: &str| {
        let text = format!("{GOOD}\n[[redirect]]\naddress = \"{address}\"\n[[redirect]]\naddress = \"{address}\"\n");
        Config::from_toml(&text, "t.toml", Path::new("."), &pems())
    };
    // Port 0: a free port each, no clash.
    assert!(redirect("127.0.0.1:0").is_ok());
    let text = GOOD.replace("127.0.0.1:0", "127.0.0.1:8443");
    let redirect = |address: &str| {
        let text = format!("{text}\n[[redirect]]\naddress = \"{address}\"\n[[redirect]]\naddress = \"{address}\"\n");
        Config::from_toml(&text, "t.toml", Path::new("."), &pems())
    };
    let e = redirect("127.0.0.1:8443").unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "redirect[0].address",
            "redirect[1].address",
            "redirect[1].address"
        ],
        "{e}"
    );
    assert!(
        e.problems[0].reason.contains("already used by a listener"),
        "{e}"
    );
    assert!(e.problems[2].reason.contains("another redirect"), "{e}");
}

const HTTP: &str = r#"
[[listener]]
address = "127.0.0.1:0"
[[listener.certificate]]
cert = "inline:c"
key = "inline:k"
[listener.route]
kind = "http"
[[listener.route.rule]]
upstream = "web"
[[listener.route.rule]]
host = "*.example.com"
upstream = "api"
[[listener.route.rule]]
host = "www.example.com"
path = "/api/"
upstream = "api"
[[listener.route.rule]]
host = "www.example.com"
upstream = "web"
[upstream.web]
backends = ["127.0.0.1:9001"]
[upstream.api]
backends = ["127.0.0.1:9002", "127.0.0.1:9003"]
pool_size = 8
"#;

#[test]
fn http_rules_are_ordered_most_specific_first() {
    let c = Config::from_toml(HTTP, "t.toml", Path::new("."), &pems()).unwrap();
    let Route::Http(h) = &c.listeners[0].route else {
        panic!("http route expected")
    };
    assert_eq!(h.max_body, 1 << 20);
    assert_eq!(h.keepalive_timeout, Duration::from_secs(75));
    assert_eq!(h.send_timeout, Duration::from_secs(60));
    let order: Vec<(HostMatch, &str)> = h
        .rules
        .iter()
        .map(|r| (r.host.clone(), r.path.as_str()))
        .collect();
    assert_eq!(
        order,
        vec![
            (HostMatch::Exact("www.example.com".into()), "/api/"),
            (HostMatch::Exact("www.example.com".into()), "/"),
            (HostMatch::Suffix(".example.com".into()), "/"),
            (HostMatch::Any, "/"),
        ]
    );
    let Target::Upstream(i) = h.rules[0].target else {
        panic!("upstream rule expected")
    };
    let api = &c.upstreams[i];
    assert_eq!(
        (api.name.as_str(), api.backends.len(), api.pool_size),
        ("api", 2, 8)
    );
    assert!(HostMatch::Suffix(".example.com".into()).matches("a.example.com"));
    assert!(!HostMatch::Suffix(".example.com".into()).matches("example.com"));
}

#[test]
fn http_config_problems_are_named() {
    let text = HTTP
        .replace(
            "upstream = \"web\"\n[[listener.route.rule]]\nhost = \"*.example.com\"",
            "upstream = \"nope\"\n[[listener.route.rule]]\nhost = \"a*.example.com\"",
        )
        .replace(
            "backends = [\"127.0.0.1:9001\"]",
            "backends = [\"nowhere\"]\nretries = 3",
        );
    let e = Config::from_toml(&text, "h.toml", Path::new("."), &pems()).unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert!(
        fields.contains(&"listener[0].route.rule[0].upstream"),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"listener[0].route.rule[1].host"),
        "{fields:?}"
    );
    assert!(fields.contains(&"upstream.web"), "{fields:?}");
}

/// A rule's host and server-name patterns: the name a request can carry,
/// without the trailing dot (requests are routed without it); anything
/// else is refused, naming the field, instead of a rule that never matches.
#[test]
fn rule_names_are_host_names_and_lose_a_trailing_dot() {
    let with = |field: &str, value: &str| {
        let text = HTTP.replace(
            "[[listener.route.rule]]\nhost = \"*.example.com\"",
            &format!("[[listener.route.rule]]\n{field} = \"{value}\""),
        );
        assert_ne!(text, HTTP);
        Config::from_toml(&text, "r.toml", Path::new("."), &pems())
    };
    let rule = |c: Config| {
        let Route::Http(h) = &c.listeners[0].route else {
            panic!("http route expected")
        };
        h.rules
            .iter()
            .map(|r| (r.host.clone(), r.sni.clone()))
            .collect::<Vec<_>>()
    };
    let exact = |h: &str| HostMatch::Exact(h.into());
    let ok = rule(with("host", "App.Example.com.").unwrap());
    assert!(
        ok.contains(&(exact("app.example.com"), HostMatch::Any)),
        "{ok:?}"
    );
    let ok = rule(with("sni", "*.Example.com.").unwrap());
    assert!(
        ok.contains(&(HostMatch::Any, HostMatch::Suffix(".example.com".into()))),
        "{ok:?}"
    );
    // A request by address carries it as its Host; a ClientHello never.
    let ok = rule(with("host", "192.0.2.7").unwrap());
    assert!(ok.contains(&(exact("192.0.2.7"), HostMatch::Any)), "{ok:?}");
    let ok = rule(with("host", "[2001:DB8::7]").unwrap());
    assert!(
        ok.contains(&(exact("[2001:db8::7]"), HostMatch::Any)),
        "{ok:?}"
    );
    for (field, bad, says) in [
        ("sni", "192.0.2.7", "IP address"),
        ("host", "app example.com", "not a host name"),
        ("sni", "app..example.com", "not a host name"),
        ("host", "app.example.com:443", "without a port"),
        ("host", "2001:db8::7", "without a port"),
        ("sni", "[2001:db8::7]", "IP address"),
        ("host", "*.", "wildcards"),
        ("sni", "a.*.example.com", "wildcards"),
        ("host", ".example.com", "not a host name"),
    ] {
        let e = with(field, bad).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{bad}: {e}");
        assert_eq!(
            e.problems[0].field,
            format!("listener[0].route.rule[1].{field}"),
            "{e}"
        );
        assert!(e.problems[0].reason.contains(says), "{bad}: {e}");
    }
}

#[test]
fn sizes() {
    assert_eq!(parse_size("1m"), Some(1 << 20));
    assert_eq!(parse_size("512K"), Some(512 << 10));
    assert_eq!(parse_size("10"), Some(10));
    assert_eq!(parse_size("1.5m"), None);
    assert_eq!(parse_size("m"), None);
    assert_eq!(parse_size("99999999999g"), None);
}

#[test]
fn sni_patterns_and_access_log_are_validated() {
    let dir = std::env::temp_dir().join(format!("ktern-cfg-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!("{HTTP}\n[access_log]\npath = \"logs/access.log\"\nformat = \"xml\"\n")
        .replace(
            "[[listener.route.rule]]\nhost = \"*.example.com\"",
            "[[listener.route.rule]]\nsni = \"x*.example.com\"\nhost = \"*.example.com\"",
        );
    let e = Config::from_toml(&text, "a.toml", &dir, &pems()).unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert!(fields.contains(&"access_log.format"), "{fields:?}");
    assert!(
        fields.contains(&"listener[0].route.rule[1].sni"),
        "{fields:?}"
    );
    // A directory that does not exist is named with the path.
    let text = format!("{HTTP}\n[access_log]\npath = \"logs/access.log\"\n");
    let e = Config::from_toml(&text, "a.toml", &dir, &pems()).unwrap_err();
    assert_eq!(e.problems[0].field, "access_log.path");
    assert!(e.problems[0].reason.contains("logs/access.log"), "{e}");
    // Relative to the config's directory; validation creates nothing
    // (the generation opens it).
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let c = Config::from_toml(&text, "a.toml", &dir, &pems()).unwrap();
    let log = c.access_log.expect("configured");
    assert_eq!(log.path, dir.join("logs/access.log"));
    assert_eq!(log.format, AccessFormat::Combined);
    assert_eq!(log.queue, 4 << 20, "the default queue");
    assert!(!dir.join("logs/access.log").exists());
    for (queue, ok) in [("64k", true), ("1k", false), ("2g", false), ("lots", false)] {
        let text = format!("{HTTP}\n[access_log]\npath = \"-\"\nqueue = \"{queue}\"\n");
        match Config::from_toml(&text, "a.toml", &dir, &pems()) {
            Ok(c) => assert!(ok, "{queue} taken: {:?}", c.access_log),
            Err(e) => {
                assert!(!ok, "{queue}: {e}");
                assert_eq!(e.problems[0].field, "access_log.queue", "{e}");
                assert!(e.problems[0].reason.contains(queue), "{e}");
            }
        }
    }
    assert!(HostMatch::Any.matches_sni(None));
    assert!(!HostMatch::Exact("a".into()).matches_sni(None));
    assert!(HostMatch::Suffix(".b".into()).matches_sni(Some("a.b")));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn balancing_weights_and_health_checks() {
    let text = HTTP
        .replace(
            "backends = [\"127.0.0.1:9002\", \"127.0.0.1:9003\"]",
            "backends = [\"127.0.0.1:9002 weight=5\", \"127.0.0.1:9003\"]\nbalance = \"hash\"\n\
             hash_key = \"header:X-User\"",
        )
        .replace(
            "pool_size = 8",
            "pool_size = 8\n[upstream.api.health]\npath = \"/healthz\"\ninterval = \"5s\"",
        );
    let c = Config::from_toml(&text, "b.toml", Path::new("."), &pems()).unwrap();
    let api = c.upstreams.iter().find(|u| u.name == "api").unwrap();
    assert_eq!(
        api.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        vec![5, 1]
    );
    assert_eq!(api.balance, Balance::Hash(HashKey::Header("x-user".into())));
    let h = api.health.as_ref().unwrap();
    assert_eq!(
        (h.path.as_str(), h.interval, h.timeout, h.rise, h.fall),
        (
            "/healthz",
            Duration::from_secs(5),
            Duration::from_secs(1),
            2,
            3
        )
    );
    let web = c.upstreams.iter().find(|u| u.name == "web").unwrap();
    assert_eq!(
        (&web.balance, web.health.is_none()),
        (&Balance::RoundRobin, true)
    );

    let bad = HTTP
        .replace(
            "backends = [\"127.0.0.1:9002\", \"127.0.0.1:9003\"]",
            "backends = [\"127.0.0.1:9002 weight=0\", \"127.0.0.1:9003 heavy\"]\nbalance = \"random\"",
        )
        .replace(
            "pool_size = 8",
            "pool_size = 8\n[upstream.api.health]\npath = \"healthz\"\nrise = 0",
        );
    let e = Config::from_toml(&bad, "b.toml", Path::new("."), &pems()).unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    for want in [
        "upstream.api.backends[0]",
        "upstream.api.backends[1]",
        "upstream.api.balance",
        "upstream.api.health.path",
    ] {
        assert!(fields.contains(&want), "{want} missing from {fields:?}");
    }
    // A value of the wrong type in a group names its field, and the rules
    // that name the group are not also told it is undefined.
    for (change, field) in [
        ("pool_size = \"8\"", "upstream.api.pool_size"),
        (
            "pool_size = 8\n[upstream.api.health]\nrise = \"2\"",
            "upstream.api.health.rise",
        ),
    ] {
        let bad = HTTP.replace("pool_size = 8", change);
        let e = Config::from_toml(&bad, "b.toml", Path::new("."), &pems()).unwrap_err();
        let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, [field], "{e}");
        assert!(e.problems[0].reason.contains("invalid type"), "{e}");
    }
    let bad = HTTP.replace(
        "backends = [\"127.0.0.1:9002\", \"127.0.0.1:9003\"]",
        "backends = [\"127.0.0.1:9002\", \"127.0.0.1:9002\"]",
    );
    let e = Config::from_toml(&bad, "b.toml", Path::new("."), &pems()).unwrap_err();
    assert_eq!(e.problems[0].field, "upstream.api.backends");
    assert!(e.problems[0].reason.contains("twice"), "{e}");
    let bad = HTTP.replace("pool_size = 8", "pool_size = 8\nhash_key = \"client_ip\"");
    let e = Config::from_toml(&bad, "b.toml", Path::new("."), &pems()).unwrap_err();
    assert_eq!(e.problems[0].field, "upstream.api.hash_key");
}

/// `max_conns`: the group's applies to each backend without its own
/// (nginx's per-server `max_conns=N`); 0 is no cap.
#[test]
fn max_conns_per_backend_and_per_group() {
    let text = HTTP.replace(
        "backends = [\"127.0.0.1:9002\", \"127.0.0.1:9003\"]",
        "backends = [\"127.0.0.1:9002 weight=2 max_conns=5\", \"127.0.0.1:9003\", \"127.0.0.1:9004 max_conns=0\"]\nmax_conns = 40",
    );
    let c = Config::from_toml(&text, "m.toml", Path::new("."), &pems()).unwrap();
    let api = c.upstreams.iter().find(|u| u.name == "api").unwrap();
    let caps: Vec<_> = api
        .backends
        .iter()
        .map(|b| (b.weight, b.max_conns))
        .collect();
    assert_eq!(caps, [(2, 5), (1, 40), (1, 0)]);
    let web = c.upstreams.iter().find(|u| u.name == "web").unwrap();
    assert_eq!(web.backends[0].max_conns, 0, "no cap unless set");
    assert_eq!(
        c.listeners[0].max_conns_per_client, 0,
        "no limit unless set"
    );
    let text = HTTP.replacen(
        "[[listener]]\n",
        "[[listener]]\nmax_conns_per_client = 64\n",
        1,
    );
    let c = Config::from_toml(&text, "m.toml", Path::new("."), &pems()).unwrap();
    assert_eq!(c.listeners[0].max_conns_per_client, 64);

    for (bad, why) in [
        ("max_conns=-1", "max_conns must be a whole number"),
        ("max_conns=", "max_conns must be a whole number"),
        ("maxconn=3", "expected \"weight=N\" or \"max_conns=N\""),
    ] {
        let text = HTTP.replace(
            "backends = [\"127.0.0.1:9002\", \"127.0.0.1:9003\"]",
            &format!("backends = [\"127.0.0.1:9002\", \"127.0.0.1:9003 {bad}\"]"),
        );
        let e = Config::from_toml(&text, "m.toml", Path::new("."), &pems()).unwrap_err();
        assert_eq!(e.problems[0].field, "upstream.api.backends[1]", "{e}");
        assert!(e.problems[0].reason.contains(why), "{bad}: {e}");
    }
}

#[test]
fn static_rules_need_an_existing_directory() {
    let dir = std::env::temp_dir().join(format!("ktern-cfg-static-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("file"), b"x").unwrap();
    let text = HTTP.replace(
        "host = \"www.example.com\"\nupstream = \"web\"",
        "host = \"www.example.com\"\nstatic = \"www\"",
    );
    let c = Config::from_toml(&text, "s.toml", &dir, &pems()).unwrap();
    let Route::Http(h) = &c.listeners[0].route else {
        panic!("http route expected")
    };
    let root = std::fs::canonicalize(dir.join("www")).unwrap();
    assert!(h
        .rules
        .iter()
        .any(|r| r.target == Target::Static(root.clone())));
    for (bad, why) in [
        ("static = \"missing\"", "No such file"),
        ("static = \"file\"", "not a directory"),
        ("static = \"www\"\nupstream = \"web\"", "exactly one"),
    ] {
        let text = HTTP.replace(
            "host = \"www.example.com\"\nupstream = \"web\"",
            &format!("host = \"www.example.com\"\n{bad}"),
        );
        let e = Config::from_toml(&text, "s.toml", &dir, &pems()).unwrap_err();
        assert!(
            e.problems[0].field.starts_with("listener[0].route.rule["),
            "{e}"
        );
        assert!(e.problems[0].reason.contains(why), "{e}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn alpn_defaults_by_route_and_is_validated() {
    let dir = std::env::temp_dir();
    let c = Config::from_toml(HTTP, "a.toml", &dir, &pems()).unwrap();
    assert_eq!(
        c.listeners[0].alpn,
        vec!["h2".to_string(), "http/1.1".to_string()]
    );
    let with = |alpn: &str| {
        HTTP.replacen(
            "[[listener.certificate]]",
            &format!("alpn = {alpn}\n[[listener.certificate]]"),
            1,
        )
    };
    let e = Config::from_toml(
        &with(r#"["h3", "", "http/1.1", "http/1.1"]"#),
        "a.toml",
        &dir,
        &pems(),
    )
    .unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "listener[0].alpn[0]",
            "listener[0].alpn[1]",
            "listener[0].alpn[3]"
        ],
        "{e}"
    );
    assert!(e.to_string().contains("speaks h2 and http/1.1 only"), "{e}");
    // An empty list turns ALPN off.
    let c = Config::from_toml(&with("[]"), "a.toml", &dir, &pems()).unwrap();
    assert!(c.listeners[0].alpn.is_empty());
}

#[test]
fn uring_taskrun_defaults_to_coop_and_is_validated() {
    let dir = std::env::temp_dir();
    let c = Config::from_toml(HTTP, "a.toml", &dir, &pems()).unwrap();
    assert_eq!(c.runtime.uring_taskrun, TaskRun::Coop);
    let with = |v: &str| format!("[runtime]\nuring_taskrun = \"{v}\"\n{HTTP}");
    for (v, want) in [
        ("defer", TaskRun::Defer),
        ("off", TaskRun::Off),
        ("coop", TaskRun::Coop),
    ] {
        let c = Config::from_toml(&with(v), "a.toml", &dir, &pems()).unwrap();
        assert_eq!(c.runtime.uring_taskrun, want);
    }
    let e = Config::from_toml(&with("sqpoll"), "a.toml", &dir, &pems()).unwrap_err();
    assert!(e.to_string().contains("sqpoll"), "{e}");
}

#[test]
fn certificate_names_come_from_the_san_unless_given_and_are_checked() {
    let (cert, key) =
        crate::builtin::self_signed(&["Www.Example.com", "*.api.example.com", "127.0.0.1"])
            .unwrap();
    let pems = vec![("c".to_string(), cert), ("k".to_string(), key)];
    let c = Config::from_toml(GOOD, "t.toml", Path::new("."), &pems).unwrap();
    let l = &c.listeners[0];
    assert_eq!(
        l.certificates[0].server_names,
        ["www.example.com", "*.api.example.com", "127.0.0.1"]
    );
    assert!(!l.strict_sni);
    // The server's suite order by default; `false` for the client's.
    assert!(l.prefer_server_ciphers);
    let client_order = GOOD.replace(
        "[[listener]]",
        "[[listener]]\nprefer_server_ciphers = false",
    );
    let c = Config::from_toml(&client_order, "t.toml", Path::new("."), &pems).unwrap();
    assert!(!c.listeners[0].prefer_server_ciphers);
    let given = GOOD.replace(
        "key = \"inline:k\"",
        "key = \"inline:k\"\nserver_names = [\"A.test\", \"*.b.test\"]",
    );
    let c = Config::from_toml(&given, "t.toml", Path::new("."), &pems).unwrap();
    assert_eq!(
        c.listeners[0].certificates[0].server_names,
        ["a.test", "*.b.test"]
    );
    let bad = GOOD.replace(
        "key = \"inline:k\"",
        "key = \"inline:k\"\nserver_names = [\"ok.test\", \"10.0.0.1\", \"a.*.test\", \"-x.test\", \"x..test\"]",
    ).replace("[[listener]]", "[[listener]]\nstrict_sni = true");
    let e = Config::from_toml(&bad, "t.toml", Path::new("."), &pems).unwrap_err();
    let fields: Vec<_> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "listener[0].certificate[0].server_names[1]",
            "listener[0].certificate[0].server_names[2]",
            "listener[0].certificate[0].server_names[3]",
            "listener[0].certificate[0].server_names[4]",
        ],
        "{e}"
    );
    assert!(e.to_string().contains("RFC 6066"), "{e}");
}

#[test]
fn cipher_suites_and_groups_are_checked_against_the_build() {
    let c = load_with("cipher_suites = [\"TLS13_AES_256_GCM_SHA384\", \"tls_ecdhe_ecdsa_with_aes_128_gcm_sha256\"]\nkx_groups = [\"P-384\", \"x25519\"]")
    .unwrap();
    let l = &c.listeners[0];
    assert_eq!(
        l.cipher_suites,
        [
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        ]
    );
    assert_eq!(
        l.kx_groups,
        [rustls::NamedGroup::secp384r1, rustls::NamedGroup::X25519]
    );
    let e = load_with("cipher_suites = [\"TLS13_AES_128_GCM_SHA256\", \"TLS_RSA_WITH_RC4_128_MD5\"]\nkx_groups = [\"X448\", \"X25519\", \"X25519\"]")
    .unwrap_err();
    let fields: Vec<_> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "listener[0].cipher_suites[1]",
            "listener[0].cipher_suites",
            "listener[0].kx_groups[0]",
            "listener[0].kx_groups[2]",
        ],
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("TLS 1.2 is enabled but no TLS 1.2 suite"),
        "{e}"
    );
    assert!(
        e.to_string().contains("not a cipher suite of this build"),
        "{e}"
    );
}

#[test]
fn proxy_protocol_trusted_ranges_are_parsed_and_checked() {
    let c = load_with("proxy_protocol = { trusted = [\"10.0.0.0/8\", \"::1\", \"192.0.2.7\"] }")
        .unwrap();
    let p = c.listeners[0].proxy_protocol.as_ref().unwrap();
    assert_eq!(p.timeout, Duration::from_secs(5));
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let ok = |s: &str| p.trusted.iter().any(|c| c.contains(ip(s)));
    assert!(ok("10.200.0.1") && ok("::1") && ok("192.0.2.7"));
    // A dual-stack listener reports IPv4 peers as mapped IPv6.
    assert!(ok("::ffff:10.1.2.3"));
    assert!(!ok("11.0.0.1") && !ok("192.0.2.8") && !ok("::2"));
    assert!(Cidr::parse("0.0.0.0/0")
        .unwrap()
        .contains(ip("203.0.113.9")));
    // Mapped forms name the IPv4 range; wider than the mapped block, refused.
    assert!(Cidr::parse("::ffff:10.0.0.0/104")
        .unwrap()
        .contains(ip("10.9.8.7")));
    assert!(Cidr::parse("::ffff:10.1.2.3")
        .unwrap()
        .contains(ip("::ffff:10.1.2.3")));
    assert_eq!(Cidr::parse("::ffff:0.0.0.0/95"), None);
    assert!(
        load_with("proxy_protocol = { trusted = [\"10.0.0.0/8\"], timeout = \"0s\" }").is_err()
    );
    let e =
        load_with("proxy_protocol = { trusted = [\"10.0.0.0/33\", \"nope\"], timeout = \"soon\" }")
            .unwrap_err();
    let fields: Vec<_> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "listener[0].proxy_protocol.timeout",
            "listener[0].proxy_protocol.trusted[0]",
            "listener[0].proxy_protocol.trusted[1]"
        ],
        "{e}"
    );
    let e = load_with("proxy_protocol = { trusted = [] }").unwrap_err();
    assert!(e.to_string().contains("proxy_protocol.trusted"), "{e}");
}

#[test]
fn acme_certificates_serve_a_stand_in_then_what_the_state_directory_holds() {
    let dir = std::env::temp_dir().join(format!("ktern-cfg-acme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "[acme]\nstate_dir = \"state\"\nretry = \"5s\"\n{}",
        GOOD.replace(
            "cert = \"inline:c\"\nkey = \"inline:k\"",
            "acme = { domains = [\"A.example\", \"b.example\"], contact = [\"mailto:ops@example\"], directory = \"https://ca.example/dir\" }",
        )
    );
    let load = || Config::from_toml(&text, "a.toml", &dir, &pems()).unwrap();
    let c = load();
    assert_eq!(c.acme.state_dir, dir.join("state"));
    assert_eq!(c.acme.retry, Duration::from_secs(5));
    assert_eq!(c.acme.retry_max, Duration::from_secs(6 * 3600));
    let cert = &c.listeners[0].certificates[0];
    let a = cert.acme.as_ref().expect("acme order");
    assert_eq!(a.domains, ["a.example", "b.example"]);
    assert_eq!(a.dir, dir.join("state/a.example"));
    assert_eq!(a.challenge, AcmeChallenge::TlsAlpn01);
    assert!(!a.issued, "nothing obtained yet: a stand-in");
    assert_eq!(cert.server_names, ["a.example", "b.example"]);
    assert!(cert.info.cert_file.contains("stand-in"), "{:?}", cert.info);
    // The stand-in is due at once.
    let orders = crate::control::acme::orders(&c);
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].1, None);
    // Nothing was created by loading.
    assert!(!dir.join("state").exists());

    // What an order left in the state directory serves from the next load.
    let (pem, key) = crate::builtin::self_signed(&["a.example", "b.example"]).unwrap();
    std::fs::create_dir_all(dir.join("state/a.example/v1")).unwrap();
    std::fs::write(dir.join("state/a.example/v1/cert.pem"), &pem).unwrap();
    std::fs::write(dir.join("state/a.example/v1/key.pem"), &key).unwrap();
    // Not served until `current` names the version.
    assert!(
        !load().listeners[0].certificates[0]
            .acme
            .as_ref()
            .unwrap()
            .issued
    );
    std::os::unix::fs::symlink("v1", dir.join("state/a.example/current")).unwrap();
    let c = load();
    let cert = &c.listeners[0].certificates[0];
    assert!(cert.acme.as_ref().unwrap().issued);
    assert!(cert.info.cert_file.ends_with("state/a.example/v1/cert.pem"));
    let orders = crate::control::acme::orders(&c);
    assert_eq!(
        orders[0].1,
        Some((cert.info.not_before, cert.info.not_after))
    );
    // Expired at `now` is as good as absent.
    let held = |now| held_certificate(&dir.join("state/a.example"), now).unwrap();
    assert!(held(i64::MAX).is_none());
    assert!(held(0).is_some());
    // Another CA's certificate (staging's, before a switch to production)
    // is served until this CA's comes, but due at once; this CA's is not.
    let marker = dir
        .join("state/a.example/v1")
        .join(crate::config::ACME_ISSUED_BY);
    std::fs::write(&marker, "https://staging.test/dir\n").unwrap();
    let c = load();
    assert!(c.listeners[0].certificates[0].acme.as_ref().unwrap().issued);
    assert_eq!(crate::control::acme::orders(&c)[0].1, None);
    let directory = &c.listeners[0].certificates[0]
        .acme
        .as_ref()
        .unwrap()
        .directory;
    std::fs::write(&marker, directory).unwrap();
    assert!(crate::control::acme::orders(&load())[0].1.is_some());
    // A certificate file with no certificate in it serves the stand-in
    // (and is ordered anew), where it had panicked.
    let pem_before = std::fs::read(dir.join("state/a.example/v1/cert.pem")).unwrap();
    std::fs::write(dir.join("state/a.example/v1/cert.pem"), "no PEM here\n").unwrap();
    assert!(held_certificate(&dir.join("state/a.example"), 0).is_err());
    let c = load();
    assert!(!c.listeners[0].certificates[0].acme.as_ref().unwrap().issued);
    assert_eq!(crate::control::acme::orders(&c)[0].1, None);
    std::fs::write(dir.join("state/a.example/v1/cert.pem"), pem_before).unwrap();
    // A held certificate that misses a configured name is due at once.
    let (pem, key) = crate::builtin::self_signed(&["a.example"]).unwrap();
    std::fs::write(dir.join("state/a.example/v1/cert.pem"), &pem).unwrap();
    std::fs::write(dir.join("state/a.example/v1/key.pem"), &key).unwrap();
    assert_eq!(crate::control::acme::orders(&load())[0].1, None);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn acme_entries_are_checked() {
    let acme = |fields: &str| {
        GOOD.replace(
            "cert = \"inline:c\"\nkey = \"inline:k\"",
            &format!("acme = {{ {fields} }}"),
        )
    };
    for (text, field, why) in [
        (
            acme("domains = [\"a.example\"], directory = \"https://ca/dir\"")
                .replace("[listener.route]", "cert = \"inline:c\"\n[listener.route]"),
            "listener[0].certificate[0]",
            "either cert and key, or acme",
        ),
        (
            acme("domains = [\"a.example\"], directory = \"https://ca/dir\"")
                .replace("[listener.route]", "server_names = [\"x\"]\n[listener.route]"),
            "listener[0].certificate[0]",
            "acme.domains",
        ),
        (
            acme("domains = [\"a.example\", \"A.example\"], directory = \"https://ca/dir\""),
            "listener[0].certificate[0].acme.domains[1]",
            "twice",
        ),
        (
            acme("domains = [\"10.0.0.1\"], directory = \"https://ca/dir\""),
            "listener[0].certificate[0].acme.domains[0]",
            "IP address",
        ),
        (
            format!(
                "[acme]\nretry = \"1h\"\nretry_max = \"1m\"\n{}",
                acme("domains = [\"a.example\"], directory = \"https://ca/dir\"")
            ),
            "acme.retry",
            "at most acme.retry_max",
        ),
        (
            format!(
                "{}\n{}",
                acme("domains = [\"a.example\"], directory = \"https://ca/dir\""),
                acme("domains = [\"a.example\", \"c.example\"], directory = \"https://ca/dir\"")
                    .replace("127.0.0.1:0", "127.0.0.1:1")
            ),
            "listener[1].certificate[0].acme.domains",
            "another acme certificate starts with",
        ),
        (
            acme("domains = [\"a.example\"], directory = \"https://ca/dir\", ca = \"/nonexistent/ca.pem\""),
            "listener[0].certificate[0].acme.ca",
            "/nonexistent/ca.pem",
        ),
    ] {
        let e = Config::from_toml(&text, "t.toml", Path::new("."), &pems()).unwrap_err();
        assert!(
            e.problems
                .iter()
                .any(|p| p.field == field && p.reason.contains(why)),
            "{field}: {e}"
        );
    }
}

#[test]
fn send_proxy_takes_v1_or_v2() {
    let with = |v: &str| {
        let text = GOOD.replace(
            "kind = \"tcp\"",
            &format!("kind = \"tcp\"\nsend_proxy = \"{v}\""),
        );
        Config::from_toml(&text, "t.toml", Path::new("."), &pems())
    };
    let Route::Tcp(t) = &with("v2").unwrap().listeners[0].route else {
        panic!("tcp route expected")
    };
    assert_eq!(t.send_proxy, Some(ProxyVersion::V2));
    let e = with("v3").unwrap_err();
    assert_eq!(e.problems[0].field, "listener[0].route.send_proxy");
    assert!(e.problems[0].reason.contains("\"v3\""), "{e}");
}

#[test]
fn upstream_groups_take_send_proxy_too() {
    let with = |v: &str| {
        let text = HTTP.replace(
            "pool_size = 8",
            &format!("pool_size = 8\nsend_proxy = \"{v}\""),
        );
        Config::from_toml(&text, "u.toml", Path::new("."), &pems())
    };
    let c = with("v1").unwrap();
    let api = c.upstreams.iter().find(|u| u.name == "api").unwrap();
    assert_eq!(api.send_proxy, Some(ProxyVersion::V1));
    let e = with("2").unwrap_err();
    assert_eq!(e.problems[0].field, "upstream.api.send_proxy");
    assert!(e.problems[0].reason.contains("\"2\""), "{e}");
}

#[test]
fn client_auth_is_checked() {
    let e = load_with(
        "client_auth = { ca = \"/nonexistent/ca.pem\", mode = \"sometimes\", verify_depth = 0 }",
    )
    .unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["listener[0].client_auth.mode"], "{e}");
    let e =
        load_with("client_auth = { ca = \"/nonexistent/ca.pem\", verify_depth = 0 }").unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "listener[0].client_auth.verify_depth",
            "listener[0].client_auth.ca"
        ],
        "{e}"
    );
    assert!(e.problems[1].reason.contains("/nonexistent/ca.pem"), "{e}");
    let c = load_with("client_auth = { ca = \"inline:c\", mode = \"optional\" }").unwrap();
    let auth = c.listeners[0].client_auth.as_ref().expect("client_auth");
    assert!(!auth.required);
    assert_eq!(auth.verify_depth, 1);
    // A bundle with a block that is no certificate (a corrupt copy): the
    // verifier's store would drop it in silence.
    let mut inline = pems();
    let good = inline[0].1.clone();
    inline.push((
        "bad".into(),
        format!("{good}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
    ));
    let text = GOOD.replace(
        "[[listener]]",
        "[[listener]]\nclient_auth = { ca = \"inline:bad\" }",
    );
    let e = Config::from_toml(&text, "t.toml", Path::new("."), &inline).unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["listener[0].client_auth.ca"], "{e}");
    assert!(e.problems[0].reason.contains("1 of its 2"), "{e}");
}

const PASSTHROUGH: &str = r#"
[[listener]]
address = "127.0.0.1:0"
[listener.route]
kind = "passthrough"
default = "fallback"
[[listener.route.rule]]
sni = "*.example"
upstream = "wild"
[[listener.route.rule]]
sni = "app.example"
upstream = "app"
[[listener.route.rule]]
sni = "app.example"
alpn = "h2"
upstream = "app_h2"
[upstream.wild]
backends = ["127.0.0.1:9001"]
[upstream.app]
backends = ["127.0.0.1:9002"]
[upstream.app_h2]
backends = ["127.0.0.1:9003"]
[upstream.fallback]
backends = ["127.0.0.1:9004"]
"#;

#[test]
fn passthrough_rules_pick_exact_then_alpn_then_wildcard_then_default() {
    let c = Config::from_toml(PASSTHROUGH, "t.toml", Path::new("."), &[]).unwrap();
    let Route::Passthrough(p) = &c.listeners[0].route else {
        panic!("passthrough route expected")
    };
    assert_eq!(p.hello_timeout, Duration::from_secs(10));
    let name = |i: Option<usize>| i.map(|i| c.upstreams[i].name.as_str());
    let h2 = [b"h2".to_vec(), b"http/1.1".to_vec()];
    assert_eq!(name(p.pick(Some("app.example"), &h2)), Some("app_h2"));
    assert_eq!(name(p.pick(Some("app.example"), &[])), Some("app"));
    assert_eq!(name(p.pick(Some("b.example"), &h2)), Some("wild"));
    // One label only: the wildcard's suffix must follow a label.
    assert_eq!(name(p.pick(Some("example"), &[])), Some("fallback"));
    assert_eq!(name(p.pick(None, &h2)), Some("fallback"));
    let closed = PASSTHROUGH.replace("default = \"fallback\"\n", "");
    let c = Config::from_toml(&closed, "t.toml", Path::new("."), &[]).unwrap();
    let Route::Passthrough(p) = &c.listeners[0].route else {
        panic!("passthrough route expected")
    };
    assert_eq!(p.pick(Some("other.test"), &[]), None);
    assert_eq!(p.pick(None, &[]), None);
}

#[test]
fn passthrough_listeners_refuse_tls_settings_and_unknown_groups() {
    let text = PASSTHROUGH
        .replace(
            "address = \"127.0.0.1:0\"\n",
            "address = \"127.0.0.1:0\"\nalpn = [\"h2\"]\nprefer_server_ciphers = false\nclient_auth = { ca = \"inline:c\" }\n[[listener.certificate]]\ncert = \"inline:c\"\nkey = \"inline:k\"\n",
        )
        .replace("upstream = \"wild\"", "upstream = \"nowhere\"")
        .replace("default = \"fallback\"", "default = \"gone\"\nhello_timeout = \"0s\"");
    let e = Config::from_toml(&text, "t.toml", Path::new("."), &pems()).unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "listener[0].certificate",
            "listener[0].client_auth",
            "listener[0].alpn",
            "listener[0].prefer_server_ciphers",
            "listener[0].route.rule[0].upstream",
            "listener[0].route.default",
            "listener[0].route.hello_timeout",
        ],
        "{e}"
    );
    assert!(
        e.problems[0].reason.contains("does not terminate TLS"),
        "{e}"
    );
    assert!(e.problems[4].reason.contains("[upstream.nowhere]"), "{e}");
    let empty =
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[listener.route]\nkind = \"passthrough\"\n";
    let e = Config::from_toml(empty, "t.toml", Path::new("."), &[]).unwrap_err();
    assert_eq!(e.problems[0].field, "listener[0].route", "{e}");
}

#[test]
fn upstream_groups_take_tls_except_under_passthrough() {
    let text = HTTP.replace(
        "pool_size = 8",
        "pool_size = 8\ntls = { ca = \"inline:c\", server_name = \"api.internal\" }",
    );
    let c = Config::from_toml(&text, "u.toml", Path::new("."), &pems()).unwrap();
    let api = c.upstreams.iter().find(|u| u.name == "api").unwrap();
    let tls = api.tls.as_ref().expect("tls");
    assert_eq!(
        tls.server_name,
        Some(rustls::pki_types::ServerName::try_from("api.internal").unwrap())
    );
    // Loaded again, the group counts as changed (its files are re-read).
    let again = Config::from_toml(&text, "u.toml", Path::new("."), &pems()).unwrap();
    assert!(again.upstreams.iter().all(|u| u.name != "api" || u != api));
    let bad = HTTP.replace(
        "pool_size = 8",
        "pool_size = 8\ntls = { ca = \"/nonexistent/ca.pem\" }",
    );
    let e = Config::from_toml(&bad, "u.toml", Path::new("."), &pems()).unwrap_err();
    assert_eq!(e.problems[0].field, "upstream.api.tls.ca", "{e}");
    let e = Config::from_toml(
        &PASSTHROUGH.replace(
            "[upstream.app]\nbackends = [\"127.0.0.1:9002\"]",
            "[upstream.app]\nbackends = [\"127.0.0.1:9002\"]\ntls = { ca = \"inline:c\" }\nsend_proxy = \"v1\"",
        ),
        "p.toml",
        Path::new("."),
        &pems(),
    )
    .unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "listener[0].route.rule[1].upstream",
            "listener[0].route.rule[1].upstream"
        ],
        "{e}"
    );
    assert!(e.problems[0].reason.contains("has tls"), "{e}");
    assert!(e.problems[1].reason.contains("send_proxy"), "{e}");
}

/// A passthrough route's backends get the client's TLS: an HTTP check in
/// the clear would fail on every one and mark them all down. Refused, and
/// a connect check (`check = "tcp"`) taken instead, with no request
/// fields.
#[test]
fn health_checks_are_http_or_tcp_and_tcp_under_passthrough() {
    let with = |health: &str| {
        let text = PASSTHROUGH.replace(
            "[upstream.app]\nbackends = [\"127.0.0.1:9002\"]",
            &format!(
                "[upstream.app]\nbackends = [\"127.0.0.1:9002\"]\n[upstream.app.health]\n{health}"
            ),
        );
        assert_ne!(text, PASSTHROUGH);
        Config::from_toml(&text, "p.toml", Path::new("."), &pems())
    };
    let c = with("check = \"tcp\"\ninterval = \"5s\"").unwrap();
    let app = c.upstreams.iter().find(|u| u.name == "app").unwrap();
    let h = app.health.as_ref().expect("health");
    assert_eq!(
        (h.kind, h.interval),
        (HealthKind::Tcp, Duration::from_secs(5))
    );
    for (health, field, says) in [
        (
            "path = \"/healthz\"",
            "listener[0].route.rule[1].upstream",
            "in the clear",
        ),
        (
            "check = \"http\"",
            "listener[0].route.rule[1].upstream",
            "check = \"tcp\"",
        ),
        (
            "check = \"tcp\"\npath = \"/\"",
            "upstream.app.health.path",
            "sends no request",
        ),
        (
            "check = \"tcp\"\nhost = \"a\"",
            "upstream.app.health.host",
            "sends no request",
        ),
        ("check = \"ping\"", "upstream.app.health.check", "\"ping\""),
    ] {
        let e = with(health).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{health}: {e}");
        assert_eq!(e.problems[0].field, field, "{health}: {e}");
        assert!(e.problems[0].reason.contains(says), "{health}: {e}");
    }
    // An HTTP route's group takes either; the default is "http", GET /.
    let c = Config::from_toml(
        &format!("{HTTP}[upstream.web.health]\n"),
        "h.toml",
        Path::new("."),
        &pems(),
    )
    .unwrap();
    let web = c.upstreams.iter().find(|u| u.name == "web").unwrap();
    let h = web.health.as_ref().expect("health");
    assert_eq!((h.kind, h.path.as_str()), (HealthKind::Http, "/"));
}

#[test]
fn upstream_tls_is_checked_at_load() {
    let with = |tls: &str| {
        let text = GOOD.replace(
            "backends = [\"127.0.0.1:9\"]",
            &format!("backends = [\"127.0.0.1:9\"]\ntls = {{ {tls} }}"),
        );
        Config::from_toml(&text, "t.toml", Path::new("."), &pems())
    };
    let c = with("ca = \"inline:c\", server_name = \"db.internal\"").unwrap();
    let Route::Tcp(t) = &c.listeners[0].route else {
        panic!("tcp route expected")
    };
    let tls = t.tls.as_ref().expect("tls");
    assert_eq!(tls.verify_depth, 1);
    assert!(tls.verify_name && tls.session_reuse && tls.client_cert.is_none());
    assert_eq!(
        tls.server_name,
        Some(rustls::pki_types::ServerName::try_from("db.internal").unwrap())
    );
    let c =
        with("ca = \"inline:c\", client_cert = \"inline:c\", client_key = \"inline:k\"").unwrap();
    let Route::Tcp(t) = &c.listeners[0].route else {
        panic!("tcp route expected")
    };
    assert!(t.tls.as_ref().unwrap().client_cert.is_some());
    let e = with(
        "ca = \"/nonexistent/ca.pem\", verify_depth = 0, server_name = \"bad name!\", versions = [\"1.1\"], client_cert = \"inline:c\"",
    )
    .unwrap_err();
    let fields: Vec<&str> = e.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "listener[0].route.tls.verify_depth",
            "listener[0].route.tls.ca",
            "listener[0].route.tls.server_name",
            "listener[0].route.tls.versions[0]",
            "listener[0].route.tls",
        ],
        "{e}"
    );
    assert!(e.problems[1].reason.contains("/nonexistent/ca.pem"), "{e}");
    assert!(e.problems[4].reason.contains("go together"), "{e}");
    let e = with("ca = \"inline:c\", client_cert = \"inline:k\", client_key = \"inline:k\"")
        .unwrap_err();
    assert_eq!(
        e.problems[0].field, "listener[0].route.tls.client_cert.cert",
        "{e}"
    );
}

/// A file the config names is read whole only if it is a regular file of
/// bounded size, and the refusal names the field. Read whole with no
/// bound as before, `/dev/zero` as a certificate would fill memory, and a
/// FIFO would block the load (a reload, or `ktern check`) until some
/// writer came: neither case could return.
#[test]
fn named_files_that_are_devices_fifos_or_too_big_are_refused_by_field() {
    let dir = std::env::temp_dir().join(format!("ktern-cfg-capped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("chain.fifo");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for (cert, want) in [
        (
            "/dev/zero".to_string(),
            "/dev/zero is not a regular file".to_string(),
        ),
        (
            fifo.display().to_string(),
            format!("{} is not a regular file", fifo.display()),
        ),
    ] {
        let text = GOOD.replace("inline:c", &cert);
        let e = Config::from_toml(&text, "t.toml", &dir, &pems()).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].field, "listener[0].certificate[0].cert");
        assert!(e.problems[0].reason.contains(&want), "{e}");
    }
    // Past the cap (small here), by its size; and by what was read, for a
    // file whose size says less than it holds (as one that grew after
    // the size check, or a /proc file, sized 0): one byte more than the
    // cap is read, then refused.
    let big = dir.join("big.pem");
    std::fs::write(&big, [b'x'; 10]).unwrap();
    assert_eq!(read_capped(&big, 10, "a PEM file").unwrap().len(), 10);
    let e = read_capped(&big, 9, "a PEM file").unwrap_err();
    assert!(
        e.ends_with("big.pem has 10 bytes; a PEM file holds at most 9"),
        "{e}"
    );
    let proc = Path::new("/proc/self/status");
    assert_eq!(std::fs::metadata(proc).unwrap().len(), 0);
    let e = read_capped(proc, 9, "a PEM file").unwrap_err();
    assert!(
        e.ends_with("status has 10 bytes; a PEM file holds at most 9"),
        "{e}"
    );
    assert!(read_text_capped(&big, "a PEM file").is_ok());
    std::fs::write(&big, [0xff, 0xfe]).unwrap();
    let e = read_text_capped(&big, "a PEM file").unwrap_err();
    assert!(e.ends_with("big.pem: not UTF-8 text"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
