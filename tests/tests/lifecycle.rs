//! End to end: what a user must be able to trust across failures and routine operations —
//! dead peers noticed in seconds, resets that arrive as resets, restarts and upgrades.

use std::time::{Duration, Instant};

use ambit_tests::{Cluster, wait_until};

const HTTP: u16 = 8080;
const STEP: Duration = Duration::from_secs(5);

/// The peer node vanishes without a word (its link goes down) while the pool holds a
/// connection to it. Before, a new connection hung for the client's whole timeout (40 s). Now
/// the pool notices (a CONNECT unanswered makes it ping; the ping goes unanswered), drops the
/// connection and fails the stream within seconds; when the peer is back, traffic flows.
#[test]
fn a_silent_peer_fails_new_connections_in_seconds_and_the_pool_recovers() {
    let cluster = Cluster::builder().client_server().build().expect("cluster");
    let _a = cluster.start_agent("a").expect("agent a");
    let _b = cluster.start_agent("b").expect("agent b");
    let _server = cluster.pod("server").echo_server(HTTP).expect("server");
    let dst = cluster.pod("server").addr(HTTP);
    assert_eq!(cluster.pod("client").attempt(dst), Ok(()), "the pool is warm");

    cluster.pod("server").set_link(false).expect("link down");
    let started = Instant::now();
    let result = cluster.pod("client").attempt(dst);
    let took = started.elapsed();
    assert!(result.is_err(), "no answer from a vanished peer");
    eprintln!("a new connection to the vanished peer failed after {took:?}");
    assert!(took <= Duration::from_secs(5), "failed after {took:?}");

    cluster.pod("server").set_link(true).expect("link up");
    wait_until(Duration::from_secs(15), "traffic flows again", || cluster.pod("client").attempt(dst).is_ok());
}

/// Reads until the stream ends: the bytes read, and how it ended (`Ok` = a clean EOF).
fn read_to_end(stream: &mut std::net::TcpStream) -> (usize, std::io::Result<()>) {
    use std::io::Read as _;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n,
            Err(e) => return (total, Err(e)),
        }
    }
}

/// A server that sends 100 KB and then resets the connection. Before, through HBONE the client
/// sometimes saw a clean end of stream after a few bytes: data lost, and the loss looked like
/// success. Now every run delivers the 100 KB and then the reset, through HBONE, plaintext
/// passthrough and inbound plaintext alike.
#[test]
fn a_reset_arrives_as_a_reset_after_every_byte() {
    const BYTES: usize = 100 * 1024;
    let cluster = Cluster::builder().client_server().build().expect("cluster");
    let _a = cluster.start_agent("a").expect("agent a");
    let _b = cluster.start_agent("b").expect("agent b");
    let _server = cluster.pod("server").source_server(HTTP, Some(BYTES)).expect("server in the mesh");
    let _plain = cluster.pod("plain").source_server(HTTP, Some(BYTES)).expect("server outside");
    let paths = [
        ("HBONE", "client", cluster.pod("server").addr(HTTP)),
        ("passthrough", "client", cluster.pod("plain").addr(HTTP)),
        ("inbound plaintext", "outsider", cluster.pod("server").addr(HTTP)),
        ("direct (the control)", "outsider", cluster.pod("plain").addr(HTTP)),
    ];
    for (path, from, to) in paths {
        for run in 0..10 {
            let mut stream = cluster.pod(from).connect(to, STEP).expect("connect");
            let (got, end) = read_to_end(&mut stream);
            assert_eq!(got, BYTES, "{path} run {run}: every byte the server sent");
            let kind = end.err().map(|e| e.kind());
            assert_eq!(kind, Some(std::io::ErrorKind::ConnectionReset), "{path} run {run}: a reset, not EOF");
        }
    }
}

/// An agent that dies in the middle of a transfer (SIGKILL, either end) gives the client an
/// error, never a clean end of stream with fewer bytes.
#[test]
fn an_agent_killed_mid_transfer_is_an_error_to_the_client() {
    let cluster = Cluster::builder().client_server().build().expect("cluster");
    let _server = cluster.pod("server").source_server(HTTP, None).expect("endless server");
    let dst = cluster.pod("server").addr(HTTP);
    for victim in ["a", "b"] {
        let mut a = cluster.start_agent("a").expect("agent a");
        let mut b = cluster.start_agent("b").expect("agent b");
        let mut stream = cluster.pod("client").connect(dst, STEP).expect("connect");
        let reader = std::thread::spawn(move || read_to_end(&mut stream));
        std::thread::sleep(Duration::from_millis(500));
        if victim == "a" {
            a.kill()
        } else {
            b.kill()
        }
        let (got, end) = reader.join().expect("reader");
        assert!(got > 0, "the transfer was under way");
        assert!(end.is_err(), "agent {victim} killed: the client saw a clean EOF after {got} bytes");
        drop((a, b));
    }
}
