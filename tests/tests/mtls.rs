//! End to end: workload identity and mutual TLS. What is on the wire (tcpdump), what the HBONE
//! port presents (openssl), who it refuses (hand-made certificates), PeerAuthentication in
//! every scope, and certificate rotation under live traffic.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::SocketAddr,
    process::Command,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use ambit_tests::{Agent, Cluster, contains, echo_roundtrip};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde_json::Value;

const HTTP: u16 = 8080;
const ADMIN: u16 = 9090;
const STEP: Duration = Duration::from_secs(5);

/// `shop` in the mesh (client on node a, server on node b); `outsider` and `plain` outside it.
fn shop() -> Cluster {
    Cluster::builder().client_server().build().expect("cluster")
}

fn roundtrip(cluster: &Cluster, from: &str, to: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    let mut stream = cluster.pod(from).connect(to, STEP)?;
    let back = echo_roundtrip(&mut stream, payload)?;
    assert_eq!(back, payload);
    Ok(())
}

#[test]
fn the_wire_carries_tls_and_never_the_payload() {
    let cluster = shop();
    let agent_a = cluster.start_agent("a").expect("agent a");
    let _agent_b = cluster.start_agent("b").expect("agent b");
    let _server = cluster.pod("server").echo_server(HTTP).expect("server");
    let _plain = cluster.pod("plain").echo_server(HTTP).expect("plain");

    let mut capture = cluster.capture().expect("tcpdump on the bridge");
    let secret = b"AMBIT-SECRET-PAYLOAD-7f3a9c";
    let control = b"AMBIT-PLAINTEXT-CONTROL-51e2";
    roundtrip(&cluster, "client", cluster.pod("server").addr(HTTP), secret).expect("through the mesh");
    roundtrip(&cluster, "outsider", cluster.pod("plain").addr(HTTP), control).expect("outside the mesh");
    let pcap = capture.finish().expect("capture");

    assert!(contains(&pcap, control), "the control payload between non-enrolled pods is visible on the wire");
    assert!(!contains(&pcap, secret), "the mesh payload never appears on the wire");
    // A TLS handshake record (tcpdump decodes the headers: the first payload byte 0x16) went
    // from the client to the server's HBONE port, offering ALPN h2.
    let (client, server) = (cluster.pod("client").ip(), cluster.pod("server").ip());
    let handshakes = capture
        .count(&format!(
            "src host {client} and dst host {server} and tcp dst port 15008 and tcp[((tcp[12]&0xf0)>>2)] = 0x16"
        ))
        .expect("tcpdump -r");
    assert!(handshakes >= 1, "no TLS handshake record from the client to {server}:15008");
    assert!(contains(&pcap, b"\x00\x10\x00\x05\x00\x03\x02h2"), "no ALPN h2 extension captured");

    let record = agent_a
        .wait_for_event(STEP, |e| e["target"] == "access" && e["direction"] == "outbound")
        .expect("outbound record");
    assert_eq!(record["security"], "mutual_tls");
    assert_eq!(record["src.identity"], "spiffe://cluster.local/ns/shop/sa/client-sa");
    assert_eq!(record["dst.identity"], "spiffe://cluster.local/ns/shop/sa/server-sa");
    assert_eq!(record["dst.hbone_addr"], cluster.pod("server").addr(15008).to_string());
}

/// What `openssl s_client` (an independent TLS client) sees on a pod's HBONE port.
/// Its input stays open for half a second so that it reads what the server answers after the
/// handshake (an alert, when it refuses the client).
fn s_client(cluster: &Cluster, from: &str, to: SocketAddr) -> (String, String) {
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!("sleep 0.5 | openssl s_client -connect {to} -alpn h2 -showcerts -tls1_3"));
    let out = cluster.pod(from).command_output(command, STEP).expect("openssl s_client");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn first_pem(text: &str) -> String {
    let start = text.find("-----BEGIN CERTIFICATE-----").expect("a certificate in the output");
    let end = text[start..].find("-----END CERTIFICATE-----").expect("end of certificate") + start;
    format!("{}-----END CERTIFICATE-----\n", &text[start..end])
}

