//! Issue 16: a tested recipe per server model (README, "Recipes by server"). Each test runs the
//! real server, the real daemon with the recipe's policy, a request stuck past its 1 s budget and
//! another request in flight in the same process (it starts at 0.5 s and takes 0.8 s, so it is
//! in flight at the action and never over its own budget), and shows what the client saw and
//! when, what the other request saw, and which in-process cancel fired.
//!
//! PostgreSQL's recipe (SIGINT cancels the statement) is
//! `policies::postgres_query_is_cancelled_at_its_budget_and_the_session_goes_on`.

mod common;
#[path = "recipes/support.rs"]
mod support;

use std::{process::Command, time::Duration};

use common::*;
use support::*;

const SLOW_AT: Duration = Duration::ZERO;
/// When the other request starts: it ends at 1.3 s, before its own deadline at 1.5 s.
const OTHER_AT: Duration = Duration::from_millis(500);

/// gunicorn on `port` with the given worker arguments, its log (and the app's) in a directory.
fn gunicorn(name: &str, port: u16, args: &[&str]) -> (Proc, std::path::PathBuf) {
    let dir = tmpdir(name);
    let log = dir.join("gunicorn.log");
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "gunicorn", "--chdir"])
        .arg(recipes_dir())
        .args(["-b", &local(port), "--timeout", "30"])
        .args(args)
        .arg("--control-socket")
        .arg(dir.join("gunicorn.ctl"))
        .arg("wsgi_app:app")
        .env("RECIPE_LOG", dir.join("app.log"));
    let mut p = spawn_logged(name, &mut cmd, &log);
    wait_up(&mut p, port, &log);
    (p, dir)
}

