//! Issue 28: nobody can aim the watchdog. A signal reaches only the task the policy chose (the
//! request's owner, checked through the pinned task), and a `[protect]`ed process is never
//! stopped or read. Real servers, a real unprivileged victim (`setpriv` as nobody), real signals.

mod common;

use std::{
    io::{BufRead, BufReader, Lines, Write},
    net::TcpStream,
    os::unix::process::{CommandExt, ExitStatusExt},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("watchdog.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `nobody`, with no groups: another user's process, not the server's.
const AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

/// Starts `sleep 30` as nobody with process id `pid`, the way `reliability.rs`'s reused pid is
/// forced (standing in for a pid wrap): write `pid - 1` to `ns_last_pid` right before each
/// fork, until the kernel hands out `pid` (another process may take the number in between).
fn spawn_nobody_with_pid(pid: u32) -> Child {
    for _ in 0..20_000 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut child = Command::new(AS_NOBODY[0])
            .args(&AS_NOBODY[1..])
            .args(["sleep", "30"])
            .process_group(0)
            .spawn()
            .unwrap();
        if child.id() == pid {
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("the kernel did not hand out {pid} again");
}

/// Alive, not a zombie: `/proc/PID/stat`'s state is not `Z` and it has not been reaped.
fn lives(child: &mut Child) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.chars().next().unwrap()));
    child.try_wait().unwrap().is_none() && state.is_some_and(|s| s != 'Z')
}

/// The exec fixture on `port`: its process (killed with its group on drop) and its output.
fn exec_server(port: u16) -> (Proc, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new("python3")
        .arg(fixture("exec_thread.py"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("fixture output").unwrap();
    assert!(ready.starts_with("READY"), "{ready}");
    let proc = Proc {
        child,
        name: "exec_thread.py".into(),
    };
    (proc, lines)
}

/// Sends a request the server never answers; returns (the client, when it was sent, the
/// reading thread, its process) once that thread has read it and exec'd (the process keeps its
/// pid, the thread's id is free).
fn request_then_exec(
    port: u16,
    lines: &mut Lines<BufReader<ChildStdout>>,
) -> (TcpStream, Instant, u32, u32) {
    let mut client = TcpStream::connect(local(port)).unwrap();
    client
        .write_all(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let mut next = || lines.next().expect("fixture output").unwrap();
    let read = next();
    let mut words = read.split(' ');
    let (tid, pid): (u32, u32) = match (words.next(), words.next(), words.next(), words.next()) {
        (Some("TID"), Some(t), Some("PID"), Some(p)) => (t.parse().unwrap(), p.parse().unwrap()),
        _ => panic!("fixture said {read:?}"),
    };
    assert_ne!(
        tid, pid,
        "the request was read by a thread that is not the leader"
    );
    assert_eq!(next(), format!("EXECED {pid}"), "exec'd, pid kept");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists(),
        "thread {tid} vanished with the exec"
    );
    (client, started, tid, pid)
}

#[test]
fn a_thread_id_freed_by_exec_and_taken_by_another_user_is_never_signalled_and_the_request_goes_with_its_thread(
) {
    require_root();
    let port = free_port();
    let dir = tmpdir(&format!("exec-thread{port}"));
    let cfg = write_config(
        &dir,
        &format!(
            "[[policy]]\nname = \"threads\"\nports = [{port}]\nbudget = \"1s\"\ntarget = \"thread\"\n\
             steps = [\n{{ after = \"1s\", signal = \"SIGTERM\" }},\n{{ after = \"1500ms\", signal = \"SIGKILL\" }},\n]\n"
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let (mut server, mut lines) = exec_server(port);
    let (_client, started, tid, pid) = request_then_exec(port, &mut lines);
    // Another user's process takes the vanished thread id before the deadline.
    let mut victim = spawn_nobody_with_pid(tid);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the victim came too late to be a target: {:?}",
        started.elapsed()
    );
    // `setpriv` drops to nobody before it execs `sleep`.
    let uid = || {
        std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().next().map(str::to_string))
    };
    assert!(
        wait_until(Duration::from_millis(500), || uid().as_deref()
            == Some("65534")),
        "the victim runs as nobody: uid {:?}",
        uid()
    );
    // Well past both steps (1 s and 1.5 s), the victim lives, every moment it is looked at.
    let until = Duration::from_millis(2500);
    let died = wait_until(until.saturating_sub(started.elapsed()), || {
        !lives(&mut victim)
    });
    assert!(
        !died,
        "the process that took thread id {tid} was signalled: {:?}",
        victim.try_wait()
    );
    // The kernel saw the request.
    let p = port.to_string();
    assert!(
        d.metric("watchdog_requests_total", &[("port", &p)]) >= 1.0,
        "{}",
        d.log_text()
    );
    // The request went with its thread to the id that thread has now (the kernel re-keys it at
    // the exec): every action named that thread, none the victim's.
    let records = d.log_events("request over budget");
    println!("records: {records:?}");
    assert!(!records.is_empty(), "the request was still enforced");
    for r in &records {
        assert_ne!(r["tid"], tid, "never the vanished tid: {r}");
        if r["result"] == "delivered" {
            assert_eq!(r["tid"], pid, "{r}");
        }
    }
    let status = server.child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGTERM),
        "the exec'd thread (now the process's) got the policy's first step: {status:?}"
    );
    assert!(lives(&mut victim));
    let _ = victim.kill();
    let _ = victim.wait();
    println!(
        "tid {tid} of {pid} taken by nobody's process: not signalled; records {}",
        records.len()
    );
}

