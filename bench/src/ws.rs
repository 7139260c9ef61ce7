//! A minimal WebSocket frame codec (RFC 6455 5.2) for the load paths where tungstenite's
//! per-message work would make the client or backend the bottleneck: the backend's echo and
//! bulk sender, and the client's throughput and bulk readers.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// Bytes of the header itself (2 to 14).
    pub size: usize,
}

/// Parses a frame header at the start of `buf`; None if more bytes are needed.
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut size) = match buf[1] & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64,
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (n as u64, 2),
    };
    let mask = if masked {
        let m: [u8; 4] = buf.get(size..size + 4)?.try_into().ok()?;
        size += 4;
        Some(m)
    } else {
        None
    };
    Some(Header {
        fin,
        opcode,
        mask,
        len,
        size,
    })
}

pub fn write_header(out: &mut Vec<u8>, fin: bool, opcode: u8, mask: Option<[u8; 4]>, len: u64) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= u16::MAX as u64 {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
}

/// XORs `data` with the mask, `offset` bytes into the payload; eight bytes at a time (the
/// backend's echo unmasks every byte the throughput scenario sends, on the load generator's
/// core).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let m: [u8; 4] = std::array::from_fn(|i| mask[(offset + i) & 3]);
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut words = data.chunks_exact_mut(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        w.copy_from_slice(&(u64::from_ne_bytes(b) ^ wide).to_ne_bytes());
    }
    // What is left starts at a multiple of 8, so the mask lines up again at m[0].
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

/// A whole client frame (masked), ready to be written many times.
pub fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    write_header(&mut out, true, opcode, Some(mask), payload.len() as u64);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
    out
}

/// Counts frames and payload bytes in a byte stream without keeping payloads.
#[derive(Default)]
pub struct FrameCounter {
    head: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    skip: u64,
    /// Whether the current frame carries data (not a control frame).
    data: bool,
    pub frames: u64,
    /// Payload bytes of data frames (text, binary, continuation).
    pub payload: u64,
    pub closed: bool,
}

impl FrameCounter {
    /// A close frame has arrived whole.
    pub fn done(&self) -> bool {
        self.closed && self.skip == 0
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = (self.skip as usize).min(data.len());
                self.skip -= n as u64;
                if self.data {
                    self.payload += n as u64;
                }
                data = &data[n..];
                if self.skip == 0 {
                    self.frames += 1;
                }
                continue;
            }
            // Gather a header: at most 14 bytes, taken one short slice at a time.
            let want = 14 - self.head.len();
            let take = want.min(data.len());
            self.head.extend_from_slice(&data[..take]);
            match parse_header(&self.head) {
                Some(h) => {
                    // Give back what belonged to the payload.
                    let used = take - (self.head.len() - h.size);
                    data = &data[used..];
                    self.head.clear();
                    if h.opcode == OP_CLOSE {
                        self.closed = true;
                    }
                    self.data = h.opcode < 0x8;
                    if h.len == 0 {
                        self.frames += 1;
                    } else {
                        self.skip = h.len;
                    }
                }
                None => data = &data[take..],
            }
        }
    }
}

/// Echoes every data frame back unmasked (the frame's opcode and FIN kept), answers pings,
/// and answers a close with a close. Reads and writes in batches.
pub async fn serve_echo<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> std::io::Result<()> {
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        if inbuf.capacity() - inbuf.len() < 16 * 1024 {
            inbuf.reserve(64 * 1024);
        }
        if io.read_buf(&mut inbuf).await? == 0 {
            return Ok(());
        }
        let mut close = false;
        while let Some(h) = parse_header(&inbuf) {
            let total = h.size + h.len as usize;
            if inbuf.len() < total {
                inbuf.reserve(total - inbuf.len());
                break;
            }
            let payload = &mut inbuf[h.size..total];
            if let Some(m) = h.mask {
                apply_mask(payload, m, 0);
            }
            match h.opcode {
                OP_PING => {
                    write_header(&mut out, true, OP_PONG, None, h.len);
                    out.extend_from_slice(payload);
                }
                OP_PONG => {}
                OP_CLOSE => {
                    write_header(&mut out, true, OP_CLOSE, None, h.len);
                    out.extend_from_slice(payload);
                    close = true;
                }
                op => {
                    write_header(&mut out, h.fin, op, None, h.len);
                    out.extend_from_slice(payload);
                }
            }
            inbuf.advance(total);
            if close {
                break;
            }
        }
        if !out.is_empty() {
            io.write_all(&out).await?;
            out.clear();
        }
        if close {
            let _ = io.shutdown().await;
            return Ok(());
        }
    }
}

