//! Config validation, table-driven: a valid file gives the right values and defaults, and each
//! malformed file gives an error naming the file, the line and column, and the key.

use std::path::Path;
use std::time::Duration;

use super::*;

const FILE: &str = "config/test.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new(FILE), text)
}

fn error(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("config should be refused:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// `[listen]` and one `[[cert]]`: lines 1 to 6, so a route appended after it starts on line 7.
const HEAD: &str = r#"[listen]
https = "127.0.0.1:8443"

[[cert]]
cert = "certs/a.pem"
key = "certs/a.key"
"#;

const ROUTE: &str = r#"
[[route]]
path = "/"
backends = ["http://127.0.0.1:9000"]
"#;

#[test]
fn full_config_parses_with_every_value() {
    let text = r#"
[listen]
https = "0.0.0.0:8443"
http = "[::]:8080"
http_mode = "proxy"
admin = "127.0.0.1:9900"

[limits]
header_read_timeout = "5s"
idle_timeout = "90s"
max_header_size = 16384
tls_handshake_timeout = "2s"
max_connections = 500
h2_max_concurrent_streams = 100
h2_max_pending_reset_streams = 10
h2_max_local_error_reset_streams = 50

[runtime]
worker_threads = 3

[shutdown]
grace = "1m"
delay = "500ms"

[[cert]]
cert = "certs/a.pem"
key = "certs/a.key"

[[cert]]
cert = "certs/b.pem"
key = "certs/b.key"

[[route]]
host = "Chat.Example.com"
path = "/ws/"
backends = ["http://10.0.0.1:9000", "http://chat-backend:9001/"]
strip_prefix = true
connect_timeout = "250ms"
response_header_timeout = "90s"

[route.websocket]
ping_interval = "20s"
idle_timeout = "10m"
max_message_size = 1048576
max_connections = 1000
allowed_origins = ["https://Chat.Example.com/", "https://other.example"]

[route.sse]
heartbeat = "15s"
idle_timeout = "2h"

[[route]]
host = "*.example.com"
backends = ["http://[::1]:9002"]
"#;
    let c = parse(text).expect("full config is valid");
    assert_eq!(c.path, Path::new(FILE));

    assert_eq!(c.listen.https, "0.0.0.0:8443".parse().expect("addr"));
    assert_eq!(c.listen.http, Some("[::]:8080".parse().expect("addr")));
    assert_eq!(c.listen.http_mode, HttpMode::Proxy);
    assert_eq!(
        c.listen.admin,
        Some("127.0.0.1:9900".parse().expect("addr"))
    );

    assert_eq!(c.limits.header_read_timeout, Duration::from_secs(5));
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(90));
    assert_eq!(c.limits.max_header_size, 16384);
    assert_eq!(c.limits.tls_handshake_timeout, Duration::from_secs(2));
    assert_eq!(c.limits.max_connections, 500);
    assert_eq!(c.limits.h2_max_concurrent_streams, 100);
    assert_eq!(c.limits.h2_max_pending_reset_streams, 10);
    assert_eq!(c.limits.h2_max_local_error_reset_streams, 50);
    assert_eq!(c.worker_threads, Some(3));
    assert_eq!(c.shutdown.grace, Duration::from_secs(60));
    assert_eq!(c.shutdown.delay, Duration::from_millis(500));

    let certs: Vec<(&Path, &Path)> = c
        .certs
        .iter()
        .map(|f| (f.cert.as_path(), f.key.as_path()))
        .collect();
    assert_eq!(
        certs,
        [
            (Path::new("certs/a.pem"), Path::new("certs/a.key")),
            (Path::new("certs/b.pem"), Path::new("certs/b.key")),
        ]
    );

    assert_eq!(c.routes.len(), 2);
    let r = &c.routes[0];
    assert_eq!(r.index, 0);
    assert_eq!(r.host, HostMatch::Exact("chat.example.com".into()));
    assert_eq!(r.path, "/ws", "trailing slash is dropped");
    let backends: Vec<String> = r.backends.iter().map(|b| b.authority.to_string()).collect();
    assert_eq!(backends, ["10.0.0.1:9000", "chat-backend:9001"]);
    assert!(r.strip_prefix);
    assert_eq!(r.connect_timeout, Duration::from_millis(250));
    assert_eq!(r.response_header_timeout, Duration::from_secs(90));
    assert_eq!(r.websocket.ping_interval, Some(Duration::from_secs(20)));
    assert_eq!(r.websocket.idle_timeout, Duration::from_secs(600));
    assert_eq!(r.websocket.max_message_size, Some(1_048_576));
    assert_eq!(r.websocket.max_connections, Some(1000));
    assert_eq!(
        r.websocket.allowed_origins.as_deref(),
        Some(
            &[
                "https://chat.example.com".to_string(),
                "https://other.example".to_string()
            ][..]
        )
    );
    assert_eq!(r.sse.heartbeat, Some(Duration::from_secs(15)));
    assert_eq!(r.sse.idle_timeout, Duration::from_secs(7200));
    assert_eq!(r.name(), "chat.example.com/ws");

    let r = &c.routes[1];
    assert_eq!(r.index, 1);
    assert_eq!(r.host, HostMatch::Wildcard(".example.com".into()));
    assert_eq!(r.path, "");
    assert_eq!(r.backends[0].authority.to_string(), "[::1]:9002");
    assert_eq!(r.name(), "*.example.com/");
}

#[test]
fn minimal_config_gets_the_defaults() {
    let c = parse(&format!("{HEAD}{ROUTE}")).expect("minimal config is valid");

    assert_eq!(c.listen.http, None);
    assert_eq!(c.listen.http_mode, HttpMode::Redirect);
    assert_eq!(c.listen.admin, None);

    assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.limits.max_header_size, 32 * 1024);
    assert_eq!(c.limits.tls_handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.max_connections, 10_000);
    assert_eq!(c.limits.h2_max_concurrent_streams, 256);
    assert_eq!(c.limits.h2_max_pending_reset_streams, 20);
    assert_eq!(c.limits.h2_max_local_error_reset_streams, 1024);
    assert_eq!(c.worker_threads, None);
    assert_eq!(c.shutdown.grace, Duration::from_secs(30));
    assert_eq!(c.shutdown.delay, Duration::ZERO);

    let r = &c.routes[0];
    assert_eq!(r.host, HostMatch::Any);
    assert_eq!(r.path, "", "\"/\" is the empty prefix");
    assert!(!r.strip_prefix);
    assert_eq!(r.connect_timeout, Duration::from_secs(5));
    assert_eq!(r.response_header_timeout, Duration::from_secs(60));
    assert_eq!(r.websocket.ping_interval, None);
    assert_eq!(r.websocket.idle_timeout, Duration::from_secs(3600));
    assert_eq!(r.websocket.max_message_size, None);
    assert_eq!(r.websocket.max_connections, None);
    assert_eq!(r.websocket.allowed_origins, None);
    assert_eq!(r.sse.heartbeat, None);
    assert_eq!(r.sse.idle_timeout, Duration::from_secs(3600));
    assert_eq!(r.name(), "*/");
}

