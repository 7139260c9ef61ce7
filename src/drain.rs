//! Shutdown coordination: every connection and tunnel task is spawned here, so a shutdown can
//! ask them all to finish (drain), wait for them within the grace period, then cut the rest.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// Cloned into every task that must take part in shutdown.
#[derive(Clone, Default)]
pub struct Drain {
    /// Cancelled when shutdown begins: finish what is in flight, take nothing new.
    draining: CancellationToken,
    /// Cancelled when the grace period is over: stop now.
    cut: CancellationToken,
    tasks: TaskTracker,
    spread: Arc<Spread>,
}

/// `[shutdown] spread`: the WebSockets and streams open when the drain begins end one after
/// another across the window, each at its own slot, instead of all at once.
#[derive(Default)]
struct Spread {
    window_ms: AtomicU64,
    /// WebSockets and streams open now.
    open: AtomicUsize,
    /// How many were open when the drain began: the number of slots.
    slots: AtomicUsize,
    /// The next slot to hand out.
    next: AtomicUsize,
}

/// Counts one WebSocket or stream for the spread of a shutdown, while it lives.
pub struct LongLived(Arc<Spread>);

impl Drop for LongLived {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Spawns `task` so that shutdown waits for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Resolves when shutdown begins.
    pub fn draining(&self) -> WaitForCancellationFuture<'_> {
        self.draining.cancelled()
    }

    /// Like [`Drain::draining`], for futures that must own it (response bodies).
    pub fn draining_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.draining.clone().cancelled_owned()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Counts a WebSocket or stream among those a paced shutdown spreads.
    pub fn long_lived(&self) -> LongLived {
        self.spread.open.fetch_add(1, Ordering::Relaxed);
        LongLived(self.spread.clone())
    }

    /// How long after the drain began this WebSocket or stream should end: its own slot in
    /// `[shutdown] spread` (zero without a spread). Call once, when it sees the drain.
    pub fn spread_delay(&self) -> Duration {
        let window = self.spread.window_ms.load(Ordering::Relaxed);
        if window == 0 {
            return Duration::ZERO;
        }
        let slots = self.spread.slots.load(Ordering::Relaxed).max(1);
        let slot = self
            .spread
            .next
            .fetch_add(1, Ordering::Relaxed)
            .min(slots - 1);
        Duration::from_millis(window * slot as u64 / slots as u64)
    }

    /// Whether a paced shutdown is under way (ended streams jitter their retry hint then).
    pub fn is_spread(&self) -> bool {
        self.spread.window_ms.load(Ordering::Relaxed) > 0
    }

    /// Resolves when the grace period is over and remaining work must stop.
    pub fn cut(&self) -> WaitForCancellationFuture<'_> {
        self.cut.cancelled()
    }

    /// Number of tasks still running (connections and tunnels).
    pub fn active(&self) -> usize {
        self.tasks.len()
    }

    /// Begins the drain, waits up to `grace` for every task, then cuts what is left. With a
    /// `spread`, WebSockets and streams end evenly across it (see [`Drain::spread_delay`]).
    pub async fn shutdown(&self, grace: Duration, spread: Duration) {
        let open = self.spread.open.load(Ordering::Relaxed);
        self.spread.slots.store(open, Ordering::Relaxed);
        self.spread
            .window_ms
            .store(spread.as_millis() as u64, Ordering::Relaxed);
        if !spread.is_zero() {
            tracing::info!(
                open,
                spread_ms = spread.as_millis() as u64,
                "closing WebSockets and streams spread over shutdown.spread"
            );
        }
        self.draining.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tasks.len(),
                grace_ms = grace.as_millis() as u64,
                "grace period over, closing remaining connections"
            );
            self.cut.cancel();
            // Tasks watch `cut` and return promptly; bound the wait all the same.
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        }
    }
}
