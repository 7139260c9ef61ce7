//! Bodies for tests: the boxed body type clients and backends send, and a deterministic byte
//! pattern with a running SHA-256 to check large bodies end to end.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// Bytes `offset..offset + len` of an endless pattern that never repeats with a period that
/// divides a chunk size, so lost, repeated or reordered chunks change the digest.
pub fn pattern(offset: u64, len: usize) -> Bytes {
    (offset..offset + len as u64)
        .map(|i| ((i % 251) ^ (i >> 12)) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// `total` bytes of [`pattern`], produced lazily in chunks of `chunk` bytes.
pub fn pattern_body(total: u64, chunk: usize) -> Body {
    let stream = futures_util::stream::unfold(0u64, move |offset| async move {
        if offset >= total {
            return None;
        }
        let len = chunk.min((total - offset) as usize);
        let frame = hyper::body::Frame::data(pattern(offset, len));
        Some((Ok::<_, BoxError>(frame), offset + len as u64))
    });
    http_body_util::StreamBody::new(stream).boxed()
}

/// The length and SHA-256 of `total` bytes of [`pattern`].
pub fn pattern_digest(total: u64) -> Digest {
    let mut digest = Digest::new();
    let mut offset = 0;
    while offset < total {
        let len = (64 * 1024).min(total - offset);
        digest.update(&pattern(offset, len as usize));
        offset += len;
    }
    digest
}

/// A running length and SHA-256 of a body.
pub struct Digest {
    len: u64,
    sha: ring::digest::Context,
}

impl Digest {
    pub fn new() -> Digest {
        Digest {
            len: 0,
            sha: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        self.sha.update(data);
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn hex(&self) -> String {
        self.sha
            .clone()
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}
