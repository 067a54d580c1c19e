//! A traced process cannot crash, bloat or wedge the daemon through what it maps: the owner of
//! an over-budget request (a C server, `fixtures/hostile.c`) truncates a file it maps while the
//! daemon reads it, maps a sparse ELF that claims a 512 MiB `.eh_frame`, or leaves a FIFO at
//! `/tmp/perf-PID.map`. Each time the daemon lives, the action happens, and the daemon's memory
//! and threads stay bounded (stacks on, native frames read).

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;

/// The DaemonSet's memory limit.
const LIMIT_BYTES: u64 = 256 << 20;

/// Builds `fixtures/hostile.c` into `dir`.
fn build(dir: &Path) -> PathBuf {
    let out = dir.join("hostile");
    let ok = Command::new("gcc")
        .args(["-O1", "-g0", "-pthread", "-o"])
        .arg(&out)
        .arg(fixture("hostile.c"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "gcc failed");
    out
}

/// A field of `/proc/PID/status` (`VmHWM` in bytes, `Threads` as is).
fn status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {text}"));
    let n: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    if line.ends_with("kB") {
        n * 1024
    } else {
        n
    }
}

/// A daemon with stacks on whose policies are `(name, port, signal)`, each with a 300 ms
/// budget; its events file.
fn daemon(dir: &Path, policies: &[(&str, u16, &str)]) -> (Daemon, PathBuf) {
    let cfg = dir.join("watchdog.toml");
    let events = dir.join("events.jsonl");
    let mut text = format!(
        "[daemon]\nstacks = true\nnative_stacks = true\nstack_timeout = \"200ms\"\n\
         events = {events:?}\n"
    );
    for (name, port, signal) in policies {
        text.push_str(&format!(
            "\n[[policy]]\nname = \"{name}\"\nports = [{port}]\nbudget = \"300ms\"\n\
             signal = \"{signal}\"\n"
        ));
    }
    std::fs::write(&cfg, text).unwrap();
    (Daemon::start(&["--config", cfg.to_str().unwrap()]), events)
}

/// The event records written so far, once there are at least `n` (waits up to 5 s).
fn records(events: &Path, n: usize) -> Vec<serde_json::Value> {
    let mut r = Vec::new();
    wait_until(Duration::from_secs(5), || {
        r = std::fs::read_to_string(events)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        r.len() >= n
    });
    assert!(r.len() >= n, "{} records, wanted {n}: {r:?}", r.len());
    r
}

/// One over-budget request to `port`: the client gives up after `wait`.
fn stuck_request(port: u16, wait: Duration) {
    let r = http_get(&local(port), "/hostile", wait);
    assert!(r.is_err(), "answered: {r:?}");
}

