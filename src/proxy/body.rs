//! Body types: what the gateway sends to clients (its own answers or a backend's streamed body)
//! and what it sends to backends (the client's body, kept retryable until first polled).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// A response body towards the client.
    #[project = GatewayBodyProj]
    pub enum GatewayBody {
        /// An answer the gateway made itself (errors, redirects, the demo page).
        Full { #[pin] body: Full<Bytes> },
        /// A backend's body, frame by frame as it arrives.
        Upstream { #[pin] body: crate::upstream::PooledBody },
        /// A backend's body with extra behaviour (SSE heartbeats, access logging): boxed so
        /// the common path stays small.
        Boxed { #[pin] body: http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> },
    }
}

impl GatewayBody {
    pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
        GatewayBody::Full {
            body: Full::new(bytes.into()),
        }
    }

    pub fn empty() -> GatewayBody {
        GatewayBody::full(Bytes::new())
    }

    pub fn boxed<B>(body: B) -> GatewayBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        GatewayBody::Boxed {
            body: body.map_err(Into::into).boxed_unsync(),
        }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            GatewayBodyProj::Full { body } => body.poll_frame(cx).map_err(|never| match never {}),
            GatewayBodyProj::Upstream { body } => body.poll_frame(cx).map_err(Into::into),
            GatewayBodyProj::Boxed { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full { body } => body.is_end_stream(),
            GatewayBody::Upstream { body } => body.is_end_stream(),
            GatewayBody::Boxed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full { body } => body.size_hint(),
            GatewayBody::Upstream { body } => body.size_hint(),
            GatewayBody::Boxed { body } => body.size_hint(),
        }
    }
}

/// The client's request body on its way to a backend.
///
/// The body sits in a shared slot until the backend connection first polls it. A connection
/// that was refused never polls, so the body is still in the slot and the request can go to
/// the next backend; that is what makes "skip a dead backend" work for POSTs too.
pub enum UpstreamBody {
    Empty,
    Client {
        slot: Arc<Mutex<Option<Incoming>>>,
        body: Option<Incoming>,
        /// The route's bytes-in counter.
        counted: Counter,
        /// This request's, for its access line.
        request: Option<Counter>,
    },
}

/// The slot a retryable request body waits in until a backend connection takes it.
pub type BodySlot = Arc<Mutex<Option<Incoming>>>;

impl UpstreamBody {
    /// Wraps `body`; returns the slot to re-wrap it from after a refused connection.
    pub fn new(
        body: Incoming,
        counted: &Counter,
        request: Option<&Counter>,
    ) -> (UpstreamBody, Option<BodySlot>) {
        if body.is_end_stream() {
            return (UpstreamBody::Empty, None);
        }
        let slot = Arc::new(Mutex::new(Some(body)));
        (UpstreamBody::from_slot(&slot, counted, request), Some(slot))
    }

    pub fn from_slot(
        slot: &BodySlot,
        counted: &Counter,
        request: Option<&Counter>,
    ) -> UpstreamBody {
        UpstreamBody::Client {
            slot: slot.clone(),
            body: None,
            counted: counted.clone(),
            request: request.cloned(),
        }
    }

    /// Whether the body is still unsent, so the request may be tried on another backend.
    pub fn unsent(slot: &Option<BodySlot>) -> bool {
        match slot {
            None => true,
            Some(s) => s.lock().map(|b| b.is_some()).unwrap_or(false),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // `UpstreamBody` is Unpin: Incoming is Unpin and the rest are plain fields.
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Client {
                slot,
                body,
                counted,
                request,
            } => {
                if body.is_none() {
                    *body = slot.lock().ok().and_then(|mut s| s.take());
                }
                let Some(b) = body else {
                    return Poll::Ready(None);
                };
                let polled = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(data) = frame.data_ref() {
                        counted.inc_by(data.len() as u64);
                        if let Some(request) = request {
                            request.inc_by(data.len() as u64);
                        }
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, UpstreamBody::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Client { slot, body, .. } => match body {
                Some(b) => b.size_hint(),
                None => slot
                    .lock()
                    .ok()
                    .and_then(|s| s.as_ref().map(|b| b.size_hint()))
                    .unwrap_or_default(),
            },
        }
    }
}
