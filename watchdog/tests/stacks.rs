//! The owner's Python stack in the record of the first action, read from outside (py-spy as a
//! library, the process never stopped), against real Python servers.

mod common;

use std::{process::Command, time::Duration};

use common::*;

/// The 1-based line of `fixture` that contains `text`.
fn line_of(fixture_name: &str, text: &str) -> usize {
    std::fs::read_to_string(fixture(fixture_name))
        .unwrap()
        .lines()
        .position(|l| l.contains(text))
        .unwrap_or_else(|| panic!("{text:?} not in {fixture_name}"))
        + 1
}

/// Runs one over-budget request for `path` on `port` under a 1 s SIGKILL budget and returns
/// the action's log line, with stacks on. The stack's time limit is 200 ms here, not the default 20 ms: a first
/// read on this VM takes 8-22 ms, and these tests check what is read; the times are printed.
fn stuck(port: u16, path: &'static str) -> serde_json::Value {
    let dir = tmpdir(&format!("stacks{port}"));
    let cfg = dir.join("watchdog.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nstacks = true\nstack_timeout = \"200ms\"\n\n[[policy]]\nname = \"py\"\nports = [{port}]\n\
             budget = \"1s\"\nsignal = \"SIGKILL\"\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let r = http_get(&local(port), path, Duration::from_secs(10));
    assert!(r.is_err(), "{path} was answered: {r:?}");
    // The record is written once the action's batch is done: wait for it (bounded).
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let mut lines = d.log_events("request over budget");
    while lines.is_empty() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
        lines = d.log_events("request over budget");
    }
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["result"], "delivered", "{}", lines[0]);
    lines[0].clone()
}

#[test]
fn a_forking_server_in_a_cpu_loop_and_in_sleep_names_the_handler_file_and_line() {
    let port = free_port();
    let _app = app(port, 2, &[]);
    let line = stuck(port, "/slow");
    let stack = line["stack"].as_str().unwrap();
    let (w, p) = (
        line_of("app.py", "while time.monotonic() - t < 100:"),
        line_of("app.py", "while time.monotonic() - t < 100:") + 1,
    );
    println!("CPU loop: stack {stack:?}, read in {} ms", line["stack_ms"]);
    assert!(
        stack.starts_with(&format!("handle (app.py:{w})"))
            || stack.starts_with(&format!("handle (app.py:{p})")),
        "{stack}"
    );
    assert!(stack.contains("< worker (app.py:"), "{stack}");
    let ms = line["stack_ms"].as_f64().unwrap();
    assert!(ms > 0.0 && ms < 200.0, "read in {ms} ms, limit 200 ms");

    let line = stuck(port, "/sleep");
    let stack = line["stack"].as_str().unwrap();
    println!(
        "time.sleep: stack {stack:?}, read in {} ms",
        line["stack_ms"]
    );
    let s = line_of("app.py", "time.sleep(100)");
    assert!(
        stack.starts_with(&format!("handle (app.py:{s})")),
        "{stack}"
    );
}

#[test]
fn a_gevent_server_shows_the_running_greenlet() {
    let port = free_port();
    let _server = spawn_ready(
        "gevent_app.py",
        Command::new("python3")
            .arg(fixture("gevent_app.py"))
            .arg(port.to_string()),
    );
    let line = stuck(port, "/spin");
    let stack = line["stack"].as_str().unwrap();
    println!("gevent: stack {stack:?}, read in {} ms", line["stack_ms"]);
    let w = line_of("gevent_app.py", "while time.monotonic() - t < 100:");
    assert!(
        stack.starts_with(&format!("spin (gevent_app.py:{w})"))
            || stack.starts_with(&format!("spin (gevent_app.py:{})", w + 1)),
        "{stack}"
    );
    assert!(stack.contains("< app (gevent_app.py:"), "{stack}");
}

#[test]
fn a_server_that_is_not_python_gets_no_stack_and_its_action() {
    let port = free_port();
    // Node.js (on the base image): a handler that never answers.
    let mut node = spawn_ready(
        "node",
        Command::new("node").args([
            "-e",
            &format!(
                "require('http').createServer(() => {{}}).listen({port}, '127.0.0.1', () => console.log('READY'))"
            ),
        ]),
    );
    let line = stuck(port, "/never");
    assert!(
        line.get("stack").is_none_or(|s| s == ""),
        "no Python, no stack: {line}"
    );
    assert_eq!(line["comm"], "node", "{line}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!node.alive(), "the action still happened");
}