#[test]
fn the_execd_process_holding_the_request_is_handled_as_its_policy_says() {
    require_root();
    let port = free_port();
    let dir = tmpdir(&format!("exec-process{port}"));
    let cfg = write_config(
        &dir,
        &format!(
            "[[policy]]\nname = \"process\"\nports = [{port}]\nbudget = \"1s\"\ntarget = \"process\"\n\
             signal = \"SIGKILL\"\nmatch = {{ exe = [\"*python3*\"] }}\n"
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let (mut server, mut lines) = exec_server(port);
    let (_client, started, _tid, pid) = request_then_exec(port, &mut lines);
    assert_eq!(server.pid(), pid);
    // The exec'd program (the policy still selects it: python3) is the request's process.
    let status = server.child.wait().unwrap();
    let took = started.elapsed();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1500),
        "killed after {took:?}, budget 1 s"
    );
    let records = d.log_events("request over budget");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["result"], "delivered", "{}", records[0]);
    assert_eq!(records[0]["pid"], pid, "{}", records[0]);
}

/// Tracer pids of every thread of `pid` that is being traced (empty: none is).
fn tracers(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:").map(|v| v.trim().to_string()))
        })
        .filter(|v| v != "0")
        .collect()
}

#[test]
fn a_protected_process_over_budget_is_never_stopped_or_read() {
    require_root();
    let port = free_port();
    let dir = tmpdir(&format!("protect{port}"));
    let events = dir.join("events.jsonl");
    let cfg = write_config(
        &dir,
        &format!(
            "[daemon]\nstack_timeout = \"200ms\"\nevents = {events:?}\n\n[protect]\ncomm = [\"python3\"]\n\n\
             [[policy]]\nname = \"py\"\nports = [{port}]\nbudget = \"500ms\"\nsignal = \"SIGKILL\"\n"
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap(), "--stacks", "true"]);
    let mut server = threaded(port);
    let pid = server.pid();
    let slow = timed(move || http_get(&local(port), "/slow", Duration::from_millis(1500)));
    // Through the deadline and a second past it, no thread of the server is ever traced.
    let started = Instant::now();
    let mut traced = Vec::new();
    let mut looks = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        traced.extend(tracers(pid));
        looks += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let (_, answer) = slow.join().unwrap();
    assert!(answer.is_err(), "the slow request was answered: {answer:?}");
    assert!(
        traced.is_empty(),
        "the protected server was traced by {traced:?}"
    );
    assert!(server.alive(), "the protected server was signalled");
    assert!(looks > 100, "looked {looks} times");
    // The kernel counted the request, and the daemon refused it, by `[protect]`.
    let p = port.to_string();
    assert!(d.metric("watchdog_requests_total", &[("port", &p)]) >= 1.0);
    let records = d.log_events("request over budget");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["result"], "refused", "{}", records[0]);
    assert_eq!(records[0]["detail"], "refused_protected", "{}", records[0]);
    assert_eq!(records[0]["native_stopped_ms"], 0.0, "{}", records[0]);
    assert_eq!(records[0]["kernel_stack"], "None", "{}", records[0]);
    // Its record holds nothing read from it: no diagnosis, no stack.
    let record: serde_json::Value = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .next()
        .map(|l| serde_json::from_str(l).unwrap())
        .expect("an event record");
    println!("record: {record}");
    assert_eq!(record["detail"], "refused_protected");
    for key in ["diagnosis", "stack", "native_stack"] {
        assert!(record.get(key).is_none(), "{key} in {record}");
    }
    assert!(!record.to_string().contains("stopped_ms"), "{record}");
}