fn openssl(args: &[&str], input_file: &std::path::Path) -> String {
    let out = Command::new("openssl").args(args).arg(input_file).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_hbone_port_presents_a_valid_x509_svid_and_wants_one_back() {
    let cluster = shop();
    let _agent_b = cluster.start_agent("b").expect("agent b");
    let (stdout, stderr) = s_client(&cluster, "outsider", cluster.pod("server").addr(15008));
    assert!(stdout.contains("TLSv1.3"), "{stdout}");
    assert!(stdout.contains("ALPN protocol: h2"), "{stdout}");

    let leaf = cluster.dir().join("server-leaf.pem");
    std::fs::write(&leaf, first_pem(&stdout)).expect("write leaf");
    let text = openssl(&["x509", "-noout", "-text", "-in"], &leaf);
    assert_eq!(text.matches("URI:").count(), 1, "exactly one URI SAN:\n{text}");
    assert!(text.contains("URI:spiffe://cluster.local/ns/shop/sa/server-sa"), "{text}");
    assert!(!text.contains("DNS:") && !text.contains("IP Address:"), "only the SPIFFE ID:\n{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    let usage = text
        .split("X509v3 Key Usage: critical")
        .nth(1)
        .expect("critical key usage")
        .lines()
        .nth(1)
        .expect("usage");
    assert_eq!(usage.trim(), "Digital Signature", "no certSign/cRLSign:\n{text}");
    assert!(text.contains("TLS Web Server Authentication, TLS Web Client Authentication"), "{text}");
    let subject = openssl(&["x509", "-noout", "-subject", "-in"], &leaf);
    let issuer = openssl(&["x509", "-noout", "-issuer", "-in"], &leaf);
    assert_ne!(
        subject.trim_start_matches("subject="),
        issuer.trim_start_matches("issuer="),
        "a leaf, not a root"
    );
    let ca = cluster.ca_dir().join("ca-cert.pem");
    let verify = Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(&ca)
        .arg(&leaf)
        .output()
        .expect("openssl verify");
    assert!(String::from_utf8_lossy(&verify.stdout).contains(": OK"), "chains to the cluster CA");

    // s_client offered no certificate: the server refused it (TLS alert 116, certificate required).
    assert!(stderr.contains("alert number 116") || stderr.contains("certificate required"), "{stderr}");
}

/// A client certificate made by hand with rcgen, signed by `issuer` (or self-signed).
fn client_cert(
    issuer: Option<&Issuer<'_, KeyPair>>,
    uris: &[&str],
    validity: (SystemTime, SystemTime),
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().expect("uri"))).collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = validity.0.into();
    params.not_after = validity.1.into();
    let cert = match issuer {
        Some(issuer) => params.signed_by(&key, issuer),
        None => params.self_signed(&key),
    }
    .expect("sign");
    (cert.der().clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
}

fn issuer_from(dir: &std::path::Path) -> Issuer<'static, KeyPair> {
    let cert = std::fs::read_to_string(dir.join("ca-cert.pem")).expect("ca cert");
    let key =
        KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca-key.pem")).expect("ca key")).expect("key");
    Issuer::from_ca_cert_pem(&cert, key).expect("issuer")
}

fn other_ca() -> Issuer<'static, KeyPair> {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    Issuer::new(params, key)
}

/// Accepts any server certificate: these tests judge the server side only.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Outcome of an HBONE attempt by a hand-made client.
#[derive(Debug, PartialEq)]
enum Hbone {
    /// The server answered the CONNECT with this status; for 200, the echo came back.
    Status(u16),
    /// The connection was refused before any answer.
    Refused(String),
}

/// Connects from `from` to `to`'s HBONE port with `cert`, and sends `CONNECT authority`.
fn hbone_attempt(
    cluster: &Cluster,
    from: &str,
    to: &str,
    cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    authority: SocketAddr,
) -> Hbone {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = cluster.pod(from).connect(cluster.pod(to).addr(15008), STEP).expect("tcp to 15008");
    tcp.set_nonblocking(true).expect("nonblocking");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let attempt = async {
            let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
            let name = ServerName::IpAddress(cluster.pod(to).ip().into());
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let (sender, connection) = h2::client::handshake(tls).await.map_err(|e| format!("h2: {e}"))?;
            tokio::spawn(connection);
            let mut sender = sender.ready().await.map_err(|e| format!("h2 ready: {e}"))?;
            let request = http::Request::connect(authority.to_string()).body(()).expect("request");
            let (response, mut send) =
                sender.send_request(request, false).map_err(|e| format!("send: {e}"))?;
            let response = response.await.map_err(|e| format!("response: {e}"))?;
            let status = response.status().as_u16();
            if status == 200 {
                // Prove the tunnel works end to end, so refusals elsewhere are not a broken client.
                send.send_data(bytes::Bytes::from_static(b"hello over hbone"), false)
                    .map_err(|e| e.to_string())?;
                let mut body = response.into_body();
                let data = body.data().await.ok_or("no echo")?.map_err(|e| e.to_string())?;
                assert_eq!(&data[..], b"hello over hbone");
            }
            Ok::<_, String>(Hbone::Status(status))
        };
        match tokio::time::timeout(STEP, attempt).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => Hbone::Refused(e),
            Err(_) => Hbone::Refused("timed out".into()),
        }
    })
}

