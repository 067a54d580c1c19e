//! Parts 1–3: nginx serving a small answer on loopback under wrk, without and with the watchdog
//! watching its port, in alternating rounds; kernel program run times from bpf_stats; the
//! daemon's CPU and memory at two request rates.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{spawn_server, spread, sysctl, wait_port, Daemon, Plan};
use crate::harness::{cpu_secs, free_port, rss_kib, status_kib};

/// wrk's Lua hook: prints the totals and a latency percentile curve (µs).
pub(super) const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout))
  for _, p in ipairs({1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9}) do
    io.write(string.format("PCT %g %d\n", p, latency:percentile(p)))
  end
end
"#;

/// Our programs (as in watchdog-common's names).
const PROGRAMS: &[&str] = &[
    "request_enter_recv",
    "request_exit_send",
    "conn_sock_ops",
    "conn_enter_receive_reset",
    "task_exit",
    "syscall_exit",
    "task_fork",
];

struct Wrk {
    rps: f64,
    requests: f64,
    /// (percentile, latency in ms)
    pcts: Vec<(f64, f64)>,
}

impl Wrk {
    fn pct(&self, p: f64) -> f64 {
        self.pcts
            .iter()
            .find(|(q, _)| (*q - p).abs() < 1e-9)
            .map_or(f64::NAN, |(_, v)| *v)
    }
}

