//! Issue 22: the acting thread. With CAP_SYS_NICE (root has it) it runs in SCHED_FIFO at the
//! configured priority, on the configured CPU, while the daemon's other threads stay in the
//! normal class, and it kills on time with every CPU busy; without CAP_SYS_NICE it falls back to
//! the normal class, says so (log, metric, `watchdog check`) and still acts.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;

/// Each thread of `pid`: (name, scheduling policy, realtime priority), from
/// /proc/PID/task/*/stat (fields 40 and 41) and comm.
fn threads(pid: u32) -> Vec<(String, u32, u32, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let tid: u32 = dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the command's closing parenthesis start at field 3.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let rt_priority: u32 = rest[40 - 3].parse().unwrap();
        let policy: u32 = rest[41 - 3].parse().unwrap();
        out.push((comm.trim().to_string(), tid, policy, rt_priority));
    }
    out
}

const SCHED_OTHER: u32 = 0;
const SCHED_FIFO: u32 = 1;

/// `n` processes spinning on the CPU at normal priority.
fn spinners(n: usize) -> Vec<Proc> {
    (0..n)
        .map(|_| {
            spawn_ready(
                "spinner",
                Command::new("python3")
                    .arg("-c")
                    .arg("print('READY', flush=True)\nwhile True: pass"),
            )
        })
        .collect()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A `/slow` request (CPU loop) under a 1 s SIGKILL budget: cut off within 1.0-1.5 s, counted
/// by the kernel and acted on by the daemon; returns the daemon's lateness for it (ms).
fn killed_at_budget(d: &Daemon, port: u16) -> f64 {
    let slow = timed(move || http_get(&local(port), "/slow", Duration::from_secs(10)));
    let (took, result) = slow.join().unwrap();
    assert!(result.is_err(), "the slow request was answered: {result:?}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1500),
        "killed after {took:?}"
    );
    assert_eq!(
        d.wait_metric(
            "watchdog_budget_exceeded_total",
            &[("port", &port.to_string())],
            1.0,
            Duration::from_secs(2)
        ),
        1.0,
        "the kernel saw the request run over its budget"
    );
    let line = &d.log_events("request over budget")[0];
    assert_eq!(line["result"], "delivered");
    line["lateness_ms"].as_f64().unwrap()
}

#[test]
fn acting_thread_runs_sched_fifo_on_its_cpu_and_kills_on_time_with_every_cpu_busy() {
    let port = free_port();
    let _app = app(port, 2, &[]);
    let dir = tmpdir("acting-fifo");
    let cfg = dir.join("watchdog.toml");
    std::fs::write(
        &cfg,
        format!(
            // Stacks off: this measures the acting thread alone (a stack read before the kill adds up to stack_timeout).
            "[daemon]\nstacks = false\nacting_priority = 12\nacting_cpu = 0\n\n[[policy]]\nname = \"p\"\nports = [{port}]\nbudget = \"1s\"\nsignal = \"SIGKILL\"\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let all = threads(d.proc.pid());
    let acting: Vec<_> = all.iter().filter(|t| t.0 == "watchdog-act").collect();
    assert_eq!(acting.len(), 1, "one acting thread: {all:?}");
    let (_, tid, policy, prio) = acting[0];
    assert_eq!(
        (*policy, *prio),
        (SCHED_FIFO, 12),
        "the acting thread: {all:?}"
    );
    for (name, _, policy, _) in &all {
        if name != "watchdog-act" {
            assert_eq!(*policy, SCHED_OTHER, "thread {name} stays normal: {all:?}");
        }
    }
    let status =
        std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", d.proc.pid())).unwrap();
    assert!(
        status.contains("Cpus_allowed_list:\t0\n"),
        "the acting thread is kept on CPU 0:\n{status}"
    );
    assert_eq!(d.metric("watchdog_acting_thread_realtime", &[]), 1.0);
    assert!(d.log_text().contains("SCHED_FIFO 12"), "{}", d.log_text());

    // Six spinning processes per CPU: the acting thread still acts within a few ms.
    let _spin = spinners(6 * cpus());
    std::thread::sleep(Duration::from_millis(200));
    let late = killed_at_budget(&d, port);
    assert!(
        (0.0..20.0).contains(&late),
        "acted {late} ms after the deadline with every CPU busy"
    );
}

#[test]
fn without_cap_sys_nice_the_acting_thread_falls_back_to_the_normal_class_and_still_acts() {
    let port = free_port();
    let _app = app(port, 2, &[]);
    // Root without CAP_SYS_NICE: out of the bounding set, so not in the permitted set at exec.
    let no_nice = [
        "setpriv",
        "--bounding-set=-sys_nice",
        "--inh-caps=-sys_nice",
    ];
    let port_s = port.to_string();
    let args = ["--port", &port_s, "--budget", "1s", "--signal", "SIGKILL"];
    let d = Daemon::start_wrapped(&state_dir(), &no_nice, &args);
    let all = threads(d.proc.pid());
    let acting: Vec<_> = all.iter().filter(|t| t.0 == "watchdog-act").collect();
    assert_eq!(acting.len(), 1, "one acting thread: {all:?}");
    assert_eq!(acting[0].2, SCHED_OTHER, "{all:?}");
    assert_eq!(d.metric("watchdog_acting_thread_realtime", &[]), 0.0);
    let warned = d.log_events(
        "the acting thread runs in the normal class: SCHED_FIFO was refused; deadlines may be late while workers saturate the CPUs",
    );
    assert_eq!(warned.len(), 1, "{}", d.log_text());
    assert_eq!(warned[0]["error"], "no CAP_SYS_NICE", "{}", d.log_text());
    let started = Instant::now();
    let late = killed_at_budget(&d, port);
    assert!((0.0..100.0).contains(&late), "acted {late} ms late");
    assert!(started.elapsed() < Duration::from_secs(3));

    // `watchdog check` says the same, and says the opposite with the capability.
    let check = |wrapper: &[&str]| {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let out = cmd.args(["check"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let without = check(&no_nice);
    assert!(
        without.lines().any(|l| l.starts_with("warn")
            && l.contains("acting thread")
            && l.contains("refused (no CAP_SYS_NICE)")),
        "{without}"
    );
    let with = check(&[]);
    assert!(
        with.lines().any(|l| l.starts_with("ok")
            && l.contains("acting thread")
            && l.contains("SCHED_FIFO 10 allowed")),
        "{with}"
    );
}

#[test]
fn in_a_cgroup_without_a_realtime_budget_the_refusal_says_so_and_the_daemon_still_acts() {
    // What podman's and the kubelet's cgroups are on a kernel with realtime group scheduling
    // (this machine's): a new cgroup v1 `cpu` group gets `cpu.rt_runtime_us` 0.
    let group = std::path::PathBuf::from(format!(
        "/sys/fs/cgroup/cpu/watchdog-test-rt-{}",
        std::process::id()
    ));
    assert!(
        std::path::Path::new("/sys/fs/cgroup/cpu/cpu.rt_runtime_us").exists(),
        "this test needs the cgroup v1 cpu controller with realtime group scheduling"
    );
    std::fs::create_dir_all(&group).unwrap();
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _remove = Remove(group.clone());
    assert_eq!(
        std::fs::read_to_string(group.join("cpu.rt_runtime_us"))
            .unwrap()
            .trim(),
        "0"
    );
    let port = free_port();
    let _app = app(port, 2, &[]);
    let enter = format!("echo $$ > {}/tasks && exec \"$@\"", group.display());
    let wrapper = ["sh", "-c", enter.as_str(), "sh"];
    let port_s = port.to_string();
    let args = ["--port", &port_s, "--budget", "1s", "--signal", "SIGKILL"];
    let d = Daemon::start_wrapped(&state_dir(), &wrapper, &args);
    let all = threads(d.proc.pid());
    let acting: Vec<_> = all.iter().filter(|t| t.0 == "watchdog-act").collect();
    assert_eq!(acting.len(), 1, "{all:?}");
    assert_eq!(acting[0].2, SCHED_OTHER, "{all:?}");
    assert_eq!(d.metric("watchdog_acting_thread_realtime", &[]), 0.0);
    let warned = d.log_events(
        "the acting thread runs in the normal class: SCHED_FIFO was refused; deadlines may be late while workers saturate the CPUs",
    );
    assert_eq!(warned.len(), 1, "{}", d.log_text());
    let why = warned[0]["error"].as_str().unwrap();
    assert!(
        why.starts_with("CAP_SYS_NICE is held, but the cgroup has no realtime budget")
            && why.contains("cpu.rt_runtime_us is 0"),
        "{why}"
    );
    let late = killed_at_budget(&d, port);
    assert!((0.0..100.0).contains(&late), "acted {late} ms late");
    drop(d);
}
