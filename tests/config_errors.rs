//! `streamgate check` as an operator runs it: the real binary on files in a temporary
//! directory, exit 2 with a message naming the file, line and key, or exit 0 and the route table.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// `[listen]` and one `[[cert]]` on lines 1 to 6; what a test appends starts on line 7.
const HEAD: &str = r#"[listen]
https = "127.0.0.1:8443"

[[cert]]
cert = "certs/a.pem"
key = "certs/a.key"
"#;

const ROUTE: &str = r#"
[[route]]
path = "/api"
backends = ["http://127.0.0.1:9000", "http://127.0.0.1:9001"]
"#;

/// A temporary directory that `streamgate check` runs in, so relative paths in configs and
/// in messages are the ones written here.
struct Dir {
    dir: TempDir,
}

impl Dir {
    fn new() -> Dir {
        let dir = TempDir::new().expect("create temp dir");
        fs::create_dir(dir.path().join("certs")).expect("create certs dir");
        Dir { dir }
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, contents).expect("write test file");
        path
    }

    /// A fresh self-signed certificate and its key at `certs/<stem>.pem` and `.key`.
    fn cert(&self, stem: &str, name: &str) {
        let generated =
            rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("generate cert");
        self.write(&format!("certs/{stem}.pem"), &generated.cert.pem());
        self.write(
            &format!("certs/{stem}.key"),
            &generated.signing_key.serialize_pem(),
        );
    }

    /// Runs `streamgate check --config streamgate.toml` here, with `config` as the file.
    fn check(&self, config: &str) -> Output {
        self.write("streamgate.toml", config);
        self.run(|cmd| {
            cmd.args(["check", "--config", "streamgate.toml"]);
        })
    }

    fn run(&self, args: impl FnOnce(&mut Command)) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamgate"));
        cmd.current_dir(self.dir.path())
            .env_remove("STREAMGATE_CONFIG")
            .env("RUST_LOG", "warn");
        args(&mut cmd);
        cmd.output().expect("run streamgate")
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts exit code 2 and a stderr that starts with `streamgate: <want>`.
fn assert_refused(out: &Output, want: &str) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit code\nstdout: {}\nstderr: {err}",
        stdout(out)
    );
    let want = format!("streamgate: {want}");
    assert!(
        err.starts_with(&want),
        "stderr:\n  got  {err}\n  want {want}..."
    );
}

fn assert_valid(out: &Output) -> String {
    let text = stdout(out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "exit code\nstdout: {text}\nstderr: {}",
        stderr(out)
    );
    text
}

#[test]
fn check_refuses_bad_toml_with_file_and_line() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "{HEAD}\n[[route]]\npath = \"/api\nbackends = [\"http://127.0.0.1:9000\"]\n"
    ));
    assert_refused(&out, "streamgate.toml:9:");
}

#[test]
fn check_refuses_unknown_key_naming_it() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "{HEAD}\n[[route]]\npath = \"/api\"\nbackend = \"http://127.0.0.1:9000\"\n"
    ));
    assert_refused(&out, "streamgate.toml:10:1: unknown field `backend`");
}

#[test]
fn check_refuses_bad_duration_naming_the_key() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!("{HEAD}{ROUTE}connect_timeout = \"5 parsecs\"\n"));
    assert_refused(
        &out,
        r#"streamgate.toml:11:19: route[0].connect_timeout: expected a duration such as "500ms", "15s" or "5m", got "5 parsecs""#,
    );
}

#[test]
fn check_refuses_a_config_without_routes() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(HEAD);
    assert_refused(
        &out,
        "streamgate.toml: no [[route]]: add at least one route",
    );
}

#[test]
fn check_refuses_a_backend_that_is_not_plain_http() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let cases = [
        (
            "https://x:1",
            r#"streamgate.toml:9:38: route[0].backends[1]: expected http://host:port (backends are plain HTTP; TLS ends at the gateway), got "https://x:1""#,
        ),
        (
            "localhost:80",
            r#"streamgate.toml:9:38: route[0].backends[1]: expected http://host:port (backends are plain HTTP; TLS ends at the gateway), got "localhost:80""#,
        ),
    ];
    for (backend, want) in cases {
        let out = dir.check(&format!(
            "{HEAD}\n[[route]]\nbackends = [\"http://127.0.0.1:9000\", \"{backend}\"]\n"
        ));
        assert_refused(&out, want);
    }
}

