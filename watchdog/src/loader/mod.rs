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
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, Map, MapData, PerCpuArray, RingBuf,
    },
    programs::{
        links::{CgroupAttachMode, FdLink},
        BtfTracePoint, Iter, SockOps,
    },
    Btf, Ebpf, EbpfLoader,
};
use tracing::{info, warn};
use watchdog_common::{
    conn_flag,
    head::{RouteValue, ROUTE_KEY_DATA},
    limits, names, ConnInfo, ConnRecord, Meta, PortConfig, ReqState, StreamKey, StreamRecord,
    TaskInfo, LAYOUT_VERSION,
};

mod adopt;
mod counters;
mod pin;

pub use counters::Counters;
use pin::{adopt, clear_dir, pin, prepare_bpffs, private_dir};
pub use pin::{pinned_events, unload, LinkCheck};

use crate::{
    config::Probes,
    kernel_btf::{self, KernelBtf, ProbeSet},
    routes,
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
    #[error("no cgroup v2 hierarchy is mounted and mounting one at {path} failed")]
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
    /// The state directory (or a directory above it) is not one only root controls: another
    /// user could remove the pins (detaching every program) or plant their own.
    #[error("state directory {path} refused: {reason}; remove it or choose another `state_dir` (it may have been planted by another user)")]
    StateDir { path: PathBuf, reason: String },
    /// The pin directory could not be prepared or written.
    #[error("pinning kernel state under {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How to load: which probe set, where to pin, how big the tables are.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub probes: Probes,
    /// bpffs directory for the pinned state; `None`: nothing is pinned (`watchdog check`).
    pub state_dir: Option<PathBuf>,
    /// `max_entries` of the connection tables (`CONNS`, `SOCK_STATES`).
    pub max_conns: u32,
    /// Event ring buffer size in bytes (a power of two, at least one page).
    pub events_bytes: u32,
}

impl LoadOptions {
    /// No pinning, default table sizes.
    pub fn ephemeral(probes: Probes) -> Self {
        Self {
            probes,
            state_dir: None,
            max_conns: limits::MAX_CONNS,
            events_bytes: limits::EVENTS_BYTES,
        }
    }
}

/// How the kernel state came to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Loaded and attached now.
    Fresh,
    /// Programs and maps left pinned by an earlier daemon, adopted as they were.
    Adopted,
    /// An earlier state was pinned but did not match this daemon; it was detached and replaced.
    Replaced { reason: String },
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/watchdog"));

/// The loaded programs and their maps. Dropping it detaches everything that is not pinned.
pub struct Kernel {
    _ebpf: Option<Ebpf>,
    /// Links of an unpinned load: dropping them detaches the programs.
    _links: Vec<FdLink>,
    conns: HashMap<MapData, u64, ConnRecord>,
    streams: HashMap<MapData, StreamKey, StreamRecord>,
    tasks: HashMap<MapData, u32, TaskInfo>,
    ports: Array<MapData, PortConfig>,
    routes: LpmTrie<MapData, [u8; ROUTE_KEY_DATA], RouteValue>,
    meta: Array<MapData, Meta>,
    counters: Arc<Counters>,
    events: Option<RingBuf<MapData>>,
    /// The cgroup v2 directory the sock_ops program is attached to.
    pub cgroup: PathBuf,
    /// Which probe set feeds the request maps.
    pub probe_set: ProbeSet,
    /// Where the state is pinned (the iterators are run through their pinned links).
    state_dir: Option<PathBuf>,
    /// Fresh, adopted from a pinned state, or replacing one.
    pub origin: Origin,
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
    pub timer_init_errors: u64,
    pub timer_start_errors: u64,
    pub deadlines_rearmed: u64,
    /// HTTP/2 streams (`watchdog_common::stat::STREAMS_*`, `H2_LOST`).
    pub streams_started: u64,
    pub streams_ended: u64,
    pub streams_reaped: u64,
    pub streams_table_full: u64,
    pub h2_lost: u64,
    /// Insert failures of the syscall set's tables, execs that dropped a task, hand-off races.
    pub owners_table_full: u64,
    pub sock_states_table_full: u64,
    pub tasks_execed: u64,
    pub starts_contended: u64,
    pub deadlines_raced: u64,
    pub streams_port_full: u64,
    /// Connections open before their port was watched, taken into tracking by the iterator.
    pub conns_adopted: u64,
}

