//! Clients that stop reading: every client connection's writes go through [`Watched`], which
//! notes when a write could not proceed; [`WriteStall::stalled`] resolves once the connection
//! has been unable to write for `limits.write_stall_timeout` while data waited. The connection
//! is then closed, and with it the backend connection or tunnel that fed it.
//!
//! Over HTTP/2 a client that stops reading need not block the socket at all: flow control
//! stops the gateway first (a stream or connection window at zero), and the response body is
//! simply not asked for more. So each HTTP/2 response body also reports a [`StreamWait`]:
//! when it handed hyper data and has not been asked again since. A body left waiting that
//! long counts as a stall too.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
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
    /// The HTTP/2 response bodies of the connection (see [`StreamWait`]).
    streams: Mutex<Vec<Weak<StreamWait>>>,
    /// Woken when the first stream of a connection registers.
    stream_added: Notify,
}

/// One HTTP/2 response body's "handed data to hyper, not asked again yet", since when.
#[derive(Debug, Default)]
pub struct StreamWait {
    /// Milliseconds after the stall's `base`, plus one; 0 while the body is being asked.
    since: AtomicU64,
}

impl StreamWait {
    /// The body just handed hyper a frame and waits to be asked for the next.
    pub fn waiting(&self, stall: &WriteStall) {
        self.since.store(stall.now_ms(), Ordering::Relaxed);
    }

    /// hyper asks for more (or the body has ended): not waiting.
    pub fn asked(&self) {
        if self.since.load(Ordering::Relaxed) != 0 {
            self.since.store(0, Ordering::Relaxed);
        }
    }
}

impl WriteStall {
    pub fn new(limit: Duration) -> WriteStall {
        WriteStall {
            limit,
            base: tokio::time::Instant::now(),
            blocked_since: AtomicU64::new(0),
            blocked: Notify::new(),
            streams: Mutex::new(Vec::new()),
            stream_added: Notify::new(),
        }
    }

    /// Registers an HTTP/2 response body, which reports when it waits to be asked for more.
    pub fn stream(&self) -> Arc<StreamWait> {
        let wait = Arc::new(StreamWait::default());
        if let Ok(mut streams) = self.streams.lock() {
            // Ended streams are swept out when the list would grow, not on every push.
            if streams.len() == streams.capacity() {
                streams.retain(|w| w.strong_count() > 0);
            }
            streams.push(Arc::downgrade(&wait));
            if streams.len() == 1 {
                self.stream_added.notify_one();
            }
        }
        wait
    }

    /// The oldest wait of a live stream (0 when none waits), and whether any stream lives.
    fn oldest_wait(&self) -> (u64, bool) {
        let Ok(mut streams) = self.streams.lock() else {
            return (0, false);
        };
        streams.retain(|w| w.strong_count() > 0);
        let oldest = streams
            .iter()
            .filter_map(|w| w.upgrade())
            .map(|w| w.since.load(Ordering::Relaxed))
            .filter(|s| *s != 0)
            .min()
            .unwrap_or(0);
        (oldest, !streams.is_empty())
    }

    /// Resolves when an HTTP/2 response body has waited to be asked for more for the limit.
    /// Looks every quarter of the limit while the connection has streams; no timer otherwise.
    async fn stream_stalled(&self) {
        let limit = self.limit.as_millis() as u64;
        loop {
            let (oldest, any) = self.oldest_wait();
            if !any {
                self.stream_added.notified().await;
                continue;
            }
            let now = self.now_ms();
            if oldest != 0 && now >= oldest + limit {
                return;
            }
            let next = if oldest != 0 {
                oldest + limit - now
            } else {
                (limit / 4).max(1)
            };
            tokio::time::sleep(Duration::from_millis(next.min((limit / 4).max(1)))).await;
        }
    }

    /// `limits.write_stall_timeout`.
    pub fn limit(&self) -> Duration {
        self.limit
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

    /// Resolves when writes have been blocked for the limit without a byte getting through,
    /// or an HTTP/2 response body has waited that long to be asked for more.
    pub async fn stalled(&self) {
        tokio::select! {
            _ = self.socket_stalled() => {}
            _ = self.stream_stalled() => {}
        }
    }

    /// Writes have been blocked for the limit. No timer runs while writes proceed.
    async fn socket_stalled(&self) {
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
    /// A client connection's socket, whose writes report to a [`WriteStall`]. (A WebSocket
    /// tunnel, the only writer to its client once upgraded, times its own blocked writes.)
    pub struct Watched<I> {
        #[pin]
        io: I,
        stall: Arc<WriteStall>,
    }
}

impl<I> Watched<I> {
    /// A client connection's socket.
    pub fn new(io: I, stall: Arc<WriteStall>) -> Watched<I> {
        Watched { io, stall }
    }
}

fn note<T>(stall: &WriteStall, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
    if polled.is_pending() {
        stall.blocked();
    } else {
        stall.progressed();
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

    #[tokio::test(start_paused = true)]
    async fn a_stream_left_waiting_for_the_limit_is_a_stall() {
        let s = Arc::new(WriteStall::new(Duration::from_secs(60)));
        let watch = {
            let s = s.clone();
            tokio::spawn(async move { s.stalled().await })
        };
        let a = s.stream();
        let b = s.stream();
        a.waiting(&s);
        tokio::time::sleep(Duration::from_secs(50)).await;
        a.asked();
        b.waiting(&s);
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert!(!watch.is_finished(), "each wait was shorter than the limit");
        b.asked();
        drop(b);
        a.waiting(&s);
        tokio::time::sleep(Duration::from_secs(61)).await;
        tokio::task::yield_now().await;
        assert!(watch.is_finished(), "a waited past the limit");
    }
}