#[test]
fn check_refuses_a_missing_certificate_file_naming_the_path() {
    let dir = Dir::new();
    let out = dir.check(&format!("{HEAD}{ROUTE}"));
    assert_refused(
        &out,
        "streamgate.toml:5:8: cert[0].cert: cannot read certificate file certs/a.pem: I/O error: No such file",
    );
    assert!(stderr(&out).contains("No such file"), "{}", stderr(&out));
}

#[test]
fn check_refuses_a_certificate_file_without_a_certificate() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    // A key where the certificate should be: PEM, but not a certificate.
    let key = fs::read_to_string(dir.dir.path().join("certs/a.key")).expect("read key");
    dir.write("certs/a.pem", &key);
    let out = dir.check(&format!("{HEAD}{ROUTE}"));
    assert_refused(
        &out,
        "streamgate.toml:5:8: cert[0].cert: no certificate found in certs/a.pem",
    );
}

#[test]
fn check_refuses_a_key_file_without_a_key() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let cert = fs::read_to_string(dir.dir.path().join("certs/a.pem")).expect("read cert");
    dir.write("certs/a.key", &cert);
    let out = dir.check(&format!("{HEAD}{ROUTE}"));
    assert_refused(
        &out,
        "streamgate.toml:6:7: cert[0].key: no private key found in certs/a.key",
    );
}

#[test]
fn check_refuses_a_key_that_does_not_match_its_certificate() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    dir.cert("b", "b.test");
    let out = dir.check(&format!(
        "[listen]\nhttps = \"127.0.0.1:8443\"\n\n[[cert]]\ncert = \"certs/a.pem\"\nkey = \"certs/b.key\"\n{ROUTE}"
    ));
    assert_refused(
        &out,
        "streamgate.toml:6:7: cert[0].key: private key certs/b.key does not match the certificate in certs/a.pem",
    );
}

#[test]
fn check_accepts_a_valid_config_and_prints_the_route_table() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "{HEAD}{ROUTE}\n[[route]]\nhost = \"a.test\"\npath = \"/ws\"\nstrip_prefix = true\nbackends = [\"http://127.0.0.1:9100\"]\n"
    ));
    let text = assert_valid(&out);
    assert!(text.starts_with("streamgate.toml: ok\n"), "{text}");
    assert!(text.contains("listen https 127.0.0.1:8443"), "{text}");
    assert!(text.contains(r#"names ["a.test"]"#), "{text}");
    assert!(!text.contains("EXPIRED"), "{text}");
    // Match order: the exact host first, then any host; each route's backends below it.
    let lines: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("routes"))
        .skip(1)
        .map(str::trim)
        .collect();
    let routes: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("->"))
        .collect();
    assert_eq!(routes.len(), 2, "{text}");
    assert_eq!(
        routes[0], "a.test/ws  (balance least_conn, retries 1, strip prefix)",
        "{text}"
    );
    assert_eq!(lines[1], "-> http://127.0.0.1:9100  weight 1", "{text}");
    assert!(
        routes[1].starts_with("*/api  (balance least_conn"),
        "{text}"
    );
    assert_eq!(lines[3], "-> http://127.0.0.1:9000  weight 1", "{text}");
    assert_eq!(lines[4], "-> http://127.0.0.1:9001  weight 1", "{text}");
}

#[test]
fn check_reads_the_config_named_by_streamgate_config() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    dir.write("other.toml", &format!("{HEAD}{ROUTE}"));
    let out = dir.run(|cmd| {
        cmd.arg("check").env("STREAMGATE_CONFIG", "other.toml");
    });
    let text = assert_valid(&out);
    assert!(text.starts_with("other.toml: ok\n"), "{text}");
}