/// The pids the app logged as starting `path`.
fn starts(dir: &std::path::Path, path: &str) -> Vec<u32> {
    std::fs::read_to_string(dir.join("app.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with(&format!("start {path}")))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// Pre-forked workers, one request each (gunicorn sync, uWSGI): SIGKILL the worker; its master
/// forks a new one. The other request is on another worker and completes.
fn prefork_kill(port: u16, d: &Daemon, dir: &std::path::Path) {
    let slow = client(port, get_req("/slow"), SLOW_AT);
    let other = client(port, get_req("/busy"), OTHER_AT);
    let s = slow.join().unwrap();
    s.within("stuck request", 1.0, 1.4);
    assert!(matches!(s.how().as_str(), "reset" | "eof"), "{}", s.how());
    let o = other.join().unwrap();
    o.within("other request (0.8 s of work)", 0.8, 1.2);
    assert!(o.how().ends_with("200 OK"), "{}", o.how());
    let killed = starts(dir, "/slow")[0];
    assert_ne!(
        pid_of(o.body()),
        killed,
        "the other request ran on another worker"
    );
    assert_actions(d, port, &[("SIGKILL", "delivered", 1000)]);
}

#[test]
fn gunicorn_sync_worker_is_killed_and_respawned() {
    let port = free_port();
    let (_g, dir) = gunicorn("gunicorn-sync", port, &["-k", "sync", "-w", "2"]);
    let d = daemon(
        "gunicorn-sync",
        port,
        "budget = \"1s\"\nsteps = [{ after = \"1s\", signal = \"SIGKILL\" }]",
    );
    prefork_kill(port, &d, &dir);
    // The arbiter saw it and forked a new worker; the server answers.
    wait_text(
        &dir.join("gunicorn.log"),
        "was sent SIGKILL",
        Duration::from_secs(3),
    );
    let again = client(port, get_req("/fast"), Duration::ZERO)
        .join()
        .unwrap();
    assert!(again.how().ends_with("200 OK"), "{}", again.how());
}

/// The drain ladder on a worker that runs many requests (gunicorn gthread, gevent): SIGTERM to
/// the worker at the budget (it stops accepting and finishes the others), SIGKILL after its
/// graceful timeout (1 s here). The other request in flight on the same worker completes.
///
/// `late_ms`: when a request sent during the drain is sure to find the worker closed to new
/// ones (gthread closes at once; the gevent worker looks at its flag once a second).
fn drain(name: &str, worker: &[&str], late_ms: u64) -> (Daemon, std::path::PathBuf, Seen, u16) {
    let port = free_port();
    let mut args = vec!["-w", "1", "--graceful-timeout", "1"];
    args.extend_from_slice(worker);
    let (g, dir) = gunicorn(name, port, &args);
    let d = daemon(
        name,
        port,
        "budget = \"1s\"\nsteps = [\n  { after = \"1s\", signal = \"SIGTERM\" },\n  \
         { after = \"2200ms\", signal = \"SIGKILL\" },\n]",
    );
    let slow = client(port, get_req("/slow"), SLOW_AT);
    let other = client(port, get_req("/busy"), OTHER_AT);
    let o = other.join().unwrap();
    o.within("other request on the same worker (0.8 s of work)", 0.8, 1.2);
    assert!(o.how().ends_with("200 OK"), "{}", o.how());
    let worker = starts(&dir, "/slow")[0];
    assert_eq!(pid_of(o.body()), worker, "both requests ran in one worker");
    // Sent during the drain: the draining worker no longer accepts; the worker the arbiter
    // forks once the old one is gone answers it.
    let late = client(
        port,
        get_req("/fast"),
        Duration::from_millis(late_ms - 1300),
    );
    let s = slow.join().unwrap();
    let again = late.join().unwrap();
    assert!(
        again.how().ends_with("200 OK"),
        "the arbiter forked a new worker: {}",
        again.how()
    );
    assert_ne!(
        pid_of(again.body()),
        worker,
        "the draining worker took no new request"
    );
    println!(
        "request sent during the drain: answered by the new worker after {:.3} s",
        again.took.as_secs_f64()
    );
    drop(g);
    (d, dir, s, port)
}

#[test]
fn gunicorn_gthread_drain_ladder_lets_the_other_request_finish() {
    let (d, _dir, s, port) = drain(
        "gunicorn-gthread",
        &["-k", "gthread", "--threads", "4"],
        1500,
    );
    s.within("stuck request", 2.2, 2.6);
    assert!(matches!(s.how().as_str(), "reset" | "eof"), "{}", s.how());
    // The stuck thread holds the worker past its graceful timeout: only SIGKILL ends it.
    assert_actions(
        &d,
        port,
        &[
            ("SIGTERM", "delivered", 1000),
            ("SIGKILL", "delivered", 2200),
        ],
    );
}

#[test]
fn gunicorn_gevent_drain_ladder_lets_the_other_request_finish() {
    let (d, _dir, s, port) = drain(
        "gunicorn-gevent",
        &["-k", "gevent", "--worker-connections", "16"],
        2100,
    );
    s.within("stuck request", 2.2, 2.6);
    assert!(matches!(s.how().as_str(), "reset" | "eof"), "{}", s.how());
    assert_actions(
        &d,
        port,
        &[
            ("SIGTERM", "delivered", 1000),
            ("SIGKILL", "delivered", 2200),
        ],
    );
}

#[test]
fn uwsgi_worker_is_killed_and_respawned() {
    let port = free_port();
    let dir = tmpdir("uwsgi");
    let log = dir.join("uwsgi.log");
    let mut cmd = Command::new("uwsgi");
    cmd.args([
        "--plugin",
        "python3",
        "--http-socket",
        &local(port),
        "--master",
    ])
    .args(["--processes", "2", "--chdir"])
    .arg(recipes_dir())
    .args(["--wsgi-file", "wsgi_app.py", "--disable-logging"])
    .env("RECIPE_LOG", dir.join("app.log"));
    let mut p = spawn_logged("uwsgi", &mut cmd, &log);
    wait_up(&mut p, port, &log);
    let d = daemon(
        "uwsgi",
        port,
        "budget = \"1s\"\nsteps = [{ after = \"1s\", signal = \"SIGKILL\" }]",
    );
    prefork_kill(port, &d, &dir);
    wait_text(&log, "killed by signal 9", Duration::from_secs(3));
    wait_text(&log, "Respawned uWSGI worker", Duration::from_secs(3));
    let again = client(port, get_req("/fast"), Duration::ZERO)
        .join()
        .unwrap();
    assert!(again.how().ends_with("200 OK"), "{}", again.how());
}

#[test]
fn uvicorn_reset_releases_the_client_and_the_handler_runs_on() {
    let port = free_port();
    let dir = tmpdir("uvicorn");
    let log = dir.join("uvicorn.log");
    let marker = dir.join("marker");
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "uvicorn", "--app-dir"])
        .arg(recipes_dir())
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--no-access-log",
        ])
        .arg("asgi_app:app")
        .env("RECIPE_MARKER", &marker);
    let mut p = spawn_logged("uvicorn", &mut cmd, &log);
    wait_up(&mut p, port, &log);
    let d = daemon(
        "uvicorn",
        port,
        "budget = \"1s\"\nsteps = [{ after = \"1s\", action = \"reset\" }]",
    );
    let slow = client(port, get_req("/slow"), SLOW_AT);
    let other = client(port, get_req("/busy"), OTHER_AT);
    let s = slow.join().unwrap();
    s.within("stuck request", 1.0, 1.4);
    assert_eq!(s.how(), "reset");
    let o = other.join().unwrap();
    o.within(
        "other request in the same event loop (0.8 s of work)",
        0.8,
        1.2,
    );
    assert!(o.how().ends_with("200 OK"), "{}", o.how());
    assert_actions(&d, port, &[("reset", "delivered", 1000)]);
    // Honestly: the handler task was not cancelled. It ran on to its end, a second after the
    // client was released, and only then found the disconnect.
    assert!(!marker.exists(), "the handler finished before the reset?");
    let text = wait_text(&marker, "ran on", Duration::from_secs(3));
    println!("uvicorn handler: {}", text.trim());
    assert!(text.contains("http.disconnect"), "{text}");
    assert!(p.alive());
}

