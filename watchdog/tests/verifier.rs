//! The kernel programs' verified instruction counts stay within a stated margin of the ones
//! recorded in `watchdog-ebpf/verified-insns.txt`, for both probe sets.
//!
//! The verifier walks every path of a program; a count that grows a lot means a change made
//! the verifier's work (and, on an older kernel or another architecture, the chance of a
//! refusal at a limit) grow with it. A program over its budget fails here, naming the new
//! count: raise the budget in the file on purpose, in the commit that explains why. A program
//! the file does not list fails too, so a new program is budgeted when it lands.

mod common;

use std::{collections::BTreeMap, process::Command};

use common::*;

/// How far above its recorded count a program may go before this test fails.
const MARGIN_PERCENT: u64 = 10;

/// `probe set → program → recorded count`, from the budget file.
fn budgets() -> BTreeMap<(String, String), u64> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../watchdog-ebpf/verified-insns.txt"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "{path}: `{l}` is not `SET PROGRAM COUNT`");
            let n = f[2]
                .parse()
                .unwrap_or_else(|_| panic!("{path}: `{l}`: count"));
            ((f[0].to_string(), f[1].to_string()), n)
        })
        .collect()
}

/// `program name → verified instructions` of every program the daemon pinned a link for.
fn verified_counts(d: &Daemon) -> BTreeMap<String, u64> {
    let mut by_id = BTreeMap::new();
    for e in std::fs::read_dir(&d.state_dir)
        .unwrap()
        .filter_map(Result::ok)
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(program) = name.strip_prefix("link_") else {
            continue;
        };
        let out = Command::new("bpftool")
            .args([
                "link",
                "show",
                "pinned",
                e.path().to_str().unwrap(),
                "--json",
            ])
            .output()
            .expect("bpftool is needed (cargo xtask setup installs it)");
        assert!(out.status.success(), "bpftool link show {name}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        by_id.insert(v["prog_id"].as_u64().unwrap() as u32, program.to_string());
    }
    assert!(by_id.len() >= 4, "too few pinned links: {by_id:?}");
    let mut counts = BTreeMap::new();
    for info in aya::programs::loaded_programs().filter_map(Result::ok) {
        if let Some(program) = by_id.get(&info.id()) {
            let n = info
                .verified_instruction_count()
                .expect("this kernel reports verified_insns (5.16+)");
            counts.insert(program.clone(), u64::from(n));
        }
    }
    assert_eq!(
        counts.len(),
        by_id.len(),
        "every pinned link's program is loaded: {by_id:?} vs {counts:?}"
    );
    counts
}

#[test]
fn verified_instruction_counts_stay_within_their_budget_on_both_probe_sets() {
    let budgets = budgets();
    let mut report = Vec::new();
    let mut over = Vec::new();
    for set in ["sock", "syscalls"] {
        let port = free_port().to_string();
        let d = Daemon::start(&[
            "--port", &port, "--budget", "1s", "--signal", "SIGKILL", "--probes", set,
        ]);
        for (program, n) in verified_counts(&d) {
            let budget = budgets.get(&(set.to_string(), program.clone())).copied();
            report.push(format!("{set} {program} {n} (recorded {budget:?})"));
            match budget {
                Some(b) if n * 100 <= b * (100 + MARGIN_PERCENT) => {}
                _ => over.push(format!("{set} {program} {n}")),
            }
        }
    }
    println!("{}", report.join("\n"));
    assert!(
        over.is_empty(),
        "programs over their recorded verified-instruction count + {MARGIN_PERCENT} % (or not \
         listed) in watchdog-ebpf/verified-insns.txt; if the growth is meant, record these:\n{}",
        over.join("\n")
    );
}
