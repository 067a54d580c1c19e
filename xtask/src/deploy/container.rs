//! deploy/container: the image built with podman, `watchdog check` and the daemon run from it
//! in the DaemonSet's shape (podman run, or the exported root under chroot where podman cannot
//! run containers here).

use super::*;

/// containers.conf for podman: crun here needs `default_ulimits = []`.
pub(super) fn containers_conf() -> Result<PathBuf> {
    fs::create_dir_all(work())?;
    let conf = work().join("containers.conf");
    fs::write(&conf, "[containers]\ndefault_ulimits = []\n")?;
    Ok(conf)
}

pub(super) fn podman() -> Result<Command> {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", containers_conf()?);
    Ok(c)
}

/// Builds the image from a scratch context holding only the static binary.
pub(super) fn build_image(binary: &Path) -> Result<String> {
    let image = image_tag();
    build_image_as(binary, &image, crate::build::Arch::X86_64)?;
    Ok(image)
}

/// Builds `image` for `arch` from a scratch context holding only that architecture's static
/// binary (`FROM scratch` and `COPY` only: no emulation needed for a foreign platform).
pub(super) fn build_image_as(binary: &Path, image: &str, arch: crate::build::Arch) -> Result<()> {
    let ctx = work().join(format!("image-context-{}", arch.debian()));
    let _ = fs::remove_dir_all(&ctx);
    fs::create_dir_all(&ctx)?;
    fs::copy(binary, ctx.join("watchdog"))?;
    checked(
        podman()?
            .args(["build", "--pull=never", "--quiet", "-f"])
            .arg(root().join("deploy/container/Containerfile"))
            .args(["--platform", &format!("linux/{}", arch.debian())])
            .args(["-t", image])
            .arg(&ctx),
    )?;
    Ok(())
}

/// podman's default seccomp profile, amended as containerd's default is: bpf() with CAP_BPF
/// and perf_event_open() with CAP_PERFMON (podman's allows them only with CAP_SYS_ADMIN).
pub(super) fn seccomp_profile() -> Result<PathBuf> {
    let src = Path::new("/usr/share/containers/seccomp.json");
    let mut profile: Value = serde_json::from_str(&fs::read_to_string(src)?)
        .with_context(|| format!("reading {}", src.display()))?;
    let syscalls = profile["syscalls"]
        .as_array_mut()
        .context("no syscalls in podman's seccomp profile")?;
    for rule in syscalls.iter_mut() {
        if let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| n != "bpf" && n != "perf_event_open");
        }
    }
    syscalls.retain(|r| r["names"].as_array().is_none_or(|n| !n.is_empty()));
    for (name, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
        syscalls.push(serde_json::json!({
            "names": [name], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}
        }));
    }
    let out = work().join("seccomp.json");
    fs::write(&out, serde_json::to_vec_pretty(&profile)?)?;
    Ok(out)
}

