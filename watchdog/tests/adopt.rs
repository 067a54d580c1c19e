//! Issue 31: a policy covers the connections that already exist. Connections opened before the
//! daemon started (or before a reload watched their port) are adopted by the TCP socket
//! iterator and enforced from their next request; nothing on an unwatched port is adopted.
//! Run in both probe-set stages (`WATCHDOG_PROBES`).

mod common;

use std::{
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use common::*;

const KILLED: &[(&str, &str)] = &[("action", "SIGKILL"), ("result", "delivered")];

/// A keep-alive connection to `port`, one request answered on it (the server holds it).
fn open_keep_alive(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    assert!(request(&mut s, "/fast").unwrap().starts_with("fast"));
    s
}

/// `GET /slow` on `s`, timed: the server is killed at the budget, so the read fails.
fn slow_is_cut_at_one_second(d: &Daemon, mut s: TcpStream) {
    let t = Instant::now();
    let r = request(&mut s, "/slow");
    let took = t.elapsed();
    assert!(
        r.is_err(),
        "the slow request should have been cut off: {r:?}"
    );
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1300),
        "killed after {took:?}\n{}",
        d.log_text()
    );
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

fn adopted(d: &Daemon, port: u16) -> f64 {
    d.metric(
        "watchdog_connections_adopted_total",
        &[("port", &port.to_string())],
    )
}

#[test]
fn a_keep_alive_connection_opened_before_the_daemon_is_killed_at_its_budget() {
    let port = free_port();
    let _app = app(port, 2, &[]);
    let old = open_keep_alive(port);
    let d = Daemon::start(&[
        "--port",
        &port.to_string(),
        "--budget",
        "1s",
        "--signal",
        "SIGKILL",
        "--target",
        "process",
    ]);
    assert_eq!(adopted(&d, port), 1.0, "{}", d.log_text());
    assert!(
        d.log_text()
            .contains("start: adopted 1 established connections on watched ports"),
        "{}",
        d.log_text()
    );
    let st = d.status_json();
    assert_eq!(st["connections"]["adopted_idle"], 1, "{st}");
    assert_eq!(st["connections"]["tracked"], 1, "{st}");
    slow_is_cut_at_one_second(&d, old);
    assert_eq!(
        d.metric(
            "watchdog_budget_exceeded_total",
            &[("port", &port.to_string())]
        ),
        1.0
    );
    let line = &d.log_events("request over budget")[0];
    assert_eq!(line["port"], port);
    assert_eq!(line["comm"], "python3");
}

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let tmp = dir.join("watchdog.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    let path = dir.join("watchdog.toml");
    std::fs::rename(&tmp, &path).unwrap();
    path
}

#[test]
fn a_reload_that_watches_a_new_port_adopts_its_open_connections() {
    let (first, second) = (free_port(), free_port());
    let dir = tmpdir("adopt-reload");
    let _a = app(first, 2, &[]);
    let _b = app(second, 2, &[]);
    let policy = |ports: &str| {
        format!("[[policy]]\nname = \"api\"\nports = [{ports}]\nbudget = \"1s\"\nsignal = \"SIGKILL\"\ntarget = \"process\"\n")
    };
    let cfg = write_config(&dir, &policy(&first.to_string()));
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    // Opened while only `first` is watched: not tracked yet.
    let old = open_keep_alive(second);
    assert_eq!(d.metric("watchdog_tracked_connections", &[]), 0.0);
    write_config(&dir, &policy(&format!("{first}, {second}")));
    let _ = Command::new("kill")
        .args(["-HUP", &d.proc.pid().to_string()])
        .status();
    assert_eq!(
        d.wait_metric(
            "watchdog_config_reloads_total",
            &[("result", "success")],
            1.0,
            Duration::from_secs(3)
        ),
        1.0
    );
    assert_eq!(
        d.wait_metric(
            "watchdog_connections_adopted_total",
            &[("port", &second.to_string())],
            1.0,
            Duration::from_secs(2)
        ),
        1.0,
        "{}",
        d.log_text()
    );
    assert_eq!(adopted(&d, first), 0.0);
    slow_is_cut_at_one_second(&d, old);
}