pub fn run(plan: &Plan, work: &Path) -> Result<Value> {
    let dir = work.join("overhead");
    std::fs::create_dir_all(dir.join("logs"))?;
    let port = free_port()?;
    std::fs::write(dir.join("pct.lua"), WRK_SCRIPT)?;
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\n\
             error_log {d}/logs/error.log;\nworker_rlimit_nofile 16384;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n\
             client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
             uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
            d = dir.display()
        ),
    )?;
    // nginx on CPU 0, wrk on CPU 1: the two do not trade places between rounds.
    let _nginx = spawn_nginx(&dir)?;
    wait_port(port)?;
    sysctl("kernel.bpf_stats_enabled", "0")?;
    let config_for = |set: &str, watched: u16| {
        format!(
            "[daemon]\nprobes = \"{set}\"\n\n[[policy]]\nname = \"nginx\"\nports = [{watched}]\n\
             budget = \"30s\"\nsignal = \"SIGKILL\"\nmatch = {{ comm = [\"nginx\"] }}\n"
        )
    };
    let config = |set: &str| config_for(set, port);
    let conns = 32;
    // Warm up nginx and the page cache.
    wrk(&dir, port, conns, 2)?;

    let mut base = Vec::new();
    let mut sets = [Watched::new("sock"), Watched::new("syscalls")];
    let mut daemon = Vec::new();
    let mut peak_kib = 0u64;
    for round in 0..plan.rounds {
        // Rotate the order of the three turns, so a drift in the machine favours none of them.
        for turn in (0..3).map(|k| (k + round) % 3) {
            if turn == 2 {
                base.push(wrk(&dir, port, conns, plan.round_secs)?);
                continue;
            }
            let side = &mut sets[turn];
            let d = Daemon::start(
                work,
                &format!("overhead-{}-{round}", side.set),
                &config(side.set),
                &[],
            )?;
            std::thread::sleep(Duration::from_millis(500));
            let cpu0 = cpu_secs(d.pid())?;
            let w = wrk(&dir, port, conns, plan.round_secs)?;
            let cpu = cpu_secs(d.pid())? - cpu0;
            peak_kib = peak_kib.max(status_kib(d.pid(), "VmHWM")?);
            if side.set == "sock" {
                daemon.push(json!({
                    "connections": conns,
                    "rps": w.rps,
                    "cpu_pct": 100.0 * cpu / plan.round_secs as f64,
                    "rss_mib": rss_kib(d.pid())? as f64 / 1024.0,
                }));
            }
            side.rounds.push(w);
        }
    }
    // Kernel program costs, in turns of their own: bpf_stats reads the clock twice per program
    // run, which would weigh on the throughput rounds above. The four turns of a round (port
    // not watched, sock set, syscall set, sock set with `upgrades = false`) alternate, rotating,
    // so that the floor and the tracked cost of one round are measured side by side.
    let turns = plan.rounds.min(3);
    let mut untracked = Watched::new("sock");
    let mut no_upgrades = Watched::new("sock");
    sysctl("kernel.bpf_stats_enabled", "1")?;
    for k in 0..turns {
        for turn in (0..4).map(|t| (t + k) % 4) {
            let (side, name, cfg) = match turn {
                0 => (
                    &mut untracked,
                    "untracked",
                    config_for("sock", free_port()?),
                ),
                3 => (
                    &mut no_upgrades,
                    "no-upgrades",
                    config("sock") + "upgrades = false\n",
                ),
                t => {
                    let side = &mut sets[t - 1];
                    let set = side.set;
                    (side, set, config(set))
                }
            };
            let d = Daemon::start(work, &format!("cost-{name}-{k}"), &cfg, &[])?;
            let (progs, per_req) = cost_turn(&d, &dir, port, conns, plan.round_secs)?;
            for (name, v) in progs {
                side.progs.entry(name).or_default().push(v);
            }
            side.kernel_per_req.push(per_req);
        }
    }
    sysctl("kernel.bpf_stats_enabled", "0")?;

    // The same daemon cost at a much lower request rate.
    {
        let low = 2;
        let d = Daemon::start(work, "overhead-low", &config("sock"), &[])?;
        std::thread::sleep(Duration::from_millis(500));
        let cpu0 = cpu_secs(d.pid())?;
        let w = wrk(&dir, port, low, plan.round_secs)?;
        let cpu = cpu_secs(d.pid())? - cpu0;
        daemon.push(json!({
            "connections": low,
            "rps": w.rps,
            "cpu_pct": 100.0 * cpu / plan.round_secs as f64,
            "rss_mib": rss_kib(d.pid())? as f64 / 1024.0,
        }));
    }
    let tracked = tracked_path(&sets[0], &untracked);
    let tracked_no_upgrades = tracked_path(&no_upgrades, &untracked);
    let resolution = resolution(&base, &sets[0].rounds);
    let [sock, syscalls] = sets.map(|w| w.summary(&base));
    let mut out = sock;
    let o = out.as_object_mut().expect("an object");
    o.insert("syscalls".into(), syscalls);
    for (k, v) in [
        ("rounds", json!(plan.rounds)),
        ("round_secs", json!(plan.round_secs)),
        ("connections", json!(conns)),
        ("baseline_rps", spread(&rpss(&base))),
        ("baseline_latency_ms", median_round(&base)),
        ("daemon", json!(daemon)),
        ("peak_rss_mib", json!(peak_kib as f64 / 1024.0)),
        ("untracked_programs", untracked.programs()),
        ("tracked_path", tracked),
        ("tracked_path_no_upgrades", tracked_no_upgrades),
        ("throughput_resolution", resolution),
        (
            "untracked_kernel_ns_per_request",
            json!(super::percentile(&untracked.kernel_per_req, 50.0)),
        ),
    ] {
        o.insert(k.into(), v);
    }
    Ok(out)
}

/// A tracked request's own kernel work per recv and per send, against the floor (the same
/// program on a socket of a port nobody watches) measured in the same rounds. A watched turn's
/// ns/run averages nginx's tracked socket with wrk's untracked one: with `r` runs per request,
/// one of them tracked, `tracked = r * average - (r - 1) * floor`.
fn tracked_path(watched: &Watched, floor: &Watched) -> Value {
    let mut out = serde_json::Map::new();
    for (prog, key, target) in [
        ("request_enter_recv", "recv", 2.0),
        ("request_exit_send", "send", 1.5),
    ] {
        let (Some(w), Some(f)) = (watched.progs.get(prog), floor.progs.get(prog)) else {
            continue;
        };
        let turns: Vec<(f64, f64)> = w
            .iter()
            .zip(f)
            .map(|(&(avg, runs), &(floor, _))| (floor, runs * avg - (runs - 1.0) * floor))
            .collect();
        let ratios: Vec<f64> = turns.iter().map(|(f, t)| t / f).collect();
        let floors: Vec<f64> = turns.iter().map(|t| t.0).collect();
        let tracked: Vec<f64> = turns.iter().map(|t| t.1).collect();
        let ratio = super::percentile(&ratios, 50.0);
        out.insert(
            key.into(),
            json!({
                "program": prog,
                "floor_ns": super::percentile(&floors, 50.0),
                "tracked_ns": super::percentile(&tracked, 50.0),
                "ratio": ratio,
                "ratio_turns": spread(&ratios),
                "target_ratio": target,
                "met": ratio <= target,
            }),
        );
    }
    Value::Object(out)
}