/// `podman run` flags that give the container the DaemonSet's shape.
pub(super) fn pod_flags(pod: &Value, config_dir: &Path, caps: &[String]) -> Result<Vec<String>> {
    let spec = &pod["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    let mut f = vec!["--cap-drop=all".to_string()];
    f.push(format!(
        "--cap-add={}",
        caps.iter()
            .map(|c| format!("CAP_{c}"))
            .collect::<Vec<_>>()
            .join(",")
    ));
    if spec["hostPID"] == true {
        f.push("--pid=host".into());
    }
    // The pod's own network namespace (hostNetwork: false): loopback only here.
    ensure!(
        spec["hostNetwork"] != true,
        "hostNetwork is set: update this test"
    );
    f.push("--network=none".into());
    if sc["readOnlyRootFilesystem"] == true {
        f.push("--read-only".into());
    }
    if sc["allowPrivilegeEscalation"] == false {
        f.push("--security-opt=no-new-privileges".into());
    }
    if sc["appArmorProfile"]["type"] == "Unconfined" {
        f.push("--security-opt=apparmor=unconfined".into());
    }
    f.push(format!(
        "--user={}:{}",
        sc["runAsUser"].as_u64().unwrap_or(0),
        sc["runAsGroup"].as_u64().unwrap_or(0)
    ));
    f.push(format!(
        "--security-opt=seccomp={}",
        seccomp_profile()?.display()
    ));
    for e in c["env"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (e["name"].as_str(), e["value"].as_str()) {
            f.push(format!("--env={k}={v}"));
        }
    }
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let at = m["mountPath"].as_str().context("mountPath")?;
        let v = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == m["name"])
            .context("a mount without its volume")?;
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        if let Some(host) = v["hostPath"]["path"].as_str() {
            if v["hostPath"]["type"] == "DirectoryOrCreate" && !Path::new(host).exists() {
                // What the kubelet does for this type (the kubelet's log directories here).
                fs::create_dir_all(host).with_context(|| format!("creating {host}"))?;
            }
            ensure!(
                Path::new(host).exists(),
                "host path {host} does not exist here"
            );
            f.push(format!("--volume={host}:{at}{ro}"));
        } else if v["configMap"].is_object() {
            f.push(format!("--volume={}:{at}:ro", config_dir.display()));
        } else if v["emptyDir"].is_object() {
            f.push(format!("--tmpfs={at}"));
        } else {
            bail!("volume {} of a kind this test does not model", v["name"]);
        }
    }
    Ok(f)
}

/// `watchdog check` in place of the container's `run`, with the same flags.
/// The DaemonSet's container args without `--metrics-addr` and its value: the DaemonSet takes
/// that address from the downward API (`$(POD_IP)`), which a container run here does not have.
/// `deploy::kubernetes` checks the flag itself.
fn daemonset_args(pod: &Value) -> Result<Vec<String>> {
    let args: Vec<String> = pod["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--metrics-addr" {
            it.next();
        } else if !a.starts_with("--metrics-addr=") {
            out.push(a);
        }
    }
    Ok(out)
}

/// `watchdog check` with the DaemonSet's `run` args (its config), minus what only `run` takes.
pub(super) fn check_args(pod: &Value) -> Result<Vec<String>> {
    let mut out = vec!["check".to_string()];
    out.extend(daemonset_args(pod)?.into_iter().skip(1));
    Ok(out)
}

pub(super) fn can_run(out: &Output) -> bool {
    out.status.success() && text(&out.stdout).contains("watchdog can run here")
}

