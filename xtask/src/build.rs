//! Statically linked builds: the container image and the kernel-matrix VMs run them with no libc
//! of their own.

use std::path::PathBuf;

use anyhow::{ensure, Result};

use crate::{cargo_cmd, root, run};

const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds `bin` of `package` in release mode with a static glibc and returns its path.
///
/// The flags are set for the explicit target only, so they reach neither build scripts nor the
/// nested nightly build of the eBPF object.
pub fn static_binary(package: &str, bin: &str) -> Result<PathBuf> {
    let mut cmd = cargo_cmd(&[
        "build",
        "--release",
        "-p",
        package,
        "--bin",
        bin,
        "--target",
        TARGET,
    ]);
    cmd.env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
        "-C target-feature=+crt-static",
    );
    run(&mut cmd)?;
    let path = root().join("target").join(TARGET).join("release").join(bin);
    ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}
