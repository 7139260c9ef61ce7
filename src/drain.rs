//! Shutdown coordination: every connection and tunnel task is spawned here, so a shutdown can
//! ask them all to finish (drain), wait for them within the grace period, then cut the rest.

use std::future::Future;
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

    /// Resolves when the grace period is over and remaining work must stop.
    pub fn cut(&self) -> WaitForCancellationFuture<'_> {
        self.cut.cancelled()
    }

    /// Number of tasks still running (connections and tunnels).
    pub fn active(&self) -> usize {
        self.tasks.len()
    }

    /// Begins the drain, waits up to `grace` for every task, then cuts what is left.
    pub async fn shutdown(&self, grace: Duration) {
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
