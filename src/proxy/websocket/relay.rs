//! The WebSocket relay: copies bytes both ways unchanged through small bounded buffers, reading
//! only frame headers (RFC 6455 5.2) so it always knows where a frame ends. That is what lets
//! it inject a Ping or a Close between frames, count messages, and enforce a size limit.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::frame::{self, Parsed};
use crate::drain::Drain;
use crate::upstream::MoveReason;

/// Size of the read buffer, shared by all relays on a thread: one TLS record's plaintext.
/// A relay keeps no buffer of its own while its peers keep up (and none at all while idle);
/// only bytes its destination cannot take yet are copied aside, at most one read's worth.
const READ_SIZE: usize = 16 * 1024;

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_SIZE].into_boxed_slice());
}

/// How long the gateway waits for peers to finish a close it started or relayed.
const LINGER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub ping_interval: Option<Duration>,
    pub idle_timeout: Duration,
    pub max_message_size: Option<u64>,
    /// Messages a second the client may send (bursts of twice that).
    pub max_messages_per_second: Option<u32>,
    /// `limits.write_stall_timeout`: a client that takes none of the bytes waiting for it
    /// for this long ends the tunnel. The relay is the only writer to the client (an HTTP/1.1
    /// socket after the upgrade, or the tunnel's own HTTP/2 stream, whose flow control can
    /// stop the gateway before the socket fills), so its own blocked writes are the measure.
    pub write_stall: Option<Duration>,
    /// Asked to move off its backend (`backend_drain`, `rebalance`): the client gets the
    /// reason's close code and reconnects, the balancer places it again.
    pub moves: Option<std::sync::Arc<crate::upstream::held::MoveSignal>>,
    /// `max_connection_age` (with its jitter): the tunnel is moved then.
    pub age_at: Option<Instant>,
    /// When the token it was opened with expires (`end_at_expiry`): Close 1008 to the client,
    /// 1001 to the backend.
    pub expires_at: Option<Instant>,
}

/// A token bucket for one connection's messages: no map, no lock, a few bytes.
#[derive(Debug)]
struct MessageRate {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl MessageRate {
    fn new(per_second: u32) -> MessageRate {
        let burst = 2.0 * f64::from(per_second);
        MessageRate {
            per_second: f64::from(per_second),
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes a token for a new message; false when there is none.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Who ended the connection, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    Client,
    Backend,
    /// The gateway: size limit, idle timeout, shutdown.
    Gateway,
}

impl ClosedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Backend => "backend",
            ClosedBy::Gateway => "gateway",
        }
    }
}

/// What passed through one direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectionStats {
    pub bytes: u64,
    pub messages: u64,
}

#[derive(Debug, Clone)]
pub struct RelayStats {
    pub to_backend: DirectionStats,
    pub to_client: DirectionStats,
    pub closed_by: ClosedBy,
    /// The first close code seen or sent; `None` when a side vanished without a Close (1006).
    pub close_code: Option<u16>,
    /// Why the gateway closed, when it did.
    pub reason: Option<&'static str>,
    /// The gateway moved the tunnel off its backend (the client was told to reconnect).
    pub moved: Option<MoveReason>,
}

