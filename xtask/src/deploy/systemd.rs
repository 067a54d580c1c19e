//! deploy/systemd: `systemd-analyze verify` on the unit as shipped, then the unit run for real
//! under systemd as PID 1 in a Debian root booted with systemd-nspawn.

use super::*;

/// `systemd-analyze verify` in a scratch root that has the binary at the unit's ExecStart path
/// (and systemd's own units), so the check runs on the unit as shipped. Warnings fail too.
pub(super) fn systemd_verify(binary: &Path, unit: &Path) -> Result<()> {
    let unit_text = fs::read_to_string(unit)?;
    let exec = unit_text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .and_then(|l| l.split_whitespace().next())
        .context("the unit has no ExecStart=")?;
    let scratch = work().join("systemd-root");
    let _ = fs::remove_dir_all(&scratch);
    let place = |path: &str, from: &Path| -> Result<()> {
        let to = scratch.join(path.trim_start_matches('/'));
        fs::create_dir_all(to.parent().context("no parent")?)?;
        fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        Ok(())
    };
    place(exec, binary)?;
    for l in unit_text
        .lines()
        .filter_map(|l| l.strip_prefix("ExecReload="))
    {
        let cmd = l.split_whitespace().next().unwrap_or_default();
        if cmd != exec {
            place(cmd, Path::new(cmd))?;
        }
    }
    let name = unit
        .file_name()
        .context("unit name")?
        .to_string_lossy()
        .into_owned();
    place(&format!("/etc/systemd/system/{name}"), unit)?;
    fs::create_dir_all(scratch.join("usr/lib/systemd"))?;
    run(Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(scratch.join("usr/lib/systemd/")))?;
    let out = checked(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", scratch.display()))
            .arg(&name),
    )?;
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    ensure!(
        said.trim().is_empty(),
        "systemd-analyze verify warns:\n{said}"
    );
    let out = checked(
        Command::new("systemd-analyze")
            // Exposure at most 5.0 (the threshold counts tenths).
            .args(["security", "--offline=yes", "--threshold=50"])
            .arg(format!("--root={}", scratch.display()))
            .arg(&name),
    )?;
    if let Some(line) = text(&out.stdout).lines().last() {
        eprintln!(
            "deploy:      systemd-analyze security: {}",
            line.trim_start_matches("→ ")
        );
    }
    Ok(())
}

/// What a user of the unit does, run inside the booted container once the unit has started;
/// each check prints PASS or FAIL and a name, then the container powers off.
pub(super) const UNIT_PROBE: &str = r#"#!/bin/sh
exec > /probe-result.txt 2>&1
say() { if [ "$1" = 0 ]; then echo "PASS $2"; else echo "FAIL $2"; fi; }
url=http://127.0.0.1:19477
ok=1; for i in $(seq 1 100); do curl -sf $url/readyz >/dev/null && ok=0 && break; sleep 0.2; done
say $ok ready
curl -sf $url/healthz >/dev/null; say $? healthy
[ "$(systemctl show watchdog -p NRestarts --value)" = 0 ]; say $? no-restarts
watchdog status | grep -q 'mode observe'; say $? status-socket
[ -e /sys/fs/bpf/watchdog/META ]; say $? pinned
cp /etc/watchdog/watchdog.toml /root/good.toml
echo 'bogus = 1' >> /etc/watchdog/watchdog.toml
systemctl reload watchdog; [ $? != 0 ]; say $? reload-refuses-a-broken-file
cp /root/good.toml /etc/watchdog/watchdog.toml
systemctl reload watchdog; say $? reload
sleep 1
curl -sf $url/metrics | grep -q '^watchdog_config_reloads_total{result="success"}'; say $? reload-counted
[ "$(systemctl is-active watchdog)" = active ]; say $? still-active
systemctl stop watchdog
[ "$(systemctl show watchdog -p ExecMainStatus --value)" = 0 ]; say $? stop-exit-0
[ -e /sys/fs/bpf/watchdog/META ]; say $? pinned-after-stop
watchdog unload && [ ! -e /sys/fs/bpf/watchdog ]; say $? unload
journalctl -u watchdog --no-pager -o cat | cut -c1-300
echo PROBE-DONE
systemctl poweroff
"#;

