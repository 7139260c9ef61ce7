//! The WebSockets and event streams a backend holds open, and how the gateway asks one of them
//! to move to another backend: when its backend has drained for `backend_drain`, when it has
//! reached `max_connection_age`, or when `rebalance` sheds it.
//!
//! A connection registers on the backend that serves it ([`super::Backend::hold`]) and watches
//! its [`MoveSignal`]; what "moving" means is the connection's own business (a WebSocket is
//! closed with a code that makes the client reconnect, an event stream resumes elsewhere).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::time::Instant;

/// Why a connection is asked to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveReason {
    /// Its backend left the route `backend_drain` ago.
    Drain,
    /// It reached `max_connection_age`.
    Age,
    /// Its backend holds more than its share (`rebalance`).
    Rebalance,
}

impl MoveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Drain => "drain",
            MoveReason::Age => "age",
            MoveReason::Rebalance => "rebalance",
        }
    }

    /// The close code a moved WebSocket's client gets: 1012 (Service Restart, IANA registry)
    /// when its backend is going or overloaded, 1001 (going away) when it merely got old.
    pub fn close_code(self) -> u16 {
        match self {
            MoveReason::Drain | MoveReason::Rebalance => 1012,
            MoveReason::Age => 1001,
        }
    }

    fn from_u8(v: u8) -> Option<MoveReason> {
        match v {
            1 => Some(MoveReason::Drain),
            2 => Some(MoveReason::Age),
            3 => Some(MoveReason::Rebalance),
            _ => None,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            MoveReason::Drain => 1,
            MoveReason::Age => 2,
            MoveReason::Rebalance => 3,
        }
    }
}

/// One held connection's "please move" flag: the first reason given wins. A few bytes, no
/// allocation beyond its `Arc`: every open WebSocket and stream has one.
#[derive(Default, Debug)]
pub struct MoveSignal {
    reason: AtomicU8,
    /// The connection's task, woken when it is asked (one waiter: the connection).
    waker: AtomicWaker,
}

