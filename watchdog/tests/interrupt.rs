//! Ctrl-C means stop: SIGINT detaches the kernel programs (the pinned state directory goes,
//! and with it every link), SIGTERM keeps them pinned for the next start, and
//! `--on-interrupt keep` makes SIGINT keep them too. Links are checked in the kernel with bpftool.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use nix::sys::signal::{kill, Signal};

/// `bpftool ... --json`, failing loudly when bpftool is missing (`cargo xtask setup` installs it).
fn bpftool(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(args)
        .arg("--json")
        .output()
        .expect("bpftool is needed to see kernel links: `cargo xtask setup` installs it (Debian package bpftool)");
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("bpftool printed JSON"))
}

/// (link id, program id) of every link pinned in the daemon's state directory.
fn pinned_links(d: &Daemon) -> Vec<(u64, u64)> {
    let links: Vec<(u64, u64)> = std::fs::read_dir(&d.state_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .map(|e| {
            let v = bpftool(&["link", "show", "pinned", e.path().to_str().unwrap()])
                .unwrap_or_else(|| panic!("bpftool cannot read {}", e.path().display()));
            (v["id"].as_u64().unwrap(), v["prog_id"].as_u64().unwrap())
        })
        .collect();
    assert!(
        links.len() >= 4,
        "expected the daemon's links pinned, found {links:?}"
    );
    links
}

/// Link and program ids the kernel has now.
fn kernel_ids() -> (Vec<u64>, Vec<u64>) {
    let ids = |what: &str| -> Vec<u64> {
        bpftool(&[what, "show"])
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|l| l["id"].as_u64())
            .collect()
    };
    (ids("link"), ids("prog"))
}

/// Sends `sig` to the daemon and waits (bounded) for it to exit; returns how long it took.
fn stop(d: &mut Daemon, sig: Signal) -> Duration {
    let t = Instant::now();
    kill(nix::unistd::Pid::from_raw(d.proc.pid() as i32), sig).unwrap();
    loop {
        if let Some(status) = d.proc.child.try_wait().unwrap() {
            assert!(status.success(), "{sig} exit: {status}\n{}", d.log_text());
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "daemon still running 5 s after {sig}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn daemon(extra: &[&str]) -> Daemon {
    let port = free_port().to_string();
    let mut args = vec!["--port", &port, "--budget", "5s"];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

#[test]
fn sigint_detaches_every_program_and_sigterm_keeps_them() {
    require_root();
    // Ctrl-C: the state directory and every link and program behind it are gone.
    let mut d = daemon(&[]);
    let links = pinned_links(&d);
    let (all_links, all_progs) = kernel_ids();
    for (link, prog) in &links {
        assert!(all_links.contains(link) && all_progs.contains(prog));
    }
    let took = stop(&mut d, Signal::SIGINT);
    assert!(took < Duration::from_secs(2), "SIGINT exit took {took:?}");
    assert!(
        !d.state_dir.exists(),
        "SIGINT left {}",
        d.state_dir.display()
    );
    let (all_links, _) = kernel_ids();
    for (link, _) in &links {
        assert!(
            !all_links.contains(link),
            "link {link} still attached after SIGINT"
        );
    }
    // The kernel frees a detached program after an RCU grace period: wait for it (bounded).
    let t = Instant::now();
    loop {
        let (_, all_progs) = kernel_ids();
        let left: Vec<u64> = links
            .iter()
            .map(|(_, p)| *p)
            .filter(|p| all_progs.contains(p))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "programs {left:?} still loaded 2 s after the daemon exited on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("programs freed {:?} after the exit", t.elapsed());
    assert!(
        d.log_text()
            .contains("SIGINT: exiting and detaching the kernel programs"),
        "{}",
        d.log_text()
    );

    // SIGTERM (systemd, the kubelet): everything stays for the next start.
    for (sig, extra) in [
        (Signal::SIGTERM, &[][..]),
        (Signal::SIGINT, &["--on-interrupt", "keep"][..]),
    ] {
        let mut d = daemon(extra);
        let links = pinned_links(&d);
        stop(&mut d, sig);
        assert!(d.state_dir.exists(), "{sig} {extra:?} removed the state");
        let (all_links, all_progs) = kernel_ids();
        for (link, prog) in &links {
            assert!(
                all_links.contains(link) && all_progs.contains(prog),
                "{sig} {extra:?}: link {link} / program {prog} detached"
            );
        }
        assert!(
            d.log_text().contains("the kernel side stays pinned"),
            "{}",
            d.log_text()
        );
        // Dropping `d` removes the state directory, which detaches them.
    }
}
