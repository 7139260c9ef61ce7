//! HTTP/2 control-frame floods: hyper answers every PING and acknowledges every SETTINGS a
//! client sends, so one connection can make the gateway write 100,000 answers (CVE-2019-9512,
//! CVE-2019-9515). This wraps an HTTP/2 client connection's I/O, counts the PING and SETTINGS
//! frames read (not their ACKs), and past a budget ends the connection the way RFC 9113 5.4.1
//! and 11.7 describe: a GOAWAY with ENHANCE_YOUR_CALM, written at a frame boundary of what the
//! gateway sends, then the connection closes.
//!
//! Only frame headers are read (9 bytes each, RFC 9113 4.1); payloads pass untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// PING and SETTINGS frames a client may save up; a browser sends a handful per connection.
const BURST: f64 = 500.0;
/// ... and how many a second it earns back.
const PER_SECOND: f64 = 50.0;

const PING: u8 = 0x6;
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const ACK: u8 = 0x1;
/// RFC 9113 7: the peer may be generating excessive load.
const ENHANCE_YOUR_CALM: u32 = 0xb;
const PREFACE_LEN: usize = 24;

/// Where a byte stream stands in the frame grammar.
#[derive(Debug, Clone, Copy)]
struct FrameScan {
    /// Bytes to pass before the next frame header (the client preface, or a payload).
    skip: usize,
    head: [u8; 9],
    head_len: usize,
}

impl FrameScan {
    fn new(preface: usize) -> FrameScan {
        FrameScan {
            skip: preface,
            head: [0; 9],
            head_len: 0,
        }
    }

    fn at_boundary(&self) -> bool {
        self.skip == 0 && self.head_len == 0
    }

    /// Walks `bytes`, calling `frame` with each frame header completed in them.
    fn advance(&mut self, mut bytes: &[u8], mut frame: impl FnMut(&[u8; 9])) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_len == 9 {
                frame(&self.head);
                self.skip = usize::from(self.head[0]) << 16
                    | usize::from(self.head[1]) << 8
                    | usize::from(self.head[2]);
                self.head_len = 0;
            }
        }
    }

    /// How many of `bytes` may be written before the first frame boundary in them (all of
    /// them when there is none).
    fn bytes_to_boundary(&self, bytes: &[u8]) -> usize {
        if self.at_boundary() {
            return 0;
        }
        let mut probe = *self;
        for i in 0..bytes.len() {
            probe.advance(&bytes[i..=i], |_| {});
            if probe.at_boundary() {
                return i + 1;
            }
        }
        bytes.len()
    }
}

enum State {
    Open,
    /// Over budget: the GOAWAY goes out at the next boundary of what the gateway writes.
    Flooded {
        goaway: [u8; 17],
        sent: usize,
    },
    /// The GOAWAY is out: reads and writes fail, and the connection ends.
    Done,
}

/// An HTTP/2 client connection's I/O, with its control frames counted.
pub struct FloodGuard<I> {
    io: I,
    read: FrameScan,
    write: FrameScan,
    tokens: f64,
    at: Instant,
    /// The highest stream the client opened: the GOAWAY's last stream id.
    last_stream: u32,
    state: State,
    /// The task waiting to read while the GOAWAY waits for a boundary.
    reader: Option<Waker>,
}

impl<I> FloodGuard<I> {
    /// `io` starts with the client preface (it is skipped, not parsed as frames).
    pub fn new(io: I) -> FloodGuard<I> {
        FloodGuard {
            io,
            read: FrameScan::new(PREFACE_LEN),
            write: FrameScan::new(0),
            tokens: BURST,
            at: Instant::now(),
            last_stream: 0,
            state: State::Open,
            reader: None,
        }
    }

    /// Counts the frames in bytes just read; true when the client went over its budget.
    fn count(&mut self, bytes: &[u8]) -> bool {
        let mut control = 0u32;
        let mut last_stream = self.last_stream;
        self.read.advance(bytes, |h| {
            let (kind, flags) = (h[3], h[4]);
            if (kind == PING || kind == SETTINGS) && flags & ACK == 0 {
                control += 1;
            }
            if kind == HEADERS {
                let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                last_stream = last_stream.max(id);
            }
        });
        self.last_stream = last_stream;
        if control == 0 {
            return false;
        }
        let now = Instant::now();
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * PER_SECOND;
        self.tokens = (self.tokens + refill).min(BURST) - f64::from(control);
        self.at = now;
        self.tokens < 0.0
    }

    fn goaway(&self) -> [u8; 17] {
        let mut f = [0u8; 17];
        f[2] = 8; // length
        f[3] = 0x7; // GOAWAY, stream 0
        f[9..13].copy_from_slice(&self.last_stream.to_be_bytes());
        f[13..17].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        f
    }
}

fn flooded() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "http/2 control frame flood: GOAWAY ENHANCE_YOUR_CALM",
    )
}

