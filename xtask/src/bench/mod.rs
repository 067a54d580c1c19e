//! `cargo xtask bench [--quick]`: what the watchdog costs on the request path and how precisely
//! it acts, measured on this machine against real servers (nginx, the pre-fork test app, uWSGI,
//! gunicorn), with every comparison taken side by side in one run, in alternating rounds.
//!
//! A full run writes `bench/results/latest.json`, `bench/results/latest.md`, the figures under
//! `bench/figures/`, and the results section of BENCHMARKS.md. `--quick` runs every part at a
//! small size (under two minutes) into `target/bench-quick/`, so the test suite keeps this code
//! working; its figures mean nothing.

mod ablation;
mod h2;
mod lateness;
mod overhead;
mod plot;
mod routes;
mod scale;
mod stacks;

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::{
    harness::{free_port, wait_ready, Guard},
    root, setup,
};

/// Debian packages the benchmarks drive.
const PACKAGES: &[&str] = &[
    "nginx",
    "wrk",
    "bpftool",
    "uwsgi",
    "uwsgi-plugin-python3",
    "python3-venv",
];

/// How big each part is.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Baseline/watched pairs of the overhead run, and seconds per round.
    pub rounds: usize,
    pub round_secs: u64,
    /// Over-budget requests for the lateness distribution (500 ms budget).
    pub slow_requests: usize,
    /// Over-budget requests per system in the uWSGI / gunicorn / watchdog comparison (1 s).
    pub peer_requests: usize,
    /// Tracked keep-alive connection counts, and simultaneous deadlines at the largest.
    pub levels: Vec<usize>,
    pub bursts: Vec<usize>,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 1,
                round_secs: 2,
                slow_requests: 12,
                peer_requests: 4,
                levels: vec![500],
                bursts: vec![100],
            }
        } else {
            Self {
                rounds: 5,
                round_secs: 10,
                slow_requests: 216,
                peer_requests: 40,
                levels: vec![10_000, 50_000],
                bursts: vec![1_000, 5_000],
            }
        }
    }
}

