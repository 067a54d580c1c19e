//! deploy/prometheus/ checked for real (part of `cargo xtask test --deploy`; alone with
//! `cargo xtask test --prometheus`):
//!
//! - `promtool check rules` and `promtool test rules` (deploy/prometheus/rules_test.yml);
//! - every `watchdog_*` metric the rules and the dashboard name is one the daemon registers
//!   (watchdog/src/metrics.rs, with the `_total`, `_bucket`, `_sum`, `_count` suffixes);
//! - Debian's Prometheus, with 1 s scrape and rule intervals, scrapes the real daemon while it
//!   kills a worker of the real test server (tests/fixtures/app.py) that runs past its budget;
//!   through Prometheus's HTTP API the action is counted, WatchdogEnforcing fires, and every
//!   expression of every dashboard panel evaluates without error (those about requests,
//!   latency, actions, lateness and lost events with data).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::{
    harness::{free_port, http, wait_ready, Guard},
    root, setup,
};

const BUDGET_MS: u64 = 500;

fn dir() -> PathBuf {
    root().join("deploy/prometheus")
}

pub fn check(binary: &Path) -> Result<()> {
    let t = Instant::now();
    setup::ensure_packages(&["prometheus"])?;
    promtool(&["check", "rules", "rules.yml"])?;
    promtool(&["test", "rules", "rules_test.yml"])?;
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("dashboard.json"))?)
            .context("dashboard.json is not JSON")?;
    known_metrics(&[
        std::fs::read_to_string(dir().join("rules.yml"))?,
        dashboard.to_string(),
    ])?;
    let checked = t.elapsed();
    let (panels, exprs) = real_scrape(binary, &dashboard)?;
    println!(
        "prometheus: promtool check + test rules and metric names in {:.1} s; real scrape, \
         alert and {panels} dashboard panels ({exprs} expressions) in {:.1} s",
        checked.as_secs_f64(),
        (t.elapsed() - checked).as_secs_f64()
    );
    Ok(())
}

fn promtool(args: &[&str]) -> Result<()> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir())
        .output()
        .context("promtool (Debian package prometheus)")?;
    ensure!(
        out.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `watchdog_*` names in `texts` (recording-rule names, which hold `:`, excepted).
fn metric_names(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("watchdog_").map(|a| a + i) {
        let end = (at..b.len()).find(|&j| !word(b[j])).unwrap_or(b.len());
        let before_ok = at == 0 || !word(b[at - 1]);
        let name = &text[at..end];
        if before_ok && !name.contains(':') {
            out.push(name.to_string());
        }
        i = end;
    }
    out.sort();
    out.dedup();
    out
}

/// Every metric named is registered by the daemon: never an invented one.
fn known_metrics(texts: &[String]) -> Result<()> {
    let source = std::fs::read_to_string(root().join("watchdog/src/metrics.rs"))?;
    let registered = |n: &str| source.contains(&format!("\"{n}\""));
    let mut unknown = Vec::new();
    let mut seen = 0;
    for name in texts.iter().flat_map(|t| metric_names(t)) {
        seen += 1;
        let ok = registered(&name)
            || ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(registered));
        if !ok {
            unknown.push(name);
        }
    }
    ensure!(
        seen >= 10,
        "only {seen} metric names found: the scan is broken"
    );
    ensure!(
        unknown.is_empty(),
        "metrics the daemon does not export (watchdog/src/metrics.rs): {unknown:?}"
    );
    Ok(())
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (c as char).to_string()
            }
            _ => format!("%{c:02X}"),
        })
        .collect()
}