#[test]
fn check_accepts_an_expired_certificate_but_marks_it() {
    let dir = Dir::new();
    let mut params =
        rcgen::CertificateParams::new(vec!["old.test".to_string()]).expect("cert params");
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let key = rcgen::KeyPair::generate().expect("generate key");
    let cert = params.self_signed(&key).expect("self-sign");
    dir.write("certs/a.pem", &cert.pem());
    dir.write("certs/a.key", &key.serialize_pem());

    let out = dir.check(&format!("{HEAD}{ROUTE}"));
    let text = assert_valid(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("cert "))
        .unwrap_or_else(|| panic!("a cert line in {text}"));
    assert!(line.contains(r#"names ["old.test"]"#), "{line}");
    assert!(line.contains("2001"), "{line}");
    assert!(line.ends_with("EXPIRED"), "{line}");
}

/// The shipped example must keep passing `check`: run it with generated certificates where
/// its `[[cert]]` paths point (they are not committed, see certs/README.md).
#[test]
fn shipped_example_config_passes_check() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/streamgate.toml");
    let text = fs::read_to_string(&example).expect("read config/streamgate.toml");
    assert!(
        text.contains("cert = \"certs/example.pem\"")
            && text.contains("key = \"certs/example.key\""),
        "the example's [[cert]] should point at certs/example.pem and certs/example.key"
    );
    let dir = Dir::new();
    dir.cert("example", "example.com");
    fs::create_dir(dir.dir.path().join("config")).expect("create config dir");
    dir.write("config/streamgate.toml", &text);
    // The example JWKS (public keys only) that a switched-on `jwt_jwks` names.
    let jwks = fs::read_to_string(example.with_file_name("jwks.example.json")).expect("read JWKS");
    dir.write("config/jwks.example.json", &jwks);

    let out = dir.run(|cmd| {
        cmd.args(["check", "--config", "config/streamgate.toml"]);
    });
    let table = assert_valid(&out);
    assert!(table.starts_with("config/streamgate.toml: ok\n"), "{table}");
    assert!(table.contains("-> http://127.0.0.1:"), "{table}");

    // Its switched-off settings ("#key = value", and whole switched-off tables: "#[acme]",
    // "#[[route]]") must be real keys with valid values too.
    let all_on: String = text
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest)
                if rest.starts_with(|c: char| c.is_ascii_lowercase())
                    || rest.starts_with("[[")
                    || rest
                        .strip_prefix('[')
                        .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_lowercase())) =>
            {
                rest
            }
            _ => line,
        })
        .map(|line| format!("{line}\n"))
        .collect();
    assert_ne!(all_on, text, "the example has switched-off settings");
    dir.write("config/all.toml", &all_on);
    let out = dir.run(|cmd| {
        cmd.args(["check", "--config", "config/all.toml"]);
    });
    let table = assert_valid(&out);
    assert!(
        table.contains("listen http  0.0.0.0:8080 (redirects to https)"),
        "plain words, not Rust names: {table}"
    );
    assert!(table.contains("listen admin 127.0.0.1:9901"), "{table}");
}

/// Every key the config structs accept (`pub name:` in src/config/raw.rs) appears in the
/// shipped example, as a setting, a switched-off setting or a table header.
#[test]
fn shipped_example_names_every_config_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let raw = fs::read_to_string(root.join("src/config/raw.rs")).expect("read raw.rs");
    let example = fs::read_to_string(root.join("config/streamgate.toml")).expect("read example");
    let keys: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split_once(": ").map(|(name, _)| name))
        .filter(|name| {
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .collect();
    assert!(keys.len() > 30, "found the fields of raw.rs: {keys:?}");
    let missing: Vec<&str> = keys
        .into_iter()
        .filter(|key| {
            !example.lines().any(|line| {
                let line = line.strip_prefix('#').unwrap_or(line);
                line.starts_with(&format!("{key} = "))
                    || line.starts_with(&format!("[{key}]"))
                    || line.starts_with(&format!("[[{key}]]"))
                    || (line.starts_with('[') && line.ends_with(&format!(".{key}]")))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "config/streamgate.toml does not show {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The upstream fleet: balance, hash_key, weights, discovery, health

#[test]
fn check_refuses_an_unknown_balance_naming_it() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!("{HEAD}{ROUTE}balance = \"random\"\n"));
    assert_refused(&out, "streamgate.toml:11:11: route[0].balance:");
    assert!(stderr(&out).contains("random"), "{}", stderr(&out));
}

#[test]
fn check_refuses_hash_key_without_balance_hash() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    for balance in ["", "balance = \"least_conn\"\n", "balance = \"cookie\"\n"] {
        let out = dir.check(&format!("{HEAD}{ROUTE}hash_key = \"client_ip\"\n{balance}"));
        assert_refused(&out, "streamgate.toml:11:12: route[0].hash_key:");
    }
}

#[test]
fn check_refuses_a_weight_out_of_range() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    for weight in ["0", "101", "-1"] {
        let out = dir.check(&format!(
            "{HEAD}\n[[route]]\npath = \"/api\"\nbackends = [\"http://127.0.0.1:9000\", {{ url = \"http://127.0.0.1:9001\", weight = {weight} }}]\n"
        ));
        assert_refused(&out, "streamgate.toml:10:80: route[0].backends[1].weight:");
    }
}

#[test]
fn check_refuses_an_unknown_discovery() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "{HEAD}\n[[route]]\nbackends = [{{ url = \"http://chat.default.svc.cluster.local:9000\", discover = \"srv\" }}]\n"
    ));
    assert_refused(&out, "streamgate.toml:9:78: route[0].backends[0].discover:");
    assert!(stderr(&out).contains("srv"), "{}", stderr(&out));
}

