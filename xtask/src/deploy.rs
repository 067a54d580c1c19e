//! `cargo xtask test --deploy`: everything under deploy/ is exercised, nothing is taken on trust.
//!
//! - The kustomize base and the observe overlay render with `kubectl kustomize`; every rendered
//!   object validates (strict) against the schemas of current Kubernetes releases
//!   (PyPI `kubernetes-validate`), and a deliberately broken copy must not.
//! - The ConfigMap's TOML of each rendering, and deploy/systemd/watchdog.toml, pass the real
//!   binary's `watchdog check --config-only`; the DaemonSet mounts that ConfigMap where its
//!   `--config` points; the overlay's file is the base's with `mode = "observe"` and nothing else.
//! - checkov (PyPI) finds nothing but the waivers of deploy/kubernetes/.checkov.yaml, each with
//!   a reason, none stale.
//! - `systemd-analyze verify` passes the unit (in a scratch root holding the binary at its
//!   ExecStart path), with no warning; then the unit runs for real under systemd as PID 1 in a
//!   Debian root (debootstrap, cached in target/) booted with systemd-nspawn: the daemon gets
//!   ready and pins its state with the unit's sandbox, `systemctl reload` refuses a broken file
//!   and applies a good one, `systemctl stop` leaves the state pinned, `watchdog unload` clears it.
//! - The DaemonSet's capabilities: those for other users' processes (KILL, SYS_PTRACE,
//!   DAC_READ_SEARCH) are shown to suffice and to be needed with `setpriv` against a process of
//!   `nobody`; the eBPF ones by the container run below, with each of them left out once.
//! - The image builds with podman from deploy/container/Containerfile (nothing pulled) and runs
//!   `watchdog check` against this kernel in the DaemonSet's shape: its capabilities only, host
//!   PID namespace, read-only root, its host paths, the ConfigMap's file. Where podman cannot
//!   run containers (crun refuses hybrid cgroups; runc is tried next), the image's exported root
//!   filesystem runs under chroot with the same capability set instead; the output says which.
//!   With podman run, the daemon itself then runs a few seconds in that shape with the observe
//!   policy: ready, probes answered, state pinned, SIGTERM, `watchdog unload` from the image.
//!
//! Every failure stops the run with the tool's own output. Python tools live in
//! target/deploy-venv, scratch files in target/deploy.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::{build, root, run, setup};

/// Pinned so a run means the same thing tomorrow.
const PIP_PACKAGES: &[&str] = &["kubernetes-validate==1.37.0", "checkov==3.3.30"];
/// Kubernetes releases the manifests must validate against: the newest the pinned validator
/// knows, and the oldest with the `appArmorProfile` field the DaemonSet uses.
const K8S_VERSIONS: &[&str] = &["1.37.0", "1.30.0"];
/// The image the DaemonSet names (kustomization `images`) and `cargo xtask image` builds.
const IMAGE_REPO: &str = "localhost/watchdog";

/// Kustomize directories: (label, path under deploy/kubernetes).
const RENDERINGS: &[(&str, &str)] = &[("base", ""), ("observe", "overlays/observe")];

pub fn image_tag() -> String {
    format!("{IMAGE_REPO}:{}", env!("CARGO_PKG_VERSION"))
}

fn work() -> PathBuf {
    root().join("target/deploy")
}

fn venv() -> PathBuf {
    root().join("target/deploy-venv")
}

/// Prints one finished step with its duration.
struct Steps {
    start: Instant,
    last: Instant,
}