/// How finely the throughput rounds can tell watched from baseline: the spread of the
/// per-round ratios, and how many rounds would make a 3 % difference two standard errors wide.
fn resolution(base: &[Wrk], watched: &[Wrk]) -> Value {
    let ratios: Vec<f64> = base
        .iter()
        .zip(watched)
        .map(|(b, w)| w.rps / b.rps)
        .collect();
    let sd = stddev(&ratios);
    let rps = rpss(base);
    json!({
        "rounds": ratios.len(),
        "ratio_sd": sd,
        "baseline_cv": stddev(&rps) / (rps.iter().sum::<f64>() / rps.len().max(1) as f64),
        "rounds_to_resolve_3pct": (sd / 0.015).powi(2).ceil(),
    })
}

/// Sample standard deviation (0 for fewer than two values).
fn stddev(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// The watched rounds of one probe set.
struct Watched {
    set: &'static str,
    rounds: Vec<Wrk>,
    /// Per program: (ns per run, runs per request) of each round.
    progs: BTreeMap<&'static str, Vec<(f64, f64)>>,
    kernel_per_req: Vec<f64>,
}

impl Watched {
    fn new(set: &'static str) -> Self {
        Self {
            set,
            rounds: Vec::new(),
            progs: BTreeMap::new(),
            kernel_per_req: Vec::new(),
        }
    }

    /// Ratios to the baseline rounds (round k against baseline round k) and kernel costs.
    fn summary(&self, base: &[Wrk]) -> Value {
        let ratio = |f: &dyn Fn(&Wrk) -> f64| -> Vec<f64> {
            base.iter()
                .zip(&self.rounds)
                .map(|(b, w)| f(w) / f(b))
                .collect()
        };
        json!({
            "watched_rps": spread(&rpss(&self.rounds)),
            "throughput_ratio": spread(&ratio(&|w| w.rps)),
            "p50_ratio": spread(&ratio(&|w| w.pct(50.0))),
            "p99_ratio": spread(&ratio(&|w| w.pct(99.0))),
            "watched_latency_ms": median_round(&self.rounds),
            "programs": self.programs(),
            "kernel_ns_per_request": super::percentile(&self.kernel_per_req, 50.0),
        })
    }

    /// Per program: ns per run and runs per request, medians over the cost turns.
    fn programs(&self) -> Value {
        let programs: BTreeMap<&str, Value> = self
            .progs
            .iter()
            .map(|(name, v)| {
                let ns: Vec<f64> = v.iter().map(|x| x.0).collect();
                let per: Vec<f64> = v.iter().map(|x| x.1).collect();
                (
                    *name,
                    json!({
                        "ns_per_run": super::percentile(&ns, 50.0),
                        "ns_per_run_rounds": spread(&ns),
                        "runs_per_request": super::percentile(&per, 50.0),
                    }),
                )
            })
            .collect();
        json!(programs)
    }
}

fn rpss(v: &[Wrk]) -> Vec<f64> {
    v.iter().map(|w| w.rps).collect()
}

/// The latency curve of the round with the median throughput.
fn median_round(v: &[Wrk]) -> Value {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|a, b| v[*a].rps.total_cmp(&v[*b].rps));
    let w = &v[idx[idx.len() / 2]];
    json!(w
        .pcts
        .iter()
        .map(|(p, ms)| json!([p, ms]))
        .collect::<Vec<_>>())
}

