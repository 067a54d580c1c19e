//! Issue 28: what an unprivileged local user or a traced process can no longer do to the
//! daemon: take over its state directory (and detach it with `rm`), have it keep answering
//! "ready" with its programs gone, read its events file, or forge lines in its text log.

mod common;

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// The unprivileged attacker: `nobody`, no groups.
const NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new(NOBODY[0]);
    c.args(&NOBODY[1..]).args(args);
    c
}

/// A daemon started by hand (not `Daemon::start`): these tests need to see it refuse to start,
/// and to read its text log. Killed, and its state removed, on drop.
struct Run {
    child: Child,
    metrics: String,
    log: PathBuf,
    state: PathBuf,
}

impl Run {
    fn spawn(state: &Path, format: &str, args: &[&str]) -> Run {
        require_root();
        let port = free_port();
        let dir = tmpdir(&format!("exposure{port}"));
        let log = dir.join("watchdog.log");
        let metrics = format!("127.0.0.1:{port}");
        let child = Command::new(BIN)
            .args(["--log-format", format, "run"])
            .args(args)
            .arg("--metrics-addr")
            .arg(&metrics)
            .arg("--status-socket")
            .arg(dir.join("status.sock"))
            .arg("--state-dir")
            .arg(state)
            .env("WATCHDOG_LOG", "info,watchdog=debug")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Run {
            child,
            metrics,
            log,
            state: state.to_path_buf(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `Ok(())` once `/readyz` says ready, `Err(exit status)` if the daemon exits first.
    fn ready_or_exit(&mut self, within: Duration) -> Result<(), std::process::ExitStatus> {
        let end = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status);
            }
            if http_get(&self.metrics, "/readyz", Duration::from_secs(1))
                .is_ok_and(|b| b.trim() == "ready")
            {
                return Ok(());
            }
            assert!(
                Instant::now() < end,
                "neither ready nor exited in {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A bpffs of the test's own, mounted without a mode: 1777 like /sys/fs/bpf on a host where
/// anyone may create entries in it (the setting issue 28's race was won in). Unmounted on drop.
struct OpenBpffs {
    mnt: PathBuf,
}

impl OpenBpffs {
    fn mount(name: &str) -> OpenBpffs {
        let dir = tmpdir(name);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mnt = dir.join("bpf");
        std::fs::create_dir_all(&mnt).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mnt)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a bpffs at {}", mnt.display());
        let mode = std::fs::metadata(&mnt).unwrap().mode() & 0o7777;
        assert_eq!(
            mode, 0o1777,
            "a bpffs mounted without a mode is sticky and world-writable"
        );
        OpenBpffs { mnt }
    }
}

impl Drop for OpenBpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

fn link_pins(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `nobody` re-creates the state directory in a loop while the daemon starts (with none there,
/// or after the daemon found a state it could not adopt: the window issue 28 found between its
/// cleanup and its pinning). Each start either refuses the directory it does not own, or pins
/// into one `nobody` cannot remove anything from: never a running daemon whose pins `nobody`
/// can delete.
#[test]
fn the_state_directory_race_never_leaves_pins_another_user_can_remove() {
    require_root();
    let fs = OpenBpffs::mount("bpfrace");
    let state = fs.mnt.join("watchdog");
    let state_arg = state.to_str().unwrap().to_string();
    let rounds = 8;
    let (mut refused, mut pinned) = (0, 0);
    let started = Instant::now();
    for round in 0..rounds {
        // Even rounds: the daemon finds a state it cannot adopt (no stamp) and starts afresh
        // while `nobody` hammers (issue 28's race was won between that cleanup and the
        // pinning). Odd rounds: `nobody` got there first.
        let seeded = round % 2 == 0;
        if seeded {
            std::fs::create_dir(&state).unwrap();
            std::fs::create_dir(state.join("junk")).unwrap();
        }
        let mut racer = as_nobody(&[
            "/usr/bin/python3",
            "-c",
            "import os, sys\nwhile True:\n    try: os.mkdir(sys.argv[1], 0o777)\n    except OSError: pass",
            &state_arg,
        ])
        .spawn()
        .unwrap();
        if !seeded {
            assert!(
                wait_until(Duration::from_secs(5), || std::fs::metadata(&state)
                    .is_ok_and(|m| m.uid() == 65534)),
                "nobody did not create {}",
                state.display()
            );
        }
        let port = free_port().to_string();
        let mut d = Run::spawn(
            &state,
            "json",
            &["--port", &port, "--budget", "1s", "--observe"],
        );
        let outcome = d.ready_or_exit(Duration::from_secs(30));
        let _ = racer.kill();
        let _ = racer.wait();
        match outcome {
            Err(status) => {
                let log = d.log_text();
                assert!(!status.success(), "round {round}: exited 0:\n{log}");
                // A directory it checked and emptied itself is never lost to the race.
                assert!(!seeded, "round {round}: refused its own directory:\n{log}");
                assert!(
                    log.contains("state directory") && log.contains("refused"),
                    "round {round}: exited without saying why:\n{log}"
                );
                assert!(
                    link_pins(&state).is_empty(),
                    "round {round}: refused but pinned links in {}",
                    state.display()
                );
                refused += 1;
            }
            Ok(()) => {
                let meta = std::fs::symlink_metadata(&state).unwrap();
                assert!(meta.is_dir() && !meta.file_type().is_symlink());
                assert_eq!(
                    meta.uid(),
                    0,
                    "round {round}: pinned in a directory of uid {}",
                    meta.uid()
                );
                assert_eq!(meta.mode() & 0o777, 0o700, "round {round}");
                assert!(seeded, "round {round}: ran in the directory nobody made");
                let pins = link_pins(&state);
                assert!(!pins.is_empty(), "round {round}: ready without link pins");
                // The attacker tries what detached every program before.
                let rm = as_nobody(&["rm", "-rf", &state_arg])
                    .stderr(Stdio::null())
                    .status()
                    .unwrap();
                assert!(!rm.success(), "round {round}: nobody removed the state");
                assert_eq!(link_pins(&state), pins, "round {round}: a pin went missing");
                assert_eq!(
                    http_get(&d.metrics, "/readyz", Duration::from_secs(2))
                        .unwrap()
                        .trim(),
                    "ready"
                );
                pinned += 1;
            }
        }
        drop(d);
        let _ = std::fs::remove_dir_all(&state);
    }
    eprintln!(
        "state directory race, {rounds} rounds in {:?}: {refused} refused (nobody's directory), {pinned} pinned in a root-only directory (nobody's rm failed)",
        started.elapsed()
    );
    assert_eq!(refused + pinned, rounds);
}

/// A state directory planted before the daemon starts (or a symlink in its place) is refused
/// with the reason, and nothing is read from it.
#[test]
fn a_planted_state_directory_or_symlink_is_refused() {
    require_root();
    let fs = OpenBpffs::mount("bpfplant");
    let state = fs.mnt.join("watchdog");
    let ok = as_nobody(&["mkdir", state.to_str().unwrap()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "nobody can create entries in a 1777 bpffs");
    let port = free_port().to_string();
    let mut d = Run::spawn(&state, "json", &["--port", &port, "--budget", "1s"]);
    let status = d.ready_or_exit(Duration::from_secs(30)).unwrap_err();
    let log = d.log_text();
    assert!(!status.success());
    assert!(
        log.contains(&format!("state directory {} refused", state.display()))
            && log.contains("owned by uid 65534"),
        "{log}"
    );
    drop(d);

    // A symlink (root's own, even) pointing elsewhere is no state directory either.
    let elsewhere = fs.mnt.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &state).unwrap();
    let mut d = Run::spawn(&state, "json", &["--port", &port, "--budget", "1s"]);
    let status = d.ready_or_exit(Duration::from_secs(30)).unwrap_err();
    assert!(!status.success());
    assert!(d.log_text().contains("symbolic link"), "{}", d.log_text());
    assert!(
        link_pins(&elsewhere).is_empty(),
        "pinned through the symlink"
    );
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_dir_all(&elsewhere);
}

/// Waits until `/readyz` stops saying ready; how long it took.
fn readyz_fails(metrics: &str, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    wait_until(within, || {
        http_get(metrics, "/readyz", Duration::from_secs(1))
            .is_ok_and(|b| b.starts_with("not ready"))
    })
    .then(|| t.elapsed())
}

/// A program detached behind the daemon's back (its link pin removed, the only holder) makes
/// `/readyz` and `/healthz` fail within a couple of seconds: the kernel is asked, not memory.
#[test]
fn a_removed_link_pin_fails_readiness_within_seconds() {
    let port = free_port();
    let _app = app(port, 1, &[]);
    let d = Daemon::start(&["--port", &port.to_string(), "--budget", "5s"]);
    // Tracking works before: the kernel counts a request.
    http_get(&local(port), "/fast", Duration::from_secs(2)).unwrap();
    d.wait_metric(
        "watchdog_requests_total",
        &[("port", &port.to_string())],
        1.0,
        Duration::from_secs(2),
    );
    let pins = link_pins(&d.state_dir);
    let victim = pins
        .iter()
        .find(|p| !p.to_string_lossy().ends_with("conn_sock_ops"))
        .expect("a tracepoint link pin")
        .clone();
    // Stays ready while nothing changes (the check is not failing by itself).
    for _ in 0..3 {
        assert_eq!(
            http_get(&d.metrics, "/readyz", Duration::from_secs(1))
                .unwrap()
                .trim(),
            "ready"
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    std::fs::remove_file(&victim).unwrap();
    let took = readyz_fails(&d.metrics, Duration::from_secs(4)).unwrap_or_else(|| {
        panic!(
            "/readyz still ready 4 s after {} was removed",
            victim.display()
        )
    });
    let health = http_get(&d.metrics, "/healthz", Duration::from_secs(1)).unwrap();
    assert!(health.contains("programs not attached"), "{health}");
    eprintln!(
        "removed {}: /readyz failed after {took:?}",
        victim.display()
    );
    assert!(took < Duration::from_millis(2500), "{took:?}");
}

/// The sock_ops link detached in place (`bpftool link detach`, the pin still there): the
/// kernel reports no cgroup for it, and `/readyz` fails.
#[test]
fn a_cgroup_link_detached_in_place_fails_readiness() {
    let port = free_port();
    let d = Daemon::start(&["--port", &port.to_string(), "--budget", "5s"]);
    let pin = d.state_dir.join("link_conn_sock_ops");
    assert!(pin.exists(), "no sock_ops link pin");
    let out = Command::new("bpftool")
        .args(["link", "detach", "pinned"])
        .arg(&pin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool link detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pin.exists(), "the pin stays; only the attachment is gone");
    let took = readyz_fails(&d.metrics, Duration::from_secs(4))
        .expect("/readyz still ready 4 s after the sock_ops link was detached");
    eprintln!("detached the sock_ops link: /readyz failed after {took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
}

/// The events file is created 0600 (it holds request paths, SQL and command lines of other
/// users' processes), and a symlink planted at its path is refused rather than followed.
#[test]
fn the_events_file_is_private_and_never_followed_through_a_symlink() {
    require_root();
    // A directory others may write in, not sticky (in a sticky one the kernel's
    // protected_symlinks refuses to follow another user's link already).
    let dir = tmpdir("events");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let events = dir.join("events.jsonl");
    let port = free_port();
    let _app = app(port, 1, &[]);
    let d = Daemon::start(&[
        "--port",
        &port.to_string(),
        "--budget",
        "300ms",
        "--signal",
        "SIGKILL",
        "--events",
        events.to_str().unwrap(),
    ]);
    // A record goes in: the file is the one written to.
    let _ = http_get(&local(port), "/sleep", Duration::from_secs(5));
    d.wait_metric(
        "watchdog_actions_total",
        &[("result", "delivered")],
        1.0,
        Duration::from_secs(3),
    );
    assert!(wait_until(Duration::from_secs(2), || std::fs::metadata(
        &events
    )
    .is_ok_and(|m| m.len() > 0)));
    let meta = std::fs::metadata(&events).unwrap();
    assert_eq!(
        meta.mode() & 0o777,
        0o600,
        "events file mode {:o}",
        meta.mode() & 0o777
    );
    drop(d);

    // nobody plants a symlink where the next daemon will write.
    let planted = dir.join("planted.jsonl");
    let target = dir.join("nobody-reads-this");
    let ok = as_nobody(&[
        "ln",
        "-s",
        target.to_str().unwrap(),
        planted.to_str().unwrap(),
    ])
    .status()
    .unwrap()
    .success();
    assert!(ok, "nobody could not plant the symlink");
    let state = state_dir();
    let mut r = Run::spawn(
        &state,
        "json",
        &[
            "--port",
            &port.to_string(),
            "--budget",
            "1s",
            "--events",
            planted.to_str().unwrap(),
        ],
    );
    let status = r.ready_or_exit(Duration::from_secs(30)).unwrap_err();
    assert!(!status.success());
    assert!(r.log_text().contains("symbolic link"), "{}", r.log_text());
    assert!(!target.exists(), "the daemon wrote through the symlink");
}

/// A process that names itself `srv\nFAKE-LINE` and runs over budget: in the text log its
/// name is escaped on the action's line, and no line of the log starts with its forgery.
#[test]
fn a_forged_newline_in_comm_stays_on_one_log_line() {
    require_root();
    let port = free_port();
    let server = format!(
        r#"
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"srv\nFAKE-LINE", 0, 0, 0)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {port})); s.listen(8)
print("READY", flush=True)
c, _ = s.accept()
c.recv(1024)
time.sleep(60)
"#
    );
    let mut srv = spawn_ready("comm forger", Command::new("python3").args(["-c", &server]));
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", srv.pid())).unwrap();
    assert_eq!(comm, "srv\nFAKE-LINE\n", "the kernel took the forged name");
    let state = state_dir();
    let mut d = Run::spawn(
        &state,
        "text",
        &[
            "--port",
            &port.to_string(),
            "--budget",
            "300ms",
            "--signal",
            "SIGKILL",
        ],
    );
    d.ready_or_exit(Duration::from_secs(30)).unwrap();
    let _ = http_get(&local(port), "/hang", Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(3), || !srv.alive()),
        "the over-budget server was not killed"
    );
    assert!(wait_until(Duration::from_secs(3), || d
        .log_text()
        .contains("over its")));
    let log = d.log_text();
    let action = log.lines().find(|l| l.contains("over its")).unwrap();
    assert!(
        action.contains(r"srv\nFAKE-LINE"),
        "the name, escaped, on the action's line: {action}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("FAKE-LINE")),
        "a forged line in the log:\n{log}"
    );
}