impl Steps {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
        }
    }
    fn done(&mut self, what: &str) {
        let now = Instant::now();
        eprintln!(
            "deploy: ok  {what} ({:.1} s)",
            now.duration_since(self.last).as_secs_f64()
        );
        self.last = now;
    }
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd`; on failure bails with its whole output.
fn checked(cmd: &mut Command) -> Result<Output> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    Ok(out)
}

/// The whole deploy/ check (`cargo xtask test --deploy`).
pub fn check() -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "cargo xtask test --deploy needs root: it loads eBPF programs, runs podman as root and \
         drops to `nobody` with setpriv"
    );
    let mut steps = Steps::new();
    let deploy = root().join("deploy");
    let binary = build::static_binary("watchdog", "watchdog")?;
    steps.done("static watchdog binary");

    // podman (and runc, for hosts where crun refuses the cgroup layout), systemd-analyze,
    // setpriv and unshare; the Python tools go to a venv.
    setup::ensure_packages(&["podman", "runc", "systemd", "util-linux"])?;
    let kubectl = kubectl()?;
    pip_tools()?;
    steps.done("tools (podman, runc, kubectl, kubernetes-validate, checkov)");

    // Render, validate, and read back each kustomization.
    let mut rendered = Vec::new();
    for (label, dir) in RENDERINGS {
        let src = deploy.join("kubernetes").join(dir);
        let out = checked(Command::new(&kubectl).arg("kustomize").arg(&src))?;
        let file = work().join(format!("{label}.yaml"));
        fs::create_dir_all(work())?;
        fs::write(&file, &out.stdout)?;
        rendered.push((*label, file));
    }
    steps.done("kubectl kustomize: base and overlays/observe rendered");

    for (_, file) in &rendered {
        for v in K8S_VERSIONS {
            validate(file, v)?;
        }
    }
    validator_rejects_a_broken_manifest(&rendered[0].1)?;
    steps.done(&format!(
        "kubernetes-validate --strict against Kubernetes {}: every object",
        K8S_VERSIONS.join(" and ")
    ));

    let mut tomls = Vec::new();
    let mut base_pod = None;
    for (label, file) in &rendered {
        let objects = yaml_to_json(file)?;
        let (toml, config_path) = manifest_facts(&objects, label)?;
        let dir = work().join(label).join("config");
        fs::create_dir_all(&dir)?;
        let name = config_path
            .file_name()
            .context("--config has no file name")?;
        let toml_file = dir.join(name);
        fs::write(&toml_file, &toml)?;
        config_only(&binary, &toml_file)?;
        if *label == "base" {
            base_pod = Some((daemonset(&objects)?.clone(), dir, config_path));
        }
        tomls.push(toml);
    }
    overlay_is_base_in_observe_mode(&tomls[0], &tomls[1])?;
    config_only(&binary, &deploy.join("systemd/watchdog.toml"))?;
    steps.done("ConfigMap TOML (base, observe) and deploy/systemd/watchdog.toml pass `watchdog check --config-only`; overlay = base + observe");

    checkov(&deploy.join("kubernetes"))?;
    steps.done("checkov: no finding beyond the waivers in .checkov.yaml");

    operator_overlay(&kubectl, &deploy)?;
    steps.done("overlays/prometheus-operator: the base, a PodMonitor on its metrics port, the PrometheusRule = deploy/prometheus/rules.yml");
    crate::prometheus::check(&binary)?;
    steps.done("deploy/prometheus: promtool check + test rules, a real Prometheus scraping a real daemon (action, alert, dashboard)");

    systemd_verify(&binary, &deploy.join("systemd/watchdog.service"))?;
    steps.done("systemd-analyze verify deploy/systemd/watchdog.service");

    systemd_boot(&binary, &deploy.join("systemd"))?;
    steps.done("watchdog.service under a real systemd (nspawn-booted Debian): ready, status, reloads, stop, unload");

    let (pod, config_dir, config_path) = base_pod.context("no base rendering")?;
    let caps = capabilities(&pod)?;
    let unproved = proc_capabilities(&caps)?;
    steps.done("capabilities for other users' processes: KILL, SYS_PTRACE, DAC_READ_SEARCH each needed and enough");

    let image = build_image(&binary)?;
    let named = pod["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        named == image,
        "the DaemonSet runs image {named:?} but this build is {image:?}: update `images` in deploy/kubernetes/base/kustomization.yaml"
    );
    steps.done(&format!("podman build {image} (FROM scratch)"));

    let (path, runtime) = run_image(&image, &pod, &config_dir, &config_path, &caps, &unproved)?;
    steps.done(&format!(
        "`watchdog check` from the image in the DaemonSet's shape ({path})"
    ));

    match runtime {
        Some(rt) => {
            run_daemon(&rt, &image, &pod, &work().join("observe/config"), &caps)?;
            steps.done("the daemon itself in the DaemonSet's shape (observe policy): ready, healthy, pinned, stopped, unloaded");
        }
        None => eprintln!(
            "deploy: NOT RUN: the daemon in the DaemonSet's shape (needs podman run; only `watchdog check` ran, under chroot)"
        ),
    }

    eprintln!(
        "deploy: all checks passed in {:.1} s; image run path: {path}",
        steps.start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo xtask image`: the static binary in the FROM-scratch image, tagged as the DaemonSet
