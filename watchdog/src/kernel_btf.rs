//! What the running kernel offers, read from its BTF: which probe set it supports, and the struct
//! offsets the syscall set needs (aya has no CO-RE for Rust programs, so they are resolved here
//! and written into the eBPF object's read-only globals at load time).
//!
//! The compat table (which program runs where) lives in `PROGRAMS`; ARCHITECTURE.md shows it.

use std::path::Path;

use btf_rs::{Btf, Type};
use watchdog_common::{names, probes, probes::KernelOffsets};

use crate::config::Probes;

/// Errors reading the kernel's BTF.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("the kernel's BTF has no {what}")]
    Missing { what: String },
    #[error("the sock probe set needs the sock_recv_length/sock_send_length tracepoints (Linux 6.3+); this kernel lacks them: use --probes syscalls or auto")]
    NoSockTracepoints,
    #[error(
        "the kernel programs know the syscall registers of x86_64 and aarch64 only; this is {0}"
    )]
    UnsupportedArch(&'static str),
    #[error("the kernel saves a syscall's registers elsewhere than the programs read them: struct pt_regs member {member} is at byte {found}, the programs read byte {expected}")]
    RegsLayout {
        member: &'static str,
        expected: u32,
        found: u32,
    },
}

/// Where the kernel programs of this build read a syscall's number and arguments in `struct
/// pt_regs` (watchdog-ebpf/src/programs/abi/<arch>.rs, chosen by the same target): checked against
/// the running kernel's BTF before anything loads, so a kernel that moved them fails loudly
/// instead of the programs reading the wrong words.
#[cfg(target_arch = "x86_64")]
pub const PT_REGS: &[(&str, u32)] = &[
    ("orig_ax", 15 * 8),
    ("di", 14 * 8),
    ("si", 13 * 8),
    ("dx", 12 * 8),
    ("r10", 7 * 8),
];
/// As above: `regs[1..=3]` are words 1..=3 of the array at 0; `orig_x0` is the first argument
/// at exit, `syscallno` an s32.
#[cfg(target_arch = "aarch64")]
pub const PT_REGS: &[(&str, u32)] = &[("regs", 0), ("orig_x0", 34 * 8), ("syscallno", 35 * 8)];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const PT_REGS: &[(&str, u32)] = &[];

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The probe set actually in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeSet {
    Sock,
    Syscalls,
}

impl ProbeSet {
    pub fn label(self) -> &'static str {
        match self {
            ProbeSet::Sock => "sock",
            ProbeSet::Syscalls => "syscalls",
        }
    }
    /// The value of the eBPF object's `PROBE_SET` global.
    pub fn id(self) -> u32 {
        match self {
            ProbeSet::Sock => probes::SOCK,
            ProbeSet::Syscalls => probes::SYSCALLS,
        }
    }
}

/// Which programs are loaded, on which hook, for which set, and from which kernel.
pub struct ProgramSpec {
    pub program: &'static str,
    pub hook: &'static str,
    /// `None`: both sets.
    pub set: Option<ProbeSet>,
    /// The first Linux release with the hook.
    pub since: &'static str,
}

/// The compat table. Every program is a sock_ops program, a BTF tracepoint or a BPF iterator
/// (`iter/...`, run by the daemon): no kprobes, no fentry. BTF tracepoints need BTF (5.5+), `bpf_timer` needs 5.15, `PIDFD_THREAD` 6.9
/// (`tgkill` before).
pub const PROGRAMS: &[ProgramSpec] = &[
    ProgramSpec {
        program: names::PROG_SOCK_OPS,
        hook: "sock_ops (cgroup v2 root)",
        set: None,
        since: "5.15",
    },
    ProgramSpec {
        program: names::PROG_TASK_EXIT,
        hook: names::TP_TASK_EXIT,
        set: None,
        since: "5.15",
    },
    ProgramSpec {
        program: names::PROG_TASK_EXEC,
        hook: names::TP_TASK_EXEC,
        set: None,
        since: "5.15",
    },
    ProgramSpec {
        program: names::PROG_RESET,
        hook: names::TP_RESET,
        set: None,
        since: "5.15",
    },
    ProgramSpec {
        program: names::PROG_ADOPT,
        hook: names::ITER_TCP,
        set: None,
        since: "5.15",
    },
    ProgramSpec {
        program: names::PROG_ADOPTED_STATE,
        hook: names::TP_SET_STATE,
        set: None,
        since: "5.15",
    },
    ProgramSpec {
        program: names::PROG_RECV,
        hook: names::TP_RECV,
        set: Some(ProbeSet::Sock),
        since: "6.3",
    },
    ProgramSpec {
        program: names::PROG_SEND,
        hook: names::TP_SEND,
        set: Some(ProbeSet::Sock),
        since: "6.3",
    },
    ProgramSpec {
        program: names::PROG_SYS_EXIT,
        hook: names::TP_SYS_EXIT,
        set: Some(ProbeSet::Syscalls),
        since: "5.15",
    },
    ProgramSpec {
        program: names::PROG_FORK,
        hook: names::TP_FORK,
        set: Some(ProbeSet::Syscalls),
        since: "5.15",
    },
    ProgramSpec {
        program: names::PROG_ADOPT_OWNERS,
        hook: names::ITER_TASK_FILE,
        set: Some(ProbeSet::Syscalls),
        since: "5.15",
    },
];

