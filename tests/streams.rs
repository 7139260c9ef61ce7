//! Streams across backend changes (issue 12), black-box: an event stream whose backend dies,
//! drains, ages or is rebalanced goes on from another backend with `Last-Event-ID`, whole
//! events only; WebSockets are moved with 1012 or 1001; new streams beyond a rate get 503
//! before any backend is contacted; and shutdown spreads its closes over a window.

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::StreamExt;
use http::{header, HeaderMap, StatusCode};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::support::admin::{backends, backends_until};
use crate::support::backend::Tagged;
use crate::support::client::{tls_connect, Client, Fetched};
use crate::support::events::{
    event_text, event_text_without_id, until, until_for, Feed, SeqBackend, WsTagged,
};
use crate::support::gateway::{Route, TestGateway};
use crate::support::logs::Logs;
use crate::support::sse::{Event, Item, SseClient, SseStream};
use crate::support::ws::{self, drain_to_end, expect_close};
use crate::support::{empty, route, within, GatewayBuilder, Proto};

// ---------------------------------------------------------------------------------------------
// Helpers

/// The names `/backends`, metrics and logs give the two routes of these tests.
const EVENTS: &str = "*/events";
const WS: &str = "*/ws";

/// Event `n` of the sequence as the client parses it.
fn event(n: u64) -> Event {
    Event::message(&n.to_string(), &format!("event {n}"))
}

/// Reads the next events of `stream` and checks they are events `range` of the sequence, in
/// order (`what` names the case in a failure).
async fn expect_events(stream: &mut SseStream, range: RangeInclusive<u64>, what: impl Display) {
    for n in range {
        assert_eq!(stream.event().await, event(n), "{what}");
    }
}

/// `/events` over `fleet`, with streams resumed.
fn events_route(fleet: &[&SeqBackend]) -> Route {
    fleet
        .iter()
        .fold(route("/events").set("sse.resume", "true"), |r, b| {
            r.to(b.url())
        })
}

/// `/ws` over `fleet`.
fn ws_route(fleet: &[&WsTagged]) -> Route {
    fleet.iter().fold(route("/ws"), |r, b| r.to(b.url()))
}

/// Which of `fleet` holds the one event stream open.
async fn serving(fleet: &[&SeqBackend]) -> usize {
    let changes: Vec<_> = fleet.iter().map(|b| b.changes()).collect();
    until(&changes, "the event stream to reach a backend", || {
        fleet.iter().map(|b| b.open()).sum::<usize>() == 1
    })
    .await;
    fleet
        .iter()
        .position(|b| b.open() == 1)
        .expect("one backend holds the stream")
}

/// `(the one serving the stream, the other)`.
async fn pair<'a>(a: &'a SeqBackend, b: &'a SeqBackend) -> (&'a SeqBackend, &'a SeqBackend) {
    match serving(&[a, b]).await {
        0 => (a, b),
        _ => (b, a),
    }
}

/// The event stream's bytes without comment lines (a heartbeat may come at any boundary).
fn without_comments(raw: &str) -> String {
    raw.split_inclusive('\n')
        .filter(|line| !line.starts_with(':'))
        .collect()
}

/// Events `from..=to` exactly as the backends write them.
fn sequence(from: u64, to: u64) -> String {
    (from..=to).map(event_text).collect()
}

/// `GET /metrics` from the gateway's admin listener.
async fn metrics(gw: &TestGateway) -> String {
    let admin = gw.admin.expect("the gateway was built with .admin()");
    let mut client = Client::plain(Proto::H1, admin, "admin").await;
    let got = client.get("/metrics").await;
    assert_eq!(got.status, StatusCode::OK, "/metrics: {}", got.text());
    got.text()
}

/// The value of `streamgate_sse_resumes_total` for `route` and `outcome` (0 when absent).
fn resumes(text: &str, route: &str, outcome: &str) -> u64 {
    let (route, outcome) = (
        format!("route=\"{route}\""),
        format!("outcome=\"{outcome}\""),
    );
    text.lines()
        .filter(|l| l.starts_with("streamgate_sse_resumes_total{"))
        .filter(|l| l.contains(&route) && l.contains(&outcome))
        .map(|l| {
            let value = l.rsplit(' ').next().unwrap_or_default();
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("not a sample: {l}")) as u64
        })
        .sum()
}

