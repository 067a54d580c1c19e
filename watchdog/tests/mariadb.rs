//! Issue 16 part 3: `action = "kill_query"` against Debian's MariaDB server. The test starts its
//! own `mariadbd` (a fresh datadir from `mariadb-install-db`, its own port and socket), creates
//! the daemon's account with only PROCESS and CONNECTION ADMIN, and talks to the server with a
//! real client (the `mysql` crate over TCP, as an application would).

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use mysql::{prelude::Queryable, Conn, OptsBuilder};

/// ER_QUERY_INTERRUPTED: what a client sees when its statement is killed.
const QUERY_INTERRUPTED: u16 = 1317;
const DAEMON_PASSWORD: &str = "wd-S3cret";
const APP_PASSWORD: &str = "app-pass";

/// A MariaDB server of Debian's package, on a free port and a temporary datadir, run as root.
struct Mariadb {
    proc: Proc,
    port: u16,
    dir: PathBuf,
    socket: PathBuf,
}

fn require(bin: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{bin} is missing: install mariadb-server and mariadb-client (cargo xtask test installs them)")
        })
}

fn mariadb() -> Mariadb {
    require_root();
    let (server, install, admin) = (
        require("mariadbd"),
        require("mariadb-install-db"),
        require("mariadb-admin"),
    );
    require("mariadb");
    let port = free_port();
    let dir = tmpdir(&format!("mariadb{port}"));
    let data = dir.join("data");
    let out = Command::new(install)
        .args(["--no-defaults", "--user=root", "--skip-test-db"])
        .args(["--auth-root-authentication-method=normal"])
        .arg(format!("--datadir={}", data.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mariadb-install-db failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = dir.join("mysqld.sock");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "{} --no-defaults --user=root --datadir={} --port={port} --bind-address=127.0.0.1 \
         --socket={} --pid-file={}/mariadbd.pid --log-error={}/error.log \
         --innodb-buffer-pool-size=16M --innodb-log-file-size=8M & \
         until {} --no-defaults -S {} -u root ping >/dev/null 2>&1; do sleep 0.1; done; \
         echo READY; wait",
        server.display(),
        data.display(),
        socket.display(),
        dir.display(),
        dir.display(),
        admin.display(),
        socket.display(),
    ));
    let m = Mariadb {
        proc: spawn_ready("mariadbd", &mut cmd),
        port,
        dir,
        socket,
    };
    // The daemon's account: the two privileges `kill_query` needs, nothing else. The
    // application's account has none: it sees and runs only its own statements.
    m.sql(&format!(
        "CREATE USER watchdog@localhost IDENTIFIED BY '{DAEMON_PASSWORD}';
         GRANT PROCESS, CONNECTION ADMIN ON *.* TO watchdog@localhost;
         CREATE USER no_admin@localhost IDENTIFIED BY '{DAEMON_PASSWORD}';
         GRANT PROCESS ON *.* TO no_admin@localhost;
         CREATE USER no_process@localhost IDENTIFIED BY '{DAEMON_PASSWORD}';
         GRANT CONNECTION ADMIN ON *.* TO no_process@localhost;
         CREATE USER app@'%' IDENTIFIED BY '{APP_PASSWORD}';
         CREATE USER app@localhost IDENTIFIED BY '{APP_PASSWORD}';"
    ));
    m
}