/// Runs the suite; `only` (overhead, routes, lateness, scale) runs one part, for working on it,
/// and records nothing outside target/.
pub fn bench(quick: bool, only: Option<&str>) -> Result<()> {
    setup::ensure_packages(PACKAGES)?;
    for svc in ["nginx", "uwsgi"] {
        let _ = Command::new("service").args([svc, "stop"]).output();
    }
    crate::cargo(&["build", "--release", "-p", "watchdog"])?;
    raise_nofile()?;
    crate::harness::remove_stale_pins()?;
    let plan = Plan::new(quick);
    let work = root().join(match (quick, only) {
        (true, _) => "target/bench-quick",
        (false, Some(_)) => "target/bench-only",
        (false, None) => "target/bench",
    });
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let started = std::time::Instant::now();

    let wanted = |part: &str| only.is_none_or(|o| o == part);
    anyhow::ensure!(
        only.is_none_or(|o| [
            "overhead", "routes", "h2", "lateness", "scale", "stacks", "ablation"
        ]
        .contains(&o)),
        "--only takes overhead, routes, h2, lateness, scale, stacks or ablation"
    );
    let mut overhead = Value::Null;
    if wanted("overhead") {
        overhead = overhead::run(&plan, &work).context("overhead benchmark")?;
    }
    let mut routes = Value::Null;
    if wanted("routes") {
        routes = routes::run(&plan, &work).context("routes benchmark")?;
    }
    let mut h2 = Value::Null;
    if wanted("h2") {
        h2 = h2::run(&plan, &work).context("HTTP/2 benchmark")?;
    }
    let mut lateness = Value::Null;
    if wanted("lateness") {
        lateness = lateness::run(&plan, &work).context("lateness benchmark")?;
    }
    let mut scale = Value::Null;
    if wanted("scale") {
        scale = scale::run(&plan, &work).context("scale benchmark")?;
    }
    // Three more builds of the daemon: only when asked for by name.
    let mut ablation = Value::Null;
    if only == Some("ablation") {
        ablation = ablation::run(&plan, &work).context("ablation benchmark")?;
    }
    let mut stacks = Value::Null;
    if wanted("stacks") {
        stacks = stacks::run(&plan, &work).context("stacks benchmark")?;
    }
    let results = json!({
        "machine": machine(),
        "quick": quick,
        "seconds": started.elapsed().as_secs(),
        "overhead": overhead,
        "routes": routes,
        "h2": h2,
        "lateness": lateness,
        "scale": scale,
        "stacks": stacks,
        "ablation": ablation,
    });

    let (out, figures) = if quick || only.is_some() {
        (work.clone(), work.join("figures"))
    } else {
        (root().join("bench/results"), root().join("bench/figures"))
    };
    std::fs::create_dir_all(&out)?;
    std::fs::create_dir_all(&figures)?;
    std::fs::write(
        out.join("latest.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    plot::all(&results, &figures)?;
    let md = summary(&results);
    // latest.md sits next to the figures' directory, BENCHMARKS.md at the root.
    std::fs::write(
        out.join("latest.md"),
        md.replace("](bench/figures/", "](../figures/"),
    )?;
    if !quick && only.is_none() {
        splice_benchmarks_md(&md)?;
    }
    // The HTTP/2 part has a section of its own in BENCHMARKS.md, written by its own run too.
    if !quick && (only.is_none() || only == Some("h2")) {
        splice_between(
            "<!-- h2:begin (written by cargo xtask bench --only h2) -->",
            "<!-- h2:end -->",
            &format!("{}\n{}", run_line(&results), h2::summary(&results["h2"])),
        )?;
    }
    // The stacks part has a section of its own in BENCHMARKS.md, written by its own run too.
    if !quick && (only.is_none() || only == Some("stacks")) {
        std::fs::write(
            root().join("bench/results/stacks.json"),
            serde_json::to_string_pretty(&results["stacks"])?,
        )?;
        splice_between(
            "<!-- stacks:begin (written by cargo xtask bench --only stacks) -->",
            "<!-- stacks:end -->",
            &format!(
                "{}
{}",
                run_line(&results),
                stacks::summary(&results["stacks"])
            ),
        )?;
    }
    if !quick && only == Some("ablation") {
        std::fs::write(
            root().join("bench/results/ablation.json"),
            serde_json::to_string_pretty(&results["ablation"])?,
        )?;
        splice_between(
            "<!-- ablation:begin (written by cargo xtask bench --only ablation) -->",
            "<!-- ablation:end -->",
            &format!(
                "{}\n{}",
                run_line(&results),
                ablation::summary(&results["ablation"])
            ),
        )?;
    }
    println!("{md}");
    println!(
        "bench: {} s; results in {}",
        started.elapsed().as_secs(),
        out.display()
    );
    Ok(())
}

/// The kernel, CPU and memory of this machine, for the record.
fn machine() -> Value {
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    json!({
        "kernel": uname,
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

/// Lifts the soft descriptor limit to the hard one (raising the hard one needs
/// CAP_SYS_RESOURCE, which these machines do not grant even to root).
fn raise_nofile() -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            return Ok(());
        }
    }
    Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE")
}

/// Writes `value` to a sysctl under /proc/sys.
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value).with_context(|| format!("setting {key}"))
}

/// A daemon under measurement: its own state dir, metrics port, event file and log.
pub struct Daemon {
    guard: Guard,
    pub metrics: String,
    pub events: PathBuf,
    state: PathBuf,
}

impl Daemon {
    /// Starts `watchdog run --config <config>` and waits until it is ready.
    pub fn start(work: &Path, name: &str, config: &str, extra: &[&str]) -> Result<Self> {
        Self::start_bin(
            &root().join("target/release/watchdog"),
            work,
            name,
            config,
            extra,
        )
    }

