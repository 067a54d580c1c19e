//! Issue 21: nothing outside can blind the watchdog. Each attack runs on loopback, bounded in
//! time and count, prints what it tried and what held, and checks that an over-budget request
//! is still enforced on time while it runs.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;

/// Lifts this test process's descriptor limit to its hard limit (the floods hold thousands).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// A slow request (CPU loop) on `port`, killed at 1 s: returns when the connection ended.
fn slow_request_ends(port: u16) -> Duration {
    let t = Instant::now();
    let r = http_get(&local(port), "/slow", Duration::from_secs(10));
    assert!(r.is_err(), "the slow request was answered: {r:?}");
    t.elapsed()
}

/// The action record's own lateness (deadline → signal sent), in ms. The record is written once
/// the action's batch is done, a moment after the client saw its connection end: wait for it.
fn lateness_ms(d: &Daemon) -> f64 {
    let until = Instant::now() + Duration::from_secs(3);
    let mut lines = d.log_events("request over budget");
    while lines.is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
        lines = d.log_events("request over budget");
    }
    assert_eq!(lines.len(), 1, "one action: {lines:?}");
    assert_eq!(lines[0]["result"], "delivered", "{}", lines[0]);
    lines[0]["lateness_ms"].as_f64().unwrap()
}

/// The over-budget request ended at its 1 s budget (within 500 ms) and the daemon acted
/// within 5 ms of the deadline.
fn on_time(took: Duration, late: f64) {
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1500),
        "ended after {took:?}, budget 1 s"
    );
    assert!(late < 5.0, "acted {late} ms after the deadline");
}

/// Holds up to `n` connections to `addr` for `secs`, sending a byte on each now and then and
/// reopening those the server closes. Returns (opened, closed by the server).
fn flood(addr: String, n: usize, stop: Arc<AtomicBool>) -> (usize, usize) {
    let mut open: Vec<TcpStream> = Vec::new();
    let (mut opened, mut closed) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        while open.len() < n && !stop.load(Ordering::Relaxed) {
            match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200)) {
                Ok(s) => {
                    s.set_nonblocking(true).unwrap();
                    opened += 1;
                    open.push(s);
                }
                Err(_) => break,
            }
        }
        open.retain_mut(|s| {
            let mut b = [0u8; 64];
            let alive = match s.read(&mut b) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            } && s.write_all(b"G").is_ok();
            if !alive {
                closed += 1;
            }
            alive
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    (opened, closed)
}

#[test]
fn a_metrics_flood_at_1024_descriptors_does_not_delay_enforcement() {
    raise_nofile();
    let port = free_port();
    let _app = app(port, 2, &[]);
    let d = Daemon::start(&[
        // Stacks off: these measure enforcement beside hostile clients (a stack read adds up
        // to stack_timeout before the action).
        "--stacks",
        "false",
        "--port",
        &port.to_string(),
        "--budget",
        "1s",
        "--signal",
        "SIGKILL",
    ]);
    // The limit systemd gives a service, soft and hard, set on the running daemon.
    let pid = d.proc.pid().to_string();
    assert!(Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=1024:1024"])
        .status()
        .unwrap()
        .success());
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, addr) = (stop.clone(), d.metrics.clone());
    let flooder = std::thread::spawn(move || flood(addr, 3000, s2));
    std::thread::sleep(Duration::from_millis(1500));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    // /healthz still answers (a fresh connection displaces the oldest).
    let healthy = (0..10).any(|_| {
        http_get(&d.metrics, "/healthz", Duration::from_secs(2)).is_ok_and(|b| b.contains("ok"))
    });
    let took = slow_request_ends(port);
    stop.store(true, Ordering::Relaxed);
    let (opened, closed) = flooder.join().unwrap();
    let late = lateness_ms(&d);
    println!(
        "metrics flood: {opened} connections opened, {closed} closed by the server, daemon held {fds} descriptors (limit 1024); /healthz answered: {healthy}; over-budget request ended after {took:?}, action {late:.2} ms after its deadline"
    );
    assert!(healthy, "/healthz never answered during the flood");
    assert!(fds < 1024, "the daemon's descriptors ran out: {fds}");
    assert!(opened > 1000, "the flood did not flood: {opened}");
    on_time(took, late);
}

