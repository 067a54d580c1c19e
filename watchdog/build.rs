//! Compiles `watchdog-ebpf` for the BPF target (nightly + bpf-linker, BTF on) so the daemon can
//! embed the object. `cargo xtask build` installs what this needs on a fresh machine.
//!
//! `WATCHDOG_EBPF_OBJECT` names an object built already (by this script, in another profile):
//! it is copied instead of built again. `cargo xtask test` sets it for its test-profile and static
//! builds after its release build, which saves two 30-second nested builds of the same bytes.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=WATCHDOG_EBPF_OBJECT");
    if let Some(object) = std::env::var_os("WATCHDOG_EBPF_OBJECT") {
        println!("cargo:rerun-if-changed={}", object.to_string_lossy());
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
        std::fs::copy(&object, out.join("watchdog"))?;
        return Ok(());
    }
    // The kernel programs are built from watchdog-common's sources too; aya-build watches
    // only the eBPF crate's own.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../watchdog-common/src")
    );
    let package = aya_build::Package {
        name: "watchdog-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../watchdog-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}