/// The names of a record's native frames (it must have some).
fn functions(record: &serde_json::Value) -> Vec<String> {
    let n = &record["native_stack"];
    assert!(n["error"].is_null(), "native stack: {n}");
    n["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The hostile server in `mode`, on a fresh port, built in `dir`.
fn hostile(dir: &Path, bin: &Path, mode: &str) -> (Proc, u16) {
    let port = free_port();
    let p = spawn_ready(
        "hostile",
        Command::new(bin).arg(port.to_string()).arg(dir).arg(mode),
    );
    (p, port)
}

#[test]
fn a_target_truncating_a_file_it_maps_while_it_is_read_leaves_the_daemon_alive() {
    require_root();
    let dir = tmpdir("hostile-truncate");
    let bin = build(&dir);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let (mut d, events) = daemon(
        &dir,
        &[
            ("t0", ports[0], "SIGKILL"),
            ("t1", ports[1], "SIGKILL"),
            ("t2", ports[2], "SIGKILL"),
        ],
    );
    // Three targets, one after the other, each with a file of its own that shrinks and grows
    // all the time: every read of it by the daemon races a truncation.
    for (i, &port) in ports.iter().enumerate() {
        let sub = dir.join(format!("t{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        let mut server = spawn_ready(
            "hostile",
            Command::new(&bin)
                .arg(port.to_string())
                .arg(&sub)
                .arg("truncate"),
        );
        stuck_request(port, Duration::from_secs(3));
        assert!(
            wait_until(Duration::from_secs(2), || !server.alive()),
            "the action still happened"
        );
        let r = records(&events, i + 1);
        let rec = &r[i];
        assert_eq!(rec["result"], "delivered", "{rec}");
        assert_eq!(rec["pid"], server.pid(), "{rec}");
        println!("truncating target {i}: native {}", rec["native_stack"]);
        assert!(
            functions(rec).iter().any(|f| f == "stuck_in_handler"),
            "{rec}"
        );
        assert!(d.proc.alive(), "the daemon died reading a truncated file");
    }
    assert!(d.proc.alive(), "the daemon lives");
}

#[test]
fn a_sparse_elf_claiming_a_512_mib_eh_frame_does_not_bloat_the_daemon() {
    require_root();
    let dir = tmpdir("hostile-sparse");
    let bin = build(&dir);
    let port = free_port();
    let (mut d, events) = daemon(&dir, &[("sparse", port, "SIGKILL")]);
    let before = status(d.proc.pid(), "VmHWM");
    let (mut server, p) = {
        let port_arg = port.to_string();
        let s = spawn_ready(
            "hostile",
            Command::new(&bin).arg(&port_arg).arg(&dir).arg("sparse"),
        );
        (s, port)
    };
    let sparse = dir.join("sparse.elf");
    let meta = std::fs::metadata(&sparse).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.len() > 512 << 20 && meta.blocks() * 512 <= 64 << 10,
        "a sparse file: {} bytes long, {} bytes on disk",
        meta.len(),
        meta.blocks() * 512
    );
    stuck_request(p, Duration::from_secs(3));
    assert!(
        wait_until(Duration::from_secs(2), || !server.alive()),
        "the action still happened"
    );
    let r = records(&events, 1);
    assert_eq!(r[0]["result"], "delivered", "{}", r[0]);
    println!("sparse target: native {}", r[0]["native_stack"]);
    // The target's own frames are still read and named: only the hostile file is refused.
    assert!(
        functions(&r[0]).iter().any(|f| f == "stuck_in_handler"),
        "{}",
        r[0]
    );
    assert!(d.proc.alive(), "the daemon lives");
    let peak = status(d.proc.pid(), "VmHWM");
    println!(
        "daemon peak RSS: {} MiB before the read, {} MiB after",
        before >> 20,
        peak >> 20
    );
    assert!(peak < LIMIT_BYTES, "peak RSS {peak} bytes");
    assert!(
        peak < before + (64 << 20),
        "the read grew the daemon by {} MiB",
        (peak - before) >> 20
    );
}

#[test]
fn a_fifo_at_the_perf_map_path_wedges_no_reader_and_costs_no_threads() {
    require_root();
    let dir = tmpdir("hostile-fifo");
    let bin = build(&dir);
    let (hostile_proc, hport) = hostile(&dir, &bin, "fifo");
    let fifo = format!("/tmp/perf-{}.map", hostile_proc.pid());
    let _cleanup = Cleanup(fifo.clone());
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let nport = free_port();
    let (mut d, events) = daemon(
        &dir,
        &[("hostile", hport, "SIGWINCH"), ("normal", nport, "SIGKILL")],
    );
    // Several actions on the hostile target (SIGWINCH leaves it running, one thread stuck per
    // request): the daemon's threads after the first are its threads after the last.
    let mut threads = Vec::new();
    for i in 0..4 {
        stuck_request(hport, Duration::from_millis(700));
        let r = records(&events, i + 1);
        assert_eq!(r[i]["result"], "delivered", "{}", r[i]);
        assert_eq!(r[i]["policy"], "hostile", "{}", r[i]);
        assert!(
            functions(&r[i]).iter().any(|f| f == "stuck_in_handler"),
            "{}",
            r[i]
        );
        threads.push(status(d.proc.pid(), "Threads"));
    }
    println!("daemon threads after each hostile action: {threads:?}");
    assert!(
        threads.iter().all(|&t| t <= threads[0] + 1),
        "threads grew per action: {threads:?}"
    );
    // A normal server's over-budget request after them: acted on with its usual lateness,
    // its native stack read in full (no reader wedged behind the FIFO).
    let bin_stuck = dir.join("stuck");
    assert!(Command::new("gcc")
        .args(["-O1", "-g0", "-o"])
        .arg(&bin_stuck)
        .arg(fixture("stuck.c"))
        .status()
        .unwrap()
        .success());
    let mut normal = spawn_ready(
        "stuck",
        Command::new(&bin_stuck).arg(nport.to_string()).arg("sleep"),
    );
    let t = Instant::now();
    stuck_request(nport, Duration::from_secs(3));
    let took = t.elapsed();
    assert!(
        wait_until(Duration::from_secs(2), || !normal.alive()),
        "the action happened"
    );
    let r = records(&events, 5);
    let rec = &r[4];
    assert_eq!(rec["policy"], "normal", "{rec}");
    assert_eq!(rec["result"], "delivered", "{rec}");
    let lateness = rec["lateness_ms"].as_f64().unwrap();
    println!(
        "normal server after the FIFO: client saw the end after {took:?}, lateness {lateness} ms, native {}",
        rec["native_stack"]
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(500),
        "{took:?}"
    );
    assert!(lateness < 200.0, "{rec}");
    assert!(
        functions(rec).iter().any(|f| f == "stuck_in_handler"),
        "{rec}"
    );
    assert!(d.proc.alive(), "the daemon lives");
    let last = status(d.proc.pid(), "Threads");
    assert!(last <= threads[0] + 1, "{last} threads, {threads:?} before");
}

/// Removes a path on drop.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// py-spy (the Python stack) memory-maps the interpreter: one the target's user owns could be
/// truncated under the read (SIGBUS in the daemon), so it is not read at all. The worker runs
/// a copy of Debian's interpreter owned by `nobody`; its stack says why it was not read, its
/// native frames and the action come as usual, and a root-owned interpreter is still read.
#[test]
fn a_python_interpreter_the_target_can_write_is_never_mapped() {
    require_root();
    let dir = tmpdir("hostile-python");
    let python = dir.join("python3");
    std::fs::copy("/usr/bin/python3.11", &python).expect("Debian's python3.11 (setup installs it)");
    let ok = Command::new("chown")
        .args(["nobody:nogroup"])
        .arg(&python)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown");
    let (own, root) = (free_port(), free_port());
    let (mut d, events) = daemon(&dir, &[("own", own, "SIGKILL"), ("root", root, "SIGKILL")]);
    for (i, (port, interpreter)) in [
        (own, python.as_path()),
        (root, Path::new("/usr/bin/python3.11")),
    ]
    .into_iter()
    .enumerate()
    {
        let mut server = spawn_ready(
            "threaded",
            Command::new(interpreter)
                .arg(fixture("threaded.py"))
                .arg(port.to_string()),
        );
        let r = http_get(&local(port), "/slow", Duration::from_secs(3));
        assert!(r.is_err(), "answered: {r:?}");
        assert!(
            wait_until(Duration::from_secs(2), || !server.alive()),
            "the action still happened"
        );
        let rec = &records(&events, i + 1)[i];
        assert_eq!(rec["result"], "delivered", "{rec}");
        println!(
            "python stack with {}: {}",
            interpreter.display(),
            rec["stack"]
        );
        let error = rec["stack"]["error"].as_str().unwrap_or("");
        if port == own {
            assert!(
                error.contains("not read"),
                "a writable interpreter is not mapped: {rec}"
            );
        } else {
            assert!(error.is_empty(), "a root-owned interpreter is read: {rec}");
        }
    }
    assert!(d.proc.alive());
}