/// Something in one direction that the relay as a whole must react to.
#[derive(Debug)]
enum Event {
    /// The source sent EOF (`None`) or failed.
    ReadEnded(Option<io::Error>),
    WriteFailed(io::Error),
    /// A Close frame from the source has been forwarded in full.
    CloseForwarded(Option<u16>),
    /// The source started a frame that takes its message past `max_message_size`.
    TooBig,
    /// The source started a message beyond `max_messages_per_second`.
    TooFast,
    /// The source sent bytes that are not a WebSocket frame.
    Invalid(&'static str),
    /// The client stopped taking bytes, and the relay's timer is set later than
    /// `write_stall_timeout` from then. (The relay's own, not a pump's: it is looked for once
    /// both pumps wait, and at most once per timer setting, not at every full socket buffer.)
    Blocked,
}

/// One direction: source -> destination, tracking frame boundaries.
struct Pump {
    /// Bytes read but not yet written: a partial frame header, or what the destination could
    /// not take. Empty (and unallocated) most of the time.
    pending: Vec<u8>,
    /// Bytes of the current frame (header included) not yet scanned; 0 at a frame boundary.
    frame_left: u64,
    /// The frame being scanned is a Close from the source; its code.
    forwarding_close: Option<Option<u16>>,
    /// Bytes at the head of what is to be written that the tracker has already scanned.
    unsent: usize,
    /// What to report once the scanned bytes are written (a Close passed, or a frame that
    /// must not be).
    after_span: Option<Event>,
    /// Payload bytes of the current data message so far (summed over fragments).
    message_len: u64,
    /// Frames the gateway writes itself, at the next boundary.
    inject: VecDeque<Vec<u8>>,
    inject_at: usize,
    /// Frames toward the backend must be masked (the gateway is the client there).
    mask: bool,
    read_done: bool,
    write_done: bool,
    /// After a Close the gateway sent: drop further input, shut the destination down.
    discard: bool,
    shutdown_pending: bool,
    needs_flush: bool,
    close_sent: bool,
    /// Since when the destination has taken no bytes while some waited; `None` while it does.
    blocked_since: Option<Instant>,
    last_read: Instant,
    stats: DirectionStats,
    /// The client's message rate (client -> backend only).
    rate: Option<MessageRate>,
}

/// Why [`Pump::forward`] stopped.
enum Stop {
    /// Everything given was written, or the rest is an incomplete header: read more.
    NeedMore,
    /// The destination is not ready; the waker is registered.
    Blocked,
    Event(Event),
}

impl Pump {
    fn new(mask: bool) -> Pump {
        Pump {
            pending: Vec::new(),
            frame_left: 0,
            forwarding_close: None,
            unsent: 0,
            after_span: None,
            message_len: 0,
            inject: VecDeque::new(),
            inject_at: 0,
            mask,
            read_done: false,
            write_done: false,
            discard: false,
            shutdown_pending: false,
            needs_flush: false,
            close_sent: false,
            blocked_since: None,
            last_read: Instant::now(),
            stats: DirectionStats::default(),
            rate: None,
        }
    }

    fn push_close(&mut self, code: u16, reason: &str) {
        if self.close_sent || self.write_done || self.inject.iter().any(|f| f[0] == 0x88) {
            return;
        }
        let mask = self.mask.then(random_mask);
        self.inject
            .push_back(frame::close_frame(code, reason, mask));
    }

    fn push_ping(&mut self) {
        if self.close_sent || self.discard || !self.inject.is_empty() {
            return;
        }
        let mask = self.mask.then(random_mask);
        self.inject
            .push_back(frame::control_frame(frame::OP_PING, b"streamgate", mask));
    }

    /// Ends this direction's writing once what is queued is out.
    fn finish(&mut self) {
        self.shutdown_pending = true;
    }

