//! `cargo xtask test`: the test pipeline as an explicit list of named stages.
//!
//! With no selection every stage of [`FULL`] runs, in that order; `--vm`, `--fuzz`, `--deploy`,
//! `--prometheus` (or `--stage NAME`, repeatable) select stages instead, still in pipeline order,
//! after the stages they need. The first failing stage stops the run (later stages build on
//! earlier ones), and either way the run prints every stage's time and outcome and removes every
//! bpffs pin prefix its daemons made (see `harness::PIN_PREFIXES`).

use std::time::Instant;

use anyhow::{Context, Result};

use crate::{bench, cargo, cargo_cmd, deploy, fuzz, harness, prometheus, run, setup, soak, vm};

/// One step of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Stage {
    /// Nightly rust-src and bpf-linker (every selection starts here).
    Toolchain,
    /// The Debian and PyPI packages of the end-to-end tests; stale pins of dead runs removed.
    Packages,
    /// `target/release/watchdog`, whose eBPF object later profiles reuse.
    Release,
    /// Unit and property tests: no root needed, run in parallel.
    Unit,
    /// Every end-to-end test with the sock probe set (the default on this kernel).
    E2eSock,
    /// The real-server scenarios again with the syscall probe set (kernels before 6.3).
    E2eSyscalls,
    /// Debian's 6.1 and 6.12 kernels under QEMU.
    Vm,
    /// Debian's arm64 6.1 and 6.12 kernels under QEMU (TCG), with the cross-built aarch64
    /// daemon: a stage of its own because its cold cross-build (every aarch64 dependency, the
    /// eBPF object for arm64) took 5.5 min here, more than the 4 min a `vm` addition may cost;
    /// warm, the stage takes about a minute (two guests, 19 s and 39 s).
    VmArm64,
    /// Manifests, unit file and image (includes the Prometheus checks).
    Deploy,
    /// deploy/prometheus only: promtool, then a real Prometheus scraping a real daemon.
    Prometheus,
    /// Each fuzz target for the chosen number of seconds.
    Fuzz,
    /// The benchmarks at a small size, so their code cannot rot.
    Bench,
    /// One minute of mixed traffic, books asserted.
    Soak,
}

use Stage::*;

/// The full run, in order.
pub const FULL: &[Stage] = &[
    Toolchain,
    Packages,
    Release,
    Unit,
    E2eSock,
    E2eSyscalls,
    Vm,
    // `VmArm64` (`--stage vm-arm64`) is not in the default run: it needs the aarch64 musl
    // standard library from static.rust-lang.org (`rustup target add`), which CI's network
    // (package registries only) may not reach, and a cold cross-build of about 5.5 minutes.
    Deploy,
    Fuzz,
    Bench,
    Soak,
];

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Toolchain => "toolchain",
            Packages => "test packages",
            Release => "release build",
            Unit => "unit and property tests",
            E2eSock => "end-to-end, sock probe set",
            E2eSyscalls => "end-to-end, syscalls probe set",
            Vm => "kernel matrix (QEMU)",
            VmArm64 => "kernel matrix, arm64 (QEMU)",
            Deploy => "deploy",
            Prometheus => "prometheus",
            Fuzz => "fuzz",
            Bench => "bench --quick",
            Soak => "soak, 1 minute",
        }
    }

    /// Stages this one cannot run without (beyond `Toolchain`, which every selection has).
    fn needs(self) -> &'static [Stage] {
        match self {
            Unit | E2eSock | E2eSyscalls => &[Packages, Release],
            Prometheus => &[Release],
            _ => &[],
        }
    }

    fn run(self, fuzz_seconds: u32) -> Result<()> {
        match self {
            Toolchain => setup::toolchain(),
            Packages => {
                setup::test_packages()?;
                harness::remove_stale_pins()
            }
            Release => {
                cargo(&["build", "--release", "-p", "watchdog"])?;
                crate::reuse_ebpf_object()
            }
            Unit => cargo(&[
                "test",
                "--workspace",
                "--exclude",
                "watchdog-ebpf",
                "--bins",
                "--lib",
            ]),
            // End-to-end tests share the kernel (one cgroup attach point, real ports): one at a
            // time.
            E2eSock => run(cargo_cmd(&[
                "test",
                "-p",
                "watchdog",
                "--test",
                "*",
                "--",
                "--test-threads=1",
            ])
            .env("RUST_BACKTRACE", "1")),
            // Forced on this kernel so both sets are tested on every run.
            E2eSyscalls => run(cargo_cmd(&[
                "test",
                "-p",
                "watchdog",
                "--test",
                "core",
                "--test",
                "client_gone",
                "--test",
                "policies",
                "--test",
                "endpoints",
                "--test",
                "grpc",
                "--test",
                "mariadb",
                "--test",
                "handoff",
                "--test",
                "slow_clients",
                "adopt",
                "--",
                "--test-threads=1",
            ])
            .env("RUST_BACKTRACE", "1")
            .env("WATCHDOG_PROBES", "syscalls")),
            Vm => vm::test(crate::build::Arch::X86_64),
            VmArm64 => vm::test(crate::build::Arch::Aarch64),
            Deploy => deploy::check(),
            Prometheus => prometheus::check(&crate::root().join("target/release/watchdog")),
            Fuzz => fuzz::test(fuzz_seconds),
            Bench => bench::bench(true, None),
            Soak => soak::soak(1),
        }
    }
}

