//! The native frames of the thread that owns a stuck request, for any language: a C extension,
//! libc, the interpreter or runtime itself.
//!
//! Registers cannot be read without stopping a thread, so this one thread (never the rest of
//! its process) is held for a moment: `PTRACE_SEIZE` + `PTRACE_INTERRUPT`, its registers and the
//! live part of its stack copied out (`process_vm_readv`), then `PTRACE_DETACH`. The unwinding
//! (DWARF CFI from each module's `.eh_frame`, with `framehop`; Debian's binaries have no frame
//! pointers) and the symbolization (`.symtab` / `.dynsym`, with `blazesym`) run afterwards on
//! the copy, with the thread already running again. Modules are read through
//! `/proc/PID/map_files`, so this works across containers and for deleted files.

use std::{
    collections::HashMap,
    io::IoSliceMut,
    ops::Range,
    sync::{mpsc, Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::{
        ptrace,
        signal::Signal,
        uio::{process_vm_readv, RemoteIoVec},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};
use serde::Serialize;

/// The deepest native stack recorded.
const MAX_FRAMES: usize = 64;
/// The most of the thread's stack copied out (from its stack pointer up).
const MAX_STACK_BYTES: u64 = 512 * 1024;
/// Files whose unwind tables are kept between captures (a node runs a few interpreters and
/// runtimes, each with its few dozen libraries); past it the cache starts over.
const MAX_CACHED_FILES: usize = 256;

/// One native frame, innermost first in a stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NativeFrame {
    /// The instruction pointer (first frame) or the return address, `0x...`.
    pub address: String,
    /// The symbol containing the address (demangled); `None` when `why` says why not.
    pub function: Option<String>,
    /// The address's offset into `function`.
    pub offset: Option<u64>,
    /// The file mapped at the address, as the process sees it (`None`: anonymous memory, JIT).
    pub module: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// What the native read found, and how long it took.
#[derive(Clone, Debug, Serialize)]
pub struct NativeReport {
    pub frames: Vec<NativeFrame>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the thread was held stopped.
    pub stopped_ms: f64,
    pub ms: f64,
}

impl NativeReport {
    /// The innermost few frames, for a log line: `clock_nanosleep+0x5b (libc.so.6) < ...`.
    pub fn compact(&self, n: usize) -> String {
        if let Some(e) = &self.error {
            return format!("({e})");
        }
        self.frames
            .iter()
            .take(n)
            .map(|f| {
                let module = f
                    .module
                    .as_deref()
                    .map(|m| m.rsplit('/').next().unwrap_or(m));
                match (&f.function, module) {
                    (Some(func), Some(m)) => {
                        format!("{func}+{:#x} ({m})", f.offset.unwrap_or(0))
                    }
                    (Some(func), None) => format!("{func}+{:#x}", f.offset.unwrap_or(0)),
                    (None, Some(m)) => format!("{} ({m})", f.address),
                    (None, None) => f.address.clone(),
                }
            })
            .collect::<Vec<_>>()
            .join(" < ")
    }
}

/// Why no native stack could be read.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("the process's memory map is unreadable: {0}")]
    Maps(String),
    #[error("the thread cannot be stopped (ptrace): {0}")]
    Attach(Errno),
    #[error("the thread exited during the read")]
    Exited,
    #[error("the thread did not stop within {0} ms")]
    NoStop(u128),
    #[error("its registers are unreadable: {0}")]
    Regs(Errno),
    #[error("its stack pointer {0:#x} is in no readable mapping")]
    StackUnmapped(u64),
    #[error("its instruction pointer {0:#x} is in no code mapping (the process changed during the read)")]
    NoCode(u64),
    #[error("its stack memory at {0:#x} is unreadable: {1}")]
    StackRead(u64, Errno),
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    #[error("native stacks are read on x86_64 only")]
    Unsupported,
}

/// One mapping of `/proc/PID/maps`.
#[derive(Clone, Debug)]
struct Mapping {
    range: Range<u64>,
    readable: bool,
    executable: bool,
    offset: u64,
    dev: u64,
    inode: u64,
    path: Option<String>,
}

fn maps(pid: u32) -> Result<Vec<Mapping>, NativeError> {
    let p =
        procfs::process::Process::new(pid as i32).map_err(|e| NativeError::Maps(e.to_string()))?;
    let m = p.maps().map_err(|e| NativeError::Maps(e.to_string()))?;
    Ok(m.into_iter()
        .map(|m| Mapping {
            range: m.address.0..m.address.1,
            readable: m.perms.contains(procfs::process::MMPermissions::READ),
            executable: m.perms.contains(procfs::process::MMPermissions::EXECUTE),
            offset: m.offset,
            dev: (u64::from(m.dev.0 as u32) << 32) | u64::from(m.dev.1 as u32),
            inode: m.inode,
            path: match m.pathname {
                procfs::process::MMapPath::Path(p) => Some(p.to_string_lossy().into_owned()),
                procfs::process::MMapPath::Vdso => Some("[vdso]".into()),
                _ => None,
            },
        })
        .collect())
}

/// The registers unwinding starts from and the copied stack.
struct Snapshot {
    ip: u64,
    sp: u64,
    bp: u64,
    stack: Vec<u8>,
}

/// Detaches on every way out once the thread is seized (the signal that stopped it, if any,
/// is delivered on the way).
struct Seized {
    tid: Pid,
    resend: Option<Signal>,
    attached: bool,
}

impl Drop for Seized {
    fn drop(&mut self) {
        if self.attached {
            let _ = ptrace::detach(self.tid, self.resend);
        }
    }
}

/// Stops thread `tid` of `pid`, copies its registers and stack, lets it go. `wait` bounds the
/// wait for the stop (a thread in uninterruptible sleep stops only when it leaves it).
#[cfg(target_arch = "x86_64")]
fn snapshot(pid: u32, tid: u32, maps: &[Mapping], wait: Duration) -> Result<Snapshot, NativeError> {
    let t = Pid::from_raw(tid as i32);
    ptrace::seize(t, ptrace::Options::empty()).map_err(|e| match e {
        Errno::ESRCH => NativeError::Exited,
        e => NativeError::Attach(e),
    })?;
    let mut held = Seized {
        tid: t,
        resend: None,
        attached: true,
    };
    ptrace::interrupt(t).map_err(|e| match e {
        Errno::ESRCH => NativeError::Exited,
        e => NativeError::Attach(e),
    })?;
    let deadline = Instant::now() + wait;
    loop {
        match waitpid(t, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() >= deadline {
                    // Leaving the thread seized but running is harmless: it is detached when
                    // this reading thread ends (the kernel detaches a tracer's tracees).
                    return Err(NativeError::NoStop(wait.as_millis()));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            Ok(WaitStatus::PtraceEvent(..)) | Ok(WaitStatus::PtraceSyscall(_)) => break,
            // A signal arrived first (signal-delivery-stop): it is delivered on detach.
            Ok(WaitStatus::Stopped(_, sig)) => {
                held.resend = Some(sig);
                break;
            }
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                held.attached = false;
                return Err(NativeError::Exited);
            }
            Ok(_) => {}
            Err(e) => return Err(NativeError::Attach(e)),
        }
    }
    let regs = ptrace::getregs(t).map_err(|e| match e {
        Errno::ESRCH => NativeError::Exited,
        e => NativeError::Regs(e),
    })?;
    let sp = regs.rsp;
    let stack_map = maps
        .iter()
        .find(|m| m.range.contains(&sp) && m.readable)
        .ok_or(NativeError::StackUnmapped(sp))?;
    let len = (stack_map.range.end - sp).min(MAX_STACK_BYTES) as usize;
    let mut stack = vec![0u8; len];
    let n = process_vm_readv(
        Pid::from_raw(pid as i32),
        &mut [IoSliceMut::new(&mut stack)],
        &[RemoteIoVec {
            base: sp as usize,
            len,
        }],
    )
    .map_err(|e| NativeError::StackRead(sp, e))?;
    stack.truncate(n);
    drop(held);
    Ok(Snapshot {
        ip: regs.rip,
        sp,
        bp: regs.rbp,
        stack,
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn snapshot(_: u32, _: u32, _: &[Mapping], _: Duration) -> Result<Snapshot, NativeError> {
    Err(NativeError::Unsupported)
}

/// What unwinding needs of one ELF file, kept between captures (keyed by device and inode:
/// a forked worker and its successor share their master's files).
struct UnwindInfo {
    /// PT_LOAD segments: file offset, virtual address, file size.
    loads: Vec<(u64, u64, u64)>,
    text_svma: Option<Range<u64>>,
    got_svma: Option<Range<u64>>,
    eh_frame: Option<(Range<u64>, Arc<[u8]>)>,
    eh_frame_hdr: Option<(Range<u64>, Arc<[u8]>)>,
    debug_frame: Option<Arc<[u8]>>,
}

impl UnwindInfo {
    fn read(path: &str) -> Option<UnwindInfo> {
        let file = std::fs::File::open(path).ok()?;
        // SAFETY: a read-only private mapping of a file opened here; it is only read while the
        // mapping lives (in this function) and copied out. A file truncated meanwhile could
        // fault: the files are a process's mapped binaries, which the loader never truncates.
        let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
        let elf = goblin::elf::Elf::parse(&map).ok()?;
        let section = |name: &str| {
            elf.section_headers.iter().find(|s| {
                elf.shdr_strtab.get_at(s.sh_name) == Some(name)
                    && s.sh_type != goblin::elf::section_header::SHT_NOBITS
            })
        };
        let data = |s: &goblin::elf::SectionHeader| -> Option<Arc<[u8]>> {
            let r = s.file_range()?;
            map.get(r).map(Arc::from)
        };
        let svma = |s: &goblin::elf::SectionHeader| s.sh_addr..s.sh_addr + s.sh_size;
        Some(UnwindInfo {
            loads: elf
                .program_headers
                .iter()
                .filter(|p| p.p_type == goblin::elf::program_header::PT_LOAD)
                .map(|p| (p.p_offset, p.p_vaddr, p.p_filesz))
                .collect(),
            text_svma: section(".text").map(svma),
            got_svma: section(".got").map(svma),
            eh_frame: section(".eh_frame").and_then(|s| Some((svma(s), data(s)?))),
            eh_frame_hdr: section(".eh_frame_hdr").and_then(|s| Some((svma(s), data(s)?))),
            debug_frame: section(".debug_frame").and_then(data),
        })
    }

    /// The load bias of a file whose bytes at `offset` are mapped at `start`.
    fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        let (off, vaddr, _) = self
            .loads
            .iter()
            .find(|(o, _, size)| (*o..o + size.max(&1)).contains(&offset))
            .or_else(|| self.loads.first())?;
        start.checked_sub(vaddr + offset.checked_sub(*off)?)
    }
}

type FileKey = (u64, u64);

fn unwind_cache() -> &'static Mutex<HashMap<FileKey, Option<Arc<UnwindInfo>>>> {
    static CACHE: OnceLock<Mutex<HashMap<FileKey, Option<Arc<UnwindInfo>>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn unwind_info(pid: u32, m: &Mapping) -> Option<Arc<UnwindInfo>> {
    let key = (m.dev, m.inode);
    if let Some(hit) = unwind_cache().lock().ok()?.get(&key) {
        return hit.clone();
    }
    let via = format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        m.range.start, m.range.end
    );
    let info = UnwindInfo::read(&via)
        .or_else(|| UnwindInfo::read(&format!("/proc/{pid}/root{}", m.path.as_deref()?)))
        .map(Arc::new);
    let mut cache = unwind_cache().lock().ok()?;
    if cache.len() >= MAX_CACHED_FILES {
        cache.clear();
    }
    cache.insert(key, info.clone());
    info
}

/// Unwinds the snapshot with each mapped file's CFI (frame pointers where there is none, as in
/// JIT code); the addresses innermost first.
fn unwind(pid: u32, maps: &[Mapping], snap: &Snapshot) -> Vec<framehop::FrameAddress> {
    use framehop::{
        x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
        ExplicitModuleSectionInfo, Module, Unwinder,
    };
    let mut unwinder = UnwinderX86_64::<Arc<[u8]>>::new();
    let mut seen: HashMap<FileKey, (Range<u64>, u64, Arc<UnwindInfo>, String)> = HashMap::new();
    for m in maps.iter().filter(|m| m.inode != 0 && m.path.is_some()) {
        let key = (m.dev, m.inode);
        if let Some(entry) = seen.get_mut(&key) {
            entry.0.start = entry.0.start.min(m.range.start);
            entry.0.end = entry.0.end.max(m.range.end);
            continue;
        }
        let Some(info) = unwind_info(pid, m) else {
            continue;
        };
        let Some(bias) = info.bias(m.range.start, m.offset) else {
            continue;
        };
        let name = m.path.clone().unwrap_or_default();
        seen.insert(key, (m.range.clone(), bias, info, name));
    }
    for (range, bias, info, name) in seen.into_values() {
        let section_info = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: info.text_svma.clone(),
            got_svma: info.got_svma.clone(),
            eh_frame_svma: info.eh_frame.as_ref().map(|e| e.0.clone()),
            eh_frame: info.eh_frame.as_ref().map(|e| e.1.clone()),
            eh_frame_hdr_svma: info.eh_frame_hdr.as_ref().map(|e| e.0.clone()),
            eh_frame_hdr: info.eh_frame_hdr.as_ref().map(|e| e.1.clone()),
            debug_frame: info.debug_frame.clone(),
            ..Default::default()
        };
        unwinder.add_module(Module::new(name, range, bias, section_info));
    }
    let base = snap.sp;
    let stack = &snap.stack;
    let mut read = |addr: u64| -> Result<u64, ()> {
        let at = addr.checked_sub(base).ok_or(())? as usize;
        let bytes = stack.get(at..at.checked_add(8).ok_or(())?).ok_or(())?;
        Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
    };
    let mut cache = CacheX86_64::<_>::new();
    let regs = UnwindRegsX86_64::new(snap.ip, snap.sp, snap.bp);
    let mut frames = Vec::new();
    let mut it = unwinder.iter_frames(snap.ip, regs, &mut cache, &mut read);
    while let Ok(Some(f)) = it.next() {
        // An address in no code mapping ends the walk: the unwinder went off the stack's
        // end (a greenlet's or a coroutine's stack is switched in by hand).
        let addr = f.address();
        if !maps.iter().any(|m| m.executable && m.range.contains(&addr)) {
            break;
        }
        frames.push(f);
        if frames.len() == MAX_FRAMES {
            break;
        }
    }
    frames
}

/// What symbolizing one address found: the symbol's name and the address's offset into it, or
/// why there is none.
type Resolved = Result<(String, u64), String>;

/// One batch of addresses of process `pid` for the symbolizer thread.
struct Job {
    pid: u32,
    addrs: Vec<u64>,
    reply: mpsc::Sender<Result<Vec<Resolved>, String>>,
}

/// The symbolizer lives on a thread of its own (blazesym's is not `Send`) and is kept between
/// captures: it caches each file's parsed symbols by device, inode and mtime, so the second
/// worker of a pool costs less than the first. It starts over after `MAX_SYMBOLIZED_PIDS`
/// processes, which bounds what it remembers per process.
const MAX_SYMBOLIZED_PIDS: usize = 64;

fn symbolizer() -> Option<mpsc::Sender<Job>> {
    static TX: OnceLock<Option<Mutex<mpsc::Sender<Job>>>> = OnceLock::new();
    let tx = TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("watchdog-symbols".into())
            .spawn(move || serve_symbols(rx))
            .ok()
            .map(|_| Mutex::new(tx))
    });
    tx.as_ref()?.lock().ok().map(|t| t.clone())
}