#[test]
fn empty_websocket_and_sse_tables_get_the_defaults() {
    let c = parse(&format!("{HEAD}{ROUTE}[route.websocket]\n[route.sse]\n"))
        .expect("empty tables are valid");
    let r = &c.routes[0];
    assert_eq!(r.websocket.idle_timeout, Duration::from_secs(3600));
    assert_eq!(r.websocket.ping_interval, None);
    assert_eq!(r.sse.idle_timeout, Duration::from_secs(3600));
    assert_eq!(r.sse.heartbeat, None);
}

/// Errors found while validating values: the whole message is pinned, from the file name to
/// the reason.
#[test]
fn invalid_values_name_file_line_column_and_key() {
    // (what is wrong, text after HEAD, the message)
    let cases = [
        (
            "backend with https",
            "[[route]]\nbackends = [\"https://x:1\"]\n",
            r#"config/test.toml:8:13: route[0].backends[0]: expected http://host:port (backends are plain HTTP; TLS ends at the gateway), got "https://x:1""#,
        ),
        (
            "backend without a scheme",
            "[[route]]\npath = \"/a\"\nbackends = [\"http://a:1\", \"localhost:80\"]\n",
            r#"config/test.toml:9:27: route[0].backends[1]: expected http://host:port (backends are plain HTTP; TLS ends at the gateway), got "localhost:80""#,
        ),
        (
            "backend with a path",
            "[[route]]\nbackends = [\"http://x:1/api\"]\n",
            r#"config/test.toml:8:13: route[0].backends[0]: expected http://host:port with no path, got "http://x:1/api""#,
        ),
        (
            "backend with a bad port",
            "[[route]]\nbackends = [\"http://x:port\"]\n",
            r#"config/test.toml:8:13: route[0].backends[0]: expected http://host:port, got "http://x:port""#,
        ),
        (
            "backend with a port out of range",
            "[[route]]\nbackends = [\"http://x:65536\"]\n",
            r#"config/test.toml:8:13: route[0].backends[0]: expected http://host:port, got "http://x:65536""#,
        ),
        (
            "no backends",
            "[[route]]\nbackends = []\n",
            r#"config/test.toml:8:12: route[0].backends: expected at least one backend such as "http://127.0.0.1:9000""#,
        ),
        (
            "bad duration in the second route",
            &format!("{ROUTE}\n[[route]]\npath = \"/slow\"\nconnect_timeout = \"5 parsecs\"\nbackends = [\"http://x:1\"]\n"),
            r#"config/test.toml:14:19: route[1].connect_timeout: expected a duration such as "500ms", "15s" or "5m", got "5 parsecs" ("#,
        ),
        (
            "bad duration in [route.sse]",
            &format!("{ROUTE}[route.sse]\nheartbeat = \"often\"\n"),
            r#"config/test.toml:12:13: route[0].sse.heartbeat: expected a duration such as "500ms", "15s" or "5m", got "often" ("#,
        ),
        (
            "bad duration in [route.websocket]",
            &format!("{ROUTE}[route.websocket]\nidle_timeout = \"-1s\"\n"),
            r#"config/test.toml:12:16: route[0].websocket.idle_timeout: expected a duration such as "500ms", "15s" or "5m", got "-1s" ("#,
        ),
        (
            "max_message_size below one",
            &format!("{ROUTE}[route.websocket]\nmax_message_size = 0\n"),
            "config/test.toml:12:20: route[0].websocket.max_message_size: expected a whole number from 1 to 18446744073709551615, got 0",
        ),
        (
            "host with a port",
            "[[route]]\nhost = \"chat.example.com:443\"\nbackends = [\"http://x:1\"]\n",
            r#"config/test.toml:8:8: route[0].host: expected a host name such as "chat.example.com" or "*.example.com" (no port), got "chat.example.com:443""#,
        ),
        (
            "wildcard in the middle",
            "[[route]]\nhost = \"*.*.example.com\"\nbackends = [\"http://x:1\"]\n",
            r#"config/test.toml:8:8: route[0].host: expected a host name such as "*.example.com", got "*.*.example.com""#,
        ),
        (
            "empty host label",
            "[[route]]\nhost = \"a..example.com\"\nbackends = [\"http://x:1\"]\n",
            r#"config/test.toml:8:8: route[0].host: expected a host name such as "chat.example.com" or "*.example.com" (no port), got "a..example.com""#,
        ),
        (
            "path without a leading slash",
            "[[route]]\npath = \"ws\"\nbackends = [\"http://x:1\"]\n",
            r#"config/test.toml:8:8: route[0].path: expected a path prefix such as "/ws", got "ws""#,
        ),
        (
            "path with a query",
            "[[route]]\npath = \"/ws?x=1\"\nbackends = [\"http://x:1\"]\n",
            r#"config/test.toml:8:8: route[0].path: expected a path prefix such as "/ws", got "/ws?x=1""#,
        ),
    ];
    for (what, routes, want) in cases {
        let got = error(&format!("{HEAD}{routes}"));
        assert!(
            got.starts_with(want),
            "{what}:\n  got  {got}\n  want {want}"
        );
    }
}

