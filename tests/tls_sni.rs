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

#[tokio::test]
async fn returning_clients_resume_their_session_over_tls_1_3_and_1_2() {
    use rustls::HandshakeKind;
    use std::sync::Arc;
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // The same client config (and so the same session store) for every connection, as a
        // browser keeps its sessions.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(gw.ca.der()).expect("CA certificate");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut kinds = Vec::new();
        for _ in 0..3 {
            let tcp = tokio::net::TcpStream::connect(gw.https)
                .await
                .expect("connect");
            let name = rustls_pki_types::ServerName::try_from("a.gw.test").expect("name");
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .expect("handshake");
            kinds.push(tls.get_ref().1.handshake_kind());
            // A request, so the client reads the TLS 1.3 tickets that follow the handshake.
            let mut client = crate::support::Client::over_tls(Proto::H1, tls, "a.gw.test").await;
            assert_eq!(client.get("/").await.echo().backend, "b");
        }
        assert_eq!(
            kinds,
            [
                Some(HandshakeKind::Full),
                Some(HandshakeKind::Resumed),
                Some(HandshakeKind::Resumed)
            ],
            "{version:?}"
        );
    }
}

#[tokio::test]
async fn post_quantum_hybrid_key_exchange_is_chosen_when_offered() {
    use std::sync::Arc;
    let backend = Backend::echo("b").await;
    let gw = GatewayBuilder::new()
        .route(route("/").to(backend.url()))
        .start()
        .await;
    let handshake = |groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>| {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = groups;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(gw.ca.der()).expect("CA certificate");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = gw.https;
        async move {
            let tcp = tokio::net::TcpStream::connect(https)
                .await
                .expect("connect");
            let name = rustls_pki_types::ServerName::try_from("a.gw.test").expect("name");
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .expect("handshake");
            tls.get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name())
        }
    };
    use rustls::crypto::aws_lc_rs::kx_group;
    // What Chrome and Firefox offer first.
    assert_eq!(
        handshake(vec![kx_group::X25519MLKEM768, kx_group::X25519]).await,
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    // A client without it still gets classic X25519.
    assert_eq!(
        handshake(vec![kx_group::X25519]).await,
        Some(rustls::NamedGroup::X25519)
    );
}
