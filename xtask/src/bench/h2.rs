//! Part 1c: what following HTTP/2 streams costs. A grpcio server (CPU 0) and grpcio clients
//! (CPU 1) making unary calls on one channel each; bpf_stats of the recv and send programs
//! per call and per run, in alternating turns with the server's port not watched (the floor
//! every socket pays) and watched (every frame header of every read and write walked). The
//! daemon's CPU time over each turn, at two call rates (one client, four clients), shows it
//! does not grow with the calls: no stream produces an event unless it is late.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use super::{overhead::prog_stats, percentile, spawn_server, sysctl, wait_port, Daemon, Plan};
use crate::{harness::free_port, root};

const PROGRAMS: [&str; 2] = ["request_enter_recv", "request_exit_send"];

/// The daemon's user + system CPU time so far, in ms.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1000.0 / hz)
}

/// `clients` grpcio clients of `calls` calls each at once; the calls per second they made.
fn load(port: u16, clients: usize, calls: usize) -> Result<f64> {
    let t = Instant::now();
    let kids: Vec<_> = (0..clients)
        .map(|_| {
            Command::new("taskset")
                .args(["-c", "1", "python3"])
                .arg(root().join("watchdog/tests/fixtures/grpc_pair.py"))
                .args(["client", &port.to_string(), &calls.to_string()])
                .output()
        })
        .collect();
    for k in kids {
        let out = k.context("running grpc_pair.py client")?;
        ensure!(
            out.status.success(),
            "grpc client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((clients * calls) as f64 / t.elapsed().as_secs_f64())
}

pub fn run(plan: &Plan, work: &Path) -> Result<Value> {
    let port = free_port()?;
    let _server = spawn_server(
        Command::new("taskset")
            .args(["-c", "0", "python3"])
            .arg(root().join("watchdog/tests/fixtures/grpc_pair.py"))
            .args(["server", &port.to_string(), "8"]),
        "READY",
    )?;
    wait_port(port)?;
    let calls = if plan.rounds > 1 { 4000 } else { 500 };
    let config = |watched: u16| {
        format!(
            "[[policy]]\nname = \"grpc\"\nports = [{watched}]\nbudget = \"30s\"\n\
             signal = \"SIGKILL\"\ntarget = \"process\"\n"
        )
    };
    let turns = [("unwatched", free_port()?), ("watched", port)];
    let mut rows: Vec<(&str, usize, Value)> = Vec::new();
    sysctl("kernel.bpf_stats_enabled", "1")?;
    for round in 0..plan.rounds.min(3) {
        for k in 0..turns.len() {
            let (name, watched) = turns[(k + round) % turns.len()];
            let d = Daemon::start(work, &format!("h2-{name}-{round}"), &config(watched), &[])?;
            std::thread::sleep(std::time::Duration::from_millis(300));
            let ids = d.prog_ids()?;
            for clients in [1usize, 4] {
                let (before, cpu0) = (prog_stats(&ids)?, cpu_ms(d.pid())?);
                let rate = load(port, clients, calls)?;
                let (after, cpu1) = (prog_stats(&ids)?, cpu_ms(d.pid())?);
                let n = (clients * calls) as f64;
                let mut progs = serde_json::Map::new();
                for p in PROGRAMS {
                    let (t0, r0) = before.get(p).copied().unwrap_or_default();
                    let (t1, r1) = after.get(p).copied().unwrap_or_default();
                    let (dt, dr) = ((t1 - t0) as f64, (r1 - r0) as f64);
                    progs.insert(
                        p.into(),
                        json!({
                            "ns_per_run": if dr > 0.0 { dt / dr } else { 0.0 },
                            "runs_per_call": dr / n,
                            "ns_per_call": dt / n,
                        }),
                    );
                }
                rows.push((
                    name,
                    clients,
                    json!({
                        "calls_per_s": rate,
                        "daemon_cpu_ms_per_1000_calls": (cpu1 - cpu0) / n * 1000.0,
                        "programs": progs,
                    }),
                ));
            }
        }
    }
    sysctl("kernel.bpf_stats_enabled", "0")?;
    let mut out = serde_json::Map::new();
    for (name, _) in turns {
        for clients in [1usize, 4] {
            let mine: Vec<&Value> = rows
                .iter()
                .filter(|(n, c, _)| *n == name && *c == clients)
                .map(|(_, _, v)| v)
                .collect();
            let med = |f: &dyn Fn(&Value) -> f64| {
                percentile(&mine.iter().map(|v| f(v)).collect::<Vec<_>>(), 50.0)
            };
            let mut progs = serde_json::Map::new();
            for p in PROGRAMS {
                progs.insert(
                    p.into(),
                    json!({
                        "ns_per_run": med(&|v| v["programs"][p]["ns_per_run"].as_f64().unwrap_or(0.0)),
                        "runs_per_call": med(&|v| v["programs"][p]["runs_per_call"].as_f64().unwrap_or(0.0)),
                        "ns_per_call": med(&|v| v["programs"][p]["ns_per_call"].as_f64().unwrap_or(0.0)),
                    }),
                );
            }
            out.insert(
                format!("{name}_{clients}_clients"),
                json!({
                    "calls_per_s": med(&|v| v["calls_per_s"].as_f64().unwrap_or(0.0)),
                    "daemon_cpu_ms_per_1000_calls": med(&|v| v["daemon_cpu_ms_per_1000_calls"].as_f64().unwrap_or(0.0)),
                    "programs": progs,
                    "rounds": mine.len(),
                }),
            );
        }
    }
    out.insert("calls_per_client".into(), json!(calls));
    Ok(Value::Object(out))
}

/// The BENCHMARKS.md section of this part.
pub fn summary(r: &Value) -> String {
    let mut md = String::from(
        "| turn | calls/s | recv ns/run | recv runs/call | send ns/run | send runs/call | kernel ns/call (recv + send) | daemon CPU ms / 1000 calls |\n|---|---|---|---|---|---|---|---|\n",
    );
    for name in ["unwatched", "watched"] {
        for clients in [1, 4] {
            let v = &r[format!("{name}_{clients}_clients")];
            let p = |prog: &str, f: &str| v["programs"][prog][f].as_f64().unwrap_or(0.0);
            md.push_str(&format!(
                "| {name}, {clients} client(s) | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |\n",
                v["calls_per_s"].as_f64().unwrap_or(0.0),
                p("request_enter_recv", "ns_per_run"),
                p("request_enter_recv", "runs_per_call"),
                p("request_exit_send", "ns_per_run"),
                p("request_exit_send", "runs_per_call"),
                p("request_enter_recv", "ns_per_call") + p("request_exit_send", "ns_per_call"),
                v["daemon_cpu_ms_per_1000_calls"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    md.push_str(&format!(
        "\n{} unary calls per client per turn, medians over the rounds; the programs' runs include the clients' own (untracked) sockets.\n",
        r["calls_per_client"]
    ));
    md
}