/// Errors in `[listen]`, `[limits]`, `[runtime]` and `[shutdown]`, which come before routes.
#[test]
fn invalid_sections_name_file_line_column_and_key() {
    let cases = [
        (
            "listen address without a port",
            "[listen]\nhttps = \"0.0.0.0\"\n",
            r#"config/test.toml:2:9: listen.https: expected an address and port such as "0.0.0.0:8443" or "[::]:8443", got "0.0.0.0""#,
        ),
        (
            "listen address with a host name",
            "[listen]\nhttps = \"127.0.0.1:8443\"\nhttp = \"localhost:8080\"\n",
            r#"config/test.toml:3:8: listen.http: expected an address and port such as "0.0.0.0:8443" or "[::]:8443", got "localhost:8080""#,
        ),
        (
            "bad http_mode",
            "[listen]\nhttps = \"127.0.0.1:8443\"\nhttp = \"127.0.0.1:8080\"\nhttp_mode = \"upgrade\"\n",
            r#"config/test.toml:4:13: listen.http_mode: expected "redirect" or "proxy", got "upgrade""#,
        ),
        (
            "max_header_size below hyper's minimum",
            "[listen]\nhttps = \"127.0.0.1:8443\"\n[limits]\nmax_header_size = 1024\n",
            "config/test.toml:4:19: limits.max_header_size: expected a whole number from 8192 to 16777216, got 1024",
        ),
        (
            "negative max_connections",
            "[listen]\nhttps = \"127.0.0.1:8443\"\n[limits]\nmax_connections = -1\n",
            "config/test.toml:4:19: limits.max_connections: expected a whole number from 1 to 10000000, got -1",
        ),
        (
            "bad header_read_timeout",
            "[listen]\nhttps = \"127.0.0.1:8443\"\n\n[limits]\nheader_read_timeout = \"10\"\n",
            r#"config/test.toml:5:23: limits.header_read_timeout: expected a duration such as "500ms", "15s" or "5m", got "10" ("#,
        ),
        (
            "zero worker threads",
            "[listen]\nhttps = \"127.0.0.1:8443\"\n[runtime]\nworker_threads = 0\n",
            "config/test.toml:4:18: runtime.worker_threads: expected a whole number from 1 to 1024, got 0",
        ),
        (
            "bad shutdown.grace",
            "[listen]\nhttps = \"127.0.0.1:8443\"\n[shutdown]\ngrace = \"5 parsecs\"\n",
            r#"config/test.toml:4:9: shutdown.grace: expected a duration such as "500ms", "15s" or "5m", got "5 parsecs" ("#,
        ),
    ];
    for (what, text, want) in cases {
        // The errors above come before the cert and route checks, so none are needed.
        let got = error(text);
        assert!(
            got.starts_with(want),
            "{what}:\n  got  {got}\n  want {want}"
        );
    }
}