#[test]
fn a_slowloris_on_the_metrics_port_is_cut_at_the_head_deadline() {
    let port = free_port();
    let _app = app(port, 2, &[]);
    let d = Daemon::start(&[
        // Stacks off: these measure enforcement beside hostile clients (a stack read adds up
        // to stack_timeout before the action).
        "--stacks",
        "false",
        "--port",
        &port.to_string(),
        "--budget",
        "1s",
        "--signal",
        "SIGKILL",
    ]);
    let closed_by_server = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let (addr, closed) = (d.metrics.clone(), closed_by_server.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n");
                // One header byte every 300 ms, for at most 6 s.
                while t.elapsed() < Duration::from_secs(6) {
                    let mut b = [0u8; 512];
                    match s.read(&mut b) {
                        Ok(0) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return Some(t.elapsed());
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return Some(t.elapsed());
                        }
                    }
                    if s.write_all(b"X").is_err() {
                        closed.fetch_add(1, Ordering::Relaxed);
                        return Some(t.elapsed());
                    }
                }
                None
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let answered = http_get(&d.metrics, "/healthz", Duration::from_secs(2));
    let took = slow_request_ends(port);
    let ends: Vec<Option<Duration>> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let late = lateness_ms(&d);
    let last = ends.iter().flatten().max().copied();
    println!(
        "slowloris: 40 clients sending one byte every 300 ms; {} cut by the server, the last after {last:?}; /healthz: {answered:?}; over-budget request ended after {took:?}, action {late:.2} ms late",
        closed_by_server.load(Ordering::Relaxed)
    );
    assert!(
        ends.iter().all(Option::is_some),
        "a slow client was never cut: {ends:?}"
    );
    let last = last.unwrap();
    assert!(
        last >= Duration::from_secs(2) && last < Duration::from_millis(3500),
        "the head deadline is 2 s: {last:?}"
    );
    assert!(answered.is_ok_and(|b| b.contains("ok")));
    on_time(took, late);
}

#[test]
fn malformed_requests_to_the_metrics_port_get_an_error_and_nothing_else() {
    let d = Daemon::start(&[
        // Stacks off: these measure enforcement beside hostile clients (a stack read adds up
        // to stack_timeout before the action).
        "--stacks",
        "false",
        "--port",
        &free_port().to_string(),
        "--budget",
        "1s",
        "--observe",
    ]);
    let huge_header = format!(
        "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let long_path = format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(10 * 1024));
    let garbage: Vec<u8> = (0..512u32).map(|i| (i * 131 % 256) as u8).collect();
    let corpus: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "POST",
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_vec(),
            &["405"],
        ),
        (
            "DELETE",
            b"DELETE /healthz HTTP/1.1\r\n\r\n".to_vec(),
            &["405"],
        ),
        (
            "unknown path",
            b"GET /nope HTTP/1.1\r\n\r\n".to_vec(),
            &["404"],
        ),
        (
            "HTTP/9.9",
            b"GET /metrics HTTP/9.9\r\n\r\n".to_vec(),
            &["400", "505", ""],
        ),
        ("binary garbage", garbage, &["400", ""]),
        (
            "64 KiB header",
            huge_header.into_bytes(),
            &["431", "400", ""],
        ),
        (
            "10 KiB path",
            long_path.into_bytes(),
            &["404", "414", "400", "431", ""],
        ),
        (
            "bad content-length",
            b"GET /metrics HTTP/1.1\r\nContent-Length: -5\r\n\r\n".to_vec(),
            &["400", ""],
        ),
        (
            "no CRLF",
            b"GET /metrics HTTP/1.1\n\n".to_vec(),
            &["200", "400", ""],
        ),
        (
            "NUL in path",
            b"GET /met\0rics HTTP/1.1\r\n\r\n".to_vec(),
            &["400", "404", ""],
        ),
    ];
    for (name, bytes, allowed) in &corpus {
        let mut s = TcpStream::connect(&d.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        let status = text.split_whitespace().nth(1).unwrap_or("").to_string();
        println!(
            "malformed {name}: answered {:?}",
            if status.is_empty() {
                "nothing (closed)"
            } else {
                &status
            }
        );
        assert!(allowed.contains(&status.as_str()), "{name}: {text:?}");
    }
    let metrics = http_get(&d.metrics, "/metrics", Duration::from_secs(2)).unwrap();
    assert!(metrics.contains("watchdog_build_info"), "{metrics}");
    // HEAD works and has no body.
    let mut s = TcpStream::connect(&d.metrics).unwrap();
    s.write_all(b"HEAD /healthz HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n\r\n"),
        "{out:?}"
    );
}

