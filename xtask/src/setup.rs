//! Installs what a fresh machine lacks. Each step checks first and does nothing when satisfied.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::run;

/// Debian packages the end-to-end tests drive for real (bpftool: kernel links in
/// `tests/interrupt.rs`; prometheus and promtool: the deploy stage's rules and dashboard; the
/// servers of `tests/recipes.rs`: uWSGI with its Python plugin, Go, PHP-FPM, Node.js, a JDK).
const TEST_PACKAGES: &[&str] = &[
    "nginx",
    "haproxy",
    "postgresql",
    "curl",
    "gcc",
    "binutils",
    "iproute2",
    "bpftool",
    "prometheus",
    "uwsgi-core",
    "uwsgi-plugin-python3",
    "golang-go",
    "php-fpm",
    "nodejs",
    "openjdk-17-jdk-headless",
    // tests/mariadb.rs: its own mariadbd (mariadb-install-db) and the `mariadb` client.
    "mariadb-server",
    "mariadb-client",
];
/// Python client and server libraries of the end-to-end tests (PyPI), pinned; gunicorn and
/// uvicorn are servers of `tests/recipes.rs`.
const PYTHON_PACKAGES: &[&str] = &[
    "websockets==17.4",
    "grpcio==1.85.3",
    "gevent==26.9.0",
    "gunicorn==27.0.1",
    "uvicorn==0.54.0",
    "packaging==26.3", // gunicorn's gevent worker imports it without depending on it
];

fn home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
}

