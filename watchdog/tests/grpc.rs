//! Issue 20: on HTTP/2 connections (h2c, gRPC without TLS) a request is a stream. A `grpcio`
//! server and client from PyPI: each call has its own deadline, a fast call next to a slow one
//! never causes an action, a call the client cancels is its client-gone, hundreds of calls in
//! flight on one connection leave nothing behind; Node serving HTTP/1.1 and h2c on one port
//! keeps per-request tracking for the HTTP/1.1 connection.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;

fn grpc_server(port: u16, workers: u32) -> Proc {
    spawn_ready(
        "grpc_pair.py server",
        Command::new("python3").arg(fixture("grpc_pair.py")).args([
            "server",
            &port.to_string(),
            &workers.to_string(),
        ]),
    )
}

/// Runs a `grpc_pair.py` client mode; its JSON lines.
fn grpc_client(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .arg(fixture("grpc_pair.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grpc_pair.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("watchdog.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// The kernel's stream counters: (started, ended, reaped, in flight, connections lost).
fn streams(d: &Daemon) -> (f64, f64, f64, f64, f64) {
    let s = d.scrape();
    let ev = |e: &str| sum(&s, "watchdog_http2_streams_total", &[("event", e)]);
    (
        ev("started"),
        ev("ended"),
        ev("reaped"),
        sum(&s, "watchdog_http2_streams_in_flight", &[]),
        sum(&s, "watchdog_http2_connections_lost_total", &[]),
    )
}

fn budget_records(d: &Daemon) -> Vec<serde_json::Value> {
    d.log_events("request over budget")
}

#[test]
fn a_slow_call_beside_fast_calls_is_caught_at_its_own_deadline_and_only_it() {
    let port = free_port();
    let _server = grpc_server(port, 4);
    let dir = tmpdir("grpc-mixed");
    let cfg = config(
        &dir,
        &format!(
            "[[policy]]\nname = \"grpc\"\nports = [{port}]\nbudget = \"1s\"\n\
             steps = [{{ after = \"1s\", action = \"log\" }}]\n"
        ),
    );
    let d = Daemon::start(&["--config", &cfg]);
    // One channel: a 2.5 s call, and beside it 20 fast calls, one every 100 ms.
    let calls = grpc_client(&["mixed", &port.to_string(), "2500", "20", "100"]);
    assert_eq!(calls.len(), 21, "{calls:?}");
    assert!(
        calls.iter().all(|c| c["ok"] == true),
        "log only: every call succeeds: {calls:?}"
    );
    let recs = budget_records(&d);
    assert_eq!(
        recs.len(),
        1,
        "only the slow call is over budget: {recs:#?}"
    );
    let r = &recs[0];
    assert_eq!(r["request"], "POST /t.T/Sleep", "{r}");
    assert_eq!(r["protocol"], "http2", "{r}");
    let elapsed = r["elapsed_ms"].as_u64().unwrap();
    assert!(
        (1000..1100).contains(&elapsed),
        "caught at its own deadline, not at a later frame's: {elapsed} ms"
    );
    // The kernel followed every call as a stream, and every one ended.
    let until = Instant::now() + Duration::from_secs(2);
    let (started, ended, reaped, in_flight, lost) = loop {
        let s = streams(&d);
        if s.0 == s.1 + s.2 || Instant::now() > until {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(started >= 22.0, "warm-up + 21 calls started: {started}");
    assert_eq!((ended, reaped, in_flight, lost), (started, 0.0, 0.0, 0.0));
    assert_eq!(
        d.metric("watchdog_requests_total", &[("port", &port.to_string())]),
        started,
        "each stream is one request in the port's counts"
    );
}

#[test]
fn a_stuck_call_is_killed_at_its_budget_while_the_fast_calls_before_it_succeed() {
    let port = free_port();
    let mut server = grpc_server(port, 4);
    let dir = tmpdir("grpc-kill");
    let cfg = config(
        &dir,
        &format!(
            "[[policy]]\nname = \"grpc\"\nports = [{port}]\nbudget = \"1s\"\n\
             signal = \"SIGKILL\"\ntarget = \"process\"\n"
        ),
    );
    let _d = Daemon::start(&["--config", &cfg]);
    let calls = grpc_client(&["mixed", &port.to_string(), "3000", "8", "100"]);
    let slow = &calls[0];
    assert_eq!(slow["code"], "UNAVAILABLE", "{calls:?}");
    let t = slow["t"].as_f64().unwrap();
    assert!(
        (1.0..1.6).contains(&t),
        "the stuck call ended at its budget: {t} s"
    );
    for c in &calls[1..] {
        assert_eq!(c["ok"], true, "fast calls before the kill: {c}");
        assert!(c["t"].as_f64().unwrap() < 1.0, "{c}");
    }
    assert!(wait_until(Duration::from_secs(2), || !server.alive()));
}

#[test]
fn a_call_the_client_cancels_is_its_client_gone() {
    let port = free_port();
    let _server = grpc_server(port, 4);
    let dir = tmpdir("grpc-cancel");
    let cfg = config(
        &dir,
        &format!(
            "[[policy]]\nname = \"grpc\"\nports = [{port}]\nbudget = \"5s\"\n\
             steps = [{{ after = \"5s\", action = \"log\" }}]\n\
             client_gone = {{ grace = \"0s\", steps = [{{ after = \"0s\", action = \"log\" }}] }}\n"
        ),
    );
    let d = Daemon::start(&["--config", &cfg]);
    let t = Instant::now();
    let calls = grpc_client(&["cancel", &port.to_string(), "2000", "500"]);
    assert_eq!(calls[0]["code"], "CANCELLED", "{calls:?}");
    let gone = d.log_events("request abandoned by its client");
    assert_eq!(
        gone.len(),
        1,
        "streams (started, ended, reaped, in flight, lost) {:?}\n{}",
        streams(&d),
        d.log_text()
    );
    let g = &gone[0];
    assert_eq!(g["request"], "POST /t.T/Sleep", "{g}");
    let at = g["elapsed_ms"].as_u64().unwrap();
    assert!(
        (500..800).contains(&at),
        "seen when the client reset the stream: {at} ms"
    );
    assert!(t.elapsed() < Duration::from_secs(4));
    assert!(
        budget_records(&d).is_empty(),
        "the 5 s budget never ran out"
    );
}

#[test]
fn hundreds_of_calls_in_flight_on_one_connection_leave_no_entry_behind() {
    let port = free_port();
    let _server = grpc_server(port, 400);
    let dir = tmpdir("grpc-many");
    let cfg = config(
        &dir,
        &format!(
            "[[policy]]\nname = \"grpc\"\nports = [{port}]\nbudget = \"5s\"\n\
             steps = [{{ after = \"5s\", action = \"log\" }}]\n"
        ),
    );
    let d = Daemon::start(&["--config", &cfg]);
    let before = streams(&d);
    let out = Command::new("python3")
        .arg(fixture("grpc_pair.py"))
        .args(["many", &port.to_string(), "300", "300"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 300");
    let until = Instant::now() + Duration::from_secs(3);
    let after = loop {
        let s = streams(&d);
        if s.1 + s.2 >= before.1 + 300.0 || Instant::now() > until {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(after.0 - before.0 >= 300.0, "{before:?} -> {after:?}");
    assert_eq!(after.0 - before.0, after.1 - before.1, "every stream ended");
    assert_eq!(after.3, 0.0, "the stream table is empty: {after:?}");
    assert_eq!(after.4, 0.0, "no connection lost its frames: {after:?}");
    assert_eq!(
        d.metric("watchdog_map_evictions_total", &[("table", "streams")]),
        0.0
    );
    assert!(budget_records(&d).is_empty());
}

#[test]
fn http1_beside_h2c_on_one_port_keeps_its_per_request_tracking() {
    let port = free_port();
    let _server = spawn_ready(
        "h2_mixed.js",
        Command::new("node")
            .arg(fixture("h2_mixed.js"))
            .arg(port.to_string()),
    );
    let dir = tmpdir("h2-mixed");
    let cfg = config(
        &dir,
        &format!(
            "[[policy]]\nname = \"web\"\nports = [{port}]\nbudget = \"1s\"\n\
             steps = [{{ after = \"1s\", action = \"log\" }}]\n"
        ),
    );
    let d = Daemon::start(&["--config", &cfg]);
    let url = |ms: u32| format!("http://127.0.0.1:{port}/sleep?ms={ms}");
    // Two streams on one h2c connection (Node's http2 client), and an HTTP/1.1 keep-alive
    // connection with a fast and then a slow request, at the same time.
    let h2 = std::thread::spawn(move || {
        Command::new("node")
            .arg(fixture("h2_mixed.js"))
            .args([
                "client",
                &port.to_string(),
                "/sleep?ms=2000",
                "/sleep?ms=100",
            ])
            .output()
            .unwrap()
    });
    let h1 = Command::new("curl")
        .args(["-s", "--max-time", "5", "--http1.1"])
        .args([url(100), url(1500)])
        .output()
        .unwrap();
    let h2 = h2.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&h1.stdout),
        "slept 100\nslept 1500\n"
    );
    let body = String::from_utf8_lossy(&h2.stdout);
    assert!(
        body.contains("slept 2000") && body.contains("slept 100"),
        "{body}"
    );
    let recs = budget_records(&d);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    let proto = |p: &str| recs.iter().find(|r| r["protocol"] == p).cloned();
    let r1 = proto("http1").expect("the slow HTTP/1.1 request");
    assert_eq!(r1["request"], "GET /sleep?…", "{r1}");
    let r2 = proto("http2").expect("the slow stream");
    for r in [&r1, &r2] {
        let e = r["elapsed_ms"].as_u64().unwrap();
        assert!((1000..1100).contains(&e), "{r}");
    }
    let p = port.to_string();
    for (protocol, n) in [("http1", 1.0), ("http2", 1.0)] {
        assert_eq!(
            d.metric(
                "watchdog_connections_total",
                &[("port", &p), ("protocol", protocol)]
            ),
            n,
            "{protocol}"
        );
    }
    // 2 HTTP/1.1 requests + 2 streams.
    assert_eq!(d.metric("watchdog_requests_total", &[("port", &p)]), 4.0);
}

#[test]
fn a_call_takes_its_route_budget_from_its_path() {
    let port = free_port();
    let _server = grpc_server(port, 4);
    let dir = tmpdir("grpc-routes");
    // The kernel wakes the daemon at the port's earliest budget (500 ms); the daemon reads the
    // call's `:path` and times the rest of its route's ladder.
    let cfg = config(
        &dir,
        &format!(
            "[[policy]]\nname = \"grpc\"\nports = [{port}]\nbudget = \"500ms\"\n\
             steps = [{{ after = \"500ms\", action = \"log\" }}]\n\
             routes = [{{ path = \"/t.T/Sleep\", budget = \"1500ms\", steps = [{{ after = \"1500ms\", action = \"log\" }}] }}]\n"
        ),
    );
    let d = Daemon::start(&["--config", &cfg]);
    let calls = grpc_client(&["mixed", &port.to_string(), "2500", "3", "100"]);
    assert!(calls.iter().all(|c| c["ok"] == true), "{calls:?}");
    let recs = budget_records(&d);
    assert_eq!(recs.len(), 1, "{recs:#?}");
    let r = &recs[0];
    assert_eq!(r["route"], "/t.T/Sleep", "{r}");
    assert_eq!(r["budget_ms"], 1500, "{r}");
    let e = r["elapsed_ms"].as_u64().unwrap();
    assert!((1500..1600).contains(&e), "at its route's budget: {e} ms");
}