/// Errors that TOML itself reports (syntax, unknown keys, wrong types): file, line and column
/// from the parser, and the offending key in its message.
#[test]
fn toml_errors_name_file_line_column_and_key() {
    let cases = [
        (
            "unterminated string",
            format!("{HEAD}\n[[route]]\npath = \"/ws\nbackends = [\"http://x:1\"]\n"),
            "config/test.toml:9:",
            &[][..],
        ),
        (
            "missing equals sign",
            "[listen]\nhttps \"127.0.0.1:8443\"\n".to_string(),
            "config/test.toml:2:",
            &[][..],
        ),
        (
            "unknown top-level key",
            format!("log_level = \"debug\"\n{HEAD}{ROUTE}"),
            "config/test.toml:1:1: ",
            &["unknown field `log_level`", "`listen`"][..],
        ),
        (
            "unknown key in [listen]",
            "[listen]\nhttps = \"127.0.0.1:8443\"\nhttp_port = 80\n".to_string(),
            "config/test.toml:3:1: ",
            &["unknown field `http_port`", "`http_mode`"][..],
        ),
        (
            "unknown key in [[route]]",
            format!("{HEAD}\n[[route]]\npath = \"/\"\nbackend = \"http://x:1\"\n"),
            "config/test.toml:10:1: ",
            &["unknown field `backend`", "`backends`"][..],
        ),
        (
            "unknown key in [route.websocket]",
            format!("{HEAD}{ROUTE}[route.websocket]\nping = \"5s\"\n"),
            "config/test.toml:12:1: ",
            &["unknown field `ping`", "`ping_interval`"][..],
        ),
        (
            "unknown table",
            format!("{HEAD}{ROUTE}[route.grpc]\n"),
            "config/test.toml:11:",
            &["unknown field `grpc`"][..],
        ),
        (
            "duration as a number",
            format!("{HEAD}\n[[route]]\nbackends = [\"http://x:1\"]\nconnect_timeout = 5\n"),
            "config/test.toml:10:19: ",
            &["invalid type: integer `5`, expected a string"][..],
        ),
        (
            "backends as a string",
            format!("{HEAD}\n[[route]]\nbackends = \"http://x:1\"\n"),
            "config/test.toml:9:12: ",
            &["invalid type: string \"http://x:1\", expected a sequence"][..],
        ),
    ];
    for (what, text, prefix, contains) in cases {
        let got = error(&text);
        assert!(
            got.starts_with(prefix),
            "{what}:\n  got  {got}\n  want {prefix}..."
        );
        for part in contains {
            assert!(
                got.contains(part),
                "{what}:\n  got  {got}\n  want it to contain {part}"
            );
        }
        assert!(!got.contains('\n'), "{what}: one line: {got}");
    }
}

