//! Issue 30: the budget is the server's time. A client that holds an unfinished request head
//! gets its connection cut; the worker is never signalled. A request whose head came whole is
//! enforced as before, and an interim `100 Continue` does not end it.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use common::*;

fn daemon(port: u16) -> Daemon {
    Daemon::start(&[
        "--port",
        &port.to_string(),
        "--budget",
        "1s",
        "--signal",
        "SIGKILL",
        "--target",
        "process",
    ])
}

fn node(port: u16) -> Proc {
    spawn_ready(
        "node_http.js",
        Command::new("node")
            .arg(fixture("node_http.js"))
            .arg(port.to_string()),
    )
}

/// Sends `GET /x HTTP/1.1\r\nHost: a\r\n` (no blank line) and waits: returns how long until
/// the server side went away (EOF or reset).
fn hold_unfinished_head(port: u16) -> Duration {
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let t = Instant::now();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n").unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the unfinished head should have been cut: {other:?}"),
    }
    t.elapsed()
}

fn unfinished_head_never_kills(mut server: Proc, port: u16) {
    let pid = server.pid();
    let d = daemon(port);
    let took = hold_unfinished_head(port);
    // Cut at the budget (1 s; the client stalled: no byte for half of it), not before.
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1600),
        "cut after {took:?}"
    );
    // The kernel saw the request and its budget ran out...
    assert_eq!(
        d.wait_metric(
            "watchdog_client_timeouts_total",
            &[],
            1.0,
            Duration::from_secs(2)
        ),
        1.0
    );
    assert_eq!(
        d.metric(
            "watchdog_budget_exceeded_total",
            &[("port", &port.to_string())]
        ),
        1.0
    );
    // ... and the server was not signalled: the same process answers its next request.
    assert!(server.alive(), "the server was killed");
    assert_eq!(server.pid(), pid);
    assert!(http_get(&local(port), "/fast", Duration::from_secs(2))
        .unwrap()
        .starts_with("fast"));
    assert_eq!(
        d.metric("watchdog_actions_total", &[("action", "SIGKILL")]),
        0.0,
        "{}",
        d.log_text()
    );
    assert_eq!(
        d.metric(
            "watchdog_actions_total",
            &[("action", "reset"), ("result", "delivered")]
        ),
        1.0
    );
    let line = &d.log_events("request over budget")[0];
    assert_eq!(line["blame"], "client");
    assert_eq!(line["result"], "delivered");
}

#[test]
fn an_unfinished_head_never_kills_a_thread_per_connection_server() {
    require_root();
    let port = free_port();
    unfinished_head_never_kills(threaded(port), port);
}

#[test]
fn an_unfinished_head_never_kills_a_node_server() {
    require_root();
    let port = free_port();
    unfinished_head_never_kills(node(port), port);
}

#[test]
fn a_whole_request_with_a_slow_handler_is_killed_as_before() {
    require_root();
    let port = free_port();
    let mut server = node(port);
    let d = daemon(port);
    let t = Instant::now();
    let r = http_get(&local(port), "/slow", Duration::from_secs(5));
    let took = t.elapsed();
    assert!(r.is_err(), "{r:?}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1500),
        "killed after {took:?}"
    );
    assert!(wait_until(Duration::from_secs(2), || !server.alive()));
    assert_eq!(
        d.metric(
            "watchdog_actions_total",
            &[("action", "SIGKILL"), ("result", "delivered")]
        ),
        1.0
    );
    assert_eq!(d.metric("watchdog_client_timeouts_total", &[]), 0.0);
}

#[test]
fn expect_100_continue_is_enforced_at_the_budget() {
    require_root();
    let port = free_port();
    let mut server = node(port);
    let d = daemon(port);
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    s.write_all(
        b"POST /upload-loop HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100 Continue"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(b"0123456789").unwrap();
    // The handler loops after reading the body: killed at the budget, counted from the head.
    let r = s.read(&mut buf);
    let took = t.elapsed();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1500),
        "killed after {took:?}"
    );
    assert!(wait_until(Duration::from_secs(2), || !server.alive()));
    assert_eq!(
        d.metric(
            "watchdog_actions_total",
            &[("action", "SIGKILL"), ("result", "delivered")]
        ),
        1.0
    );
}
