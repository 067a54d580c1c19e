//! Issue 29: a target the daemon cannot read does not stop the node, and an event stream nobody
//! reads does not grow the daemon.

mod common;

use std::{
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use common::*;

/// A stalled FUSE filesystem, mounted for the test; killed and lazily unmounted on drop (the
/// kill aborts its connection, so every read stalled on it fails and its readers go on).
struct StalledFs {
    server: Option<Proc>,
    mnt: std::path::PathBuf,
}

impl StalledFs {
    fn mount() -> Self {
        let mnt = tmpdir("stallfs");
        let server = spawn_ready(
            "stall_fs.py",
            Command::new("python3")
                .arg(fixture("stall_fs.py"))
                .arg(&mnt),
        );
        Self {
            server: Some(server),
            mnt,
        }
    }

    /// Unstalls: the server's end goes, the kernel fails what waited on it.
    fn release(&mut self) {
        self.server = None;
    }
}

impl Drop for StalledFs {
    fn drop(&mut self) {
        self.release();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Is `/proc/PID/cmdline` unreadable (its read blocked on the memory lock) for `within`?
fn cmdline_blocks(pid: u32, within: Duration) -> bool {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::fs::read(format!("/proc/{pid}/cmdline"));
        let _ = tx.send(());
    });
    rx.recv_timeout(within).is_err()
}

#[test]
fn a_worker_stuck_on_its_memory_lock_does_not_hold_up_other_actions() {
    require_root();
    let mut fs = StalledFs::mount();
    let (stuck_port, port) = (free_port(), free_port());
    let mut worker = spawn_ready(
        "mmap_stuck.py",
        Command::new("python3")
            .arg(fixture("mmap_stuck.py"))
            .arg(stuck_port.to_string())
            .arg(fs.mnt.join("f")),
    );
    let _app = app(port, 2, &[]);
    let events = tmpdir("stuck-events").join("events.jsonl");
    let d = Daemon::start(&[
        "--port",
        &stuck_port.to_string(),
        "--port",
        &port.to_string(),
        "--budget",
        "1s",
        "--signal",
        "SIGKILL",
        "--target",
        "process",
        "--events",
        events.to_str().unwrap(),
    ]);
    let stuck = timed(move || http_get(&local(stuck_port), "/stuck", Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(500));
    // The worker's memory lock is held: a reader of its cmdline waits (as `ps` would).
    assert!(
        cmdline_blocks(worker.pid(), Duration::from_millis(200)),
        "the worker's /proc/PID/cmdline should block"
    );
    // Another server's request, due 500 ms after the stuck one's deadline.
    let slow = timed(move || http_get(&local(port), "/slow", Duration::from_secs(10)));
    let (took, result) = slow.join().unwrap();
    assert!(result.is_err(), "the slow request should have been cut off");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1300),
        "the other server's request was killed after {took:?}: the stuck target held up the acting thread"
    );
    // The stuck worker was acted on too (a signal takes no lock); its diagnosis timed out.
    let read = || std::fs::read_to_string(&events).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(2), || read()
            .lines()
            .any(|l| l.contains(&format!("\"port\":{stuck_port}")))),
        "no record of the stuck worker: {}",
        read()
    );
    let rec: serde_json::Value = read()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["port"] == stuck_port)
        .unwrap();
    assert_eq!(rec["result"], "delivered", "{rec}");
    assert!(
        rec["diagnosis_error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out")),
        "{rec}"
    );
    assert!(
        rec["lateness_ms"].as_f64().unwrap() < 200.0,
        "the stuck worker's own action waited: {rec}"
    );
    // Unstalled, the killed worker finishes dying (its stuck thread was in the kernel).
    fs.release();
    assert!(
        wait_until(Duration::from_secs(5), || !worker.alive()),
        "the stuck worker was not killed"
    );
    let _ = stuck.join();
    drop(d);
}

/// Resident set size of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn an_event_stream_nobody_reads_keeps_memory_flat_and_counts_what_it_drops() {
    require_root();
    let port = free_port();
    let _app = threaded(port);
    let dir = tmpdir("events-fifo");
    let fifo = dir.join("events.fifo");
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // A reader that opens the FIFO and never reads: the pipe fills (64 KiB) and stays full.
    let _reader = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap()
    };
    let d = Daemon::start(&[
        "--port",
        &port.to_string(),
        "--budget",
        "20ms",
        "--signal",
        "SIGUSR1",
        "--target",
        "thread",
        "--events",
        fifo.to_str().unwrap(),
    ]);
    let pid = d.proc.pid();
    let mut rss = Vec::new();
    let mut late = Vec::new();
    for round in 0..6 {
        let clients: Vec<_> = (0..100)
            .map(|_| {
                std::thread::spawn(move || {
                    let t = Instant::now();
                    let _ = http_get(&local(port), "/wait?ms=200", Duration::from_secs(5));
                    t.elapsed()
                })
            })
            .collect();
        let took: Vec<Duration> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        late.push(*took.iter().max().unwrap());
        rss.push(rss_kib(pid));
        eprintln!(
            "round {round}: rss {} KiB, slowest {:?}",
            rss[round], late[round]
        );
    }
    let dropped = d.metric("watchdog_records_dropped_total", &[]);
    let acted = sum(&d.scrape(), "watchdog_actions_total", &[]);
    assert!(acted >= 500.0, "actions taken: {acted}");
    assert!(
        dropped > 0.0,
        "nothing dropped although nobody reads the stream"
    );
    // Flat: the last rounds grow the daemon by less than 4 MiB over the second.
    assert!(rss[5] < rss[1] + 4096, "rss grew: {rss:?}");
    // Lateness unchanged: the last round is no slower than the first by much.
    assert!(
        late[5] < late[0] + Duration::from_millis(100),
        "slower as records piled up: {late:?}"
    );
}
