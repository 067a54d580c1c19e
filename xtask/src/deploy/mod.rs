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
//!   DAC_READ_SEARCH) and for the acting thread's realtime class (SYS_NICE) are shown to suffice and to be needed with `setpriv` against a process of
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

mod capabilities;
mod container;
mod kubernetes;
mod systemd;

use capabilities::*;
use container::*;
use kubernetes::*;
use systemd::*;

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
        exposure(&objects, label)?;
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
    steps.done("capabilities for other users' processes and the acting thread: KILL, SYS_PTRACE, DAC_READ_SEARCH, SYS_NICE each needed and enough");

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
/// `cargo xtask image`: one image per architecture (`<tag>-amd64`, `<tag>-arm64`) and the
/// multi-arch OCI index `<tag>` listing both, which a mixed cluster's DaemonSet pulls unchanged.
pub fn image() -> Result<()> {
    setup::ensure_packages(&["podman"])?;
    let index = image_tag();
    let mut images = Vec::new();
    for arch in [build::Arch::X86_64, build::Arch::Aarch64] {
        let binary = build::static_binary_for(arch, "watchdog", "watchdog")?;
        let image = format!("{index}-{}", arch.debian());
        container::build_image_as(&binary, &image, arch)?;
        println!("built {image} (linux/{})", arch.debian());
        images.push(image);
    }
    // The index takes the plain tag: whatever held it (an image of an earlier build, an older
    // index) is untagged first.
    let _ = output(container::podman()?.args(["manifest", "rm", &index]));
    let _ = output(container::podman()?.args(["rmi", &index]));
    checked(container::podman()?.args(["manifest", "create", &index]))?;
    for image in &images {
        checked(container::podman()?.args([
            "manifest",
            "add",
            &index,
            &format!("containers-storage:{image}"),
        ]))?;
    }
    let listed = text(&checked(container::podman()?.args(["manifest", "inspect", &index]))?.stdout);
    let platforms = index_platforms(&listed)?;
    ensure!(
        platforms == ["linux/amd64", "linux/arm64"],
        "the index lists {platforms:?}"
    );
    println!("built {index}: OCI index of {}", platforms.join(", "));
    println!(
        "push it:   podman manifest push --all --format oci {index} docker://REGISTRY/watchdog:{}",
        env!("CARGO_PKG_VERSION")
    );
    println!("or load one on a node: podman save {index}-arm64 | ctr -n k8s.io images import -");
    Ok(())
}

/// The `os/architecture` of each manifest in `podman manifest inspect` output, sorted.
fn index_platforms(inspect: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(inspect).context("manifest inspect")?;
    let mut out: Vec<String> = v["manifests"]
        .as_array()
        .context("no manifests in the index")?
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or("?"),
                m["platform"]["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod index_tests {
    use super::index_platforms;

    #[test]
    fn the_index_platforms_are_read_from_manifest_inspect() {
        let inspect = r#"{"schemaVersion":2,"manifests":[
            {"digest":"sha256:b","platform":{"architecture":"arm64","os":"linux"}},
            {"digest":"sha256:a","platform":{"architecture":"amd64","os":"linux"}}]}"#;
        assert_eq!(
            index_platforms(inspect).unwrap(),
            ["linux/amd64", "linux/arm64"]
        );
        assert!(index_platforms(r#"{"schemaVersion":2}"#).is_err());
    }
}
