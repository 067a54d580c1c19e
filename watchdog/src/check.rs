//! `watchdog check`: validates a config and probes the kernel, printing what would work.

use std::path::Path;

use crate::{
    actions,
    config::{Config, Probes},
    harm,
    kernel_btf::{KernelBtf, ProbeSet},
    loader,
};

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
pub fn run(config: Option<&Path>, config_only: bool, probes: Option<Probes>) -> bool {
    let mut r = Report { lines: Vec::new() };
    let mut want = probes.unwrap_or_default();
    match config {
        Some(p) => match Config::load(p) {
            Ok(c) => {
                r.add(
                    true,
                    true,
                    "config",
                    format!("{}: {} polic(y/ies) valid", p.display(), c.policies.len()),
                );
                for w in harm::warnings(&c.policies) {
                    r.add(false, false, "harmful signal", w.to_string());
                }
            }
            Err(e) => r.add(true, false, "config", crate::error_chain(&e)),
        },
        None => r.add(
            false,
            true,
            "config",
            "none given (flags or the observe-everything default)",
        ),
    }
    if let (Some(p), None) = (config, probes) {
        want = Config::load(p).map_or(want, |c| c.probes);
    }
    if !config_only {
        probe_kernel(&mut r, want);
        let priority = config
            .and_then(|p| Config::load(p).ok())
            .map_or(crate::config::DEFAULT_ACTING_PRIORITY, |c| {
                c.acting_priority
            });
        probe_realtime(&mut r, priority);
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

/// The probe sets this kernel supports and the one `want` picks.
/// Whether the acting thread will get the realtime class it is configured for.
fn probe_realtime(r: &mut Report, priority: u8) {
    if priority == 0 {
        r.add(
            false,
            true,
            "acting thread",
            "normal class (acting_priority = 0)",
        );
        return;
    }
    match crate::sched::fifo_allowed(priority) {
        Ok(()) => r.add(
            false,
            true,
            "acting thread",
            format!("SCHED_FIFO {priority} allowed"),
        ),
        Err(e) => r.add(
            false,
            false,
            "acting thread",
            format!(
                "SCHED_FIFO {priority} refused ({}): it runs in the normal class, and may be late while workers saturate the CPUs",
                crate::sched::refusal(&e)
            ),
        ),
    }
}

fn probe_btf(r: &mut Report, btf: &KernelBtf, want: Probes) {
    for spec in crate::kernel_btf::PROGRAMS {
        if spec.program == watchdog_common::names::PROG_SOCK_OPS {
            continue;
        }
        let (found, what) = match crate::kernel_btf::iter_target(spec.hook) {
            Some(target) => (btf.has_iterator(target), "iterator"),
            None => (btf.has_tracepoint(spec.hook), "tracepoint"),
        };
        let set = spec.set.map_or("both sets", ProbeSet::label);
        r.add(
            false,
            found,
            &format!("{what} {}", spec.hook),
            if found {
                format!("present ({set})")
            } else {
                format!("missing ({set}; Linux {}+)", spec.since)
            },
        );
    }
    match btf.choose(want) {
        Ok(set) => {
            let offsets = match set {
                ProbeSet::Syscalls => match btf.offsets() {
                    Ok(o) => format!(", struct offsets from BTF: {o:?}"),
                    Err(e) => {
                        r.add(true, false, "probe set", crate::error_chain(&e));
                        return;
                    }
                },
                ProbeSet::Sock => String::new(),
            };
            r.add(
                true,
                true,
                "probe set",
                format!("{} (asked: {want:?}){offsets}", set.label()),
            );
        }
        Err(e) => r.add(true, false, "probe set", crate::error_chain(&e)),
    }
}

fn probe_kernel(r: &mut Report, want: Probes) {
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
    match KernelBtf::load() {
        Err(e) => r.add(
            true,
            false,
            "BTF",
            format!("{}: needs CONFIG_DEBUG_INFO_BTF", crate::error_chain(&e)),
        ),
        Ok(btf) => {
            r.add(true, true, "BTF", crate::kernel_btf::VMLINUX);
            probe_btf(r, &btf, want);
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
    match pidfd_signal_kills_a_child() {
        Ok(pid) => r.add(
            true,
            true,
            "pidfd signals",
            format!(
                "pidfd_open + pidfd_send_signal: SIGKILL reached a child it forked (pid {pid})"
            ),
        ),
        Err(e) => r.add(true, false, "pidfd signals", e),
    }
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
    let native = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));
    r.add(
        false,
        native,
        "native stacks",
        if native {
            format!(
                "ptrace registers + framehop's {} unwinder",
                std::env::consts::ARCH
            )
        } else {
            format!(
                "not on {}: records say so; Python stacks (py-spy) are unaffected",
                std::env::consts::ARCH
            )
        },
    );
    if euid == 0 {
        match loader::Kernel::load(&loader::LoadOptions::ephemeral(want)) {
            Ok(k) => r.add(
                true,
                true,
                "eBPF programs",
                format!(
                    "{} set loaded and attached (cgroup {})",
                    k.probe_set.label(),
                    k.cgroup.display()
                ),
            ),
            Err(e) => r.add(true, false, "eBPF programs", crate::error_chain(&e)),
        }
    }
}

/// Forks a child that waits for a signal, SIGKILLs it the way the daemon signals a process
/// (`actions::signal`: pidfd_open + pidfd_send_signal), and reaps it: the child's pid if it
/// died of that signal.
fn pidfd_signal_kills_a_child() -> Result<u32, String> {
    // SAFETY: the child only calls pause (async-signal-safe) until the SIGKILL ends it.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork failed: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        loop {
            // SAFETY: pause has no memory effects; the parent's SIGKILL ends it.
            unsafe { libc::pause() };
        }
    }
    let owner = watchdog_common::ConnInfo {
        tgid: pid as u32,
        tid: pid as u32,
        start_ns: crate::clock::now_ns(),
        ..Default::default()
    };
    let outcome = actions::signal(
        &mut actions::Pidfds::default(),
        crate::config::Target::Process,
        &owner,
        nix::sys::signal::Signal::SIGKILL,
        || true,
    );
    // SIGKILL takes effect at once; give it a second, then kill and reap the child ourselves
    // so a failed signal never leaves it behind (or this check hanging).
    let mut status = 0;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut reaped = 0;
    while reaped == 0 && std::time::Instant::now() < until {
        // SAFETY: waitpid on our own child with a valid pointer to an int.
        reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if reaped == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let killed =
        reaped == pid && libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL;
    if reaped == 0 {
        // SAFETY: kill(2) and waitpid on our own child; no memory is involved.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    match (outcome, killed) {
        (actions::Outcome::Delivered, true) => Ok(pid as u32),
        (outcome, _) => Err(format!(
            "SIGKILL through a pidfd to a forked child: {} ({outcome:?}), child {}",
            outcome.label(),
            if reaped == 0 {
                "still alive after 1 s".to_string()
            } else {
                format!("status {status:#x}")
            }
        )),
    }
}
