//! Part 4: how late the watchdog acts after a deadline, measured by the daemon (due → signal
//! sent) and independently by the client (request sent → connection closed by the dying worker,
//! minus the budget), with 2×, 6× and 12× as many workers spinning at once as there are CPUs
//! (the over-budget requests are CPU loops); then the same slow handler under uWSGI
//! `--harakiri`, gunicorn `--timeout` and the watchdog with the same 1 s budget, in alternating
//! waves.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use super::{distribution, spawn_server, wait_port, Daemon, Plan};
use crate::{
    harness::{free_port, metric},
    root,
};

/// Servers of the 500 ms distribution, and workers each: room for 12 spinning workers per CPU
/// on two CPUs, each request on a worker of its own.
const SERVERS: usize = 4;
const WORKERS: usize = 6;
/// Spinning workers per CPU at each load level.
const PER_CPU: [usize; 3] = [2, 6, 12];
/// Workers of the 1 s peers.
const PEER_WORKERS: usize = 4;

pub fn run(plan: &Plan, work: &Path) -> Result<Value> {
    let dir = work.join("lateness");
    std::fs::create_dir_all(&dir)?;
    let venv = gunicorn_venv()?;
    let app = root().join("watchdog/tests/fixtures/app.py");

    // Pre-fork servers for the 500 ms distribution. Their workers note
    // when each request's head was read, for the measure that does not rely on the daemon.
    let times = dir.join("app-times.txt");
    let ports: Vec<u16> = (0..SERVERS).map(|_| free_port()).collect::<Result<_>>()?;
    let _apps = ports
        .iter()
        .map(|p| {
            spawn_server(
                Command::new("python3")
                    .arg(&app)
                    .arg(p.to_string())
                    .arg(WORKERS.to_string())
                    .env("APP_TIMES", &times),
                "READY",
            )
        })
        .collect::<Result<Vec<_>>>()?;

    // The peers: one slow WSGI handler under uWSGI, under gunicorn, and under gunicorn with its
    // own timeout out of the way and the watchdog enforcing the same 1 s.
    std::fs::write(dir.join("slow_wsgi.py"), SLOW_WSGI)?;
    let (uwsgi_port, gunicorn_port, watched_port) = (free_port()?, free_port()?, free_port()?);
    let _uwsgi = spawn_server(
        Command::new("sh").arg("-c").arg(format!(
            "echo ready; exec uwsgi --plugin python3 --http-socket 127.0.0.1:{uwsgi_port} \
             --wsgi-file {d}/slow_wsgi.py --processes {PEER_WORKERS} --master --harakiri 1 \
             --logto {d}/uwsgi.log",
            d = dir.display()
        )),
        "ready",
    )?;
    let gunicorn = |port: u16, timeout: u32, log: &str| {
        spawn_server(
            Command::new("sh").arg("-c").arg(format!(
                "echo ready; exec {venv}/bin/gunicorn -w {PEER_WORKERS} --timeout {timeout} \
                 -b 127.0.0.1:{port} --control-socket {d}/{log}.ctl --chdir {d} slow_wsgi:app >{d}/{log} 2>&1",
                venv = venv.display(),
                d = dir.display()
            )),
            "ready",
        )
    };
    let _gunicorn = gunicorn(gunicorn_port, 1, "gunicorn.log")?;
    let _watched = gunicorn(watched_port, 30, "gunicorn-watched.log")?;
    for p in ports
        .iter()
        .chain(&[uwsgi_port, gunicorn_port, watched_port])
    {
        wait_port(*p)?;
    }

    let list = |ps: &[u16]| ps.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    // These kill rates are the benchmark's normal: keep the kill-rate breaker out of the way.
    // The enforcement path alone: reading the owners' stacks first (on by default) is measured
    // by its own part (stacks.rs), on and off side by side; every daemon here has `stacks = false`.
    let policies = format!(
        "[[policy]]\nname = \"bench-500ms\"\nports = [{}]\nbudget = \"500ms\"\nsignal = \"SIGKILL\"\n\
         breaker = {{ max_actions = 100000, window = \"1m\", cooldown = \"1s\" }}\n\n\
         [[policy]]\nname = \"bench-1s\"\nports = [{watched_port}]\nbudget = \"1s\"\nsignal = \"SIGKILL\"\n\
         breaker = {{ max_actions = 100000, window = \"1m\", cooldown = \"1s\" }}\n",
        list(&ports)
    );
    // The daemon as shipped: its acting thread in SCHED_FIFO (root has CAP_SYS_NICE).
    let daemon = Daemon::start(
        work,
        "lateness",
        &format!("[daemon]\nstacks = false\n\n{policies}"),
        &[],
    )?;
    let realtime = metric(&daemon.metrics, "watchdog_acting_thread_realtime")?;

    // 500 ms: at each load level, waves of `spinning` requests spread over the servers, all
    // sent at once, so that that many workers spin together until they are killed.
    let budget = Duration::from_millis(500);
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    ensure!(
        PER_CPU.iter().max().copied().unwrap_or(0) * cpus <= SERVERS * WORKERS,
        "{cpus} CPUs need more workers than {SERVERS} servers × {WORKERS}"
    );
    let mut levels = Vec::new();
    let mut seen = 0;
    for per_cpu in PER_CPU {
        let spinning = per_cpu * cpus;
        let (samples, late) = level(&daemon, &ports, spinning, plan.slow_requests, &mut seen)?;
        levels.push(("fifo".to_string(), per_cpu, spinning, samples, late));
    }

    // 1 s, side by side: one wave to each system in turn.
    let second = Duration::from_secs(1);
    let (mut uwsgi, mut gunicorn_1s, mut watched) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.peer_requests.div_ceil(PEER_WORKERS) {
        for (port, out) in [
            (uwsgi_port, &mut uwsgi),
            (gunicorn_port, &mut gunicorn_1s),
            (watched_port, &mut watched),
        ] {
            out.extend(
                wave(&[port; PEER_WORKERS], true)?
                    .iter()
                    .map(|s| s.late_after_send(second)),
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    drop(daemon);

    // What the realtime class earns: the 6× level again with the acting thread in the normal
    // class, at nice -20 (needs CAP_SYS_NICE too) and at nice 0 (a daemon without it).
    for (class, nice) in [("nice-20", -20), ("nice0", 0)] {
        let config =
            format!("[daemon]\nstacks = false\nacting_priority = 0\nnice = {nice}\n\n{policies}");
        let d = Daemon::start(work, &format!("lateness-{class}"), &config, &[])?;
        let spinning = 6 * cpus;
        let mut seen = 0;
        let (samples, late) = level(&d, &ports, spinning, plan.slow_requests, &mut seen)?;
        levels.push((class.to_string(), 6, spinning, samples, late));
    }

    // Independent of the daemon: the worker read the request at `start`, the client saw the
    // connection close at `closed`, both on CLOCK_MONOTONIC.
    let started: std::collections::HashMap<u16, f64> = std::fs::read_to_string(&times)?
        .lines()
        .filter_map(|l| {
            let (port, t) = l.split_once(' ')?;
            Some((port.parse().ok()?, t.parse().ok()?))
        })
        .collect();
    let mut by_level = Vec::new();
    for (class, per_cpu, spinning, samples, (daemon_ms, timer_ms)) in &levels {
        let client: Vec<f64> = samples
            .iter()
            .map(|s| {
                let start = started
                    .get(&s.port)
                    .with_context(|| format!("no start noted for client port {}", s.port))?;
                Ok((s.closed - start - budget.as_secs_f64()) * 1e3)
            })
            .collect::<Result<_>>()?;
        let from_send: Vec<f64> = samples.iter().map(|s| s.late_after_send(budget)).collect();
        ensure!(
            daemon_ms.len() == client.len(),
            "at {spinning} spinning workers the daemon acted {} times on {} over-budget requests",
            daemon_ms.len(),
            client.len()
        );
        by_level.push(json!({
            "class": class,
            "per_cpu": per_cpu,
            "spinning": spinning,
            "daemon": distribution(daemon_ms),
            "timer": distribution(timer_ms),
            "client": distribution(&client),
            "client_from_send": distribution(&from_send),
        }));
    }
    // The 6× level is the one the figures and the earlier runs show.
    let six = by_level
        .iter()
        .find(|l| l["per_cpu"] == 6 && l["class"] == "fifo")
        .cloned()
        .unwrap_or(Value::Null);
    Ok(json!({
        "servers": SERVERS,
        "workers": WORKERS,
        "cpus": cpus,
        "concurrent": six["spinning"],
        "acting_realtime": realtime,
        "levels": by_level,
        "peer_requests": watched.len(),
        "watchdog": six,
        "watchdog_1s": distribution(&watched),
        "uwsgi": distribution(&uwsgi),
        "gunicorn": distribution(&gunicorn_1s),
    }))
}

/// The daemon's lateness figures of a level (ms), and the kernel timer's part of each.
type Late = (Vec<f64>, Vec<f64>);

/// `n` over-budget requests in waves of `spinning` at once, spread over the servers: the
/// samples as the clients saw them, and the daemon's own lateness figures for them with the
/// kernel timer's part of each (its event file from `seen` on).
fn level(
    daemon: &Daemon,
    ports: &[u16],
    spinning: usize,
    n: usize,
    seen: &mut usize,
) -> Result<(Vec<Sample>, Late)> {
    let mut samples = Vec::new();
    for _ in 0..n.div_ceil(spinning) {
        let targets: Vec<u16> = (0..spinning).map(|i| ports[i % ports.len()]).collect();
        samples.extend(wave(&targets, false)?);
        // The servers re-fork the killed workers; let them get back to accept().
        std::thread::sleep(Duration::from_millis(300));
    }
    // The records are written just after the actions.
    std::thread::sleep(Duration::from_millis(200));
    let events = daemon.events()?;
    let mine: Vec<&Value> = events[*seen..]
        .iter()
        .filter(|e| e["policy"] == "bench-500ms")
        .collect();
    let daemon_ms = mine
        .iter()
        .filter_map(|e| e["lateness_ms"].as_f64())
        .collect();
    // The kernel's part of each: its timer callback's delay after the due instant.
    let timer_ms = mine.iter().filter_map(|e| e["timer_ms"].as_f64()).collect();
    *seen = events.len();
    Ok((samples, (daemon_ms, timer_ms)))
}

/// The handler all three 1 s peers run: a CPU loop that ignores every cooperative timeout.
const SLOW_WSGI: &str = r#"import time

def app(environ, start_response):
    if environ.get("PATH_INFO") == "/slow":
        t = time.monotonic()
        while time.monotonic() - t < 100:
            pass
    start_response("200 OK", [("Content-Length", "3")])
    return [b"ok\n"]

application = app  # the name uWSGI looks for
"#;

/// One over-budget request as its client saw it, in CLOCK_MONOTONIC seconds.
pub(super) struct Sample {
    /// The client's local port (the server notes it with the request's start).
    port: u16,
    sent: f64,
    closed: f64,
}

impl Sample {
    /// How long after `budget` from sending the request the server ended it (ms).
    fn late_after_send(&self, budget: Duration) -> f64 {
        (self.closed - self.sent - budget.as_secs_f64()) * 1e3
    }
}

fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Sends `GET /slow` on one new connection per entry of `ports`, all at once, and waits for
/// the server to close each. With `answer_ok`, an answer also ends the wait: gunicorn's timeout
/// aborts the handler and answers 500.
pub(super) fn wave(ports: &[u16], answer_ok: bool) -> Result<Vec<Sample>> {
    let threads: Vec<_> = ports
        .iter()
        .map(|&port| {
            std::thread::spawn(move || -> Result<Sample> {
                // The measuring thread must not itself wait behind the spinning workers to see
                // the close: the highest niceness, for this thread only (Linux niceness is
                // per thread).
                // SAFETY: setpriority on the calling thread; no memory is involved.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -20) };
                let mut c = TcpStream::connect(("127.0.0.1", port))?;
                c.set_read_timeout(Some(Duration::from_secs(30)))?;
                let local = c.local_addr()?.port();
                let sent = monotonic();
                c.write_all(b"GET /slow HTTP/1.1\r\nHost: bench\r\n\r\n")?;
                let mut buf = [0u8; 512];
                match c.read(&mut buf) {
                    Ok(0) => {}
                    Ok(_) if answer_ok => {}
                    Ok(n) => anyhow::bail!(
                        "port {port} answered a request it should have killed: {:?}",
                        String::from_utf8_lossy(&buf[..n])
                    ),
                    // A reset is as good as a close: the worker is gone.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                    Err(e) => return Err(e).context(format!("waiting on port {port}")),
                }
                Ok(Sample {
                    port: local,
                    sent,
                    closed: monotonic(),
                })
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect()
}

/// A venv under target/ with gunicorn from PyPI (Debian's is older than the one people run).
fn gunicorn_venv() -> Result<std::path::PathBuf> {
    let venv = root().join("target/bench-venv");
    if !venv.join("bin/gunicorn").exists() {
        crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        crate::run(Command::new(venv.join("bin/pip")).args(["install", "-q", "gunicorn"]))?;
    }
    Ok(venv)
}
