//! Mapped files read once and kept between captures (a node runs a few interpreters and
//! runtimes, each with its few dozen libraries; a forked worker and its successor share their
//! master's files), keyed by device and inode, least recently used evicted first, bounded in
//! files and in bytes. A file that could not be read is remembered with the reason, so a
//! hostile file costs one read, not one per capture.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use super::{
    elf::{self, ElfError, Module},
    Mapping,
};

/// The most files remembered.
const MAX_CACHED_FILES: usize = 256;
/// The most bytes the remembered files hold (part of `elf::MAX_LIVE_BYTES`).
pub(super) const MAX_CACHE_BYTES: usize = 64 << 20;

/// Device and inode, as `/proc/PID/maps` gives them.
pub(super) type FileKey = (u64, u64);

struct Slot {
    module: Result<Arc<Module>, String>,
    bytes: usize,
    used: u64,
}

#[derive(Default)]
struct Cache {
    slots: HashMap<FileKey, Slot>,
    bytes: usize,
    tick: u64,
}

impl Cache {
    /// Evicts least recently used files until at most `files` files and `bytes` bytes remain.
    fn shrink_to(&mut self, files: usize, bytes: usize) {
        while self.slots.len() > files || self.bytes > bytes {
            let Some(oldest) = self
                .slots
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| *k)
            else {
                return;
            };
            if let Some(s) = self.slots.remove(&oldest) {
                self.bytes -= s.bytes;
            }
        }
    }
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// What unwinding and symbolization need of the file mapped by `m` in process `pid`, or why it
/// could not be read: through `/proc/PID/map_files` (the very file mapped, deleted or in
/// another mount namespace), else through the process's root (that inode only).
pub(super) fn module(pid: u32, m: &Mapping) -> Result<Arc<Module>, String> {
    let key = (m.dev, m.inode);
    {
        let mut c = cache().lock().map_err(|_| "cache poisoned".to_string())?;
        c.tick += 1;
        let tick = c.tick;
        if let Some(s) = c.slots.get_mut(&key) {
            s.used = tick;
            return s.module.clone();
        }
    }
    let read = || -> Result<Module, ElfError> {
        let via = format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            m.range.start, m.range.end
        );
        let opened = match elf::open(&via, None) {
            Ok(f) => f,
            Err(e) => match m.path.as_deref() {
                Some(p) if p.starts_with('/') => {
                    elf::open(&format!("/proc/{pid}/root{p}"), Some(key))?
                }
                _ => return Err(e),
            },
        };
        elf::read(&opened)
    };
    let mut result = read();
    if matches!(result, Err(ElfError::Budget(_))) {
        // Make room: half the cache goes, the least recently used first, and the file is read
        // once more (the budget may still be held by other readers: then it is refused).
        if let Ok(mut c) = cache().lock() {
            let files = c.slots.len() / 2;
            c.shrink_to(files, MAX_CACHE_BYTES / 2);
        }
        result = read();
    }
    // A file refused for the budget (held by other reads now) is not remembered as refused.
    let transient = matches!(result, Err(ElfError::Budget(_)));
    let (module, bytes) = match result {
        Ok(m) => {
            let bytes = m.bytes();
            (Ok(Arc::new(m)), bytes)
        }
        Err(e) => (Err(e.to_string()), 0),
    };
    if let Ok(mut c) = cache().lock() {
        // Past the cache's bytes a file is used for this capture only.
        if bytes <= MAX_CACHE_BYTES && !transient {
            c.tick += 1;
            let used = c.tick;
            if let Some(old) = c.slots.insert(
                key,
                Slot {
                    module: module.clone(),
                    bytes,
                    used,
                },
            ) {
                c.bytes -= old.bytes;
            }
            c.bytes += bytes;
            c.shrink_to(MAX_CACHED_FILES, MAX_CACHE_BYTES);
        }
    }
    module
}