/// A server whose log says `READY` once it listens: started, waited for, and its log path.
fn server_ready(name: &str, port: u16, cmd: &mut Command) -> (Proc, std::path::PathBuf) {
    let dir = tmpdir(name);
    let log = dir.join(format!("{name}.log"));
    let mut p = spawn_logged(name, cmd, &log);
    wait_up(&mut p, port, &log);
    (p, log)
}

/// The stuck request and the other one in flight, on a policy that resets at 1 s: the client
/// is released at the budget with a RST, the other request completes.
fn reset_pair(port: u16, slow: String) -> Seen {
    let slow = client(port, slow, SLOW_AT);
    let other = client(port, get_req("/busy"), OTHER_AT);
    let s = slow.join().unwrap();
    s.within("stuck request", 1.0, 1.4);
    assert_eq!(s.how(), "reset");
    let o = other.join().unwrap();
    o.within(
        "other request in the same process (0.8 s of work)",
        0.8,
        1.2,
    );
    assert!(o.how().ends_with("200 OK"), "{}", o.how());
    s
}

const RESET_AT_1S: &str = "budget = \"1s\"\nsteps = [{ after = \"1s\", action = \"reset\" }]";

#[test]
fn node_reset_fires_res_close_in_the_handler() {
    let port = free_port();
    let (mut p, log) = server_ready(
        "node",
        port,
        Command::new("node")
            .arg(recipes_dir().join("server.js"))
            .arg(port.to_string()),
    );
    let d = daemon("node", port, RESET_AT_1S);
    reset_pair(port, get_req("/slow"));
    assert_actions(&d, port, &[("reset", "delivered", 1000)]);
    // The in-process cancel: the handler's res.on('close') ran at the reset.
    let text = wait_text(&log, "close /slow after", Duration::from_secs(1));
    let line = text.lines().find(|l| l.starts_with("close /slow")).unwrap();
    println!("node: {line}");
    let ms: u64 = line.split(' ').nth(3).unwrap().parse().unwrap();
    assert!((1000..1200).contains(&ms), "{line}");
    assert!(line.ends_with("finished=false"), "{line}");
    assert!(p.alive());
}

#[test]
fn node_cluster_worker_is_killed_and_the_primary_respawns_it() {
    let port = free_port();
    let (mut p, log) = server_ready(
        "node-cluster",
        port,
        Command::new("node")
            .arg(recipes_dir().join("server.js"))
            .arg(port.to_string())
            .arg("cluster"),
    );
    let d = daemon(
        "node-cluster",
        port,
        "budget = \"1s\"\nsteps = [{ after = \"1s\", signal = \"SIGKILL\" }]",
    );
    // /slow spins on the CPU: the worker's event loop is held, no 'close' can run: only a kill
    // helps. The primary hands new connections to the worker that is free.
    let slow = client(port, get_req("/slow"), SLOW_AT);
    let other = client(port, get_req("/busy"), OTHER_AT);
    let s = slow.join().unwrap();
    s.within("stuck request", 1.0, 1.4);
    assert!(matches!(s.how().as_str(), "reset" | "eof"), "{}", s.how());
    let o = other.join().unwrap();
    o.within(
        "other request, on the other worker (0.8 s of work)",
        0.8,
        1.2,
    );
    assert!(o.how().ends_with("200 OK"), "{}", o.how());
    assert_actions(&d, port, &[("SIGKILL", "delivered", 1000)]);
    let text = wait_text(&log, "respawned", Duration::from_secs(3));
    println!(
        "node primary: {}",
        text.lines().find(|l| l.contains("respawned")).unwrap()
    );
    assert!(text.contains("died (SIGKILL)"), "{text}");
    assert!(
        !text.contains("close /slow"),
        "a held loop runs no 'close': {text}"
    );
    let again = client(port, get_req("/fast"), Duration::ZERO)
        .join()
        .unwrap();
    assert!(again.how().ends_with("200 OK"), "{}", again.how());
    assert!(p.alive(), "the primary lives");
}

