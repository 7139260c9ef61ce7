//! Server-Sent Events: a response body that passes the backend's chunks on as they arrive and
//! knows where events end (WHATWG HTML 9.2.6), so it can add heartbeat comments on an idle
//! stream, end an idle stream, end the stream on shutdown without cutting an event in two, and
//! (`[route.sse] resume`) continue it on another backend when its own fails or is moved.

pub mod grammar;
pub mod resume;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::access::AccessLine;
use super::body::BoxError;
use crate::config::SseConfig;
use crate::drain::{Drain, LongLived};
use crate::metrics::ResumeOutcome;
use crate::router::Route;
use crate::upstream::{Held, MoveReason, PooledBody};
pub use grammar::Boundary;
use grammar::{EventIds, WholeEvents};
use resume::{NotResumed, Resumed, StreamRequest};

/// The comment the gateway writes on an idle stream: a comment line, then a blank line.
const HEARTBEAT: &[u8] = b":\n\n";

/// The `retry:` hint of a stream the gateway ends so that its client reconnects elsewhere
/// (moved without resume, or no backend took it over), when `shutdown_retry` is not set:
/// about the browsers' own default, jittered.
const MOVE_RETRY: Duration = Duration::from_secs(3);

/// Who ended a stream, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Backend,
    BackendError,
    Idle,
    Shutdown,
    /// Moved off its backend (drain, age, rebalance) and not resumable: the client reconnects.
    Moved,
    /// `resume_attempts` tries found no backend to take the stream over.
    ResumeFailed,
    /// A backend asked to take it over answered 204: the stream is over.
    Stopped,
    /// The token the stream was opened with expired (`end_at_expiry`).
    TokenExpired,
}

type Reopening = Pin<Box<dyn Future<Output = Result<Resumed, NotResumed>> + Send>>;

/// What a stream on a `resume = true` route keeps to continue elsewhere.
struct Resume {
    request: Arc<StreamRequest>,
    ids: EventIds,
    whole: WholeEvents,
    /// A backend is being asked to take the stream over.
    trying: Option<Reopening>,
    /// The backend the stream is leaving, for the log.
    from: String,
    /// Times the stream moved to another backend.
    count: u32,
}

/// The backend's event stream on its way to the client.
pub struct SseBody {
    /// None while the stream is between backends.
    inner: Option<PooledBody>,
    route: Arc<Route>,
    conn_id: u64,
    /// Where the bytes delivered to the client stand.
    boundary: Boundary,
    /// Fires at the next heartbeat, idle check, age or shutdown slot.
    timer: Pin<Box<Sleep>>,
    last_backend: Instant,
    drain: Drain,
    draining: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// This stream's slot in a paced shutdown (`[shutdown] spread`).
    spread_at: Option<Instant>,
    /// The stream ends at the next event boundary, for this reason.
    closing: Option<Ending>,
    /// The body has a Content-Encoding: its bytes pass untouched, with no heartbeat or retry
    /// hint (plain text in a compressed body would corrupt it), and event boundaries cannot
    /// be seen, so shutdown ends it at once.
    encoded: bool,
    /// Its place on its backend, which may ask it to move.
    held: Option<Held>,
    /// `max_connection_age`, jittered.
    age_at: Option<Instant>,
    /// When the token the stream was opened with expires (`end_at_expiry`).
    expires_at: Option<Instant>,
    resume: Option<Box<Resume>>,
    _long_lived: LongLived,
    ended: Option<Ending>,
    start: Instant,
    events: u64,
    bytes: u64,
    /// The stream's access line, written when it is dropped.
    line: AccessLine,
}

