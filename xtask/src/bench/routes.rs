//! Part 1b: what reading a request's first bytes and matching routes costs in the kernel, in
//! ns per run of the recv and send programs (bpf_stats), nginx under wrk as in part 1.
//!
//! Turns, alternating: nginx's port not watched (what every other socket pays), watched
//! without routes, watched with 16 routes (wrk asks for a path the last one matches), and the
//! same with the syscall probe set. With `WATCHDOG_BENCH_BASELINE=/path/to/watchdog` (an older
//! build), its watched turn runs beside them: the cost before this code existed.
//!
//! Then lateness with and without routes: the pre-fork test app, waves of over-budget requests,
//! in alternating blocks under a policy with a 500 ms budget and under one with a 5 s budget
//! whose 16th route gives the path 500 ms (so only the route can end it in time).

use std::{path::Path, path::PathBuf};

use anyhow::Result;
use serde_json::{json, Value};

use super::{
    distribution, lateness,
    overhead::{cost_turn_on, small_nginx},
    spawn_server, sysctl, wait_port, Daemon, Plan,
};
use crate::{harness::free_port, root};

/// The path wrk asks for: the 16th route matches it.
const PATH: &str = "/api/v1/items/42";

/// 16 routes: 15 that do not match `PATH` (prefixes, exact paths, method-only ones), then one
/// that does.
fn routes_toml() -> String {
    routes_toml_ending("  { path = \"/api/*\", budget = \"30s\" },")
}

fn routes_toml_ending(last: &str) -> String {
    let mut r: Vec<String> = (0..15)
        .map(|i| match i % 3 {
            0 => format!("  {{ path = \"/r{i}/*\", budget = \"20s\" }},"),
            1 => format!("  {{ path = \"/api/v{i}/exact\", budget = \"20s\" }},"),
            _ => format!("  {{ method = \"POST\", path = \"/api/v{i}/*\", budget = \"20s\" }},"),
        })
        .collect();
    r.push(last.into());
    format!("routes = [\n{}\n]\n", r.join("\n"))
}