impl<I: AsyncWrite + Unpin> FloodGuard<I> {
    /// Writes what is left of the GOAWAY, once the gateway's own bytes are at a frame boundary.
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let State::Flooded { goaway, sent } = &mut self.state else {
                return Poll::Ready(Ok(()));
            };
            if *sent == goaway.len() {
                self.state = State::Done;
                if let Some(w) = self.reader.take() {
                    w.wake();
                }
                return Pin::new(&mut self.io).poll_flush(cx);
            }
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &goaway[*sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *sent += n;
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for FloodGuard<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.state {
            State::Done => return Poll::Ready(Err(flooded())),
            State::Flooded { .. } => {
                if this.write.at_boundary() {
                    std::task::ready!(this.poll_goaway(cx))?;
                    return Poll::Ready(Err(flooded()));
                }
                // The gateway is mid-frame: its next write finishes the frame, then the
                // GOAWAY goes, and this read fails.
                this.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            State::Open => {}
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let over = this.count(&buf.filled()[before..]);
        if over {
            tracing::warn!(
                last_stream = this.last_stream,
                "http/2 client sent too many PING/SETTINGS frames: GOAWAY ENHANCE_YOUR_CALM"
            );
            this.state = State::Flooded {
                goaway: this.goaway(),
                sent: 0,
            };
            // What was read is dropped: nothing more from this client is acted on.
            buf.set_filled(before);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FloodGuard<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut limit = buf.len();
        match this.state {
            State::Done => return Poll::Ready(Err(flooded())),
            State::Flooded { .. } if this.write.at_boundary() => {
                std::task::ready!(this.poll_goaway(cx))?;
                return Poll::Ready(Err(flooded()));
            }
            // Finish the frame in progress, no more.
            State::Flooded { .. } => limit = this.write.bytes_to_boundary(buf),
            State::Open => {}
        }
        let n = std::task::ready!(Pin::new(&mut this.io).poll_write(cx, &buf[..limit]))?;
        this.write.advance(&buf[..n], |_| {});
        if matches!(this.state, State::Flooded { .. }) && this.write.at_boundary() {
            if let Some(w) = this.reader.take() {
                w.wake();
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !matches!(this.state, State::Open) {
            // Rare: the slow path, one slice at a time.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return Pin::new(this).poll_write(cx, first);
        }
        let n = std::task::ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let k = left.min(b.len());
            this.write.advance(&b[..k], |_| {});
            left -= k;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.state, State::Flooded { .. }) && this.write.at_boundary() {
            std::task::ready!(this.poll_goaway(cx))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frame_headers_are_found_across_splits() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[0; 6]));
        bytes.extend(frame(HEADERS, 4, 5, &[1, 2, 3]));
        bytes.extend(frame(PING, ACK, 0, &[0; 8]));
        bytes.extend(frame(PING, 0, 0, &[0; 8]));
        for split in [1, 2, 7, 9, 10, 100] {
            let mut scan = FrameScan::new(PREFACE_LEN);
            let mut seen = Vec::new();
            for chunk in bytes.chunks(split) {
                scan.advance(chunk, |h| seen.push((h[3], h[4])));
            }
            assert_eq!(
                seen,
                vec![(SETTINGS, 0), (HEADERS, 4), (PING, ACK), (PING, 0)],
                "{split}"
            );
            assert!(scan.at_boundary());
        }
    }

    #[test]
    fn a_write_stops_at_the_end_of_its_frame() {
        let mut scan = FrameScan::new(0);
        let data = frame(0x0, 0, 1, &[7; 20]);
        scan.advance(&data[..5], |_| {});
        let mut rest = data[5..].to_vec();
        rest.extend(frame(PING, ACK, 0, &[0; 8]));
        assert_eq!(scan.bytes_to_boundary(&rest), data.len() - 5);
        assert_eq!(
            FrameScan::new(0).bytes_to_boundary(&rest),
            0,
            "at a boundary"
        );
    }

    #[test]
    fn a_flood_goes_over_the_budget_and_acks_do_not_count() {
        let mut g = FloodGuard::new(tokio::io::empty());
        g.read.skip = 0;
        let acks: Vec<u8> = (0..2_000)
            .flat_map(|_| frame(PING, ACK, 0, &[0; 8]))
            .collect();
        assert!(!g.count(&acks), "ACKs are answers, not requests");
        let few: Vec<u8> = (0..10).flat_map(|_| frame(PING, 0, 0, &[0; 8])).collect();
        assert!(!g.count(&few));
        let many: Vec<u8> = (0..1_000)
            .flat_map(|_| frame(PING, 0, 0, &[0; 8]))
            .collect();
        assert!(g.count(&many));
        assert_eq!(&g.goaway()[13..], &ENHANCE_YOUR_CALM.to_be_bytes());
    }
}
