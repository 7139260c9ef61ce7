//! Server-Sent Events: a response body that passes the backend's chunks on as they arrive and
//! knows where events end (WHATWG HTML 9.2.6), so it can add heartbeat comments on an idle
//! stream, end an idle stream, and end the stream on shutdown without cutting an event in two.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::upstream::PooledBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::body::BoxError;
use crate::config::SseConfig;
use crate::drain::Drain;
use crate::router::Route;

/// The comment the gateway writes on an idle stream: a comment line, then a blank line.
const HEARTBEAT: &[u8] = b":\n\n";

/// Where the bytes sent so far stand in the event-stream grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boundary {
    /// Bytes in the current, unterminated line.
    line_len: usize,
    /// The last terminated line was blank (an event was dispatched), or nothing was sent yet.
    last_blank: bool,
    /// The last byte was CR: an LF right after it belongs to the same line end.
    after_cr: bool,
}

impl Default for Boundary {
    fn default() -> Self {
        Boundary {
            line_len: 0,
            last_blank: true,
            after_cr: false,
        }
    }
}

impl Boundary {
    /// Whether a new event (or comment) may start here without splicing into one in progress.
    pub fn at_event_boundary(&self) -> bool {
        self.line_len == 0 && self.last_blank
    }

    /// Advances over `bytes`; returns how many events were completed (blank lines after data).
    pub fn advance(&mut self, bytes: &[u8]) -> u64 {
        let mut events = 0;
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    let blank = self.line_len == 0;
                    if blank && !self.last_blank {
                        events += 1;
                    }
                    self.last_blank = blank;
                    self.line_len = 0;
                    self.after_cr = b == b'\r';
                }
                _ => {
                    self.after_cr = false;
                    self.line_len += 1;
                }
            }
        }
        events
    }

    /// The length of the prefix of `bytes` that ends at the first event boundary in it (with
    /// the LF of a CRLF), if there is one.
    pub fn first_boundary(&self, bytes: &[u8]) -> Option<usize> {
        let mut probe = *self;
        for (i, &b) in bytes.iter().enumerate() {
            probe.advance(&[b]);
            if probe.at_event_boundary() {
                let crlf = b == b'\r' && bytes.get(i + 1) == Some(&b'\n');
                return Some(i + 1 + usize::from(crlf));
            }
        }
        None
    }
}

/// Who ended a stream, for the access log.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Backend,
    BackendError,
    Idle,
    Shutdown,
}

/// The backend's event stream on its way to the client.
pub struct SseBody {
    inner: PooledBody,
    route: Arc<Route>,
    conn_id: u64,
    boundary: Boundary,
    /// Fires at the next heartbeat or idle check.
    timer: Pin<Box<Sleep>>,
    last_backend: Instant,
    draining: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Shutdown has begun: end at the next event boundary.
    closing: bool,
    /// The body has a Content-Encoding: its bytes pass untouched, with no heartbeat or retry
    /// hint (plain text in a compressed body would corrupt it), and event boundaries cannot
    /// be seen, so shutdown ends it at once.
    encoded: bool,
    ended: Option<Ending>,
    start: Instant,
    events: u64,
    bytes: u64,
}

impl SseBody {
    pub fn new(
        inner: PooledBody,
        route: Arc<Route>,
        conn_id: u64,
        drain: &Drain,
        encoded: bool,
    ) -> SseBody {
        let SseConfig {
            heartbeat,
            idle_timeout,
            ..
        } = route.config.sse;
        let now = Instant::now();
        let first = heartbeat.map_or(idle_timeout, |h| h.min(idle_timeout));
        route.metrics.sse_streams.inc();
        SseBody {
            inner,
            route,
            conn_id,
            boundary: Boundary::default(),
            timer: Box::pin(tokio::time::sleep_until(now + first)),
            last_backend: now,
            draining: Box::pin(drain.draining_owned()),
            closing: false,
            encoded,
            ended: None,
            start: now,
            events: 0,
            bytes: 0,
        }
    }

