//! `cargo xtask test --fuzz [--seconds N]`: runs each cargo-fuzz target of watchdog/fuzz for a
//! bounded time (libFuzzer, nightly), starting from the seeds in watchdog/fuzz/seeds/<target>.
//! New corpus entries go under target/fuzz-corpus, never into the repository.

use std::{fs, process::Command};

use anyhow::{Context, Result};

use crate::{cargo_cmd, root, run};

const TARGETS: &[&str] = &["config", "event"];

pub fn test(seconds: u32) -> Result<()> {
    ensure_cargo_fuzz()?;
    for target in TARGETS {
        let corpus = root().join("target/fuzz-corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let seeds = root().join("watchdog/fuzz/seeds").join(target);
        // The rustup proxy, not $CARGO: `+nightly` picks the toolchain libFuzzer needs.
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root())
            .env("PATH", crate::setup::path_with_cargo_bin())
            .args([
                "+nightly",
                "fuzz",
                "run",
                // No AddressSanitizer: the targets are safe Rust, looking for panics and hangs;
                // the instrumented build took 85 s against 60 s without it.
                "--sanitizer",
                "none",
                "--fuzz-dir",
                "watchdog/fuzz",
                target,
            ])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1");
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        run(&mut cmd).with_context(|| format!("fuzz target {target} found a failure"))?;
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env("PATH", crate::setup::path_with_cargo_bin())
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        run(&mut cargo_cmd(&["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}