#[test]
fn check_refuses_a_health_timeout_not_below_its_interval() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    for (interval, timeout) in [("1s", "2s"), ("1s", "1s")] {
        let out = dir.check(&format!(
            "{HEAD}{ROUTE}\n[route.health]\npath = \"/healthz\"\ninterval = \"{interval}\"\ntimeout = \"{timeout}\"\n"
        ));
        assert_refused(&out, "streamgate.toml:15:11: route[0].health.timeout:");
    }
}

#[test]
fn check_accepts_every_fleet_key() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        r#"{HEAD}
[[route]]
path = "/chat"
backends = [
  "http://127.0.0.1:9000",
  {{ url = "http://127.0.0.1:9001", weight = 2 }},
  {{ url = "http://localhost:9002", discover = "dns" }},
]
balance = "least_conn"
retries = 0
slow_start = "30s"

[route.health]
path = "/healthz"
interval = "5s"
timeout = "2s"
unhealthy_after = 2
healthy_after = 2

[route.outlier]
consecutive_failures = 3
ejection = "10s"

[[route]]
path = "/hash"
backends = ["http://127.0.0.1:9100", {{ url = "http://127.0.0.1:9101", weight = 100 }}]
balance = "hash"
hash_key = "header:X-User"

[[route]]
path = "/ip"
backends = ["http://127.0.0.1:9200"]
balance = "hash"
hash_key = "client_ip"

[[route]]
path = "/room"
backends = ["http://127.0.0.1:9300"]
balance = "hash"
hash_key = "query:room"

[[route]]
path = "/session"
backends = ["http://127.0.0.1:9400"]
balance = "hash"
hash_key = "cookie:session"

[[route]]
path = "/sticky"
backends = ["http://127.0.0.1:9500", "http://127.0.0.1:9501"]
balance = "cookie"
affinity_cookie = "pin"
retries = 1

[[route]]
path = "/rr"
backends = ["http://127.0.0.1:9600"]
balance = "round_robin"
"#
    ));
    let text = assert_valid(&out);
    assert!(text.starts_with("streamgate.toml: ok\n"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Configuration that cannot hurt: ranges, origins, clashing listeners, repeated routes

#[test]
fn check_refuses_a_zero_ping_interval() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "{HEAD}{ROUTE}[route.websocket]\nping_interval = \"0s\"\n"
    ));
    assert_refused(
        &out,
        "streamgate.toml:12:17: route[0].websocket.ping_interval: must be more than 0s (leave the key out for none)",
    );
}

#[test]
fn check_refuses_a_zero_timeout() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "{HEAD}\n[limits]\ntls_handshake_timeout = \"0s\"\n{ROUTE}"
    ));
    assert_refused(
        &out,
        "streamgate.toml:9:25: limits.tls_handshake_timeout: must be more than 0s",
    );
}

