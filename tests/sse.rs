//! Server-Sent Events through the gateway over real TLS, HTTP/1.1 and HTTP/2: events pass one by
//! one and byte for byte, heartbeats fill silence but never split an event, disconnects travel
//! both ways, memory stays bounded for a slow reader, and shutdown and idle timeout end streams
//! at event boundaries.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use http::header;

use crate::support::gateway::TestGateway;
use crate::support::sse::{
    Event, GatewayProcess, Item, Parser, RawBackend, SseBackend, SseClient, Write,
};
use crate::support::{empty, route, within, GatewayBuilder, Proto};

/// A gateway with one route, `/events`, to `backend`; `sse` is the route's `sse` table as an
/// inline TOML table, or "" for the defaults.
async fn gateway(backend: &SseBackend, sse: &str) -> TestGateway {
    let mut events = route("/events").to(backend.url());
    if !sse.is_empty() {
        events = events.set("sse", sse);
    }
    GatewayBuilder::new().route(events).start().await
}

fn parse(chunks: &[&[u8]]) -> (Vec<Item>, Parser) {
    let mut parser = Parser::default();
    let mut items = VecDeque::new();
    for chunk in chunks {
        parser.feed(chunk, &mut items);
    }
    (items.into(), parser)
}

fn event(kind: &str, id: &str, data: &str) -> Item {
    Item::Event(Event {
        event: kind.into(),
        data: data.into(),
        id: id.into(),
    })
}

/// The test client's parser is what the other tests trust, so it is checked against the
/// WHATWG rules first.
#[test]
fn sse_client_parser_follows_whatwg_rules() {
    let (items, parser) = parse(&[
        "\u{feff}: hi\n\n".as_bytes(),
        b"data: a\r\ndata:b\r\n\r\n",
        b"id: 1\revent: up\rdata:  two spaces\r\r",
        // A CRLF split across chunks is one line end, not two.
        b"data: c\r",
        b"\n\r",
        b"\n",
        b"retry: 250\nretry: x1\n\n",
        b"data\n\nid\ndata: no id\n\n",
        b"id: 9\ndata: cut off",
    ]);
    assert_eq!(
        items,
        [
            Item::Comment(" hi".into()),
            event("message", "", "a\nb"),
            event("up", "1", " two spaces"),
            event("message", "1", "c"),
            Item::Retry(250),
            event("message", "1", ""),
            event("message", "", "no id"),
        ]
    );
    // The unfinished event is never dispatched, so its id is not the one a reconnect sends.
    assert_eq!(parser.last_event_id(), "");
    let (items, parser) = parse(&[b"id: 5\n\n", b"data: x\n"]);
    assert!(
        items.is_empty(),
        "an event without data is not dispatched: {items:?}"
    );
    assert_eq!(parser.last_event_id(), "5", "but its id is remembered");
}

#[tokio::test]
async fn sse_event_arrives_before_next_is_written() {
    let mut backend = SseBackend::start().await;
    let gw = gateway(&backend, "").await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        // Lock-step: event n+1 is written only after the client has parsed event n, so a
        // gateway that held an event back until more bytes came would stall this loop.
        for n in 1..=5 {
            writer.write(format!("id: {n}\ndata: event {n}\n\n")).await;
            let got = stream.event().await;
            assert_eq!(
                got,
                Event::message(&n.to_string(), &format!("event {n}")),
                "{proto}"
            );
        }
        // A few more at the pace of a live feed, 200 ms apart, still in lock-step.
        let mut pace = tokio::time::interval(Duration::from_millis(200));
        for n in 6..=8 {
            pace.tick().await;
            writer
                .write(format!("id: {n}\nevent: tick\ndata: {n}\n\n"))
                .await;
            let got = stream.event().await;
            assert_eq!(
                (got.event.as_str(), got.id),
                ("tick", n.to_string()),
                "{proto}"
            );
        }
        assert!(
            !writer.is_disconnected(),
            "{proto}: the stream is still open"
        );
    }
}

