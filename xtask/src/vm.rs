//! `cargo xtask test --vm`: the kernel matrix. Boots Debian's own kernels under QEMU with an
//! initramfs holding busybox, the statically linked `watchdog` and `vm-guest`, and runs the core
//! scenarios inside (see xtask/src/bin/vm-guest.rs), once per probe set each kernel offers.
//!
//! TCG, not KVM: /dev/kvm exists on these machines but a KVM guest hangs.
//!
//! arm64 guests run the same scenarios with an aarch64 `watchdog` and `vm-guest` (cross-built,
//! static musl), Debian's arm64 busybox and `qemu-system-aarch64 -M virt`: the programs' arm64
//! syscall ABI is proven there, on a real arm64 kernel and JIT, under emulation.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{build::Arch, root, run, setup};

/// Debian kernel packages under test: (label, architecture, apt-cache pattern of the package
/// name, the probe sets the guest must run there). 6.1 has no `sock_recv_length`, so `auto` is
/// `syscalls` there; 6.12 offers both sets and must run both.
const KERNELS: &[(&str, Arch, &str, &[&str])] = &[
    (
        "debian-6.1",
        Arch::X86_64,
        r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$",
        &["syscalls"],
    ),
    (
        "debian-6.12",
        Arch::X86_64,
        r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$",
        &["sock", "syscalls"],
    ),
    (
        "debian-6.1-arm64",
        Arch::Aarch64,
        r"^linux-image-6\.1\.0-[0-9]+-cloud-arm64$",
        &["syscalls"],
    ),
    (
        "debian-6.12-arm64",
        Arch::Aarch64,
        r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-arm64$",
        &["sock", "syscalls"],
    ),
];

/// The scenarios xtask/src/bin/vm-guest.rs runs once per probe set: each must pass for every set
/// a kernel claims, or the kernel fails.
const SCENARIOS: &[&str] = &[
    "start",
    "keepalive_untouched",
    "slow_killed_at_budget",
    "old_connection_killed_at_budget",
    "native_stack",
    "thread_target",
    "upgraded_left_alone",
    "route_budget",
];

const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-arm",
    "busybox-static",
    "cpio",
];

/// One guest must finish within this (boot ~5 s, scenarios well under a minute).
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The guests of `arch` in [`KERNELS`].
pub fn test(only: Arch) -> Result<()> {
    setup::ensure_packages(PACKAGES)?;
    let dir = root().join("target/vm");
    fs::create_dir_all(&dir)?;
    let mut initrds = Vec::new();
    let mut failed = Vec::new();
    for &(label, arch, pattern, sets) in KERNELS.iter().filter(|k| k.1 == only) {
        let initrd = match initrds.iter().find(|(a, _)| *a == arch) {
            Some((_, i)) => PathBuf::clone(i),
            None => {
                let started = Instant::now();
                let i = initramfs_for(&dir, arch)?;
                println!(
                    "{}: built and packed in {:.0?}",
                    arch.debian(),
                    started.elapsed()
                );
                initrds.push((arch, i.clone()));
                i
            }
        };
        let vmlinuz =
            kernel(&dir, pattern).with_context(|| format!("getting the {label} kernel"))?;
        let started = Instant::now();
        let log = dir.join(format!("{label}.log"));
        let mut outcome = boot(arch, &vmlinuz, &initrd, &log);
        let mut text = fs::read_to_string(&log).unwrap_or_default();
        // Under TCG a guest kernel has been seen to panic while booting (in enqueue_timer,
        // before init ran): that says nothing about watchdog, so boot it once more.
        if !text.contains("VMTEST KERNEL") && text.contains("Kernel panic") {
            eprintln!("{label}: the guest kernel panicked before init ran; booting it again");
            let _ = fs::rename(&log, dir.join(format!("{label}.panic.log")));
            outcome = boot(arch, &vmlinuz, &initrd, &log);
            text = fs::read_to_string(&log).unwrap_or_default();
        }
        for l in text.lines().filter(|l| l.starts_with("VMTEST")) {
            println!("{label}: {l}");
        }
        println!(
            "{label}: {:.0?} (log: {})",
            started.elapsed(),
            log.display()
        );
        match outcome.and_then(|()| verdict(&text, sets)) {
            Ok(()) => {}
            Err(e) => {
                eprintln!("{label}: FAILED: {e:#}");
                failed.push(label);
            }
        }
    }
    if !failed.is_empty() {
        bail!("kernel matrix failed on {}", failed.join(", "));
    }
    Ok(())
}

