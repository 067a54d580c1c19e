//! Pieces shared by the soak and the benchmarks: child processes that die with their guard, the
//! daemon's HTTP endpoints, and /proc readings of a process's CPU and memory.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Kills the child (and its process group, if it leads one) and waits for it when dropped.
pub struct Guard(pub Child);

impl Guard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a process group id; no memory is involved.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One HTTP/1.0 GET; the whole answer, headers included.
pub fn http(addr: &str, path: &str) -> Result<String> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    Ok(s)
}

/// Waits for the daemon's `/readyz` on `metrics`; its log is at `log`.
pub fn wait_ready(metrics: &str, log: &Path) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        // 200 and the body `ready` (a starting daemon answers 503 `not ready`).
        let ready = |r: &str| {
            r.starts_with("HTTP/1.")
                && r.split_whitespace().nth(1) == Some("200")
                && r.rsplit("\r\n\r\n").next().map(str::trim) == Some("ready")
        };
        if http(metrics, "/readyz").is_ok_and(|r| ready(&r)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("watchdog not ready in 30 s (see {})", log.display())
}

/// Sum of the samples of `name` (no suffixed names) whose label text contains `labels`.
pub fn metric_with(addr: &str, name: &str, labels: &str) -> Result<f64> {
    Ok(http(addr, "/metrics")?
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with(&format!("{name}_")))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Sum of a metric's samples.
pub fn metric(addr: &str, name: &str) -> Result<f64> {
    metric_with(addr, name, "")
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} of {pid}"))
}

pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// User + system CPU seconds the process has used.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Every bpffs directory prefix a test, benchmark or soak daemon pins under, each followed by
/// the pid of the process that made it.
pub const PIN_PREFIXES: &[&str] = &["watchdog-test-", "watchdog-bench-", "watchdog-soak-"];

/// Removes bpffs state that test, benchmark or soak daemons of processes no longer alive left pinned
/// (a run killed before its cleanup): pinned programs stay attached, and would run on every
/// socket operation or syscall of the machine, skewing whatever runs next.
pub fn remove_stale_pins() -> Result<()> {
    remove_pins(false)
}

/// Removes the pinned state under every [`PIN_PREFIXES`] directory whose owner is gone, and
/// with `own` also this process's (its daemons have all stopped: the end of `cargo xtask test`).
pub fn remove_pins(own: bool) -> Result<()> {
    let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") else {
        return Ok(());
    };
    for entry in dir {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(rest) = PIN_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) else {
            continue;
        };
        let owner = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let gone = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists();
        if owner.is_some_and(|pid| gone(pid) || (own && pid == std::process::id())) {
            eprintln!("xtask: removing pinned state {}", path.display());
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}
