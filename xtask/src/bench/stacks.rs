//! Part 6: what reading the owner's stacks before the first action costs (`cargo xtask bench
//! --only stacks`): capture time per record (the Python stack and the native frames read side
//! by side), the first record of a fresh daemon and the later ones; the daemon-measured
//! lateness with stacks on (the default 20 ms limit) and off, in alternating blocks; the
//! daemon's RSS before and after many captures.
//!
//! The server is the pre-fork test app (stdlib Python). Capture and lateness turns kill workers
//! in a CPU loop (`GET /slow`, SIGKILL); the RSS turn runs in observe mode on requests that
//! answer a little after their budget (`/wait?ms=N`), so the workers live and one daemon sees
//! every capture.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::{distribution, lateness, spawn_server, wait_port, Daemon, Plan};
use crate::{
    harness::{free_port, rss_kib},
    root,
};

const WORKERS: usize = 4;
const BREAKER: &str = "breaker = { max_actions = 100000, window = \"1m\", cooldown = \"1s\" }\n";

/// How many captures the RSS turn makes, and how many capture (fresh daemon) turns run.
fn sizes(plan: &Plan) -> (usize, usize) {
    if plan.rounds <= 1 {
        (40, 2)
    } else {
        (1_000, 6)
    }
}

pub fn run(plan: &Plan, work: &Path) -> Result<Value> {
    let port = free_port()?;
    let _app = spawn_server(
        std::process::Command::new("python3")
            .arg(root().join("watchdog/tests/fixtures/app.py"))
            .arg(port.to_string())
            .arg(WORKERS.to_string()),
        "READY",
    )?;
    wait_port(port)?;
    let (captures, turns) = sizes(plan);
    let kill = |stacks: &str| {
        format!(
            "[daemon]\n{stacks}\n\n[[policy]]\nname = \"py\"\nports = [{port}]\nbudget = \"500ms\"\n\
             signal = \"SIGKILL\"\n{BREAKER}"
        )
    };

    // Capture times, with a limit (1 s) that lets every read finish: what a read takes.
    let (mut first, mut later, mut stopped) = (Vec::new(), Vec::new(), Vec::new());
    let (mut py_first, mut py_later, mut nat_first, mut nat_later) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let waves = plan.slow_requests.div_ceil(WORKERS).max(2) / turns.max(1) + 1;
    for t in 0..turns {
        let d = Daemon::start(
            work,
            &format!("stacks-capture-{t}"),
            &kill("stack_timeout = \"1s\""),
            &[],
        )?;
        for _ in 0..waves {
            // One request at a time: every capture is its own batch (a batch's reads share the CPUs).
            for _ in 0..WORKERS {
                lateness::wave(&[port], false)?;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        std::thread::sleep(Duration::from_millis(200));
        for (i, e) in d.events()?.iter().enumerate() {
            let (py, nat) = (&e["stack"], &e["native_stack"]);
            anyhow::ensure!(
                py["error"].is_null() && nat["error"].is_null(),
                "a capture failed: {e}"
            );
            let (p, n) = (py["ms"].as_f64(), nat["ms"].as_f64());
            // Read side by side: the action waited for the slower of the two.
            let both = p.unwrap_or(0.0).max(n.unwrap_or(0.0));
            stopped.extend(nat["stopped_ms"].as_f64());
            if i == 0 {
                first.push(both);
                py_first.extend(p);
                nat_first.extend(n);
            } else {
                later.push(both);
                py_later.extend(p);
                nat_later.extend(n);
            }
        }
    }

    // Lateness, stacks on (defaults: 20 ms limit) and off, alternating blocks.
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let blocks = 4;
    for b in 0..blocks {
        let (name, cfg, out) = if b % 2 == 0 {
            ("on", kill(""), &mut on)
        } else {
            ("off", kill("stacks = false"), &mut off)
        };
        let d = Daemon::start(work, &format!("stacks-lateness-{name}-{b}"), &cfg, &[])?;
        let n = plan.slow_requests.div_ceil(WORKERS * 2).max(2) / (blocks / 2);
        for _ in 0..n.max(1) {
            let s = lateness::wave(&[port; WORKERS], false)?;
            anyhow::ensure!(s.len() == WORKERS);
            std::thread::sleep(Duration::from_millis(300));
        }
        std::thread::sleep(Duration::from_millis(200));
        out.extend(d.events()?.iter().filter_map(|e| e["lateness_ms"].as_f64()));
    }

    // RSS before and after `captures` captures, in observe mode (the workers live).
    let observe = format!(
        "[daemon]\nmode = \"observe\"\nstack_timeout = \"1s\"\n\n[[policy]]\nname = \"py\"\n\
         ports = [{port}]\nbudget = \"100ms\"\nsignal = \"SIGKILL\"\n{BREAKER}"
    );
    let d = Daemon::start(work, "stacks-rss", &observe, &[])?;
    let warm = 10;
    let ask = move |n: usize| -> Result<()> {
        for _ in 0..n {
            let mut c = TcpStream::connect(("127.0.0.1", port))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            c.write_all(b"GET /wait?ms=130 HTTP/1.1\r\nHost: bench\r\n\r\n")?;
            // The app keeps the connection open: read until the body is in.
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while !got.ends_with(b"waited 130\n") {
                let n = c.read(&mut buf).context("a /wait answer")?;
                anyhow::ensure!(n > 0, "the app closed before answering /wait");
                got.extend_from_slice(&buf[..n]);
            }
        }
        Ok(())
    };
    ask(warm)?;
    let rss_before = rss_kib(d.pid())? as f64 / 1024.0;
    let per_client = (captures - warm).div_ceil(2);
    let clients: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || ask(per_client)))
        .collect();
    for c in clients {
        c.join().expect("client thread")?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_after = rss_kib(d.pid())? as f64 / 1024.0;
    let events = d.events()?;
    let read = events
        .iter()
        .filter(|e| {
            e["stack"]["frames"]
                .as_array()
                .is_some_and(|f| !f.is_empty())
        })
        .count();
    let sleeping: Vec<f64> = events
        .iter()
        .filter_map(|e| {
            let (p, n) = (
                e["stack"]["ms"].as_f64()?,
                e["native_stack"]["ms"].as_f64()?,
            );
            Some(p.max(n))
        })
        .collect();
    Ok(json!({
        "workers": WORKERS,
        "capture_ms": {
            "first": distribution(&first),
            "later": distribution(&later),
            "python_first": distribution(&py_first),
            "python_later": distribution(&py_later),
            "native_first": distribution(&nat_first),
            "native_later": distribution(&nat_later),
            "native_stopped": distribution(&stopped),
            "sleeping_worker": distribution(&sleeping),
        },
        "lateness_ms": { "stacks_on": distribution(&on), "stacks_off": distribution(&off) },
        "rss": {
            "captures": events.len(),
            "with_python_stack": read,
            "before_mib": rss_before,
            "after_mib": rss_after,
            "delta_mib": rss_after - rss_before,
        },
    }))
}

/// The Markdown table of this part (in the full summary, and spliced into BENCHMARKS.md by
/// `--only stacks`).
pub fn summary(s: &Value) -> String {
    let f = super::f;
    let mut md = String::new();
    let c = &s["capture_ms"];
    md.push_str(&format!(
        "Pre-fork test app ({} workers, CPU loop, SIGKILL at 500 ms). Capture = the time the \
         first action waited for the Python stack and the native frames, read side by side \
         (limit raised to 1 s for these rows, so that every read finishes). Preliminary where other builds shared the 2 CPUs.\n\n",
        s["workers"]
    ));
    md.push_str("| capture | n | p50 ms | p99 ms | max ms | target |\n|---|---|---|---|---|---|\n");
    let row = |label: &str, x: &Value, target: Option<f64>| {
        format!(
            "| {label} | {} | {} | {} | {} | {} |\n",
            x["n"],
            f(&x["p50"]),
            f(&x["p99"]),
            f(&x["max"]),
            target.map_or(String::new(), |t| format!(
                "p99 ≤ {t}: {}",
                super::verdict(x["p99"].as_f64().unwrap_or(1e9) <= t)
            ))
        )
    };
    md.push_str(&row(
        "first record of a fresh daemon",
        &c["first"],
        Some(20.0),
    ));
    md.push_str(&row(
        "later records (files read before)",
        &c["later"],
        Some(10.0),
    ));
    md.push_str(&row("Python stack alone, first", &c["python_first"], None));
    md.push_str(&row("Python stack alone, later", &c["python_later"], None));
    md.push_str(&row("native frames alone, first", &c["native_first"], None));
    md.push_str(&row("native frames alone, later", &c["native_later"], None));
    md.push_str(&row(
        "the owner thread held stopped (ptrace)",
        &c["native_stopped"],
        None,
    ));
    md.push_str(&row(
        "worker in time.sleep (observe run)",
        &c["sleeping_worker"],
        None,
    ));
    let l = &s["lateness_ms"];
    md.push_str("\n| lateness (daemon-measured, default 20 ms limit) | n | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n");
    for (label, x) in [
        ("stacks on", &l["stacks_on"]),
        ("stacks off", &l["stacks_off"]),
    ] {
        md.push_str(&format!(
            "| {label} | {} | {} | {} | {} |\n",
            x["n"],
            f(&x["p50"]),
            f(&x["p99"]),
            f(&x["max"])
        ));
    }
    let r = &s["rss"];
    md.push_str(&format!(
        "\nDaemon RSS {} MiB after 10 captures, {} MiB after {} ({} with a Python stack): \
         {} MiB more (target ≤ 5: {}).\n",
        f(&r["before_mib"]),
        f(&r["after_mib"]),
        r["captures"],
        r["with_python_stack"],
        f(&r["delta_mib"]),
        super::verdict(r["delta_mib"].as_f64().unwrap_or(1e9) <= 5.0)
    ));
    md
}