    /// Writes the gateway's own frames (at a boundary) and as much of `data` as `dst` takes.
    /// Frames are scanned ahead and written in as few writes as possible (one TLS record for a
    /// run of small messages), but never a partial header, and never past the boundary where a
    /// frame of the gateway's own waits. Returns the bytes of `data` used.
    fn forward<D>(
        &mut self,
        cx: &mut Context<'_>,
        mut dst: Pin<&mut D>,
        data: &[u8],
        limit: Option<u64>,
    ) -> (usize, Stop)
    where
        D: AsyncWrite + ?Sized,
    {
        let mut at = 0;
        loop {
            if self.unsent == 0 {
                match self.after_span.take() {
                    Some(Event::CloseForwarded(code)) => {
                        self.close_sent = true;
                        return (at, Stop::Event(Event::CloseForwarded(code)));
                    }
                    Some(e) => {
                        // Too big or invalid: nothing after this point is forwarded.
                        self.discard = true;
                        return (data.len(), Stop::Event(e));
                    }
                    None => {}
                }
                if self.frame_left == 0 {
                    if let Some(frame) = self.inject.front() {
                        let n = match dst.as_mut().poll_write(cx, &frame[self.inject_at..]) {
                            Poll::Pending => {
                                self.blocked();
                                return (at, Stop::Blocked);
                            }
                            Poll::Ready(Ok(0)) => {
                                let e = io::ErrorKind::WriteZero.into();
                                return (at, Stop::Event(Event::WriteFailed(e)));
                            }
                            Poll::Ready(Ok(n)) => n,
                            Poll::Ready(Err(e)) => return (at, Stop::Event(Event::WriteFailed(e))),
                        };
                        self.needs_flush = true;
                        self.blocked_since = None;
                        self.inject_at += n;
                        if self.inject_at == frame.len() {
                            if frame[0] & 0x0F == frame::OP_CLOSE {
                                // RFC 6455 5.5.1: nothing may follow our Close.
                                self.close_sent = true;
                                self.discard = true;
                                self.shutdown_pending = true;
                            }
                            self.inject.pop_front();
                            self.inject_at = 0;
                        }
                        continue;
                    }
                }
                if self.discard {
                    return (data.len(), Stop::NeedMore);
                }
                let (span, after) = self.scan(&data[at..], limit);
                self.unsent = span;
                self.after_span = after;
                if span == 0 {
                    if self.after_span.is_some() {
                        continue;
                    }
                    return (at, Stop::NeedMore);
                }
            }
            let end = at + self.unsent;
            let written = match dst.as_mut().poll_write(cx, &data[at..end]) {
                Poll::Pending => {
                    self.blocked();
                    return (at, Stop::Blocked);
                }
                Poll::Ready(Ok(0)) => {
                    let e = io::ErrorKind::WriteZero.into();
                    return (at, Stop::Event(Event::WriteFailed(e)));
                }
                Poll::Ready(Ok(w)) => w,
                Poll::Ready(Err(e)) => return (at, Stop::Event(Event::WriteFailed(e))),
            };
            self.needs_flush = true;
            self.blocked_since = None;
            at += written;
            self.unsent -= written;
            self.stats.bytes += written as u64;
        }
    }

    /// Advances the frame tracker over `data` as far as it may be written in one go: whole
    /// headers (and whole control frames), then payload. Stops after a Close (reported once it
    /// is written), before a frame that breaks the size limit or is invalid (reported once what
    /// comes before it is written), and at the first boundary when a frame waits to be injected.
    fn scan(&mut self, data: &[u8], limit: Option<u64>) -> (usize, Option<Event>) {
        let stop_at_boundary = !self.inject.is_empty();
        let mut pos = 0;
        loop {
            if self.frame_left > 0 {
                let n = (data.len() - pos).min(self.frame_left.min(usize::MAX as u64) as usize);
                pos += n;
                self.frame_left -= n as u64;
                if self.frame_left > 0 {
                    return (pos, None);
                }
                if let Some(code) = self.forwarding_close.take() {
                    return (pos, Some(Event::CloseForwarded(code)));
                }
                if stop_at_boundary {
                    return (pos, None);
                }
            }
            if pos == data.len() {
                return (pos, None);
            }
            let h = match frame::parse(&data[pos..]) {
                Parsed::Incomplete => return (pos, None),
                Parsed::Invalid(why) => return (pos, Some(Event::Invalid(why))),
                Parsed::Header(h) => h,
            };
            if h.is_control() {
                // Control frames (at most 139 bytes) are taken whole, to read a Close's code.
                if ((data.len() - pos) as u64) < h.frame_len() {
                    return (pos, None);
                }
                if h.opcode == frame::OP_CLOSE {
                    let payload = &data[pos + h.header_len..pos + h.frame_len() as usize];
                    self.forwarding_close = Some(frame::close_code(payload, h.mask));
                }
            } else {
                let len = if h.opcode == frame::OP_CONTINUATION {
                    self.message_len + h.payload_len
                } else {
                    h.payload_len
                };
                if limit.is_some_and(|max| len > max) {
                    // The frame is not forwarded: its receiver sees a clean boundary.
                    return (pos, Some(Event::TooBig));
                }
                let starts_message = h.opcode != frame::OP_CONTINUATION;
                if starts_message && self.rate.as_mut().is_some_and(|r| !r.take()) {
                    // Not forwarded either: the backend never sees the message over the rate.
                    return (pos, Some(Event::TooFast));
                }
                self.message_len = len;
                if h.fin {
                    self.stats.messages += 1;
                }
            }
            self.frame_left = h.frame_len();
        }
    }