#[tokio::test]
async fn sse_headers_pass_through_both_ways() {
    let mut backend = SseBackend::start().await;
    let gw = gateway(&backend, "").await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let req = client
            .get("/events?topic=a%20b&since=1")
            .header("last-event-id", "42")
            .header(header::COOKIE, "session=abc123; theme=dark")
            .header(header::AUTHORIZATION, "Bearer t0k3n.value")
            .body(empty())
            .expect("valid request");
        let mut stream = client.open_with(req).await;
        let mut writer = backend.stream().await;

        assert_eq!(writer.target(), "/events?topic=a%20b&since=1", "{proto}");
        for (name, want) in [
            ("accept", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("last-event-id", "42"),
            ("cookie", "session=abc123; theme=dark"),
            ("authorization", "Bearer t0k3n.value"),
            ("host", "gw.test"),
        ] {
            assert_eq!(
                writer.header(name),
                Some(want),
                "{proto}: request header {name}"
            );
        }

        for (name, want) in [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache, no-transform"),
            ("x-accel-buffering", "no"),
            ("set-cookie", "seen=1; Secure; HttpOnly"),
        ] {
            assert_eq!(
                stream.header(name),
                Some(want),
                "{proto}: response header {name}"
            );
        }
        let number = writer.number.to_string();
        assert_eq!(stream.header("x-stream"), Some(number.as_str()), "{proto}");
        assert_eq!(
            stream.header("connection"),
            None,
            "{proto}: hop-by-hop header removed"
        );

        writer.write("data: ok\n\n").await;
        assert_eq!(stream.event().await.data, "ok", "{proto}");
    }
}

#[tokio::test]
async fn sse_fields_and_comments_arrive_byte_for_byte() {
    let chunks: &[&[u8]] = &[
        b": welcome\n\n",
        b"retry: 1500\n\n",
        b"id: 7\nevent: update\ndata: {\"a\":1}\n\n",
        b"data: line one\r\ndata: line two\r\n\r\n",
        b"id: 8\rdata: cr only\r\r",
        b"event: split\ndata: acr",
        b"oss chunks\n",
        b"\n",
        b"id\ndata\n\n",
        b"data:no space\n\n",
        ": caf\u{e9} \u{1f600}\n\n".as_bytes(),
    ];
    let want = [
        Item::Comment(" welcome".into()),
        Item::Retry(1500),
        event("update", "7", "{\"a\":1}"),
        event("message", "7", "line one\nline two"),
        event("message", "8", "cr only"),
        event("split", "8", "across chunks"),
        event("message", "", ""),
        event("message", "", "no space"),
        Item::Comment(" caf\u{e9} \u{1f600}".into()),
    ];

    let mut backend = SseBackend::start().await;
    let gw = gateway(&backend, "").await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        for chunk in chunks {
            writer.write(chunk.to_vec()).await;
        }
        writer.end();
        let (items, end) = stream.finish().await;
        assert_eq!(end, Ok(()), "{proto}");
        assert_eq!(items, want, "{proto}");
        assert_eq!(
            stream.raw(),
            chunks.concat(),
            "{proto}: the raw bytes are the backend's"
        );
    }
}

#[tokio::test]
async fn sse_heartbeat_comments_arrive_on_idle_stream() {
    let mut backend = SseBackend::start().await;
    let gw = gateway(&backend, r#"{ heartbeat = "200ms" }"#).await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        // The backend writes nothing: the gateway's comments are all that arrives.
        for _ in 0..3 {
            assert_eq!(stream.comment().await, "", "{proto}");
        }
        assert_eq!(stream.raw(), b":\n\n:\n\n:\n\n", "{proto}");
        assert_eq!(writer.written(), 0);
        assert!(
            !writer.is_disconnected(),
            "{proto}: heartbeats do not end the stream"
        );

        writer.write("id: 1\ndata: after the quiet\n\n").await;
        assert_eq!(
            stream.event().await,
            Event::message("1", "after the quiet"),
            "{proto}"
        );
        assert_eq!(
            stream.comment().await,
            "",
            "{proto}: heartbeats resume after an event"
        );
    }
}