fn nginx_pooled(listen: u16, backend: u16) -> Proc {
    let dir = tmpdir(&format!("nginx-pool{listen}"));
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n\
               upstream be {{ server 127.0.0.1:{backend}; keepalive 8; }}\n\
               server {{ listen 127.0.0.1:{listen};\n\
                 location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
                   proxy_read_timeout 10s; proxy_next_upstream off; }} }} }}\n",
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

#[test]
fn nginx_upstream_pool_warmed_before_the_daemon_is_enforced() {
    let (front, backend) = (free_port(), free_port());
    // One worker: the pooled connection holds it, so a request the backend answers at all
    // came over the pooled connection (a new one would wait in the backlog).
    let _app = app(backend, 1, &[]);
    let _nginx = nginx_pooled(front, backend);
    for _ in 0..3 {
        assert!(http_get(&local(front), "/fast", Duration::from_secs(3))
            .unwrap()
            .starts_with("fast"));
    }
    let d = Daemon::start(&[
        "--port",
        &backend.to_string(),
        "--budget",
        "1s",
        "--signal",
        "SIGKILL",
        "--target",
        "process",
    ]);
    assert_eq!(adopted(&d, backend), 1.0, "{}", d.log_text());
    // The front port is not watched: the client's connections to nginx are not adopted.
    assert_eq!(adopted(&d, front), 0.0);
    let t = Instant::now();
    let r = http_get(&local(front), "/slow", Duration::from_secs(6));
    let took = t.elapsed();
    // nginx answers 502 when its upstream connection dies under the killed worker (and does
    // not retry the request on a new connection: `proxy_next_upstream off`).
    assert!(
        matches!(&r, Ok(body) if body.contains("502")),
        "nginx should answer 502: {r:?}"
    );
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1300),
        "killed after {took:?}\n{}",
        d.log_text()
    );
    assert_eq!(
        d.wait_metric(
            "watchdog_actions_total",
            KILLED,
            1.0,
            Duration::from_secs(2)
        ),
        1.0
    );
    assert_eq!(
        d.metric("watchdog_requests_total", &[("port", &backend.to_string())]),
        1.0,
        "the slow request was the first request the kernel saw on the backend port"
    );
}

#[test]
fn connections_on_unwatched_ports_are_not_adopted() {
    let (watched, other) = (free_port(), free_port());
    let _a = app(watched, 2, &[]);
    let _b = app(other, 4, &[]);
    let mut w = open_keep_alive(watched);
    let mut others: Vec<TcpStream> = (0..3).map(|_| open_keep_alive(other)).collect();
    let d = Daemon::start(&[
        "--port",
        &watched.to_string(),
        "--budget",
        "5s",
        "--signal",
        "SIGKILL",
        "--target",
        "process",
    ]);
    let s = d.scrape();
    assert_eq!(sum(&s, "watchdog_connections_adopted_total", &[]), 1.0);
    assert_eq!(adopted(&d, watched), 1.0);
    assert_eq!(sum(&s, "watchdog_tracked_connections", &[]), 1.0);
    // Requests on every connection: the kernel sees the watched one's, and only it.
    assert!(request(&mut w, "/fast").unwrap().starts_with("fast"));
    for o in &mut others {
        assert!(request(o, "/fast").unwrap().starts_with("fast"));
    }
    assert_eq!(
        d.wait_metric(
            "watchdog_requests_total",
            &[("port", &watched.to_string())],
            1.0,
            Duration::from_secs(2)
        ),
        1.0
    );
    let s = d.scrape();
    assert_eq!(sum(&s, "watchdog_requests_total", &[]), 1.0);
    assert_eq!(sum(&s, "watchdog_tracked_connections", &[]), 1.0);
    let st = d.status_json();
    assert_eq!(st["connections"]["tracked"], 1, "{st}");
    assert_eq!(st["connections"]["adopted_idle"], 0, "{st}");
    // An adopted connection's close is seen (no sock_ops state callback was asked for it).
    drop(w);
    assert_eq!(
        d.wait_metric_until(
            "watchdog_tracked_connections",
            &[],
            |v| v == 0.0,
            Duration::from_secs(2)
        ),
        0.0
    );
}

