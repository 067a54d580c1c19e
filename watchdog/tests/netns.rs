//! `reset` wherever the owner is: a server and its client in a network namespace of their own,
//! as every Kubernetes pod has. SOCK_DESTROY from the daemon's namespace cannot see the socket;
//! the daemon shuts it down through the owner's own descriptor (`pidfd_getfd`).

mod common;

use std::process::Command;

use common::*;

/// A network namespace with loopback up, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("wdtest{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = |args: &[&str]| {
            let st = Command::new("ip")
                .args(args)
                .status()
                .expect("ip (iproute2) is installed by cargo xtask test");
            assert!(st.success(), "ip {args:?}");
        };
        ok(&["netns", "add", &name]);
        ok(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    /// `cmd args` inside the namespace.
    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The client, in the namespace: GET `path`, then how it ended and after how long.
const CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(10)
s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % sys.argv[2]).encode())
t = time.monotonic()
try:
    data = s.recv(4096)
    how = "eof" if not data else "answer " + data.decode(errors="replace").split("\r\n")[0]
except ConnectionResetError:
    how = "reset"
except socket.timeout:
    how = "timeout"
print("%s %.3f" % (how, time.monotonic() - t), flush=True)
"#;

#[test]
fn reset_reaches_a_connection_in_another_network_namespace() {
    let ns = Netns::new();
    let port = free_port();
    let app = fixture("app.py");
    let _server = spawn_ready(
        "app.py in a network namespace",
        &mut ns.exec(&["python3", app.to_str().unwrap(), &port.to_string(), "2"]),
    );
    let dir = tmpdir("netns");
    let cfg = dir.join("watchdog.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[policy]]\nname = \"pod\"\nports = [{port}]\nbudget = \"1s\"\n\
             steps = [{{ after = \"1s\", action = \"reset\" }}]\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let client = |path: &str| {
        let out = ns
            .exec(&["python3", "-c", CLIENT, &port.to_string(), path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let seen = client("/sleep");
    let (how, took) = seen.rsplit_once(' ').unwrap();
    let took: f64 = took.parse().unwrap();
    println!("client in its own network namespace saw: {how} after {took:.3} s");
    assert!(how == "eof" || how == "reset", "{seen}");
    assert!(
        (1.0..1.6).contains(&took),
        "released after {took} s, budget 1 s"
    );
    let line = &d.log_events("request over budget")[0];
    assert_eq!(line["action"], "reset", "{line}");
    assert_eq!(
        line["result"], "delivered",
        "never target_gone for a live owner: {line}"
    );
    assert!(
        line["detail"]
            .as_str()
            .unwrap_or("")
            .contains("owner's descriptor"),
        "{line}"
    );
    // The worker lives (it finds its connection gone when it next uses it); the server answers.
    assert!(
        client("/fast").starts_with("answer HTTP/1.1 200"),
        "the server still answers"
    );
    assert_eq!(
        d.metric(
            "watchdog_actions_total",
            &[("action", "reset"), ("result", "delivered")]
        ),
        1.0
    );
}