/// names it.
pub fn image() -> Result<()> {
    let binary = build::static_binary("watchdog", "watchdog")?;
    setup::ensure_packages(&["podman"])?;
    let image = build_image(&binary)?;
    println!("built {image}");
    println!(
        "push it:   podman push {image} REGISTRY/watchdog:{}",
        env!("CARGO_PKG_VERSION")
    );
    println!("or load it on a node: podman save {image} | ctr -n k8s.io images import -");
    Ok(())
}

/// kubectl from the machine (its package is not in Debian's archive; Debian's
/// `kubernetes-client` is an old kubectl with an old kustomize, tried when there is none).
fn kubectl() -> Result<PathBuf> {
    let found = |name: &str| {
        Command::new(name)
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !found("kubectl") {
        eprintln!("deploy: no kubectl on PATH; trying Debian's kubernetes-client (kubectl 1.20)");
        setup::ensure_packages(&["kubernetes-client"])?;
        ensure!(
            found("kubectl"),
            "kubectl is still missing after installing kubernetes-client"
        );
    }
    Ok(PathBuf::from("kubectl"))
}

/// kubernetes-validate and checkov in target/deploy-venv (pinned; a no-op once installed).
fn pip_tools() -> Result<()> {
    let venv = venv();
    if !venv.join("bin/python").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    checked(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PIP_PACKAGES),
    )?;
    Ok(())
}

fn validate(file: &Path, version: &str) -> Result<()> {
    let out = checked(
        Command::new(venv().join("bin/kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .arg(file),
    )?;
    let passed = text(&out.stdout).matches(" passed for resource ").count()
        + text(&out.stderr).matches(" passed for resource ").count();
    ensure!(
        passed >= 4,
        "kubernetes-validate reported {passed} objects passing in {}",
        file.display()
    );
    Ok(())
}

/// A misspelt field must fail, or a passing validation means nothing.
fn validator_rejects_a_broken_manifest(file: &Path) -> Result<()> {
    let text = fs::read_to_string(file)?;
    ensure!(
        text.contains("readOnlyRootFilesystem"),
        "no readOnlyRootFilesystem in {}",
        file.display()
    );
    let broken = work().join("broken.yaml");
    fs::write(
        &broken,
        text.replace("readOnlyRootFilesystem", "readOnlyRootFilesytem"),
    )?;
    let out = output(
        Command::new(venv().join("bin/kubernetes-validate"))
            .args([
                "--strict",
                "--quiet",
                "--kubernetes-version",
                K8S_VERSIONS[0],
            ])
            .arg(&broken),
    )?;
    ensure!(
        !out.status.success(),
        "kubernetes-validate accepted a misspelt field: its passes cannot be trusted"
    );
    Ok(())
}

/// The objects of a multi-document YAML file, through the venv's PyYAML (checkov brings it).
fn yaml_to_json(file: &Path) -> Result<Vec<Value>> {
    let out = checked(
        Command::new(venv().join("bin/python"))
            .args([
                "-c",
                "import json, sys, yaml\n\
                 json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)",
            ])
            .arg(file),
    )?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The operator overlay renders the base unchanged plus a PodMonitor that scrapes the
/// DaemonSet's pods on a port they declare, and a PrometheusRule holding exactly the groups of
/// deploy/prometheus/rules.yml (the file promtool and the real Prometheus check).
fn operator_overlay(kubectl: &Path, deploy: &Path) -> Result<()> {
    let src = deploy.join("kubernetes/overlays/prometheus-operator");
    let out = checked(Command::new(kubectl).arg("kustomize").arg(&src))?;
    let file = work().join("prometheus-operator.yaml");
    fs::write(&file, &out.stdout)?;
    let objects = yaml_to_json(&file)?;
    let base = yaml_to_json(&work().join("base.yaml"))?;
    let of = |kind: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .with_context(|| format!("overlays/prometheus-operator renders no {kind}"))
    };
    let rest: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] != "PodMonitor" && o["kind"] != "PrometheusRule")
        .collect();
    ensure!(
        rest == base.iter().collect::<Vec<_>>(),
        "overlays/prometheus-operator changes the base objects"
    );
    let (pm, rule) = (of("PodMonitor")?, of("PrometheusRule")?);
    let pod = &daemonset(&objects)?["spec"]["template"];
    ensure!(
        pm["metadata"]["namespace"] == daemonset(&objects)?["metadata"]["namespace"],
        "the PodMonitor is not in the DaemonSet's namespace"
    );
    for (k, v) in pm["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("PodMonitor without matchLabels")?
    {
        ensure!(
            &pod["metadata"]["labels"][k] == v,
            "PodMonitor selects {k}={v}, which the DaemonSet's pods do not carry"
        );
    }
    let port = &pm["spec"]["podMetricsEndpoints"][0]["port"];
    ensure!(
        pod["spec"]["containers"][0]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| &p["name"] == port),
        "PodMonitor scrapes port {port}, which the container does not name"
    );
    let rules = yaml_to_json(&deploy.join("prometheus/rules.yml"))?;
    ensure!(
        rule["spec"]["groups"] == rules[0]["groups"],
        "overlays/prometheus-operator/prometheusrule.yaml differs from deploy/prometheus/rules.yml: regenerate it (its header says how)"
    );
    Ok(())
}

