//! TLS termination: the certificate the gateway presents for each SNI name.

use crate::support::{route, Backend, GatewayBuilder, Proto};

const A: &str = "a.test";
const WILD: &str = "*.b.test";

#[tokio::test]
async fn sni_picks_the_certificate_for_the_name() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .cert(&[A])
        .cert(&[WILD])
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let (a_cert, wild_cert) = (&gw.leaves[0], &gw.leaves[1]);
    assert_ne!(a_cert, wild_cert);

    for proto in Proto::ALL {
        // Both clients verify the name against the certificate they get, and both are served.
        let mut client = gw.client(proto, "a.test").await;
        assert_eq!(
            client.peer_certs.first(),
            Some(a_cert),
            "{proto}: SNI a.test"
        );
        assert_eq!(client.get("/").await.echo().backend, "b", "{proto}");

        let mut client = gw.client(proto, "x.b.test").await;
        assert_eq!(
            client.peer_certs.first(),
            Some(wild_cert),
            "{proto}: SNI x.b.test"
        );
        assert_eq!(client.get("/").await.echo().backend, "b", "{proto}");
    }
}

#[tokio::test]
async fn missing_or_unknown_sni_gets_the_first_certificate() {
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .cert(&[A])
        .cert(&[WILD])
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let first = &gw.leaves[0];

    for proto in Proto::ALL {
        for sni in [
            None,
            Some("unknown.test"),
            Some("b.test"),
            Some("y.x.b.test"),
        ] {
            let tls =
                crate::support::client::tls_connect(gw.https, &gw.ca, sni, &[proto.alpn()], false)
                    .await;
            let mut client = crate::support::Client::over_tls(proto, tls, "a.test").await;
            assert_eq!(
                client.peer_certs.first(),
                Some(first),
                "{proto}: SNI {sni:?}"
            );
            assert_eq!(
                client.get("/").await.echo().backend,
                "b",
                "{proto}: SNI {sni:?}"
            );
        }
    }
}