pub(super) const UNIT_PROBE_CHECKS: &[&str] = &[
    "ready",
    "healthy",
    "no-restarts",
    "status-socket",
    "pinned",
    "reload-refuses-a-broken-file",
    "reload",
    "reload-counted",
    "still-active",
    "stop-exit-0",
    "pinned-after-stop",
    "unload",
];

/// Boots a Debian root with systemd-nspawn (systemd as PID 1, its own network namespace and a
/// bpffs of its own, so nothing it pins can meet another daemon's) with the unit installed as
/// the README says, and reads what UNIT_PROBE found.
pub(super) fn systemd_boot(binary: &Path, dir: &Path) -> Result<()> {
    setup::ensure_packages(&["debootstrap", "systemd-container"])?;
    let os = work().join("nspawn-root");
    if !os.join("usr/bin/curl").exists() {
        eprintln!("deploy: debootstrap of a minimal Debian for the systemd test (once, about two minutes)");
        let _ = fs::remove_dir_all(&os);
        checked(
            Command::new("debootstrap")
                .args([
                    "--variant=minbase",
                    "--include=systemd,systemd-sysv,dbus,curl,procps",
                ])
                .arg("bookworm")
                .arg(&os),
        )?;
    }
    let unit = fs::read_to_string(dir.join("watchdog.service"))?;
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .and_then(|l| l.split_whitespace().next())
        .context("the unit has no ExecStart=")?;
    let put = |path: &str, bytes: &[u8], mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let to = os.join(path.trim_start_matches('/'));
        fs::create_dir_all(to.parent().context("no parent")?)?;
        fs::write(&to, bytes)?;
        fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put(exec, &fs::read(binary)?, 0o755)?;
    put(
        "/etc/systemd/system/watchdog.service",
        unit.as_bytes(),
        0o644,
    )?;
    // The shipped policy, with the metrics moved off 9477 (the container has its own network
    // namespace, but nothing here listens in 8000-9999 at all).
    let toml = fs::read_to_string(dir.join("watchdog.toml"))?;
    let moved = toml.replace(
        "# metrics_addr = \"127.0.0.1:9477\"",
        "metrics_addr = \"127.0.0.1:19477\"",
    );
    ensure!(
        moved != toml,
        "deploy/systemd/watchdog.toml no longer has the metrics_addr comment this test rewrites"
    );
    put("/etc/watchdog/watchdog.toml", moved.as_bytes(), 0o644)?;
    put("/usr/local/bin/probe.sh", UNIT_PROBE.as_bytes(), 0o755)?;
    put(
        "/etc/systemd/system/probe.service",
        b"[Unit]\nAfter=watchdog.service\n[Service]\nType=oneshot\nExecStart=/usr/local/bin/probe.sh\n",
        0o644,
    )?;
    let wants = os.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    for u in ["watchdog.service", "probe.service"] {
        let link = wants.join(u);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{u}"), &link)?;
    }
    let _ = fs::remove_file(os.join("probe-result.txt"));

    let bpf = work().join("nspawn-bpffs");
    fs::create_dir_all(&bpf)?;
    run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpf))?;
    let booted = output(
        Command::new("timeout")
            .arg("180")
            .arg("systemd-nspawn")
            .args([
                "--quiet",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--private-network",
            ])
            .args([
                "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
                "--console=pipe",
            ])
            // nspawn's own seccomp filter allows these two only with CAP_SYS_ADMIN.
            .arg("--system-call-filter=bpf perf_event_open")
            .arg(format!("--bind={}:/sys/fs/bpf", bpf.display()))
            .arg("--directory")
            .arg(&os),
    );
    let _ = Command::new("umount").arg(&bpf).status();
    let booted = booted?;
    let result = fs::read_to_string(os.join("probe-result.txt")).unwrap_or_default();
    let missing: Vec<_> = UNIT_PROBE_CHECKS
        .iter()
        .filter(|c| !result.lines().any(|l| l == format!("PASS {c}")))
        .collect();
    ensure!(
        missing.is_empty() && result.contains("PROBE-DONE"),
        "the unit under systemd failed {missing:?}:\n{result}\n(systemd-nspawn: {}){}",
        booted.status,
        text(&booted.stderr)
    );
    Ok(())
}