fn again(
    cert: &(CertificateDer<'static>, PrivateKeyDer<'static>),
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    (cert.0.clone(), cert.1.clone_key())
}

#[test]
fn the_hbone_port_refuses_wrong_clients_and_wrong_authorities() {
    let cluster = shop();
    let agent = cluster.start_agent("b").expect("agent b");
    let server = cluster.pod("server").echo_server(HTTP).expect("server");
    let target = cluster.pod("server").addr(HTTP);
    let now = SystemTime::now();
    let valid = (now - Duration::from_secs(60), now + Duration::from_secs(3600));
    let cluster_ca = issuer_from(&cluster.ca_dir());
    let me = "spiffe://cluster.local/ns/shop/sa/client-sa";

    // The control: a correct certificate and authority gets a working tunnel.
    let good = client_cert(Some(&cluster_ca), &[me], valid);
    assert_eq!(hbone_attempt(&cluster, "outsider", "server", Some(again(&good)), target), Hbone::Status(200));
    assert_eq!(server.peers().len(), 1);

    let refused = |cert, why: &str| match hbone_attempt(&cluster, "outsider", "server", cert, target) {
        Hbone::Refused(_) => {}
        other => panic!("{why}: expected refusal, got {other:?}"),
    };
    refused(None, "no client certificate");
    refused(Some(client_cert(Some(&other_ca()), &[me], valid)), "certificate of another CA");
    refused(Some(client_cert(None, &[me], valid)), "self-signed certificate");
    refused(
        Some(client_cert(Some(&cluster_ca), &["spiffe://evil.example/ns/shop/sa/client-sa"], valid)),
        "another trust domain",
    );
    refused(
        Some(client_cert(
            Some(&cluster_ca),
            &[me],
            (now - Duration::from_secs(7200), now - Duration::from_secs(3600)),
        )),
        "expired certificate",
    );
    refused(
        Some(client_cert(Some(&cluster_ca), &[me, "spiffe://cluster.local/ns/shop/sa/other"], valid)),
        "two SPIFFE IDs",
    );
    assert_eq!(server.peers().len(), 1, "no refused client reached the app");

    // A valid client may not use this pod's tunnel to reach another address: 400.
    let elsewhere = cluster.pod("plain").addr(HTTP);
    assert_eq!(
        hbone_attempt(&cluster, "outsider", "server", Some(again(&good)), elsewhere),
        Hbone::Status(400)
    );
    // Nor the agent's own ports.
    let own = cluster.pod("server").addr(15006);
    assert_eq!(hbone_attempt(&cluster, "outsider", "server", Some(again(&good)), own), Hbone::Status(400));
    // Nothing listening: 503.
    let closed = cluster.pod("server").addr(7);
    assert_eq!(hbone_attempt(&cluster, "outsider", "server", Some(good), closed), Hbone::Status(503));

    let refusals = agent.log_events().iter().filter(|e| e["message"] == "mTLS handshake refused").count();
    assert!(refusals >= 5, "each refused handshake is logged ({refusals}):\n{}", agent.log_text());
}

/// Plaintext from `outsider` to `server:port`: `Ok` if the echo came back, else the error kind.
fn plaintext(cluster: &Cluster, port: u16) -> Result<(), ErrorKind> {
    let mut stream =
        cluster.pod("outsider").connect(cluster.pod("server").addr(port), STEP).map_err(|e| e.kind())?;
    stream.set_read_timeout(Some(STEP)).map_err(|e| e.kind())?;
    stream.write_all(b"plaintext?").map_err(|e| e.kind())?;
    let mut buf = [0u8; 10];
    match stream.read_exact(&mut buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(ErrorKind::ConnectionReset),
        Err(e) => Err(e.kind()),
    }
}

fn set_policies(cluster: &Cluster, agent: &Agent, yaml: &str) {
    let generation = agent.generation();
    cluster.set_extra_yaml(yaml);
    cluster.write_manifest().expect("write");
    agent.wait_generation_after(generation, STEP).expect("policies loaded");
}

const MESH_STRICT: &str = include_str!("../../examples/policies/mesh-strict.yaml");
const SHOP_PERMISSIVE: &str = include_str!("../../examples/policies/shop-permissive.yaml");
const SERVER_STRICT_ADMIN_PERMISSIVE: &str =
    include_str!("../../examples/policies/server-strict-admin-permissive.yaml");