/// The guest finished, nothing failed, and every scenario passed for every probe set `sets`.
fn verdict(console: &str, sets: &[&str]) -> Result<()> {
    let done = console
        .lines()
        .find_map(|l| l.strip_prefix("VMTEST DONE "))
        .context("the guest never reported (no VMTEST DONE line)")?;
    let results = |word: &str| -> Vec<String> {
        console
            .lines()
            .filter_map(|l| l.strip_prefix("VMTEST "))
            .filter_map(|l| l.strip_prefix(word))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    let (passed, failed) = (results("PASS "), results("FAIL "));
    if !failed.is_empty() {
        bail!("failed: {} ({done})", failed.join(", "));
    }
    let missing: Vec<String> = sets
        .iter()
        .flat_map(|set| SCENARIOS.iter().map(move |s| format!("{set}/{s}")))
        .filter(|want| !passed.contains(want))
        .collect();
    if !missing.is_empty() {
        bail!("never passed: {} ({done})", missing.join(", "));
    }
    Ok(())
}

/// Downloads (once) the newest package matching `pattern` and returns its vmlinuz.
fn kernel(dir: &Path, pattern: &str) -> Result<PathBuf> {
    let list = output(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
    let mut names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    if names.is_empty() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        return kernel_after_update(dir, pattern);
    }
    names.sort_by_key(|n| version_key(n));
    fetch_kernel(dir, names.last().expect("non-empty"))
}

fn kernel_after_update(dir: &Path, pattern: &str) -> Result<PathBuf> {
    let list = output(Command::new("apt-cache").args(["search", "--names-only", pattern]))?;
    let mut names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    names.sort_by_key(|n| version_key(n));
    let name = names
        .last()
        .with_context(|| format!("no Debian package matches {pattern}"))?;
    fetch_kernel(dir, name)
}

/// Numeric parts of a package name, for "newest" ordering (6.12.117 after 6.12.99).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn fetch_kernel(dir: &Path, package: &str) -> Result<PathBuf> {
    let unpacked = dir.join(package);
    if let Some(v) = find_vmlinuz(&unpacked) {
        return Ok(v);
    }
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(&debs))?;
    let deb = fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    find_vmlinuz(&unpacked).with_context(|| format!("no boot/vmlinuz-* in {package}"))
}

fn find_vmlinuz(unpacked: &Path) -> Option<PathBuf> {
    fs::read_dir(unpacked.join("boot"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /run /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up
echo "VMTEST KERNEL $(uname -r)"
/bin/vm-guest
poweroff -f
"#;

/// The static `watchdog` and `vm-guest` for `arch`, with that architecture's busybox.
fn initramfs_for(dir: &Path, arch: Arch) -> Result<PathBuf> {
    let watchdog = crate::build::static_binary_for(arch, "watchdog", "watchdog")?;
    let guest = crate::build::static_binary_for(arch, "xtask", "vm-guest")?;
    let busybox = match arch {
        Arch::X86_64 => PathBuf::from("/bin/busybox"),
        Arch::Aarch64 => foreign_busybox(dir, arch)?,
    };
    pack_initramfs(dir, arch, &busybox, &watchdog, &guest)
}

/// Debian's busybox-static for another architecture, unpacked (not installed): `dpkg
/// --add-architecture` once so apt can download it.
fn foreign_busybox(dir: &Path, arch: Arch) -> Result<PathBuf> {
    let unpacked = dir.join(format!("busybox-{}", arch.debian()));
    let busybox = unpacked.join("bin/busybox");
    if busybox.exists() {
        return Ok(busybox);
    }
    let foreign = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if !foreign.lines().any(|l| l.trim() == arch.debian()) {
        run(Command::new("dpkg").args(["--add-architecture", arch.debian()]))?;
        run(Command::new("apt-get").args(["update", "-q"]))?;
    }
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    let package = format!("busybox-static:{}", arch.debian());
    run(Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(&debs))?;
    let deb = fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("busybox-static_") && n.ends_with(&format!("_{}.deb", arch.debian()))
        })
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    ensure!(busybox.exists(), "no bin/busybox in {}", deb.display());
    Ok(busybox)
}

/// busybox + the two static binaries + init, as a gzipped newc cpio archive.
fn pack_initramfs(
    dir: &Path,
    arch: Arch,
    busybox: &Path,
    watchdog: &Path,
    guest: &Path,
) -> Result<PathBuf> {
    let tree = dir.join(format!("initramfs-{}", arch.debian()));
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(tree.join("bin"))?;
    fs::copy(busybox, tree.join("bin/busybox")).context("busybox-static")?;
    fs::copy(watchdog, tree.join("bin/watchdog"))?;
    fs::copy(guest, tree.join("bin/vm-guest"))?;
    fs::write(tree.join("init"), INIT)?;
    run(Command::new("chmod").arg("755").arg(tree.join("init")))?;
    let out = dir.join(format!("initrd-{}.gz", arch.debian()));
    run(Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet | gzip -1 > {}",
            out.display()
        ))
        .current_dir(&tree))?;
    Ok(out)
}