/// Runs `watchdog check` from the image; returns which way it ran, and the OCI runtime with
/// which podman runs containers here, if one does.
pub(super) fn run_image(
    image: &str,
    pod: &Value,
    config_dir: &Path,
    config_path: &Path,
    caps: &[String],
    unproved: &[String],
) -> Result<(String, Option<String>)> {
    let forced_chroot = std::env::var_os("WATCHDOG_DEPLOY_CHROOT").is_some();
    let runtime = if forced_chroot {
        eprintln!("deploy: WATCHDOG_DEPLOY_CHROOT is set: skipping podman run");
        None
    } else {
        podman_runtime(image)?
    };
    let flags = pod_flags(pod, config_dir, caps)?;
    let args = check_args(pod)?;
    let Some(rt) = runtime else {
        run_chroot(image, config_dir, config_path, caps, &args, unproved)?;
        let how = if forced_chroot {
            "podman export + chroot, forced by WATCHDOG_DEPLOY_CHROOT"
        } else {
            "podman export + chroot: podman run works with neither crun nor runc here"
        };
        return Ok((how.into(), None));
    };
    let run_with = |flags: &[String]| -> Result<Output> {
        output(
            podman()?
                .args(["--runtime", &rt, "run", "--rm"])
                .args(flags)
                .arg(image)
                .args(&args),
        )
    };
    let out = run_with(&flags)?;
    print!("{}", text(&out.stdout));
    ensure!(
        can_run(&out),
        "`watchdog check` failed in the DaemonSet's shape (podman --runtime {rt}):\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The eBPF capabilities, each left out once: the kernel check must then fail.
    for cap in unproved {
        let without: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        let out = run_with(&pod_flags(pod, config_dir, &without)?)?;
        ensure!(
            !can_run(&out),
            "`watchdog check` passes without CAP_{cap}: drop it from the DaemonSet or explain why \
             it stays (and prove it here)"
        );
        eprintln!("deploy:      without CAP_{cap}: `watchdog check` fails, as it must");
    }
    Ok((format!("podman run --runtime {rt}"), Some(rt)))
}

/// The daemon as the DaemonSet starts it, for a few seconds, with the observe policy (nothing
/// can be acted on), its own pinning directory (never another daemon's) and the metrics on
/// 127.0.0.1:19477 of the container's own network namespace: it must get ready, answer the
/// probes, pin its state, stop on SIGTERM with the state left pinned, and `watchdog unload`
/// from the image must remove it.
pub(super) fn run_daemon(
    rt: &str,
    image: &str,
    pod: &Value,
    config_dir: &Path,
    caps: &[String],
) -> Result<()> {
    const NAME: &str = "watchdog-deploy-run";
    const STATE: &str = "/sys/fs/bpf/watchdog-deploy-check";
    const ADDR: &str = "127.0.0.1:19477";
    let flags = pod_flags(pod, config_dir, caps)?;
    let mut args = daemonset_args(pod)?;
    args.extend(["--metrics-addr", ADDR, "--state-dir", STATE].map(String::from));
    let _ = output(podman()?.args(["rm", "--force", NAME]));
    let result = (|| -> Result<()> {
        checked(
            podman()?
                .args(["--runtime", rt, "run", "--detach", "--name", NAME])
                .args(&flags)
                .arg(image)
                .args(&args),
        )?;
        let pid = text(&checked(podman()?.args(["inspect", "-f", "{{.State.Pid}}", NAME]))?.stdout)
            .trim()
            .to_string();
        let get = |path: &str| -> Result<Output> {
            output(
                Command::new("nsenter")
                    .args(["-t", &pid, "-n", "curl", "-sf", "--max-time", "2"])
                    .arg(format!("http://{ADDR}{path}")),
            )
        };
        let mut ready = false;
        for _ in 0..100 {
            if get("/readyz")?.status.success() {
                ready = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        ensure!(ready, "/readyz never answered 200 within 20 s");
        ensure!(get("/healthz")?.status.success(), "/healthz is not 200");
        let metrics = text(&get("/metrics")?.stdout);
        ensure!(
            metrics.contains("watchdog_build_info") && metrics.contains("watchdog_probe_set"),
            "/metrics lacks watchdog_build_info:\n{metrics}"
        );
        ensure!(
            Path::new(STATE).join("META").exists(),
            "nothing pinned in {STATE}"
        );
        checked(podman()?.args(["stop", "--time", "10", NAME]))?;
        let code =
            text(&checked(podman()?.args(["inspect", "-f", "{{.State.ExitCode}}", NAME]))?.stdout);
        ensure!(
            code.trim() == "0",
            "the daemon exited with {} on SIGTERM",
            code.trim()
        );
        ensure!(
            Path::new(STATE).join("META").exists(),
            "SIGTERM removed the pinned state"
        );
        let out = checked(
            podman()?
                .args(["--runtime", rt, "run", "--rm"])
                .args(&flags)
                .arg(image)
                .args(["unload", "--state-dir", STATE]),
        )?;
        ensure!(
            !Path::new(STATE).exists(),
            "`watchdog unload` from the image left {STATE}: {}",
            text(&out.stdout)
        );
        Ok(())
    })();
    if result.is_err() {
        if let Ok(logs) = output(podman()?.args(["logs", NAME])) {
            eprintln!(
                "deploy: the daemon's log:\n{}{}",
                text(&logs.stdout),
                text(&logs.stderr)
            );
        }
    }
    let _ = output(podman()?.args(["rm", "--force", NAME]));
    if Path::new(STATE).exists() {
        let _ = fs::remove_dir_all(STATE);
    }
    result
}

/// The first OCI runtime with which podman runs the image here, if any.
pub(super) fn podman_runtime(image: &str) -> Result<Option<String>> {
    for rt in ["crun", "runc"] {
        let out = output(
            podman()?
                .args([
                    "--runtime",
                    rt,
                    "run",
                    "--rm",
                    "--network=none",
                    image,
                    "--version",
                ])
                .stderr(Stdio::piped()),
        )?;
        if out.status.success() {
            return Ok(Some(rt.to_string()));
        }
        eprintln!(
            "deploy: podman run with {rt} does not work here: {}",
            text(&out.stderr).trim()
        );
    }
    Ok(None)
}

/// Fallback: the image's root filesystem (as exported by podman) under chroot, in a private
/// mount namespace (nothing mounted leaks to the host), bounded to the DaemonSet's capabilities
/// plus CAP_SYS_CHROOT for the chroot itself.
pub(super) fn run_chroot(
    image: &str,
    config_dir: &Path,
    config_path: &Path,
    caps: &[String],
    args: &[String],
    unproved: &[String],
) -> Result<()> {
    let rootfs = work().join("rootfs");
    let _ = fs::remove_dir_all(&rootfs);
    fs::create_dir_all(&rootfs)?;
    let name = "watchdog-deploy-check";
    let _ = output(podman()?.args(["rm", "--force", name]));
    checked(podman()?.args(["create", "--name", name, image]))?;
    let tar = work().join("rootfs.tar");
    let exported = checked(podman()?.args(["export", "-o"]).arg(&tar).arg(name));
    let _ = output(podman()?.args(["rm", "--force", name]));
    exported?;
    checked(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&rootfs),
    )?;
    ensure!(
        rootfs.join("watchdog").exists(),
        "the exported image has no /watchdog"
    );
    let cfg_in = config_path.parent().context("config dir")?;
    let script = format!(
        "set -e; r={r}; mkdir -p $r/proc $r/sys $r/run/watchdog $r{cfg}; \
         mount -t proc proc $r/proc; mount --rbind /sys $r/sys; \
         mount -t tmpfs tmpfs $r/run/watchdog; mount --bind -o ro {src} $r{cfg}; \
         exec setpriv --bounding-set={set} --inh-caps=-all -- chroot $r /watchdog \"$@\"",
        r = rootfs.display(),
        cfg = cfg_in.display(),
        src = config_dir.display(),
        set = setpriv_caps(&[caps, &["SYS_CHROOT".to_string()]].concat()),
    );
    let run_with = |script: &str| -> Result<Output> {
        output(
            Command::new("unshare")
                .args([
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    "-c",
                    script,
                    "sh",
                ])
                .args(args),
        )
    };
    let out = run_with(&script)?;
    print!("{}", text(&out.stdout));
    ensure!(
        can_run(&out),
        "`watchdog check` failed from the image's root filesystem under chroot:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for cap in unproved {
        let without: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        let s = script.replace(
            &setpriv_caps(&[caps, &["SYS_CHROOT".to_string()]].concat()),
            &setpriv_caps(&[&without[..], &["SYS_CHROOT".to_string()]].concat()),
        );
        ensure!(
            !can_run(&run_with(&s)?),
            "`watchdog check` passes without CAP_{cap}: drop it from the DaemonSet or explain why"
        );
        eprintln!("deploy:      without CAP_{cap}: `watchdog check` fails, as it must");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemonsets_metrics_address_is_left_to_the_test_run() {
        let pod = serde_json::json!({"spec": {"template": {"spec": {"containers": [{"args": [
            "run", "--config", "/etc/watchdog/watchdog.toml", "--metrics-addr", "$(POD_IP):9477"
        ]}]}}}});
        assert_eq!(
            check_args(&pod).unwrap(),
            ["check", "--config", "/etc/watchdog/watchdog.toml"]
        );
        assert_eq!(
            daemonset_args(&pod).unwrap(),
            ["run", "--config", "/etc/watchdog/watchdog.toml"]
        );
    }
}