#[tokio::test]
async fn sse_heartbeat_never_splits_an_event() {
    let mut backend = SseBackend::start().await;
    let gw = gateway(&backend, r#"{ heartbeat = "200ms" }"#).await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut split = client.open("/events").await;
        let mut writer = backend.stream().await;
        writer.write("data: hel").await;
        split.raw_ends_with(b"data: hel").await;

        // A second, idle stream on the same route opened only now: once it has had two
        // heartbeats, the gateway has passed two heartbeat intervals of the first stream's
        // silence too, with that stream in the middle of an event.
        let mut other_client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut idle = other_client.open("/events").await;
        let _idle_writer = backend.stream().await;
        assert_eq!(idle.comment().await, "", "{proto}");
        assert_eq!(idle.comment().await, "", "{proto}");

        writer.write("lo\n\n").await;
        // Heartbeats may precede the event (the stream was idle before `hel`), never split it.
        let hello = loop {
            match split.next_item().await {
                Some(Item::Comment(c)) => assert_eq!(c, "", "{proto}"),
                Some(Item::Event(e)) => break e,
                other => panic!("{proto}: expected the event, got {other:?}"),
            }
        };
        assert_eq!(hello, Event::message("", "hello"), "{proto}");
        let raw = split.raw_text();
        assert!(
            raw.ends_with("data: hello\n\n"),
            "{proto}: a comment inside the event: {raw:?}"
        );
        assert_eq!(
            raw.trim_end_matches("data: hello\n\n").replace(":\n\n", ""),
            "",
            "{proto}: only heartbeats before the event: {raw:?}"
        );
        // Back at a boundary, the silence is filled again.
        assert_eq!(split.comment().await, "", "{proto}");
    }
}

#[tokio::test]
async fn sse_hundred_concurrent_streams_share_one_h2_connection() {
    const STREAMS: usize = 100;
    let mut backend = SseBackend::start().await;
    let gw = gateway(&backend, "").await;
    let client = SseClient::connect(gw.https, &gw.ca, Proto::H2).await;

    let opens = (0..STREAMS).map(|i| {
        let mut handle = client.h2_handle();
        async move { handle.open(&format!("/events?n={i}")).await }
    });
    let mut streams = futures_util::future::join_all(opens).await;
    // Every stream is open at the backend at the same time before any event is written.
    let mut writers = HashMap::new();
    for _ in 0..STREAMS {
        let writer = backend.stream().await;
        let n: usize = writer
            .target()
            .strip_prefix("/events?n=")
            .and_then(|n| n.parse().ok())
            .expect("target /events?n=<i>");
        assert!(
            writers.insert(n, writer).is_none(),
            "stream {n} opened twice"
        );
    }
    assert_eq!(writers.len(), STREAMS);

    for round in ["first", "second"] {
        for (n, writer) in writers.iter_mut() {
            writer
                .write(format!("id: {n}\ndata: {round} for {n}\n\n"))
                .await;
        }
        for (n, stream) in streams.iter_mut().enumerate() {
            let want = Event::message(&n.to_string(), &format!("{round} for {n}"));
            assert_eq!(stream.event().await, want);
        }
    }
    assert!(writers.values().all(|w| !w.is_disconnected()));
    writers.clear();
    for (n, stream) in streams.iter_mut().enumerate() {
        assert_eq!(stream.finish().await, (vec![], Ok(())), "stream {n}");
    }
}

#[tokio::test]
async fn sse_client_disconnect_reaches_backend() {
    let mut backend = SseBackend::start().await;
    let gw = gateway(&backend, "").await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        writer.write("id: 1\ndata: one\n\n").await;
        assert_eq!(stream.event().await, Event::message("1", "one"), "{proto}");

        // HTTP/1.1: the client closes the connection; HTTP/2: it resets the stream only.
        drop(stream);
        if proto == Proto::H1 {
            drop(client);
            writer.disconnected().await;
        } else {
            writer.disconnected().await;
            // The connection itself carries on.
            let mut again = client.open("/events").await;
            let mut second = backend.stream().await;
            second.write("data: still here\n\n").await;
            assert_eq!(again.event().await.data, "still here");
        }
        let write = writer
            .write_within("data: late\n\n".into(), Duration::from_secs(5))
            .await;
        assert_eq!(write, Write::Gone, "{proto}: the backend's write fails");
    }
}

