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

use super::{mount, LoadError};
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
    fs::create_dir_all(dir).map_err(|source| LoadError::Pin {
        path: dir.to_path_buf(),
        source,
    })?;
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
    if !dir.exists() {
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

/// Removes a pinned state: its programs detach once nothing else holds them.
pub fn unload(dir: &Path) -> std::io::Result<bool> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Mounts bpffs on the parent of `dir` (normally /sys/fs/bpf) unless it is on a bpffs already.
pub(super) fn prepare_bpffs(dir: &Path) -> Result<(), LoadError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let parent = dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    let on_bpffs =
        nix::sys::statfs::statfs(parent).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if on_bpffs {
        return Ok(());
    }
    fs::create_dir_all(parent)
        .and_then(|()| mount("bpf", parent, "bpf"))
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