pub fn run(plan: &Plan, work: &Path) -> Result<Value> {
    let dir = work.join("routes");
    std::fs::create_dir_all(dir.join("logs"))?;
    let port = free_port()?;
    let _nginx = small_nginx(&dir, port)?;
    let config = |set: &str, watched: u16, routes: bool| {
        format!(
            "[daemon]\nprobes = \"{set}\"\n\n[[policy]]\nname = \"nginx\"\nports = [{watched}]\n\
             budget = \"30s\"\nsignal = \"SIGKILL\"\nmatch = {{ comm = [\"nginx\"] }}\n{}",
            if routes { routes_toml() } else { String::new() }
        )
    };
    let baseline = std::env::var_os("WATCHDOG_BENCH_BASELINE").map(PathBuf::from);
    struct Turn {
        name: &'static str,
        config: String,
        bin: Option<PathBuf>,
        costs: Vec<Vec<(&'static str, (f64, f64))>>,
    }
    let mut turns = vec![
        Turn {
            name: "unwatched",
            config: config("sock", free_port()?, false),
            bin: None,
            costs: vec![],
        },
        Turn {
            name: "watched",
            config: config("sock", port, false),
            bin: None,
            costs: vec![],
        },
        Turn {
            name: "watched_16_routes",
            config: config("sock", port, true),
            bin: None,
            costs: vec![],
        },
        Turn {
            name: "syscalls_watched",
            config: config("syscalls", port, false),
            bin: None,
            costs: vec![],
        },
        Turn {
            name: "syscalls_16_routes",
            config: config("syscalls", port, true),
            bin: None,
            costs: vec![],
        },
    ];
    if let Some(bin) = &baseline {
        turns.push(Turn {
            name: "baseline_watched",
            config: config("sock", port, false),
            bin: Some(bin.clone()),
            costs: vec![],
        });
        turns.push(Turn {
            name: "baseline_unwatched",
            config: config("sock", free_port()?, false),
            bin: Some(bin.clone()),
            costs: vec![],
        });
        turns.push(Turn {
            name: "baseline_syscalls_watched",
            config: config("syscalls", port, false),
            bin: Some(bin.clone()),
            costs: vec![],
        });
    }
    let rounds = plan.rounds.min(3);
    sysctl("kernel.bpf_stats_enabled", "1")?;
    for round in 0..rounds {
        let n = turns.len();
        for k in (0..n).map(|k| (k + round) % n) {
            let t = &mut turns[k];
            let name = format!("routes-{}-{round}", t.name);
            let d = match &t.bin {
                Some(bin) => Daemon::start_bin(bin, work, &name, &t.config, &[])?,
                None => Daemon::start(work, &name, &t.config, &[])?,
            };
            let (costs, _) = cost_turn_on(&d, &dir, port, PATH, 32, plan.round_secs)?;
            t.costs.push(costs);
        }
    }
    sysctl("kernel.bpf_stats_enabled", "0")?;
    let mut out = serde_json::Map::new();
    for t in &turns {
        let mut progs = serde_json::Map::new();
        for prog in ["request_enter_recv", "request_exit_send", "syscall_exit"] {
            let runs: Vec<(f64, f64)> = t
                .costs
                .iter()
                .filter_map(|c| c.iter().find(|(n, _)| *n == prog).map(|(_, v)| *v))
                .collect();
            let ns: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let per: Vec<f64> = runs.iter().map(|r| r.1).collect();
            if !ns.is_empty() {
                progs.insert(
                    prog.into(),
                    json!({
                        "ns_per_run": super::percentile(&ns, 50.0),
                        "runs_per_request": super::percentile(&per, 50.0),
                        "rounds": ns,
                    }),
                );
            }
        }
        out.insert(t.name.into(), Value::Object(progs));
    }
    out.insert("rounds".into(), json!(rounds));
    out.insert("round_secs".into(), json!(plan.round_secs));
    out.insert("path".into(), json!(PATH));
    out.insert("lateness".into(), lateness_with_routes(plan, work)?);
    Ok(Value::Object(out))
}

/// Daemon-measured lateness (ms) of 500 ms deadlines, without and with 16 routes.
fn lateness_with_routes(plan: &Plan, work: &Path) -> Result<Value> {
    const WORKERS: usize = 4;
    let port = free_port()?;
    let _app = spawn_server(
        std::process::Command::new("python3")
            .arg(root().join("watchdog/tests/fixtures/app.py"))
            .arg(port.to_string())
            .arg(WORKERS.to_string()),
        "READY",
    )?;
    wait_port(port)?;
    let breaker = "breaker = { max_actions = 100000, window = \"1m\", cooldown = \"1s\" }\n";
    let plain = format!(
        "[[policy]]\nname = \"plain\"\nports = [{port}]\nbudget = \"500ms\"\nsignal = \"SIGKILL\"\n{breaker}"
    );
    let routed = format!(
        "[[policy]]\nname = \"routed\"\nports = [{port}]\nbudget = \"5s\"\nsignal = \"SIGKILL\"\n{breaker}{}",
        routes_toml_ending("  { path = \"/slow\", budget = \"500ms\" },")
    );
    let waves = plan.slow_requests.div_ceil(WORKERS * 2).max(2);
    let blocks = 4;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for b in 0..blocks {
        let (name, config, out) = if b % 2 == 0 {
            ("plain", &plain, &mut without)
        } else {
            ("routed", &routed, &mut with)
        };
        let d = Daemon::start(work, &format!("routes-lateness-{name}-{b}"), config, &[])?;
        for _ in 0..waves.div_ceil(blocks / 2) {
            let samples = lateness::wave(&[port; WORKERS], false)?;
            anyhow::ensure!(samples.len() == WORKERS);
            // Let the app re-fork its killed workers.
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let events = d.events()?;
        for e in &events {
            anyhow::ensure!(
                e["budget_ms"] == 500,
                "acted at another budget than the route's: {e}"
            );
        }
        out.extend(events.iter().filter_map(|e| e["lateness_ms"].as_f64()));
    }
    Ok(json!({
        "without_routes": distribution(&without),
        "with_16_routes": distribution(&with),
    }))
}
