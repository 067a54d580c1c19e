//! The kernel hand-off under stress and at its limits: request starts racing the timer callback
//! and the previous answer's send, a full task table, a thread whose tid vanishes through
//! `execve`. Real server (`fixtures/handoff.py`: a reader and a writer thread per connection),
//! real daemon, real signals.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::*;

fn handoff(port: u16, mode: &str) -> Proc {
    spawn_ready(
        "handoff.py",
        Command::new("python3")
            .arg(fixture("handoff.py"))
            .arg(port.to_string())
            .arg(mode),
    )
}

/// Two busy loops (one per core) for the length of a test.
struct Load(Vec<std::process::Child>);

impl Load {
    fn start() -> Load {
        Load(
            (0..2)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .stdout(Stdio::null())
                        .spawn()
                        .unwrap()
                })
                .collect(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads one whole answer (`Content-Length` framed) from `s`, keeping what follows in `buf`.
fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>, first: impl FnOnce()) -> std::io::Result<()> {
    let mut first = Some(first);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return Ok(());
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(f) = first.take() {
            f();
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Thousands of requests over keep-alive connections, each written by one client thread the
/// moment another client thread sees the previous answer's first bytes: the server's reader
/// thread receives the next request while its writer thread's send hook may still run, and the
/// connection's timer (armed for an earlier request) fires during later ones. One in 60 is over
/// its 300 ms budget. With both cores loaded: every over-budget request is acted on (SIGUSR1 to
/// its owning thread), none before its budget, and the kernel counted every start.
#[test]
fn racing_starts_ends_and_timers_lose_no_request() {
    require_root();
    let port = free_port();
    let _server = handoff(port, "");
    // A breaker that never trips within the test: every action counts.
    let dir = tmpdir("handoff-race");
    let cfg = dir.join("watchdog.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[policy]]\nname = \"race\"\nports = [{port}]\nbudget = \"300ms\"\n\
             signal = \"SIGUSR1\"\ntarget = \"thread\"\n\
             breaker = {{ max_actions = 1000, window = \"1m\", cooldown = \"1m\" }}\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let _load = Load::start();
    const CONNS: usize = 8;
    const PER_CONN: usize = 400;
    const SLOW_EVERY: usize = 60;
    let started = Instant::now();
    let clients: Vec<_> = (0..CONNS)
        .map(|c| {
            std::thread::spawn(move || -> (usize, usize) {
                let conn = TcpStream::connect(local(port)).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut rd = conn.try_clone().unwrap();
                let mut wr = conn;
                let (go, wait) = mpsc::channel::<()>();
                let reader = std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    for _ in 0..PER_CONN {
                        let go = go.clone();
                        read_answer(&mut rd, &mut buf, move || {
                            let _ = go.send(());
                        })
                        .unwrap();
                    }
                });
                let mut slow = 0;
                for i in 0..PER_CONN {
                    let path = if (i + c * 7) % SLOW_EVERY == SLOW_EVERY - 1 {
                        slow += 1;
                        "/slow"
                    } else {
                        "/fast"
                    };
                    wr.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                        .unwrap();
                    // The next request goes out as soon as this answer's first bytes are here.
                    wait.recv_timeout(Duration::from_secs(5)).unwrap();
                }
                reader.join().unwrap();
                (PER_CONN, slow)
            })
        })
        .collect();
    let (mut sent, mut slow) = (0, 0);
    for c in clients {
        let (n, s) = c.join().unwrap();
        sent += n;
        slow += s;
    }
    eprintln!("{sent} requests ({slow} slow) in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(20));
    let port_label = port.to_string();
    assert_eq!(
        d.metric("watchdog_requests_total", &[("port", &port_label)]),
        sent as f64,
        "the kernel counted every start, and nothing else"
    );
    assert_eq!(
        d.wait_metric(
            "watchdog_actions_total",
            &[("action", "SIGUSR1"), ("result", "delivered")],
            slow as f64,
            Duration::from_secs(3)
        ),
        slow as f64,
        "every over-budget request acted on, once"
    );
    let records = d.log_events("request over budget");
    assert_eq!(records.len(), slow, "one record per over-budget request");
    for r in &records {
        let elapsed = r["elapsed_ms"].as_u64().unwrap();
        let late = r["lateness_ms"].as_f64().unwrap();
        assert!(elapsed >= 300, "acted on early: {r}");
        assert!((0.0..250.0).contains(&late), "lateness out of bounds: {r}");
    }
    assert_eq!(d.metric("watchdog_kernel_starts_contended_total", &[]), 0.0);
}

/// A task table with room for 64 threads (`--max-connections 64` sizes it), filled by 80
/// threads that each served a request and linger: the next request's owner finds no room. The
/// kernel counts it and flags the request, and the backstop enforces its deadline instead of
/// the timer (SIGUSR1 to that thread, delivered, not before the budget).
#[test]
fn a_full_task_table_is_counted_and_the_backstop_covers_the_request() {
    require_root();
    let port = free_port();
    let _server = handoff(port, "linger");
    let d = Daemon::start(&[
        "--port",
        &port.to_string(),
        "--budget",
        "300ms",
        "--signal",
        "SIGUSR1",
        "--target",
        "thread",
        "--max-connections",
        "64",
    ]);
    for _ in 0..80 {
        let mut c = TcpStream::connect(local(port)).unwrap();
        request(&mut c, "/fast").unwrap();
    }
    let full = d.metric("watchdog_map_evictions_total", &[("table", "tasks")]);
    assert!(full >= 16.0, "the task table filled: {full} refusals");
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let t = Instant::now();
    request(&mut c, "/slow").unwrap();
    assert!(t.elapsed() >= Duration::from_millis(800));
    assert_eq!(
        d.wait_metric(
            "watchdog_actions_total",
            &[("action", "SIGUSR1"), ("result", "delivered")],
            1.0,
            Duration::from_secs(3)
        ),
        1.0,
        "the backstop acted on the request the timer could not cover"
    );
    assert_eq!(
        d.metric("watchdog_map_evictions_total", &[("table", "tasks")]),
        full + 1.0
    );
    let r = &d.log_events("request over budget")[0];
    assert!(r["elapsed_ms"].as_u64().unwrap() >= 300, "{r}");
    assert_eq!(
        d.metric(
            "watchdog_kernel_deadlines_total",
            &[("result", "in_flight")]
        ),
        0.0,
        "no kernel timer covered it"
    );
}

/// A non-leader thread reads a request, then execs: its tid is gone without an exit. The kernel
/// moves its life and its current request to the id it has now (the process's), so the old tid
/// matches nothing any more, and the request, still in flight on the open connection, is
/// enforced at its deadline on the thread it became (`sleep`).
#[test]
fn a_thread_that_execs_hands_its_request_to_the_thread_it_became() {
    require_root();
    let port = free_port();
    let server = handoff(port, "");
    let d = Daemon::start(&[
        "--port",
        &port.to_string(),
        "--budget",
        "300ms",
        "--signal",
        "SIGUSR1",
        "--target",
        "thread",
    ]);
    let port_label = port.to_string();
    let mut c = TcpStream::connect(local(port)).unwrap();
    let sent = Instant::now();
    c.write_all(b"GET /exec HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(
        d.wait_metric(
            "watchdog_kernel_tasks_execed_total",
            &[],
            1.0,
            Duration::from_secs(3)
        ),
        1.0,
        "the exec'ing thread left the task table"
    );
    assert_eq!(
        d.metric("watchdog_requests_total", &[("port", &port_label)]),
        1.0,
        "the kernel saw the request"
    );
    // The process is `sleep` now, its connection still open with the request in flight.
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", server.pid())).unwrap();
    assert_eq!(comm.trim(), "sleep");
    // (The fixture blocks SIGUSR1, and `sleep` inherited the mask: the record tells.)
    let acted = d.log_events("request over budget");
    let took = sent.elapsed();
    assert!(
        acted.iter().any(|r| r["result"] == "delivered"
            && r["tid"] == server.pid()
            && r["comm"] == "sleep"),
        "delivered to the new tid (the process's id), now `sleep`: {acted:?}"
    );
    let elapsed = acted[0]["elapsed_ms"].as_u64().unwrap();
    assert!(
        (300..800).contains(&elapsed) && took < Duration::from_secs(3),
        "at its deadline: {elapsed} ms"
    );
    assert_eq!(
        d.metric(
            "watchdog_kernel_deadlines_total",
            &[("result", "in_flight")]
        ),
        1.0,
        "the kernel's own timer fired for it"
    );
}