impl SseBody {
    /// `request` is what it takes to open the stream again (None: it cannot be).
    pub fn new(
        inner: PooledBody,
        route: Arc<Route>,
        conn_id: u64,
        drain: &Drain,
        encoded: bool,
        request: Option<StreamRequest>,
        line: AccessLine,
    ) -> SseBody {
        let SseConfig {
            heartbeat,
            idle_timeout,
            resume,
            ..
        } = route.config.sse;
        let now = Instant::now();
        let first = heartbeat.map_or(idle_timeout, |h| h.min(idle_timeout));
        let age_at = crate::upstream::held::age_deadline(route.config.max_connection_age);
        route.metrics.sse_streams.inc();
        let held = inner.backend().map(|b| b.hold());
        let resume = request.filter(|_| resume && !encoded).map(|request| {
            Box::new(Resume {
                ids: EventIds::new(request.last_event_id()),
                request: Arc::new(request),
                whole: WholeEvents::default(),
                trying: None,
                from: String::new(),
                count: 0,
            })
        });
        SseBody {
            inner: Some(inner),
            held,
            route,
            conn_id,
            boundary: Boundary::default(),
            timer: Box::pin(tokio::time::sleep_until(
                age_at.map_or(now + first, |a| a.min(now + first)),
            )),
            last_backend: now,
            draining: Some(Box::pin(drain.draining_owned())),
            drain: drain.clone(),
            spread_at: None,
            closing: None,
            encoded,
            age_at,
            expires_at: None,
            resume,
            _long_lived: drain.long_lived(),
            ended: None,
            start: now,
            events: 0,
            bytes: 0,
            line,
        }
    }

    fn send(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.encoded {
            self.events += self.boundary.advance(&data);
        }
        if let Some(r) = &mut self.resume {
            r.ids.feed(&data);
        }
        self.bytes += data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    /// The stream ends here, with a `retry:` hint where one helps the client come back well.
    fn end(&mut self, ending: Ending) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.ended = Some(ending);
        self.inner = None;
        let configured = self.route.config.sse.shutdown_retry;
        let retry = match ending {
            Ending::Shutdown => configured.map(|r| {
                // A paced shutdown spreads the returns too.
                if self.drain.is_spread() {
                    jitter(r)
                } else {
                    r
                }
            }),
            Ending::Moved | Ending::ResumeFailed => Some(jitter(configured.unwrap_or(MOVE_RETRY))),
            _ => None,
        };
        if let Some(retry) = retry.filter(|_| !self.encoded) {
            let hint = format!("retry: {}\n\n", retry.as_millis());
            return self.send(Bytes::from(hint));
        }
        Poll::Ready(None)
    }

    /// The stream can go on elsewhere without a repeat or a gap: resume is on, the client
    /// holds whole events only, and it has an event id to continue from.
    fn resumable(&self) -> Option<String> {
        let r = self.resume.as_ref()?;
        if !self.boundary.at_event_boundary() {
            return None;
        }
        r.ids.last().map(str::to_string)
    }

    /// Leaves the current backend and asks another to take the stream over. False when the
    /// stream cannot be resumed (counted as such).
    fn begin_resume(&mut self) -> bool {
        let Some(last_id) = self.resumable() else {
            if self.resume.is_some() {
                self.route.metrics.resume(ResumeOutcome::NotResumable);
            }
            return false;
        };
        let Some(from) = self.held.take().map(|h| h.backend().clone()) else {
            return false;
        };
        self.inner = None;
        self.last_backend = Instant::now();
        let (route, boundary) = (self.route.clone(), self.boundary);
        let Some(r) = &mut self.resume else {
            return false;
        };
        r.whole.discard(boundary);
        r.from = from.address.to_string();
        r.trying = Some(Box::pin(resume::reopen(
            route,
            r.request.clone(),
            last_id,
            from,
        )));
        true
    }

    /// The backend failed (`why`): resume elsewhere, or end at the event boundary as the
    /// client has it.
    fn backend_failed(&mut self, why: &dyn std::fmt::Display) -> Option<Ending> {
        tracing::warn!(
            conn_id = self.conn_id,
            route = %self.route.name,
            backend = %self.held.as_ref().map(|h| h.backend().address.to_string()).unwrap_or_default(),
            error = %why,
            "event stream backend failed"
        );
        if self.begin_resume() {
            None
        } else {
            Some(Ending::BackendError)
        }
    }

