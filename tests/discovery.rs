//! DNS discovery against a loopback responder: one lookup's addresses and TTL, and `watch`
//! reporting the first answer and each change, skipping unchanged answers, keeping the last
//! addresses through NXDOMAIN, and stopping on cancel.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use streamgate::config::ResolverConfig;
use streamgate::upstream::discovery::{watch, DiscoveryError, Resolver};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::dns::DnsServer;
use crate::support::within;

const NAME: &str = "svc.streamgate.test";
const PORT: u16 = 8080;
const REFRESH: Duration = Duration::from_millis(200);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address literal")
}

fn addrs(ips: &[&str]) -> Vec<SocketAddr> {
    ips.iter()
        .map(|text| SocketAddr::new(ip(text), PORT))
        .collect()
}

fn resolver(dns: &DnsServer) -> Arc<Resolver> {
    let config = ResolverConfig {
        nameservers: vec![dns.addr()],
        refresh: REFRESH,
    };
    Arc::new(Resolver::new(&config).expect("resolver for the loopback server"))
}

/// A running `watch` whose updates arrive on `updates`.
struct Watch {
    updates: mpsc::UnboundedReceiver<Vec<SocketAddr>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Watch {
    fn start(dns: &DnsServer) -> Watch {
        let (tx, updates) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(
            resolver(dns),
            NAME.to_owned(),
            PORT,
            REFRESH,
            stop.clone(),
            move |set| {
                let _ = tx.send(set);
            },
        ));
        Watch {
            updates,
            stop,
            task,
        }
    }

    async fn next(&mut self, what: &str) -> Vec<SocketAddr> {
        within(what, self.updates.recv())
            .await
            .expect("watch ended while an update was awaited")
    }

    fn assert_no_update(&mut self, when: &str) {
        if let Ok(set) = self.updates.try_recv() {
            panic!("{when}: unexpected update {set:?}");
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        within("watch to return after cancel", self.task)
            .await
            .expect("watch task panicked");
    }
}

/// Waits until a lookup that saw only what the server holds now has been handled by `watch`.
/// A lookup is two queries (A, AAAA); of the next four queries at most one belongs to a lookup
/// already under way, so they include a whole fresh lookup, and since `watch` looks up one at a
/// time, the query after it proves that lookup's answer was handled.
async fn fresh_lookup_handled(dns: &DnsServer) {
    let seen = dns.queries(NAME);
    within("two more lookups", dns.wait_queries(NAME, seen + 4)).await;
}

#[tokio::test]
async fn resolve_returns_sorted_unique_addresses_and_ttl() {
    let dns = DnsServer::start().await;
    let ips = ["2001:db8::1", "192.0.2.2", "192.0.2.1", "192.0.2.2"].map(ip);
    dns.set(NAME, &ips, 42);

    let resolved = within("resolve", resolver(&dns).resolve(NAME))
        .await
        .expect("name is set");

    assert_eq!(
        resolved.addrs,
        ["192.0.2.1", "192.0.2.2", "2001:db8::1"].map(ip)
    );
    assert_eq!(resolved.valid_for, Duration::from_secs(42));
}

#[tokio::test]
async fn resolve_reports_nxdomain_for_an_unknown_name() {
    let dns = DnsServer::start().await;

    let result = within("resolve", resolver(&dns).resolve(NAME)).await;

    assert!(
        matches!(result, Err(DiscoveryError::NoSuchName { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn watch_updates_on_first_answer_and_on_each_change() {
    let dns = DnsServer::start().await;
    dns.set(NAME, &[ip("192.0.2.1")], 300);
    let mut watch = Watch::start(&dns);
    assert_eq!(watch.next("first answer").await, addrs(&["192.0.2.1"]));

    // The 300 s TTL is longer than the refresh: the change is seen at the next refresh anyway.
    dns.set(NAME, &[ip("192.0.2.1"), ip("192.0.2.2"), ip("::1")], 300);
    assert_eq!(
        watch.next("added addresses").await,
        addrs(&["192.0.2.1", "192.0.2.2", "::1"])
    );

    dns.set(NAME, &[ip("192.0.2.2")], 300);
    assert_eq!(watch.next("removed addresses").await, addrs(&["192.0.2.2"]));
    watch.stop().await;
}

#[tokio::test]
async fn watch_does_not_update_on_an_unchanged_answer() {
    let dns = DnsServer::start().await;
    dns.set(NAME, &[ip("192.0.2.2"), ip("192.0.2.1")], 1);
    let mut watch = Watch::start(&dns);
    assert_eq!(
        watch.next("first answer").await,
        addrs(&["192.0.2.1", "192.0.2.2"])
    );

    // Same set in another order and with another TTL: still the same addresses.
    dns.set(NAME, &[ip("192.0.2.1"), ip("192.0.2.2")], 60);
    fresh_lookup_handled(&dns).await;
    watch.assert_no_update("after unchanged answers");
    watch.stop().await;
}

#[tokio::test]
async fn watch_keeps_the_last_addresses_through_nxdomain() {
    let dns = DnsServer::start().await;
    dns.set(NAME, &[ip("192.0.2.1")], 300);
    let mut watch = Watch::start(&dns);
    assert_eq!(watch.next("first answer").await, addrs(&["192.0.2.1"]));

    dns.remove(NAME);
    fresh_lookup_handled(&dns).await;
    watch.assert_no_update("after NXDOMAIN");

    // Back with another address: the failure streak ends and the new set is reported.
    dns.set(NAME, &[ip("192.0.2.3")], 300);
    assert_eq!(
        watch.next("answer after NXDOMAIN").await,
        addrs(&["192.0.2.3"])
    );
    watch.stop().await;
}

#[tokio::test]
async fn watch_stops_on_cancel_even_before_any_answer() {
    let dns = DnsServer::start().await;
    let mut watch = Watch::start(&dns);
    fresh_lookup_handled(&dns).await;
    watch.assert_no_update("while the name does not exist");
    watch.stop().await;
}