#[test]
fn peer_authentication_decides_plaintext_per_scope_and_port() {
    let cluster = shop();
    let _agent_a = cluster.start_agent("a").expect("agent a");
    let agent_b = cluster.start_agent("b").expect("agent b");
    let server = cluster.pod("server");
    let apps =
        [(HTTP, server.echo_server(HTTP).expect("http")), (ADMIN, server.echo_server(ADMIN).expect("admin"))];
    let app_connections =
        |port: u16| apps.iter().find(|(p, _)| *p == port).map_or(0, |(_, app)| app.peers().len());
    let mtls = |port| {
        roundtrip(&cluster, "client", cluster.pod("server").addr(port), b"over mtls").map_err(|e| e.kind())
    };

    // (policies, plaintext on 8080, plaintext on 9090); mTLS from the mesh always works.
    let matrix: [(&str, String, bool, bool); 5] = [
        ("no policy: PERMISSIVE", String::new(), true, true),
        ("mesh STRICT", MESH_STRICT.into(), false, false),
        ("namespace PERMISSIVE over mesh STRICT", format!("{MESH_STRICT}{SHOP_PERMISSIVE}"), true, true),
        (
            "workload STRICT, port 9090 PERMISSIVE",
            format!("{SHOP_PERMISSIVE}{SERVER_STRICT_ADMIN_PERMISSIVE}"),
            false,
            true,
        ),
        (
            "mesh STRICT, workload STRICT, port 9090 PERMISSIVE",
            format!("{MESH_STRICT}{SERVER_STRICT_ADMIN_PERMISSIVE}"),
            false,
            true,
        ),
    ];
    for (name, yaml, http_open, admin_open) in matrix {
        set_policies(&cluster, &agent_b, &yaml);
        for (port, open) in [(HTTP, http_open), (ADMIN, admin_open)] {
            let before = app_connections(port);
            let started = Instant::now();
            let result = plaintext(&cluster, port);
            if open {
                assert_eq!(result, Ok(()), "{name}: plaintext to {port} should pass");
            } else {
                assert_eq!(
                    result,
                    Err(ErrorKind::ConnectionReset),
                    "{name}: plaintext to {port} should be reset"
                );
                assert!(started.elapsed() < Duration::from_secs(1), "{name}: refused at once");
                assert_eq!(app_connections(port), before, "{name}: refused plaintext never reached the app");
            }
            assert_eq!(mtls(port), Ok(()), "{name}: mTLS to {port} always passes");
        }
    }
    // The refusal names the deciding policy.
    let refusal = agent_b
        .log_events()
        .into_iter()
        .rfind(|e| {
            e["target"] == "access" && e["error"].as_str().is_some_and(|s| s.contains("plaintext refused"))
        })
        .expect("a refusal record");
    assert_eq!(refusal["mtls.decided_by"], "shop/server");
    assert_eq!(refusal["src.workload"], "outsider");
}

#[test]
fn certificates_rotate_under_live_traffic() {
    let cluster = shop();
    let a = cluster.spawn_agent("a", &["--cert-ttl", "4s"]).expect("agent a");
    let b = cluster.spawn_agent("b", &["--cert-ttl", "4s"]).expect("agent b");
    a.wait_ready(Duration::from_secs(20)).expect("a ready");
    b.wait_ready(Duration::from_secs(20)).expect("b ready");
    let _server = cluster.pod("server").echo_server(HTTP).expect("server");
    let dst = cluster.pod("server").addr(HTTP);

    let mut long_lived = cluster.pod("client").connect(dst, STEP).expect("long-lived connection");
    let mut serials = std::collections::BTreeSet::new();
    let started = Instant::now();
    // About 10 s: more than two lifetimes, four renewals.
    while started.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            echo_roundtrip(&mut long_lived, b"still here").expect("old connection keeps working"),
            b"still here"
        );
        roundtrip(&cluster, "client", dst, b"new connection").expect("new connections keep working");
        let (stdout, _) = s_client(&cluster, "outsider", cluster.pod("server").addr(15008));
        let leaf = cluster.dir().join("rotating.pem");
        std::fs::write(&leaf, first_pem(&stdout)).expect("write");
        serials.insert(openssl(&["x509", "-noout", "-serial", "-in"], &leaf));
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(serials.len() >= 3, "new handshakes present new certificates: {serials:?}");
    let certs: Value = b.admin_json("/certs").expect("certs");
    let server_cert = certs
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/shop/sa/server-sa")
        .expect("server cert");
    let life = server_cert["not_after"].as_u64().expect("n") - server_cert["not_before"].as_u64().expect("n");
    assert!((60..=65).contains(&life), "4 s TTL plus the 60 s backdate: {life}");
}