#[test]
fn an_idle_connection_flood_on_a_watched_port_leaves_room_for_a_fresh_request() {
    raise_nofile();
    let port = free_port();
    let _server = threaded(port);
    let d = Daemon::start(&[
        // Stacks off: these measure enforcement beside hostile clients (a stack read adds up
        // to stack_timeout before the action).
        "--stacks",
        "false",
        "--port",
        &port.to_string(),
        "--budget",
        "1s",
        "--signal",
        "SIGKILL",
        "--max-connections",
        "64",
    ]);
    // More idle connections than the table holds, opened as fast as the client can.
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(local(port)).unwrap())
        .collect();
    let p = port.to_string();
    // The kernel saw all 100: tracked (dropped ones stay counted until they close) or refused
    // while the table was full (the daemon may drop idle ones fast enough that it never is).
    let seen = || {
        d.metric("watchdog_tracked_connections", &[])
            + d.metric("watchdog_map_evictions_total", &[("table", "connections")])
    };
    let saw_all = wait_until(Duration::from_secs(2), || seen() >= 100.0);
    let dropped_first = d.wait_metric(
        "watchdog_connections_dropped_total",
        &[("reason", "idle")],
        1.0,
        Duration::from_secs(3),
    );
    // The flood goes on while the over-budget request runs: 5 more idle connections every
    // 50 ms, so that the table passes its high-water mark (57) at every eviction poll (100 ms)
    // and eviction runs (on the sweeper thread) through the request's whole budget and its
    // action; each pass leaves room (down to 48 of 64) for the next 100 ms of the flood and
    // the fresh request.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) && held.len() < 1000 {
                for _ in 0..5 {
                    if let Ok(s) = TcpStream::connect(local(port)) {
                        held.push(s);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            held
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let before = d.metric("watchdog_connections_dropped_total", &[("reason", "idle")]);
    let took = slow_request_ends(port);
    let after = d.metric("watchdog_connections_dropped_total", &[("reason", "idle")]);
    stop.store(true, Ordering::Relaxed);
    let more = flood.join().unwrap();
    let late = lateness_ms(&d);
    let full = d.metric("watchdog_map_evictions_total", &[("table", "connections")]);
    println!(
        "idle flood: {} idle connections on a 64-entry table; {full} refused while full, {dropped_first} idle ones dropped before the request, {} while it ran; the over-budget request ended after {took:?}, action {late:.2} ms late",
        100 + more.len(),
        after - before
    );
    assert!(saw_all, "the kernel saw {} of the 100 connections", seen());
    assert!(dropped_first >= 1.0, "no idle connection was dropped");
    assert!(
        after - before >= 30.0,
        "eviction did not run while the request was in flight: {} dropped",
        after - before
    );
    on_time(took, late);
    assert!(d.metric("watchdog_requests_total", &[("port", &p)]) >= 1.0);
    drop(idle);
}

#[test]
fn a_storm_on_the_status_socket_does_not_delay_enforcement() {
    let port = free_port();
    let _app = app(port, 2, &[]);
    let d = Daemon::start(&[
        // Stacks off: these measure enforcement beside hostile clients (a stack read adds up
        // to stack_timeout before the action).
        "--stacks",
        "false",
        "--port",
        &port.to_string(),
        "--budget",
        "1s",
        "--signal",
        "SIGKILL",
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let storms: Vec<_> = (0..4)
        .map(|_| {
            let (stop, calls, sock) = (stop.clone(), calls.clone(), d.status.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) {
                        let mut out = String::new();
                        let _ = s.read_to_string(&mut out);
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let took = slow_request_ends(port);
    stop.store(true, Ordering::Relaxed);
    for s in storms {
        s.join().unwrap();
    }
    let late = lateness_ms(&d);
    let n = calls.load(Ordering::Relaxed);
    println!("status storm: {n} status documents read by 4 clients; over-budget request ended after {took:?}, action {late:.2} ms late");
    assert!(n > 50, "the storm did not storm: {n}");
    on_time(took, late);
}

#[test]
fn a_check_beside_the_daemon_does_not_blind_it() {
    let port = free_port();
    let _app = app(port, 2, &[]);
    let d = Daemon::start(&[
        // Stacks off: these measure enforcement beside hostile clients (a stack read adds up
        // to stack_timeout before the action).
        "--stacks",
        "false",
        "--port",
        &port.to_string(),
        "--budget",
        "1s",
        "--signal",
        "SIGKILL",
    ]);
    // `watchdog check` loads and attaches its own programs, then exits.
    for set in ["sock", "syscalls"] {
        let out = Command::new(BIN)
            .args(["check", "--probes", set])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let took = slow_request_ends(port);
    let late = lateness_ms(&d);
    println!("watchdog check twice beside the daemon; over-budget request ended after {took:?}, action {late:.2} ms late");
    on_time(took, late);
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn status_calls_with_5000_requests_in_flight_keep_lateness_within_2_ms_of_idle() {
    raise_nofile();
    let (hang, slow) = (free_port(), free_port());
    let _hang = spawn_ready(
        "hang.py",
        Command::new("python3")
            .arg(fixture("hang.py"))
            .arg(hang.to_string()),
    );
    let _app = app(slow, 2, &[]);
    let dir = tmpdir("attack-status");
    let cfg = dir.join("watchdog.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[policy]]\nname = \"held\"\nports = [{hang}]\nbudget = \"10m\"\nmode = \"observe\"\n\n\
             [[policy]]\nname = \"slow\"\nports = [{slow}]\nbudget = \"500ms\"\nsignal = \"SIGKILL\"\n\
             breaker = {{ max_actions = 1000, window = \"1m\", cooldown = \"1s\" }}\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--stacks", "false", "--config", cfg.to_str().unwrap()]);
    // 5,000 requests in flight on one event-loop server.
    let held: Vec<TcpStream> = (0..5000)
        .map(|_| {
            let mut s = TcpStream::connect(local(hang)).unwrap();
            s.write_all(b"GET /hang HTTP/1.1\r\n\r\n").unwrap();
            s
        })
        .collect();
    let p = hang.to_string();
    let in_flight = (0..300)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            d.metric("watchdog_requests_in_flight", &[("port", &p)])
        })
        .find(|n| *n >= 5000.0)
        .unwrap_or_else(|| d.metric("watchdog_requests_in_flight", &[("port", &p)]));
    assert!(
        in_flight >= 5000.0,
        "the kernel saw {in_flight} of 5,000 requests in flight (tracked {})",
        d.metric("watchdog_tracked_connections", &[]),
    );
    let lateness = |d: &Daemon, n: usize| -> Vec<f64> {
        let before = d.log_events("request over budget").len();
        for _ in 0..n {
            let _ = slow_request_ends(slow);
            std::thread::sleep(Duration::from_millis(150));
        }
        d.log_events("request over budget")[before..]
            .iter()
            .map(|l| l["lateness_ms"].as_f64().unwrap())
            .collect()
    };
    let mut idle = lateness(&d, 6);
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    // 50 status calls a second (three clients, one every 60 ms each), each document listing
    // 5,000 requests in flight.
    let storms: Vec<_> = (0..3)
        .map(|_| {
            let (s2, c2, sock) = (stop.clone(), calls.clone(), d.status.clone());
            std::thread::spawn(move || {
                while !s2.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) {
                        let mut out = String::new();
                        let _ = s.read_to_string(&mut out);
                        if out.len() > 100_000 {
                            c2.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(60).saturating_sub(t.elapsed()));
                }
            })
        })
        .collect();
    let t = Instant::now();
    let mut busy = lateness(&d, 6);
    stop.store(true, Ordering::Relaxed);
    for s in storms {
        s.join().unwrap();
    }
    let rate = calls.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
    let (mi, mb) = (median(&mut idle), median(&mut busy));
    let (xi, xb) = (idle[idle.len() - 1], busy[busy.len() - 1]);
    println!(
        "{in_flight} in flight: lateness idle p50 {mi:.2} / max {xi:.2} ms; with {rate:.0} full status documents a second p50 {mb:.2} / max {xb:.2} ms"
    );
    assert_eq!((idle.len(), busy.len()), (6, 6));
    // Two documents are built at a time (~45 ms each at 5,000 requests): the rest wait. The
    // storm asks for 50 a second; on a quiet 2-core machine it reads 15-20, with another build
    // running beside it 9-14 (measured): at 10 or more the renderer is never idle, which is
    // what the lateness check below needs.
    assert!(rate >= 10.0, "the storm read {rate:.0} documents a second");
    assert!(
        mb <= mi + 2.0,
        "median lateness {mb:.2} ms under the storm, {mi:.2} ms idle"
    );
    // Close the 5,000 connections while the daemon still runs, and wait until the kernel has
    // closed them all: the next test then starts on a quiet machine (tearing this many down
    // after the daemon and its pins were gone left the next daemons seeing nothing for
    // seconds, twice, in the full run).
    drop(held);
    let settled = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        d.metric("watchdog_tracked_connections", &[]) < 10.0
    });
    assert!(settled, "the 5,000 connections were never closed");
}