impl Mariadb {
    /// Runs SQL as root through the server's socket with Debian's `mariadb` client.
    fn sql(&self, sql: &str) -> String {
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-N", "-u", "root", "-S"])
            .arg(&self.socket)
            .args(["-e", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn pid(&self) -> u32 {
        std::fs::read_to_string(self.dir.join("mariadbd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A client connection over TCP, as the application's; its `HOST` as the server shows it.
    fn client(&self) -> (Conn, String) {
        let opts = OptsBuilder::new()
            .ip_or_hostname(Some("127.0.0.1"))
            .tcp_port(self.port)
            .user(Some("app"))
            .pass(Some(APP_PASSWORD))
            .prefer_socket(false);
        let mut c = Conn::new(opts).expect("application connects");
        let host: String = c
            .query_first(
                "SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()",
            )
            .unwrap()
            .unwrap();
        (c, host)
    }

    /// A password file of the daemon's account with `password`, mode 0600.
    fn password_file(&self, name: &str, password: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// A daemon config: one policy on the server's port with `steps` and `mysql`.
    fn config(&self, steps: &str, mysql: &str) -> PathBuf {
        let path = self.dir.join(format!("watchdog-{}.toml", free_port()));
        std::fs::write(
            &path,
            format!(
                "[[policy]]\nname = \"mariadb\"\nports = [{}]\nbudget = \"1s\"\n\
                 match = {{ comm = [\"mariadbd\"] }}\nsteps = {steps}\nmysql = {mysql}\n",
                self.port
            ),
        )
        .unwrap();
        path
    }
}

/// The port of a `HOST` value (`localhost:51234`).
fn port_of(host: &str) -> &str {
    host.rsplit_once(':').unwrap().1
}

fn mysql_code(e: &mysql::Error) -> Option<u16> {
    match e {
        mysql::Error::MySqlError(m) => Some(m.code),
        _ => None,
    }
}

#[test]
fn kill_query_ends_the_statement_at_its_budget_and_nothing_else() {
    let db = mariadb();
    let pid = db.pid();
    let pass = db.password_file("mysql.pass", DAEMON_PASSWORD);
    let cfg = db.config(
        "[{ after = \"1s\", action = \"kill_query\" }]",
        &format!(
            "{{ socket = \"{}\", user = \"watchdog\", password_file = \"{}\" }}",
            db.socket.display(),
            pass.display()
        ),
    );
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);

    let (mut a, a_host) = db.client();
    let (mut b, b_host) = db.client();
    println!("the server shows the clients as HOST {a_host} and {b_host}");
    // B: a statement in flight when A's is killed, ending well before its own budget.
    let other = timed(move || {
        std::thread::sleep(Duration::from_millis(600));
        let t = Instant::now();
        let r: Result<Option<i64>, _> = b.query_first("SELECT SLEEP(0.7)");
        (t.elapsed(), r.map_err(|e| e.to_string()), b)
    });
    let t = Instant::now();
    let r: Result<Option<i64>, _> = a.query_first("SELECT SLEEP(300)");
    let took = t.elapsed();
    let e = r.expect_err("the statement was killed");
    println!("SELECT SLEEP(300) ended after {took:?} on a 1 s budget: {e}");
    assert_eq!(mysql_code(&e), Some(QUERY_INTERRUPTED), "{e}");
    assert!(
        took >= Duration::from_secs(1) && took <= Duration::from_millis(1800),
        "ended after {took:?}, budget 1 s"
    );
    // The same connection answers its next statement.
    let answer: Option<i64> = a.query_first("SELECT 42").unwrap();
    assert_eq!(answer, Some(42));
    // The other connection's statement ran to its end, untouched.
    let (_, (b_took, b_result, mut b)) = other.join().unwrap();
    assert_eq!(b_result, Ok(Some(0)), "the other statement completes");
    assert!(b_took >= Duration::from_millis(700), "{b_took:?}");
    let answer: Option<i64> = b.query_first("SELECT 7").unwrap();
    assert_eq!(answer, Some(7));
    // The server lives: the same process answers.
    assert_eq!(db.pid(), pid);
    assert!(db.proc.child.id() > 0);
    assert_eq!(db.sql("SELECT 1"), "1");

    // The record: what was stopped (the server's text of it), on which connection.
    let records = d.log_events("request over budget");
    assert_eq!(records.len(), 1, "one action, on A only: {records:?}");
    let r = &records[0];
    println!("record: {r}");
    assert_eq!(r["action"], "kill_query", "{r}");
    assert_eq!(r["result"], "delivered", "{r}");
    assert_eq!(r["protocol"], "mysql", "{r}");
    assert_eq!(r["request"], "SELECT SLEEP(300)", "{r}");
    assert_eq!(r["peer"], format!("127.0.0.1:{}", port_of(&a_host)), "{r}");
    let detail = r["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("KILL QUERY ") && detail.contains(&a_host),
        "{detail}"
    );
    assert_eq!(r["pid"], pid, "{r}");
    assert_eq!(
        d.metric(
            "watchdog_actions_total",
            &[("action", "kill_query"), ("result", "delivered")]
        ),
        1.0
    );
    assert_eq!(d.metric("watchdog_actions_total", &[]), 1.0);
    // The kernel saw it all: both connections as MySQL, their requests, one deadline.
    let port = db.port.to_string();
    assert!(
        d.metric(
            "watchdog_connections_total",
            &[("port", &port), ("protocol", "mysql")]
        ) >= 2.0
    );
    assert!(d.metric("watchdog_requests_total", &[("port", &port)]) >= 6.0);
    assert!(
        d.metric(
            "watchdog_kernel_deadlines_total",
            &[("result", "in_flight")]
        ) >= 1.0
    );
    // Every exchange was a short request (handshake, authentication, statements) except the two
    // sleeps: the server's greeting starts nothing, and no handshake runs into the budget.
    let buckets = duration_buckets(&d, &port);
    let count = |le: f64| {
        buckets
            .iter()
            .find(|(b, _)| *b == le)
            .map_or(0.0, |(_, n)| *n)
    };
    let total = count(f64::INFINITY);
    println!(
        "requests on the port: {total}, under 10 ms: {}, under 250 ms: {}, under 1 s: {}",
        count(0.01),
        count(0.25),
        count(1.0)
    );
    assert!(total >= 6.0, "{buckets:?}");
    assert_eq!(
        total - count(0.25),
        2.0,
        "only the two sleeps ran long: {buckets:?}"
    );
    assert_eq!(total - count(2.5), 0.0, "{buckets:?}");
}

/// The kernel's request-duration histogram of a port: (upper bound in seconds, cumulative count).
fn duration_buckets(d: &Daemon, port: &str) -> Vec<(f64, f64)> {
    let scrape = d.scrape();
    let s = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "watchdog_request_duration_seconds" && s.labels.get("port") == Some(port)
        })
        .expect("a duration histogram for the port");
    match &s.value {
        prometheus_parse::Value::Histogram(h) => h.iter().map(|b| (b.less_than, b.count)).collect(),
        v => panic!("not a histogram: {v:?}"),
    }
}

/// Also shows that both privileges are needed: without PROCESS the server hides the other
/// user's connection, without CONNECTION ADMIN it refuses the kill.
#[test]
fn a_refused_or_unreachable_account_is_recorded_and_the_ladder_goes_on() {
    let db = mariadb();
    let right = db.password_file("mysql.pass", DAEMON_PASSWORD);
    let account = |user: &str| {
        format!(
            "{{ socket = \"{}\", user = \"{user}\", password_file = \"{}\" }}",
            db.socket.display(),
            right.display()
        )
    };
    // A reset 500 ms after the failed kill_query releases the client.
    let steps =
        "[{ after = \"1s\", action = \"kill_query\" }, { after = \"1500ms\", action = \"reset\" }]";
    let wrong = db.password_file("wrong.pass", "not-the-password");
    let closed = free_port();
    for (mysql, result, says) in [
        (
            format!(
                "{{ socket = \"{}\", user = \"watchdog\", password_file = \"{}\" }}",
                db.socket.display(),
                wrong.display()
            ),
            "access_denied",
            "Access denied for user 'watchdog'",
        ),
        (
            format!(
                "{{ address = \"127.0.0.1:{closed}\", user = \"watchdog\", password_file = \"{}\" }}",
                wrong.display()
            ),
            "unreachable",
            "connecting to 127.0.0.1:",
        ),
        (
            account("no_admin"),
            "access_denied",
            "You are not owner of thread",
        ),
        (account("no_process"), "no_such_query", "no connection"),
    ] {
        let cfg = db.config(steps, &mysql);
        let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
        let (mut a, _) = db.client();
        let t = Instant::now();
        let r: Result<Option<i64>, _> = a.query_first("SELECT SLEEP(30)");
        let took = t.elapsed();
        let e = r.expect_err("the reset ends the connection");
        println!("{result}: the client was released after {took:?} ({e})");
        assert!(
            took >= Duration::from_millis(1500) && took <= Duration::from_millis(2300),
            "{took:?}"
        );
        // Both records: the reset's is written once its batch is done, a moment after the
        // client saw the connection end.
        let mut records = Vec::new();
        wait_until(Duration::from_secs(3), || {
            records = d.log_events("request over budget");
            records.len() >= 2
        });
        let kill = records
            .iter()
            .find(|r| r["action"] == "kill_query")
            .unwrap_or_else(|| panic!("no kill_query record: {records:?}"));
        assert_eq!(kill["result"], result, "{kill}");
        assert!(
            kill["detail"].as_str().unwrap().contains(says),
            "{kill}"
        );
        let reset = records
            .iter()
            .find(|r| r["action"] == "reset")
            .unwrap_or_else(|| panic!("the next step did not run: {records:?}"));
        assert_eq!(reset["result"], "delivered", "{reset}");
        assert_eq!(reset["step"], 1, "{reset}");
        assert_eq!(
            d.metric(
                "watchdog_actions_total",
                &[("action", "kill_query"), ("result", result)]
            ),
            1.0
        );
        assert!(
            d.metric(
                "watchdog_kernel_deadlines_total",
                &[("result", "in_flight")]
            ) >= 1.0
        );
        // Nothing was killed by the failed step: the server runs on.
        assert_eq!(db.sql("SELECT 1"), "1");
    }
}
