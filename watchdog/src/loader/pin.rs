//! The pinned kernel state: pinning a fresh load under the state directory, adopting what an
//! earlier daemon of the same build left there, and removing it (`watchdog unload`).

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use watchdog_common::{names, Meta};

use super::LoadError;
use crate::kernel_btf::{self, ProbeSet};

/// Pins the maps userspace reads and every link under `dir`.
pub(super) fn pin(
    dir: &Path,
    maps: &std::collections::HashMap<&'static str, Map>,
    links: Vec<(&'static str, Option<FdLink>)>,
) -> Result<(), LoadError> {
    let pin_err = |path: PathBuf| {
        move |e: aya::pin::PinError| LoadError::Pin {
            path,
            source: std::io::Error::other(e.to_string()),
        }
    };
    // Made (or checked) before the load already; checked again on the opened directory, in
    // case it was swapped since.
    private_dir(dir, true)?;
    for (name, map) in maps {
        let path = dir.join(name);
        map.pin(&path).map_err(pin_err(path))?;
    }
    for (name, link) in links {
        let path = dir.join(format!("link_{name}"));
        let link = link.ok_or_else(|| LoadError::Pin {
            path: path.clone(),
            source: std::io::Error::other("the kernel gave a legacy attachment, not a link"),
        })?;
        // The pin holds the link from now on; this process's fd may close.
        drop(link.pin(&path).map_err(pin_err(path.clone()))?);
    }
    Ok(())
}

/// Opens the pinned state in `dir` if its stamp equals `want` and every piece is there.
/// `Ok(None)`: nothing pinned. `Err(reason)`: something is pinned that must not be read.
pub(super) fn adopt(
    dir: &Path,
    want: &Meta,
) -> Result<Option<std::collections::HashMap<&'static str, Map>>, String> {
    let empty = fs::read_dir(dir).map_or(true, |mut entries| entries.next().is_none());
    if empty {
        return Ok(None);
    }
    let meta_map = MapData::from_pin(dir.join(names::MAP_META))
        .map_err(|e| format!("no readable {} stamp ({e})", names::MAP_META))?;
    let stamp: Array<MapData, Meta> = Array::try_from(Map::Array(meta_map))
        .map_err(|e| format!("stamp of another layout ({e})"))?;
    let have = stamp
        .get(&0, 0)
        .map_err(|e| format!("reading the stamp: {e}"))?;
    if have != *want {
        return Err(format!(
            "pinned by another build or setting: {have:?}, this daemon: {want:?}"
        ));
    }
    let set = if want.probe_set == ProbeSet::Sock.id() {
        ProbeSet::Sock
    } else {
        ProbeSet::Syscalls
    };
    for spec in kernel_btf::PROGRAMS
        .iter()
        .filter(|p| p.set.is_none_or(|s| s == set))
    {
        let path = dir.join(format!("link_{}", spec.program));
        PinnedLink::from_pin(&path).map_err(|e| format!("{} is missing ({e})", path.display()))?;
    }
    let mut maps = std::collections::HashMap::new();
    for name in names::PINNED_MAPS {
        let data = MapData::from_pin(dir.join(name))
            .map_err(|e| format!("pinned map {name} is missing ({e})"))?;
        let map = match name {
            names::MAP_CONNS | names::MAP_STREAMS | names::MAP_TASKS => Map::HashMap(data),
            names::MAP_PORTS | names::MAP_META => Map::Array(data),
            names::MAP_ROUTES => Map::LpmTrie(data),
            names::MAP_STATS | names::MAP_PORT_STATS => Map::PerCpuArray(data),
            _ => Map::RingBuf(data),
        };
        maps.insert(name, map);
    }
    Ok(Some(maps))
}