    /// `start` with another build of the daemon (a baseline to compare with).
    pub fn start_bin(
        bin: &Path,
        work: &Path,
        name: &str,
        config: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("watchdog.toml");
        std::fs::write(&cfg, config)?;
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let events = dir.join("events.jsonl");
        let state = PathBuf::from(format!(
            "/sys/fs/bpf/watchdog-bench-{}-{name}",
            std::process::id()
        ));
        let log = dir.join("watchdog.log");
        let guard = Guard(
            Command::new(bin)
                .args(["--log-format", "json", "run", "--config"])
                .arg(&cfg)
                .args(["--metrics-addr", &metrics])
                .arg("--state-dir")
                .arg(&state)
                .arg("--status-socket")
                .arg(dir.join("status.sock"))
                .arg("--events")
                .arg(&events)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .context("starting watchdog")?,
        );
        wait_ready(&metrics, &log)?;
        Ok(Self {
            guard,
            metrics,
            events,
            state,
        })
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Ids of the programs this daemon attached (through the links pinned in its state dir), so
    /// that programs of any other watchdog on the machine are not counted.
    pub fn prog_ids(&self) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.state)? {
            let path = entry?.path();
            if !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
            {
                continue;
            }
            let out = Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(&path)
                .output()
                .context("running bpftool")?;
            let v: Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("bpftool link show {}", path.display()))?;
            ids.extend(v["prog_id"].as_u64());
        }
        anyhow::ensure!(
            !ids.is_empty(),
            "no pinned links in {}",
            self.state.display()
        );
        Ok(ids)
    }

    /// Every action the daemon wrote to its event file, in order.
    pub fn events(&self) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.events).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).context("an event line"))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid we started.
        unsafe { libc::kill(self.guard.pid() as i32, libc::SIGKILL) };
        // Unpinning detaches and frees its programs and maps.
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Starts a server process in its own process group (so its workers die with the guard) and
/// waits for its first stdout line to start with `ready`.
pub fn spawn_server(cmd: &mut Command, ready: &str) -> Result<Guard> {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let out = child.stdout.take().context("server stdout")?;
    let guard = Guard(child);
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line)?;
    anyhow::ensure!(line.starts_with(ready), "{cmd:?} did not start: {line:?}");
    Ok(guard)
}

/// Waits until `port` on loopback accepts connections.
pub fn wait_port(port: u16) -> Result<()> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    anyhow::bail!("nothing listens on port {port} after 20 s")
}

/// min / median / max of a sample.
pub fn spread(v: &[f64]) -> Value {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return json!(null);
    }
    json!({ "min": s[0], "median": s[s.len() / 2], "max": s[s.len() - 1], "n": s.len() })
}

/// The p-th percentile (0..=100) of a sample, nearest rank.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// Distribution summary of lateness samples in ms.
pub fn distribution(v: &[f64]) -> Value {
    json!({
        "n": v.len(),
        "min": percentile(v, 0.0),
        "p50": percentile(v, 50.0),
        "p90": percentile(v, 90.0),
        "p99": percentile(v, 99.0),
        "max": percentile(v, 100.0),
        "samples": v,
    })
}

