//! The event-stream grammar (WHATWG HTML 9.2.6) as far as a gateway needs it: where events
//! end, so nothing is ever spliced into half an event, and which event id a client has seen,
//! tracked exactly as the browser does, so a stream can be continued from it.

/// Where the bytes sent so far stand in the event-stream grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boundary {
    /// Bytes in the current, unterminated line.
    line_len: usize,
    /// The last terminated line was blank (an event was dispatched), or nothing was sent yet.
    last_blank: bool,
    /// The last byte was CR: an LF right after it belongs to the same line end.
    after_cr: bool,
}

impl Default for Boundary {
    fn default() -> Self {
        Boundary {
            line_len: 0,
            last_blank: true,
            after_cr: false,
        }
    }
}

impl Boundary {
    /// Whether a new event (or comment) may start here without splicing into one in progress.
    pub fn at_event_boundary(&self) -> bool {
        self.line_len == 0 && self.last_blank
    }

    /// Advances over `bytes`; returns how many events were completed (blank lines after data).
    pub fn advance(&mut self, bytes: &[u8]) -> u64 {
        let mut events = 0;
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    let blank = self.line_len == 0;
                    if blank && !self.last_blank {
                        events += 1;
                    }
                    self.last_blank = blank;
                    self.line_len = 0;
                    self.after_cr = b == b'\r';
                }
                _ => {
                    self.after_cr = false;
                    self.line_len += 1;
                }
            }
        }
        events
    }

    /// The length of the prefix of `bytes` that ends at the first event boundary in it (with
    /// the LF of a CRLF), if there is one.
    pub fn first_boundary(&self, bytes: &[u8]) -> Option<usize> {
        let mut probe = *self;
        for (i, &b) in bytes.iter().enumerate() {
            probe.advance(&[b]);
            if probe.at_event_boundary() {
                let crlf = b == b'\r' && bytes.get(i + 1) == Some(&b'\n');
                return Some(i + 1 + usize::from(crlf));
            }
        }
        None
    }
}

/// The last event id a client has, from the bytes it was sent: an `id` field sets the buffer,
/// and the buffer becomes the last event id when its event is dispatched at the blank line
/// (also for an event with no data); an `id` containing NUL is ignored; an empty one resets.
#[derive(Debug, Clone, Default)]
pub struct EventIds {
    /// The last event id string: what the browser would send as `Last-Event-ID`.
    last: Option<String>,
    /// The last event id buffer (not reset at dispatch).
    buffer: Option<String>,
    /// The current line, kept only while it may be an `id` line, and only this long.
    line: Vec<u8>,
    /// The current line cannot be an id line (or is too long to keep).
    skip_line: bool,
    /// An id line was longer than [`MAX_ID`]: the id is unknown until the next one.
    lost: bool,
    after_cr: bool,
    /// The current line is the first of its event's lines (a blank one dispatches).
    line_empty: bool,
}

/// Longest `id` line kept: a longer id makes the stream unresumable until the next one.
const MAX_ID: usize = 1024;

impl EventIds {
    /// Starts from the `Last-Event-ID` the client sent, if any.
    pub fn new(last: Option<String>) -> EventIds {
        EventIds {
            buffer: last.clone(),
            last,
            line_empty: true,
            ..EventIds::default()
        }
    }

    /// The id to resume from: None when there is none (or it was reset, or lost).
    pub fn last(&self) -> Option<&str> {
        self.last.as_deref().filter(|id| !id.is_empty())
    }