/// A `grpc_pair.py held` client: its channel is open (one call answered) when this returns;
/// a line on its stdin makes it run the calls.
fn grpc_held_client(port: u16, slow_ms: u32, n: u32, every_ms: u32) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new("python3")
        .arg(fixture("grpc_pair.py"))
        .args([
            "held",
            &port.to_string(),
            &slow_ms.to_string(),
            &n.to_string(),
            &every_ms.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.as_mut().unwrap());
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("READY"), "grpc client: {line:?}");
    child
}

/// Runs the held client's calls; its JSON lines.
fn grpc_run(mut child: std::process::Child) -> Vec<serde_json::Value> {
    use std::io::Write;
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "grpc client failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A known limit, shown as it is: an HTTP/2 connection is recognised by the client's preface
/// (`PRI * HTTP/2.0`), which an adopted gRPC channel sent long before. Its next bytes are frames
/// (HEADERS of the next call), so the kernel classifies it as `other` and follows it as one
/// connection-level request per read-until-write: every fast call's answer ends the "request"
/// the slow call started, and the 1.5 s call is never over the 1 s budget. No stream is started.
/// (The same calls on a channel opened after the daemon: `grpc.rs`, caught per stream.)
/// The fix would be in `request.rs` `start_request`: on an adopted socket's first request
/// (gen 1, `SOCK_ADOPTED`), a head that parses as an HTTP/2 frame header (length <= 16384,
/// known type, reserved bit clear; HEADERS on an odd stream or a stream-0 control frame)
/// classified as HTTP/2 and walked from offset 0 instead of after the preface.
#[test]
fn a_grpc_channel_opened_before_the_daemon_is_not_followed_per_stream() {
    let port = free_port();
    let _server = spawn_ready(
        "grpc_pair.py server",
        Command::new("python3").arg(fixture("grpc_pair.py")).args([
            "server",
            &port.to_string(),
            "4",
        ]),
    );
    // The channel is open, one call answered on it, before the daemon starts.
    let client = grpc_held_client(port, 1500, 12, 100);
    let dir = tmpdir("adopt-grpc");
    let cfg = write_config(
        &dir,
        &format!(
            "[[policy]]\nname = \"grpc\"\nports = [{port}]\nbudget = \"1s\"\n\
             steps = [{{ after = \"1s\", action = \"log\" }}]\n"
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(adopted(&d, port), 1.0, "{}", d.log_text());
    // One 1.5 s call and beside it 12 fast calls, one every 100 ms, on the adopted channel.
    let calls = grpc_run(client);
    assert_eq!(calls.len(), 13, "{calls:?}");
    assert!(calls.iter().all(|c| c["ok"] == true), "log only: {calls:?}");
    let p = port.to_string();
    // The kernel saw the connection's traffic, as requests of a connection of protocol `other`...
    assert!(
        d.metric("watchdog_requests_total", &[("port", &p)]) >= 13.0,
        "{}",
        d.log_text()
    );
    assert_eq!(
        d.metric(
            "watchdog_connections_total",
            &[("port", &p), ("protocol", "other")]
        ),
        1.0
    );
    assert_eq!(
        d.metric(
            "watchdog_connections_total",
            &[("port", &p), ("protocol", "http2")]
        ),
        0.0
    );
    // ...not as streams, and the slow call was never over budget.
    let s = d.scrape();
    assert_eq!(sum(&s, "watchdog_http2_streams_total", &[]), 0.0);
    assert_eq!(sum(&s, "watchdog_budget_exceeded_total", &[]), 0.0);
    assert!(d.log_events("request over budget").is_empty());
}
