//! Harness for the privileged end-to-end tests: real servers, the real daemon, real signals.
//! Every helper fails loudly (panics with the reason) instead of skipping.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub const BIN: &str = env!("CARGO_BIN_EXE_watchdog");

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// These tests load eBPF programs and signal processes: without root they must fail, not skip.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests need root (they load eBPF programs): run `cargo xtask test` as root"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("watchdog-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A child process killed (with its process group) on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a command in its own process group and waits for `READY` on its stdout.
pub fn spawn_ready(name: &str, cmd: &mut Command) -> Proc {
    use std::os::unix::process::CommandExt;
    cmd.stdout(Stdio::piped()).process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("READY"), "{name} did not start: {line:?}");
    Proc {
        child,
        name: name.into(),
    }
}

/// The pre-forking test app on `port` with `workers` workers.
pub fn app(port: u16, workers: u32, envs: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(fixture("app.py"))
        .arg(port.to_string())
        .arg(workers.to_string());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    spawn_ready("app.py", &mut cmd)
}

/// The thread-per-connection test app.
pub fn threaded(port: u16) -> Proc {
    spawn_ready(
        "threaded.py",
        Command::new("python3")
            .arg(fixture("threaded.py"))
            .arg(port.to_string()),
    )
}

/// The daemon under test; stderr (its log) goes to a file.
pub struct Daemon {
    pub proc: Proc,
    pub metrics: String,
    pub status: PathBuf,
    pub log: PathBuf,
    /// Its pinned kernel state (bpffs); removed on drop unless `keep_state`.
    pub state_dir: PathBuf,
    pub keep_state: bool,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        if !self.keep_state {
            // Unpinning detaches the programs this daemon left in the kernel.
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

/// A fresh bpffs directory name for one test's pinned kernel state.
pub fn state_dir() -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/watchdog-test-{}-{}",
        std::process::id(),
        free_port()
    ))
}

impl Daemon {
    /// `watchdog run ARGS` with a state directory of its own, waiting until `/readyz` answers.
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_in(&state_dir(), args)
    }

    /// `watchdog run ARGS` pinning its kernel state in `state_dir` (adopting what is there).
    pub fn start_in(state_dir: &std::path::Path, args: &[&str]) -> Daemon {
        Self::start_wrapped(state_dir, &[], args)
    }

    /// `start_in`, the daemon run through `wrapper` (a command and its arguments, such as
    /// `setpriv` dropping a capability) when it is not empty.
    pub fn start_wrapped(state_dir: &std::path::Path, wrapper: &[&str], args: &[&str]) -> Daemon {
        require_root();
        let port = free_port();
        let dir = tmpdir(&format!("daemon{port}"));
        let status = dir.join("status.sock");
        let log = dir.join("watchdog.log");
        let metrics = format!("127.0.0.1:{port}");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .arg("--log-format")
            .arg("json")
            .arg("run")
            .args(args)
            .arg("--metrics-addr")
            .arg(&metrics)
            .arg("--status-socket")
            .arg(&status)
            .arg("--state-dir")
            .arg(state_dir)
            .env("WATCHDOG_LOG", "info,watchdog=debug")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            proc: Proc {
                child,
                name: "watchdog".into(),
            },
            metrics,
            status,
            log,
            state_dir: state_dir.to_path_buf(),
            keep_state: false,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(body) = http_get(&d.metrics, "/readyz", Duration::from_secs(1)) {
                if body.trim() == "ready" {
                    break;
                }
            }
            assert!(
                d.proc.alive(),
                "watchdog exited at start:\n{}",
                d.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "watchdog not ready in 30 s:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // `cargo xtask test` runs the real-server tests once per probe set through this variable:
        // make sure the daemon really runs the set asked for.
        if let Ok(set) = std::env::var("WATCHDOG_PROBES") {
            assert_eq!(
                d.metric("watchdog_probe_set", &[("set", &set)]),
                1.0,
                "WATCHDOG_PROBES={set} but the daemon runs another probe set:\n{}",
                d.log_text()
            );
        }
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Scrapes /metrics and parses it with a Prometheus text-format parser.
    pub fn scrape(&self) -> prometheus_parse::Scrape {
        let body = http_get(&self.metrics, "/metrics", Duration::from_secs(5)).expect("scrape");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format")
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum(&self.scrape(), name, labels)
    }

    /// Waits until `metric(name, labels) >= want`, returning the value.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        within: Duration,
    ) -> f64 {
        self.wait_metric_until(name, labels, |v| v >= want, within)
    }

    /// Waits until `holds(metric(name, labels))`, returning the last value read (the caller
    /// asserts on it, so a timeout shows the value it ended on).
    pub fn wait_metric_until(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        holds: impl Fn(f64) -> bool,
        within: Duration,
    ) -> f64 {
        let mut v = 0.0;
        wait_until(within, || {
            v = self.metric(name, labels);
            holds(v)
        });
        v
    }

    pub fn status_socket(&self) -> &std::path::Path {
        &self.status
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .arg("status")
            .arg("--json")
            .arg("--status-socket")
            .arg(&self.status)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "watchdog status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Log lines (JSON objects) whose message, or for action records whose `kind` ("request
    /// over budget", "request abandoned by its client"), is `msg`.
    ///
    /// An action's record is written once its batch is done, a moment after its metrics moved
    /// and its client saw the connection end: for the action kinds, an empty answer is retried
    /// for up to 2 s.
    pub fn log_events(&self, msg: &str) -> Vec<serde_json::Value> {
        let read = || -> Vec<serde_json::Value> {
            self.log_text()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["message"] == msg || v["kind"] == msg)
                .collect()
        };
        let action = msg == "request over budget" || msg == "request abandoned by its client";
        let until = Instant::now() + Duration::from_secs(2);
        let mut lines = read();
        while action && lines.is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
            lines = read();
        }
        lines
    }
}

pub fn sum(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// One HTTP/1.1 GET on a fresh connection; Err on timeout, reset or close without answer.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    request(&mut s, path)
}

/// Sends GET `path` on an open connection and reads one response (Content-Length framed).
pub fn request(s: &mut TcpStream, path: &str) -> std::io::Result<String> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed without an answer",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return Ok(body.to_string());
            }
        }
    }
}

pub fn local(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Polls `cond` every 10 ms until it holds or `within` has passed; true if it held.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `f` on a thread and returns how long it took with its result.
pub fn timed<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<(Duration, T)> {
    std::thread::spawn(move || {
        let t = Instant::now();
        let r = f();
        (t.elapsed(), r)
    })
}
