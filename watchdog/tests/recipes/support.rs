#![allow(dead_code)]
//! What every recipe test does the same way: start a real server with its output in a file,
//! wait until it answers, write a policy, time a client, build a fixture once.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::*;

/// The recipes' fixture directory.
pub fn recipes_dir() -> PathBuf {
    fixture("recipes")
}

/// Where built fixtures (the Go binary, the Java classes) are cached between runs.
pub fn build_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/recipes");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// True if `out` is missing or older than `src`.
pub fn stale(out: &Path, src: &Path) -> bool {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (m(out), m(src)) {
        (Some(o), Some(s)) => o < s,
        _ => true,
    }
}

/// Runs a build command, failing loudly with its output.
pub fn build(what: &str, cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (cargo xtask test installs it)"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `cmd` in its own process group (killed with it on drop), stdout and stderr to `log`.
pub fn spawn_logged(name: &str, cmd: &mut Command, log: &Path) -> Proc {
    let f = std::fs::File::create(log).unwrap();
    cmd.stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .process_group(0);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e} (cargo xtask test installs it)"));
    Proc {
        child,
        name: name.into(),
    }
}

/// Waits until GET `/fast` on `port` answers 200 (the server is up), or fails with its log.
pub fn wait_up(p: &mut Proc, port: u16, log: &Path) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = send(port, &get_req("/fast"), Duration::from_secs(2)) {
            if r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200") {
                return;
            }
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(p.alive(), "{} exited at start:\n{text}", p.name);
        assert!(
            Instant::now() < end,
            "{} not answering in 30 s:\n{text}",
            p.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn get_req(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
}

pub fn post_req(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Sends `raw` on a fresh connection and reads the whole answer (head and body) up to its
/// Content-Length or the close. Err: reset, timeout, or a close before any byte.
pub fn send(port: u16, raw: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect(local(port))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(raw.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            if buf.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed without an answer",
                ));
            }
            return Ok(String::from_utf8_lossy(&buf).into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            if len.is_some_and(|len| body.len() >= len) {
                return Ok(text);
            }
        }
    }
}

/// How a client's request ended, and when (from just before it connected).
pub struct Seen {
    pub took: Duration,
    pub result: std::io::Result<String>,
}

impl Seen {
    /// "reset", "eof", "timeout", or the answer's status line.
    pub fn how(&self) -> String {
        match &self.result {
            Ok(r) => r.lines().next().unwrap_or("").to_string(),
            Err(e) => match e.kind() {
                std::io::ErrorKind::ConnectionReset => "reset".into(),
                std::io::ErrorKind::UnexpectedEof => "eof".into(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timeout".into(),
                _ => format!("error {e}"),
            },
        }
    }
    pub fn body(&self) -> &str {
        match &self.result {
            Ok(r) => r.split_once("\r\n\r\n").map_or("", |(_, b)| b),
            Err(_) => "",
        }
    }
    /// Asserts the request ended within `lo..hi` seconds, printing the figure.
    pub fn within(&self, what: &str, lo: f64, hi: f64) -> &Self {
        let t = self.took.as_secs_f64();
        println!("{what}: {} after {t:.3} s", self.how());
        assert!(
            (lo..hi).contains(&t),
            "{what}: {} after {t:.3} s, wanted {lo}..{hi} s",
            self.how()
        );
        self
    }
}

/// Runs a request on a thread, `delay` after now.
pub fn client(port: u16, raw: String, delay: Duration) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let t = Instant::now();
        let result = send(port, &raw, Duration::from_secs(10));
        Seen {
            took: t.elapsed(),
            result,
        }
    })
}

/// Writes a policy file on `port` with `body` after the name and ports; starts the daemon.
pub fn daemon(name: &str, port: u16, body: &str) -> Daemon {
    let dir = tmpdir(&format!("recipe-{name}"));
    let cfg = dir.join("watchdog.toml");
    std::fs::write(
        &cfg,
        format!("[[policy]]\nname = \"{name}\"\nports = [{port}]\n{body}\n"),
    )
    .unwrap();
    Daemon::start(&["--config", cfg.to_str().unwrap()])
}

/// Waits up to `within` for `needle` in the file at `path`; the file's text.
pub fn wait_text(path: &Path, needle: &str, within: Duration) -> String {
    let mut text = String::new();
    let found = wait_until(within, || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        text.contains(needle)
    });
    assert!(
        found,
        "{needle:?} not in {} within {within:?}:\n{text}",
        path.display()
    );
    text
}

/// The daemon's action records for this test: (action, result, elapsed ms).
pub fn actions(d: &Daemon) -> Vec<(String, String, u64)> {
    d.log_events("request over budget")
        .iter()
        .map(|l| {
            (
                l["action"].as_str().unwrap_or("").into(),
                l["result"].as_str().unwrap_or("").into(),
                l["elapsed_ms"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The number of requests the kernel counted on `port` (the quiet side of a test moved it).
pub fn requests_seen(d: &Daemon, port: u16) -> f64 {
    d.metric("watchdog_requests_total", &[("port", &port.to_string())])
}

/// The pid in a fixture's answer (`... pid=N`).
pub fn pid_of(body: &str) -> u32 {
    body.rsplit_once("pid=")
        .and_then(|(_, p)| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {body:?}"))
}

/// Asserts the daemon's records are exactly `want` (action, result, at ms), each landing within
/// 150 ms after its offset, and that the kernel counted the stuck request and the other one on
/// `port` (the other's "nothing happened" is a request it saw); prints them.
pub fn assert_actions(d: &Daemon, port: u16, want: &[(&str, &str, u64)]) {
    let got = actions(d);
    let seen = requests_seen(d, port);
    println!("actions: {got:?}; requests the kernel counted on :{port}: {seen}");
    assert!(seen >= 2.0, "the kernel saw {seen} requests on :{port}");
    assert_eq!(got.len(), want.len(), "{got:?}\n{}", d.log_text());
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.0.as_str(), g.1.as_str()), (w.0, w.1), "{got:?}");
        assert!(
            (w.2..w.2 + 150).contains(&g.2),
            "{} at {} ms, wanted {} ms",
            g.0,
            g.2,
            w.2
        );
    }
}
