//! Clients that stop reading: every client connection's writes go through [`Watched`], which
//! notes when a write could not proceed; [`WriteStall::stalled`] resolves once the connection
//! has been unable to write for `limits.write_stall_timeout` while data waited. The connection
//! is then closed, and with it the backend connection or tunnel that fed it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// One connection's write progress, shared by its I/O and whoever watches it.
#[derive(Debug)]
pub struct WriteStall {
    /// How long writes may stay blocked.
    limit: Duration,
    base: tokio::time::Instant,
    /// When writes began to block (milliseconds after `base`, plus one), or 0 while they
    /// proceed.
    blocked_since: AtomicU64,
    /// Woken when writes begin to block.
    blocked: Notify,
}

impl WriteStall {
    pub fn new(limit: Duration) -> WriteStall {
        WriteStall {
            limit,
            base: tokio::time::Instant::now(),
            blocked_since: AtomicU64::new(0),
            blocked: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn blocked(&self) {
        if self.blocked_since.load(Ordering::Relaxed) == 0 {
            self.blocked_since.store(self.now_ms(), Ordering::Relaxed);
            self.blocked.notify_one();
        }
    }

    fn progressed(&self) {
        if self.blocked_since.load(Ordering::Relaxed) != 0 {
            self.blocked_since.store(0, Ordering::Relaxed);
        }
    }

    /// Resolves when writes have been blocked for the limit without a byte getting through.
    /// No timer runs while writes proceed.
    pub async fn stalled(&self) {
        let limit = self.limit;
        loop {
            let since = self.blocked_since.load(Ordering::Relaxed);
            if since == 0 {
                self.blocked.notified().await;
                continue;
            }
            let due = since + limit.as_millis() as u64;
            let now = self.now_ms();
            if now >= due {
                return;
            }
            tokio::time::sleep(Duration::from_millis(due - now)).await;
            // Progress in the meantime resets `blocked_since`; the loop looks again.
            if self.blocked_since.load(Ordering::Relaxed) == since && self.now_ms() >= due {
                return;
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An I/O whose writes report to a [`WriteStall`].
    pub struct Watched<I> {
        #[pin]
        io: I,
        stall: Arc<WriteStall>,
    }
}

impl<I> Watched<I> {
    pub fn new(io: I, stall: Arc<WriteStall>) -> Watched<I> {
        Watched { io, stall }
    }
}

fn note<T>(stall: &WriteStall, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
    match &polled {
        Poll::Pending => stall.blocked(),
        Poll::Ready(_) => stall.progressed(),
    }
    polled
}

impl<I: AsyncRead> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        note(this.stall, this.io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        note(this.stall, this.io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        note(this.stall, this.io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stalled_only_after_the_limit_without_progress() {
        let s = Arc::new(WriteStall::new(Duration::from_secs(60)));
        let watch = {
            let s = s.clone();
            tokio::spawn(async move { s.stalled().await })
        };
        tokio::task::yield_now().await;
        assert!(!watch.is_finished(), "nothing blocked yet");
        s.blocked();
        tokio::time::sleep(Duration::from_secs(30)).await;
        s.progressed();
        s.blocked();
        tokio::time::sleep(Duration::from_secs(45)).await;
        assert!(!watch.is_finished(), "progress restarted the clock");
        tokio::time::sleep(Duration::from_secs(16)).await;
        assert!(watch.is_finished(), "blocked past the limit");
    }
}
