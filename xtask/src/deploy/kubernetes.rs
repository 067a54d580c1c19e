//! deploy/kubernetes: the kustomize renderings validated against Kubernetes schemas (and a
//! broken copy refused), the operator overlay, what the DaemonSet really reads (args, mount,
//! ConfigMap), the observe overlay's policy, and checkov with its waivers.

use super::*;

/// kubectl from the machine (its package is not in Debian's archive; Debian's
/// `kubernetes-client` is an old kubectl with an old kustomize, tried when there is none).
pub(super) fn kubectl() -> Result<PathBuf> {
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
pub(super) fn pip_tools() -> Result<()> {
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

pub(super) fn validate(file: &Path, version: &str) -> Result<()> {
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
pub(super) fn validator_rejects_a_broken_manifest(file: &Path) -> Result<()> {
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
pub(super) fn yaml_to_json(file: &Path) -> Result<Vec<Value>> {
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
pub(super) fn operator_overlay(kubectl: &Path, deploy: &Path) -> Result<()> {
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

pub(super) fn daemonset(objects: &[Value]) -> Result<&Value> {
    objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .context("no DaemonSet rendered")
}

/// The policy TOML the DaemonSet really reads, and the path it reads it from, after checking
/// that the pieces agree (args, mount, ConfigMap name and key) and the pod keeps its promises.
pub(super) fn manifest_facts(objects: &[Value], label: &str) -> Result<(String, PathBuf)> {
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

/// What the DaemonSet exposes (issue 28): metrics bound to an address the downward API gives
/// (never all addresses), and a NetworkPolicy that admits the metrics port only from the
/// monitoring namespace and lets nothing out.
pub(super) fn exposure(objects: &[Value], label: &str) -> Result<()> {
    let c = &daemonset(objects)?["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .context("container has no args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let addr = args
        .windows(2)
        .find(|w| w[0] == "--metrics-addr")
        .map(|w| w[1])
        .with_context(|| {
            format!("{label}: no --metrics-addr: the metrics would listen where the TOML says")
        })?;
    let var = addr
        .trim_start_matches('[')
        .strip_prefix("$(")
        .and_then(|rest| rest.split_once(')'))
        .map(|(name, _)| name)
        .with_context(|| {
            format!("{label}: --metrics-addr {addr} is not an address from the downward API")
        })?;
    let field = c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == var)
        .and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
        .with_context(|| format!("{label}: {var} is not set from a fieldRef"))?;
    ensure!(
        field == "status.podIP" || field == "status.hostIP",
        "{label}: {var} comes from {field}, not the pod's or node's address"
    );
    let np = objects
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy")
        .with_context(|| format!("{label}: no NetworkPolicy rendered"))?;
    let spec = &np["spec"];
    ensure!(
        spec["egress"] == serde_json::json!([]),
        "{label}: the NetworkPolicy allows egress"
    );
    let rules = spec["ingress"]
        .as_array()
        .with_context(|| format!("{label}: the NetworkPolicy has no ingress rules"))?;
    for rule in rules {
        let from = rule["from"]
            .as_array()
            .filter(|f| !f.is_empty())
            .with_context(|| format!("{label}: an ingress rule admits every source: {rule}"))?;
        for peer in from {
            ensure!(
                peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                    == "monitoring"
                    && peer.get("ipBlock").is_none(),
                "{label}: an ingress source other than the monitoring namespace: {peer}"
            );
        }
        ensure!(
            rule["ports"] == serde_json::json!([{"protocol": "TCP", "port": 9477}]),
            "{label}: ingress to ports other than 9477: {rule}"
        );
    }
    Ok(())
}

pub(super) fn config_only(binary: &Path, file: &Path) -> Result<()> {
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
pub(super) fn overlay_is_base_in_observe_mode(base: &str, observe: &str) -> Result<()> {
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
pub(super) fn waivers(config: &Path) -> Result<Vec<(String, String)>> {
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

pub(super) fn checkov(dir: &Path) -> Result<()> {
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