pub fn path_with_cargo_bin() -> String {
    let bin = home().join(".cargo/bin");
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Nightly rust-src (the eBPF crate builds core itself) and bpf-linker linked against the LLVM
/// that ships inside the nightly toolchain (a plain `cargo install bpf-linker` wants a system
/// LLVM this machine does not have).
pub fn toolchain() -> Result<()> {
    python()?;
    nightly()?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is required for the eBPF crate")?;
    let sysroot = PathBuf::from(sysroot);
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("xtask: installing rust-src for nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = home().join(".cargo/bin/bpf-linker");
    if !linker.exists()
        && Command::new("bpf-linker")
            .arg("--version")
            .output()
            .is_err()
    {
        let llvm_major = output(Command::new("rustc").args(["+nightly", "-vV"]))?
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .and_then(|v| v.split('.').next().map(str::to_string))
            .context("reading nightly's LLVM version")?;
        let prefix = home().join(".local/bpf-llvm");
        std::fs::create_dir_all(prefix.join("lib"))?;
        let lib = std::fs::read_dir(sysroot.join("lib"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so"))
            })
            .context("no libLLVM.so in the nightly toolchain")?;
        let link = prefix.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
        eprintln!(
            "xtask: building bpf-linker against nightly's LLVM {llvm_major} (about a minute)"
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{llvm_major}"))
            .env("LLVM_PREFIX", &prefix))?;
    }
    Ok(())
}

/// The nightly the eBPF crate is known to build with: rustc 1.97, LLVM 22 (aya-ebpf 0.2.1, and
/// bpf-linker's `llvm-22` feature). A newer nightly may carry an LLVM bpf-linker has no feature
/// for, so a machine without `nightly` gets this one.
const NIGHTLY_DATE: &str = "2026-05-19";

/// The eBPF object is shaped for the verifier by this one compiler (its LLVM decides the
/// instruction sequences `watchdog-ebpf/verified-insns.txt` budgets): a `nightly` of another
/// date fails the build here, naming the fix, instead of producing programs nobody verified.
fn pinned_nightly() -> Result<()> {
    let v = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let date = v
        .lines()
        .find_map(|l| l.strip_prefix("commit-date: "))
        .unwrap_or("unknown");
    if date != NIGHTLY_DATE {
        bail!(
            "`nightly` is rustc {date}, but the eBPF crate is built and verified with \
             nightly-{NIGHTLY_DATE}: install that one and make `nightly` name it (`rustup \
             toolchain install nightly-{NIGHTLY_DATE} --profile minimal --component rust-src`), \
             or, to try another on purpose, change `NIGHTLY_DATE` in xtask/src/setup.rs and \
             re-record watchdog-ebpf/verified-insns.txt"
        );
    }
    Ok(())
}

/// `rustc +nightly` works, or the pinned nightly is installed (with rust-src) from
/// static.rust-lang.org and made what `nightly` names; fails naming the fix when it cannot be.
fn nightly() -> Result<()> {
    let works = || {
        Command::new("rustc")
            .args(["+nightly", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works() {
        return pinned_nightly();
    }
    let dated = format!("nightly-{NIGHTLY_DATE}");
    let fix = format!(
        "install it where static.rust-lang.org is reachable: `rustup toolchain install {dated} \
         --profile minimal --component rust-src`, then make `nightly` name it: `ln -s \
         {dated}-x86_64-unknown-linux-gnu ~/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu`"
    );
    if Command::new("rustup").arg("--version").output().is_err() {
        bail!("no nightly toolchain and no rustup (https://rustup.rs) to install one: {fix}");
    }
    eprintln!("xtask: installing {dated} with rust-src (the eBPF crate's toolchain)");
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        &dated,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
    .with_context(|| format!("installing {dated} failed (no network?): {fix}"))?;
    // rustup has no toolchain aliases and refuses `nightly` as a custom name: `+nightly`
    // resolves to toolchains/nightly-<host>, so point that at the dated install.
    let rustup_home = std::env::var("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| home().join(".rustup"));
    let host = "x86_64-unknown-linux-gnu";
    let link = rustup_home.join(format!("toolchains/nightly-{host}"));
    if !link.exists() {
        std::os::unix::fs::symlink(format!("{dated}-{host}"), &link)
            .with_context(|| format!("linking {}: {fix}", link.display()))?;
    }
    if !works() {
        bail!("installed {dated}, but `rustc +nightly` still fails: {fix}");
    }
    pinned_nightly()
}

/// python3 runs the test servers (watchdog/tests/fixtures), pip installs their libraries, and
/// the deploy stage keeps its tools in a venv: installed from Debian when missing (as root), or
/// a failure naming the packages.
fn python() -> Result<()> {
    let has = |args: &[&str]| {
        Command::new("python3")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has(&["-c", "import venv, ensurepip"]) && has(&["-m", "pip", "--version"]) {
        return Ok(());
    }
    ensure_packages(&["python3", "python3-pip", "python3-venv"])
        .context("python3 with pip and venv is needed by the tests")?;
    if !has(&["-m", "pip", "--version"]) {
        bail!("python3 -m pip still fails after installing python3-pip: install pip for the python3 on PATH");
    }
    Ok(())
}

/// The Debian packages of the end-to-end tests (only as root, only when missing).
pub fn test_packages() -> Result<()> {
    python_packages()?;
    if !ensure_packages(TEST_PACKAGES)? {
        return Ok(());
    }
    // Debian starts the services it installs; the tests run their own instances.
    for svc in [
        "nginx",
        "haproxy",
        "postgresql",
        "prometheus",
        "php8.2-fpm",
        "mariadb",
    ] {
        let _ = Command::new("service").args([svc, "stop"]).output();
    }
    Ok(())
}

/// Installs the pinned PyPI packages the tests import, unless that exact version is there.
fn python_packages() -> Result<()> {
    let missing: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .copied()
        .filter(|spec| {
            let (name, version) = spec.split_once("==").expect("pinned as name==version");
            let probe = format!(
                "import importlib.metadata as m; assert m.version({name:?}) == {version:?}"
            );
            !Command::new("python3")
                .args(["-c", &probe])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} from PyPI", missing.join(" "));
    run(Command::new("python3")
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(&missing)
        // Debian's own python3 refuses pip installs outside a venv (PEP 668) unless told.
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1"))
}

/// Installs the Debian packages of `list` that are missing; true if it installed any.
pub fn ensure_packages(list: &[&str]) -> Result<bool> {
    let missing: Vec<&str> = list
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    if !nix_is_root() {
        bail!(
            "the end-to-end tests need root and these packages: {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(true)
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
