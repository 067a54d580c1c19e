//! Statically linked builds: the container image and the kernel-matrix VMs run them with no libc
//! of their own. x86_64 links a static glibc; aarch64 is cross-built from this machine as
//! `aarch64-unknown-linux-musl` (Rust's self-contained musl, linked by `rust-lld`: no C
//! cross-toolchain needed, nothing in the dependency tree compiles C).

use std::{path::PathBuf, process::Command};

use anyhow::{ensure, Context, Result};

use crate::{cargo_cmd, root, run};

/// The architectures the daemon is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    #[value(alias = "amd64", alias = "x86-64")]
    X86_64,
    #[value(alias = "arm64")]
    Aarch64,
}

impl Arch {
    pub fn triple(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }
    /// Debian's and OCI's name for it.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
}

/// Builds `bin` of `package` in release mode, statically linked, for x86_64.
pub fn static_binary(package: &str, bin: &str) -> Result<PathBuf> {
    static_binary_for(Arch::X86_64, package, bin)
}

/// Builds `bin` of `package` in release mode, statically linked, for `arch`; returns its path
/// (target/<triple>/release/<bin>).
///
/// The flags are set for the explicit target only, so they reach neither build scripts nor the
/// nested nightly build of the eBPF object. The eBPF object follows the target: aya-build passes
/// the target's architecture to the kernel programs (their syscall ABI), so an aarch64 build
/// never reuses the x86_64 object (`cargo_cmd` hands it only to x86_64 builds).
pub fn static_binary_for(arch: Arch, package: &str, bin: &str) -> Result<PathBuf> {
    let triple = arch.triple();
    if arch == Arch::Aarch64 {
        add_rust_target(triple)?;
    }
    let mut cmd = cargo_cmd(&[
        "build",
        "--release",
        "-p",
        package,
        "--bin",
        bin,
        "--target",
        triple,
    ]);
    match arch {
        Arch::X86_64 => cmd.env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        ),
        // musl targets link statically by default.
        Arch::Aarch64 => cmd
            .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER", "rust-lld")
            .env_remove("WATCHDOG_EBPF_OBJECT"),
    };
    run(&mut cmd)?;
    let path = root().join("target").join(triple).join("release").join(bin);
    ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}

/// `rustup target add` (quick when it is there already).
fn add_rust_target(triple: &str) -> Result<()> {
    let list = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup")?;
    if String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.trim() == triple)
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", triple]))
}