/// The stages to run: all of [`FULL`] when nothing is chosen, else `Toolchain`, the chosen
/// stages and what they need, each once, in pipeline order.
pub fn select(chosen: &[Stage]) -> Vec<Stage> {
    if chosen.is_empty() {
        return FULL.to_vec();
    }
    let mut out = vec![Toolchain];
    for s in chosen {
        out.extend(s.needs());
        out.push(*s);
    }
    out.sort();
    out.dedup();
    out
}

/// How one stage ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Passed(u64),
    Failed(u64),
    NotRun,
}

/// Runs `stages` in order until one fails, prints every stage's time and outcome, and removes
/// the pins its daemons left, pass or fail.
pub fn test(stages: &[Stage], fuzz_seconds: u32) -> Result<()> {
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let mut failure = None;
    for &stage in stages {
        if failure.is_some() {
            outcomes.push((stage, Outcome::NotRun));
            continue;
        }
        println!("xtask test: stage `{}`", stage.name());
        let t = Instant::now();
        let r = stage.run(fuzz_seconds);
        let secs = t.elapsed().as_secs();
        match r {
            Ok(()) => outcomes.push((stage, Outcome::Passed(secs))),
            Err(e) => {
                outcomes.push((stage, Outcome::Failed(secs)));
                failure = Some((stage, e));
            }
        }
    }
    let cleaned = harness::remove_pins(true);
    print!("{}", report(&outcomes));
    let total = started.elapsed().as_secs();
    match failure {
        Some((stage, e)) => {
            println!(
                "xtask test: stage `{}` FAILED after {total} s",
                stage.name()
            );
            Err(e).with_context(|| format!("test stage `{}`", stage.name()))
        }
        None => {
            cleaned.context("removing the pins of this run")?;
            println!(
                "xtask test: all {} stages passed in {total} s",
                stages.len()
            );
            Ok(())
        }
    }
}

fn report(outcomes: &[(Stage, Outcome)]) -> String {
    outcomes
        .iter()
        .map(|(stage, o)| match o {
            Outcome::Passed(s) => format!("xtask test: {s:>4} s  {}\n", stage.name()),
            Outcome::Failed(s) => format!("xtask test: {s:>4} s  {}  FAILED\n", stage.name()),
            Outcome::NotRun => format!("xtask test:    - s  {}  not run\n", stage.name()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_chosen_is_the_full_run_and_a_choice_brings_what_it_needs() {
        assert_eq!(select(&[]), FULL);
        assert_eq!(select(&[Vm]), [Toolchain, Vm]);
        assert_eq!(select(&[Prometheus]), [Toolchain, Release, Prometheus]);
        // Pipeline order whatever the order asked, each stage once.
        assert_eq!(
            select(&[Fuzz, Vm, E2eSock, Unit]),
            [Toolchain, Packages, Release, Unit, E2eSock, Vm, Fuzz]
        );
    }

    #[test]
    fn the_report_names_every_stage_and_the_failed_one() {
        let text = report(&[
            (Toolchain, Outcome::Passed(1)),
            (Unit, Outcome::Failed(42)),
            (Soak, Outcome::NotRun),
        ]);
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.contains("  42 s  unit and property tests  FAILED"),
            "{text}"
        );
        assert!(text.contains("soak, 1 minute  not run"), "{text}");
    }

    #[test]
    fn the_full_run_is_in_pipeline_order() {
        let mut sorted = FULL.to_vec();
        sorted.sort();
        assert_eq!(sorted, FULL);
    }
}