    fn send(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.encoded {
            self.events += self.boundary.advance(&data);
        }
        self.bytes += data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    /// The stream ends here: a final `retry:` hint on shutdown, when configured, then the end.
    fn end(&mut self, ending: Ending) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.ended = Some(ending);
        let retry = self
            .route
            .config
            .sse
            .shutdown_retry
            .filter(|_| !self.encoded);
        if let (Ending::Shutdown, Some(retry)) = (ending, retry) {
            let hint = format!("retry: {}\n\n", retry.as_millis());
            return self.send(Bytes::from(hint));
        }
        Poll::Ready(None)
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended.is_some() {
            return Poll::Ready(None);
        }
        if !this.closing && this.draining.as_mut().poll(cx).is_ready() {
            this.closing = true;
        }
        if this.closing && (this.encoded || this.boundary.at_event_boundary()) {
            return this.end(Ending::Shutdown);
        }

        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_backend = Instant::now();
                return match frame.into_data() {
                    // Shutting down: the stream ends at the first boundary, even one inside a
                    // chunk; the start of the next event is not sent.
                    Ok(data) if this.closing && !this.encoded => {
                        match this.boundary.first_boundary(&data) {
                            Some(end) => this.send(data.slice(..end)),
                            None => this.send(data),
                        }
                    }
                    Ok(data) => this.send(data),
                    // Trailers pass as they are.
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                };
            }
            Poll::Ready(Some(Err(e))) => {
                // The backend died mid-stream: end the client's stream cleanly at the end of what
                // arrived, so EventSource reconnects with Last-Event-ID.
                tracing::warn!(
                    conn_id = this.conn_id,
                    route = %this.route.name,
                    error = %e,
                    "event stream backend failed"
                );
                return this.end(Ending::BackendError);
            }
            Poll::Ready(None) => return this.end(Ending::Backend),
            Poll::Pending => {}
        }

        // The backend is quiet: heartbeat or idle timeout, whichever is due.
        let SseConfig {
            heartbeat,
            idle_timeout,
            ..
        } = this.route.config.sse;
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let quiet = now - this.last_backend;
            if quiet >= idle_timeout {
                return this.end(Ending::Idle);
            }
            let mut next = this.last_backend + idle_timeout;
            if let Some(every) = heartbeat.filter(|_| !this.encoded) {
                if quiet >= every && this.boundary.at_event_boundary() {
                    // A heartbeat counts as the backend's silence continuing, not as activity:
                    // the next one is due a full interval from now.
                    this.timer.as_mut().reset((now + every).min(next));
                    this.bytes += HEARTBEAT.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(HEARTBEAT)))));
                }
                // Mid-event (or not yet due): check again one interval after the backend's last byte.
                let due = this.last_backend + every;
                next = next.min(if due > now { due } else { now + every });
            }
            this.timer.as_mut().reset(next);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended.is_some()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        self.route.metrics.sse_streams.dec();
        self.route
            .metrics
            .sse_lifetime
            .observe(self.start.elapsed().as_secs_f64());
        let ended_by = match self.ended {
            None => "client",
            Some(Ending::Backend) => "backend",
            Some(Ending::BackendError) => "backend-error",
            Some(Ending::Idle) => "idle-timeout",
            Some(Ending::Shutdown) => "shutdown",
        };
        tracing::info!(
            target: "streamgate::access",
            conn_id = self.conn_id,
            route = %self.route.name,
            duration_ms = self.start.elapsed().as_millis() as u64,
            events = self.events,
            bytes = self.bytes,
            ended_by,
            "event stream"
        );
    }
}

/// Whether a response is an event stream (`Content-Type: text/event-stream`, any parameters).
pub fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(chunks: &[&str]) -> (Boundary, u64) {
        let mut b = Boundary::default();
        let events = chunks.iter().map(|c| b.advance(c.as_bytes())).sum();
        (b, events)
    }

    #[test]
    fn boundary_after_blank_line_with_each_line_ending() {
        for stream in [
            "data: a\n\n",
            "data: a\r\n\r\n",
            "data: a\r\r",
            "id: 1\ndata: a\n\n",
        ] {
            let (b, events) = after(&[stream]);
            assert!(b.at_event_boundary(), "{stream:?}");
            assert_eq!(events, 1, "{stream:?}");
        }
        assert!(Boundary::default().at_event_boundary(), "nothing sent yet");
    }

    #[test]
    fn no_boundary_inside_an_event() {
        for stream in [
            "data: a",
            "data: a\n",
            "data: a\r\n",
            "data: a\n\ndata: b\n",
            ": c\n",
        ] {
            let (b, _) = after(&[stream]);
            assert!(!b.at_event_boundary(), "{stream:?}");
        }
    }

    #[test]
    fn split_crlf_and_chunks_count_events_once() {
        let (b, events) = after(&["data: a\r", "\n\r", "\ndata: b\n", "\n"]);
        assert!(b.at_event_boundary());
        assert_eq!(events, 2);
        let (_, events) = after(&[": comment\n\n"]);
        assert_eq!(events, 1, "a comment block is dispatched like an event");
    }

    #[test]
    fn first_boundary_inside_a_chunk() {
        let (mid_event, _) = after(&["data: a"]);
        assert_eq!(mid_event.first_boundary(b"b\n\ndata: c"), Some(3));
        assert_eq!(mid_event.first_boundary(b"b\r\n\r\ndata: c"), Some(5));
        assert_eq!(mid_event.first_boundary(b"b\r\r"), Some(3));
        assert_eq!(mid_event.first_boundary(b"b\ndata: c\n"), None);
        let (after_line, _) = after(&["data: a\n"]);
        assert_eq!(after_line.first_boundary(b"\n: next\n\n"), Some(1));
    }

    #[test]
    fn content_type_detection() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "content-type",
            "Text/Event-Stream; charset=utf-8".parse().expect("value"),
        );
        assert!(is_event_stream(&h));
        h.insert("content-type", "text/plain".parse().expect("value"));
        assert!(!is_event_stream(&h));
    }
}