/// The Go server, built once into target/recipes with the stdlib only.
fn go_server() -> std::path::PathBuf {
    let src = recipes_dir().join("server.go");
    let out = build_dir().join("goserver");
    if stale(&out, &src) {
        build(
            "go build",
            Command::new("go")
                .arg("build")
                .arg("-o")
                .arg(&out)
                .arg(&src)
                .env("GOFLAGS", "")
                .env("GO111MODULE", "off")
                .env("GOCACHE", build_dir().join("gocache")),
        );
    }
    out
}

#[test]
fn go_reset_cancels_the_context_only_of_a_handler_that_read_its_body() {
    let port = free_port();
    let (mut p, log) = server_ready("go", port, Command::new(go_server()).arg(port.to_string()));
    let d = daemon("go", port, RESET_AT_1S);
    let noread = client(port, post_req("/noread", "hello"), SLOW_AT);
    reset_pair(port, post_req("/read", "hello"));
    let n = noread.join().unwrap();
    n.within("stuck request, body unread", 1.0, 1.4);
    assert_eq!(n.how(), "reset");
    assert_actions(
        &d,
        port,
        &[("reset", "delivered", 1000), ("reset", "delivered", 1000)],
    );
    // r.Context() is cancelled at the reset for the handler that read its body; the one that
    // did not read it never hears of it (Go starts its background read only after the body).
    let text = wait_text(&log, "/noread ctx", Duration::from_secs(2));
    println!(
        "go: {}",
        text.lines()
            .filter(|l| l.contains("ctx"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let read = text.lines().find(|l| l.starts_with("/read ctx")).unwrap();
    assert!(read.starts_with("/read ctx cancelled after"), "{read}");
    let ms: u64 = read.split(' ').nth(4).unwrap().parse().unwrap();
    assert!((1000..1200).contains(&ms), "{read}");
    assert!(text.contains("/noread ctx not cancelled in 15"), "{text}");
    assert!(p.alive());
}

/// The JVM server's classes, compiled once into target/recipes/java.
fn java_classes() -> std::path::PathBuf {
    let src = recipes_dir().join("Server.java");
    let out = build_dir().join("java");
    if stale(&out.join("Server.class"), &src) {
        build("javac", Command::new("javac").arg("-d").arg(&out).arg(&src));
    }
    out
}

#[test]
fn jvm_sigquit_dumps_the_handler_thread_then_reset_releases_the_client() {
    let port = free_port();
    let (mut p, log) = server_ready(
        "jvm",
        port,
        Command::new("java")
            .args(["-Xshare:auto", "-XX:TieredStopAtLevel=1", "-cp"])
            .arg(java_classes())
            .args(["Server", &port.to_string()]),
    );
    let d = daemon(
        "jvm",
        port,
        "budget = \"1s\"\nsteps = [\n  { after = \"1s\", signal = \"SIGQUIT\" },\n  \
         { after = \"1200ms\", action = \"reset\" },\n]",
    );
    let slow = client(port, get_req("/slow"), SLOW_AT);
    let other = client(port, get_req("/busy"), OTHER_AT);
    let s = slow.join().unwrap();
    s.within("stuck request", 1.2, 1.6);
    assert_eq!(s.how(), "reset");
    let o = other.join().unwrap();
    o.within("other request in the same JVM (0.8 s of work)", 0.8, 1.2);
    assert!(o.how().ends_with("200 OK"), "{}", o.how());
    assert_actions(
        &d,
        port,
        &[("SIGQUIT", "delivered", 1000), ("reset", "delivered", 1200)],
    );
    // The dump is in the JVM's stdout; the stuck thread's stanza names it and its frame.
    let text = wait_text(&log, "Full thread dump", Duration::from_secs(1));
    let stanza = text
        .split("\n\n")
        .find(|s| s.contains("at Server.slow("))
        .unwrap_or_else(|| panic!("no stanza with Server.slow:\n{text}"));
    let head = stanza.lines().next().unwrap();
    println!("jvm thread dump: {head}");
    assert!(head.starts_with("\"recipe-handler-"), "{stanza}");
    assert!(stanza.contains("java.lang.Thread.sleep"), "{stanza}");
    // The handler thread is not interrupted: it sleeps on. The JVM runs on and answers.
    assert!(!text.contains("interrupted"), "{text}");
    assert!(p.alive());
    let again = client(port, get_req("/fast"), Duration::ZERO)
        .join()
        .unwrap();
    assert!(again.how().ends_with("200 OK"), "{}", again.how());
}

/// nginx on `listen` passing every request to PHP-FPM on `fpm` (FastCGI over TCP).
fn nginx_fastcgi(listen: u16, fpm: u16, dir: &std::path::Path) -> Proc {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/nginx-error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}; fastcgi_temp_path {d};\n\
               server {{ listen 127.0.0.1:{listen};\n\
                 location / {{ fastcgi_pass 127.0.0.1:{fpm}; fastcgi_read_timeout 10s;\n\
                   fastcgi_param SCRIPT_FILENAME {script}; fastcgi_param QUERY_STRING $query_string;\n\
                   fastcgi_param REQUEST_METHOD $request_method; }} }} }}\n",
            d = dir.display(),
            script = recipes_dir().join("busy.php").display(),
        ),
    )
    .unwrap();
    let log = dir.join("nginx.log");
    let mut p = spawn_logged(
        "nginx",
        Command::new("/usr/sbin/nginx").arg("-c").arg(&conf),
        &log,
    );
    wait_up(&mut p, listen, &log);
    p
}

