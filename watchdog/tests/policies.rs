//! Issue 3 (policy file, ladders, reset, reload, protect) and issue 4 (diagnosis) end to end.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let tmp = dir.join("watchdog.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    let path = dir.join("watchdog.toml");
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// A PostgreSQL server of Debian's package in a temporary data directory, run as `postgres`.
struct Postgres {
    _proc: Proc,
    port: u16,
    bin: std::path::PathBuf,
}

fn postgres() -> Postgres {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (cargo xtask test installs it)")
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .max()
        .unwrap();
    let port = free_port();
    let dir = tmpdir(&format!("pg{port}"));
    Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir)
        .status()
        .unwrap();
    let data = dir.join("data");
    let as_pg = |cmd: String| {
        Command::new("runuser")
            .args(["-u", "postgres", "--", "sh", "-c", &cmd])
            .status()
            .unwrap()
    };
    assert!(as_pg(format!(
        "{}/initdb -A trust -U postgres -D {} >/dev/null",
        bin.display(),
        data.display()
    ))
    .success());
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", "sh", "-c"]).arg(format!(
        "{}/postgres -D {} -p {port} -k {} -c listen_addresses=127.0.0.1 & \
         until {}/pg_isready -q -h 127.0.0.1 -p {port}; do sleep 0.1; done; echo READY; wait",
        bin.display(),
        data.display(),
        dir.display(),
        bin.display()
    ));
    Postgres {
        _proc: spawn_ready("postgres", &mut cmd),
        port,
        bin,
    }
}

impl Postgres {
    fn psql(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
                &self.port.to_string(),
            ])
            .args(args)
            .output()
            .unwrap()
    }
}