/// Omissions: the message names the file and the section (serde puts a missing field at 1:1).
#[test]
fn missing_sections_name_the_file_and_what_to_add() {
    let cases = [
        (
            "no [[route]]",
            HEAD.to_string(),
            "config/test.toml: no [[route]]: add at least one route",
        ),
        (
            "no [[cert]]",
            format!("[listen]\nhttps = \"127.0.0.1:8443\"\n{ROUTE}"),
            "config/test.toml: no [[cert]]: the TLS listener needs at least one certificate and key",
        ),
        (
            "no [listen]",
            format!("[[cert]]\ncert = \"a\"\nkey = \"b\"\n{ROUTE}"),
            "config/test.toml:1:1: missing field `listen`",
        ),
        ("empty file", String::new(), "config/test.toml:1:1: missing field `listen`"),
    ];
    for (what, text, want) in cases {
        let got = error(&text);
        assert!(
            got.starts_with(want),
            "{what}:\n  got  {got}\n  want {want}"
        );
    }
}

#[test]
fn unreadable_file_names_the_path() {
    let e = Config::load(Path::new("/nonexistent/streamgate.toml")).expect_err("no such file");
    assert!(matches!(e, ConfigError::Read { .. }));
    let text = e.to_string();
    assert!(
        text == "/nonexistent/streamgate.toml: cannot read config file",
        "{text}"
    );
    let cause = std::error::Error::source(&e)
        .map(|s| s.to_string())
        .unwrap_or_default();
    assert!(
        cause.contains("No such file"),
        "the cause is kept as the source: {cause}"
    );
}

#[test]
fn columns_count_from_the_line_start_after_crlf() {
    let text = format!("{HEAD}{ROUTE}").replace('\n', "\r\n")
        + "[[route]]\r\npath = \"nope\"\r\nbackends = [\"http://x:1\"]\r\n";
    let got = error(&text);
    assert!(
        got.starts_with("config/test.toml:12:8: route[1].path: "),
        "{got}"
    );
}

/// Zero where zero would flood (pings, heartbeats) or end everything at once (timeouts).
#[test]
fn zero_durations_are_refused_where_zero_would_hurt() {
    let cases = [
        (
            format!("{ROUTE}[route.websocket]\nping_interval = \"0s\"\n"),
            r#"config/test.toml:12:17: route[0].websocket.ping_interval: must be more than 0s (leave the key out for none)"#,
        ),
        (
            format!("{ROUTE}[route.websocket]\nidle_timeout = \"0ms\"\n"),
            "config/test.toml:12:16: route[0].websocket.idle_timeout: must be more than 0s",
        ),
        (
            format!("{ROUTE}[route.sse]\nheartbeat = \"0s\"\n"),
            r#"config/test.toml:12:13: route[0].sse.heartbeat: must be more than 0s (leave the key out for none)"#,
        ),
        (
            format!("{ROUTE}[route.sse]\nidle_timeout = \"0s\"\n"),
            "config/test.toml:12:16: route[0].sse.idle_timeout: must be more than 0s",
        ),
        (
            format!("{ROUTE}connect_timeout = \"0s\"\n"),
            "config/test.toml:11:19: route[0].connect_timeout: must be more than 0s",
        ),
        (
            format!("{ROUTE}response_header_timeout = \"0s\"\n"),
            "config/test.toml:11:27: route[0].response_header_timeout: must be more than 0s",
        ),
        (
            format!("[limits]\nheader_read_timeout = \"0s\"\n{ROUTE}"),
            "config/test.toml:8:23: limits.header_read_timeout: must be more than 0s",
        ),
        (
            format!("[limits]\nidle_timeout = \"0s\"\n{ROUTE}"),
            "config/test.toml:8:16: limits.idle_timeout: must be more than 0s",
        ),
        (
            format!("[limits]\ntls_handshake_timeout = \"0s\"\n{ROUTE}"),
            "config/test.toml:8:25: limits.tls_handshake_timeout: must be more than 0s",
        ),
    ];
    for (text, want) in cases {
        let got = error(&format!("{HEAD}{text}"));
        assert_eq!(got, want);
    }
}