#[test]
fn php_fpm_child_is_killed_nginx_answers_502_and_the_master_respawns_it() {
    let fpm_port = free_port();
    let port = free_port();
    let dir = tmpdir("php-fpm");
    let fpm_log = dir.join("fpm.log");
    let conf = dir.join("fpm.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\npid = {d}/fpm.pid\nerror_log = {log}\ndaemonize = no\n\
             [www]\nuser = root\ngroup = root\nlisten = 127.0.0.1:{fpm_port}\n\
             pm = static\npm.max_children = 2\n",
            d = dir.display(),
            log = fpm_log.display()
        ),
    )
    .unwrap();
    let bin = std::fs::read_dir("/usr/sbin")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("php-fpm")
        })
        .max()
        .expect("php-fpm is not installed (cargo xtask test installs it)");
    let mut fpm = spawn_logged(
        "php-fpm",
        Command::new(bin).args(["-R", "-F", "-y"]).arg(&conf),
        &dir.join("fpm.out"),
    );
    let _nginx = nginx_fastcgi(port, fpm_port, &dir);
    // The watched port is FPM's: the child that reads the FastCGI request owns it.
    let d = daemon(
        "php-fpm",
        fpm_port,
        "budget = \"1s\"\nsteps = [{ after = \"1s\", signal = \"SIGKILL\" }]",
    );
    let slow = client(port, get_req("/?s=30"), SLOW_AT);
    let other = client(port, get_req("/?s=0.8"), OTHER_AT);
    let s = slow.join().unwrap();
    s.within("stuck request (through nginx)", 1.0, 1.4);
    assert!(s.how().contains("502"), "nginx answers 502: {}", s.how());
    let o = other.join().unwrap();
    o.within(
        "other request, on the other child (0.8 s of work)",
        0.8,
        1.2,
    );
    assert!(o.how().ends_with("200 OK"), "{}", o.how());
    assert_actions(&d, fpm_port, &[("SIGKILL", "delivered", 1000)]);
    let text = wait_text(&fpm_log, "exited on signal 9", Duration::from_secs(3));
    println!(
        "php-fpm master: {}",
        text.lines().find(|l| l.contains("signal 9")).unwrap()
    );
    // The master forks a child in place of the killed one (it logs no start of the first two).
    let text = wait_text(&fpm_log, "started", Duration::from_secs(3));
    println!(
        "php-fpm master: {}",
        text.lines().find(|l| l.ends_with("started")).unwrap()
    );
    assert!(fpm.alive(), "the master lives");
    let again = client(port, get_req("/?s=0"), Duration::ZERO)
        .join()
        .unwrap();
    assert!(again.how().ends_with("200 OK"), "{}", again.how());
}