    /// The stream is asked to move off its backend.
    fn start_move(&mut self, reason: MoveReason) {
        if self.closing.is_some() || self.resume.as_ref().is_some_and(|r| r.trying.is_some()) {
            return;
        }
        self.route.metrics.moved(reason);
        tracing::debug!(conn_id = self.conn_id, route = %self.route.name, reason = reason.as_str(), "moving event stream");
        if !self.begin_resume() {
            // Not resumable: the client reconnects after the event in progress, and the
            // balancer places it again.
            self.closing = Some(Ending::Moved);
        }
    }

    /// Polls the takeover in progress: Some(ending) when the stream must end.
    fn poll_resume(&mut self, cx: &mut Context<'_>) -> Option<Ending> {
        let r = self.resume.as_mut()?;
        let trying = r.trying.as_mut()?;
        let result = match trying.as_mut().poll(cx) {
            Poll::Pending => return None,
            Poll::Ready(result) => result,
        };
        r.trying = None;
        match result {
            Ok(resumed) => {
                r.count += 1;
                tracing::info!(
                    conn_id = self.conn_id,
                    route = %self.route.name,
                    from = %r.from,
                    to = %resumed.backend.address,
                    last_event_id = r.ids.last().unwrap_or_default(),
                    attempts = resumed.attempts,
                    "event stream resumed"
                );
                self.held = Some(resumed.backend.hold());
                self.inner = Some(resumed.body);
                self.last_backend = Instant::now();
                None
            }
            Err(NotResumed::Stopped) => Some(Ending::Stopped),
            Err(NotResumed::Exhausted) => {
                tracing::warn!(
                    conn_id = self.conn_id,
                    route = %self.route.name,
                    from = %r.from,
                    attempts = self.route.config.sse.resume_attempts,
                    "event stream could not be resumed: ending it with a retry hint"
                );
                Some(Ending::ResumeFailed)
            }
        }
    }

    /// `end_at_expiry`: the stream ends at the first event boundary once the token it was
    /// opened with has expired.
    pub fn expiring(mut self, at: Option<std::time::Instant>) -> SseBody {
        if let Some(at) = at {
            self.expires_at = Some(Instant::from_std(at));
            let next = self.wake_at(self.timer.deadline());
            self.timer.as_mut().reset(next);
        }
        self
    }

    /// The next time the timer must look: heartbeat or idle check `base`, the age, the slot,
    /// the token's expiry.
    fn wake_at(&self, base: Instant) -> Instant {
        [self.age_at, self.spread_at, self.expires_at]
            .into_iter()
            .flatten()
            .fold(base, Instant::min)
    }
}