/// Zero stays valid where it means "off" or "at once" on purpose.
#[test]
fn zero_durations_are_accepted_where_zero_means_off() {
    let c = parse(&format!(
        "{HEAD}[shutdown]\ngrace = \"0s\"\ndelay = \"0s\"\n{ROUTE}[route.sse]\nshutdown_retry = \"0s\"\n"
    ))
    .expect("zero grace, delay and retry are valid");
    assert_eq!(c.shutdown.grace, Duration::ZERO);
    assert_eq!(c.shutdown.delay, Duration::ZERO);
    assert_eq!(c.routes[0].sse.shutdown_retry, Some(Duration::ZERO));
}

/// Every duration key, set to values humantime parses but an `Instant` cannot hold, is an
/// error naming the key, never a panic later.
#[test]
fn absurd_durations_are_refused_for_every_key() {
    let keys = [
        (
            "[limits]",
            "header_read_timeout",
            "limits.header_read_timeout",
        ),
        ("[limits]", "idle_timeout", "limits.idle_timeout"),
        (
            "[limits]",
            "tls_handshake_timeout",
            "limits.tls_handshake_timeout",
        ),
        ("[shutdown]", "grace", "shutdown.grace"),
        ("[shutdown]", "delay", "shutdown.delay"),
        ("[resolver]", "refresh", "resolver.refresh"),
        ("[[route]]", "connect_timeout", "route[0].connect_timeout"),
        (
            "[[route]]",
            "response_header_timeout",
            "route[0].response_header_timeout",
        ),
        ("[[route]]", "slow_start", "route[0].slow_start"),
        ("[route.health]", "interval", "route[0].health.interval"),
        ("[route.outlier]", "ejection", "route[0].outlier.ejection"),
        (
            "[route.websocket]",
            "ping_interval",
            "route[0].websocket.ping_interval",
        ),
        (
            "[route.websocket]",
            "idle_timeout",
            "route[0].websocket.idle_timeout",
        ),
        ("[route.sse]", "heartbeat", "route[0].sse.heartbeat"),
        ("[route.sse]", "idle_timeout", "route[0].sse.idle_timeout"),
        (
            "[route.sse]",
            "shutdown_retry",
            "route[0].sse.shutdown_retry",
        ),
    ];
    for value in ["300000000000y", "18446744073709551615s", "366d"] {
        for (table, name, key) in keys {
            let setting = format!("{name} = \"{value}\"\n");
            let text = match table {
                "[[route]]" => format!("{HEAD}{ROUTE}{setting}"),
                t if t.starts_with("[route.") => format!("{HEAD}{ROUTE}{t}\n{setting}"),
                t => format!("{HEAD}{t}\n{setting}{ROUTE}"),
            };
            let got = error(&text);
            let want = format!("{key}: must be at most 365d, got \"{value}\"");
            assert!(
                got.ends_with(&want),
                "{key} = {value}:\n  got  {got}\n  want …{want}"
            );
        }
    }
    let c = parse(&format!("{HEAD}{ROUTE}connect_timeout = \"365d\"\n")).expect("365d is valid");
    assert_eq!(c.routes[0].connect_timeout, MAX_DURATION);
}

#[test]
fn allowed_origins_must_be_scheme_host_and_port() {
    let cases = [
        (
            "[\"*\"]",
            r#"config/test.toml:12:20: route[0].websocket.allowed_origins[0]: "*" is not an origin (omit allowed_origins to allow any origin)"#,
        ),
        (
            "[\"https://a.example\", \"example.com\"]",
            r#"config/test.toml:12:41: route[0].websocket.allowed_origins[1]: expected an origin such as "https://chat.example.com" (scheme://host[:port]), got "example.com" (write "https://example.com")"#,
        ),
        (
            "[\"https://example.com/app\"]",
            r#"config/test.toml:12:20: route[0].websocket.allowed_origins[0]: expected an origin such as "https://chat.example.com" (scheme://host[:port], no path), got "https://example.com/app""#,
        ),
        (
            "[\"wss://example.com\"]",
            r#"config/test.toml:12:20: route[0].websocket.allowed_origins[0]: expected an origin such as "https://chat.example.com" (scheme://host[:port], with scheme http or https), got "wss://example.com""#,
        ),
    ];
    for (list, want) in cases {
        let got = error(&format!(
            "{HEAD}{ROUTE}[route.websocket]\nallowed_origins = {list}\n"
        ));
        assert_eq!(got, want);
    }
    let c = parse(&format!(
        "{HEAD}{ROUTE}[route.websocket]\nallowed_origins = [\"https://Chat.Example.com:443/\", \"http://localhost:8080\"]\n"
    ))
    .expect("origins are valid");
    assert_eq!(
        c.routes[0].websocket.allowed_origins.as_deref(),
        Some(
            &[
                "https://chat.example.com".to_string(),
                "http://localhost:8080".to_string()
            ][..]
        )
    );
}