/// The value of field `name` in a captured log line (`name=value` or `name="value"`).
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no field {name} in: {line}"));
    let rest = &line[at + name.len() + 2..];
    rest.split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_matches('"')
}

// ---------------------------------------------------------------------------------------------
// Resume when the backend fails

#[tokio::test]
async fn sse_stream_resumes_on_another_backend_when_its_backend_dies() {
    let logs = Logs::capture();
    for proto in Proto::ALL {
        logs.clear();
        let feed = Feed::manual();
        let a = SeqBackend::start("a", &feed).await;
        let b = SeqBackend::start("b", &feed).await;
        let gw = GatewayBuilder::new()
            .admin()
            .route(events_route(&[&a, &b]))
            .start()
            .await;
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let req = client
            .get("/events?room=7")
            .header("x-client-token", "t-123")
            .body(empty())
            .expect("valid request");
        let mut stream = client.open_with(req).await;
        let (dying, other) = pair(&a, &b).await;
        feed.publish_to(3);
        expect_events(&mut stream, 1..=3, proto).await;

        dying.kill().await;
        feed.publish_to(6);
        expect_events(
            &mut stream,
            4..=6,
            format!(
                "{proto}: after {} died the sequence goes on, from {}",
                dying.name, other.name
            ),
        )
        .await;
        assert_eq!(
            other.last_event_ids(),
            [Some("3".to_string())],
            "{proto}: {} is asked for what follows the last event the client got",
            other.name
        );
        assert_eq!(dying.stream_requests(), 1, "{proto}");
        // The same request: method, target and the client's headers.
        let (asked, again) = (&dying.requests()[0], &other.requests()[0]);
        assert_eq!(
            (again.method.as_str(), again.target.as_str()),
            ("GET", "/events?room=7"),
            "{proto}"
        );
        assert_eq!(again.target, asked.target, "{proto}");
        for name in ["x-client-token", "accept", "cache-control"] {
            assert_eq!(
                again.header(name),
                asked.header(name),
                "{proto}: {name} as the client sent it"
            );
        }
        assert_eq!(again.header("x-client-token"), Some("t-123"), "{proto}");

        let line = logs.line(&["event stream resumed"]).await;
        assert!(line.contains("INFO"), "{proto}: logged at info: {line}");
        assert!(
            field(&line, "route").contains(EVENTS),
            "{proto}: route: {line}"
        );
        assert!(
            field(&line, "from").contains(&dying.addr.to_string()),
            "{proto}: from {}: {line}",
            dying.addr
        );
        assert!(
            field(&line, "to").contains(&other.addr.to_string()),
            "{proto}: to {}: {line}",
            other.addr
        );
        let text = metrics(&gw).await;
        assert_eq!(
            resumes(&text, EVENTS, "resumed"),
            1,
            "{proto}: streamgate_sse_resumes_total resumed:\n{text}"
        );

        // The client saw no error and no end: the same response carries on.
        feed.publish_to(7);
        assert_eq!(stream.event().await, event(7), "{proto}");
        assert_eq!(
            without_comments(&stream.raw_text()),
            sequence(1, 7),
            "{proto}: every event once, in order"
        );
    }
}

