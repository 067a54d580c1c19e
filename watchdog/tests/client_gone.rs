//! Issue 8: the caller hung up (nginx gave up with a 504): stop the worker at once; never hit a
//! half-closed client; never start a kill spiral.

mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use common::*;

fn nginx(listen: u16, backend: u16) -> Proc {
    let dir = tmpdir(&format!("nginx{listen}"));
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n\
               server {{ listen 127.0.0.1:{listen};\n\
                 location / {{ proxy_pass http://127.0.0.1:{backend}; proxy_read_timeout 1s; }} }} }}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let script = format!(
        "/usr/sbin/nginx -c {} & until (exec 3<>/dev/tcp/127.0.0.1/{listen}) 2>/dev/null; do sleep 0.05; done; echo READY; wait",
        conf.display()
    );
    spawn_ready("nginx", Command::new("bash").arg("-c").arg(script))
}

fn haproxy(listen: u16, backend: u16) -> Proc {
    let dir = tmpdir(&format!("haproxy{listen}"));
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "defaults\n  mode http\n  timeout connect 1s\n  timeout client 10s\n  timeout server 1s\n\
             frontend f\n  bind 127.0.0.1:{listen}\n  default_backend b\n\
             backend b\n  server s1 127.0.0.1:{backend}\n"
        ),
    )
    .unwrap();
    let script = format!(
        "/usr/sbin/haproxy -db -f {} & until (exec 3<>/dev/tcp/127.0.0.1/{listen}) 2>/dev/null; do sleep 0.05; done; echo READY; wait",
        conf.display()
    );
    spawn_ready("haproxy", Command::new("bash").arg("-c").arg(script))
}

#[test]
fn worker_dies_when_nginx_gives_up_not_at_the_budget() {
    proxy_gives_up(nginx);
}

#[test]
fn worker_dies_when_haproxy_gives_up_not_at_the_budget() {
    proxy_gives_up(haproxy);
}

fn proxy_gives_up(proxy: fn(u16, u16) -> Proc) {
    let backend = free_port();
    let front = free_port();
    let dir = tmpdir(&format!("cg{front}"));
    let log = dir.join("app.log");
    let _app = app(backend, 2, &[("APP_LOG", log.to_str().unwrap())]);
    let _proxy = proxy(front, backend);
    let d = Daemon::start(&[
        "--port",
        &backend.to_string(),
        "--budget",
        "30s",
        "--client-gone",
        "SIGKILL",
    ]);
    let t = Instant::now();
    let mut s = TcpStream::connect(local(front)).unwrap();
    s.write_all(b"GET /slow HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let gave_up = t.elapsed();
    assert!(
        resp.starts_with("HTTP/1.1 504") || resp.starts_with("HTTP/1.0 504"),
        "{resp}"
    );
    assert!(
        gave_up >= Duration::from_millis(1000) && gave_up < Duration::from_millis(1500),
        "{gave_up:?}"
    );
    let worker: i32 = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .find(|l| l.ends_with("/slow"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The worker is gone within a few milliseconds of nginx closing the upstream connection.
    let end = Instant::now() + Duration::from_millis(500);
    while std::path::Path::new(&format!("/proc/{worker}/cmdline")).exists()
        && std::fs::read_to_string(format!("/proc/{worker}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            Instant::now() < end,
            "worker {worker} still alive 500 ms after the 504"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let dead_after = t.elapsed() - gave_up;
    eprintln!("worker dead {dead_after:?} after the 504 reached the client");
    // The action's metrics are the reporter thread's: they follow the signal by a moment.
    assert_eq!(
        d.wait_metric(
            "watchdog_actions_total",
            &[("reason", "client_gone"), ("result", "delivered")],
            1.0,
            Duration::from_secs(2)
        ),
        1.0
    );
    assert_eq!(d.metric("watchdog_client_gone_total", &[]), 1.0);
    assert!(http_get(&local(backend), "/fast", Duration::from_secs(2))
        .unwrap()
        .starts_with("fast"));
}

#[test]
fn half_closed_client_waiting_for_a_legit_answer_is_not_hit() {
    let port = free_port();
    let _app = app(port, 1, &[]);
    // A 1 s window (the default is 100 ms) so that a loaded machine still half-closes inside it.
    let cfg = tmpdir("half-close").join("watchdog.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[policy]]\nname = \"api\"\nports = [{port}]\nbudget = \"30s\"\n\
             client_gone = {{ signal = \"SIGKILL\", half_close_window = \"1s\" }}\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.write_all(b"GET /wait?ms=1500 HTTP/1.1\r\n\r\n").unwrap();
    // Half-close once the worker has read the request (the kernel counts it in flight), so the
    // FIN reaches the daemon as a client-gone event inside the window: a FIN before the worker
    // reads never leaves the kernel and would test nothing here.
    let sent = Instant::now();
    let port_label = port.to_string();
    assert!(
        wait_until(Duration::from_millis(500), || d
            .metric("watchdog_requests_in_flight", &[("port", &port_label)])
            == 1.0),
        "the request was not in flight within 500 ms"
    );
    s.shutdown(Shutdown::Write).unwrap();
    assert!(
        sent.elapsed() < Duration::from_millis(1000),
        "half-closed {:?} after the request: outside the window this test is about",
        sent.elapsed()
    );
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("waited 1500"), "{resp}");
    // The kernel tracked the request to its answer, and the FIN reached the daemon while it was
    // in flight: the half-close window, not blindness, is why nothing was done.
    assert_eq!(
        d.wait_metric(
            "watchdog_requests_total",
            &[("port", &port.to_string())],
            1.0,
            Duration::from_secs(1)
        ),
        1.0
    );
    assert_eq!(
        d.log_events("FIN right after the request: a half-close, not a hang-up")
            .len(),
        1,
        "{}",
        d.log_text()
    );
    assert_eq!(d.metric("watchdog_client_gone_total", &[]), 0.0);
    assert_eq!(d.metric("watchdog_actions_total", &[]), 0.0);
}

#[test]
fn breaker_stops_a_kill_spiral_and_rearms() {
    let port = free_port();
    let dir = tmpdir("breaker");
    let _app = app(port, 4, &[]);
    let cfg = dir.join("watchdog.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[policy]]\nname = \"api\"\nports = [{port}]\nbudget = \"500ms\"\nsignal = \"SIGKILL\"\n\
             breaker = {{ max_actions = 2, window = \"1m\", cooldown = \"3s\" }}\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let sent = Instant::now();
    let slows: Vec<_> = (0..4)
        .map(|_| timed(move || http_get(&local(port), "/slow", Duration::from_millis(2000))))
        .collect();
    let results: Vec<_> = slows.into_iter().map(|h| h.join().unwrap().1).collect();
    let killed = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock)
        })
        .count();
    assert_eq!(killed, 2, "only max_actions workers die: {results:?}");
    let labels = [("policy", "api")];
    assert_eq!(
        d.metric("watchdog_actions_total", &[("result", "delivered")]),
        2.0
    );
    assert_eq!(
        d.metric("watchdog_actions_total", &[("result", "observed")]),
        2.0
    );
    assert_eq!(d.metric("watchdog_breaker_trips_total", &labels), 1.0);
    assert_eq!(d.metric("watchdog_policy_observe_only", &labels), 1.0);
    assert!(d.log_text().contains("CIRCUIT BREAKER OPEN"));
    // After the cool-down the policy enforces again: the breaker tripped at the third deadline
    // (500 ms after the requests were sent), so it re-arms 3 s later, at the next 1 s
    // housekeeping tick.
    assert_eq!(
        d.wait_metric_until(
            "watchdog_policy_observe_only",
            &labels,
            |v| v == 0.0,
            Duration::from_secs(5)
        ),
        0.0
    );
    let rearmed = sent.elapsed();
    assert!(
        rearmed >= Duration::from_millis(3500) && rearmed < Duration::from_millis(5000),
        "re-armed {rearmed:?} after the requests were sent"
    );
    let (took, r) = timed(move || http_get(&local(port), "/slow", Duration::from_secs(5)))
        .join()
        .unwrap();
    assert!(
        r.is_err() && took < Duration::from_millis(1200),
        "{took:?} {r:?}"
    );
    assert_eq!(
        d.wait_metric(
            "watchdog_actions_total",
            &[("result", "delivered")],
            3.0,
            Duration::from_secs(2)
        ),
        3.0
    );
    assert_eq!(d.metric("watchdog_policy_observe_only", &labels), 0.0);
}
