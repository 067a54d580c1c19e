//! `cargo xtask soak --minutes N`: mixed traffic against the real daemon and the pre-fork test
//! server (watchdog/tests/fixtures/app.py), then the books must balance:
//! every over-budget request acted on exactly once, no other request touched, every fast
//! request answered, the kernel tables back to their baseline, and the daemon's RSS growth, CPU
//! and enforcement lateness within the bounds below. Needs root.
//!
//! Traffic (one thread each): fast requests on new connections; a keep-alive connection with a
//! fast request every 100 ms; a CPU-bound request over the 500 ms budget every ~700 ms; legit
//! 300 ms requests whose client resets the connection (SO_LINGER 0) mid-request; requests that
//! crash their worker (the server re-forks it).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpStream},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use std::os::unix::process::CommandExt;

use anyhow::{bail, ensure, Context, Result};

use crate::{
    harness::{cpu_secs, free_port, metric, rss_kib, wait_ready, Guard},
    root,
};

/// Bounds the books are held to. `cargo xtask soak --minutes 1` on this project's 2-core VM
/// (2026-12-01, beside other test runs) measured: RSS 7708 -> 7828 KiB (+120), CPU 0.18% of a
/// core, lateness p50 0.53 / p99 2.86 / max 4.45 ms over 85 actions. Each bound leaves room for
/// a machine shared with a build; a leak or a busy loop still crosses it. RSS growth over the
/// run (warm-up allocations, not a leak, which would grow with the run's length):
const MAX_RSS_GROWTH_KIB: u64 = 2048;
/// The daemon's CPU time over the run, as a share of one core.
const MAX_CPU_SHARE: f64 = 0.02;
/// p99 of enforcement lateness (action time minus deadline) over every action.
const MAX_LATENESS_P99_MS: f64 = 25.0;
/// The worst single action's lateness.
const MAX_LATENESS_MS: f64 = 100.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Fast,
    KeepAlive,
    Slow,
    Reset,
    Crash,
}

/// One request: its kind, the client's local port (the daemon's `peer`), and whether it was
/// answered.
type Record = (Kind, u16, bool);

pub fn soak(minutes: u64) -> Result<()> {
    crate::cargo(&["build", "--release", "-p", "watchdog"])?;
    let dir = root().join("target/soak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let events = dir.join("events.jsonl");
    let state = format!("/sys/fs/bpf/watchdog-soak-{}", std::process::id());

    let mut app = Guard(
        Command::new("python3")
            .arg(root().join("watchdog/tests/fixtures/app.py"))
            .args([port.to_string(), "4".into()])
            .stdout(Stdio::piped())
            // Its own process group: the guard kills the workers with the parent.
            .process_group(0)
            .spawn()
            .context("starting app.py")?,
    );
    let mut line = String::new();
    BufReader::new(app.0.stdout.take().context("app stdout")?).read_line(&mut line)?;
    ensure!(line.starts_with("READY"), "app.py did not start: {line:?}");

    // ~85 kills a minute is this soak's normal, not a kill spiral: the breaker's default (20 a
    // minute) would rightly switch the policy to observe-only within seconds.
    let config = dir.join("watchdog.toml");
    // Stacks off: the books hold the kill path's lateness and the daemon's own memory; the stack
    // readers' time and caches are the bench's stacks part.
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstacks = false\n\n[[policy]]\nname = \"soak\"\nports = [{port}]\nbudget = \"500ms\"\nsignal = \"SIGKILL\"\n\
             breaker = {{ max_actions = 1000, window = \"1m\", cooldown = \"1m\" }}\n"
        ),
    )?;
    let wd = Guard(
        Command::new(root().join("target/release/watchdog"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .args(["--metrics-addr", &metrics, "--state-dir", &state])
            .arg("--status-socket")
            .arg(dir.join("status.sock"))
            .arg("--events")
            .arg(&events)
            .stderr(std::fs::File::create(dir.join("watchdog.log"))?)
            .spawn()
            .context("starting watchdog")?,
    );
    let result = (|| {
        wait_ready(&metrics, &dir.join("watchdog.log"))?;
        let wd_pid = wd.pid();
        let (rss0, cpu0) = (rss_kib(wd_pid)?, cpu_secs(wd_pid)?);
        let tracked0 = metric(&metrics, "watchdog_tracked_connections")?;

        let records: Arc<Mutex<Vec<Record>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let threads: Vec<_> = [
            Kind::Fast,
            Kind::KeepAlive,
            Kind::Slow,
            Kind::Reset,
            Kind::Crash,
        ]
        .into_iter()
        .map(|kind| {
            let (records, stop) = (records.clone(), stop.clone());
            std::thread::spawn(move || drive(kind, port, &records, &stop))
        })
        .collect();
        std::thread::sleep(Duration::from_secs(minutes * 60));
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("traffic thread")?;
        }
        // Let the last slow request reach its deadline and every close settle.
        std::thread::sleep(Duration::from_millis(1500));
        let records = records.lock().expect("records").clone();
        let (rss1, cpu1) = (rss_kib(wd_pid)?, cpu_secs(wd_pid)?);
        let tracked1 = metric(&metrics, "watchdog_tracked_connections")?;
        let in_flight = metric(&metrics, "watchdog_requests_in_flight")?;
        let trips = metric(&metrics, "watchdog_breaker_trips_total")?;
        check(
            &records,
            &std::fs::read_to_string(&events)?,
            Figures {
                secs: started.elapsed().as_secs_f64(),
                rss0,
                rss1,
                cpu: cpu1 - cpu0,
                tracked0,
                tracked1,
                in_flight,
                trips,
            },
        )
    })();
    drop(wd);
    let _ = std::fs::remove_dir_all(&state);
    result
}

