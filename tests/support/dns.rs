//! A loopback authoritative DNS responder over UDP whose records tests change while it runs.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Answers A and AAAA queries from a table on 127.0.0.1:0; a name not in the table gets
/// NXDOMAIN. Counts the queries each name receives, so a test can wait for a re-resolution
/// instead of sleeping. Stops when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    /// Records and query counts under one lock: a query counted after `set` returns is answered
    /// from the new records.
    zone: Mutex<Zone>,
    /// Bumped after every query, for [`DnsServer::wait_queries`].
    tick: watch::Sender<u64>,
}

#[derive(Default)]
struct Zone {
    records: HashMap<String, (Vec<IpAddr>, u32)>,
    queries: HashMap<String, usize>,
}

/// `Svc.Test.` and `svc.test` are the same name.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().expect("dns address");
        let state = Arc::new(State::default());
        let task = tokio::spawn(serve(socket, state.clone()));
        DnsServer { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `name` with `ips` (A for IPv4, AAAA for IPv6), each with `ttl`, from now on.
    pub fn set(&self, name: &str, ips: &[IpAddr], ttl: u32) {
        self.zone().records.insert(key(name), (ips.to_vec(), ttl));
    }

    /// Answers `name` with NXDOMAIN from now on.
    pub fn remove(&self, name: &str) {
        self.zone().records.remove(&key(name));
    }

    /// Queries received for `name` so far, of any type (a resolver's lookup sends A and AAAA).
    pub fn queries(&self, name: &str) -> usize {
        self.zone().queries.get(&key(name)).copied().unwrap_or(0)
    }

    /// Waits until `name` has received at least `count` queries.
    pub async fn wait_queries(&self, name: &str, count: usize) {
        // Subscribed before the check, so a query that lands in between still wakes us.
        let mut tick = self.state.tick.subscribe();
        while self.queries(name) < count {
            tick.changed().await.expect("dns server stopped");
        }
    }

    fn zone(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.state.zone.lock().expect("dns zone lock")
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(socket: UdpSocket, state: Arc<State>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        if query.metadata.message_type != MessageType::Query {
            continue;
        }
        let response = answer(&query, &state);
        state.tick.send_modify(|n| *n += 1);
        if let Ok(bytes) = response.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

fn answer(query: &Message, state: &State) -> Message {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.add_queries(query.queries.iter().cloned());
    // RFC 6891 7: a responder that gets an OPT record sends one back.
    if query.edns.is_some() {
        response.set_edns(Edns::new());
    }
    let mut zone = state.zone.lock().expect("dns zone lock");
    for q in &query.queries {
        let name = key(&q.name().to_ascii());
        *zone.queries.entry(name.clone()).or_default() += 1;
        let Some((ips, ttl)) = zone.records.get(&name) else {
            response.metadata.response_code = ResponseCode::NXDomain;
            continue;
        };
        let wanted = |ip: &&IpAddr| match q.query_type() {
            RecordType::A => ip.is_ipv4(),
            RecordType::AAAA => ip.is_ipv6(),
            _ => false,
        };
        for ip in ips.iter().filter(wanted) {
            let owner: Name = q.name().clone();
            response.add_answer(Record::from_rdata(owner, *ttl, RData::from(*ip)));
        }
    }
    response
}
