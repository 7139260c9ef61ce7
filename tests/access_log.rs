//! The access log as people read it: one line per request, WebSocket or stream, written when it
//! ends, with the same fields for every protocol, for refused requests too; the query left out
//! unless asked for; a request id that reaches the backend; and a file that SIGUSR1 reopens.
//! The lines are read back from the file `[log] access` names, as JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tracing::subscriber::DefaultGuard;

use crate::support::process::{GatewayFiles, GatewayProcess};
use crate::support::sse::{SseBackend, SseClient};
use crate::support::ws::{
    close_frame, connect, drain_to_end, expect_close, next_data, seen_close, seen_data, WsBackend,
};
use crate::support::{full, route, within, Backend, GatewayBuilder, Proto};
use streamgate::config::{AccessTarget, LogConfig, LogFormat};

/// The access lines of gateways run by this test's thread, written as JSON to a file by the
/// layer `main` installs for `[log] access = PATH`.
struct AccessLog {
    path: PathBuf,
    _dir: tempfile::TempDir,
    _guard: DefaultGuard,
}

impl AccessLog {
    fn capture() -> AccessLog {
        use tracing_subscriber::layer::SubscriberExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("access.log");
        let config = LogConfig {
            access: AccessTarget::File(path.clone()),
            format: Some(LogFormat::Json),
            query: false,
        };
        let (layer, _file) =
            streamgate::log::access_layer(&config, None).expect("the access log file opens");
        let subscriber = tracing_subscriber::registry().with(layer);
        AccessLog {
            path,
            _dir: dir,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    fn lines(&self) -> Vec<Value> {
        read_lines(&self.path)
    }

    /// Waits for the line whose `path` is `path`, and returns it.
    async fn line(&self, path: &str) -> Value {
        wait_line(&self.path, |l| l["path"] == path).await
    }
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits until the file at `path` holds a line that `found` accepts.
async fn wait_line(path: &Path, found: impl Fn(&Value) -> bool) -> Value {
    within("an access line", async {
        loop {
            if let Some(line) = read_lines(path).into_iter().find(|l| found(l)) {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

fn is_generated_id(id: &Value) -> bool {
    id.as_str()
        .is_some_and(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[tokio::test]
async fn h1_and_h2_requests_log_every_field() {
    let log = AccessLog::capture();
    let backend = Backend::echo("A").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = gw.client(proto, "gw.test").await;
        let wanted = match proto {
            Proto::H1 => "h1",
            Proto::H2 => "h2",
        };
        let path = format!("/fields/{wanted}");
        let req = client
            .request(Method::POST, &format!("{path}?token=secret"))
            .header("user-agent", "probe/1.0")
            .body(full("hello"))
            .expect("request");
        let fetched = client.fetch(req).await;
        let echo = fetched.echo();
        let line = log.line(&path).await;

        assert_eq!(line["target"], "streamgate::access", "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
        assert_eq!(line["client"], "127.0.0.1", "{proto}: {line}");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["host"], "gw.test");
        assert_eq!(line["protocol"], wanted, "{line}");
        assert_eq!(line["tls"], "TLSv1.3", "{line}");
        assert_eq!(line["status"], 200);
        assert_eq!(line["route"], "*/", "{line}");
        assert_eq!(
            line["backend"].as_str(),
            backend.url().strip_prefix("http://"),
            "{line}"
        );
        assert!(line["upstream_ms"].is_u64(), "{line}");
        assert!(line["duration_ms"].is_u64(), "{line}");
        assert_eq!(line["bytes_in"], 5, "the body's 5 bytes: {line}");
        assert_eq!(line["bytes_out"], fetched.body.len() as u64, "{line}");
        assert_eq!(line["user_agent"], "probe/1.0");
        assert_eq!(line["auth"], "-");
        assert_eq!(line["complete"], true);
        // One id: logged, forwarded to the backend, returned to the client.
        assert!(is_generated_id(&line["request_id"]), "{line}");
        assert_eq!(
            Some(line["request_id"].as_str().expect("a string")),
            echo.header("x-request-id")
        );
        assert_eq!(
            fetched.headers.get("x-request-id").map(|v| v.as_bytes()),
            line["request_id"].as_str().map(str::as_bytes)
        );
    }
    assert!(
        log.lines()
            .iter()
            .all(|l| l["path"] != "/fields/h1?token=secret"),
        "the query is left out by default"
    );
    assert!(
        log.lines().iter().any(|l| l["path"] == "/fields/h1"),
        "(the line looked for above)"
    );
}

#[tokio::test]
async fn query_is_logged_only_when_log_query_is_on() {
    let log = AccessLog::capture();
    let backend = Backend::echo("A").await;
    let gw = GatewayBuilder::new()
        .toml("[log]\nquery = true")
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let mut client = gw.client(Proto::H1, "gw.test").await;
    client.get("/q?token=secret").await.echo();
    let line = log.line("/q?token=secret").await;
    assert_eq!(line["status"], 200, "{line}");
}

#[tokio::test]
async fn a_trusted_clients_request_id_is_kept_and_an_untrusted_ones_replaced() {
    let log = AccessLog::capture();
    let backend = Backend::echo("A").await;
    let trusting = GatewayBuilder::new()
        .toml("trusted_proxies = [\"127.0.0.1/32\"]")
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let untrusting = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    for (gw, path, trusted) in [
        (&trusting, "/trusted", true),
        (&untrusting, "/untrusted", false),
    ] {
        let mut client = gw.client(Proto::H1, "gw.test").await;
        let req = client
            .request(Method::GET, path)
            .header("x-request-id", "edge-42")
            .body(full(""))
            .expect("request");
        let echo = client.fetch(req).await.echo();
        let line = log.line(path).await;
        let logged = line["request_id"].as_str().expect("a request id");
        assert_eq!(echo.header("x-request-id"), Some(logged), "{line}");
        if trusted {
            assert_eq!(logged, "edge-42", "{line}");
        } else {
            assert!(is_generated_id(&line["request_id"]), "{line}");
        }
    }
}

#[tokio::test]
async fn a_websocket_writes_one_line_with_its_close() {
    let log = AccessLog::capture();
    let (backend, mut seen) = WsBackend::echo().await;
    let gw = GatewayBuilder::new()
        .route(route("/ws").to(backend.url()))
        .start()
        .await;
    let mut ws = connect(&gw, "/ws?token=secret").await;
    within(
        "a message",
        futures_util::SinkExt::send(&mut ws, Message::text("hi")),
    )
    .await
    .expect("send");
    assert_eq!(next_data(&mut ws).await, Message::text("hi"), "the echo");
    within("the Close", ws.close(Some(close_frame(4000, "bye"))))
        .await
        .expect("send Close");
    assert_eq!(seen_data(&mut seen).await, Message::text("hi"));
    assert_eq!(u16::from(seen_close(&mut seen).await.code), 4000);
    expect_close(&mut ws).await;
    drain_to_end(&mut ws).await;

    let line = log.line("/ws").await;
    assert_eq!(line["protocol"], "ws", "{line}");
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["close_code"], 4000, "{line}");
    assert_eq!(line["closed_by"], "client", "{line}");
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    assert!(line["messages_in"].as_u64() >= Some(1), "{line}");
    assert!(line["bytes_in"].as_u64() >= Some(2), "{line}");
    assert!(line["bytes_out"].as_u64() >= Some(2), "the echo: {line}");
    assert!(is_generated_id(&line["request_id"]), "{line}");
    // The handshake wrote nothing of its own (it would have come first).
    let lines = log.lines();
    let ws_lines: Vec<_> = lines.iter().filter(|l| l["path"] == "/ws").collect();
    assert_eq!(ws_lines.len(), 1, "{ws_lines:?}");
}

#[tokio::test]
async fn an_event_stream_writes_one_line_when_it_ends() {
    let log = AccessLog::capture();
    let mut backend = SseBackend::start().await;
    let gw = GatewayBuilder::new()
        .route(route("/events").to(backend.url()))
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        writer.write("id: 1\ndata: one\n\n").await;
        stream.event().await;
        writer.end();
        let (_, ended) = stream.finish().await;
        assert!(ended.is_ok(), "{proto}: {ended:?}");

        // The stream's line, once it has ended: the n-th line for /events.
        let n = Proto::ALL.iter().position(|p| *p == proto).expect("listed") + 1;
        let line = within("the stream's access line", async {
            loop {
                let lines: Vec<Value> = log
                    .lines()
                    .into_iter()
                    .filter(|l| l["path"] == "/events")
                    .collect();
                if lines.len() >= n {
                    return lines[n - 1].clone();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(line["protocol"], "sse", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["closed_by"], "backend", "{line}");
        assert_eq!(line["events"], 1, "{line}");
        assert!(line["bytes_out"].as_u64() >= Some(17), "{line}");
    }
    let lines = log.lines();
    let streams = lines.iter().filter(|l| l["path"] == "/events").count();
    assert_eq!(streams, 2, "one line per stream, nothing else: {lines:?}");
}

#[tokio::test]
async fn refused_requests_are_logged_with_their_status() {
    let log = AccessLog::capture();
    let backend = Backend::echo("A").await;
    let gw = GatewayBuilder::new()
        .route(
            route("/limited")
                .to(backend.url())
                .set("rate_limit", "{ requests_per_second = 1, burst = 1 }"),
        )
        .start()
        .await;
    let mut client = gw.client(Proto::H2, "gw.test").await;
    assert_eq!(client.get("/nowhere").await.status, 404);
    let line = log.line("/nowhere").await;
    assert_eq!(
        (line["status"].as_u64(), line["route"].as_str()),
        (Some(404), Some("-"))
    );
    assert_eq!(line["client"], "127.0.0.1", "{line}");

    assert_eq!(client.get("/limited").await.status, 200);
    assert_eq!(client.get("/limited").await.status, 429);
    wait_line(&log.path, |l| l["path"] == "/limited" && l["status"] == 429).await;

    // Refused by hyper before the gateway sees a request: the connection writes the line.
    let huge = format!(
        "GET /big HTTP/1.1\r\nHost: gw.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    assert_eq!(gw.raw_h1(huge.as_bytes()).await.0, 431);
    let line = wait_line(&log.path, |l| l["status"] == 431).await;
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    assert_eq!(line["reason"], "request head too large", "{line}");
    assert_eq!(
        gw.raw_h1(b"GET /bad HTTP/1.1\r\nHost gw.test\r\n\r\n")
            .await
            .0,
        400
    );
    let line = wait_line(&log.path, |l| l["status"] == 400).await;
    assert_eq!(line["reason"], "malformed request head", "{line}");
    assert_eq!(line["tls"], "TLSv1.3", "{line}");
}

/// The real binary with `[log] access` a file: SIGUSR1 after logrotate's rename sends the next
/// lines to a new file at the path, and none to the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_at_its_path() {
    const SIGUSR1: u32 = 10;
    let backend = Backend::echo("A").await;
    let files = GatewayFiles::new();
    let path = files.path("access.log");
    let body = format!(
        "[log]\naccess = {path:?}\nformat = \"json\"\n[[route]]\npath = \"/\"\nbackends = [\"{}\"]\n",
        backend.url()
    );
    let mut gw = GatewayProcess::start(files, &body).await;
    gw.handles(SIGUSR1).await;
    let mut client = gw.client(Proto::H1).await;
    client.get("/before").await.echo();
    wait_line(&path, |l| l["path"] == "/before").await;
    assert!(
        !gw.log_text().contains("\"/before\""),
        "access lines are not on stderr"
    );

    let rotated = path.with_extension("log.1");
    std::fs::rename(&path, &rotated).expect("rename like logrotate");
    gw.signal("USR1");
    gw.log_event("access log reopened").await;
    client.get("/after").await.echo();
    let line = wait_line(&path, |l| l["path"] == "/after").await;
    assert_eq!(line["status"], 200);
    assert!(
        read_lines(&rotated).iter().all(|l| l["path"] != "/after"),
        "nothing more goes to the renamed file"
    );
    assert_eq!(read_lines(&rotated).len(), 1, "it kept the line before");
}

/// `[route.auth]` in the log and the metrics: each line says how the request fared (`auth`),
/// a token that came in the query never reaches the log (even with `[log] query = true`), and
/// `streamgate_auth_total{route,result}` counts the outcomes.
#[tokio::test]
async fn auth_outcome_is_logged_and_counted_and_a_query_token_never_logged() {
    use crate::support::jwt::{auth_table, claims, jwks_file, Signer};
    let log = AccessLog::capture();
    let backend = Backend::echo("A").await;
    let key = Signer::es256("k1");
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = jwks_file(dir.path(), &[&key]);
    let keys = format!("jwt_jwks = {:?}", jwks.display().to_string());
    let gw = GatewayBuilder::new()
        .admin()
        .toml("[log]\nquery = true")
        .route(
            route("/")
                .to(backend.url())
                .set("auth", &auth_table(&keys, "")),
        )
        .start()
        .await;
    let token = key.sign(&claims("alice"));
    let mut client = gw.client(Proto::H2, "gw.test").await;

    let got = client
        .get(&format!("/ok?room=1&access_token={token}"))
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let line = log.line("/ok?room=1").await;
    assert_eq!(line["auth"], "allowed", "{line}");
    assert_eq!(line["status"], 200, "{line}");

    let got = client.get("/no-token").await;
    assert_eq!(got.status, 401);
    let line = log.line("/no-token").await;
    assert_eq!(line["auth"], "missing", "{line}");

    let got = client
        .get(&format!("/bad?access_token={}x", &token[..token.len() - 1]))
        .await;
    assert_eq!(got.status, 401);
    let line = log.line("/bad").await;
    assert_eq!(line["auth"], "invalid", "{line}");

    let text = std::fs::read_to_string(&log.path).expect("read the access log");
    assert!(!text.contains(&token[..40]), "no token in the log: {text}");
    assert!(!text.contains("access_token"), "nor its parameter: {text}");

    let admin = gw.admin.expect("admin listener");
    let (status, metrics) = crate::support::process::http_get(admin, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    for (result, n) in [("allowed", 1), ("missing", 1), ("invalid", 1)] {
        let want = format!("streamgate_auth_total{{route=\"*/\",result=\"{result}\"}} {n}");
        assert!(metrics.contains(&want), "{want} in:\n{metrics}");
    }
}