#[tokio::test]
async fn sse_partial_event_of_a_dying_backend_never_reaches_the_client() {
    for proto in Proto::ALL {
        let feed = Feed::manual();
        let a = SeqBackend::start("a", &feed).await;
        let b = SeqBackend::start("b", &feed).await;
        let gw = GatewayBuilder::new()
            .route(events_route(&[&a, &b]))
            .start()
            .await;
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let (dying, other) = pair(&a, &b).await;
        feed.publish_to(3);
        expect_events(&mut stream, 1..=3, proto).await;

        // `id: 4\ndata: cut-off 4`, then EOF without the terminating chunk.
        dying.partial_then_die().await;
        dying
            .wait("the half event to be on the wire", |d| d.partials() == 1)
            .await;
        feed.publish_to(6);
        expect_events(&mut stream, 4..=6, proto).await;
        let raw = stream.raw_text();
        assert!(
            !raw.contains("cut-off"),
            "{proto}: no byte of the half event reaches the client: {raw:?}"
        );
        assert_eq!(
            without_comments(&raw),
            sequence(1, 6),
            "{proto}: whole events only"
        );
        assert_eq!(
            other.last_event_ids(),
            [Some("3".to_string())],
            "{proto}: the half event's id never became the last event id"
        );
    }
}

#[tokio::test]
async fn sse_clean_end_of_a_backend_is_not_resumed() {
    for proto in Proto::ALL {
        let feed = Feed::manual();
        let a = SeqBackend::start("a", &feed).await;
        let b = SeqBackend::start("b", &feed).await;
        let gw = GatewayBuilder::new()
            .admin()
            .route(events_route(&[&a, &b]))
            .start()
            .await;
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let (ending, other) = pair(&a, &b).await;
        feed.publish_to(3);
        expect_events(&mut stream, 1..=3, proto).await;

        ending.end_streams();
        assert_eq!(
            stream.finish().await,
            (vec![], Ok(())),
            "{proto}: the backend's end is the client's end"
        );
        assert_eq!(
            other.stream_requests(),
            0,
            "{proto}: a clean end is not resumed"
        );
        assert_eq!(ending.stream_requests(), 1, "{proto}");
        assert_eq!(without_comments(&stream.raw_text()), sequence(1, 3));
        assert_eq!(resumes(&metrics(&gw).await, EVENTS, "resumed"), 0);
    }
}

#[tokio::test]
async fn sse_stream_without_ids_ends_cleanly_when_its_backend_dies() {
    for proto in Proto::ALL {
        let feed = Feed::manual();
        let a = SeqBackend::start("a", &feed).await;
        let b = SeqBackend::start("b", &feed).await;
        a.set_ids(false);
        b.set_ids(false);
        let gw = GatewayBuilder::new()
            .admin()
            .route(events_route(&[&a, &b]))
            .start()
            .await;
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let (dying, other) = pair(&a, &b).await;
        feed.publish_to(3);
        for n in 1..=3 {
            assert_eq!(
                stream.event().await,
                Event::message("", &format!("event {n}")),
                "{proto}"
            );
        }

        dying.kill().await;
        let (rest, end) = stream.finish().await;
        assert_eq!(
            end,
            Ok(()),
            "{proto}: no id to resume from: a clean end, not an error"
        );
        assert!(
            !rest.iter().any(|i| matches!(i, Item::Event(_))),
            "{proto}: nothing more arrives: {rest:?}"
        );
        let raw = stream.raw_text();
        assert!(
            raw.ends_with("\n\n"),
            "{proto}: ends at a boundary: {raw:?}"
        );
        assert!(
            without_comments(&raw)
                .starts_with(&(1..=3).map(event_text_without_id).collect::<String>()),
            "{proto}: {raw:?}"
        );
        assert_eq!(other.stream_requests(), 0, "{proto}: not resumed");
        let text = metrics(&gw).await;
        assert_eq!(
            resumes(&text, EVENTS, "not_resumable"),
            1,
            "{proto}:\n{text}"
        );
        assert_eq!(resumes(&text, EVENTS, "resumed"), 0, "{proto}:\n{text}");
    }
}