/// `retry` give or take half, so that clients told together do not return together.
fn jitter(retry: Duration) -> Duration {
    retry.mul_f64(0.5 + fastrand::f64())
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
        if let Some(draining) = &mut this.draining {
            if draining.as_mut().poll(cx).is_ready() {
                this.draining = None;
                let delay = this.drain.spread_delay();
                if delay.is_zero() {
                    this.closing = Some(Ending::Shutdown);
                } else {
                    // A paced shutdown: this stream's turn comes later.
                    this.spread_at = Some(Instant::now() + delay);
                    let at = this.wake_at(this.timer.deadline());
                    this.timer.as_mut().reset(at);
                }
            }
        }
        if let Some(held) = &this.held {
            if let Poll::Ready(reason) = held.signal().poll_asked(cx) {
                // Once: a stream that moves lets go of `held`, one that closes is `closing`.
                this.start_move(reason);
            }
        }

        loop {
            if let Some(ending) = this.closing {
                // A stream between backends has delivered whole events only.
                if this.encoded || this.boundary.at_event_boundary() {
                    return this.end(ending);
                }
            }
            if let Some(ending) = this.poll_resume(cx) {
                return this.end(ending);
            }
            let Some(inner) = &mut this.inner else {
                break;
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.last_backend = Instant::now();
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        // Trailers pass as they are.
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    // On a resume route only whole events go out: half of one would be
                    // followed by the next backend's bytes.
                    let data = match &mut this.resume {
                        Some(r) => r.whole.push(data),
                        None => data,
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if this.closing.is_some() && !this.encoded {
                        // Ending: at the first boundary, even one inside a chunk; the start
                        // of the next event is not sent.
                        return match this.boundary.first_boundary(&data) {
                            Some(end) => this.send(data.slice(..end)),
                            None => this.send(data),
                        };
                    }
                    return this.send(data);
                }
                Poll::Ready(Some(Err(e))) => {
                    // Reset, or the body broke off before its end (no terminating chunk).
                    match this.backend_failed(&e) {
                        Some(ending) => return this.end(ending),
                        None => continue,
                    }
                }
                Poll::Ready(None) => {
                    let partial = this.resume.as_ref().is_some_and(|r| r.whole.has_partial());
                    if partial {
                        // Ended in the middle of an event: not the end the backend meant.
                        match this.backend_failed(&"event stream ended inside an event") {
                            Some(ending) => return this.end(ending),
                            None => continue,
                        }
                    }
                    return this.end(Ending::Backend);
                }
                Poll::Pending => break,
            }
        }

        // The backend is quiet (or the stream is between backends): heartbeat, idle
        // timeout, age or shutdown slot, whichever is due.
        let SseConfig {
            heartbeat,
            idle_timeout,
            ..
        } = this.route.config.sse;
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if this.spread_at.is_some_and(|at| at <= now) {
                this.spread_at = None;
                this.closing = Some(Ending::Shutdown);
                if this.encoded || this.boundary.at_event_boundary() {
                    return this.end(Ending::Shutdown);
                }
            }
            if this.expires_at.is_some_and(|at| at <= now) {
                this.expires_at = None;
                if this.closing.is_none() {
                    this.closing = Some(Ending::TokenExpired);
                }
                if this.encoded || this.boundary.at_event_boundary() {
                    return this.end(Ending::TokenExpired);
                }
            }
            if this.age_at.is_some_and(|at| at <= now) {
                this.age_at = None;
                this.start_move(MoveReason::Age);
                // Whatever the move started needs polling now.
                cx.waker().wake_by_ref();
            }
            let between = this.inner.is_none();
            let quiet = now - this.last_backend;
            if quiet >= idle_timeout && !between {
                return this.end(Ending::Idle);
            }
            let mut next = this.last_backend + idle_timeout;
            if let Some(every) = heartbeat.filter(|_| !this.encoded) {
                if quiet >= every && this.boundary.at_event_boundary() {
                    // A heartbeat counts as the backend's silence continuing, not as activity:
                    // the next one is due a full interval from now.
                    let at = this.wake_at((now + every).min(next));
                    this.timer.as_mut().reset(at);
                    this.bytes += HEARTBEAT.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(HEARTBEAT)))));
                }
                // Mid-event (or not yet due): check again one interval after the backend's last byte.
                let due = this.last_backend + every;
                next = next.min(if due > now { due } else { now + every });
            }
            if between && next <= now {
                // Between backends, the idle timeout waits for the takeover to settle.
                next = now + idle_timeout;
            }
            let at = this.wake_at(next);
            this.timer.as_mut().reset(at);
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
        // (side, reason) for the access line, which is written as `line` is dropped.
        let (closed_by, reason) = match self.ended {
            None => ("client", "client"),
            Some(Ending::Backend) => ("backend", "backend"),
            Some(Ending::BackendError) => ("backend", "backend-error"),
            Some(Ending::Idle) => ("gateway", "idle-timeout"),
            Some(Ending::Shutdown) => ("gateway", "shutdown"),
            Some(Ending::Moved) => ("gateway", "moved"),
            Some(Ending::ResumeFailed) => ("gateway", "resume-failed"),
            Some(Ending::Stopped) => ("backend", "backend-stopped"),
            Some(Ending::TokenExpired) => ("gateway", "token-expired"),
        };
        if self.ended == Some(Ending::TokenExpired) {
            self.route
                .all_metrics
                .token_expired
                .get_or_create(&crate::metrics::StreamLabels {
                    route: self.route.name.clone(),
                    kind: "sse",
                })
                .inc();
        }
        let line = &mut self.line;
        line.closed_by = closed_by;
        line.reason = reason;
        line.complete = self.ended.is_some();
        line.bytes_out = self.bytes;
        line.events = Some(self.events);
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