/// Sends `bytes` of payload in binary messages of `msg` bytes, then a close (1000), then
/// waits (bounded) for the client to close.
pub async fn serve_bulk<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    bytes: u64,
    msg: usize,
) -> std::io::Result<()> {
    let payload = vec![0x5Au8; msg];
    let mut head = Vec::with_capacity(14);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(msg as u64) as usize;
        head.clear();
        write_header(&mut head, true, OP_BINARY, None, n as u64);
        io.write_all(&head).await?;
        io.write_all(&payload[..n]).await?;
        left -= n as u64;
    }
    head.clear();
    write_header(&mut head, true, OP_CLOSE, None, 2);
    head.extend_from_slice(&1000u16.to_be_bytes());
    io.write_all(&head).await?;
    io.flush().await?;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while io.read(&mut sink).await.unwrap_or(0) > 0 {}
    })
    .await;
    let _ = io.shutdown().await;
    Ok(())
}

/// Client side of the opening handshake (RFC 6455 4.1) on a connected stream; returns the
/// bytes read past the response head (the first frames, if any).
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    path: &str,
) -> anyhow::Result<BytesMut> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    io.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            anyhow::bail!("connection closed during the WebSocket handshake");
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                anyhow::bail!("WebSocket handshake refused: {head}");
            }
            buf.advance(end + 4);
            return Ok(buf);
        }
        if buf.len() > 16 * 1024 {
            anyhow::bail!("WebSocket handshake response head too long");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_counts_frames_split_anywhere() {
        let mut stream = Vec::new();
        for len in [0usize, 5, 125, 126, 1024, 70_000] {
            write_header(&mut stream, true, OP_BINARY, None, len as u64);
            stream.extend(std::iter::repeat_n(7u8, len));
        }
        write_header(&mut stream, true, OP_CLOSE, None, 2);
        stream.extend_from_slice(&1000u16.to_be_bytes());
        for chunk in [1usize, 3, 13, 1000, 100_000] {
            let mut c = FrameCounter::default();
            for part in stream.chunks(chunk) {
                c.feed(part);
            }
            assert_eq!(c.frames, 7, "chunk {chunk}");
            assert_eq!(c.payload, 5 + 125 + 126 + 1024 + 70_000);
            assert!(c.done());
        }
    }

    #[test]
    fn mask_matches_bytewise_at_any_offset() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1037).collect();
        let mask = [0x11, 0x9c, 0x42, 0xe7];
        for offset in 0..8 {
            for len in [0usize, 1, 3, 7, 8, 9, 15, 16, 17, 1037] {
                let mut fast = data[..len].to_vec();
                apply_mask(&mut fast, mask, offset);
                let slow: Vec<u8> = data[..len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[(offset + i) & 3])
                    .collect();
                assert_eq!(fast, slow, "offset {offset} len {len}");
            }
        }
    }

    #[test]
    fn client_frame_unmasks_back() {
        let f = client_frame(OP_BINARY, b"hello", [1, 2, 3, 4]);
        let h = parse_header(&f).expect("complete header");
        let mut p = f[h.size..].to_vec();
        apply_mask(&mut p, h.mask.expect("masked"), 0);
        assert_eq!(p, b"hello");
    }
}