#[tokio::test]
async fn sse_resume_gives_up_after_resume_attempts_with_a_retry_hint() {
    for proto in Proto::ALL {
        let feed = Feed::manual();
        let a = SeqBackend::start("a", &feed).await;
        let b = SeqBackend::start("b", &feed).await;
        let c = SeqBackend::start("c", &feed).await;
        let gw = GatewayBuilder::new()
            .admin()
            .route(events_route(&[&a, &b, &c]).set("sse.resume_attempts", "2"))
            .start()
            .await;
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let fleet = [&a, &b, &c];
        let first = serving(&fleet).await;
        let dying = fleet[first];
        let others: Vec<&SeqBackend> = fleet
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != first)
            .map(|(_, b)| *b)
            .collect();
        feed.publish_to(3);
        expect_events(&mut stream, 1..=3, proto).await;

        // Nowhere to go on: the others answer 500.
        for o in &others {
            o.set_status(500);
        }
        dying.kill().await;
        let (rest, end) = stream.finish().await;
        assert_eq!(end, Ok(()), "{proto}: given up, the stream ends cleanly");
        assert!(
            rest.iter().any(|i| matches!(i, Item::Retry(_))),
            "{proto}: the end carries a retry: hint: {rest:?}"
        );
        assert!(
            !rest.iter().any(|i| matches!(i, Item::Event(_))),
            "{proto}: {rest:?}"
        );
        let raw = without_comments(&stream.raw_text());
        assert!(
            raw.starts_with(&sequence(1, 3)) && raw.ends_with("\n\n"),
            "{proto}: whole events, then the hint at a boundary: {raw:?}"
        );
        let tries: Vec<Option<String>> = others.iter().flat_map(|o| o.last_event_ids()).collect();
        assert!(
            !tries.is_empty() && tries.len() <= 2,
            "{proto}: at most resume_attempts (2) tries reach the others: {tries:?}"
        );
        assert!(
            tries.iter().all(|t| t.as_deref() == Some("3")),
            "{proto}: each try asks for what follows event 3: {tries:?}"
        );
        let text = metrics(&gw).await;
        assert_eq!(resumes(&text, EVENTS, "failed"), 2, "{proto}:\n{text}");
        assert_eq!(resumes(&text, EVENTS, "exhausted"), 1, "{proto}:\n{text}");
        assert_eq!(resumes(&text, EVENTS, "resumed"), 0, "{proto}:\n{text}");

        // What the hint is for: the client reconnects as EventSource does, and goes on.
        dying.restart().await;
        for o in &others {
            o.set_status(200);
        }
        let req = client
            .get("/events")
            .header("last-event-id", stream.last_event_id())
            .body(empty())
            .expect("valid request");
        let mut again = client.open_with(req).await;
        feed.publish_to(4);
        assert_eq!(again.event().await, event(4), "{proto}");
    }
}

// ---------------------------------------------------------------------------------------------
// Moves: drain, age, rebalance