#[test]
fn listeners_on_one_address_are_refused_naming_both_keys() {
    let cases = [
        (
            "https = \"127.0.0.1:8443\"\nhttp = \"127.0.0.1:8443\"\n",
            "config/test.toml:3:8: listen.http: same address as listen.https (127.0.0.1:8443); each listener needs its own",
        ),
        (
            "https = \"127.0.0.1:8443\"\nhttp = \"127.0.0.1:8080\"\nadmin = \"127.0.0.1:8080\"\n",
            "config/test.toml:4:9: listen.admin: same address as listen.http (127.0.0.1:8080); each listener needs its own",
        ),
        (
            "https = \"0.0.0.0:8443\"\nadmin = \"127.0.0.1:8443\"\n",
            "config/test.toml:3:9: listen.admin: 127.0.0.1:8443 overlaps listen.https (0.0.0.0:8443) on port 8443; each listener needs its own port",
        ),
    ];
    for (listen, want) in cases {
        let got = error(&format!("[listen]\n{listen}"));
        assert_eq!(got, want);
    }
    // Port 0 picks a free port for each: the tests' gateways bind every listener so.
    parse(&format!(
        "[listen]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{}{ROUTE}",
        &HEAD[HEAD.find("\n[[cert]]").expect("HEAD has a cert")..]
    ))
    .expect("port 0 everywhere is valid");
}

#[test]
fn duplicate_routes_are_refused_at_the_second_naming_the_first() {
    let got = error(&format!(
        "{HEAD}{ROUTE}\n[[route]]\nhost = \"a.example\"\npath = \"/ws\"\nbackends = [\"http://x:1\"]\n\n[[route]]\nhost = \"A.Example\"\npath = \"/ws/\"\nbackends = [\"http://x:2\"]\n"
    ));
    assert_eq!(
        got,
        "config/test.toml:17:1: route[2]: same host and path as route[1] (a.example/ws)"
    );
    // Without a path, "/" and no path are the same route.
    let got = error(&format!(
        "{HEAD}{ROUTE}\n[[route]]\nbackends = [\"http://x:2\"]\n"
    ));
    assert!(
        got.contains("route[1]: same host and path as route[0] (*/)"),
        "{got}"
    );
    // Same path on another host, or another path on the same host, is fine.
    parse(&format!(
        "{HEAD}{ROUTE}\n[[route]]\nhost = \"a.example\"\nbackends = [\"http://x:2\"]\n\n[[route]]\npath = \"/ws\"\nbackends = [\"http://x:3\"]\n"
    ))
    .expect("distinct routes are valid");
}

#[test]
fn route_hosts_no_certificate_names_are_reported() {
    let c = parse(&format!(
        "{HEAD}{ROUTE}\n[[route]]\nhost = \"chat.example.com\"\nbackends = [\"http://x:1\"]\n\n[[route]]\nhost = \"api.other.test\"\nbackends = [\"http://x:1\"]\n\n[[route]]\nhost = \"*.example.com\"\nbackends = [\"http://x:1\"]\n"
    ))
    .expect("valid");
    let names = ["*.example.com".to_string(), "www.other.test".to_string()];
    let uncovered = c.uncovered_hosts(&names);
    assert_eq!(
        uncovered,
        [UncoveredHost {
            route: 2,
            host: "api.other.test".into()
        }]
    );
    assert_eq!(
        uncovered[0].to_string(),
        r#"route[2] host "api.other.test" is not covered by any certificate (clients will see a name mismatch)"#
    );
}