fn daemonset(objects: &[Value]) -> Result<&Value> {
    objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .context("no DaemonSet rendered")
}

/// The policy TOML the DaemonSet really reads, and the path it reads it from, after checking
/// that the pieces agree (args, mount, ConfigMap name and key) and the pod keeps its promises.
fn manifest_facts(objects: &[Value], label: &str) -> Result<(String, PathBuf)> {
    let ds = daemonset(objects)?;
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .context("container has no args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        args.first() == Some(&"run"),
        "{label}: the container does not `run`: {args:?}"
    );
    let config = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| PathBuf::from(w[1]))
        .context("the container has no --config")?;
    let dir = config.parent().context("--config has no directory")?;
    let key = config
        .file_name()
        .and_then(|n| n.to_str())
        .context("--config file name")?;
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"].as_str() == dir.to_str())
        .with_context(|| format!("{label}: nothing is mounted at {}", dir.display()))?;
    let volume = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .context("the config mount has no volume")?;
    let cm_name = volume["configMap"]["name"]
        .as_str()
        .with_context(|| format!("{label}: {} is not a ConfigMap volume", dir.display()))?;
    ensure!(
        mount.get("subPath").is_none(),
        "{label}: a subPath mount is never updated"
    );
    let cm = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == cm_name)
        .with_context(|| format!("{label}: ConfigMap {cm_name} is not rendered"))?;
    let toml = cm["data"][key]
        .as_str()
        .with_context(|| format!("{label}: ConfigMap {cm_name} has no key {key}"))?;

    let sc = &c["securityContext"];
    ensure!(pod["hostPID"] == true, "{label}: hostPID is not set");
    ensure!(
        sc["privileged"] != true,
        "{label}: the container is privileged"
    );
    ensure!(
        sc["readOnlyRootFilesystem"] == true,
        "{label}: the root filesystem is writable"
    );
    ensure!(
        sc["allowPrivilegeEscalation"] == false,
        "{label}: privilege escalation allowed"
    );
    ensure!(
        sc["capabilities"]["drop"] == serde_json::json!(["ALL"]),
        "{label}: capabilities are not dropped to none first"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        ensure!(c[probe].is_object(), "{label}: no {probe}");
    }
    Ok((toml.to_string(), config))
}

fn config_only(binary: &Path, file: &Path) -> Result<()> {
    let out = checked(
        Command::new(binary)
            .args(["check", "--config-only", "--config"])
            .arg(file),
    )?;
    let stdout = text(&out.stdout);
    ensure!(
        stdout.contains("ok    config") && stdout.contains("watchdog can run here"),
        "unexpected `watchdog check --config-only` output for {}:\n{stdout}",
        file.display()
    );
    Ok(())
}

/// The observe overlay must carry the base's policy with only the mode changed, so that what
/// is observed is what will be enforced.
fn overlay_is_base_in_observe_mode(base: &str, observe: &str) -> Result<()> {
    const ENFORCE: &str = "\nmode = \"enforce\"";
    const OBSERVE: &str = "\nmode = \"observe\"";
    ensure!(
        base.matches(ENFORCE).count() == 1,
        "the base policy must say `mode = \"enforce\"` once in [daemon]"
    );
    ensure!(
        observe == base.replacen(ENFORCE, OBSERVE, 1),
        "overlays/observe/watchdog.toml is not base/watchdog.toml with mode = \"observe\": copy \
         the base file again and change that one line"
    );
    Ok(())
}