    fn poll<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        mut src: Pin<&mut S>,
        mut dst: Pin<&mut D>,
        limit: Option<u64>,
    ) -> Poll<Event>
    where
        S: AsyncRead + ?Sized,
        D: AsyncWrite + ?Sized,
    {
        loop {
            if !self.write_done {
                // 1. What is already buffered (and the gateway's own frames) goes first.
                let pending = std::mem::take(&mut self.pending);
                let (used, stop) = self.forward(cx, dst.as_mut(), &pending, limit);
                self.keep_unsent(pending, used);
                match stop {
                    Stop::Blocked => return Poll::Pending,
                    Stop::Event(e) => return Poll::Ready(e),
                    Stop::NeedMore => {}
                }
                // 2. Everything forwardable is written: flush before waiting for more.
                if self.needs_flush {
                    match dst.as_mut().poll_flush(cx) {
                        Poll::Pending => {
                            self.blocked();
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Event::WriteFailed(e)),
                        Poll::Ready(Ok(())) => {}
                    }
                    self.blocked_since = None;
                    self.needs_flush = false;
                }
                if self.shutdown_pending
                    && self.inject.is_empty()
                    && (self.discard || self.frame_left == 0)
                {
                    // A failed shutdown only means the peer is gone already.
                    let _ = ready!(dst.as_mut().poll_shutdown(cx));
                    self.write_done = true;
                    continue;
                }
            }

            // 3. Read more, into the shared buffer; forward straight from it when possible.
            if self.read_done {
                return Poll::Pending;
            }
            let step = SCRATCH.with_borrow_mut(|scratch| {
                let mut rb = ReadBuf::new(scratch);
                match src.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 || self.write_done || self.discard {
                            return Poll::Ready(Ok((n, Stop::NeedMore)));
                        }
                        self.last_read = Instant::now();
                        if !self.pending.is_empty() {
                            // A partial header waits: the new bytes complete it.
                            self.pending.extend_from_slice(&scratch[..n]);
                            return Poll::Ready(Ok((n, Stop::NeedMore)));
                        }
                        let (used, stop) = self.forward(cx, dst.as_mut(), &scratch[..n], limit);
                        if !self.discard {
                            self.pending.extend_from_slice(&scratch[used..n]);
                        }
                        Poll::Ready(Ok((n, stop)))
                    }
                }
            });
            match step {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    self.read_done = true;
                    return Poll::Ready(Event::ReadEnded(Some(e)));
                }
                Poll::Ready(Ok((0, _))) => {
                    self.read_done = true;
                    return Poll::Ready(Event::ReadEnded(None));
                }
                Poll::Ready(Ok((_, Stop::Event(e)))) => return Poll::Ready(e),
                // Blocked: the rest waits in `pending`, and the waker is registered.
                Poll::Ready(Ok((_, Stop::Blocked))) => return Poll::Pending,
                Poll::Ready(Ok((_, Stop::NeedMore))) => {}
            }
        }
    }

    /// The destination took nothing: the stall clock starts unless it runs already.
    fn blocked(&mut self) {
        if self.blocked_since.is_none() {
            self.blocked_since = Some(Instant::now());
        }
    }

    /// Keeps the unwritten tail of `pending`, releasing the allocation once it is all out.
    fn keep_unsent(&mut self, mut pending: Vec<u8>, used: usize) {
        if self.discard {
            self.unsent = 0;
            return;
        }
        if used >= pending.len() {
            return; // dropped: nothing stays allocated while the peers keep up
        }
        if used > 0 {
            pending.drain(..used);
        }
        self.pending = pending;
    }
}

fn random_mask() -> [u8; 4] {
    let mut m = [0u8; 4];
    // ring's system RNG only fails if the OS has no randomness at all; a fixed mask then is
    // still a valid frame (masking is for caches, not secrecy).
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut m);
    m
}