fn f(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
        None => "–".into(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// The machine and size of a run, the first line of its summary.
fn run_line(r: &Value) -> String {
    let m = &r["machine"];
    format!(
        "Run: {} CPU(s) ({}), Linux {}, {} s{}.\n",
        m["cpus"],
        m["cpu"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        r["seconds"],
        if r["quick"].as_bool() == Some(true) {
            " — QUICK RUN: sizes too small for the figures to mean anything"
        } else {
            ""
        }
    )
}

/// The Markdown summary of one run: every figure and whether its target is met.
fn summary(r: &Value) -> String {
    let o = &r["overhead"];
    let l = &r["lateness"];
    let s = &r["scale"];
    let mut md = String::new();
    let mut w = |line: String| {
        md.push_str(&line);
        md.push('\n');
    };
    w(run_line(r));
    w("### 1. Request-path overhead (nginx + wrk, watched vs. not, alternating rounds)\n".into());
    w(format!(
        "{} rounds of {} s each way, wrk `-t1 -c{}` pinned to CPU 1, nginx (1 worker) to CPU 0.\n",
        o["rounds"], o["round_secs"], o["connections"]
    ));
    w("| ratio watched / baseline | probe set | min | median | max | target |".into());
    w("|---|---|---|---|---|---|".into());
    for (set, x) in [("sock", o), ("syscalls", &o["syscalls"])] {
        let (tput, p50, p99) = (&x["throughput_ratio"], &x["p50_ratio"], &x["p99_ratio"]);
        w(format!(
            "| throughput | {set} | {} | {} | {} | ≥ 0.99: {} |",
            f(&tput["min"]),
            f(&tput["median"]),
            f(&tput["max"]),
            verdict(tput["median"].as_f64().unwrap_or(0.0) >= 0.99)
        ));
        w(format!(
            "| p50 latency | {set} | {} | {} | {} | |",
            f(&p50["min"]),
            f(&p50["median"]),
            f(&p50["max"])
        ));
        w(format!(
            "| p99 latency | {set} | {} | {} | {} | ≤ 1.05: {} |",
            f(&p99["min"]),
            f(&p99["median"]),
            f(&p99["max"]),
            verdict(p99["median"].as_f64().unwrap_or(9.0) <= 1.05)
        ));
    }
    w(format!(
        "\nMedian req/s: baseline {}, watched by the sock set {}, by the syscalls set {}.\n",
        f(&o["baseline_rps"]["median"]),
        f(&o["watched_rps"]["median"]),
        f(&o["syscalls"]["watched_rps"]["median"])
    ));
    let res = &o["throughput_resolution"];
    if res["rounds"].as_u64().unwrap_or(0) < 2 {
        w("One round: no spread to report.\n".into());
    } else {
        w(format!(
            "These rounds cannot resolve a few per cent: the baseline moves {} % between rounds \
         (coefficient of variation) and the per-round throughput ratio has a standard deviation \
         of {}; {} rounds would make a 3 % difference two standard errors wide. The kernel \
         cost below, measured per program run, is the figure this VM can resolve.\n",
            f(&json!(
                res["baseline_cv"].as_f64().unwrap_or(f64::NAN) * 100.0
            )),
            f(&res["ratio_sd"]),
            f(&res["rounds_to_resolve_3pct"])
        ));
    }
    w("### 2. In-kernel cost (kernel.bpf_stats_enabled=1, in turns of their own)\n".into());
    w("| probe set | program | ns per run (median round) | runs per request | target |".into());
    w("|---|---|---|---|---|".into());
    for (set, progs) in [
        ("sock", &o["programs"]),
        ("syscalls", &o["syscalls"]["programs"]),
        ("sock, nginx's port not watched", &o["untracked_programs"]),
    ] {
        if let Some(progs) = progs.as_object() {
            for (name, p) in progs {
                // The programs that every socket of the host runs; the tracked path is
                // judged by its ratio to them (below).
                let hot = (name.starts_with("request_") || name == "syscall_exit")
                    && set.contains("not watched");
                w(format!(
                    "| {set} | {name} | {} | {} | {} |",
                    f(&p["ns_per_run"]),
                    f(&p["runs_per_request"]),
                    if hot {
                        verdict(p["ns_per_run"].as_f64().unwrap_or(1e9) <= 100.0)
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    w("\nA tracked request's own run of the recv and send programs, against the same program on a socket nobody watches (the floor), turns alternating in the same run. A watched turn's ns/run averages nginx's tracked socket with wrk's untracked one, so tracked = runs per request × average − (runs − 1) × floor:\n".into());
    w("| program | floor ns/run | tracked ns/run | ratio (median turn) | ratio min–max | target |".into());
    w("|---|---|---|---|---|---|".into());
    for (key, note) in [
        ("tracked_path", ""),
        ("tracked_path_no_upgrades", ", `upgrades = false`"),
    ] {
        let Some(t) = o[key].as_object() else {
            continue;
        };
        for p in t.values() {
            w(format!(
                "| {}{note} | {} | {} | {} | {}–{} | ≤ {}: {} |",
                p["program"].as_str().unwrap_or(""),
                f(&p["floor_ns"]),
                f(&p["tracked_ns"]),
                f(&p["ratio"]),
                f(&p["ratio_turns"]["min"]),
                f(&p["ratio_turns"]["max"]),
                f(&p["target_ratio"]),
                verdict(p["met"].as_bool() == Some(true))
            ));
        }
    }
    w(format!(
        "\nAll programs together, per request: {} ns (sock set), {} ns (syscalls set), {} ns (sock set, port not watched).\n",
        f(&o["kernel_ns_per_request"]),
        f(&o["syscalls"]["kernel_ns_per_request"]),
        f(&o["untracked_kernel_ns_per_request"])
    ));
    w("### 3. Daemon cost under traffic with no violations\n".into());
    w("| load | req/s | daemon CPU (% of one core) | RSS (MiB) | target |".into());
    w("|---|---|---|---|---|".into());
    if let Some(rates) = o["daemon"].as_array() {
        for d in rates {
            w(format!(
                "| wrk -c{} | {} | {} | {} | ≤ 1% and ≤ 30 MiB: {} |",
                d["connections"],
                f(&d["rps"]),
                f(&d["cpu_pct"]),
                f(&d["rss_mib"]),
                verdict(
                    d["cpu_pct"].as_f64().unwrap_or(99.0) <= 1.0
                        && d["rss_mib"].as_f64().unwrap_or(99.0) <= 30.0
                )
            ));
        }
    }
    w(format!(
        "\nPeak RSS (VmHWM, reached while loading: BTF parsing) {} MiB.\n",
        f(&o["peak_rss_mib"])
    ));
    w("### 4. Enforcement lateness (action time − deadline)\n".into());
    w(format!(
        "Over-budget requests (CPU-bound loops, budget 500 ms, SIGKILL) on {} pre-fork servers × {} workers, sent in waves of as many as the level says, so that that many workers spin at once on {} CPUs. The acting thread in SCHED_FIFO (`watchdog_acting_thread_realtime` = {}), then, at 6×, in the normal class.\n",
        l["servers"], l["workers"], l["cpus"], l["acting_realtime"]
    ));
    w("| spinning workers | acting thread | measured by | n | p50 ms | p90 ms | p99 ms | max ms | target |".into());
    w("|---|---|---|---|---|---|---|---|---|".into());
    for lv in l["levels"].as_array().into_iter().flatten() {
        let class = match lv["class"].as_str() {
            Some("fifo") => "SCHED_FIFO 10",
            Some("nice-20") => "normal, nice -20",
            Some("nice0") => "normal, nice 0 (no CAP_SYS_NICE)",
            _ => "?",
        };
        let load = format!("{} ({}× CPUs)", lv["spinning"], lv["per_cpu"]);
        for (by, key) in [
            ("daemon (due → signal sent)", "daemon"),
            ("of which the kernel timer (due → callback ran)", "timer"),
            ("worker + client (request read by the worker → connection closed at the client − budget)", "client"),
            ("client alone (request sent → connection closed − budget)", "client_from_send"),
        ] {
            let x = &lv[key];
            let target = if key == "daemon" && lv["per_cpu"] == 6 && lv["class"] == "fifo" {
                format!("p99 ≤ 1: {}", verdict(x["p99"].as_f64().unwrap_or(1e9) <= 1.0))
            } else {
                String::new()
            };
            w(format!(
                "| {load} | {class} | {by} | {} | {} | {} | {} | {} | {target} |",
                x["n"],
                f(&x["p50"]),
                f(&x["p90"]),
                f(&x["p99"]),
                f(&x["max"])
            ));
        }
    }
    w(format!(
        "\nSide by side, budget 1 s (uWSGI and gunicorn take whole seconds), {} requests each, client-measured from sending the request:\n",
        l["peer_requests"]
    ));
    w("| system | p50 ms | p90 ms | p99 ms | max ms |".into());
    w("|---|---|---|---|---|".into());
    for (label, key) in [
        ("watchdog (gunicorn app, its timeout off)", "watchdog_1s"),
        ("uWSGI `--harakiri 1`", "uwsgi"),
        ("gunicorn `--timeout 1`", "gunicorn"),
    ] {
        let x = &l[key];
        w(format!(
            "| {label} | {} | {} | {} | {} |",
            f(&x["p50"]),
            f(&x["p90"]),
            f(&x["p99"]),
            f(&x["max"])
        ));
    }
    w("\n### 5. Scale\n".into());
    w("| tracked connections | daemon RSS (MiB) | daemon CPU idle (% of a core) | kernel maps (MiB) |".into());
    w("|---|---|---|---|".into());
    if let Some(levels) = s["levels"].as_array() {
        for lv in levels {
            w(format!(
                "| {} | {} | {} | {} |",
                lv["tracked"],
                f(&lv["rss_mib"]),
                f(&lv["cpu_pct"]),
                f(&lv["kernel_maps_mib"])
            ));
        }
    }
    w(format!(
        "\nSimultaneous deadlines on {} tracked connections (enforced: SIGWINCH to each owning thread, breaker out of the way; event ring {} KiB):\n",
        s["tracked"], s["event_ring_kib"]
    ));
    w("| requests | sent within (ms) | acted on | lateness p50 ms | p99 ms | max ms | events lost | recovered by the sweep | daemon CPU (s) |".into());
    w("|---|---|---|---|---|---|---|---|---|".into());
    if let Some(bursts) = s["bursts"].as_array() {
        for b in bursts {
            let lt = &b["lateness"];
            w(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                b["requests"],
                f(&b["send_spread_ms"]),
                b["acted"],
                f(&lt["p50"]),
                f(&lt["p99"]),
                f(&lt["max"]),
                b["events_lost"],
                b["recovered"],
                f(&b["daemon_cpu_s"])
            ));
        }
    }
    if !r["stacks"].is_null() {
        w("\n### 6. Stacks before the first action\n".into());
        w(stacks::summary(&r["stacks"]));
    }
    w("\n![Latency percentiles with and without the watchdog](bench/figures/overhead-latency.svg)\n\n![Lateness CDFs](bench/figures/lateness-cdf.svg)\n\n![Cost vs. tracked connections](bench/figures/scale.svg)".into());
    md
}

/// Replaces the generated section of BENCHMARKS.md with `md`.
fn splice_benchmarks_md(md: &str) -> Result<()> {
    splice_between(
        "<!-- results:begin (written by cargo xtask bench) -->",
        "<!-- results:end -->",
        md,
    )
}

/// Replaces what lies between the markers `BEGIN` and `END` of BENCHMARKS.md with `md`.
fn splice_between(begin: &str, end: &str, md: &str) -> Result<()> {
    let path = root().join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).context("reading BENCHMARKS.md")?;
    let (head, rest) = text
        .split_once(begin)
        .with_context(|| format!("BENCHMARKS.md has no marker {begin}"))?;
    let (_, tail) = rest
        .split_once(end)
        .with_context(|| format!("BENCHMARKS.md has no marker {end}"))?;
    std::fs::write(path, format!("{head}{begin}\n{md}\n{end}{tail}"))?;
    Ok(())
}