/// Waived check ids of .checkov.yaml, each with its reason.
fn waivers(config: &Path) -> Result<Vec<(String, String)>> {
    let text = fs::read_to_string(config)?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix("- CKV") else {
            continue;
        };
        let (id, reason) = rest.split_once('#').unwrap_or((rest, ""));
        let id = format!("CKV{}", id.trim());
        let reason = reason.trim();
        ensure!(
            reason.len() >= 20,
            "{}: waiver {id} has no reason (`- {id}  # why`)",
            config.display()
        );
        out.push((id, reason.to_string()));
    }
    Ok(out)
}

fn checkov(dir: &Path) -> Result<()> {
    let config = dir.join(".checkov.yaml");
    let checkov = venv().join("bin/checkov");
    // As a user would run it: with the waivers, nothing may fail.
    checked(
        Command::new(&checkov)
            .arg("-d")
            .arg(dir)
            .arg("--config-file")
            .arg(&config)
            .arg("--quiet"),
    )?;
    // Without them: what fires must be exactly the waived set (no stale waiver). checkov reads
    // a .checkov.yaml in the scanned directory whatever --config-file says, so it scans a copy.
    let copy = work().join("checkov-scan");
    let _ = fs::remove_dir_all(&copy);
    run(Command::new("cp").arg("-r").arg(dir).arg(&copy))?;
    fs::remove_file(copy.join(".checkov.yaml"))?;
    let out = output(Command::new(&checkov).arg("-d").arg(&copy).args([
        "--framework",
        "kubernetes",
        "kustomize",
        "--skip-download",
        "-o",
        "json",
    ]))?;
    let json: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "checkov's JSON output:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })?;
    let reports = match json {
        Value::Array(a) => a,
        one => vec![one],
    };
    let mut fired = BTreeSet::new();
    for r in &reports {
        for f in r["results"]["failed_checks"]
            .as_array()
            .into_iter()
            .flatten()
        {
            fired.insert(format!(
                "{} ({})",
                f["check_id"].as_str().unwrap_or("?"),
                f["check_name"].as_str().unwrap_or("?")
            ));
        }
    }
    let waived = waivers(&config)?;
    let unwaived: Vec<_> = fired
        .iter()
        .filter(|f| {
            !waived
                .iter()
                .any(|(id, _)| f.starts_with(&format!("{id} ")))
        })
        .collect();
    ensure!(
        unwaived.is_empty(),
        "checkov findings with no waiver: {unwaived:?}"
    );
    let stale: Vec<_> = waived
        .iter()
        .filter(|(id, _)| !fired.iter().any(|f| f.starts_with(&format!("{id} "))))
        .map(|(id, _)| id)
        .collect();
    ensure!(
        stale.is_empty(),
        "waivers in {} that no longer fire (remove them): {stale:?}",
        config.display()
    );
    for (id, reason) in &waived {
        eprintln!("deploy:      waived {id}: {reason}");
    }
    Ok(())
}