fn serve_symbols(rx: mpsc::Receiver<Job>) {
    use blazesym::symbolize::{source, Input, Symbolized, Symbolizer};
    let mut symbolizer = Symbolizer::new();
    let mut pids = 0;
    for job in rx {
        pids += 1;
        if pids > MAX_SYMBOLIZED_PIDS {
            symbolizer = Symbolizer::new();
            pids = 1;
        }
        let src = source::Source::Process(source::Process::new(job.pid.into()));
        let out = symbolizer
            .symbolize(&src, Input::AbsAddr(&job.addrs))
            .map(|all| {
                all.into_iter()
                    .map(|s| match s {
                        Symbolized::Sym(s) => Ok((s.name.into_owned(), s.offset as u64)),
                        Symbolized::Unknown(why) => Err(why.to_string()),
                    })
                    .collect()
            })
            .map_err(|e| format!("symbols unreadable: {e}"));
        let _ = job.reply.send(out);
    }
}

fn symbolize(pid: u32, maps: &[Mapping], addrs: &[framehop::FrameAddress]) -> Vec<NativeFrame> {
    let lookups: Vec<u64> = addrs.iter().map(|a| a.address_for_lookup()).collect();
    let (reply, answer) = mpsc::channel();
    let resolved = symbolizer()
        .ok_or_else(|| "no symbolizer thread".to_string())
        .and_then(|tx| {
            tx.send(Job {
                pid,
                addrs: lookups,
                reply,
            })
            .map_err(|e| e.to_string())
        })
        .and_then(|()| answer.recv().map_err(|e| e.to_string())?);
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let address = a.address();
            let module = maps
                .iter()
                .find(|m| m.range.contains(&address))
                .and_then(|m| m.path.clone());
            let mut frame = NativeFrame {
                address: format!("{address:#x}"),
                function: None,
                offset: None,
                module,
                why: None,
            };
            match resolved.as_ref().map(|r| r.get(i)) {
                Ok(Some(Ok((name, offset)))) => {
                    frame.function = Some(name.clone());
                    // Return addresses are looked up one byte back (inside the call).
                    frame.offset = Some(offset + (address - a.address_for_lookup()));
                }
                Ok(Some(Err(why))) => frame.why = Some(why.clone()),
                Ok(None) => frame.why = Some("not symbolized".into()),
                Err(e) => frame.why = Some(e.clone()),
            }
            frame
        })
        .collect()
}

