//! End to end: what a user must be able to trust across failures and routine operations —
//! dead peers noticed in seconds, resets that arrive as resets, restarts and upgrades.

use std::time::{Duration, Instant};

use ambit_tests::{Cluster, wait_until};

const HTTP: u16 = 8080;

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