/// `systemd-analyze verify` in a scratch root that has the binary at the unit's ExecStart path
/// (and systemd's own units), so the check runs on the unit as shipped. Warnings fail too.
fn systemd_verify(binary: &Path, unit: &Path) -> Result<()> {
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
const UNIT_PROBE: &str = r#"#!/bin/sh
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

const UNIT_PROBE_CHECKS: &[&str] = &[
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
fn systemd_boot(binary: &Path, dir: &Path) -> Result<()> {
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

/// The capabilities the DaemonSet adds, upper case without `CAP_`.
fn capabilities(ds: &Value) -> Result<Vec<String>> {
    let add =
        &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"];
    let caps: Vec<String> = add
        .as_array()
        .context("no capabilities added")?
        .iter()
        .filter_map(Value::as_str)
        .map(|c| c.trim_start_matches("CAP_").to_ascii_uppercase())
        .collect();
    ensure!(
        !caps.contains(&"SYS_ADMIN".to_string()),
        "the DaemonSet adds SYS_ADMIN"
    );
    Ok(caps)
}

fn setpriv_caps(caps: &[String]) -> String {
    let mut s = "-all".to_string();
    for c in caps {
        s.push_str(",+");
        s.push_str(&c.to_ascii_lowercase());
    }
    s
}

/// What the daemon does to another user's process, under exactly `caps` (root, every other
/// capability out of the bounding set), and under `caps` less the one each step needs: the
/// first must work, the second must not. Returns the capabilities not covered here.
fn proc_capabilities(caps: &[String]) -> Result<Vec<String>> {
    let mut target = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sleep",
            "60",
        ])
        .stdin(Stdio::null())
        .spawn()
        .context("starting a process as nobody")?;
    let pid = target.id();
    let result = (|| -> Result<Vec<String>> {
        // Wait for the exec, so /proc shows nobody's process.
        for _ in 0..100 {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if status.contains("Uid:\t65534") && status.contains("Name:\tsleep") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let probes: [(&str, Vec<String>); 3] = [
            ("KILL", vec!["kill".into(), "-0".into(), pid.to_string()]),
            (
                "SYS_PTRACE",
                vec!["readlink".into(), format!("/proc/{pid}/exe")],
            ),
            (
                "DAC_READ_SEARCH",
                vec!["ls".into(), format!("/proc/{pid}/fd")],
            ),
        ];
        let try_with = |set: &[String], argv: &[String]| -> Result<bool> {
            Ok(output(
                Command::new("setpriv")
                    .arg(format!("--bounding-set={}", setpriv_caps(set)))
                    .args(["--inh-caps=-all", "--"])
                    .args(argv),
            )?
            .status
            .success())
        };
        for (cap, argv) in &probes {
            ensure!(
                caps.iter().any(|c| c == cap),
                "the DaemonSet lacks CAP_{cap}, needed for `{}` on another user's process",
                argv.join(" ")
            );
            ensure!(
                try_with(caps, argv)?,
                "`{}` fails with the DaemonSet's capabilities {caps:?}",
                argv.join(" ")
            );
            let without: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
            ensure!(
                !try_with(&without, argv)?,
                "`{}` works without CAP_{cap}: is that capability still needed?",
                argv.join(" ")
            );
        }
        Ok(caps
            .iter()
            .filter(|c| !probes.iter().any(|(p, _)| p == c))
            .cloned()
            .collect())
    })();
    let _ = target.kill();
    let _ = target.wait();
    result
}

/// containers.conf for podman: crun here needs `default_ulimits = []`.
fn containers_conf() -> Result<PathBuf> {
    fs::create_dir_all(work())?;
    let conf = work().join("containers.conf");
    fs::write(&conf, "[containers]\ndefault_ulimits = []\n")?;
    Ok(conf)
}

fn podman() -> Result<Command> {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", containers_conf()?);
    Ok(c)
}

/// Builds the image from a scratch context holding only the static binary.
fn build_image(binary: &Path) -> Result<String> {
    let ctx = work().join("image-context");
    let _ = fs::remove_dir_all(&ctx);
    fs::create_dir_all(&ctx)?;
    fs::copy(binary, ctx.join("watchdog"))?;
    let image = image_tag();
    checked(
        podman()?
            .args(["build", "--pull=never", "--quiet", "-f"])
            .arg(root().join("deploy/container/Containerfile"))
            .args(["-t", &image])
            .arg(&ctx),
    )?;
    Ok(image)
}

/// podman's default seccomp profile, amended as containerd's default is: bpf() with CAP_BPF
/// and perf_event_open() with CAP_PERFMON (podman's allows them only with CAP_SYS_ADMIN).
fn seccomp_profile() -> Result<PathBuf> {
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
fn pod_flags(pod: &Value, config_dir: &Path, caps: &[String]) -> Result<Vec<String>> {
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
fn check_args(pod: &Value) -> Result<Vec<String>> {
    let args: Vec<String> = pod["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let mut out = vec!["check".to_string()];
    out.extend(args.into_iter().skip(1));
    Ok(out)
}

fn can_run(out: &Output) -> bool {
    out.status.success() && text(&out.stdout).contains("watchdog can run here")
}

/// Runs `watchdog check` from the image; returns which way it ran, and the OCI runtime with
/// which podman runs containers here, if one does.
fn run_image(
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
fn run_daemon(
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
    let mut args: Vec<String> = pod["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
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
fn podman_runtime(image: &str) -> Result<Option<String>> {
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
fn run_chroot(
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
