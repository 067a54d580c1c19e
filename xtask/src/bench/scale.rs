//! Part 5: tens of thousands of idle keep-alive connections on a watched port (what the daemon
//! and the kernel maps cost as the count grows), then bursts of requests whose deadlines all fall
//! together, enforced: each is signalled (SIGWINCH to the owning thread, which the servers
//! ignore, so they survive) with the breaker out of the way: every one acted on, how late,
//! whether any event was lost.
//!
//! For working on the bursts alone (`--only scale`): `WATCHDOG_BENCH_BURSTS=5000,5000,1000`
//! sends those bursts instead of the plan's (each on connections of its own, so their sum stays
//! within the largest level), and `WATCHDOG_BENCH_SKIP_LEVELS=1` opens the connections without
//! measuring each level's footprint; `WATCHDOG_BENCH_DAEMON=/path/to/watchdog` runs another
//! build of the daemon (a baseline, side by side under the same load). None changes the full
//! bench.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use super::{distribution, spawn_server, sysctl, wait_port, Daemon, Plan};
use crate::{
    harness::{cpu_secs, free_port, metric, rss_kib},
    root,
};

const EVENT_RING_KIB: u32 = 1024;
const BUDGET_MS: u64 = 2000;

pub fn run(plan: &Plan, work: &Path) -> Result<Value> {
    let max = *plan.levels.iter().max().context("no levels")?;
    let burst_sizes = match std::env::var("WATCHDOG_BENCH_BURSTS") {
        Ok(v) => v
            .split(',')
            .map(|n| n.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .context("WATCHDOG_BENCH_BURSTS: a comma-separated list of request counts")?,
        Err(_) => plan.bursts.clone(),
    };
    let skip_levels = std::env::var_os("WATCHDOG_BENCH_SKIP_LEVELS").is_some();
    ensure!(
        max >= burst_sizes.iter().sum::<usize>(),
        "the bursts need their own connections"
    );
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let _restore = Restore(range.trim().replace('\t', " "));
    sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    sysctl("net.core.somaxconn", "65535")?;
    sysctl("net.ipv4.tcp_max_syn_backlog", "65535")?;

    // No CAP_SYS_RESOURCE here: a process cannot hold more than its hard RLIMIT_NOFILE (20k on
    // these machines), so the connections are spread over several servers and client processes.
    let groups = max.div_ceil(PER_PROCESS);
    let dir = work.join("scale");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("holder.py"), HOLDER)?;
    let ports: Vec<u16> = (0..groups).map(|_| free_port()).collect::<Result<_>>()?;
    let _servers = ports
        .iter()
        .map(|p| {
            spawn_server(
                Command::new("python3")
                    .arg(root().join("watchdog/tests/fixtures/hang.py"))
                    .arg(p.to_string()),
                "READY",
            )
        })
        .collect::<Result<Vec<_>>>()?;
    for p in &ports {
        wait_port(*p)?;
    }
    let list = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    // A real signal per request (pidfd_open + still-current check + pidfd_send_signal), which
    // the servers ignore; the breaker's default would stop a burst after 20.
    let config = format!(
        "[daemon]\nstacks = false\nevent_buffer_kib = {EVENT_RING_KIB}\n\n\
         [[policy]]\nname = \"scale\"\nports = [{list}]\nbudget = \"{BUDGET_MS}ms\"\n\
         signal = \"SIGWINCH\"\ntarget = \"thread\"\n\
         breaker = {{ max_actions = 100000, window = \"1m\", cooldown = \"1s\" }}\n"
    );
    let d = match std::env::var_os("WATCHDOG_BENCH_DAEMON") {
        Some(bin) => Daemon::start_bin(Path::new(&bin), work, "scale", &config, &[])?,
        None => Daemon::start(work, "scale", &config, &[])?,
    };
    let mut holders = ports
        .iter()
        .map(|p| Holder::start(&dir, *p))
        .collect::<Result<Vec<_>>>()?;

    let mut levels = Vec::new();
    if !skip_levels {
        levels.push(level(&d, 0)?);
    }
    for &n in &plan.levels {
        // Spread evenly: holder k holds its share of n.
        for (k, h) in holders.iter_mut().enumerate() {
            h.ask(&format!("open {}", share(n, groups, k)))?;
        }
        let tracked = wait_metric(&d, "watchdog_tracked_connections", n as f64)?;
        ensure!(
            tracked == n as f64,
            "{tracked} connections tracked of {n} open"
        );
        if !skip_levels {
            levels.push(level(&d, n)?);
        }
    }

    // Bursts, each on connections of its own, sent by every holder at once: all requests are
    // out before any deadline can fall, so the deadlines land within the time it takes to send.
    let mut bursts = Vec::new();
    for &n in &burst_sizes {
        let mut stream = Tail::open(&d.events)?;
        let lost0 = metric(&d.metrics, "watchdog_events_lost_total")?;
        let recovered0 = metric(&d.metrics, "watchdog_deadlines_recovered_total")?;
        let cpu0 = cpu_secs(d.pid())?;
        let t0 = Instant::now();
        for (k, h) in holders.iter_mut().enumerate() {
            h.say(&format!("send {}", share(n, groups, k)))?;
        }
        for h in &mut holders {
            h.answer()?;
        }
        let spread_ms = t0.elapsed().as_secs_f64() * 1e3;
        let until = t0 + Duration::from_millis(BUDGET_MS) + Duration::from_secs(30);
        // Only the new bytes are read while the burst is acted on, and their lines counted, not
        // parsed: parsing the whole stream every 200 ms (20,000 records with their diagnoses,
        // in a debug build) kept a CPU busy beside the daemon through the burst.
        let acted = loop {
            if stream.lines()? >= n || Instant::now() > until {
                break stream.records()?;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        // Let the daemon finish the batch before reading its CPU time.
        std::thread::sleep(Duration::from_millis(500));
        let lateness: Vec<f64> = acted
            .iter()
            .filter_map(|e| e["lateness_ms"].as_f64())
            .collect();
        let delivered = acted.iter().filter(|e| e["result"] == "delivered").count();
        let mut lt = distribution(&lateness);
        lt.as_object_mut().map(|o| o.remove("samples"));
        bursts.push(json!({
            "requests": n,
            "send_spread_ms": spread_ms,
            "acted": acted.len(),
            "delivered": delivered,
            "lateness": lt,
            "events_lost": metric(&d.metrics, "watchdog_events_lost_total")? - lost0,
            "recovered": metric(&d.metrics, "watchdog_deadlines_recovered_total")? - recovered0,
            "daemon_cpu_s": cpu_secs(d.pid())? - cpu0,
        }));
        ensure!(
            acted.len() == n && delivered == n,
            "{} of {n} simultaneous deadlines acted on, {delivered} signals delivered",
            acted.len()
        );
    }
    Ok(json!({
        "levels": levels,
        "tracked": max,
        "servers": groups,
        "event_ring_kib": EVENT_RING_KIB,
        "budget_ms": BUDGET_MS,
        "bursts": bursts,
    }))
}

/// Connections per server and per client process (under the 20k descriptor limit).
const PER_PROCESS: usize = 15_000;

/// Item k's share when n is split over `parts`.
fn share(n: usize, parts: usize, k: usize) -> usize {
    n / parts + usize::from(k < n % parts)
}

/// A client process holding connections to one server; told over stdin to open more
/// (`open N`: until it holds N) or to send `GET /hang` on the next K idle ones (`send K`).
const HOLDER: &str = r#"import socket, sys
port = int(sys.argv[1])
conns, used = [], 0
for line in sys.stdin:
    cmd, n = line.split()
    n = int(n)
    if cmd == "open":
        while len(conns) < n:
            conns.append(socket.create_connection(("127.0.0.1", port)))
    elif cmd == "send":
        for c in conns[used:used + n]:
            c.sendall(b"GET /hang HTTP/1.1\r\nHost: bench\r\n\r\n")
        used += n
    print("ok", len(conns), used, flush=True)
"#;

struct Holder {
    _guard: crate::harness::Guard,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Holder {
    fn start(dir: &Path, port: u16) -> Result<Self> {
        let mut child = Command::new("python3")
            .arg(dir.join("holder.py"))
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a connection holder")?;
        let stdin = child.stdin.take().context("holder stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("holder stdout")?);
        Ok(Self {
            _guard: crate::harness::Guard(child),
            stdin,
            stdout,
        })
    }

    fn say(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.stdin, "{cmd}")?;
        Ok(self.stdin.flush()?)
    }

    fn answer(&mut self) -> Result<()> {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        ensure!(line.starts_with("ok"), "connection holder failed: {line:?}");
        Ok(())
    }

    fn ask(&mut self, cmd: &str) -> Result<()> {
        self.say(cmd)?;
        self.answer()
    }
}

/// The daemon's footprint with `n` idle connections tracked.
fn level(d: &Daemon, n: usize) -> Result<Value> {
    std::thread::sleep(Duration::from_secs(1));
    let secs = 5.0;
    let cpu0 = cpu_secs(d.pid())?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let cpu = cpu_secs(d.pid())? - cpu0;
    Ok(json!({
        "tracked": n,
        "rss_mib": rss_kib(d.pid())? as f64 / 1024.0,
        "cpu_pct": 100.0 * cpu / secs,
        "kernel_maps_mib": map_memlock(d.pid())? as f64 / (1024.0 * 1024.0),
    }))
}

/// Waits up to 30 s for a metric to reach `want`; returns its last value.
fn wait_metric(d: &Daemon, name: &str, want: f64) -> Result<f64> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let v = metric(&d.metrics, name)?;
        if v >= want || Instant::now() > until {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Bytes the kernel charges for the BPF maps the process holds (`memlock` of each map fd).
fn map_memlock(pid: u32) -> Result<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(fd?.path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        // A map held through several fds counts once.
        let Some(id) = field("map_id:") else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        total += field("memlock:").unwrap_or(0);
    }
    Ok(total)
}

/// The event stream from where it ended when opened: complete lines written since.
struct Tail {
    file: std::fs::File,
    bytes: Vec<u8>,
    lines: usize,
}

impl Tail {
    fn open(path: &Path) -> Result<Self> {
        use std::io::Seek;
        let mut file = std::fs::File::open(path).context("opening the event stream")?;
        file.seek(std::io::SeekFrom::End(0))?;
        Ok(Self {
            file,
            bytes: Vec::new(),
            lines: 0,
        })
    }

    /// Complete lines so far (reads what was appended since the last call).
    fn lines(&mut self) -> Result<usize> {
        use std::io::Read;
        let from = self.bytes.len();
        self.file.read_to_end(&mut self.bytes)?;
        self.lines += self.bytes[from..].iter().filter(|&&b| b == b'\n').count();
        Ok(self.lines)
    }

    /// The complete lines, parsed.
    fn records(&mut self) -> Result<Vec<Value>> {
        self.lines()?;
        let end = self
            .bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        std::str::from_utf8(&self.bytes[..end])?
            .lines()
            .map(|l| serde_json::from_str(l).context("an event line"))
            .collect()
    }
}

/// Puts the local port range back when the benchmark ends, however it ends.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = sysctl("net.ipv4.ip_local_port_range", &self.0);
    }
}