/// Relays between an upgraded client and backend until both sides are done, the gateway closes
/// the connection (size limit, idle timeout, drain), or the drain's grace period ends.
///
/// Not an `async fn`: one keeps a second copy of its arguments for as long as it runs
/// (rust-lang/rust#62958), 216 bytes more in every idle tunnel's task.
#[allow(clippy::manual_async_fn)]
pub fn relay<'d, C, B>(
    mut client: C,
    mut backend: B,
    config: RelayConfig,
    drain: &'d Drain,
) -> impl std::future::Future<Output = RelayStats> + 'd
where
    C: AsyncRead + AsyncWrite + Unpin + 'd,
    B: AsyncRead + AsyncWrite + Unpin + 'd,
{
    async move {
        let mut up = Pump::new(true); // client -> backend
        up.rate = config.max_messages_per_second.map(MessageRate::new);
        let mut down = Pump::new(false); // backend -> client
        let mut outcome = Outcome::default();

        // One timer for everything timed: the idle timeout, the next ping, the connection's age,
        // its token's expiry, a client's write stall and its slot in a paced shutdown; reused as
        // the linger deadline once closing. (An idle tunnel is mostly this task's state: one
        // timer, and no future kept per source of events, keeps it small.)
        let mut closing = false;
        // When a paced shutdown (`[shutdown] spread`) has this tunnel close.
        let mut spread_at: Option<Instant> = None;
        let mut next_ping = config.ping_interval.map(|every| Instant::now() + every);
        let stall_at =
            |down: &Pump| Option::zip(down.blocked_since, config.write_stall).map(|(t, d)| t + d);
        let next_check =
            |last: Instant, down: &Pump, spread_at: Option<Instant>, next_ping: Option<Instant>| {
                let idle = last + config.idle_timeout;
                [
                    config.age_at,
                    spread_at,
                    config.expires_at,
                    next_ping,
                    stall_at(down),
                ]
                .into_iter()
                .flatten()
                .fold(idle, Instant::min)
            };
        let deadline = tokio::time::sleep_until(next_check(Instant::now(), &down, None, next_ping));
        tokio::pin!(deadline);
        // Starts the close: peers get LINGER to finish it, then the relay ends.
        let linger = |closing: &mut bool, deadline: Pin<&mut tokio::time::Sleep>| {
            if !*closing {
                *closing = true;
                deadline.reset(Instant::now() + LINGER);
            }
        };
        let mut drained = drain.is_draining();
        if drained {
            outcome.gateway(frame::CLOSE_GOING_AWAY, "shutdown");
            close_both(&mut up, &mut down, "server shutting down");
        }

        loop {
            if up.read_done && down.read_done {
                break;
            }
            // The client's write stall must be seen by the timer: an earlier setting is needed
            // only when the timer is set beyond it (and never while closing: linger rules then).
            let timer_at = (!closing).then(|| deadline.deadline());
            let (side, event) = tokio::select! {
                e = poll_fn(|cx| {
                    if let Poll::Ready(e) = up.poll(cx, Pin::new(&mut client), Pin::new(&mut backend), config.max_message_size) {
                        return Poll::Ready((ClosedBy::Client, e));
                    }
                    if let Poll::Ready(e) = down.poll(cx, Pin::new(&mut backend), Pin::new(&mut client), config.max_message_size) {
                        return Poll::Ready((ClosedBy::Backend, e));
                    }
                    match (stall_at(&down), timer_at) {
                        (Some(at), Some(timer)) if at < timer => Poll::Ready((ClosedBy::Backend, Event::Blocked)),
                        _ => Poll::Pending,
                    }
                }) => e,
                _ = &mut deadline => {
                    if closing {
                        break;
                    }
                    let now = Instant::now();
                    let last = up.last_read.max(down.last_read);
                    if let (Some(every), Some(at)) = (config.ping_interval, next_ping) {
                        if at <= now {
                            // A ping once the client has sent nothing for the interval.
                            next_ping = Some(if now.duration_since(up.last_read) >= every {
                                down.push_ping();
                                now + every
                            } else {
                                up.last_read + every
                            });
                        }
                    }
                    if spread_at.is_some_and(|at| at <= now) {
                        outcome.gateway(frame::CLOSE_GOING_AWAY, "shutdown");
                        close_both(&mut up, &mut down, "server shutting down");
                        linger(&mut closing, deadline.as_mut());
                    } else if config.expires_at.is_some_and(|at| at <= now) {
                        outcome.gateway(frame::CLOSE_POLICY, "token expired");
                        down.push_close(frame::CLOSE_POLICY, "token expired");
                        up.push_close(frame::CLOSE_GOING_AWAY, "client token expired");
                        linger(&mut closing, deadline.as_mut());
                    } else if config.age_at.is_some_and(|at| at <= now) {
                        move_tunnel(MoveReason::Age, &mut up, &mut down, &mut outcome);
                        linger(&mut closing, deadline.as_mut());
                    } else if stall_at(&down).is_some_and(|at| at <= now) {
                        // Nothing more can reach the client: the backend gets 1001, then both go.
                        outcome.gateway(frame::CLOSE_GOING_AWAY, "client stopped reading");
                        up.push_close(frame::CLOSE_GOING_AWAY, "client stopped reading");
                        down.discard = true;
                        down.write_done = true;
                        linger(&mut closing, deadline.as_mut());
                    } else if now.duration_since(last) >= config.idle_timeout {
                        outcome.gateway(frame::CLOSE_GOING_AWAY, "idle timeout");
                        close_both(&mut up, &mut down, "idle timeout");
                        linger(&mut closing, deadline.as_mut());
                    } else {
                        deadline.as_mut().reset(next_check(last, &down, spread_at, next_ping));
                    }
                    continue;
                }
                reason = poll_fn(|cx| match &config.moves {
                    Some(m) => m.poll_asked(cx),
                    None => Poll::Pending,
                }), if !closing => {
                    move_tunnel(reason, &mut up, &mut down, &mut outcome);
                    linger(&mut closing, deadline.as_mut());
                    continue;
                }
                // Shutdown's two stages, one at a time: the drain, then the cut at the grace's end.
                _ = if drained { drain.cut() } else { drain.draining() } => {
                    if drained {
                        break;
                    }
                    drained = true;
                    let delay = drain.spread_delay();
                    if !delay.is_zero() && !closing {
                        // A paced shutdown: this tunnel's turn comes later.
                        let at = Instant::now() + delay;
                        spread_at = Some(at);
                        let last = up.last_read.max(down.last_read);
                        deadline.as_mut().reset(next_check(last, &down, spread_at, next_ping));
                        continue;
                    }
                    outcome.gateway(frame::CLOSE_GOING_AWAY, "shutdown");
                    close_both(&mut up, &mut down, "server shutting down");
                    // Peers get the grace period to answer; the cut ends what is left.
                    continue;
                }
            };

            // `side` is the source of the direction the event came from.
            let (from, to) = match side {
                ClosedBy::Client => (&mut up, &mut down),
                _ => (&mut down, &mut up),
            };
            match event {
                Event::CloseForwarded(code) => {
                    outcome.peer(side, code);
                    if to.close_sent {
                        // Both Closes have passed: the handshake is complete; peers close TCP now.
                        linger(&mut closing, deadline.as_mut());
                    }
                }
                Event::ReadEnded(error) => {
                    if let Some(e) = error {
                        tracing::debug!(from = side.as_str(), error = %e, "websocket read failed");
                    }
                    if !from.close_sent {
                        // The backend died or closed without a Close: the client is told 1011. A
                        // client that vanished has no code (1006 in the log).
                        let code =
                            (side == ClosedBy::Backend).then_some(frame::CLOSE_INTERNAL_ERROR);
                        outcome.peer(side, code);
                    }
                    if from.frame_left > 0 {
                        // Cut mid-frame: no frame can follow, so the connection just closes.
                        from.discard = true;
                    } else if !from.close_sent {
                        let (code, why) = match side {
                            ClosedBy::Backend => {
                                (frame::CLOSE_INTERNAL_ERROR, "backend closed the connection")
                            }
                            _ => (frame::CLOSE_GOING_AWAY, "client went away"),
                        };
                        from.push_close(code, why);
                    }
                    from.finish();
                    linger(&mut closing, deadline.as_mut());
                }
                Event::WriteFailed(e) => {
                    let to_name = match side {
                        ClosedBy::Client => "backend",
                        _ => "client",
                    };
                    tracing::debug!(to = to_name, error = %e, "websocket write failed");
                    // The destination is gone: nothing more can be said to it.
                    from.write_done = true;
                    from.discard = true;
                    linger(&mut closing, deadline.as_mut());
                }
                Event::TooBig => {
                    outcome.gateway(frame::CLOSE_TOO_BIG, "message too big");
                    // 1009 to the sender, 1001 to the receiver, each at its own frame boundary.
                    to.push_close(frame::CLOSE_TOO_BIG, "message too big");
                    from.push_close(frame::CLOSE_GOING_AWAY, "peer sent a message too big");
                    linger(&mut closing, deadline.as_mut());
                }
                Event::TooFast => {
                    outcome.gateway(frame::CLOSE_POLICY, "message rate exceeded");
                    // 1008 to the client (only the client's direction is limited), 1001 to the
                    // backend, each at its own frame boundary.
                    to.push_close(frame::CLOSE_POLICY, "message rate exceeded");
                    from.push_close(frame::CLOSE_GOING_AWAY, "client sent messages too fast");
                    linger(&mut closing, deadline.as_mut());
                }
                Event::Blocked => {
                    // `from` is the backend -> client direction.
                    if let Some(at) = stall_at(from) {
                        deadline.as_mut().reset(at);
                    }
                }
                Event::Invalid(why) => {
                    outcome.gateway(frame::CLOSE_PROTOCOL_ERROR, why);
                    from.discard = true;
                    to.push_close(frame::CLOSE_PROTOCOL_ERROR, "invalid frame");
                    from.push_close(frame::CLOSE_GOING_AWAY, "peer sent an invalid frame");
                    linger(&mut closing, deadline.as_mut());
                }
            }
        }

        RelayStats {
            to_backend: up.stats,
            to_client: down.stats,
            closed_by: outcome.closed_by.unwrap_or(ClosedBy::Gateway),
            close_code: outcome.close_code,
            reason: outcome.reason,
            moved: outcome.moved,
        }
    }
}

