//! Issue 7: restart survival, PID reuse, overload. Real daemons, real servers, real signals.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

const KILLED: &[(&str, &str)] = &[("action", "SIGKILL"), ("result", "delivered")];

fn policy(port: u16, budget: &str) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--budget",
        budget,
        "--signal",
        "SIGKILL",
    ]
    .map(String::from)
    .to_vec()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `kill -9` the daemon, leaving its pinned state behind.
fn crash(mut d: Daemon) {
    d.keep_state = true;
    drop(d);
}

#[test]
fn restarted_daemon_acts_at_the_original_deadline_once() {
    let port = free_port();
    let _app = app(port, 2, &[]);
    let state = state_dir();
    let p = policy(port, "3s");
    let d1 = Daemon::start_in(&state, &args(&p));
    let slow = timed(move || http_get(&local(port), "/slow", Duration::from_secs(20)));
    let sent = Instant::now();
    assert_eq!(
        d1.wait_metric(
            "watchdog_requests_in_flight",
            &[("port", &port.to_string())],
            1.0,
            Duration::from_millis(500)
        ),
        1.0
    );
    std::thread::sleep(Duration::from_millis(500).saturating_sub(sent.elapsed()));
    crash(d1);
    std::thread::sleep(Duration::from_millis(700));
    let d2 = Daemon::start_in(&state, &args(&p));
    assert!(
        d2.log_text().contains("adopted the pinned kernel state"),
        "{}",
        d2.log_text()
    );
    let (took, result) = slow.join().unwrap();
    assert!(result.is_err(), "the slow request must be cut off");
    // At the original deadline (3 s after the request), not 3 s after the restart (~4.2 s).
    assert!(
        took >= Duration::from_millis(3000) && took < Duration::from_millis(3600),
        "killed after {took:?}"
    );
    assert_eq!(
        d2.wait_metric(
            "watchdog_actions_total",
            KILLED,
            1.0,
            Duration::from_secs(2)
        ),
        1.0
    );
    // The state is this daemon's now: a fast request is counted by the adopted programs.
    assert!(http_get(&local(port), "/fast", Duration::from_secs(2))
        .unwrap()
        .starts_with("fast"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d2.metric("watchdog_actions_total", &[]), 1.0, "acted twice");
}

#[test]
fn deadline_passed_while_down_is_acted_on_at_restart_and_never_again() {
    let port = free_port();
    let _app = app(port, 2, &[]);
    let state = state_dir();
    let mut p = policy(port, "1s");
    p.push("--observe".into());
    let d1 = Daemon::start_in(&state, &args(&p));
    let _slow = timed(move || http_get(&local(port), "/sleep", Duration::from_secs(20)));
    assert_eq!(
        d1.wait_metric(
            "watchdog_requests_in_flight",
            &[("port", &port.to_string())],
            1.0,
            Duration::from_millis(500)
        ),
        1.0
    );
    crash(d1);
    // The deadline passes with no daemon: the kernel timer fires and the event waits in the
    // pinned ring buffer.
    std::thread::sleep(Duration::from_millis(1500));
    let d2 = Daemon::start_in(&state, &args(&p));
    let seen = d2.wait_metric(
        "watchdog_budget_exceeded_total",
        &[],
        1.0,
        Duration::from_secs(3),
    );
    assert_eq!(seen, 1.0, "{}", d2.log_text());
    let line = &d2.log_events("request over budget")[0];
    assert!(
        line["lateness_ms"].as_f64().unwrap() > 500.0,
        "acted late, at restart, and says so: {line}"
    );
    crash(d2);
    // A third daemon finds the event consumed: nothing is acted on twice.
    let d3 = Daemon::start_in(&state, &args(&p));
    // It runs on the adopted state, not a fresh one: the log says so, the kernel's pinned
    // counters still hold the deadline that fired while no daemon ran, and the /sleep
    // connection is still tracked.
    assert!(
        d3.log_text().contains("adopted the pinned kernel state"),
        "{}",
        d3.log_text()
    );
    assert_eq!(
        d3.metric(
            "watchdog_kernel_deadlines_total",
            &[("result", "in_flight")]
        ),
        1.0,
        "{}",
        d3.log_text()
    );
    assert_eq!(d3.metric("watchdog_tracked_connections", &[]), 1.0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        d3.metric("watchdog_budget_exceeded_total", &[]),
        0.0,
        "{}",
        d3.log_text()
    );
}

#[test]
fn pinned_state_of_another_build_or_setting_is_not_adopted() {
    let port = free_port();
    let _app = app(port, 2, &[]);
    let state = state_dir();
    let p = policy(port, "1s");
    crash(Daemon::start_in(&state, &args(&p)));
    // Another table size is another stamp: the old programs are detached, not read.
    let mut q = p.clone();
    q.extend(["--max-connections".to_string(), "1024".to_string()]);
    let d = Daemon::start_in(&state, &args(&q));
    let log = d.log_text();
    assert!(log.contains("pinned kernel state not adopted"), "{log}");
    assert!(log.contains("Replaced"), "{log}");
    let (took, result) = timed(move || http_get(&local(port), "/slow", Duration::from_secs(10)))
        .join()
        .unwrap();
    assert!(
        result.is_err() && took < Duration::from_millis(1500),
        "{took:?}"
    );
    // Exactly one daemon's programs saw the request: one over-budget event, one kill.
    assert_eq!(
        d.wait_metric(
            "watchdog_actions_total",
            KILLED,
            1.0,
            Duration::from_secs(2)
        ),
        1.0
    );
}

#[test]
fn a_reused_pid_is_never_signalled() {
    let port = free_port();
    let d = Daemon::start(&args(&policy(port, "1s")));
    let mut fixture = Command::new("python3")
        .arg(fixture("pid_reuse.py"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(fixture.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("fixture output").unwrap();
    assert!(next().starts_with("READY"));
    // Request 1: its owner exits mid-request; a child of the owner keeps the connection open.
    let mut first = TcpStream::connect(local(port)).unwrap();
    first
        .write_all(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let gone: u32 = next().strip_prefix("GONE ").unwrap().parse().unwrap();
    let reused = next();
    assert_eq!(
        reused,
        format!("REUSED {gone}"),
        "the kernel did not hand out {gone} again"
    );
    // Request 2: the new process with the same pid serves it (and becomes an owner itself).
    let answer = http_get(&local(port), "/fast", Duration::from_secs(5)).unwrap();
    assert_eq!(answer, "reused\n");
    // Past request 1's deadline, the new process must be untouched.
    std::thread::sleep(Duration::from_millis(2000).saturating_sub(started.elapsed()));
    assert_eq!(
        next(),
        "EXIT 0",
        "the process that reused pid {gone} was signalled"
    );
    assert_eq!(
        d.metric("watchdog_actions_total", &[]),
        0.0,
        "{}",
        d.log_text()
    );
    // The kernel timer did fire for request 1, and found its owner gone.
    assert!(
        d.metric(
            "watchdog_kernel_deadlines_total",
            &[("result", "already_ended")]
        ) >= 1.0
    );
    let _ = fixture.kill();
    let _ = fixture.wait();
    drop(first);
}

/// The resident set of a process, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn overload_counts_what_it_drops_and_recovers() {
    const CONNS: usize = 300;
    const MAX: usize = 256;
    let port = free_port();
    let _server = spawn_ready(
        "hang.py",
        Command::new("python3")
            .arg(fixture("hang.py"))
            .arg(port.to_string()),
    );
    let mut p = policy(port, "300ms");
    p.extend(
        [
            "--observe",
            // The flood's own memory: stack readers (their caches, bounded by
            // BENCHMARKS.md's stacks part) are not what this bounds.
            "--stacks",
            "false",
            "--max-connections",
            &MAX.to_string(),
            "--event-buffer-kib",
            "4",
        ]
        .map(String::from),
    );
    let d = Daemon::start(&args(&p));
    let rss_before = vm_rss_kib(d.proc.pid());
    // More connections than the table holds: the rest are refused tracking, and counted.
    let mut conns: Vec<TcpStream> = (0..CONNS)
        .map(|_| TcpStream::connect(local(port)).unwrap())
        .collect();
    // Whether the idle-connection eviction (a poll every 100 ms) runs during the burst, after
    // it or not before the requests start decides how many are refused and how many dropped:
    // wait for the kernel to have accounted for every connection, whatever the order.
    let counted = |d: &Daemon| {
        let s = d.scrape();
        (
            sum(&s, "watchdog_tracked_connections", &[]),
            sum(
                &s,
                "watchdog_map_evictions_total",
                &[("table", "connections")],
            ),
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || {
            let (tracked, refused) = counted(&d);
            tracked + refused == CONNS as f64
        }),
        "the kernel did not account for all {CONNS} connections: (tracked, refused) {:?}",
        counted(&d)
    );
    let (tracked, evicted) = counted(&d);
    assert!(evicted >= (CONNS - MAX) as f64, "refused {evicted}");
    assert!(tracked >= MAX as f64, "tracked {tracked}");
    // Every connection sends a request that never gets an answer: their deadlines all fall
    // within a few milliseconds, far more events than a 4 KiB ring holds (~36).
    for c in &mut conns {
        c.write_all(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
    }
    // The requests the kernel tracks: those of the connections still in the table (none is
    // idle once its request is in, so eviction drops no more). Every one is counted started.
    let p = port.to_string();
    let mut started = 0.0;
    let mut dropped = 0.0;
    assert!(
        wait_until(Duration::from_secs(5), || {
            dropped = d.metric("watchdog_connections_dropped_total", &[("reason", "idle")]);
            started = d.metric("watchdog_requests_total", &[("port", &p)]);
            started > 0.0 && started == tracked - dropped
        }),
        "requests started {started}, tracked connections {tracked}, dropped idle {dropped}"
    );
    assert!(
        started >= 150.0,
        "too few tracked requests to overflow the ring: {started}"
    );
    // Each tracked request either got its kernel timer, or was marked for the backstop sweep
    // because the timer could not be armed (bpf_timer_init allocates with GFP_ATOMIC; under a
    // burst in a busy memory cgroup it fails with ENOMEM).
    let (mut fired, mut unarmed) = (0.0, 0.0);
    let covered = wait_until(Duration::from_secs(5), || {
        fired = d.metric(
            "watchdog_kernel_deadlines_total",
            &[("result", "in_flight")],
        );
        unarmed = d.metric("watchdog_kernel_timer_errors_total", &[("call", "start")]);
        fired + unarmed >= started
    });
    assert!(
        covered && fired + unarmed == started,
        "every tracked request's deadline is covered: started {started}, timers fired {fired}, unarmed {unarmed}, stale {}",
        d.metric(
            "watchdog_kernel_deadlines_total",
            &[("result", "already_ended")]
        )
    );
    // Far more deadline events than the ring holds: many are lost, and the backstop sweep finds
    // each of those requests (and the unarmed ones) in the connection table. None is missed.
    let seen = d.wait_metric(
        "watchdog_budget_exceeded_total",
        &[],
        started,
        Duration::from_secs(5),
    );
    let lost = d.metric("watchdog_events_lost_total", &[]);
    let recovered = |why| d.metric("watchdog_deadlines_recovered_total", &[("why", why)]);
    assert!(lost > 0.0, "the ring buffer never overflowed");
    assert_eq!(seen, started, "each over-budget request seen once");
    // The backstop's recoveries are counted after the requests are seen: wait for them too.
    assert!(
        wait_until(Duration::from_secs(3), || recovered("event_lost") == lost
            && recovered("timer_unarmed") == unarmed),
        "each lost deadline event ({lost}) and unarmed request ({unarmed}) recovered: {} and {}",
        recovered("event_lost"),
        recovered("timer_unarmed")
    );
    // Recovery: close everything; a new over-budget request is seen again.
    drop(conns);
    assert_eq!(
        d.wait_metric_until(
            "watchdog_tracked_connections",
            &[],
            |v| v == 0.0,
            Duration::from_secs(2)
        ),
        0.0
    );
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.write_all(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(
        d.wait_metric(
            "watchdog_budget_exceeded_total",
            &[],
            seen + 1.0,
            Duration::from_secs(3)
        ),
        seen + 1.0
    );
    // The daemon's memory stays bounded through the flood (the load-time peak of parsing the
    // kernel's BTF is not the flood's).
    let rss = vm_rss_kib(d.proc.pid());
    assert!(
        rss < rss_before + 16 * 1024,
        "daemon RSS grew from {rss_before} to {rss} KiB"
    );
    println!(
        "overload: {tracked} tracked, {evicted} refused, {dropped} dropped idle, {started} started; timers fired {fired}, unarmed {unarmed}, events lost {lost}, seen {seen}, RSS {rss_before} -> {rss} KiB"
    );
}