/// Per-slot request counters summed over CPUs (see `watchdog_common::port_stat`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// Non-cumulative histogram bucket counts, the last one `+Inf`.
    pub buckets: Vec<u64>,
    pub duration_sum_ns: u64,
    pub started: u64,
    pub closed_in_flight: u64,
    /// Connections by `head::proto` (port slots).
    pub protocols: Vec<u64>,
    /// Connections upgraded (`101`) and no longer tracked for requests.
    pub upgraded: u64,
    /// Connections open before the port was watched, adopted by the iterator (port slots).
    pub adopted: u64,
    /// Requests on a routed port whose bytes could not be read.
    pub route_unreadable: u64,
    /// Requests on a routed port whose request line ended before the path.
    pub route_split: u64,
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
    /// Loads and attaches the programs of the probe set `opts.probes` resolves to, or adopts the
    /// ones an earlier daemon left pinned in `opts.state_dir` if they are exactly what this daemon
    /// would load. Needs root.
    pub fn load(opts: &LoadOptions) -> Result<Self, LoadError> {
        let uid = nix::unistd::geteuid().as_raw();
        if uid != 0 {
            return Err(LoadError::NotPrivileged { uid });
        }
        if let Some(dir) = &opts.state_dir {
            prepare_bpffs(dir)?;
            // Nothing is adopted from (or pinned into) a directory another user controls; it
            // is made now (0700) if absent, first of all, so it is never absent while the
            // programs load (the window another user could create it in).
            private_dir(dir, true)?;
        }
        raise_memlock_limit();
        let kbtf = KernelBtf::load().map_err(LoadError::ProbeSet)?;
        let probe_set = kbtf.choose(opts.probes).map_err(LoadError::ProbeSet)?;
        let meta = Meta {
            layout_version: LAYOUT_VERSION,
            probe_set: probe_set.id(),
            object_hash: fnv1a(OBJECT),
            max_conns: opts.max_conns,
            events_bytes: opts.events_bytes,
        };
        let cgroup = cgroup2_root()?;
        let mut origin = Origin::Fresh;
        if let Some(dir) = &opts.state_dir {
            match adopt(dir, &meta) {
                Ok(Some(maps)) => {
                    info!(dir = %dir.display(), "adopted the pinned kernel state of an earlier daemon");
                    let mut kernel =
                        Self::from_maps(maps, None, cgroup, probe_set, Origin::Adopted)?;
                    kernel.state_dir = Some(dir.clone());
                    return Ok(kernel);
                }
                Ok(None) => {}
                Err(reason) => {
                    warn!(dir = %dir.display(), %reason, "pinned kernel state not adopted: detaching it and starting fresh");
                    // Emptied, not removed: the checked directory stays ours throughout.
                    clear_dir(dir).map_err(|source| LoadError::Pin {
                        path: dir.clone(),
                        source,
                    })?;
                    origin = Origin::Replaced { reason };
                }
            }
        }

        let btf = Btf::from_sys_fs().map_err(LoadError::NoBtf)?;
        let offsets = match probe_set {
            ProbeSet::Syscalls => kbtf.offsets().map_err(LoadError::ProbeSet)?,
            ProbeSet::Sock => kbtf.sock_common_offsets().map_err(LoadError::ProbeSet)?,
        };
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global(names::GLOBAL_PROBE_SET, &probe_set.id(), true)
            .override_global(names::GLOBAL_OFFSETS, &offsets, true)
            .map_max_entries(names::MAP_CONNS, opts.max_conns)
            .map_max_entries(names::MAP_SOCK_STATES, opts.max_conns)
            // Threads owning requests, and processes holding tracked connections: bounded like
            // the connections they serve (a full table is counted and covered by the backstop).
            .map_max_entries(names::MAP_TASKS, opts.max_conns)
            .map_max_entries(names::MAP_OWNERS, opts.max_conns)
            .map_max_entries(names::MAP_EVENTS, opts.events_bytes)
            .load(OBJECT)
            .map_err(LoadError::Object)?;

        let mut links = Vec::new();
        let sock_ops: &mut SockOps = program(&mut ebpf, names::PROG_SOCK_OPS)?;
        let err = |source| LoadError::Program {
            program: names::PROG_SOCK_OPS,
            hook: "sock_ops",
            source,
        };
        sock_ops.load().map_err(err)?;
        let cg = fs::File::open(&cgroup).map_err(|source| LoadError::NoCgroup2 {
            path: cgroup.clone(),
            source,
        })?;
        // A `watchdog check` run beside the daemon attaches its own and leaves the daemon's in
        // place (e2e `a_check_beside_the_daemon_does_not_blind_it`).
        let id = sock_ops.attach(cg, CgroupAttachMode::Single).map_err(err)?;
        let link = sock_ops.take_link(id).map_err(err)?;
        links.push((names::PROG_SOCK_OPS, FdLink::try_from(link).ok()));

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
            if let Some(target) = kernel_btf::iter_target(hook) {
                // Pinned like the others; reading the pin runs the iterator (`adopt_existing`).
                let it: &mut Iter = program(&mut ebpf, name)?;
                it.load(target, &btf).map_err(err)?;
                let id = it.attach().map_err(err)?;
                let link = it.take_link(id).map_err(err)?;
                links.push((name, FdLink::try_from(link).ok()));
                continue;
            }
            let tp: &mut BtfTracePoint = program(&mut ebpf, name)?;
            tp.load(hook, &btf).map_err(err)?;
            let id = tp.attach().map_err(err)?;
            let link = tp.take_link(id).map_err(err)?;
            links.push((name, Some(FdLink::from(link))));
        }

        let mut maps = std::collections::HashMap::new();
        for name in names::PINNED_MAPS {
            maps.insert(name, take(&mut ebpf, name)?);
        }
        if let Some(dir) = &opts.state_dir {
            pin(dir, &maps, links)?;
            let mut kernel = Self::from_maps(maps, Some(ebpf), cgroup, probe_set, origin)?;
            kernel.state_dir = Some(dir.clone());
            // The stamp goes in last: a directory without a valid one is never adopted.
            kernel
                .meta
                .set(0, meta, 0)
                .map_err(|e| LoadError::MapOp(names::MAP_META, e))?;
            return Ok(kernel);
        }
        let mut kernel = Self::from_maps(maps, Some(ebpf), cgroup, probe_set, origin)?;
        // Not pinned: the links live as long as this `Kernel`.
        kernel._links = links.into_iter().filter_map(|(_, l)| l).collect();
        Ok(kernel)
    }

    fn from_maps(
        mut maps: std::collections::HashMap<&'static str, Map>,
        ebpf: Option<Ebpf>,
        cgroup: PathBuf,
        probe_set: ProbeSet,
        origin: Origin,
    ) -> Result<Self, LoadError> {
        let mut take = |name: &'static str| {
            maps.remove(name).ok_or(LoadError::Map(
                name,
                aya::maps::MapError::InvalidName {
                    name: name.to_string(),
                },
            ))
        };
        let events = RingBuf::try_from(take(names::MAP_EVENTS)?)
            .map_err(|e| LoadError::Map(names::MAP_EVENTS, e))?;
        Ok(Self {
            conns: HashMap::try_from(take(names::MAP_CONNS)?)
                .map_err(|e| LoadError::Map(names::MAP_CONNS, e))?,
            streams: HashMap::try_from(take(names::MAP_STREAMS)?)
                .map_err(|e| LoadError::Map(names::MAP_STREAMS, e))?,
            tasks: HashMap::try_from(take(names::MAP_TASKS)?)
                .map_err(|e| LoadError::Map(names::MAP_TASKS, e))?,
            ports: Array::try_from(take(names::MAP_PORTS)?)
                .map_err(|e| LoadError::Map(names::MAP_PORTS, e))?,
            routes: LpmTrie::try_from(take(names::MAP_ROUTES)?)
                .map_err(|e| LoadError::Map(names::MAP_ROUTES, e))?,
            meta: Array::try_from(take(names::MAP_META)?)
                .map_err(|e| LoadError::Map(names::MAP_META, e))?,
            counters: Arc::new(Counters {
                stats: PerCpuArray::try_from(take(names::MAP_STATS)?)
                    .map_err(|e| LoadError::Map(names::MAP_STATS, e))?,
                port_stats: PerCpuArray::try_from(take(names::MAP_PORT_STATS)?)
                    .map_err(|e| LoadError::Map(names::MAP_PORT_STATS, e))?,
            }),
            events: Some(events),
            _ebpf: ebpf,
            _links: Vec::new(),
            cgroup,
            probe_set,
            state_dir: None,
            origin,
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

    /// Makes the kernel's route table hold exactly `entries`: new and changed ones are written
    /// first, stale ones removed last, so a request never finds a route of neither config.
    pub fn set_routes(&mut self, entries: &[routes::Entry]) -> Result<(), LoadError> {
        let err = |e| LoadError::MapOp(names::MAP_ROUTES, e);
        for e in entries {
            self.routes
                .insert(&LpmKey::new(e.bits, e.data), e.value, 0)
                .map_err(err)?;
        }
        // A set difference: one pass over the table, one hash probe per key.
        let wanted: std::collections::HashSet<(u32, [u8; ROUTE_KEY_DATA])> =
            entries.iter().map(|e| (e.bits, e.data)).collect();
        let stale: Vec<LpmKey<[u8; ROUTE_KEY_DATA]>> = self
            .routes
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stale {
            self.routes.remove(&k).map_err(err)?;
        }
        Ok(())
    }

    /// Ports (0 = wildcard) with a non-empty entry in the kernel's port table.
    pub fn configured_ports(&self) -> Vec<u16> {
        (0..=u16::MAX)
            .filter(|&p| {
                self.ports
                    .get(&u32::from(p), 0)
                    .is_ok_and(|c| c != PortConfig::default())
            })
            .collect()
    }

    /// The tracked connection with this cookie, as the kernel has it now.
    pub fn conn(&self, cookie: u64) -> Option<ConnInfo> {
        self.conns.get(&cookie, 0).ok().map(|r| r.info)
    }

    /// The request `ev` is about as the kernel has it now: the connection's current request,
    /// or, for an HTTP/2 stream (`conn_flag::STREAM`), that stream while it is in flight.
    pub fn current(&self, ev: &ConnInfo) -> Option<ConnInfo> {
        if ev.flags & conn_flag::STREAM == 0 {
            return self.conn(ev.cookie);
        }
        let key = StreamKey {
            cookie: ev.cookie,
            id: ev.gen,
            _pad: 0,
        };
        let s = self.streams.get(&key, 0).ok()?.info;
        Some(ConnInfo {
            start_ns: s.start_ns,
            gen: ev.gen,
            state: ReqState::InFlight as u32,
            tid: s.tid,
            tgid: s.tgid,
            owner_life: s.owner_life,
            deadline_ns: s.deadline_ns,
            ..*ev
        })
    }

    /// The tracked connection with this cookie and its current request's first bytes.
    pub fn record(&self, cookie: u64) -> Option<ConnRecord> {
        self.conns.get(&cookie, 0).ok()
    }

    /// The live task with this tid, if it owned a request and has not exited.
    pub fn task(&self, tid: u32) -> Option<TaskInfo> {
        self.tasks.get(&tid, 0).ok()
    }

    /// The kernel's counters, shareable with the metrics collector.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

/// A second handle on the pinned connection table, for reading it off the event loop (the
/// status document).
pub struct ConnsReader(HashMap<MapData, u64, ConnRecord>);

impl ConnsReader {
    /// Opens the table pinned under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, LoadError> {
        let data = MapData::from_pin(state_dir.join(names::MAP_CONNS))
            .map_err(|e| LoadError::MapOp(names::MAP_CONNS, e))?;
        HashMap::try_from(Map::HashMap(data))
            .map(Self)
            .map_err(|e| LoadError::Map(names::MAP_CONNS, e))
    }

    /// Every tracked connection with its current request's first bytes.
    pub fn records(&self) -> Vec<ConnRecord> {
        read_all(&self.0)
    }

    /// One connection's record, as the kernel has it now.
    pub fn get(&self, cookie: u64) -> Option<ConnRecord> {
        self.0.get(&cookie, 0).ok()
    }

    /// Deletes the connection's record if, read again just before, it still holds the request
    /// `v` chose (`evict::still_same`; its later requests are then not followed). True if it
    /// was deleted. The window between the re-read and the delete is `evict.rs`'s to explain.
    /// Eviction's, on the sweeper thread.
    pub fn drop_if_same(&mut self, v: &crate::evict::Victim) -> bool {
        match self.0.get(&v.cookie, 0) {
            Ok(r) if crate::evict::still_same(v, &r.info) => self.0.remove(&v.cookie).is_ok(),
            _ => false,
        }
    }
}

fn read_all(conns: &HashMap<MapData, u64, ConnRecord>) -> Vec<ConnRecord> {
    conns
        .iter()
        .filter_map(Result::ok)
        .map(|(_, r)| r)
        .collect()
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

/// FNV-1a, 64 bit: a stable fingerprint of the embedded object.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
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
