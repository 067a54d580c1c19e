//! Part 1b: what reading a request's first bytes and matching routes costs in the kernel, in
//! ns per run of the recv and send programs (bpf_stats), nginx under wrk as in part 1.
//!
//! Turns, alternating: nginx's port not watched (what every other socket pays), watched
//! without routes, watched with 16 routes (wrk asks for a path the last one matches), and the
//! same with the syscall probe set. With `WATCHDOG_BENCH_BASELINE=/path/to/watchdog` (an older
//! build), its watched turn runs beside them: the cost before this code existed.

use std::{path::Path, path::PathBuf};

use anyhow::Result;
use serde_json::{json, Value};

use super::{
    overhead::{cost_turn_on, spawn_nginx, WRK_SCRIPT},
    sysctl, wait_port, Daemon, Plan,
};
use crate::harness::free_port;

/// The path wrk asks for: the 16th route matches it.
const PATH: &str = "/api/v1/items/42";

/// 16 routes: 15 that do not match `PATH` (prefixes, exact paths, method-only ones), then one
/// that does.
fn routes_toml() -> String {
    let mut r: Vec<String> = (0..15)
        .map(|i| match i % 3 {
            0 => format!("  {{ path = \"/r{i}/*\", budget = \"20s\" }},"),
            1 => format!("  {{ path = \"/api/v{i}/exact\", budget = \"20s\" }},"),
            _ => format!("  {{ method = \"POST\", path = \"/api/v{i}/*\", budget = \"20s\" }},"),
        })
        .collect();
    r.push("  { path = \"/api/*\", budget = \"30s\" },".into());
    format!("routes = [\n{}\n]\n", r.join("\n"))
}

pub fn run(plan: &Plan, work: &Path) -> Result<Value> {
    let dir = work.join("routes");
    std::fs::create_dir_all(dir.join("logs"))?;
    let port = free_port()?;
    std::fs::write(dir.join("pct.lua"), WRK_SCRIPT)?;
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\n\
             error_log {d}/logs/error.log;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n\
             client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
             uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
            d = dir.display()
        ),
    )?;
    let _nginx = spawn_nginx(&dir)?;
    wait_port(port)?;
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
            let ns: Vec<f64> = t
                .costs
                .iter()
                .filter_map(|c| c.iter().find(|(n, _)| *n == prog).map(|(_, v)| v.0))
                .collect();
            if !ns.is_empty() {
                progs.insert(
                    prog.into(),
                    json!({ "ns_per_run": super::percentile(&ns, 50.0), "rounds": ns }),
                );
            }
        }
        out.insert(t.name.into(), Value::Object(progs));
    }
    out.insert("rounds".into(), json!(rounds));
    out.insert("round_secs".into(), json!(plan.round_secs));
    out.insert("path".into(), json!(PATH));
    Ok(Value::Object(out))
}