    /// Reads bytes as they were delivered to the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    self.end_line();
                }
                _ => {
                    self.after_cr = false;
                    self.line_empty = false;
                    if !self.skip_line {
                        self.line.push(b);
                        let l = &self.line;
                        let may_be_id = match l.len() {
                            1 => l[0] == b'i',
                            2 => l[..] == *b"id",
                            _ => l.starts_with(b"id:"),
                        };
                        if !may_be_id {
                            self.skip_line = true;
                            self.line.clear();
                        } else if l.len() > MAX_ID + 4 {
                            self.skip_line = true;
                            self.line.clear();
                            self.lost = true;
                        }
                    }
                }
            }
        }
    }

    fn end_line(&mut self) {
        if self.line_empty {
            // A blank line: dispatch.
            self.last = if self.lost { None } else { self.buffer.clone() };
        } else if !self.skip_line && (self.line[..] == *b"id" || self.line.starts_with(b"id:")) {
            let value = self.line.get(3..).unwrap_or_default();
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if !value.contains(&0) {
                self.lost = false;
                self.buffer = Some(String::from_utf8_lossy(value).into_owned());
            }
        }
        self.line.clear();
        self.skip_line = false;
        self.line_empty = true;
    }
}

/// Holds back a partial event: what is passed on always ends at an event boundary, so a
/// stream that moves to another backend never leaves half an event with the client.
#[derive(Debug, Default)]
pub struct WholeEvents {
    /// Bytes of the event in progress, not delivered yet.
    pending: bytes::BytesMut,
    /// Where delivered + pending bytes stand.
    scan: Boundary,
}

/// An event longer than this is passed on before it is complete (the stream cannot be
/// moved until it ends): the bound on what one stream holds back.
pub const MAX_PENDING: usize = 64 * 1024;

impl WholeEvents {
    /// Takes a chunk from the backend; returns what may be delivered now (whole events, or
    /// an over-long event's bytes so far).
    pub fn push(&mut self, chunk: bytes::Bytes) -> bytes::Bytes {
        let before = self.pending.len();
        let mut cut = None;
        for (i, &b) in chunk.iter().enumerate() {
            self.scan.advance(&[b]);
            if self.scan.at_event_boundary() {
                cut = Some(i + 1);
            }
        }
        match cut {
            Some(end) if before == 0 => {
                // The usual case: whole events in one chunk, passed on without a copy.
                self.pending.extend_from_slice(&chunk[end..]);
                chunk.slice(..end)
            }
            Some(end) => {
                self.pending.extend_from_slice(&chunk[..end]);
                let out = self.pending.split().freeze();
                self.pending.extend_from_slice(&chunk[end..]);
                out
            }
            None => {
                self.pending.extend_from_slice(&chunk);
                if self.pending.len() > MAX_PENDING {
                    return self.pending.split().freeze();
                }
                bytes::Bytes::new()
            }
        }
    }