impl MoveSignal {
    /// Asks the connection to move; false when it had been asked already. Only
    /// [`HeldSet`] asks (it counts the asked).
    fn ask(&self, reason: MoveReason) -> bool {
        let asked = self
            .reason
            .compare_exchange(0, reason.to_u8(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if asked {
            self.waker.wake();
        }
        asked
    }

    pub fn reason(&self) -> Option<MoveReason> {
        MoveReason::from_u8(self.reason.load(Ordering::Acquire))
    }

    /// Ready with the reason once the connection is asked to move (and every time after).
    pub fn poll_asked(&self, cx: &mut Context<'_>) -> Poll<MoveReason> {
        if let Some(r) = self.reason() {
            return Poll::Ready(r);
        }
        self.waker.register(cx.waker());
        // Asked between the first look and the registration: the wake may have been missed.
        match self.reason() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }

    /// Resolves once the connection is asked to move.
    pub async fn wait(&self) -> MoveReason {
        std::future::poll_fn(|cx| self.poll_asked(cx)).await
    }
}

/// The held connections of one backend, oldest first.
#[derive(Default)]
pub struct HeldSet {
    list: Mutex<HeldList>,
    next: AtomicU64,
}

#[derive(Default)]
struct HeldList {
    by_id: BTreeMap<u64, Arc<MoveSignal>>,
    /// How many of them were asked to move (and are still here): the rebalancer reads the
    /// rest every second without walking the list.
    asked: usize,
}

impl HeldSet {
    fn insert(&self) -> (u64, Arc<MoveSignal>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(MoveSignal::default());
        if let Ok(mut list) = self.list.lock() {
            list.by_id.insert(id, signal.clone());
        }
        (id, signal)
    }

    fn remove(&self, id: u64) {
        if let Ok(mut list) = self.list.lock() {
            if let Some(signal) = list.by_id.remove(&id) {
                if signal.reason().is_some() {
                    list.asked -= 1;
                }
            }
        }
    }

    /// All held connections, including those already asked to move.
    pub fn len(&self) -> usize {
        self.list.lock().map_or(0, |l| l.by_id.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All held connections, and those not yet asked to move.
    pub fn counts(&self) -> (usize, usize) {
        self.list
            .lock()
            .map_or((0, 0), |l| (l.by_id.len(), l.by_id.len() - l.asked))
    }

    /// Asks every held connection to move; returns how many were newly asked.
    pub fn ask_all(&self, reason: MoveReason) -> usize {
        self.ask_some(usize::MAX, reason)
    }

    /// Asks the `n` oldest connections not yet asked to move; returns how many were asked.
    /// (Signals are only ever asked here, under the lock, so `asked` stays exact.)
    pub fn ask_some(&self, n: usize, reason: MoveReason) -> usize {
        let Ok(mut list) = self.list.lock() else {
            return 0;
        };
        let mut asked = 0;
        for signal in list.by_id.values() {
            if asked == n {
                break;
            }
            if signal.ask(reason) {
                asked += 1;
            }
        }
        list.asked += asked;
        asked
    }
}

/// One connection's place in its backend's [`HeldSet`]; leaves it when dropped.
pub struct Held {
    backend: Arc<super::Backend>,
    id: u64,
    signal: Arc<MoveSignal>,
}

impl Held {
    pub(super) fn new(backend: Arc<super::Backend>) -> Held {
        let (id, signal) = backend.held.insert();
        Held {
            backend,
            id,
            signal,
        }
    }

    pub fn backend(&self) -> &Arc<super::Backend> {
        &self.backend
    }

    pub fn signal(&self) -> &Arc<MoveSignal> {
        &self.signal
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.backend.held.remove(self.id);
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("backend", &self.backend.address)
            .field("id", &self.id)
            .finish()
    }
}

/// When a connection opened now reaches `max_age`, ±10 % so that clients that came together
/// (after an outage, a deploy) do not all leave together.
pub fn age_deadline(max_age: Option<Duration>) -> Option<Instant> {
    let age = max_age?;
    let factor = 0.9 + 0.2 * fastrand::f64();
    Some(Instant::now() + age.mul_f64(factor))
}

/// The rebalancer's view of one backend, one tick at a time.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShedState {
    /// Since when the backend has held more than 1.25x its share.
    over_since: Option<Instant>,
    /// Shedding down to its share (set once the excess lasted [`REBALANCE_AFTER`]).
    shedding: bool,
}

/// How long a backend must stay above 1.25x its share before connections are moved.
pub const REBALANCE_AFTER: Duration = Duration::from_secs(2);

/// How far above its fair share a backend may be before the rebalancer acts.
const TRIGGER: f64 = 1.25;

/// One rebalancing decision for one backend: how many of its connections to move now.
/// `held` is the backend's connections not already asked to move, `share` its weighted fair
/// share of the route's, `budget` how many the route may still move this tick.
pub fn shed(state: &mut ShedState, held: usize, share: f64, budget: usize, now: Instant) -> usize {
    let held_f = held as f64;
    // At least one whole connection over: a share of 1.2 is no reason to move anyone.
    let over = held_f > share * TRIGGER && held_f - share >= 1.0;
    if over {
        let since = *state.over_since.get_or_insert(now);
        if now.duration_since(since) >= REBALANCE_AFTER {
            state.shedding = true;
        }
    } else {
        state.over_since = None;
    }
    if !state.shedding {
        return 0;
    }
    // Down to the share, not just under the trigger: a backend that was added would
    // otherwise stay far below its own share.
    let target = share.ceil() as usize;
    if held <= target {
        state.shedding = false;
        state.over_since = None;
        return 0;
    }
    (held - target).min(budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = MoveSignal::default();
        assert_eq!(s.reason(), None);
        assert!(s.ask(MoveReason::Age));
        assert!(!s.ask(MoveReason::Drain));
        assert_eq!(s.reason(), Some(MoveReason::Age));
        assert_eq!(MoveReason::Drain.close_code(), 1012);
        assert_eq!(MoveReason::Age.close_code(), 1001);
    }

    #[test]
    fn sheds_to_the_share_after_the_excess_lasts() {
        let t0 = Instant::now();
        let mut s = ShedState::default();
        // 20 held, share 10: over, but not for long enough yet.
        assert_eq!(shed(&mut s, 20, 10.0, 2, t0), 0);
        assert_eq!(shed(&mut s, 20, 10.0, 2, t0 + Duration::from_secs(1)), 0);
        // Lasted: moves at the paced budget.
        assert_eq!(shed(&mut s, 20, 10.0, 2, t0 + REBALANCE_AFTER), 2);
        // Under the trigger (12 <= 12.5) but above the share: keeps going to the share.
        assert_eq!(shed(&mut s, 12, 10.0, 2, t0 + REBALANCE_AFTER * 2), 2);
        assert_eq!(shed(&mut s, 11, 10.0, 2, t0 + REBALANCE_AFTER * 3), 1);
        assert_eq!(shed(&mut s, 10, 10.0, 2, t0 + REBALANCE_AFTER * 4), 0);
        // Stopped: a small excess later does not start it again at once.
        assert_eq!(shed(&mut s, 12, 10.0, 2, t0 + REBALANCE_AFTER * 5), 0);
    }

    #[test]
    fn a_small_excess_moves_nobody() {
        let t0 = Instant::now();
        let mut s = ShedState::default();
        for i in 0..10 {
            // One connection on a backend whose share is 0.5 (two backends, one connection).
            assert_eq!(shed(&mut s, 1, 0.5, 1, t0 + REBALANCE_AFTER * i), 0);
        }
    }

    #[test]
    fn age_deadline_within_ten_percent() {
        for _ in 0..100 {
            let now = Instant::now();
            let at = age_deadline(Some(Duration::from_secs(100))).expect("set");
            let d = at.duration_since(now);
            assert!(
                d >= Duration::from_secs(89) && d <= Duration::from_secs(111),
                "{d:?}"
            );
        }
        assert!(age_deadline(None).is_none());
    }
}
