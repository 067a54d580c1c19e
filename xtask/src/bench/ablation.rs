//! `cargo xtask bench --only ablation`: where a tracked request's kernel time goes.
//!
//! The daemon is built again from copies of this tree (git worktrees of HEAD, or of the commit
//! before a change) with one piece of the hot path taken out by a textual patch, and every
//! build is measured beside the real one and the floor, turns alternating and rotating: ns/run of
//! the recv and send programs (bpf_stats), nginx under wrk as in part 2. The patched builds are
//! experiments, never shipped: each removes something the daemon needs. A patch whose text no
//! longer matches the tree fails the run, so the figures cannot silently describe other code.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use super::{
    overhead::{cost_turn_on, small_nginx, ProgramCosts},
    sysctl, Daemon, Plan,
};
use crate::{harness::free_port, root};

const REQUEST_RS: &str = "watchdog-ebpf/src/programs/request.rs";

/// One build to measure: from which commit, with which replacements (file, text, new text).
struct Variant {
    name: &'static str,
    what: &'static str,
    /// `None`: this tree as it is.
    commit: Option<&'static str>,
    patch: &'static [(&'static str, &'static str, &'static str)],
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "before",
        what: "the tree before the tracked-path changes of issue 22 (second clock read at a start, registers always looked up)",
        commit: Some("5d3254b"),
        patch: &[],
    },
    Variant {
        name: "no_head_read",
        what: "this tree without the copy of a keep-alive request's first bytes (the first request of a connection still reads them, to find its protocol)",
        commit: None,
        patch: &[(
            REQUEST_RS,
            "let (state, len) = if st.proto == proto::TLS as u32 {",
            "let (state, len) = if st.proto == proto::TLS as u32 || st.gen > 1 {",
        )],
    },
    Variant {
        name: "no_tasks",
        what: "this tree without the owner-table (TASKS) lookup and update of a keep-alive request",
        commit: None,
        patch: &[(
            REQUEST_RS,
            "let life = task_life(tid, now, st.cookie, st.gen);",
            "let life = if st.gen > 1 { now } else { task_life(tid, now, st.cookie, st.gen) };",
        )],
    },
];

pub fn run(plan: &Plan, work: &Path) -> Result<Value> {
    let dir = work.join("ablation");
    std::fs::create_dir_all(dir.join("logs"))?;
    let mut builds: Vec<(&str, &str, PathBuf)> = vec![(
        "this_tree",
        "this tree",
        root().join("target/release/watchdog"),
    )];
    for v in VARIANTS {
        builds.push((v.name, v.what, build(v, &dir)?));
    }

    let port = free_port()?;
    let _nginx = small_nginx(&dir, port)?;
    let config = |watched: u16, extra: &str| {
        format!(
            "[daemon]\nstacks = false\n\n[[policy]]\nname = \"nginx\"\nports = [{watched}]\n\
             budget = \"30s\"\nsignal = \"SIGKILL\"\nmatch = {{ comm = [\"nginx\"] }}\n{extra}"
        )
    };
    // (name, binary, config): the floor, every build watching, and this tree without the
    // `101` read (a config switch, no patch).
    let mut turns: Vec<(String, PathBuf, String, Vec<ProgramCosts>)> = vec![(
        "floor".into(),
        builds[0].2.clone(),
        config(free_port()?, ""),
        vec![],
    )];
    for (name, _, bin) in &builds {
        turns.push((name.to_string(), bin.clone(), config(port, ""), vec![]));
    }
    turns.push((
        "this_tree_upgrades_false".into(),
        builds[0].2.clone(),
        config(port, "upgrades = false\n"),
        vec![],
    ));
    let rounds = plan.rounds.min(3);
    sysctl("kernel.bpf_stats_enabled", "1")?;
    for round in 0..rounds {
        let n = turns.len();
        for k in (0..n).map(|k| (k + round) % n) {
            let (name, bin, cfg, costs) = &mut turns[k];
            let d = Daemon::start_bin(bin, work, &format!("ablation-{name}-{round}"), cfg, &[])?;
            costs.push(cost_turn_on(&d, &dir, port, "/", 32, plan.round_secs)?.0);
        }
    }
    sysctl("kernel.bpf_stats_enabled", "0")?;

    // Per turn and program: the tracked run's ns, from the watched average and the floor of
    // the same round (see `overhead::tracked_path`).
    let floor = &turns[0].3;
    let mut out = serde_json::Map::new();
    for (name, _, _, costs) in &turns[1..] {
        let mut progs = serde_json::Map::new();
        for prog in ["request_enter_recv", "request_exit_send"] {
            let mut tracked = Vec::new();
            let mut floors = Vec::new();
            for (c, f) in costs.iter().zip(floor) {
                let (Some(&(_, (avg, runs))), Some(&(_, (fl, _)))) = (
                    c.iter().find(|(n, _)| *n == prog),
                    f.iter().find(|(n, _)| *n == prog),
                ) else {
                    continue;
                };
                tracked.push(runs * avg - (runs - 1.0) * fl);
                floors.push(fl);
            }
            ensure!(!tracked.is_empty(), "{name}: no runs of {prog}");
            progs.insert(
                prog.into(),
                json!({
                    "tracked_ns": super::percentile(&tracked, 50.0),
                    "floor_ns": super::percentile(&floors, 50.0),
                    "rounds": tracked,
                }),
            );
        }
        out.insert(name.clone(), Value::Object(progs));
    }
    let what: serde_json::Map<String, Value> = builds
        .iter()
        .map(|(n, w, _)| (n.to_string(), json!(w)))
        .collect();
    Ok(json!({
        "rounds": rounds,
        "round_secs": plan.round_secs,
        "builds": what,
        "turns": out,
    }))
}

