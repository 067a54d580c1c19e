//! One tenant cannot switch enforcement off for another: a workload that trips its own circuit
//! breaker leaves another workload's enforcement on, and a process no policy selects cannot
//! fill the connection table so that a selected server's next request goes untracked. The
//! attackers run as a real unprivileged user (`setpriv`, uid 65534).
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;

/// Debian's interpreter (xtask's setup installs it): the one on root's PATH may live where the
/// unprivileged user cannot read.
const PYTHON: &str = "/usr/bin/python3";

const NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

/// A child cgroup of the cgroup v2 hierarchy (hybrid layout here: `/sys/fs/cgroup/unified`;
/// unified hosts: `/sys/fs/cgroup`), removed on drop once its processes are gone.
struct Cgroup {
    dir: PathBuf,
    /// The path `/proc/PID/cgroup` shows for it (`0::/name`).
    path: String,
}

fn v2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let root = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup v2 hierarchy is mounted");
    assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    root
}

impl Cgroup {
    fn new(name: &str) -> Self {
        let name = format!("watchdog-test-{name}-{}", std::process::id());
        let dir = v2_root().join(&name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Cgroup {
            dir,
            path: format!("/{name}"),
        }
    }

    /// Moves every process of the process group `pgid` (a server and its workers) here.
    fn adopt_group(&self, pgid: u32) {
        let mut moved = 0;
        for pid in pids_of_group(pgid) {
            std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
                .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", self.dir.display()));
            moved += 1;
        }
        assert!(moved >= 1);
        for pid in pids_of_group(pgid) {
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            assert!(
                cg.lines().any(|l| l == format!("0::{}", self.path)),
                "{pid}: {cg}"
            );
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes were killed by their `Proc` guards; the last ones may take a moment.
        wait_until(Duration::from_secs(3), || {
            std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists()
        });
    }
}

fn pids_of_group(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the comm's closing parenthesis: state ppid pgrp ...
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        if f[2].parse::<u32>() == Ok(pgid) && f[0] != "Z" {
            out.push(pid);
        }
    }
    out
}

/// The pre-forking app as the unprivileged user.
fn app_as_nobody(port: u16, workers: u32) -> Proc {
    let mut cmd = Command::new(NOBODY[0]);
    cmd.args(&NOBODY[1..])
        .arg(PYTHON)
        .arg(fixture("app.py"))
        .arg(port.to_string())
        .arg(workers.to_string());
    spawn_ready("app.py as nobody", &mut cmd)
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let cfg = dir.join("watchdog.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

#[test]
fn a_tenant_that_trips_its_breaker_leaves_another_tenants_enforcement_on() {
    require_root();
    let (attacker_port, victim_port) = (free_port(), free_port());
    // Declared first: dropped last, after the servers in them are gone.
    let (cg_a, cg_b) = (Cgroup::new("tenant-a"), Cgroup::new("tenant-b"));
    let attacker = app_as_nobody(attacker_port, 4);
    let victim = app(victim_port, 2, &[]);
    assert_eq!(uid_of(attacker.pid()), 65534);
    cg_a.adopt_group(attacker.pid());
    cg_b.adopt_group(victim.pid());
    let dir = tmpdir("tenant-breaker");
    let cfg = write_config(
        &dir,
        &format!(
            "[[policy]]\nname = \"api\"\nports = [{attacker_port}, {victim_port}]\nbudget = \"500ms\"\n\
             signal = \"SIGKILL\"\nbreaker = {{ max_actions = 2, window = \"1m\", cooldown = \"1m\" }}\n"
        ),
    );
    let d = Daemon::start(&["--stacks", "false", "--config", cfg.to_str().unwrap()]);
    // The attacker: four hanging requests to its own server; two kills, then its breaker trips.
    let hangs: Vec<_> = (0..4)
        .map(|_| {
            timed(move || http_get(&local(attacker_port), "/sleep", Duration::from_millis(1500)))
        })
        .collect();
    let policy = [("policy", "api")];
    assert_eq!(
        d.wait_metric(
            "watchdog_breaker_trips_total",
            &policy,
            1.0,
            Duration::from_secs(3)
        ),
        1.0,
        "{}",
        d.log_text()
    );
    assert_eq!(d.metric("watchdog_policy_observe_only", &policy), 1.0);
    let trip = d.log_events("CIRCUIT BREAKER OPEN: too many actions; policy drops to observe-only for this workload for the cool-down");
    assert_eq!(trip.len(), 1, "{}", d.log_text());
    assert_eq!(
        trip[0]["workload"],
        format!("cgroup {}", cg_a.path),
        "{}",
        trip[0]
    );
    for h in hangs {
        let _ = h.join().unwrap();
    }
    assert_eq!(
        d.metric("watchdog_actions_total", &[("result", "delivered")]),
        2.0
    );
    // The victim, in another cgroup under the same policy: its over-budget request is still
    // acted on, at its deadline.
    let (took, r) = timed(move || http_get(&local(victim_port), "/sleep", Duration::from_secs(10)))
        .join()
        .unwrap();
    println!(
        "attacker's breaker open; the victim's over-budget request ended after {took:?} (budget 500 ms)"
    );
    assert!(r.is_err(), "the victim's stuck request was answered: {r:?}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1200),
        "ended after {took:?}, budget 500 ms"
    );
    assert_eq!(
        d.wait_metric(
            "watchdog_actions_total",
            &[("result", "delivered")],
            3.0,
            Duration::from_secs(2)
        ),
        3.0,
        "{}",
        d.log_text()
    );
    let acted: Vec<_> = d
        .log_events("request over budget")
        .into_iter()
        .filter(|l| l["result"] == "delivered" && l["port"] == victim_port)
        .collect();
    assert_eq!(acted.len(), 1, "{}", d.log_text());
    // Still open for the attacker: the victim's action did not re-arm it or share it.
    assert_eq!(d.metric("watchdog_breaker_trips_total", &policy), 1.0);
    assert_eq!(d.metric("watchdog_policy_observe_only", &policy), 1.0);
    let status = d.status_json();
    let open = &status["policies"][0]["observe_only_workloads"];
    assert_eq!(
        open,
        &serde_json::json!([format!("cgroup {}", cg_a.path)]),
        "{status}"
    );
    drop(attacker);
    drop(victim);
}

/// A client, as the unprivileged user, that opens `n` connections to `port`, sends one byte on
/// each (a request in flight that never completes) and holds them until killed.
fn one_byte_flood_as_nobody(port: u16, n: usize) -> Proc {
    let script = format!(
        "import socket, sys, time\n\
         held = []\n\
         for _ in range({n}):\n\
         \x20   s = socket.create_connection(('127.0.0.1', {port}))\n\
         \x20   s.sendall(b'G')\n\
         \x20   held.append(s)\n\
         print('READY', len(held), flush=True)\n\
         time.sleep(600)\n"
    );
    let mut cmd = Command::new(NOBODY[0]);
    cmd.args(&NOBODY[1..]).args([PYTHON, "-c", &script]);
    spawn_ready("one-byte flood", &mut cmd)
}

#[test]
fn a_table_flood_by_an_unselected_process_leaves_a_selected_server_tracked() {
    require_root();
    let (flood_port, victim_port) = (free_port(), free_port());
    // The flooding server: the event-loop fixture under another name (`comm` "flooder", which
    // no policy selects), as the unprivileged user, on a watched port.
    let bin = tmpdir("tenant-flooder");
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let flooder = bin.join("flooder");
    std::os::unix::fs::symlink(PYTHON, &flooder).unwrap();
    let mut cmd = Command::new(NOBODY[0]);
    cmd.args(&NOBODY[1..])
        .arg(&flooder)
        .arg(fixture("hang.py"))
        .arg(flood_port.to_string());
    let server = spawn_ready("hang.py as flooder", &mut cmd);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{}/comm", server.pid())).unwrap(),
        "flooder\n"
    );
    assert_eq!(uid_of(server.pid()), 65534);
    let _victim = app(victim_port, 2, &[]);
    let dir = tmpdir("tenant-flood");
    let cfg = write_config(
        &dir,
        &format!(
            "[[policy]]\nname = \"api\"\nports = [{flood_port}, {victim_port}]\nbudget = \"1s\"\n\
             signal = \"SIGKILL\"\nmatch = {{ comm = [\"python3\"] }}\n"
        ),
    );
    let d = Daemon::start(&[
        "--stacks",
        "false",
        "--max-connections",
        "64",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    // 100 one-byte requests in flight on a 64-entry table.
    let _flood = one_byte_flood_as_nobody(flood_port, 100);
    let fp = flood_port.to_string();
    let seen = || {
        d.metric("watchdog_tracked_connections", &[])
            + d.metric("watchdog_map_evictions_total", &[("table", "connections")])
    };
    assert!(
        wait_until(Duration::from_secs(3), || seen() >= 100.0),
        "the kernel saw {} of the 100 connections",
        seen()
    );
    // The kernel saw requests start on them: they are in flight, not idle.
    assert!(
        d.wait_metric(
            "watchdog_requests_total",
            &[("port", &fp)],
            48.0,
            Duration::from_secs(3)
        ) >= 48.0
    );
    // Eviction runs as soon as the table passes its high-water mark: connections whose
    // requests have not started yet have no owner to judge and go as idle ones; those in flight
    // go because no policy selects their owner. Either way the flooder's, never the victim's.
    let dropped_by =
        |reason: &str| d.metric("watchdog_connections_dropped_total", &[("reason", reason)]);
    let mut dropped = 0.0;
    wait_until(Duration::from_secs(3), || {
        dropped = dropped_by("unselected") + dropped_by("idle");
        dropped >= 16.0
    });
    let refused = d.metric("watchdog_map_evictions_total", &[("table", "connections")]);
    // A fresh connection to the selected server, over budget.
    let sent = Instant::now();
    let r = http_get(&local(victim_port), "/sleep", Duration::from_secs(10));
    let took = sent.elapsed();
    println!(
        "unselected flood: 100 one-byte requests on a 64-entry table, {refused} refused while full, {dropped} dropped from tracking (unselected {}, idle {}); the selected server's over-budget request ended after {took:?}",
        dropped_by("unselected"),
        dropped_by("idle")
    );
    assert!(dropped >= 16.0, "{}", d.log_text());
    assert!(r.is_err(), "the over-budget request was answered: {r:?}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1600),
        "ended after {took:?}, budget 1 s"
    );
    let vp = victim_port.to_string();
    assert_eq!(d.metric("watchdog_requests_total", &[("port", &vp)]), 1.0);
    assert_eq!(
        d.wait_metric(
            "watchdog_actions_total",
            &[("result", "delivered")],
            1.0,
            Duration::from_secs(2)
        ),
        1.0
    );
    // The flooder was never acted on (no policy selects it) and still runs.
    let acted = d.log_events("request over budget");
    assert!(acted.iter().all(|l| l["port"] == victim_port), "{acted:?}");
    assert!(Path::new(&format!("/proc/{}", server.pid())).exists());
}