/// Who ended the connection first, and how: the first ending recorded wins.
#[derive(Default)]
struct Outcome {
    closed_by: Option<ClosedBy>,
    close_code: Option<u16>,
    reason: Option<&'static str>,
    moved: Option<MoveReason>,
}

impl Outcome {
    /// A peer closed (with a Close frame's code) or vanished.
    fn peer(&mut self, side: ClosedBy, code: Option<u16>) {
        if self.closed_by.is_none() {
            self.closed_by = Some(side);
            self.close_code = code;
        }
    }

    /// The gateway closed, sending `code`, because of `reason`.
    fn gateway(&mut self, code: u16, reason: &'static str) {
        if self.closed_by.is_none() {
            self.closed_by = Some(ClosedBy::Gateway);
            self.close_code = Some(code);
            self.reason = Some(reason);
        }
    }
}

/// Moves the tunnel off its backend: the client gets the reason's close code (1012 or 1001)
/// and reconnects, where the balancer places it again; the backend gets 1001.
fn move_tunnel(reason: MoveReason, up: &mut Pump, down: &mut Pump, outcome: &mut Outcome) {
    let why = match reason {
        MoveReason::Drain => "backend drained",
        MoveReason::Age => "max_connection_age reached",
        MoveReason::Rebalance => "rebalanced",
    };
    outcome.gateway(reason.close_code(), why);
    outcome.moved = Some(reason);
    down.push_close(reason.close_code(), why);
    up.push_close(frame::CLOSE_GOING_AWAY, why);
}

/// Close 1001 to both peers, each at its own next frame boundary.
fn close_both(up: &mut Pump, down: &mut Pump, why: &str) {
    up.push_close(frame::CLOSE_GOING_AWAY, why);
    down.push_close(frame::CLOSE_GOING_AWAY, why);
}