/// Builds one variant in a worktree of its own; returns the daemon binary.
fn build(v: &Variant, dir: &Path) -> Result<PathBuf> {
    let tree = dir.join(format!("tree-{}", v.name));
    let _ = std::process::Command::new("git")
        .args(["worktree", "remove", "--force"])
        .arg(&tree)
        .current_dir(root())
        .output();
    let commit = v.commit.unwrap_or("HEAD");
    let st = std::process::Command::new("git")
        .args(["worktree", "add", "--detach"])
        .arg(&tree)
        .arg(commit)
        .current_dir(root())
        .status()
        .context("git worktree add")?;
    ensure!(st.success(), "git worktree add {commit} failed");
    for (file, old, new) in v.patch {
        let path = tree.join(file);
        let text = std::fs::read_to_string(&path)?;
        ensure!(
            text.matches(old).count() == 1,
            "{}: the patch for {file} no longer matches the tree: {old:?}",
            v.name
        );
        std::fs::write(&path, text.replacen(old, new, 1))?;
    }
    // One target directory for every variant: the registry crates build once.
    let target = root().join("target/ablation");
    let st = std::process::Command::new("cargo")
        .args(["build", "--release", "-p", "watchdog"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(&tree)
        .status()
        .context("cargo build")?;
    ensure!(st.success(), "{}: build failed", v.name);
    let bin = dir.join(format!("watchdog-{}", v.name));
    std::fs::copy(target.join("release/watchdog"), &bin)?;
    let _ = std::process::Command::new("git")
        .args(["worktree", "remove", "--force"])
        .arg(&tree)
        .current_dir(root())
        .output();
    Ok(bin)
}

/// The Markdown section of BENCHMARKS.md for these results.
pub fn summary(r: &Value) -> String {
    let mut md = String::from(
        "| build | what it is | recv tracked ns/run | send tracked ns/run |\n|---|---|---|---|\n",
    );
    let t = &r["turns"];
    let row = |name: &str, what: &str| {
        let p = |prog: &str| t[name][prog]["tracked_ns"].as_f64().unwrap_or(f64::NAN);
        format!(
            "| `{name}` | {what} | {:.0} | {:.0} |\n",
            p("request_enter_recv"),
            p("request_exit_send")
        )
    };
    md.push_str(&row("this_tree", "this tree, as shipped"));
    md.push_str(&row(
        "this_tree_upgrades_false",
        "this tree, `upgrades = false` (answers not read for a `101`)",
    ));
    if let Some(builds) = r["builds"].as_object() {
        for (name, what) in builds {
            if name != "this_tree" {
                md.push_str(&row(name, what.as_str().unwrap_or("")));
            }
        }
    }
    let floor = |prog: &str| {
        t["this_tree"][prog]["floor_ns"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    md.push_str(&format!(
        "\nFloor (the same programs on a socket nobody watches, same rounds): recv {:.0}, send {:.0} ns/run. {} rounds of {} s, medians; tracked = runs per request × average − (runs − 1) × floor.\n",
        floor("request_enter_recv"),
        floor("request_exit_send"),
        r["rounds"],
        r["round_secs"]
    ));
    md
}