#[test]
fn check_refuses_an_absurd_duration_without_panicking() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    for value in ["300000000000y", "18446744073709551615s"] {
        let out = dir.check(&format!("{HEAD}{ROUTE}connect_timeout = \"{value}\"\n"));
        assert_refused(
            &out,
            &format!(
                "streamgate.toml:11:19: route[0].connect_timeout: must be at most 365d, got \"{value}\""
            ),
        );
        assert!(!stderr(&out).contains("panic"), "{}", stderr(&out));
    }
}

#[test]
fn check_refuses_a_wildcard_origin_with_a_hint() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "{HEAD}{ROUTE}[route.websocket]\nallowed_origins = [\"*\"]\n"
    ));
    assert_refused(
        &out,
        r#"streamgate.toml:12:20: route[0].websocket.allowed_origins[0]: "*" is not an origin (omit allowed_origins to allow any origin)"#,
    );
}

#[test]
fn check_refuses_an_origin_without_a_scheme_with_a_hint() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "{HEAD}{ROUTE}[route.websocket]\nallowed_origins = [\"example.com\"]\n"
    ));
    assert_refused(
        &out,
        r#"streamgate.toml:12:20: route[0].websocket.allowed_origins[0]: expected an origin such as "https://chat.example.com" (scheme://host[:port]), got "example.com" (write "https://example.com")"#,
    );
}

#[test]
fn check_refuses_two_listeners_on_one_address() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "[listen]\nhttps = \"127.0.0.1:8443\"\nadmin = \"127.0.0.1:8443\"\n{}{ROUTE}",
        &HEAD[HEAD.find("\n[[cert]]").expect("HEAD has a [[cert]]")..]
    ));
    assert_refused(
        &out,
        "streamgate.toml:3:9: listen.admin: same address as listen.https (127.0.0.1:8443); each listener needs its own",
    );
}

#[test]
fn check_refuses_two_routes_with_the_same_host_and_path() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "{HEAD}{ROUTE}\n[[route]]\npath = \"/api/\"\nbackends = [\"http://127.0.0.1:9100\"]\n"
    ));
    assert_refused(
        &out,
        "streamgate.toml:12:1: route[1]: same host and path as route[0] (*/api)",
    );
}

#[test]
fn check_warns_of_a_route_host_no_certificate_covers() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "{HEAD}{ROUTE}\n[[route]]\nhost = \"a.test\"\nbackends = [\"http://127.0.0.1:9100\"]\n\n[[route]]\nhost = \"b.test\"\nbackends = [\"http://127.0.0.1:9200\"]\n"
    ));
    let text = assert_valid(&out);
    assert!(text.starts_with("streamgate.toml: ok\n"), "{text}");
    let err = stderr(&out);
    assert_eq!(
        err.trim_end(),
        r#"warning: route[2] host "b.test" is not covered by any certificate (clients will see a name mismatch)"#,
        "only b.test is uncovered"
    );
}

#[test]
fn version_names_the_commit_and_the_build_date() {
    let dir = Dir::new();
    let out = dir.run(|cmd| {
        cmd.arg("--version");
    });
    let text = assert_valid(&out);
    let line = text.trim();
    let rest = line
        .strip_prefix(concat!(
            "streamgate ",
            env!("CARGO_PKG_VERSION"),
            " (commit "
        ))
        .unwrap_or_else(|| panic!("{line}"));
    let (commit, date) = rest
        .strip_suffix(')')
        .and_then(|r| r.split_once(", built "))
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{line}"
    );
    let parts: Vec<&str> = date.split('-').collect();
    assert!(
        parts.len() == 3 && parts[0].len() == 4 && parts[1].len() == 2 && parts[2].len() == 2,
        "YYYY-MM-DD: {line}"
    );
}

#[test]
fn check_refuses_a_backlog_of_zero() {
    let dir = Dir::new();
    dir.cert("a", "a.test");
    let out = dir.check(&format!(
        "[listen]\nhttps = \"127.0.0.1:8443\"\nbacklog = 0\n\n[[cert]]\ncert = \"certs/a.pem\"\nkey = \"certs/a.key\"\n{ROUTE}"
    ));
    assert_refused(
        &out,
        "streamgate.toml:3:11: listen.backlog: expected a whole number from 1 to 65535, got 0",
    );
}