/// An instant query through the HTTP API: its result vector, or the error Prometheus gave.
fn query(prom: &str, q: &str) -> Result<Vec<Value>> {
    let raw = http(prom, &format!("/api/v1/query?query={}", encode(q)))?;
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: Value = serde_json::from_str(body).with_context(|| format!("answer to {q}: {raw}"))?;
    ensure!(
        v["status"] == "success",
        "Prometheus refused {q}: {} {}",
        v["errorType"],
        v["error"]
    );
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + within;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `cmd` in its own process group; with `ready`, waits for that first line on stdout.
fn spawn(cmd: &mut Command, ready: Option<&str>) -> Result<Guard> {
    cmd.process_group(0);
    if ready.is_some() {
        cmd.stdout(Stdio::piped());
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    if let Some(word) = ready {
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        ensure!(line.starts_with(word), "{cmd:?} did not start: {line:?}");
    }
    Ok(Guard(child))
}

fn real_scrape(binary: &Path, dashboard: &Value) -> Result<(usize, usize)> {
    let work = root().join("target/prometheus-test");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let (app_port, metrics_port, prom_port) = (free_port()?, free_port()?, free_port()?);
    let _app = spawn(
        Command::new("python3")
            .arg(root().join("watchdog/tests/fixtures/app.py"))
            .args([app_port.to_string(), "2".into()]),
        Some("READY"),
    )?;
    let metrics = format!("127.0.0.1:{metrics_port}");
    let state = format!(
        "/sys/fs/bpf/watchdog-test-{}-prometheus",
        std::process::id()
    );
    let log = work.join("watchdog.log");
    let mut daemon = spawn(
        Command::new(binary)
            .args(["--log-format", "json", "run", "--port"])
            .arg(app_port.to_string())
            .args(["--budget", &format!("{BUDGET_MS}ms"), "--signal", "SIGKILL"])
            .args(["--metrics-addr", &metrics, "--state-dir", &state])
            .arg("--status-socket")
            .arg(work.join("status.sock"))
            .stderr(std::fs::File::create(&log)?),
        None,
    )?;
    wait_ready(&metrics, &log)?;

    let config = work.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: watchdog\n    static_configs:\n      - targets: [\"{metrics}\"]\n",
            dir().join("rules.yml").display()
        ),
    )?;
    let prom = format!("127.0.0.1:{prom_port}");
    let _prometheus = spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .arg("--log.level=warn")
            .stderr(std::fs::File::create(work.join("prometheus.log"))?),
        None,
    )?;
    wait_for("Prometheus ready", Duration::from_secs(20), || {
        Ok(http(&prom, "/-/ready").is_ok_and(|r| r.starts_with("HTTP/1.0 200")))
    })?;
    wait_for(
        "Prometheus scraping the daemon",
        Duration::from_secs(10),
        || Ok(query(&prom, "up{job=\"watchdog\"} == 1")?.len() == 1),
    )?;

    // Traffic: fast requests, then one that runs past its budget and is killed.
    for _ in 0..20 {
        // app.py keeps a connection open for the next request: half-close to end it.
        let mut c = TcpStream::connect(("127.0.0.1", app_port))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n")?;
        c.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)?;
        ensure!(answer.starts_with("HTTP/1.1 200"), "/fast: {answer:?}");
    }
    let sent = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", app_port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /slow HTTP/1.0\r\n\r\n")?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let killed = sent.elapsed();
    ensure!(
        buf.is_empty()
            && killed >= Duration::from_millis(BUDGET_MS)
            && killed < Duration::from_millis(BUDGET_MS + 1000),
        "the over-budget worker was not killed at its budget: {killed:?}, answer {:?}",
        String::from_utf8_lossy(&buf)
    );

    wait_for(
        "the action counted in Prometheus",
        Duration::from_secs(10),
        || {
            let r = query(
            &prom,
            "sum(watchdog_actions_total{result=\"delivered\", action=\"SIGKILL\", policy=\"cli\"})",
        )?;
            Ok(r.first().is_some_and(|s| value(s) == 1.0))
        },
    )?;

    // Rates need two samples of the new series in their window.
    wait_for(
        "a second scrape of the action",
        Duration::from_secs(10),
        || {
            let r = query(
                &prom,
                "count_over_time(watchdog_actions_total{result=\"delivered\"}[15s])",
            )?;
            Ok(r.first().is_some_and(|s| value(s) >= 2.0))
        },
    )?;

    // Every panel expression, with the dashboard's variables as Grafana would fill them.
    let mut exprs = 0;
    let panels = dashboard["panels"].as_array().context("no panels")?;
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        let mut rows = 0;
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().context("a target without expr")?;
            let q = expr
                .replace("$__rate_interval", "15s")
                .replace("$job", "watchdog")
                .replace("$instance", ".*");
            ensure!(
                !q.contains('$'),
                "{title}: a variable this test does not fill: {q}"
            );
            rows += query(&prom, &q)
                .with_context(|| format!("panel {title:?}"))?
                .len();
            exprs += 1;
        }
        let must_have_data = [
            "Requests",
            "Time to first",
            "Actions",
            "lateness",
            "Lost events",
            "up",
        ]
        .iter()
        .any(|w| title.contains(w));
        ensure!(
            rows > 0 || !must_have_data,
            "panel {title:?} has no data after a real scrape"
        );
    }

    wait_for("WatchdogEnforcing firing", Duration::from_secs(15), || {
        let r = query(
            &prom,
            "ALERTS{alertname=\"WatchdogEnforcing\", alertstate=\"firing\", policy=\"cli\", action=\"SIGKILL\"}",
        )?;
        Ok(r.len() == 1)
    })?;
    let quiet = query(&prom, "ALERTS{alertname!=\"WatchdogEnforcing\"}")?;
    ensure!(quiet.is_empty(), "other alerts fire: {quiet:?}");

    // Ctrl-C: the daemon detaches its programs.
    // SAFETY: kill(2) on the daemon's pid; no memory is involved.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGINT) };
    let status = daemon.0.wait()?;
    ensure!(status.success(), "daemon exit on SIGINT: {status}");
    ensure!(!Path::new(&state).exists(), "SIGINT left {state} pinned");
    Ok((panels.len(), exprs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_skip_recording_rules_and_prose() {
        let text = "record: port:watchdog_request_duration_seconds:p99_5m\n\
                    expr: rate(watchdog_requests_total[5m]) + watchdog_tracked_connections\n\
                    group watchdog.alerts";
        assert_eq!(
            metric_names(text),
            ["watchdog_requests_total", "watchdog_tracked_connections"]
        );
        assert_eq!(encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    }
}
