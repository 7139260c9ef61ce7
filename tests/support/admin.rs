//! The admin listener as an operator reads it: `GET /backends` parsed strictly (a small JSON
//! reader, so the harness needs no JSON crate), and waits on the states it reports.

use std::net::SocketAddr;
use std::time::Duration;

use super::client::{Client, Proto};
use super::PATIENCE;

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Json>),
    /// Members in document order.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// Parses a whole document; trailing text other than whitespace is an error.
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            bytes: text.as_bytes(),
            at: 0,
        };
        let value = p.value()?;
        p.space();
        if p.at != p.bytes.len() {
            return Err(format!("trailing text at byte {}", p.at));
        }
        Ok(value)
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// A whole, non-negative number.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl JsonParser<'_> {
    fn space(&mut self) {
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| b" \t\r\n".contains(b))
        {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        self.space();
        if self.bytes.get(self.at) == Some(&byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", byte as char, self.at))
        }
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json, String> {
        if self.bytes[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            Ok(value)
        } else {
            Err(format!("unexpected text at byte {}", self.at))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.space();
        match self.bytes.get(self.at) {
            None => Err("unexpected end of document".into()),
            Some(b'{') => {
                self.at += 1;
                let mut members = Vec::new();
                self.space();
                if self.bytes.get(self.at) == Some(&b'}') {
                    self.at += 1;
                    return Ok(Json::Object(members));
                }
                loop {
                    self.space();
                    let key = self.string()?;
                    self.expect(b':')?;
                    members.push((key, self.value()?));
                    self.space();
                    match self.bytes.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            return Ok(Json::Object(members));
                        }
                        _ => return Err(format!("expected , or }} at byte {}", self.at)),
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                self.space();
                if self.bytes.get(self.at) == Some(&b']') {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    self.space();
                    match self.bytes.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => return Err(format!("expected , or ] at byte {}", self.at)),
                    }
                }
            }
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(_) => {
                let start = self.at;
                while self
                    .bytes
                    .get(self.at)
                    .is_some_and(|b| b"+-.eE0123456789".contains(b))
                {
                    self.at += 1;
                }
                let text =
                    std::str::from_utf8(&self.bytes[start..self.at]).map_err(|e| e.to_string())?;
                text.parse()
                    .map(Json::Number)
                    .map_err(|_| format!("not a value at byte {start}"))
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            let Some(&b) = self.bytes.get(self.at) else {
                return Err("unterminated string".into());
            };
            self.at += 1;
            match b {
                b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                b'\\' => {
                    let Some(&e) = self.bytes.get(self.at) else {
                        return Err("unterminated escape".into());
                    };
                    self.at += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex = self
                                .bytes
                                .get(self.at..self.at + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or_else(|| format!("bad \\u escape at byte {}", self.at))?;
                            self.at += 4;
                            // Surrogate pairs do not occur in what the gateway reports.
                            char::from_u32(hex).unwrap_or('\u{fffd}')
                        }
                        _ => return Err(format!("bad escape at byte {}", self.at)),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(b),
            }
        }
    }
}

/// One backend of a route, as `/backends` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendView {
    pub url: String,
    pub address: String,
    /// healthy, unhealthy, ejected, slow_start or draining.
    pub state: String,
    /// Requests in flight + WebSockets + event streams on it now.
    pub open: u64,
    pub weight: u64,
}

/// One route, as `/backends` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    pub route: String,
    pub balance: String,
    pub backends: Vec<BackendView>,
}

/// What `GET /backends` answered: the routes, and the text they were read from (for messages).
#[derive(Debug, Clone)]
pub struct Backends {
    pub routes: Vec<RouteView>,
    pub text: String,
}

impl Backends {
    /// The route named `route` (`*/ws`, `host/path`); panics if it is not listed.
    pub fn route(&self, route: &str) -> &RouteView {
        self.routes
            .iter()
            .find(|r| r.route == route)
            .unwrap_or_else(|| panic!("/backends lists no route {route:?}: {}", self.text))
    }

    /// The backend with `url` on `route`; panics if it is not listed.
    pub fn backend(&self, route: &str, url: &str) -> &BackendView {
        self.route(route)
            .backends
            .iter()
            .find(|b| b.url == url)
            .unwrap_or_else(|| {
                panic!(
                    "/backends lists no backend {url:?} on {route:?}: {}",
                    self.text
                )
            })
    }