#[test]
fn postgres_query_is_cancelled_at_its_budget_and_the_session_goes_on() {
    let pg = postgres();
    let dir = tmpdir("pgpolicy");
    let cfg = write_config(
        &dir,
        &format!(
            "[[policy]]\nname = \"postgres\"\nports = [{}]\nbudget = \"1s\"\nsignal = \"SIGINT\"\ntarget = \"process\"\n\
             match = {{ comm = [\"postgres\"] }}\n",
            pg.port
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let t = Instant::now();
    let out = pg.psql(&["-c", "SELECT pg_sleep(30)", "-c", "SELECT 42 AS answer"]);
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    assert!(
        stdout.contains("42"),
        "the same session runs the next query: {stdout}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        pg.psql(&["-c", "SELECT 1"]).status.success(),
        "server still up"
    );
    assert_eq!(
        d.metric(
            "watchdog_actions_total",
            &[("action", "SIGINT"), ("result", "delivered")]
        ),
        1.0
    );
    // What was stopped: the statement, read by the kernel from the backend's receive buffer.
    let line = &d.log_events("request over budget")[0];
    assert_eq!(line["request"], "SELECT pg_sleep(30)", "{line}");
    assert_eq!(line["protocol"], "postgres", "{line}");
}

#[test]
fn diagnosis_names_the_database_peer_the_worker_is_blocked_on() {
    let pg = postgres();
    let port = free_port();
    let _app = app(port, 1, &[]);
    let d = Daemon::start(&[
        "--port",
        &port.to_string(),
        "--budget",
        "700ms",
        "--observe",
    ]);
    let _ = http_get(
        &local(port),
        &format!("/pg?port={}", pg.port),
        Duration::from_millis(1500),
    );
    let line = &d.log_events("request over budget")[0];
    assert!(
        line["syscall"].as_str().unwrap().starts_with("recvfrom("),
        "{line}"
    );
    let waiting = line["waiting_on"].as_str().unwrap();
    assert!(
        waiting.contains(&format!("reading from 127.0.0.1:{}", pg.port)),
        "{waiting}"
    );
    assert!(
        line["connections"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{}", pg.port)),
        "{line}"
    );
}

#[test]
fn ladder_steps_land_at_their_offsets_and_the_last_one_kills() {
    let port = free_port();
    let dir = tmpdir("ladder");
    let log = dir.join("app.log");
    let _app = app(
        port,
        1,
        &[("IGNORE_TERM", "1"), ("APP_LOG", log.to_str().unwrap())],
    );
    let cfg = write_config(
        &dir,
        &format!(
            "[[policy]]\nname = \"ladder\"\nports = [{port}]\nbudget = \"500ms\"\nsteps = [\n\
             {{ after = \"500ms\", action = \"log\" }},\n{{ after = \"1s\", signal = \"SIGTERM\" }},\n\
             {{ after = \"1500ms\", signal = \"SIGKILL\" }},\n]\n"
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let slow = timed(move || http_get(&local(port), "/slow", Duration::from_secs(5)));
    let (took, r) = slow.join().unwrap();
    assert!(r.is_err());
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(2000),
        "SIGTERM ignored, SIGKILL at 1.5 s: {took:?}"
    );
    let lines = d.log_events("request over budget");
    let steps: Vec<(String, String, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["action"].as_str().unwrap().into(),
                l["result"].as_str().unwrap().into(),
                l["elapsed_ms"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert_eq!(
        (steps[0].0.as_str(), steps[0].1.as_str()),
        ("log", "delivered")
    );
    assert_eq!(
        (steps[1].0.as_str(), steps[1].1.as_str()),
        ("SIGTERM", "delivered")
    );
    assert_eq!(
        (steps[2].0.as_str(), steps[2].1.as_str()),
        ("SIGKILL", "delivered")
    );
    for (s, at) in steps.iter().zip([500, 1000, 1500]) {
        assert!(s.2 >= at && s.2 < at + 100, "{s:?} should land at {at} ms");
    }
}

#[test]
fn reset_releases_the_client_and_fails_the_workers_next_write() {
    let port = free_port();
    let dir = tmpdir("reset");
    let log = dir.join("app.log");
    let _app = app(port, 1, &[("APP_LOG", log.to_str().unwrap())]);
    let cfg = write_config(
        &dir,
        &format!("[[policy]]\nname = \"reset\"\nports = [{port}]\nbudget = \"1s\"\nsteps = [{{ after = \"1s\", action = \"reset\" }}]\n"),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let (took, r) = timed(move || http_get(&local(port), "/slow-write", Duration::from_secs(5)))
        .join()
        .unwrap();
    let e = r.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1400),
        "{took:?}"
    );
    assert_eq!(
        d.metric(
            "watchdog_actions_total",
            &[("action", "reset"), ("result", "delivered")]
        ),
        1.0
    );
    // The worker answers 2 s after it read the request, about 1 s from now.
    wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("write failed"))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("write failed"),
        "the worker kept running and its write failed: {text}"
    );
}

#[test]
fn reload_applies_to_new_requests_and_a_broken_file_is_refused() {
    let port = free_port();
    let dir = tmpdir("reload");
    let _app = app(port, 3, &[]);
    let policy = |budget: &str| {
        format!("[[policy]]\nname = \"api\"\nports = [{port}]\nbudget = \"{budget}\"\nsignal = \"SIGKILL\"\n")
    };
    let cfg = write_config(&dir, &policy("3s"));
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let old = timed(move || http_get(&local(port), "/slow", Duration::from_secs(10)));
    assert_eq!(
        d.wait_metric(
            "watchdog_requests_in_flight",
            &[("port", &port.to_string())],
            1.0,
            Duration::from_millis(500)
        ),
        1.0,
        "the old request is in flight before the reload"
    );
    write_config(&dir, &policy("1s"));
    assert_eq!(
        d.wait_metric(
            "watchdog_config_reloads_total",
            &[("result", "success")],
            1.0,
            Duration::from_secs(3)
        ),
        1.0
    );
    let (took_new, r) = timed(move || http_get(&local(port), "/slow", Duration::from_secs(10)))
        .join()
        .unwrap();
    assert!(
        r.is_err() && took_new < Duration::from_millis(1500),
        "new request follows the new budget: {took_new:?}"
    );
    let (took_old, r) = old.join().unwrap();
    assert!(
        r.is_err() && took_old >= Duration::from_secs(3) && took_old < Duration::from_millis(3500),
        "in-flight request kept its budget: {took_old:?}"
    );
    // A broken file is refused with its reason; the 1 s policy keeps enforcing.
    write_config(&dir, "[[policy]]\nname = \"api\"\nbudget = \"soon\"\n");
    assert_eq!(
        d.wait_metric(
            "watchdog_config_reloads_total",
            &[("result", "error")],
            1.0,
            Duration::from_secs(3)
        ),
        1.0
    );
    assert!(d.log_text().contains("invalid duration"));
    let (took, r) = timed(move || http_get(&local(port), "/slow", Duration::from_secs(10)))
        .join()
        .unwrap();
    assert!(r.is_err() && took < Duration::from_millis(1500), "{took:?}");
}

#[test]
fn observe_flag_holds_across_reloads() {
    let port = free_port();
    let dir = tmpdir("observe-reload");
    let _app = app(port, 2, &[]);
    let policy = |budget: &str| {
        format!("[[policy]]\nname = \"api\"\nports = [{port}]\nbudget = \"{budget}\"\nsignal = \"SIGKILL\"\n")
    };
    let cfg = write_config(&dir, &policy("2s"));
    let d = Daemon::start(&["--config", cfg.to_str().unwrap(), "--observe"]);
    // The file says enforce (its default); --observe must still hold after it changes.
    write_config(&dir, &policy("500ms"));
    assert_eq!(
        d.wait_metric(
            "watchdog_config_reloads_total",
            &[("result", "success")],
            1.0,
            Duration::from_secs(3)
        ),
        1.0
    );
    let (took, r) = timed(move || http_get(&local(port), "/wait?ms=1500", Duration::from_secs(5)))
        .join()
        .unwrap();
    assert!(
        r.is_ok() && took >= Duration::from_millis(1500),
        "the request was answered, not killed: {r:?} after {took:?}"
    );
    // The new budget applies, in observe mode.
    assert_eq!(
        d.wait_metric(
            "watchdog_actions_total",
            &[("result", "observed")],
            1.0,
            Duration::from_secs(2)
        ),
        1.0
    );
}

#[test]
fn selectors_pick_processes_and_protected_ones_are_never_signalled() {
    let port = free_port();
    let dir = tmpdir("protect");
    let _app = app(port, 2, &[]);
    // A selector that does not match python: no policy applies, nothing is done.
    let cfg = write_config(
        &dir,
        &format!(
            "[[policy]]\nname = \"nginx-only\"\nports = [{port}]\nbudget = \"500ms\"\nsignal = \"SIGKILL\"\nmatch = {{ comm = [\"nginx*\"] }}\n"
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    assert!(http_get(&local(port), "/slow", Duration::from_millis(1200))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock));
    // The kernel saw the request and its deadline fired in flight; the selector is why nothing
    // was done.
    assert_eq!(
        d.metric(
            "watchdog_kernel_deadlines_total",
            &[("result", "in_flight")]
        ),
        1.0,
        "{}",
        d.log_text()
    );
    assert!(
        d.log_text()
            .contains("no policy selects this process; not acting"),
        "{}",
        d.log_text()
    );
    assert_eq!(d.metric("watchdog_budget_exceeded_total", &[]), 0.0);
    assert_eq!(d.metric("watchdog_actions_total", &[]), 0.0);
    drop(d);
    // Matching exe and cgroup globs, but comm protected: refused, and said why.
    let cfg = write_config(
        &dir,
        &format!(
            "[protect]\ncomm = [\"python3\"]\n[[policy]]\nname = \"py\"\nports = [{port}]\nbudget = \"500ms\"\nsignal = \"SIGKILL\"\n\
             match = {{ exe = [\"*python3*\"], cgroup = [\"/*\"] }}\n"
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    assert!(http_get(&local(port), "/slow", Duration::from_millis(1200))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock));
    assert_eq!(
        d.wait_metric(
            "watchdog_actions_total",
            &[("result", "refused")],
            1.0,
            Duration::from_secs(2)
        ),
        1.0
    );
    assert_eq!(
        d.log_events("request over budget")[0]["detail"],
        "refused_protected"
    );
}

#[test]
fn check_reports_on_this_machine() {
    require_root();
    let dir = tmpdir("check");
    let cfg = write_config(
        &dir,
        "[[policy]]\nname = \"a\"\nports = [8080]\nbudget = \"2s\"\nsignal = \"SIGTERM\"\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // Each of these was tried on this machine and worked: its line is marked ok (the same
    // names also appear, marked FAIL or warn, when a probe fails).
    for what in [
        "config",
        "privileges",
        "BTF",
        "tracepoint sock_recv_length",
        "probe set",
        "pidfd signals",
        "thread pidfds",
        "connection reset",
        "eBPF programs",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok") && l[4..].trim_start().starts_with(what)),
            "{what} not ok:\n{text}"
        );
    }
    assert!(
        !text.lines().any(|l| l.starts_with("FAIL")),
        "a FAIL line:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("ok")
            && l.contains("pidfd signals")
            && l.contains("SIGKILL reached a child")),
        "the pidfd signal was tried on a child:\n{text}"
    );
    assert_eq!(text.lines().last(), Some("watchdog can run here"), "{text}");
    let bad = write_config(
        &dir,
        "[[policy]]\nname = \"a\"\nbudget = \"2s\"\nsignal = \"SIGNOPE\"\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config-only", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unknown signal"));
}