#[tokio::test]
async fn sse_backend_end_ends_client_stream_cleanly() {
    let mut backend = SseBackend::start().await;
    let gw = gateway(&backend, "").await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        writer.write("id: 1\ndata: last words\n\n").await;
        writer.end();
        assert_eq!(
            stream.event().await,
            Event::message("1", "last words"),
            "{proto}"
        );
        // HTTP/1.1: the chunked body ends with its last chunk; HTTP/2: END_STREAM.
        assert_eq!(stream.finish().await, (vec![], Ok(())), "{proto}");

        // The connection is reusable after a clean end.
        let mut next = client.open("/events").await;
        let mut writer = backend.stream().await;
        writer.write("data: next\n\n").await;
        assert_eq!(next.event().await.data, "next", "{proto}");
    }
}

#[tokio::test]
async fn sse_backend_killed_mid_stream_ends_client_stream() {
    let mut backend = SseBackend::start().await;
    let gw = gateway(&backend, "").await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        writer
            .write("id: 1\ndata: whole\n\nid: 2\ndata: also whole\n\n")
            .await;
        writer.write("id: 3\ndata: cut o").await;
        stream.raw_ends_with(b"data: cut o").await;
        writer.kill();

        assert_eq!(
            stream.event().await,
            Event::message("1", "whole"),
            "{proto}"
        );
        assert_eq!(
            stream.event().await,
            Event::message("2", "also whole"),
            "{proto}"
        );
        let (rest, end) = stream.finish().await;
        assert!(
            rest.is_empty(),
            "{proto}: the cut event is not dispatched: {rest:?}"
        );
        assert_eq!(
            stream.last_event_id(),
            "2",
            "{proto}: a reconnect resumes after event 2"
        );
        match proto {
            // A chunked body that stops without its last chunk would be an error here: the
            // gateway must end it properly.
            Proto::H1 => assert_eq!(end, Ok(()), "{proto}"),
            // END_STREAM or a reset of this stream: either way the client sees the end. A
            // connection error would take the client's other streams with it.
            Proto::H2 => {
                if let Err(e) = &end {
                    assert!(
                        e.contains("stream error"),
                        "{proto}: not a stream reset: {e}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn sse_close_delimited_backend_streams_and_ends_cleanly() {
    let backend = RawBackend::start().await;
    let gw = GatewayBuilder::new()
        .route(route("/events").to(backend.url()))
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        // HTTP/1.0 style: no Content-Length, no chunking; the body ends when the socket closes.
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
        let (stream, (request, mut tcp)) =
            tokio::join!(client.open("/events"), backend.accept(head));
        let mut stream = stream;
        assert!(
            request.starts_with("GET /events HTTP/1.1\r\n"),
            "{proto}: {request}"
        );
        for n in 1..=3 {
            use tokio::io::AsyncWriteExt;
            let bytes = format!("id: {n}\ndata: raw {n}\n\n");
            tcp.write_all(bytes.as_bytes())
                .await
                .expect("write an event");
            assert_eq!(
                stream.event().await,
                Event::message(&n.to_string(), &format!("raw {n}")),
                "{proto}"
            );
        }
        drop(tcp);
        assert_eq!(stream.finish().await, (vec![], Ok(())), "{proto}");
    }
}

/// One event of the slow-reader test: 16 KiB of data that depends on `n`.
fn big_event(n: u64) -> (String, bytes::Bytes) {
    let data: String = (0..16 * 1024)
        .map(|i| char::from(b'a' + ((n + i) % 26) as u8))
        .collect();
    let wire = format!("id: {n}\ndata: {data}\n\n");
    (data, wire.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_slow_reader_keeps_gateway_memory_bounded() {
    const TOTAL: u64 = 50 * 1024 * 1024;
    const RSS_LIMIT_KIB: u64 = 64 * 1024;
    // A write that waits this long means the gateway has stopped reading the backend.
    const STALL: Duration = Duration::from_secs(3);

    let mut backend = SseBackend::start().await;
    let gw = GatewayProcess::start(&format!(
        "[[route]]\npath = \"/events\"\nbackends = [\"{}\"]\n",
        backend.url()
    ))
    .await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;

        // The backend writes as fast as it can; the client reads nothing.
        let mut sent = 0u64;
        loop {
            match writer.write_within(big_event(sent).1, STALL).await {
                Write::Written => sent += 1,
                Write::Stalled => break,
                Write::Gone => panic!("{proto}: the gateway dropped the stream\n{}", gw.log()),
            }
            assert!(
                writer.written() < TOTAL,
                "{proto}: the backend wrote all 50 MB to a client that reads nothing"
            );
        }
        let stalled_at = writer.written();
        let rss = gw.memory_kib("VmRSS");
        eprintln!(
            "{proto}: backend stalled after {} KiB; gateway VmRSS {rss} KiB",
            stalled_at / 1024
        );
        // Socket buffers on loopback hold several MB (they grow with use); a gateway without
        // backpressure would let all 50 MB through.
        assert!(
            stalled_at < TOTAL / 2,
            "{proto}: {stalled_at} bytes went out before backpressure reached the backend"
        );
        assert!(
            rss < RSS_LIMIT_KIB,
            "{proto}: gateway VmRSS {rss} KiB with a stalled reader"
        );

        // Now the client reads everything while the backend writes the rest.
        let events = TOTAL.div_ceil(big_event(0).1.len() as u64);
        let rest = tokio::spawn(async move {
            for n in sent..events {
                writer.write(big_event(n).1).await;
            }
            writer.end();
        });
        for n in 0..events {
            let got = stream.event().await;
            assert_eq!(got.id, n.to_string(), "{proto}: events in order");
            assert!(got.data == big_event(n).0, "{proto}: event {n} intact");
        }
        assert_eq!(stream.finish().await, (vec![], Ok(())), "{proto}");
        within("the backend to write the rest", rest)
            .await
            .expect("writer task");
        let peak = gw.memory_kib("VmHWM");
        eprintln!("{proto}: {events} events read; gateway peak VmRSS {peak} KiB");
        assert!(
            peak < RSS_LIMIT_KIB,
            "{proto}: gateway peak VmRSS {peak} KiB"
        );
    }
}

#[tokio::test]
async fn sse_reconnect_with_last_event_id_resumes() {
    let mut backend = SseBackend::start().await;
    let gw = gateway(&backend, "").await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut first = client.open("/events").await;
        let mut writer = backend.stream().await;
        assert_eq!(writer.header("last-event-id"), None, "{proto}");
        writer.write("retry: 100\n\n").await;
        for n in 1..=3 {
            writer.write(format!("id: {n}\ndata: event {n}\n\n")).await;
        }
        writer.end();
        assert_eq!(first.next_item().await, Some(Item::Retry(100)), "{proto}");
        for n in 1..=3 {
            assert_eq!(first.event().await.id, n.to_string(), "{proto}");
        }
        assert_eq!(first.finish().await, (vec![], Ok(())), "{proto}");

        // As EventSource does when the response ends: the same URL, with the last id seen.
        let last = first.last_event_id().to_string();
        assert_eq!(last, "3", "{proto}");
        let req = client
            .get("/events")
            .header("last-event-id", &last)
            .body(empty())
            .expect("valid request");
        let mut second = client.open_with(req).await;
        let mut writer = backend.stream().await;
        let resume_after: u64 = writer
            .header("last-event-id")
            .and_then(|v| v.parse().ok())
            .expect("Last-Event-ID reaches the backend");
        for n in resume_after + 1..=resume_after + 2 {
            writer.write(format!("id: {n}\ndata: event {n}\n\n")).await;
        }
        assert_eq!(
            second.event().await,
            Event::message("4", "event 4"),
            "{proto}"
        );
        assert_eq!(
            second.event().await,
            Event::message("5", "event 5"),
            "{proto}"
        );
    }
}

#[tokio::test]
async fn sse_shutdown_waits_for_event_boundary_then_sends_retry() {
    let mut backend = SseBackend::start().await;
    let mut gw = gateway(&backend, r#"{ shutdown_retry = "2s" }"#).await;

    // Per protocol, one stream in the middle of an event and one idle at a boundary, each on
    // a connection of its own.
    let mut busy = Vec::new();
    let mut idle = Vec::new();
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        writer.write("id: 1\ndata: one\n\n").await;
        assert_eq!(stream.event().await, Event::message("1", "one"), "{proto}");
        writer.write("id: 2\ndata: tw").await;
        stream.raw_ends_with(b"data: tw").await;
        busy.push((proto, client, stream, writer));

        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        writer.write("id: 1\ndata: one\n\n").await;
        assert_eq!(stream.event().await, Event::message("1", "one"), "{proto}");
        idle.push((proto, client, stream, writer));
    }

    gw.begin_shutdown();
    // The idle streams end at once, with the retry hint and a clean end.
    for (proto, _client, stream, writer) in &mut idle {
        assert_eq!(
            stream.finish().await,
            (vec![Item::Retry(2000)], Ok(())),
            "{proto}"
        );
        writer.disconnected().await;
    }
    // The busy ones are still open: the rest of the event still gets through, then the
    // stream ends right after it.
    for (proto, _client, stream, writer) in &mut busy {
        writer.write("o").await;
        stream.raw_ends_with(b"data: two").await;
        writer.write("\n\n").await;
        assert_eq!(stream.event().await, Event::message("2", "two"), "{proto}");
        assert_eq!(
            stream.finish().await,
            (vec![Item::Retry(2000)], Ok(())),
            "{proto}"
        );
        assert!(
            stream.raw_text().ends_with("data: two\n\nretry: 2000\n\n"),
            "{proto}"
        );
        writer.disconnected().await;
    }
    // Nothing is left for the grace period (30 s, longer than the harness waits).
    gw.stopped().await;
}

/// A busy backend's chunks need not end where events end: the chunk that completes the event in
/// progress may carry the start of the next one. The stream still ends at that boundary.
#[tokio::test]
async fn sse_shutdown_ends_at_boundary_inside_a_chunk() {
    let mut backend = SseBackend::start().await;
    let mut gw = gateway(&backend, r#"{ shutdown_retry = "2s" }"#).await;
    let mut busy = Vec::new();
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        writer.write("id: 1\ndata: one\n\nid: 2\ndata: tw").await;
        stream.raw_ends_with(b"data: tw").await;
        busy.push((proto, client, stream, writer));
    }
    // A stream idle at a boundary, to see that the shutdown has reached the streams.
    let mut client = SseClient::connect(gw.https, &gw.ca, Proto::H2).await;
    let mut idle = client.open("/events").await;
    let _idle_writer = backend.stream().await;

    gw.begin_shutdown();
    assert_eq!(idle.finish().await, (vec![Item::Retry(2000)], Ok(())));
    for (proto, _client, stream, writer) in &mut busy {
        writer.write("o\n\nid: 3\ndata: thr").await;
        assert_eq!(stream.event().await, Event::message("1", "one"), "{proto}");
        assert_eq!(stream.event().await, Event::message("2", "two"), "{proto}");
        assert_eq!(
            stream.finish().await,
            (vec![Item::Retry(2000)], Ok(())),
            "{proto}"
        );
        let raw = stream.raw_text();
        assert!(
            raw.ends_with("data: two\n\nretry: 2000\n\n"),
            "{proto}: {raw:?}"
        );
        writer.disconnected().await;
    }
    gw.stopped().await;
}

#[tokio::test]
async fn sse_idle_timeout_ends_silent_stream() {
    let mut backend = SseBackend::start().await;
    let gw = GatewayBuilder::new()
        .route(
            route("/events")
                .to(backend.url())
                .set("sse", r#"{ idle_timeout = "300ms" }"#),
        )
        .route(
            route("/beating")
                .to(backend.url())
                .set("sse", r#"{ idle_timeout = "600ms", heartbeat = "100ms" }"#),
        )
        .start()
        .await;
    for proto in Proto::ALL {
        let mut client = SseClient::connect(gw.https, &gw.ca, proto).await;
        let mut stream = client.open("/events").await;
        let mut writer = backend.stream().await;
        writer.write("id: 1\ndata: then silence\n\n").await;
        assert_eq!(
            stream.event().await,
            Event::message("1", "then silence"),
            "{proto}"
        );
        assert_eq!(stream.finish().await, (vec![], Ok(())), "{proto}");
        writer.disconnected().await;

        // Heartbeats are the gateway's own: they do not count as the backend being alive.
        let mut stream = client.open("/beating").await;
        let writer = backend.stream().await;
        let (items, end) = stream.finish().await;
        assert_eq!(end, Ok(()), "{proto}");
        assert!(
            !items.is_empty(),
            "{proto}: heartbeats while the backend is silent"
        );
        assert!(
            items.iter().all(|i| *i == Item::Comment(String::new())),
            "{proto}: {items:?}"
        );
        writer.disconnected().await;
    }
}