/// Removes everything pinned in `dir` but the directory itself (a state not adopted).
pub(super) fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Removes a pinned state: its programs detach once nothing else holds them.
pub fn unload(dir: &Path) -> std::io::Result<bool> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes sure `dir` is a directory only root (or this daemon's euid) controls before anything
/// is adopted from or pinned into it: every directory above it is owned by root or us and not
/// writable by others unless sticky (so nobody else can rename it away or swap it), and `dir`
/// itself is no symlink, owned by us, and not group/world-writable; its mode is then set to
/// 0700. With `create`, it is made with mkdir 0700 first (an existing one is checked the same
/// way: whoever won a race to create it loses here). `Ok(false)`: absent and not created.
///
/// The check is on the opened directory (`O_DIRECTORY | O_NOFOLLOW`, `fstat`), not on a
/// path looked up twice. /sys/fs/bpf may be 1777 (sticky, world-writable) on a host: the sticky
/// bit is what keeps another user from renaming a root-owned directory inside it.
pub(super) fn private_dir(dir: &Path, create: bool) -> Result<bool, LoadError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let refuse = |reason: String| LoadError::StateDir {
        path: dir.to_path_buf(),
        reason,
    };
    let euid = nix::unistd::geteuid().as_raw();
    for above in dir.ancestors().skip(1) {
        if above.as_os_str().is_empty() {
            continue;
        }
        let meta = fs::metadata(above).map_err(|source| LoadError::Pin {
            path: above.to_path_buf(),
            source,
        })?;
        if let Some(why) = foreign_dir(meta.uid(), meta.mode(), euid, true) {
            return Err(refuse(format!("{} above it {why}", above.display())));
        }
    }
    if create {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(LoadError::Pin {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
    let opened = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    );
    let fd = match opened {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) if !create => return Ok(false),
        Err(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR) => {
            let link = fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
            return Err(refuse(
                if link {
                    "it is a symbolic link"
                } else {
                    "it is not a directory"
                }
                .into(),
            ));
        }
        Err(e) => {
            return Err(LoadError::Pin {
                path: dir.to_path_buf(),
                source: e.into(),
            })
        }
    };
    let st = nix::sys::stat::fstat(&fd).map_err(|e| LoadError::Pin {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let mode = st.st_mode;
    if let Some(why) = foreign_dir(st.st_uid, mode, euid, false) {
        return Err(refuse(format!("it {why}")));
    }
    if mode & 0o077 != 0 {
        nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o700)).map_err(
            |e| LoadError::Pin {
                path: dir.to_path_buf(),
                source: e.into(),
            },
        )?;
    }
    Ok(true)
}

/// Why a directory with this owner and mode is not one only root controls (`None`: it is).
/// `sticky_ok`: a sticky directory may be writable by others (they cannot rename or remove
/// what is not theirs in it): allowed above the state directory, not for it.
pub(super) fn foreign_dir(uid: u32, mode: u32, euid: u32, sticky_ok: bool) -> Option<String> {
    if uid != 0 && uid != euid {
        return Some(format!("is owned by uid {uid}, not root"));
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !(sticky_ok && sticky) {
        return Some(format!(
            "is writable by others (mode {:04o})",
            mode & 0o7777
        ));
    }
    None
}

/// Whether the pinned links of a state directory are still in the kernel and attached, asked
/// of the kernel itself (not of the daemon's memory): each `link_*` pin opened (`BPF_OBJ_GET`)
/// and its info read (`BPF_OBJ_GET_INFO_BY_FD`). A removed pin (its program detached once the
/// pin was the last holder) fails the open; a cgroup link detached in place (`bpftool link
/// detach`) reports cgroup id 0; a link with no program reports program id 0.
#[derive(Clone, Debug)]
pub struct LinkCheck {
    links: Vec<PathBuf>,
}

impl LinkCheck {
    /// The links the daemon pins for `set` under `dir`.
    pub fn new(dir: &Path, set: ProbeSet) -> Self {
        let links = kernel_btf::PROGRAMS
            .iter()
            .filter(|p| p.set.is_none_or(|s| s == set))
            .map(|p| dir.join(format!("link_{}", p.program)))
            .collect();
        Self { links }
    }

    /// `Err`: the first link found missing or detached, in words.
    pub fn attached(&self) -> Result<(), String> {
        for path in &self.links {
            let info = link_info(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if info.prog_id == 0 {
                return Err(format!("{}: the link has no program", path.display()));
            }
            if info.type_ == BPF_LINK_TYPE_CGROUP && info.data[0] == 0 {
                return Err(format!("{}: detached from its cgroup", path.display()));
            }
        }
        Ok(())
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// `struct bpf_link_info`: its head, then the type's union (8-aligned, at byte 16).
#[repr(C)]
#[derive(Default)]
struct LinkInfoRaw {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    data: [u64; 8],
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 3]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable bpf_attr prefix of the size passed; the commands used
    // read the pointers inside it (a NUL-terminated path, an info buffer of the stated length).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

fn link_info(path: &Path) -> std::io::Result<LinkInfoRaw> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [c.as_ptr() as u64, 0, 0];
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut info = LinkInfoRaw::default();
    // bpf_attr for BPF_OBJ_GET_INFO_BY_FD: bpf_fd (u32), info_len (u32), info (u64).
    use std::os::fd::AsRawFd;
    let len = std::mem::size_of::<LinkInfoRaw>() as u64;
    let mut attr = [
        (fd.as_raw_fd() as u32 as u64) | (len << 32),
        &mut info as *mut LinkInfoRaw as u64,
        0,
    ];
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// Mounts bpffs on the parent of `dir` (normally /sys/fs/bpf) unless it is on a bpffs already.
pub(super) fn prepare_bpffs(dir: &Path) -> Result<(), LoadError> {
    const BPF_FS_MAGIC: u32 = 0xcafe_4a11;
    let parent = dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    let on_bpffs = nix::sys::statfs::statfs(parent)
        .is_ok_and(|s| s.filesystem_type().0 as u32 == BPF_FS_MAGIC);
    if on_bpffs {
        return Ok(());
    }
    // Root-only from the start: a bpffs mounted without a mode is 1777 (anyone may create
    // entries in it, the race issue 28 shows).
    fs::create_dir_all(parent)
        .and_then(|()| {
            nix::mount::mount(
                Some("bpf"),
                parent,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                Some("mode=0700"),
            )
            .map_err(std::io::Error::from)
        })
        .map_err(|source| LoadError::Pin {
            path: parent.to_path_buf(),
            source,
        })
}

/// The pinned event ring buffer, opened again (after an error on the one in use).
pub fn pinned_events(dir: &Path) -> Result<aya::maps::RingBuf<MapData>, LoadError> {
    let data = MapData::from_pin(dir.join(names::MAP_EVENTS))
        .map_err(|e| LoadError::MapOp(names::MAP_EVENTS, e))?;
    aya::maps::RingBuf::try_from(Map::RingBuf(data))
        .map_err(|e| LoadError::Map(names::MAP_EVENTS, e))
}
