//! Project automation: `cargo xtask build | run | test | setup | soak | image`.
//!
//! Every command first makes sure this machine has what it needs (nightly rust-src, bpf-linker,
//! and, for tests as root, the Debian packages the real-server tests use), so a fresh machine
//! needs nothing but `cargo xtask test`.

mod bench;
mod build;
mod deploy;
mod fuzz;
mod harness;
mod prometheus;
mod setup;
mod soak;
mod test;
mod vm;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "watchdog project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces (and, as root, the test packages) this machine lacks.
    Setup,
    /// Build a self-contained target/release/watchdog; with `--target aarch64` (or arm64) a
    /// static target/aarch64-unknown-linux-musl/release/watchdog, cross-built from here.
    Build {
        #[arg(long, value_enum)]
        target: Option<build::Arch>,
    },
    /// Build and run the daemon as root: `cargo xtask run -- run --port 8080 --budget 2s`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks against real servers; writes bench/results and BENCHMARKS.md.
    Bench {
        /// Every part at a small size (under two minutes), to keep the code working.
        #[arg(long)]
        quick: bool,
        /// One part only (overhead, routes, lateness, scale, stacks); results stay under target/.
        #[arg(long)]
        only: Option<String>,
    },
    /// Mixed traffic against the real daemon for N minutes, then check every books balance.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Run every test: unit and property tests, then the privileged end-to-end tests, the
    /// kernel matrix, deploy/, fuzz, bench --quick and a soak. The flags below select stages
    /// instead (any combination; pipeline order is kept).
    Test {
        /// The kernel matrix: boot Debian's 6.1 and 6.12 kernels, amd64 and arm64, under QEMU and
        /// run the core scenarios inside (`--stage vm` / `--stage vm-arm64`: one architecture).
        #[arg(long)]
        vm: bool,
        /// The fuzz targets (cargo-fuzz, nightly), each for `--seconds`.
        #[arg(long)]
        fuzz: bool,
        /// Time per fuzz target (default 30 s with `--fuzz`, 10 s in the full run).
        #[arg(long)]
        seconds: Option<u32>,
        /// The deploy/ checks: manifests rendered, validated and scanned, the ConfigMap's
        /// policy loaded by the daemon, the systemd unit verified, the image built and run.
        #[arg(long)]
        deploy: bool,
        /// deploy/prometheus only: promtool checks and unit tests, then a real Prometheus
        /// scraping a real daemon (also part of `--deploy`).
        #[arg(long)]
        prometheus: bool,
        /// Any stage by name (repeatable), e.g. `--stage unit --stage e2e-sock`.
        #[arg(long, value_enum)]
        stage: Vec<test::Stage>,
    },
    /// Build the container image (static binary, FROM scratch) with podman.
    Image,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => {
            setup::toolchain()?;
            setup::test_packages()
        }
        Cmd::Build { target: None } => {
            setup::toolchain()?;
            cargo(&["build", "--release", "-p", "watchdog"])
        }
        Cmd::Build { target: Some(arch) } => {
            setup::toolchain()?;
            let path = build::static_binary_for(arch, "watchdog", "watchdog")?;
            println!("{}", path.display());
            Ok(())
        }
        Cmd::Run { args } => {
            setup::toolchain()?;
            cargo(&["build", "--release", "-p", "watchdog"])?;
            let args = if args.is_empty() {
                vec!["run".to_string()]
            } else {
                args
            };
            run(Command::new(root().join("target/release/watchdog")).args(&args))
        }
        Cmd::Bench { quick, only } => {
            setup::toolchain()?;
            bench::bench(quick, only.as_deref())
        }
        Cmd::Image => {
            setup::toolchain()?;
            deploy::image()
        }
        Cmd::Soak { minutes } => {
            setup::toolchain()?;
            soak::soak(minutes)
        }
        Cmd::Test {
            vm,
            fuzz,
            seconds,
            deploy,
            prometheus,
            mut stage,
        } => {
            for (on, s) in [
                (vm, test::Stage::Vm),
                (vm, test::Stage::VmArm64),
                (fuzz, test::Stage::Fuzz),
                (deploy, test::Stage::Deploy),
                (prometheus, test::Stage::Prometheus),
            ] {
                if on {
                    stage.push(s);
                }
            }
            let seconds = seconds.unwrap_or(if fuzz { 30 } else { 10 });
            test::test(&test::select(&stage), seconds)
        }
    }
}

pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn cargo_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args).current_dir(root());
    c.env("PATH", setup::path_with_cargo_bin());
    // Test-profile and static builds reuse the eBPF object of the release build (see
    // `reuse_ebpf_object`); plain release builds never do, so they never rebuild for it.
    if let Some(object) = EBPF_OBJECT.get() {
        // Only x86_64 builds: the object of another target carries another syscall ABI.
        if args.first() == Some(&"test") || args.contains(&"x86_64-unknown-linux-gnu") {
            c.env("WATCHDOG_EBPF_OBJECT", object);
        }
    }
    c
}

/// The eBPF object of the last release build, copied out of its build directory.
static EBPF_OBJECT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// After a release build: keep its eBPF object so later builds in other profiles copy it
/// (`watchdog/build.rs`) instead of running the nested nightly build again (~30 s each).
fn reuse_ebpf_object() -> Result<()> {
    let built = std::fs::read_dir(root().join("target/release/build"))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("watchdog-"))
        .map(|e| e.path().join("out/watchdog"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .context("no eBPF object under target/release/build after the release build")?;
    let keep = root().join("target/ebpf-object/watchdog");
    std::fs::create_dir_all(keep.parent().unwrap())?;
    std::fs::copy(&built, &keep)?;
    let _ = EBPF_OBJECT.set(keep);
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    run(&mut cargo_cmd(args))
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
