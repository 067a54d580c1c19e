//! `watchdog check`: validates a config and probes the kernel, printing what would work.

use std::path::Path;

use crate::{actions, config::Config, loader};

struct Report {
    lines: Vec<(bool, bool, String, String)>,
}

impl Report {
    /// `required`: the daemon cannot run without it.
    fn add(&mut self, required: bool, ok: bool, what: &str, detail: impl Into<String>) {
        self.lines.push((required, ok, what.into(), detail.into()));
    }
}

/// Runs every check, prints the report, and says whether the daemon can run here.
pub fn run(config: Option<&Path>, config_only: bool) -> bool {
    let mut r = Report { lines: Vec::new() };
    match config {
        Some(p) => match Config::load(p) {
            Ok(c) => r.add(
                true,
                true,
                "config",
                format!("{}: {} polic(y/ies) valid", p.display(), c.policies.len()),
            ),
            Err(e) => r.add(true, false, "config", e.to_string()),
        },
        None => r.add(
            false,
            true,
            "config",
            "none given (flags or the observe-everything default)",
        ),
    }
    if !config_only {
        probe_kernel(&mut r);
    }
    let mut all_required = true;
    for (required, ok, what, detail) in &r.lines {
        let mark = match (ok, required) {
            (true, _) => "ok  ",
            (false, true) => "FAIL",
            (false, false) => "warn",
        };
        all_required &= ok | !required;
        println!("{mark}  {what:<22} {detail}");
    }
    println!(
        "{}",
        if all_required {
            "watchdog can run here"
        } else {
            "watchdog cannot run here: see FAIL lines"
        }
    );
    all_required
}

fn probe_kernel(r: &mut Report) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    r.add(false, true, "kernel", release.trim());
    let euid = nix::unistd::geteuid().as_raw();
    r.add(
        true,
        euid == 0,
        "privileges",
        if euid == 0 {
            "root".to_string()
        } else {
            format!("uid {euid}: run as root")
        },
    );
    let btf = std::fs::read("/sys/kernel/btf/vmlinux");
    r.add(
        true,
        btf.is_ok(),
        "BTF",
        if btf.is_ok() {
            "/sys/kernel/btf/vmlinux"
        } else {
            "missing: needs CONFIG_DEBUG_INFO_BTF"
        },
    );
    if let Ok(btf) = &btf {
        for tp in [
            "sock_recv_length",
            "sock_send_length",
            "tcp_receive_reset",
            "sched_process_exit",
        ] {
            let name = format!("btf_trace_{tp}");
            let found = btf
                .windows(name.len() + 1)
                .any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0);
            let required = tp != "tcp_receive_reset";
            r.add(
                required,
                found,
                &format!("tracepoint {tp}"),
                if found {
                    "present"
                } else {
                    "missing (sock_*_length need Linux 6.3+)"
                },
            );
        }
    }
    match loader::find_mount("cgroup2") {
        Some(p) => r.add(true, true, "cgroup v2", p.display().to_string()),
        None => r.add(
            false,
            false,
            "cgroup v2",
            "not mounted: the daemon mounts it at /run/watchdog/cgroup2",
        ),
    }
    r.add(
        false,
        true,
        "tracefs",
        loader::find_mount("tracefs")
            .map_or("not mounted (not needed: BTF tracepoints)".into(), |p| {
                p.display().to_string()
            }),
    );
    r.add(
        false,
        true,
        "bpffs",
        loader::find_mount("bpf").map_or("not mounted (not needed)".into(), |p| {
            p.display().to_string()
        }),
    );
    r.add(
        true,
        true,
        "pidfd signals",
        "pidfd_open + pidfd_send_signal",
    );
    let thread = actions::thread_pidfds_supported();
    r.add(
        false,
        thread,
        "thread pidfds",
        if thread {
            "PIDFD_THREAD (6.9+)"
        } else {
            "absent: thread targets use tgkill"
        },
    );
    match actions::sock_destroy_supported() {
        Ok(()) => r.add(false, true, "connection reset", "SOCK_DESTROY works"),
        Err(e) => r.add(
            false,
            false,
            "connection reset",
            format!("SOCK_DESTROY failed ({e}): `reset` steps will fail"),
        ),
    }
    if euid == 0 {
        match loader::Kernel::load() {
            Ok(k) => r.add(
                true,
                true,
                "eBPF programs",
                format!("loaded and attached (cgroup {})", k.cgroup.display()),
            ),
            Err(e) => r.add(true, false, "eBPF programs", crate::error_chain(&e)),
        }
    }
}