    /// The backend at `address` on `route`, if listed (DNS discovery gives one URL several).
    pub fn at(&self, route: &str, address: &str) -> Option<&BackendView> {
        self.route(route)
            .backends
            .iter()
            .find(|b| b.address == address)
    }

    /// Reads the document strictly: every field present, with the type the contract gives it.
    pub fn parse(text: &str) -> Result<Backends, String> {
        let doc = Json::parse(text)?;
        let field = |v: &Json, key: &str| -> Result<Json, String> {
            v.get(key).cloned().ok_or_else(|| format!("no {key:?}"))
        };
        let string = |v: &Json, key: &str| -> Result<String, String> {
            field(v, key)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{key:?} is not a string"))
        };
        let number = |v: &Json, key: &str| -> Result<u64, String> {
            field(v, key)?
                .as_u64()
                .ok_or_else(|| format!("{key:?} is not a whole number"))
        };
        let mut routes = Vec::new();
        for r in field(&doc, "routes")?
            .as_array()
            .ok_or("\"routes\" is not an array")?
        {
            let mut backends = Vec::new();
            for b in field(r, "backends")?
                .as_array()
                .ok_or("\"backends\" is not an array")?
            {
                backends.push(BackendView {
                    url: string(b, "url")?,
                    address: string(b, "address")?,
                    state: string(b, "state")?,
                    open: number(b, "open")?,
                    weight: number(b, "weight")?,
                });
            }
            routes.push(RouteView {
                route: string(r, "route")?,
                balance: string(r, "balance")?,
                backends,
            });
        }
        Ok(Backends {
            routes,
            text: text.to_string(),
        })
    }
}

/// `GET /backends` from the admin listener at `admin`: asserts 200 and a JSON content type,
/// and parses the answer strictly.
pub async fn backends(admin: SocketAddr) -> Backends {
    let mut client = Client::plain(Proto::H1, admin, "admin").await;
    let got = client.get("/backends").await;
    assert_eq!(got.status, 200, "/backends status: {}", got.text());
    let content_type = got
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "/backends content-type {content_type:?}"
    );
    Backends::parse(&got.text())
        .unwrap_or_else(|e| panic!("/backends is not the documented JSON: {e}\n{}", got.text()))
}

/// Polls `/backends` until `done` holds (the states it reports change on the gateway's own
/// timers, which offer no event to wait on); fails the test with the last answer if they do
/// not within the patience.
pub async fn backends_until(
    admin: SocketAddr,
    what: &str,
    done: impl Fn(&Backends) -> bool,
) -> Backends {
    let mut last = None;
    let reached = tokio::time::timeout(PATIENCE, async {
        loop {
            let now = backends(admin).await;
            if done(&now) {
                return now;
            }
            last = Some(now);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    reached.unwrap_or_else(|_| {
        let text = last.map(|b| b.text).unwrap_or_default();
        panic!("timed out waiting for {what}; /backends said: {text}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_example() {
        let text = r#"{"routes":[{"route":"*/ws","balance":"least_conn","backends":[
            {"url":"http://10.0.0.5:9000","address":"10.0.0.5:9000","state":"healthy",
             "open":12,"weight":1}]}]}"#;
        let b = Backends::parse(text).expect("valid");
        assert_eq!(
            b.backend("*/ws", "http://10.0.0.5:9000"),
            &BackendView {
                url: "http://10.0.0.5:9000".into(),
                address: "10.0.0.5:9000".into(),
                state: "healthy".into(),
                open: 12,
                weight: 1,
            }
        );
        assert_eq!(b.route("*/ws").balance, "least_conn");
    }

    #[test]
    fn reads_escapes_and_refuses_broken_documents() {
        assert_eq!(
            Json::parse(r#"["a\"b\\c\u0041", -1.5e2, true, null, {}]"#),
            Ok(Json::Array(vec![
                Json::String("a\"b\\cA".into()),
                Json::Number(-150.0),
                Json::Bool(true),
                Json::Null,
                Json::Object(vec![]),
            ]))
        );
        for bad in ["", "{", r#"{"a" 1}"#, "[1,]", "[1] x", r#""open"#] {
            assert!(Json::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(Backends::parse(
            r#"{"routes":[{"route":"r","balance":"b","backends":[{"url":"u"}]}]}"#
        )
        .is_err());
    }
}