struct Figures {
    secs: f64,
    rss0: u64,
    rss1: u64,
    cpu: f64,
    tracked0: f64,
    tracked1: f64,
    in_flight: f64,
    trips: f64,
}

fn check(records: &[Record], events: &str, f: Figures) -> Result<()> {
    let mut acted: HashMap<u16, u32> = HashMap::new();
    let mut lateness = Vec::new();
    for l in events.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        let peer = v["peer"].as_str().unwrap_or_default();
        let port: u16 = peer.rsplit(':').next().unwrap_or_default().parse()?;
        *acted.entry(port).or_default() += 1;
        lateness.push(v["lateness_ms"].as_f64().unwrap_or(f64::NAN));
    }
    lateness.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lateness
            .get(((lateness.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let count = |k: Kind| records.iter().filter(|r| r.0 == k).count();
    let mut problems = Vec::new();
    // Client ports are reused over a long run, so the books balance per port: each port saw as
    // many actions as slow requests came from it (one each), and a port that only ever carried
    // other requests saw none.
    let mut slow_from: HashMap<u16, u32> = HashMap::new();
    for &(kind, port, answered) in records {
        if kind == Kind::Slow {
            *slow_from.entry(port).or_default() += 1;
        }
        if matches!(kind, Kind::Fast | Kind::KeepAlive) && !answered {
            problems.push(format!("{kind:?} request from :{port} not answered"));
        }
    }
    for &(kind, port, _) in records {
        let want = slow_from.get(&port).copied().unwrap_or(0);
        let got = acted.get(&port).copied().unwrap_or(0);
        if got != want {
            problems.push(format!(
                "port :{port} ({kind:?}): {got} actions for {want} slow requests"
            ));
        }
    }
    let known: std::collections::HashSet<u16> = records.iter().map(|r| r.1).collect();
    problems.extend(
        acted
            .keys()
            .filter(|p| !known.contains(p))
            .map(|p| format!("action on unknown peer :{p}")),
    );
    problems.sort();
    problems.dedup();
    if f.tracked1 != f.tracked0 {
        problems.push(format!(
            "tracked connections {} -> {}",
            f.tracked0, f.tracked1
        ));
    }
    if f.trips != 0.0 {
        problems.push(format!("the kill-rate breaker tripped {} times", f.trips));
    }
    if f.in_flight != 0.0 {
        problems.push(format!("{} requests still in flight", f.in_flight));
    }
    println!(
        "soak: {:.0} s; requests fast {}, keep-alive {}, slow {}, reset {}, crash {}; actions {}; \
         lateness ms p50 {:.2} p99 {:.2} max {:.2}; daemon RSS {} -> {} KiB, CPU {:.2} s ({:.2}% of a core); \
         tracked connections {} -> {}",
        f.secs,
        count(Kind::Fast),
        count(Kind::KeepAlive),
        count(Kind::Slow),
        count(Kind::Reset),
        count(Kind::Crash),
        lateness.len(),
        pct(0.5),
        pct(0.99),
        lateness.last().copied().unwrap_or(f64::NAN),
        f.rss0,
        f.rss1,
        f.cpu,
        100.0 * f.cpu / f.secs,
        f.tracked0,
        f.tracked1,
    );
    problems.extend(bounds(&f, pct(0.99), lateness.last().copied()));
    if count(Kind::Slow) == 0 || count(Kind::Fast) == 0 {
        problems.push("no traffic of some kind was sent".into());
    }
    if !problems.is_empty() {
        bail!(
            "soak found {} problem(s):\n{}",
            problems.len(),
            problems.join("\n")
        );
    }
    Ok(())
}

/// The resource and lateness books: each figure over its bound is a problem.
fn bounds(f: &Figures, p99_ms: f64, max_ms: Option<f64>) -> Vec<String> {
    let mut problems = Vec::new();
    let growth = f.rss1.saturating_sub(f.rss0);
    if growth > MAX_RSS_GROWTH_KIB {
        problems.push(format!(
            "daemon RSS grew {growth} KiB ({} -> {}), bound {MAX_RSS_GROWTH_KIB} KiB",
            f.rss0, f.rss1
        ));
    }
    let share = f.cpu / f.secs;
    if !(0.0..=MAX_CPU_SHARE).contains(&share) {
        problems.push(format!(
            "daemon CPU {:.2}% of a core, bound {:.0}%",
            100.0 * share,
            100.0 * MAX_CPU_SHARE
        ));
    }
    // NaN (no action, or a record without lateness) fails too: the books must hold figures.
    if !(0.0..=MAX_LATENESS_P99_MS).contains(&p99_ms) {
        problems.push(format!(
            "lateness p99 {p99_ms:.2} ms, bound {MAX_LATENESS_P99_MS} ms"
        ));
    }
    let max_ms = max_ms.unwrap_or(f64::NAN);
    if !(0.0..=MAX_LATENESS_MS).contains(&max_ms) {
        problems.push(format!(
            "lateness max {max_ms:.2} ms, bound {MAX_LATENESS_MS} ms"
        ));
    }
    problems
}

/// One traffic thread until `stop`.
fn drive(kind: Kind, port: u16, records: &Mutex<Vec<Record>>, stop: &AtomicBool) -> Result<()> {
    let mut keep: Option<TcpStream> = None;
    while !stop.load(Ordering::Relaxed) {
        let record = match kind {
            Kind::Fast => {
                let mut c = connect(port)?;
                let ok = get(&mut c, "/fast").is_ok_and(|b| b.starts_with("fast"));
                std::thread::sleep(Duration::from_millis(20));
                (kind, local_port(&c), ok)
            }
            Kind::KeepAlive => {
                let c = match keep.as_mut() {
                    Some(c) => c,
                    None => keep.insert(connect(port)?),
                };
                let ok = get(c, "/fast").is_ok_and(|b| b.starts_with("fast"));
                let p = local_port(c);
                std::thread::sleep(Duration::from_millis(100));
                (kind, p, ok)
            }
            Kind::Slow => {
                let mut c = connect(port)?;
                let ok = get(&mut c, "/slow").is_ok();
                std::thread::sleep(Duration::from_millis(200));
                (kind, local_port(&c), ok)
            }
            Kind::Reset => {
                let mut c = connect(port)?;
                c.write_all(b"GET /wait?ms=300 HTTP/1.1\r\nHost: s\r\n\r\n")?;
                std::thread::sleep(Duration::from_millis(50));
                let p = local_port(&c);
                reset(c);
                std::thread::sleep(Duration::from_millis(400));
                (kind, p, false)
            }
            Kind::Crash => {
                let mut c = connect(port)?;
                let _ = get(&mut c, "/crash");
                std::thread::sleep(Duration::from_millis(1000));
                (kind, local_port(&c), false)
            }
        };
        records.lock().expect("records").push(record);
    }
    if let Some(c) = keep {
        let _ = c.shutdown(Shutdown::Both);
    }
    Ok(())
}

/// Closes with SO_LINGER 0: the server gets a RST.
fn reset(c: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a valid pointer and length.
    unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
}

fn connect(port: u16) -> Result<TcpStream> {
    let c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(c)
}

fn local_port(c: &TcpStream) -> u16 {
    c.local_addr().map(|a| a.port()).unwrap_or(0)
}

/// One request on a connection; the body of a Content-Length framed answer.
fn get(c: &mut TcpStream, path: &str) -> std::io::Result<String> {
    write!(c, "GET {path} HTTP/1.1\r\nHost: s\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = c.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return Ok(body.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> Figures {
        Figures {
            secs: 60.0,
            rss0: 8000,
            rss1: 8500,
            cpu: 0.6,
            tracked0: 0.0,
            tracked1: 0.0,
            in_flight: 0.0,
            trips: 0.0,
        }
    }

    #[test]
    fn books_within_their_bounds_pass_and_each_one_over_fails() {
        assert!(bounds(&figures(), 5.0, Some(20.0)).is_empty());
        let leak = Figures {
            rss1: 8000 + MAX_RSS_GROWTH_KIB + 1,
            ..figures()
        };
        assert_eq!(bounds(&leak, 5.0, Some(20.0)).len(), 1);
        let busy = Figures {
            cpu: 60.0 * MAX_CPU_SHARE * 1.1,
            ..figures()
        };
        assert_eq!(bounds(&busy, 5.0, Some(20.0)).len(), 1);
        assert_eq!(
            bounds(&figures(), MAX_LATENESS_P99_MS + 1.0, Some(20.0)).len(),
            1
        );
        assert_eq!(
            bounds(&figures(), 5.0, Some(MAX_LATENESS_MS + 1.0)).len(),
            1
        );
        // No action recorded at all is not "within bounds".
        assert_eq!(bounds(&figures(), f64::NAN, None).len(), 2);
    }
}
