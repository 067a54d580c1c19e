//! Loads the embedded eBPF object, attaches its programs, and gives typed access to its maps.
//!
//! The only module that talks to aya. Everything the kernel side needs from userspace goes in
//! through `Kernel::set_port`; everything userspace reads comes out through the methods here.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{links::CgroupAttachMode, BtfTracePoint, SockOps},
    Btf, Ebpf, EbpfLoader,
};
use watchdog_common::{limits, names, port_stat, stat, ConnInfo, ConnRecord, PortConfig, TaskInfo};

use crate::{
    config::Probes,
    kernel_btf::{self, KernelBtf, ProbeSet},
};

/// Errors of loading and attaching. Each says what is missing and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not running with the privileges eBPF needs.
    #[error("loading eBPF programs needs root (or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_RESOURCE); running as uid {uid}")]
    NotPrivileged { uid: u32 },
    /// The kernel does not expose its BTF.
    #[error(
        "the kernel has no BTF at /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF=y is required)"
    )]
    NoBtf(#[source] aya::BtfError),
    /// The requested probe set cannot run here, or its struct offsets are not in the BTF.
    #[error("choosing the kernel probe set")]
    ProbeSet(#[source] kernel_btf::BtfError),
    /// No cgroup v2 hierarchy could be found or mounted.
    #[error("no cgroup v2 hierarchy is mounted and mounting one at {path} failed: {source}")]
    NoCgroup2 {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The object could not be loaded (maps created).
    #[error("loading the eBPF object failed")]
    Object(#[source] aya::EbpfError),
    /// The verifier refused a program, or the tracepoint does not exist on this kernel.
    #[error("program {program} could not be loaded or attached (is tracepoint {hook} present on this kernel?)")]
    Program {
        program: &'static str,
        hook: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map is missing or has an unexpected type.
    #[error("map {0} is missing from the eBPF object or has the wrong type")]
    Map(&'static str, #[source] aya::maps::MapError),
    /// A map read or write failed.
    #[error("map {0} operation failed")]
    MapOp(&'static str, #[source] aya::maps::MapError),
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/watchdog"));

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Kernel {
    _ebpf: Ebpf,
    conns: HashMap<MapData, u64, ConnRecord>,
    tasks: HashMap<MapData, u32, TaskInfo>,
    ports: Array<MapData, PortConfig>,
    counters: Arc<Counters>,
    events: Option<RingBuf<MapData>>,
    /// The cgroup v2 directory the sock_ops program is attached to.
    pub cgroup: PathBuf,
    /// Which probe set feeds the request maps.
    pub probe_set: ProbeSet,
}

/// Global kernel counters summed over CPUs (see `watchdog_common::stat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub conns_opened: u64,
    pub conns_closed: u64,
    pub conns_table_full: u64,
    pub tasks_table_full: u64,
    pub events_lost: u64,
    pub deadlines_fired: u64,
    pub deadlines_stale: u64,
    pub tasks_exited: u64,
}

/// Per-slot request counters summed over CPUs (see `watchdog_common::port_stat`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// Non-cumulative histogram bucket counts, the last one `+Inf`.
    pub buckets: Vec<u64>,
    pub duration_sum_ns: u64,
    pub started: u64,
    pub closed_in_flight: u64,
}

impl SlotStats {
    /// Requests that got a first response byte.
    pub fn responded(&self) -> u64 {
        self.buckets.iter().sum()
    }
    /// Requests started and not yet ended.
    pub fn in_flight(&self) -> u64 {
        self.started
            .saturating_sub(self.responded() + self.closed_in_flight)
    }
}

impl Kernel {
    /// Loads and attaches the programs of the probe set `want` resolves to. Needs root.
    pub fn load(want: Probes) -> Result<Self, LoadError> {
        let uid = nix::unistd::geteuid().as_raw();
        if uid != 0 {
            return Err(LoadError::NotPrivileged { uid });
        }
        raise_memlock_limit();
        let btf = Btf::from_sys_fs().map_err(LoadError::NoBtf)?;
        let kbtf = KernelBtf::load().map_err(LoadError::ProbeSet)?;
        let probe_set = kbtf.choose(want).map_err(LoadError::ProbeSet)?;
        let offsets = match probe_set {
            ProbeSet::Syscalls => kbtf.offsets().map_err(LoadError::ProbeSet)?,
            ProbeSet::Sock => Default::default(),
        };
        let cgroup = cgroup2_root()?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global(names::GLOBAL_PROBE_SET, &probe_set.id(), true)
            .override_global(names::GLOBAL_OFFSETS, &offsets, true)
            .load(OBJECT)
            .map_err(LoadError::Object)?;

        let prog = |name| {
            move |source| LoadError::Program {
                program: name,
                hook: "sock_ops",
                source,
            }
        };
        let sock_ops: &mut SockOps = program(&mut ebpf, names::PROG_SOCK_OPS)?;
        sock_ops.load().map_err(prog(names::PROG_SOCK_OPS))?;
        let cg = fs::File::open(&cgroup).map_err(|source| LoadError::NoCgroup2 {
            path: cgroup.clone(),
            source,
        })?;
        sock_ops
            .attach(cg, CgroupAttachMode::Single)
            .map_err(prog(names::PROG_SOCK_OPS))?;

        let tracepoints = kernel_btf::PROGRAMS
            .iter()
            .filter(|p| p.program != names::PROG_SOCK_OPS)
            .filter(|p| p.set.is_none_or(|s| s == probe_set));
        for &kernel_btf::ProgramSpec {
            program: name,
            hook,
            ..
        } in tracepoints
        {
            let err = |source| LoadError::Program {
                program: name,
                hook,
                source,
            };
            let tp: &mut BtfTracePoint = program(&mut ebpf, name)?;
            tp.load(hook, &btf).map_err(err)?;
            tp.attach().map_err(err)?;
        }

        let events = RingBuf::try_from(take(&mut ebpf, names::MAP_EVENTS)?)
            .map_err(|e| LoadError::Map(names::MAP_EVENTS, e))?;
        Ok(Self {
            conns: HashMap::try_from(take(&mut ebpf, names::MAP_CONNS)?)
                .map_err(|e| LoadError::Map(names::MAP_CONNS, e))?,
            tasks: HashMap::try_from(take(&mut ebpf, names::MAP_TASKS)?)
                .map_err(|e| LoadError::Map(names::MAP_TASKS, e))?,
            ports: Array::try_from(take(&mut ebpf, names::MAP_PORTS)?)
                .map_err(|e| LoadError::Map(names::MAP_PORTS, e))?,
            counters: Arc::new(Counters {
                stats: PerCpuArray::try_from(take(&mut ebpf, names::MAP_STATS)?)
                    .map_err(|e| LoadError::Map(names::MAP_STATS, e))?,
                port_stats: PerCpuArray::try_from(take(&mut ebpf, names::MAP_PORT_STATS)?)
                    .map_err(|e| LoadError::Map(names::MAP_PORT_STATS, e))?,
            }),
            events: Some(events),
            _ebpf: ebpf,
            cgroup,
            probe_set,
        })
    }

    /// Hands over the event ring buffer (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Sets what the kernel does for connections on `port` (0 = every port without its own entry).
    pub fn set_port(&mut self, port: u16, cfg: PortConfig) -> Result<(), LoadError> {
        self.ports
            .set(u32::from(port), cfg, 0)
            .map_err(|e| LoadError::MapOp(names::MAP_PORTS, e))
    }

    /// The tracked connection with this cookie, as the kernel has it now.
    pub fn conn(&self, cookie: u64) -> Option<ConnInfo> {
        self.conns.get(&cookie, 0).ok().map(|r| r.info)
    }

    /// The live task with this tid, if it owned a request and has not exited.
    pub fn task(&self, tid: u32) -> Option<TaskInfo> {
        self.tasks.get(&tid, 0).ok()
    }

    /// Every tracked connection (one syscall per entry: for status and recovery, not hot paths).
    pub fn conns(&self) -> Vec<ConnInfo> {
        self.conns
            .iter()
            .filter_map(Result::ok)
            .map(|(_, r)| r.info)
            .collect()
    }

    /// The kernel's counters, shareable with the metrics collector.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

/// The kernel's per-CPU counters (read-only from userspace).
pub struct Counters {
    stats: PerCpuArray<MapData, u64>,
    port_stats: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}

impl Counters {
    pub fn stats(&self) -> KernelStats {
        let get = |i: u32| -> u64 {
            self.stats
                .get(&i, 0)
                .map(|v| v.iter().copied().sum())
                .unwrap_or(0)
        };
        KernelStats {
            conns_opened: get(stat::CONNS_OPENED),
            conns_closed: get(stat::CONNS_CLOSED),
            conns_table_full: get(stat::CONNS_TABLE_FULL),
            tasks_table_full: get(stat::TASKS_TABLE_FULL),
            events_lost: get(stat::EVENTS_LOST),
            deadlines_fired: get(stat::DEADLINES_FIRED),
            deadlines_stale: get(stat::DEADLINES_STALE),
            tasks_exited: get(stat::TASKS_EXITED),
        }
    }

    /// Counters of one metrics slot.
    pub fn slot_stats(&self, slot: u32) -> SlotStats {
        let base = slot * port_stat::STRIDE;
        let get = |i: u32| -> u64 {
            self.port_stats
                .get(&(base + i), 0)
                .map(|v| v.iter().copied().sum())
                .unwrap_or(0)
        };
        SlotStats {
            buckets: (0..=watchdog_common::DURATION_BUCKETS_MS.len() as u32)
                .map(|b| get(port_stat::BUCKETS + b))
                .collect(),
            duration_sum_ns: get(port_stat::DURATION_SUM_NS),
            started: get(port_stat::STARTED),
            closed_in_flight: get(port_stat::CLOSED_IN_FLIGHT),
        }
    }
}

/// Slots beyond the table share slot 0.
pub const MAX_SLOTS: u32 = limits::MAX_PORT_SLOTS;

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let hook = "-";
    let p = ebpf.program_mut(name).ok_or(LoadError::Program {
        program: name,
        hook,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    p.try_into().map_err(|source| LoadError::Program {
        program: name,
        hook,
        source,
    })
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, LoadError> {
    ebpf.take_map(name).ok_or(LoadError::Map(
        name,
        aya::maps::MapError::InvalidName {
            name: name.to_string(),
        },
    ))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// Where cgroup v2 is mounted; mounts it under /run/watchdog when nothing is.
pub fn cgroup2_root() -> Result<PathBuf, LoadError> {
    if let Some(p) = find_mount("cgroup2") {
        return Ok(p);
    }
    let path = PathBuf::from("/run/watchdog/cgroup2");
    fs::create_dir_all(&path)
        .and_then(|()| mount("cgroup2", &path, "cgroup2"))
        .map_err(|source| LoadError::NoCgroup2 {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

/// First mount point of a filesystem type, from /proc/self/mounts.
pub fn find_mount(fstype: &str) -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then(|| PathBuf::from(dir))
    })
}

/// `mount -t fstype fstype path`.
pub fn mount(fstype: &str, path: &Path, source: &str) -> std::io::Result<()> {
    nix::mount::mount(
        Some(source),
        path,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(std::io::Error::from)
}