/// The native stack of thread `tid` of process `pid`: the thread is stopped at most `wait`
/// (plus the register and stack copy), then unwound and symbolized while it runs.
pub fn capture(pid: u32, tid: u32, wait: Duration) -> NativeReport {
    let t = Instant::now();
    let mut stopped_ms = 0.0;
    let result = maps(pid).and_then(|maps| {
        let s = Instant::now();
        let snap = snapshot(pid, tid, &maps, wait);
        stopped_ms = s.elapsed().as_secs_f64() * 1e3;
        let snap = snap?;
        let addrs = unwind(pid, &maps, &snap);
        if addrs.is_empty() {
            return Err(NativeError::NoCode(snap.ip));
        }
        Ok(symbolize(pid, &maps, &addrs))
    });
    let ms = t.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(frames) => NativeReport {
            frames,
            error: None,
            stopped_ms,
            ms,
        },
        Err(e) => NativeReport {
            frames: Vec::new(),
            error: Some(e.to_string()),
            stopped_ms,
            ms,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compact_native_stack_names_function_offset_and_module() {
        let f = |function: Option<&str>, module: Option<&str>| NativeFrame {
            address: "0x7f00".into(),
            function: function.map(Into::into),
            offset: Some(0x1b),
            module: module.map(Into::into),
            why: None,
        };
        let r = NativeReport {
            frames: vec![
                f(
                    Some("clock_nanosleep"),
                    Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                ),
                f(None, Some("/srv/server")),
                f(None, None),
            ],
            error: None,
            stopped_ms: 0.1,
            ms: 1.0,
        };
        assert_eq!(
            r.compact(5),
            "clock_nanosleep+0x1b (libc.so.6) < 0x7f00 (server) < 0x7f00"
        );
    }

    /// A real process exiting at any moment of the read: every capture ends in frames or in a
    /// reason, never a panic or a hang.
    #[test]
    fn a_process_that_exits_during_the_read_gives_a_reason() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test reads another process's stack: run it as root");
        }
        let mut reasons = Vec::new();
        for i in 0..20u64 {
            let mut child = std::process::Command::new("sleep")
                .arg("5")
                .spawn()
                .unwrap();
            let pid = child.id();
            let killer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_micros(i * 150));
                let _ = child.kill();
                let _ = child.wait();
            });
            let r = capture(pid, pid, Duration::from_millis(100));
            killer.join().unwrap();
            assert!(r.ms < 1000.0, "{r:?}");
            match &r.error {
                Some(e) => reasons.push(e.clone()),
                None => {
                    assert!(!r.frames.is_empty(), "{r:?}");
                    if i == 19 {
                        println!(
                            "sleep: {} ({} ms, stopped {} ms)",
                            r.compact(8),
                            r.ms,
                            r.stopped_ms
                        );
                    }
                }
            }
        }
        println!("reasons: {reasons:?}");
        // Past the kill the process is gone: the last read cannot succeed.
        let gone = capture(u32::MAX / 2, u32::MAX / 2, Duration::from_millis(10));
        assert!(gone.error.is_some(), "{gone:?}");
    }
}