/// Per program: (ns per run, runs per request).
pub(super) type ProgramCosts = Vec<(&'static str, (f64, f64))>;

/// One wrk turn with bpf_stats on: the cost of each program, and all programs' ns per request.
fn cost_turn(
    d: &Daemon,
    dir: &Path,
    port: u16,
    conns: usize,
    secs: u64,
) -> Result<(ProgramCosts, f64)> {
    cost_turn_on(d, dir, port, "/", conns, secs)
}

/// `cost_turn` with wrk asking for `path`.
pub(super) fn cost_turn_on(
    d: &Daemon,
    dir: &Path,
    port: u16,
    path: &str,
    conns: usize,
    secs: u64,
) -> Result<(ProgramCosts, f64)> {
    std::thread::sleep(Duration::from_millis(500));
    let ids = d.prog_ids()?;
    let before = prog_stats(&ids)?;
    let w = wrk_on(dir, port, path, conns, secs)?;
    let after = prog_stats(&ids)?;
    let mut total_ns = 0.0;
    let mut out = Vec::new();
    for name in PROGRAMS {
        let (t0, n0) = before.get(*name).copied().unwrap_or_default();
        let (t1, n1) = after.get(*name).copied().unwrap_or_default();
        let (dt, dn) = ((t1 - t0) as f64, (n1 - n0) as f64);
        total_ns += dt;
        if dn > 0.0 {
            out.push((*name, (dt / dn, dn / w.requests)));
        }
    }
    Ok((out, total_ns / w.requests))
}

/// nginx (one worker, CPU 0) answering `200 ok` on `port`, with wrk's percentile script beside
/// its config in `dir` (which holds a `logs/` directory): the server of the kernel-cost parts.
pub(super) fn small_nginx(dir: &Path, port: u16) -> Result<crate::harness::Guard> {
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
    let nginx = spawn_nginx(dir)?;
    super::wait_port(port)?;
    Ok(nginx)
}

pub(super) fn spawn_nginx(dir: &Path) -> Result<crate::harness::Guard> {
    // nginx prints nothing when it starts: wrap it so spawn_server sees a ready line.
    spawn_server(
        Command::new("sh").arg("-c").arg(format!(
            "echo ready; exec taskset -c 0 nginx -p {d} -c {d}/nginx.conf -e {d}/logs/error.log",
            d = dir.display()
        )),
        "ready",
    )
}

fn wrk(dir: &Path, port: u16, conns: usize, secs: u64) -> Result<Wrk> {
    wrk_on(dir, port, "/", conns, secs)
}

fn wrk_on(dir: &Path, port: u16, path: &str, conns: usize, secs: u64) -> Result<Wrk> {
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("-s")
        .arg(dir.join("pct.lua"))
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut w = Wrk {
        rps: 0.0,
        requests: 0.0,
        pcts: Vec::new(),
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["RESULT", req, dur_us, errors] => {
                let (req, dur): (f64, f64) = (req.parse()?, dur_us.parse()?);
                if errors.parse::<u64>()? > 0 {
                    bail!("wrk saw {errors} errors: {text}");
                }
                w.requests = req;
                w.rps = req / (dur / 1e6);
            }
            ["PCT", p, us] => w.pcts.push((p.parse()?, us.parse::<f64>()? / 1000.0)),
            _ => {}
        }
    }
    if w.requests == 0.0 {
        bail!("wrk printed no result: {text}");
    }
    Ok(w)
}

/// (run_time_ns, run_cnt) of the programs with these ids, by name.
pub(super) fn prog_stats(ids: &[u64]) -> Result<BTreeMap<String, (u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in v.as_array().into_iter().flatten() {
        let Some(name) = p["name"].as_str() else {
            continue;
        };
        if ids.contains(&p["id"].as_u64().unwrap_or(0)) && PROGRAMS.contains(&name) {
            let e = m.entry(name.to_string()).or_default();
            e.0 += p["run_time_ns"].as_u64().unwrap_or(0);
            e.1 += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    Ok(m)
}