    /// Whether part of an event is held back.
    pub fn has_partial(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Forgets the event in progress (its backend is gone: the next one sends it again).
    /// `delivered` is where the client's bytes stand.
    pub fn discard(&mut self, delivered: Boundary) {
        self.pending.clear();
        self.scan = delivered;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ids(chunks: &[&str]) -> Option<String> {
        let mut t = EventIds::new(None);
        for c in chunks {
            t.feed(c.as_bytes());
        }
        t.last().map(str::to_string)
    }

    #[test]
    fn event_id_takes_effect_at_dispatch() {
        assert_eq!(ids(&["id: 1\ndata: a\n\n"]), Some("1".into()));
        assert_eq!(
            ids(&["id: 1\ndata: a\n\nid: 2\ndata: b\n"]),
            Some("1".into())
        );
        assert_eq!(
            ids(&["id: 1\ndata: a\n\ndata: b\n\n"]),
            Some("1".into()),
            "kept"
        );
        assert_eq!(
            ids(&["id: 3\n\n"]),
            Some("3".into()),
            "an event with no data"
        );
        assert_eq!(ids(&["id:4\r\ndata: x\r\n\r\n"]), Some("4".into()));
        assert_eq!(
            ids(&["i", "d: 5\r", "\ndata: x\r", "\n\r\n"]),
            Some("5".into())
        );
        assert_eq!(ids(&["id: 1\n\nid\n\n"]), None, "an empty id resets");
        assert_eq!(
            ids(&["id: 1\n\nid: a\0b\n\n"]),
            Some("1".into()),
            "NUL: ignored"
        );
        assert_eq!(ids(&["idx: 9\n\n: id: 8\n\n"]), None, "not an id field");
        assert_eq!(ids(&["data: a\n\n"]), None);
        let mut t = EventIds::new(Some("41".into()));
        assert_eq!(t.last(), Some("41"));
        t.feed(b"data: no id\n\n");
        assert_eq!(t.last(), Some("41"), "the client's Last-Event-ID stays");
        let long = format!("id: {}\n\n", "x".repeat(MAX_ID + 10));
        assert_eq!(
            ids(&["id: 1\n\n", &long]),
            None,
            "an id too long to keep is lost"
        );
    }

    #[test]
    fn whole_events_hold_back_partial_ones() {
        let mut w = WholeEvents::default();
        assert_eq!(
            &w.push(Bytes::from_static(b"id: 1\ndata: a\n\n"))[..],
            b"id: 1\ndata: a\n\n"
        );
        assert!(!w.has_partial());
        assert_eq!(
            &w.push(Bytes::from_static(b"id: 2\ndata: b\n\nid: 3\nda"))[..],
            b"id: 2\ndata: b\n\n"
        );
        assert!(w.has_partial());
        assert_eq!(&w.push(Bytes::from_static(b"ta: c\n"))[..], b"");
        assert_eq!(
            &w.push(Bytes::from_static(b"\nid: 4"))[..],
            b"id: 3\ndata: c\n\n"
        );
        w.discard(Boundary::default());
        assert!(!w.has_partial());
        assert_eq!(&w.push(Bytes::from_static(b"id: 5\n\n"))[..], b"id: 5\n\n");
        let big = Bytes::from(vec![b'x'; MAX_PENDING + 1]);
        assert_eq!(
            w.push(big).len(),
            MAX_PENDING + 1,
            "an over-long event is passed on"
        );
    }

    fn after(chunks: &[&str]) -> (Boundary, u64) {
        let mut b = Boundary::default();
        let events = chunks.iter().map(|c| b.advance(c.as_bytes())).sum();
        (b, events)
    }

    #[test]
    fn boundary_after_blank_line_with_each_line_ending() {
        for stream in [
            "data: a\n\n",
            "data: a\r\n\r\n",
            "data: a\r\r",
            "id: 1\ndata: a\n\n",
        ] {
            let (b, events) = after(&[stream]);
            assert!(b.at_event_boundary(), "{stream:?}");
            assert_eq!(events, 1, "{stream:?}");
        }
        assert!(Boundary::default().at_event_boundary(), "nothing sent yet");
    }

    #[test]
    fn no_boundary_inside_an_event() {
        for stream in [
            "data: a",
            "data: a\n",
            "data: a\r\n",
            "data: a\n\ndata: b\n",
            ": c\n",
        ] {
            let (b, _) = after(&[stream]);
            assert!(!b.at_event_boundary(), "{stream:?}");
        }
    }

    #[test]
    fn split_crlf_and_chunks_count_events_once() {
        let (b, events) = after(&["data: a\r", "\n\r", "\ndata: b\n", "\n"]);
        assert!(b.at_event_boundary());
        assert_eq!(events, 2);
        let (_, events) = after(&[": comment\n\n"]);
        assert_eq!(events, 1, "a comment block is dispatched like an event");
    }

    #[test]
    fn first_boundary_inside_a_chunk() {
        let (mid_event, _) = after(&["data: a"]);
        assert_eq!(mid_event.first_boundary(b"b\n\ndata: c"), Some(3));
        assert_eq!(mid_event.first_boundary(b"b\r\n\r\ndata: c"), Some(5));
        assert_eq!(mid_event.first_boundary(b"b\r\r"), Some(3));
        assert_eq!(mid_event.first_boundary(b"b\ndata: c\n"), None);
        let (after_line, _) = after(&["data: a\n"]);
        assert_eq!(after_line.first_boundary(b"\n: next\n\n"), Some(1));
    }
}
