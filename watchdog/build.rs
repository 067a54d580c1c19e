//! Compiles `watchdog-ebpf` for the BPF target (nightly + bpf-linker, BTF on) so the daemon can
//! embed the object. `cargo xtask build` installs what this needs on a fresh machine.
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "watchdog-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../watchdog-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}