/// Boots the kernel with the initramfs; the console goes to `log`.
///
/// arm64: the `virt` board, its PL011 UART as the console. `-cpu max` has LSE atomics (the
/// arming protocol's fetch/xchg/cmpxchg JIT to `ldaddal`/`swpal`/`casal`); `pauth-impdef`
/// swaps QEMU's costly emulation of the architected pointer-authentication hash for a cheap one.
fn boot(arch: Arch, vmlinuz: &Path, initrd: &Path, log: &Path) -> Result<()> {
    let console = fs::File::create(log)?;
    let (qemu, machine, tty): (&str, &[&str], &str) = match arch {
        Arch::X86_64 => ("qemu-system-x86_64", &["-cpu", "max"], "ttyS0"),
        Arch::Aarch64 => (
            "qemu-system-aarch64",
            &["-M", "virt", "-cpu", "max,pauth-impdef=on"],
            "ttyAMA0",
        ),
    };
    let mut child = Command::new(qemu)
        .args(["-accel", "tcg"])
        .args(machine)
        .args(["-smp", "2", "-m", "1024"])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &format!("console={tty} quiet panic=-1")])
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .with_context(|| format!("starting {qemu}"))?;
    let until = Instant::now() + GUEST_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("qemu exited with {status}");
            }
            return Ok(());
        }
        if Instant::now() > until {
            let _ = child.kill();
            bail!("guest still running after {GUEST_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(sets: &[&str], skip: Option<&str>) -> String {
        let mut out = String::from("VMTEST KERNEL 6.12\n");
        for set in sets {
            for s in SCENARIOS {
                let name = format!("{set}/{s}");
                if skip != Some(name.as_str()) {
                    out += &format!("VMTEST PASS {name} detail\n");
                }
            }
        }
        out + "VMTEST DONE pass=1 fail=0\n"
    }

    #[test]
    fn every_scenario_of_every_claimed_set_must_pass() {
        let both = ["sock", "syscalls"];
        assert!(verdict(&console(&both, None), &both).is_ok());
        // One set missing (the 6.12 guest ran only `sock`): fails.
        assert!(verdict(&console(&["sock"], None), &both).is_err());
        // One scenario missing in one set: fails, and names it.
        let e = verdict(&console(&both, Some("syscalls/route_budget")), &both).unwrap_err();
        assert!(e.to_string().contains("syscalls/route_budget"), "{e}");
        // Any failure fails, even with every scenario also passing.
        let text =
            console(&both, None).replace("VMTEST DONE", "VMTEST FAIL sock/start x\nVMTEST DONE");
        assert!(verdict(&text, &both).is_err());
        // No summary line: the guest did not finish.
        assert!(verdict("VMTEST PASS sock/start x\n", &["sock"]).is_err());
    }
}
