//! The PROXY protocol (HAProxy's spec, v1 text and v2 binary): a load balancer in front of
//! the gateway states the client's real address before the connection's own bytes (TLS or
//! HTTP) begin. Read only from configured sources and under a deadline, or anyone could claim
//! any address, or hold a connection open by sending nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v2's signature: it cannot start a TLS record or an HTTP request.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the spec's 107).
const V1_MAX: usize = 107;
/// The longest v2 header we accept: addresses plus a generous allowance for TLVs.
const V2_MAX: usize = 16 + 536;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header (the load balancer must send one: proxy_protocol = true)")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("no PROXY protocol header within the deadline")]
    Timeout,
    #[error("connection closed before the PROXY protocol header ended")]
    Closed,
}

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header takes (the connection's own data starts after them).
    pub len: usize,
    /// The client's address, or None for `UNKNOWN` / `LOCAL` (a health check by the load
    /// balancer itself: the TCP peer is the client).
    pub source: Option<SocketAddr>,
}

/// Parses a header at the start of `buf`: Ok(None) when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, ProxyHeaderError> {
    if buf.len() >= V2_SIGNATURE.len() && buf.starts_with(V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if V2_SIGNATURE.starts_with(&buf[..buf.len().min(V2_SIGNATURE.len())]) && buf.len() < 12 {
        return Ok(None);
    }
    if b"PROXY ".starts_with(&buf[..buf.len().min(6)]) {
        if buf.len() < 6 {
            return Ok(None);
        }
        return parse_v1(buf);
    }
    Err(ProxyHeaderError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, ProxyHeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end])
        .map_err(|_| ProxyHeaderError::Malformed("v1 line is not ASCII"))?;
    let len = end + 2;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY"
    let source = match parts.next() {
        Some("UNKNOWN") => None,
        Some(family @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = parts.collect();
            let [src, _dst, sport, _dport] = fields[..] else {
                return Err(ProxyHeaderError::Malformed(
                    "v1 needs two addresses and two ports",
                ));
            };
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("v1 source address"))?;
            if (family == "TCP4") != ip.is_ipv4() {
                return Err(ProxyHeaderError::Malformed(
                    "v1 address does not match its family",
                ));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyHeaderError::Malformed("v1 source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => {
            return Err(ProxyHeaderError::Malformed(
                "v1 protocol must be TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(Some(Header { len, source }))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, ProxyHeaderError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version must be 2"));
    }
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > V2_MAX {
        return Err(ProxyHeaderError::Malformed("v2 header too long"));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let addresses = &buf[16..len];
    let source = match (version_command & 0x0f, buf[13]) {
        // LOCAL: the balancer's own connection (health checks).
        (0x0, _) => None,
        (0x1, 0x11 | 0x12) => {
            if addresses.len() < 12 {
                return Err(ProxyHeaderError::Malformed("v2 IPv4 addresses too short"));
            }
            let ip = Ipv4Addr::new(addresses[0], addresses[1], addresses[2], addresses[3]);
            let port = u16::from_be_bytes([addresses[8], addresses[9]]);
            Some(SocketAddr::new(ip.into(), port))
        }
        (0x1, 0x21 | 0x22) => {
            if addresses.len() < 36 {
                return Err(ProxyHeaderError::Malformed("v2 IPv6 addresses too short"));
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&addresses[..16]);
            let port = u16::from_be_bytes([addresses[32], addresses[33]]);
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        // UNSPEC or UNIX sockets: nothing usable, the TCP peer stands.
        (0x1, _) => None,
        _ => {
            return Err(ProxyHeaderError::Malformed(
                "v2 command must be LOCAL or PROXY",
            ))
        }
    };
    Ok(Some(Header { len, source }))
}

/// Reads the header from `tcp` within `deadline`, consuming exactly its bytes (the TLS or HTTP
/// bytes after it stay in the socket). Returns the client's address (None: keep the peer's).
pub async fn read_header(
    tcp: &mut TcpStream,
    deadline: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let reading = async {
        let mut buf = [0u8; V2_MAX];
        loop {
            // Peek, so nothing past the header is taken from the socket.
            let n = tcp
                .peek(&mut buf)
                .await
                .map_err(|_| ProxyHeaderError::Closed)?;
            if n == 0 {
                return Err(ProxyHeaderError::Closed);
            }
            if let Some(header) = parse(&buf[..n])? {
                let mut sink = vec![0u8; header.len];
                tcp.read_exact(&mut sink)
                    .await
                    .map_err(|_| ProxyHeaderError::Closed)?;
                return Ok(header.source);
            }
            // Not all of it is here yet: wait for more than what was peeked.
            tcp.readable().await.map_err(|_| ProxyHeaderError::Closed)?;
            if n == buf.len() {
                return Err(ProxyHeaderError::Malformed("header too long"));
            }
            // A peek returns at once while the bytes already seen are there: give the sender
            // a moment rather than spin on the same bytes.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(deadline, reading)
        .await
        .unwrap_or(Err(ProxyHeaderError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | command);
        b.push(family);
        b.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        b.extend_from_slice(addresses);
        b
    }

    #[test]
    fn v1_lines() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET /";
        assert_eq!(
            parse(line),
            Ok(Some(Header {
                len: 43,
                source: Some("203.0.113.7:51234".parse().expect("addr"))
            }))
        );
        let six = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        assert_eq!(
            parse(six).map(|h| h.and_then(|h| h.source)),
            Ok(Some("[2001:db8::1]:4000".parse().expect("addr")))
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Some(Header {
                len: 15,
                source: None
            }))
        );
        assert_eq!(parse(b"PROXY TCP4 203.0.113.7"), Ok(None), "incomplete");
        assert!(parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 x 443\r\n").is_err());
        assert!(parse(b"PROXY TCP4 2001:db8::1 10.0.0.1 1 443\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
    }

    #[test]
    fn v2_headers() {
        let mut four = vec![203, 0, 113, 7, 10, 0, 0, 1];
        four.extend_from_slice(&51234u16.to_be_bytes());
        four.extend_from_slice(&443u16.to_be_bytes());
        let b = v2(0x1, 0x11, &four);
        assert_eq!(
            parse(&b),
            Ok(Some(Header {
                len: 28,
                source: Some("203.0.113.7:51234".parse().expect("addr"))
            }))
        );
        assert_eq!(parse(&b[..20]), Ok(None), "incomplete");
        assert_eq!(
            parse(&v2(0x0, 0x00, &[])).map(|h| h.map(|h| h.source)),
            Ok(Some(None)),
            "LOCAL"
        );
        let mut bad = b.clone();
        bad[12] = 0x31;
        assert!(parse(&bad).is_err(), "version 3");
    }

    #[test]
    fn anything_else_is_missing_the_header() {
        assert_eq!(
            parse(b"\x16\x03\x01\x02\x00"),
            Err(ProxyHeaderError::Missing),
            "TLS"
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(b"\r\n\r\n"), Ok(None), "could still be v2");
    }
}