#[tokio::test]
async fn backend_drain_moves_websockets_and_streams_off_a_removed_backend() {
    let a = WsTagged::start("a").await;
    let b = WsTagged::start("b").await;
    let feed = Feed::manual();
    let sa = SeqBackend::start("sa", &feed).await;
    let sb = SeqBackend::start("sb", &feed).await;
    let drained_ws = |fleet: &[&WsTagged]| ws_route(fleet).set("backend_drain", "\"2s\"");
    let drained_events = |fleet: &[&SeqBackend]| events_route(fleet).set("backend_drain", "\"2s\"");
    let gw = GatewayBuilder::new()
        .admin()
        .route(drained_ws(&[&a, &b]))
        .route(drained_events(&[&sa, &sb]))
        .start()
        .await;
    let admin = gw.admin.expect("built with .admin()");

    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let mut ws = ws::connect(&gw, "/ws").await;
        match ws::who(&mut ws).await.as_str() {
            "a" => on_a.push(ws),
            "b" => on_b.push(ws),
            other => panic!("unknown backend {other}"),
        }
    }
    assert_eq!(
        (on_a.len(), on_b.len()),
        (2, 2),
        "least_conn puts two WebSockets on each"
    );
    let mut client = SseClient::connect(gw.https, &gw.ca, Proto::H2).await;
    let mut stream = client.open("/events").await;
    let (leaving, staying) = pair(&sa, &sb).await;
    feed.publish_to(3);
    expect_events(&mut stream, 1..=3, "").await;

    gw.reload(&[drained_ws(&[&b]), drained_events(&[staying])])
        .await
        .expect("the new config is valid");
    let reloaded = Instant::now();
    // While it drains, the removed backend keeps what it holds (checked only while the
    // drain surely lasts: a loaded machine may be slower than the 2 s).
    let view = backends(admin).await;
    if reloaded.elapsed() < Duration::from_millis(1500) {
        let x = view.backend(WS, &a.url());
        assert_eq!((x.state.as_str(), x.open), ("draining", 2), "{}", view.text);
        let y = view.backend(EVENTS, &leaving.url());
        assert_eq!((y.state.as_str(), y.open), ("draining", 1), "{}", view.text);
    }
    if reloaded.elapsed() < Duration::from_secs(1) {
        assert_eq!(
            ws::who(&mut on_a[0]).await,
            "a",
            "a WebSocket on a draining backend goes on"
        );
    }

    for ws in &mut on_a {
        let frame = expect_close(ws).await;
        assert_eq!(
            u16::from(frame.code),
            1012,
            "a WebSocket on the drained backend gets 1012 Service Restart"
        );
    }
    let closed_after = reloaded.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1500),
        "not before backend_drain (2 s) is over: {closed_after:?}"
    );
    a.wait("a to see both Closes", |a| a.closes().len() == 2)
        .await;
    assert_eq!(
        a.closes(),
        [Some(1001), Some(1001)],
        "the backend gets 1001 Going Away"
    );
    for ws in &mut on_b {
        assert_eq!(ws::who(ws).await, "b", "b's WebSockets are untouched");
    }
    assert!(b.closes().is_empty(), "b saw no Close: {:?}", b.closes());

    // The event stream went on from the backend that stays, after event 3.
    staying
        .wait("the stream to move", |s| s.stream_requests() == 1)
        .await;
    assert_eq!(staying.last_event_ids(), [Some("3".to_string())]);
    let moved_after = staying.requests()[0].at.duration_since(reloaded);
    assert!(
        moved_after >= Duration::from_millis(1500),
        "the stream stays for backend_drain (2 s): moved after {moved_after:?}"
    );
    feed.publish_to(6);
    expect_events(&mut stream, 4..=6, "no end, no gap").await;
    assert_eq!(without_comments(&stream.raw_text()), sequence(1, 6));
    leaving
        .wait("the drained backend's stream to close", |l| l.open() == 0)
        .await;
    let a_url = a.url();
    backends_until(admin, "a to be forgotten once empty", |v| {
        v.route(WS).backends.iter().all(|x| x.url != a_url)
    })
    .await;
}

#[tokio::test]
async fn max_connection_age_moves_websockets_and_streams() {
    let a = WsTagged::start("a").await;
    let feed = Feed::ticking(Duration::from_millis(100));
    let sa = SeqBackend::start("sa", &feed).await;
    let sb = SeqBackend::start("sb", &feed).await;
    let gw = GatewayBuilder::new()
        .route(ws_route(&[&a]).set("max_connection_age", "\"2s\""))
        .route(events_route(&[&sa, &sb]).set("max_connection_age", "\"2s\""))
        .start()
        .await;

    let mut ws = ws::connect(&gw, "/ws").await;
    let ws_opened = Instant::now();
    let mut client = SseClient::connect(gw.https, &gw.ca, Proto::H1).await;
    let mut stream = client.open("/events").await;
    let stream_opened = Instant::now();
    let (first, second) = pair(&sa, &sb).await;

    assert_eq!(ws::who(&mut ws).await, "a");
    let frame = expect_close(&mut ws).await;
    let age = ws_opened.elapsed();
    assert_eq!(
        u16::from(frame.code),
        1001,
        "an aged WebSocket gets 1001 Going Away"
    );
    // 2 s ± 10 %; the upper side has slack for a loaded machine.
    assert!(
        age >= Duration::from_millis(1700) && age <= Duration::from_secs(6),
        "closed at age {age:?}"
    );
    drain_to_end(&mut ws).await;
    a.wait("a's WebSocket to end", |a| a.open() == 0).await;

    // The event stream moves to the other backend and goes on, contiguous, with no end: read
    // until five events past the point it resumed from (which came from the other backend).
    let mut next = 1;
    within("the aged stream to move and go on", async {
        loop {
            assert_eq!(stream.event().await, event(next), "contiguous");
            next += 1;
            let resumed_from = second.last_event_ids().first().cloned().flatten();
            if let Some(from) = resumed_from.and_then(|v| v.parse::<u64>().ok()) {
                if next > from + 5 {
                    break;
                }
            }
        }
    })
    .await;
    let moved = &second.requests()[0];
    assert!(
        moved.last_event_id.is_some(),
        "the move sends Last-Event-ID: {moved:?}"
    );
    let moved_at = moved.at.duration_since(stream_opened);
    assert!(
        moved_at >= Duration::from_millis(1700),
        "the stream moved at age {moved_at:?}"
    );
    assert_eq!(first.stream_requests(), 1, "{} served it first", first.name);
}

