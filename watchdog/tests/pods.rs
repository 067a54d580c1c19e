//! Selection by Kubernetes namespace, pod and container names: real servers in cgroups of their
//! own, named as the kubelet names them (systemd and cgroupfs drivers), and the kubelet's log
//! directories built in a temporary root (`[daemon] kubelet_logs`). No cluster runs here: what
//! is real is the cgroup path the daemon reads for each process and the directory layout.

mod common;

use std::{
    io::{ErrorKind, Read},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;

const BUDGET: Duration = Duration::from_millis(1000);

/// The cgroup v2 mount point (pure v2 at /sys/fs/cgroup, or below it on hybrid hosts).
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup2 mount: the daemon needs cgroup v2 (it mounts it at start)")
}

/// A pod as the node shows it: a cgroup named by the kubelet's rules, a pre-forking server in
/// it, and (once `appear` is called) the kubelet's log directory and container log file.
struct Pod {
    namespace: &'static str,
    name: &'static str,
    container: &'static str,
    uid: String,
    cid: String,
    /// The cgroup directories created, outermost first.
    cgroups: Vec<PathBuf>,
    logs: PathBuf,
    server: Option<Proc>,
    port: u16,
}

impl Pod {
    fn new(
        namespace: &'static str,
        name: &'static str,
        container: &'static str,
        systemd_driver: bool,
        logs: &Path,
    ) -> Pod {
        let n = std::process::id();
        let port = free_port();
        let uid = format!("{:08x}-{:04x}-4000-8000-{:012x}", n, port, port);
        let cid = format!("{:016x}{:048x}", n, port);
        let root = cgroup2_root();
        let mut cgroups = Vec::new();
        let path = if systemd_driver {
            // kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope
            let base = root.join("kubepods.slice");
            let qos = base.join("kubepods-burstable.slice");
            let pod = qos.join(format!(
                "kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ));
            let ctr = pod.join(format!("cri-containerd-{cid}.scope"));
            cgroups.extend([base, qos, pod, ctr.clone()]);
            ctr
        } else {
            // kubepods/besteffort/pod<uid>/<id>
            let base = root.join("kubepods");
            let qos = base.join("besteffort");
            let pod = qos.join(format!("pod{uid}"));
            let ctr = pod.join(&cid);
            cgroups.extend([base, qos, pod, ctr.clone()]);
            ctr
        };
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        let procs = path.join("cgroup.procs");
        // The server enters its cgroup before it starts, so its forked workers are born there.
        let server = spawn_ready(
            "app.py in a pod cgroup",
            Command::new("sh").arg("-c").arg(format!(
                "echo $$ > {} && exec python3 {} {port} 3",
                procs.display(),
                fixture("app.py").display()
            )),
        );
        let pod = Pod {
            namespace,
            name,
            container,
            uid,
            cid,
            cgroups,
            logs: logs.to_path_buf(),
            server: Some(server),
            port,
        };
        let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", pod.pid())).unwrap();
        assert!(cg.contains(&pod.cid), "server not in its pod cgroup: {cg}");
        pod
    }

    fn pid(&self) -> u32 {
        self.server.as_ref().unwrap().pid()
    }

    fn pod_dir(&self) -> PathBuf {
        self.logs
            .join("pods")
            .join(format!("{}_{}_{}", self.namespace, self.name, self.uid))
    }

    fn container_log(&self) -> PathBuf {
        self.logs.join("containers").join(format!(
            "{}_{}_{}-{}.log",
            self.name, self.namespace, self.container, self.cid
        ))
    }

    /// The kubelet starts the pod: its log directory and the container's log link appear.
    fn appear(&self) {
        std::fs::create_dir_all(self.pod_dir().join(self.container)).unwrap();
        std::fs::write(self.pod_dir().join(self.container).join("0.log"), "").unwrap();
        std::os::unix::fs::symlink(
            self.pod_dir().join(self.container).join("0.log"),
            self.container_log(),
        )
        .unwrap();
    }

    /// The kubelet removes the pod's logs (the pod was deleted).
    fn leave(&self) {
        std::fs::remove_file(self.container_log()).unwrap();
        std::fs::remove_dir_all(self.pod_dir()).unwrap();
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        drop(self.server.take());
        // The cgroup of a pod can be removed once its processes are gone; the shared parents
        // only when no other pod of the test uses them.
        let ctr = self.cgroups.last().unwrap().clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&ctr).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for dir in self.cgroups.iter().rev().skip(1) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Sends `GET /sleep` (the worker sleeps 100 s) and returns the open connection.
fn start_sleep(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(local(port)).unwrap();
    std::io::Write::write_all(&mut s, b"GET /sleep HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    s
}

/// How long until the server closes or resets the connection (its worker was killed), up to
/// `limit`; `None` if it stayed open and silent that long.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => Some(t.elapsed()),
        Ok(n) => panic!(
            "the sleeping worker answered: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(_) => Some(t.elapsed()),
    }
}

/// The daemon received one more kernel deadline event (so it has decided about it), and the
/// request stays untouched past its budget.
fn seen_and_left_alone(d: &Daemon, port: u16, what: &str) {
    let events = d.metric("watchdog_kernel_events_total", &[]);
    let fired = d.metric(
        "watchdog_kernel_deadlines_total",
        &[("result", "in_flight")],
    );
    let exceeded = d.metric("watchdog_budget_exceeded_total", &[]);
    let mut s = start_sleep(port);
    let got = d.wait_metric(
        "watchdog_kernel_events_total",
        &[],
        events + 1.0,
        BUDGET * 3,
    );
    assert!(
        got > events,
        "{what}: the deadline event never reached the daemon"
    );
    assert!(
        d.metric(
            "watchdog_kernel_deadlines_total",
            &[("result", "in_flight")]
        ) > fired,
        "{what}: the kernel saw no deadline"
    );
    assert_eq!(
        closed_within(&mut s, BUDGET),
        None,
        "{what}: the worker was acted on"
    );
    assert_eq!(
        d.metric("watchdog_budget_exceeded_total", &[]),
        exceeded,
        "{what}: a policy took it"
    );
    assert!(
        d.log_events("no policy selects this process; not acting")
            .iter()
            .any(|e| e["port"] == port),
        "{what}: the daemon did not say why it left it alone:\n{}",
        d.log_text()
    );
}

fn records(events: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(events)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The event record of the action on `port`, waited for: the stream has a writer thread of
/// its own, so the line can follow the metric that counted the action.
fn record_for(events: &Path, port: u16) -> Option<serde_json::Value> {
    let find = || records(events).into_iter().find(|r| r["port"] == port);
    wait_until(Duration::from_secs(2), || find().is_some());
    find()
}

#[test]
fn namespace_pod_and_container_names_select_and_protect_pods_as_they_come_and_go() {
    require_root();
    let dir = tmpdir("pods");
    let logs = dir.join("kubelet");
    std::fs::create_dir_all(logs.join("pods")).unwrap();
    std::fs::create_dir_all(logs.join("containers")).unwrap();
    let api = Pod::new("payments", "api-7d9f8-x2x4q", "app", true, &logs);
    let web = Pod::new("shop", "web-0", "web", false, &logs);
    let host_port = free_port();
    let _host = app(host_port, 2, &[]);
    let events = dir.join("events.jsonl");
    let config = dir.join("watchdog.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nmode = \"enforce\"\nkubelet_logs = \"{}\"\nevents = \"{}\"\n\
             [protect]\ncontainer = [\"web\"]\n\
             [[policy]]\nname = \"payments-api\"\nports = [{}]\nbudget = \"{}ms\"\nsignal = \"SIGKILL\"\n\
             match = {{ namespace = [\"payments\"], pod = [\"api-*\"], container = [\"app\"] }}\n\
             [[policy]]\nname = \"any-pod\"\nports = [{}, {}]\nbudget = \"{}ms\"\nsignal = \"SIGKILL\"\n\
             match = {{ namespace = [\"*\"] }}\n",
            logs.display(),
            events.display(),
            api.port,
            BUDGET.as_millis(),
            web.port,
            host_port,
            BUDGET.as_millis(),
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", config.to_str().unwrap()]);

    // 1. The pod's processes run, but the kubelet has not written its files yet: no names,
    //    so no policy selects it.
    seen_and_left_alone(&d, api.port, "pod not yet named");

    // 2. The pod appears: its request is killed at its budget, and the record names it.
    api.appear();
    web.appear();
    let mut s = start_sleep(api.port);
    let sent = Instant::now();
    // While in flight, `watchdog status` names its pod.
    let in_flight = loop {
        let st = d.status_json();
        let found = st["in_flight"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["port"] == api.port)
            .cloned();
        if let Some(r) = found {
            break r;
        }
        assert!(sent.elapsed() < BUDGET / 2, "request not in flight: {st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(in_flight["namespace"], "payments", "{in_flight}");
    assert_eq!(in_flight["pod"], "api-7d9f8-x2x4q", "{in_flight}");
    assert_eq!(in_flight["container"], "app", "{in_flight}");
    assert_eq!(in_flight["policy"], "payments-api", "{in_flight}");
    let text = Command::new(BIN)
        .args(["status", "--status-socket"])
        .arg(&d.status)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("payments/api-7d9f8-x2x4q/app"),
        "`watchdog status` does not name the pod:\n{text}"
    );
    closed_within(&mut s, BUDGET * 3).expect("the pod's worker was not killed");
    let at = sent.elapsed();
    assert!(
        at >= BUDGET && at < BUDGET + Duration::from_millis(500),
        "killed after {at:?} (budget {BUDGET:?})"
    );
    let acted = d.wait_metric(
        "watchdog_actions_total",
        &[("namespace", "payments"), ("result", "delivered")],
        1.0,
        Duration::from_secs(2),
    );
    assert_eq!(acted, 1.0);
    let rec = record_for(&events, api.port).expect("an action record for the pod");
    assert_eq!(rec["namespace"], "payments", "{rec}");
    assert_eq!(rec["pod"], "api-7d9f8-x2x4q", "{rec}");
    assert_eq!(rec["container"], "app", "{rec}");
    assert_eq!(rec["result"], "delivered", "{rec}");

    // 3. A policy selects the other pod (namespace "*"), but its container is protected by name.
    let mut s = start_sleep(web.port);
    assert_eq!(
        closed_within(&mut s, BUDGET * 2),
        None,
        "the protected container was killed"
    );
    let refused = d.wait_metric(
        "watchdog_actions_total",
        &[("namespace", "shop"), ("result", "refused")],
        1.0,
        Duration::from_secs(2),
    );
    assert_eq!(refused, 1.0, "{}", d.log_text());
    let rec = record_for(&events, web.port).expect("a refusal record for the protected pod");
    assert_eq!(rec["detail"], "refused_protected", "{rec}");
    assert_eq!(
        (&rec["namespace"], &rec["pod"], &rec["container"]),
        (&"shop".into(), &"web-0".into(), &"web".into())
    );

    // 4. A process outside any pod: even `namespace = ["*"]` does not select it.
    seen_and_left_alone(&d, host_port, "process outside any pod");

    // 5. The pod leaves: its names are forgotten, so the policy no longer selects it.
    api.leave();
    seen_and_left_alone(&d, api.port, "pod gone");
    assert_eq!(
        d.metric("watchdog_actions_total", &[("namespace", "payments")]),
        1.0,
        "one action on the pod, while it was there"
    );
}