/// The iterator target of a program whose hook is `iter/<target>` (run by the daemon, not
/// attached to an event).
pub fn iter_target(hook: &str) -> Option<&str> {
    hook.strip_prefix("iter/")
}

/// The kernel's BTF, parsed once.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { btf })
    }

    /// Does the kernel have this BTF tracepoint (`btf_trace_<name>` typedef)?
    pub fn has_tracepoint(&self, name: &str) -> bool {
        self.btf
            .resolve_ids_by_name(&format!("btf_trace_{name}"))
            .is_ok_and(|ids| !ids.is_empty())
    }

    /// Does the kernel have this BPF iterator target (`bpf_iter_<target>` function)?
    pub fn has_iterator(&self, target: &str) -> bool {
        self.btf
            .resolve_ids_by_name(&format!("bpf_iter_{target}"))
            .is_ok_and(|ids| !ids.is_empty())
    }

    /// The set to use for a requested `Probes`.
    pub fn choose(&self, want: Probes) -> Result<ProbeSet, BtfError> {
        self.regs_layout()?;
        let sock = self.has_tracepoint(names::TP_RECV) && self.has_tracepoint(names::TP_SEND);
        match want {
            Probes::Sock if !sock => Err(BtfError::NoSockTracepoints),
            Probes::Sock => Ok(ProbeSet::Sock),
            Probes::Auto if sock => Ok(ProbeSet::Sock),
            Probes::Auto | Probes::Syscalls => Ok(ProbeSet::Syscalls),
        }
    }

    /// The running kernel's `struct pt_regs` against `PT_REGS` (both sets read the registers:
    /// the syscall set for the fd and number, the sock set for the head capture's buffer).
    pub fn regs_layout(&self) -> Result<(), BtfError> {
        if PT_REGS.is_empty() {
            return Err(BtfError::UnsupportedArch(std::env::consts::ARCH));
        }
        self.check_regs(PT_REGS)
    }

    fn check_regs(&self, table: &[(&'static str, u32)]) -> Result<(), BtfError> {
        for &(member, expected) in table {
            let found = self.offset_of("pt_regs", &[member])?;
            if found != expected {
                return Err(BtfError::RegsLayout {
                    member,
                    expected,
                    found,
                });
            }
        }
        Ok(())
    }

    /// The offsets the syscall set walks, for this kernel.
    pub fn offsets(&self) -> Result<KernelOffsets, BtfError> {
        Ok(KernelOffsets {
            task_files: self.offset_of("task_struct", &["files"])?,
            task_tgid: self.offset_of("task_struct", &["tgid"])?,
            files_fdt: self.offset_of("files_struct", &["fdt"])?,
            fdt_max_fds: self.offset_of("fdtable", &["max_fds"])?,
            fdt_fd: self.offset_of("fdtable", &["fd"])?,
            file_private_data: self.offset_of("file", &["private_data"])?,
            socket_sk: self.offset_of("socket", &["sk"])?,
            sock_socket: self.offset_of("sock", &["sk_socket"])?,
            sock_cookie: self.offset_of("sock", &["__sk_common", "skc_cookie"])?,
            _pad: 0,
            ..self.sock_common_offsets()?
        })
    }

    /// The `sock_common` fields the socket iterator reads (both sets); the rest zero.
    pub fn sock_common_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let skc = |field: &str| self.offset_of("sock_common", &[field]);
        Ok(KernelOffsets {
            skc_daddr: skc("skc_daddr")?,
            skc_rcv_saddr: skc("skc_rcv_saddr")?,
            skc_dport: skc("skc_dport")?,
            skc_num: skc("skc_num")?,
            skc_family: skc("skc_family")?,
            skc_state: skc("skc_state")?,
            skc_v6_daddr: skc("skc_v6_daddr")?,
            skc_v6_rcv_saddr: skc("skc_v6_rcv_saddr")?,
            ..KernelOffsets::default()
        })
    }

    /// Byte offset of `path` (member names, outermost first) in `struct name`. Members of
    /// anonymous unions and structs are found through them, as C does.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing {
            what: format!("struct {name} member {}", path.join(".")),
        };
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| missing())?;
        let mut cur = types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(missing)?;
        let mut bits = 0u32;
        for (i, field) in path.iter().enumerate() {
            let (off, ty) = self.find_member(&cur, field).ok_or_else(missing)?;
            bits += off;
            if i + 1 < path.len() {
                cur = self.as_struct(ty).ok_or_else(missing)?;
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(missing());
        }
        Ok(bits / 8)
    }

    /// Bit offset and type of member `field` of `s`, searching anonymous members too.
    fn find_member(&self, s: &btf_rs::Struct, field: &str) -> Option<(u32, Type)> {
        for m in &s.members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            let ty = self.btf.resolve_chained_type(m).ok()?;
            if name == field {
                return Some((m.bit_offset(), ty));
            }
            if name.is_empty() {
                if let Some(inner) = self.as_struct(ty) {
                    if let Some((off, t)) = self.find_member(&inner, field) {
                        return Some((m.bit_offset() + off, t));
                    }
                }
            }
        }
        None
    }

    /// The struct or union behind a type, through typedefs and qualifiers.
    fn as_struct(&self, mut ty: Type) -> Option<btf_rs::Struct> {
        for _ in 0..16 {
            match ty {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::TypeTag(_) => {
                    let t = ty.as_btf_type()?;
                    ty = self.btf.resolve_chained_type(t).ok()?;
                }
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against this machine's kernel BTF: the file is readable without root.
    #[test]
    fn offsets_of_the_running_kernel_are_plausible() {
        let btf = KernelBtf::load().expect("this machine has /sys/kernel/btf/vmlinux");
        let o = btf.offsets().expect("every member resolves");
        // `__sk_common` is the first member of `struct sock`, `fd` follows `max_fds` in fdtable.
        assert!(o.sock_cookie < 0x100, "{o:?}");
        assert_eq!(o.fdt_max_fds, 0, "{o:?}");
        assert_eq!(o.fdt_fd, 8, "{o:?}");
        assert!(o.task_files > 0x100 && o.task_tgid > 0x100, "{o:?}");
        assert!(o.sock_socket > o.sock_cookie, "{o:?}");
        // The head of `sock_common` has not moved since Linux 3.x.
        assert_eq!((o.skc_daddr, o.skc_rcv_saddr), (0, 4), "{o:?}");
        assert_eq!(
            (o.skc_dport, o.skc_num, o.skc_family),
            (12, 14, 16),
            "{o:?}"
        );
        assert_eq!(o.skc_state, 18, "{o:?}");
        assert!(o.skc_v6_rcv_saddr == o.skc_v6_daddr + 16, "{o:?}");
    }

    /// The programs of this build read the registers where this kernel saves them; a layout
    /// that differs is refused.
    #[test]
    fn the_running_kernel_saves_registers_where_the_programs_read_them() {
        let btf = KernelBtf::load().expect("BTF");
        btf.regs_layout().expect("pt_regs as the abi module says");
        // The check compares, it does not just resolve: one word off is refused, and named.
        let (member, at) = PT_REGS[1];
        let e = btf.check_regs(&[(member, at + 8)]).unwrap_err();
        assert!(
            matches!(e, BtfError::RegsLayout { member: m, found, .. } if m == member && found == at),
            "{e}"
        );
        assert!(btf.check_regs(&[("no_such_register", 0)]).is_err());
    }

    #[test]
    fn missing_members_are_errors_not_zero() {
        let btf = KernelBtf::load().expect("BTF");
        assert!(btf.offset_of("sock", &["no_such_member"]).is_err());
        assert!(btf.offset_of("no_such_struct_xyz", &["x"]).is_err());
    }

    #[test]
    fn this_kernel_gets_the_sock_set_unless_told_otherwise() {
        let btf = KernelBtf::load().expect("BTF");
        assert!(btf.has_tracepoint("sched_process_exit"));
        assert!(btf.has_iterator("tcp") && btf.has_iterator("task_file"));
        assert!(!btf.has_iterator("no_such_iterator_xyz"));
        assert!(!btf.has_tracepoint("no_such_tracepoint_xyz"));
        assert_eq!(btf.choose(Probes::Syscalls).unwrap(), ProbeSet::Syscalls);
        let sock = btf.has_tracepoint(names::TP_RECV);
        assert_eq!(btf.choose(Probes::Auto).unwrap() == ProbeSet::Sock, sock);
    }
}