/// A WebSocket client that reconnects whenever it is closed; it reports how many are open on
/// `connected` and the time and code of each close it gets in `closes`.
async fn reconnecting_client(
    gw: &TestGateway,
    connected: &watch::Sender<u64>,
    closes: &Mutex<Vec<(Instant, Option<u16>)>>,
) {
    loop {
        let Ok((mut ws, _)) = ws::try_connect(gw, ws::request("/ws")).await else {
            // A pacing poll before trying again.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        connected.send_modify(|c| *c += 1);
        let mut code = None;
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(frame) = msg {
                code = frame.map(|f| u16::from(f.code));
            }
        }
        connected.send_modify(|c| *c -= 1);
        closes
            .lock()
            .expect("not poisoned")
            .push((Instant::now(), code));
    }
}

#[tokio::test]
async fn rebalance_moves_the_surplus_to_a_new_backend() {
    const CLIENTS: usize = 20;
    let a = WsTagged::start("a").await;
    let b = WsTagged::start("b").await;
    let rebalanced = |fleet: &[&WsTagged]| ws_route(fleet).set("rebalance", "true");
    let gw = GatewayBuilder::new()
        .admin()
        .route(rebalanced(&[&a]))
        .start()
        .await;
    let connected = watch::Sender::new(0u64);
    let closes = Mutex::new(Vec::new());
    let clients = join_all((0..CLIENTS).map(|_| reconnecting_client(&gw, &connected, &closes)));

    let test = async {
        let changes = [a.changes(), b.changes(), connected.subscribe()];
        until(&changes, "every client to be open on a", || {
            a.open() == CLIENTS && *connected.borrow() == CLIENTS as u64
        })
        .await;
        gw.reload(&[rebalanced(&[&a, &b])])
            .await
            .expect("the new config is valid");
        let reloaded = Instant::now();

        let balanced = || {
            let (x, y) = (a.open(), b.open());
            x + y == CLIENTS
                && *connected.borrow() == CLIENTS as u64
                && (7..=13).contains(&x)
                && (7..=13).contains(&y)
        };
        until_for(
            Duration::from_secs(60),
            &changes,
            "a and b to hold about half each",
            balanced,
        )
        .await;
        let took = reloaded.elapsed();

        // Then it stays put: a quiet spell of 3 s without a move.
        within("a quiet spell without moves", async {
            loop {
                let before = (a.accepted(), b.accepted());
                let moved = tokio::time::timeout(
                    Duration::from_secs(3),
                    until(&changes, "a move", || {
                        (a.accepted(), b.accepted()) != before
                    }),
                )
                .await;
                if moved.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(balanced(), "still balanced: a {}, b {}", a.open(), b.open());

        let closes = closes.lock().expect("not poisoned").clone();
        assert!(
            closes.iter().all(|(_, code)| *code == Some(1012)),
            "a moved WebSocket gets 1012: {:?}",
            closes.iter().map(|(_, c)| c).collect::<Vec<_>>()
        );
        // Only the surplus moves: a held all 20 and its fair share is 10.
        let moves = a.accepted() + b.accepted() - CLIENTS;
        assert_eq!(moves, closes.len(), "every close was a move");
        assert!(
            (7..=14).contains(&moves),
            "about the surplus (10) moved, not everyone: {moves}"
        );
        // Paced: at most 2 a second (10 % of 20), so 7 moves take well over 2 s.
        let first = closes.first().map(|(t, _)| *t).expect("moves");
        let seventh = closes[6].0;
        assert!(
            seventh.duration_since(first) >= Duration::from_secs(2),
            "moves are paced: 7 in {:?} (balanced after {took:?})",
            seventh.duration_since(first)
        );
    };
    tokio::select! {
        _ = clients => unreachable!("the clients reconnect for ever"),
        _ = test => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Admission and shutdown

/// A refusal by the admission rate: 503, `Retry-After` 1..=5, a body that names `route`.
fn assert_refused(status: StatusCode, headers: &HeaderMap, body: &str, route: &str) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("a 503 carries Retry-After in seconds: {headers:?}"));
    assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
    assert!(body.contains(route), "the body names {route}: {body:?}");
}

/// Of 15 new streams tried within `took`, at most the burst (5) plus what refilled at 5 a
/// second were admitted, at least the burst, and some were refused.
fn assert_admitted(admitted: usize, refused: usize, took: Duration, what: &str) {
    assert_eq!(admitted + refused, 15, "{what}");
    assert!(
        admitted >= 5,
        "{what}: the burst of 5 is admitted: {admitted}"
    );
    let allowed = 5 + (took.as_secs_f64() * 5.0).ceil() as usize + 1;
    assert!(
        admitted <= allowed,
        "{what}: {admitted} admitted in {took:?}, at most {allowed}"
    );
    assert!(refused >= 1, "{what}: 15 at once exceed 5 a second");
}

#[tokio::test]
async fn new_streams_beyond_the_rate_get_503_before_reaching_a_backend() {
    let w = Tagged::start("w").await;
    let s = Tagged::start("s").await;
    let gw = GatewayBuilder::new()
        .route(
            route("/ws")
                .to(w.url())
                .set("max_new_streams_per_second", "5"),
        )
        .route(
            route("/events")
                .to(s.url())
                .set("max_new_streams_per_second", "5"),
        )
        .start()
        .await;

    // WebSocket upgrades: the TLS connections first, then fifteen handshakes at once.
    let mut tls = Vec::new();
    for _ in 0..15 {
        tls.push(tls_connect(gw.https, &gw.ca, Some("gw.test"), &[b"http/1.1"], true).await);
    }
    let started = Instant::now();
    let handshakes = join_all(tls.into_iter().map(|t| {
        tokio_tungstenite::client_async_with_config(ws::request("/ws"), t, Some(ws::ws_config()))
    }));
    let results = within("fifteen WebSocket handshakes", handshakes).await;
    let took = started.elapsed();
    let mut open = Vec::new();
    let mut refused = 0;
    for result in results {
        match result {
            Ok((ws, response)) => {
                assert_eq!(response.status(), 101);
                open.push(ws);
            }
            Err(WsError::Http(response)) => {
                let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned();
                assert_refused(response.status(), response.headers(), &body, WS);
                refused += 1;
            }
            Err(e) => panic!("a handshake failed without an answer: {e}"),
        }
    }
    assert_admitted(open.len(), refused, took, "WebSocket upgrades");
    assert_eq!(
        w.upgrades(),
        open.len(),
        "only the admitted upgrades reach the backend"
    );
    // Plain requests on the same route are not counted, even with the bucket empty.
    ten_plain_gets(&gw, Proto::H1, "/ws").await;
    assert_eq!(w.requests(), 10);

    // Event streams: fifteen requests at once on one HTTP/2 connection.
    let sse = SseClient::connect(gw.https, &gw.ca, Proto::H2).await;
    let mut handles: Vec<SseClient> = (0..15).map(|_| sse.h2_handle()).collect();
    let started = Instant::now();
    let responses = join_all(handles.iter_mut().map(|h| {
        let req = h.get("/events").body(empty()).expect("valid request");
        h.send(req)
    }))
    .await;
    let took = started.elapsed();
    let mut streams = Vec::new();
    let mut refused = 0;
    for response in responses {
        if response.status() == StatusCode::OK {
            streams.push(SseStream::new(response));
            continue;
        }
        let got = Fetched::read(response).await;
        assert_refused(got.status, &got.headers, &got.text(), EVENTS);
        refused += 1;
    }
    assert_admitted(streams.len(), refused, took, "event streams");
    // A 200 came from the backend, which counts a stream before it answers.
    assert_eq!(
        s.streams(),
        streams.len(),
        "only the admitted reach the backend"
    );
    ten_plain_gets(&gw, Proto::H2, "/events").await;
    assert_eq!(s.requests(), 10);
    drop(open);
}

/// Ten plain GETs on `path`, each answered 200 (admission does not count them).
async fn ten_plain_gets(gw: &TestGateway, proto: Proto, path: &str) {
    let mut plain = gw.client(proto, "gw.test").await;
    for i in 0..10 {
        let got = plain.get(path).await;
        assert_eq!(got.status, StatusCode::OK, "plain GET {i}: {}", got.text());
    }
}

#[tokio::test]
async fn shutdown_spreads_closes_over_the_window() {
    let a = WsTagged::start("a").await;
    let feed = Feed::manual();
    let sa = SeqBackend::start("sa", &feed).await;
    let mut gw = GatewayBuilder::new()
        .toml("[shutdown]\nspread = \"2s\"\ngrace = \"10s\"")
        .route(ws_route(&[&a]))
        .route(events_route(&[&sa]))
        .start()
        .await;
    let mut sockets = Vec::new();
    for _ in 0..10 {
        let mut ws = ws::connect(&gw, "/ws").await;
        assert_eq!(ws::who(&mut ws).await, "a");
        sockets.push(ws);
    }
    let mut clients = Vec::new();
    let mut streams = Vec::new();
    feed.publish_to(1);
    for _ in 0..4 {
        let mut client = SseClient::connect(gw.https, &gw.ca, Proto::H1).await;
        let mut stream = client.open("/events").await;
        assert_eq!(stream.event().await, event(1));
        clients.push(client);
        streams.push(stream);
    }

    let began = Instant::now();
    gw.begin_shutdown();
    let ws_closes = join_all(sockets.iter_mut().map(|ws| async move {
        let frame = expect_close(ws).await;
        let at = began.elapsed();
        drain_to_end(ws).await;
        (at, u16::from(frame.code))
    }));
    let stream_ends = join_all(streams.iter_mut().map(|s| async move {
        let (_, end) = s.finish().await;
        (began.elapsed(), end)
    }));
    let (ws_closes, stream_ends) = tokio::join!(ws_closes, stream_ends);
    for (at, code) in &ws_closes {
        assert_eq!(*code, 1001, "shutdown closes with 1001 (at {at:?})");
    }
    for (at, end) in &stream_ends {
        assert_eq!(*end, Ok(()), "an event stream ends cleanly (at {at:?})");
    }
    let mut times: Vec<Duration> = ws_closes
        .iter()
        .map(|(t, _)| *t)
        .chain(stream_ends.iter().map(|(t, _)| *t))
        .collect();
    times.sort();
    let (first, last) = (times[0], times[times.len() - 1]);
    assert!(
        last - first >= Duration::from_secs(1),
        "the closes are spread over the 2 s window, not all at once: {times:?}"
    );
    assert!(
        last <= Duration::from_secs(8),
        "all within the window (plus slack), before the grace: {times:?}"
    );
    // Evenly: no half second holds most of them.
    let crowded = times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| **u >= *t && **u - *t < Duration::from_millis(500))
                .count()
        })
        .max()
        .unwrap_or_default();
    assert!(crowded <= 9, "at most 9 of 14 in any 0.5 s: {times:?}");
    a.wait("the backend to see every Close", |a| a.closes().len() == 10)
        .await;
    assert!(
        a.closes().iter().all(|c| *c == Some(1001)),
        "the backend gets 1001: {:?}",
        a.closes()
    );
    drop(clients);
    gw.stopped().await;
}
