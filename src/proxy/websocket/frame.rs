//! WebSocket frame headers (RFC 6455 5.2): parsed to know where frames end, and the few frames
//! the gateway writes itself (Ping, Close). Payloads are never decoded, except Close's code.

/// A parsed frame header. The payload that follows is `payload_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// Set on the first frame of a permessage-deflate compressed message (RFC 7692 6).
    pub rsv1: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// 2 to 14 bytes.
    pub header_len: usize,
}

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes the gateway sends (RFC 6455 7.4.1).
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_INTERNAL_ERROR: u16 = 1011;
/// IANA registry: the server is restarting; the client should reconnect (to another backend).
pub const CLOSE_SERVICE_RESTART: u16 = 1012;

impl FrameHeader {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    /// Header plus payload.
    pub fn frame_len(&self) -> u64 {
        self.header_len as u64 + self.payload_len
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Fewer bytes than the header needs; read more.
    Incomplete,
    Header(FrameHeader),
    /// Not a frame any conforming peer sends; the connection must be closed (1002).
    Invalid(&'static str),
}

/// Parses the frame header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.len() < 2 {
        return Parsed::Incomplete;
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    let (payload_len, mut at) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Parsed::Incomplete;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Parsed::Incomplete;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 {
                return Parsed::Invalid("64-bit payload length with its top bit set");
            }
            (n, 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        if buf.len() < at + 4 {
            return Parsed::Incomplete;
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    let header = FrameHeader {
        fin,
        rsv1: b0 & 0x40 != 0,
        opcode,
        mask,
        payload_len,
        header_len: at,
    };
    if header.is_control() && (payload_len > 125 || !fin) {
        return Parsed::Invalid("control frame longer than 125 bytes or fragmented");
    }
    if matches!(opcode, 0x3..=0x7 | 0xB..=0xF) {
        return Parsed::Invalid("reserved opcode");
    }
    Parsed::Header(header)
}

/// A whole control frame (FIN set), masked with `mask` when it goes toward a server.
pub fn control_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    debug_assert!(
        payload.len() <= 125,
        "control payloads are at most 125 bytes"
    );
    let len = payload.len().min(125);
    let mut out = Vec::with_capacity(2 + 4 + len);
    out.push(0x80 | opcode);
    match mask {
        Some(m) => {
            out.push(0x80 | len as u8);
            out.extend_from_slice(&m);
            out.extend(payload[..len].iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => {
            out.push(len as u8);
            out.extend_from_slice(&payload[..len]);
        }
    }
    out
}

/// A Close frame with `code` and a reason (cut to fit the 125-byte limit on a char boundary).
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    control_frame(OP_CLOSE, &payload, mask)
}

/// The code of a Close frame, from its payload as it is on the wire (unmasked here).
pub fn close_code(payload: &[u8], mask: Option<[u8; 4]>) -> Option<u16> {
    if payload.len() < 2 {
        return None;
    }
    let unmask = |i: usize| payload[i] ^ mask.map_or(0, |m| m[i % 4]);
    Some(u16::from_be_bytes([unmask(0), unmask(1)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_length_form() {
        assert_eq!(parse(&[0x81]), Parsed::Incomplete);
        let Parsed::Header(h) = parse(&[0x81, 0x05, b'h']) else {
            panic!("short frame header")
        };
        assert_eq!(
            (h.fin, h.opcode, h.payload_len, h.header_len),
            (true, OP_TEXT, 5, 2)
        );

        assert_eq!(parse(&[0x02, 126, 0x01]), Parsed::Incomplete);
        let Parsed::Header(h) = parse(&[0x02, 126, 0x01, 0x00]) else {
            panic!("16-bit length")
        };
        assert_eq!(
            (h.fin, h.opcode, h.payload_len, h.header_len),
            (false, OP_BINARY, 256, 4)
        );

        let mut b = vec![0xC2, 0xFF];
        b.extend_from_slice(&(1u64 << 32).to_be_bytes());
        assert_eq!(parse(&b), Parsed::Incomplete, "mask bytes still missing");
        b.extend_from_slice(&[1, 2, 3, 4]);
        let Parsed::Header(h) = parse(&b) else {
            panic!("64-bit masked")
        };
        assert!(h.rsv1);
        assert_eq!(h.mask, Some([1, 2, 3, 4]));
        assert_eq!((h.payload_len, h.header_len), (1 << 32, 14));
    }

    #[test]
    fn rejects_what_no_peer_may_send() {
        let mut b = vec![0x82, 127];
        b.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(parse(&b), Parsed::Invalid(_)));
        assert!(
            matches!(parse(&[0x09, 0x00]), Parsed::Invalid(_)),
            "fragmented ping"
        );
        assert!(
            matches!(parse(&[0x89, 126, 0, 200]), Parsed::Invalid(_)),
            "long ping"
        );
        assert!(
            matches!(parse(&[0x83, 0x00]), Parsed::Invalid(_)),
            "reserved opcode"
        );
    }

    #[test]
    fn close_frames_round_trip_masked_and_not() {
        let f = close_frame(4000, "bye", None);
        assert_eq!(f, [0x88, 5, 0x0F, 0xA0, b'b', b'y', b'e']);
        let m = [9, 8, 7, 6];
        let f = close_frame(1009, "too big", Some(m));
        let Parsed::Header(h) = parse(&f) else {
            panic!("own close frame parses")
        };
        assert_eq!(h.opcode, OP_CLOSE);
        assert_eq!(close_code(&f[h.header_len..], h.mask), Some(1009));
        let long = "é".repeat(100);
        assert!(close_frame(1000, &long, None).len() <= 127);
    }
}
