//! The native frames of the thread that owns a stuck request, for any language: a C extension,
//! libc, the interpreter or runtime itself.
//!
//! Registers cannot be read without stopping a thread, so this one thread (never the rest of
//! its process) is held for a moment: `PTRACE_SEIZE` + `PTRACE_INTERRUPT`, its registers and the
//! live part of its stack copied out (`process_vm_readv`), then `PTRACE_DETACH`. The unwinding
//! (DWARF CFI from each module's `.eh_frame`, with `framehop`; Debian's binaries have no frame
//! pointers) and the symbolization (`.symtab` / `.dynsym`) run afterwards on the copy, with the
//! thread already running again. Modules are read through `/proc/PID/map_files`, so this works
//! across containers and for deleted files, with bounded `pread`s into buffers of our own
//! (`native/elf.rs`), never a memory mapping, a perf map or a FIFO: a process cannot crash,
//! bloat or wedge the reader with what it maps (`native/cache.rs` bounds what is kept).

// Off x86_64 and aarch64 the register snapshot is `Unsupported` (`watchdog check` says so): the
// reading machinery below stays compiled, unused there.
#![cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]

mod cache;
mod elf;
mod symbols;

use std::{
    cell::Cell,
    collections::HashMap,
    ops::Range,
    sync::Arc,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::{ptrace, signal::Signal},
    unistd::Pid,
};
use serde::Serialize;

/// The deepest native stack recorded.
const MAX_FRAMES: usize = 64;
/// The most of the thread's stack copied out (from its stack pointer up).
const MAX_STACK_BYTES: u64 = 512 * 1024;

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
    #[cfg_attr(any(target_arch = "x86_64", target_arch = "aarch64"), allow(dead_code))]
    #[error("native stacks are read on x86_64 and aarch64 only")]
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
    /// The frame pointer: rbp, or x29.
    bp: u64,
    /// arm64's link register x30 (a leaf function's return address is only there); 0 on x86-64.
    lr: u64,
    stack: Vec<u8>,
}

/// (ip, sp, frame pointer, link register) from ptrace's `user_regs_struct` (arm64: read with
/// PTRACE_GETREGSET NT_PRSTATUS, `struct user_pt_regs`).
#[cfg(target_arch = "x86_64")]
fn registers(r: &libc::user_regs_struct) -> (u64, u64, u64, u64) {
    (r.rip, r.rsp, r.rbp, 0)
}
#[cfg(target_arch = "aarch64")]
fn registers(r: &libc::user_regs_struct) -> (u64, u64, u64, u64) {
    (r.pc, r.sp, r.regs[29], r.regs[30])
}

/// Detaches on every way out once the thread is seized (the signal that stopped it, if any,
/// is delivered on the way).
struct Seized {
    tid: Pid,
    resend: Option<Signal>,
    attached: bool,
}

thread_local! {
    /// Set when this thread may still trace a thread it could not detach (it never stopped):
    /// only the tracer's exit detaches it, so a pooled reader that sees this ends and is
    /// replaced (see `stacks`), or the traced thread would wait for it at its next signal.
    static STILL_TRACING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread must end to let go of a thread it traced (and clears the mark).
pub fn must_end_to_detach() -> bool {
    STILL_TRACING.with(|s| s.replace(false))
}

impl Drop for Seized {
    fn drop(&mut self) {
        if self.attached && ptrace::detach(self.tid, self.resend).is_err() {
            STILL_TRACING.with(|s| s.set(true));
        }
    }
}

/// Stops thread `tid` of `pid`, copies its registers and stack, lets it go. `wait` bounds the
/// wait for the stop (a thread in uninterruptible sleep stops only when it leaves it).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn snapshot(pid: u32, tid: u32, maps: &[Mapping], wait: Duration) -> Result<Snapshot, NativeError> {
    use nix::sys::{
        uio::{process_vm_readv, RemoteIoVec},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    };
    use std::io::IoSliceMut;
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
                    // The thread stays seized until this reading thread ends (the kernel then
                    // detaches it): `Seized`'s drop marks this thread to end.
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
    let (ip, sp, bp, lr) = registers(&regs);
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
        ip,
        sp,
        bp,
        lr,
        stack,
    })
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn snapshot(_: u32, _: u32, _: &[Mapping], _: Duration) -> Result<Snapshot, NativeError> {
    Err(NativeError::Unsupported)
}

/// The most distinct files one capture reads (a process can map thousands; a stack passes
/// through a few): past it the rest are left out and unwinding stops at their frames.
const MAX_MODULES: usize = 256;

/// The files a capture uses: each with its mapped range, load bias and what was read of it
/// (or why nothing was).
type Modules = HashMap<cache::FileKey, (Range<u64>, u64, Result<Arc<elf::Module>, String>)>;

/// Reads (or finds cached) each mapped file's CFI and symbols, at most `MAX_MODULES` of them.
fn modules(pid: u32, maps: &[Mapping]) -> Modules {
    let mut seen: Modules = HashMap::new();
    for m in maps.iter().filter(|m| m.inode != 0 && m.path.is_some()) {
        let key = (m.dev, m.inode);
        if let Some(entry) = seen.get_mut(&key) {
            entry.0.start = entry.0.start.min(m.range.start);
            entry.0.end = entry.0.end.max(m.range.end);
            continue;
        }
        if seen.len() >= MAX_MODULES {
            break;
        }
        let module = cache::module(pid, m);
        let bias = match &module {
            Ok(info) => match info.bias(m.range.start, m.offset) {
                Some(b) => b,
                None => continue,
            },
            Err(_) => 0,
        };
        seen.insert(key, (m.range.clone(), bias, module));
    }
    seen
}

/// Unwinds the snapshot with each mapped file's CFI (frame pointers where there is none, as in
/// JIT code); the addresses innermost first.
fn unwind(maps: &[Mapping], modules: &Modules, snap: &Snapshot) -> Vec<framehop::FrameAddress> {
    #[cfg(target_arch = "aarch64")]
    use framehop::aarch64::{
        CacheAarch64 as Cache, UnwindRegsAarch64 as Regs, UnwinderAarch64 as Native,
    };
    #[cfg(not(target_arch = "aarch64"))]
    use framehop::x86_64::{
        CacheX86_64 as Cache, UnwindRegsX86_64 as Regs, UnwinderX86_64 as Native,
    };
    use framehop::{ExplicitModuleSectionInfo, Module, Unwinder};
    let mut unwinder = Native::<elf::Buf>::new();
    for (key, (range, bias, info)) in modules {
        let Ok(info) = info else { continue };
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
        let name = format!("{}:{}", key.0, key.1);
        unwinder.add_module(Module::new(name, range.clone(), *bias, section_info));
    }
    let base = snap.sp;
    let stack = &snap.stack;
    let mut read = |addr: u64| -> Result<u64, ()> {
        let at = addr.checked_sub(base).ok_or(())? as usize;
        let bytes = stack.get(at..at.checked_add(8).ok_or(())?).ok_or(())?;
        Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
    };
    let mut cache = Cache::<_>::new();
    #[cfg(target_arch = "aarch64")]
    let regs = Regs::new(snap.lr, snap.sp, snap.bp);
    #[cfg(not(target_arch = "aarch64"))]
    let regs = {
        let _ = snap.lr;
        Regs::new(snap.ip, snap.sp, snap.bp)
    };
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

/// Names each address from the symbols of the file mapped there (read by `modules`, never
/// through a path the process controls, a perf map or a memory mapping of its files).
fn symbolize(
    maps: &[Mapping],
    modules: &Modules,
    addrs: &[framehop::FrameAddress],
) -> Vec<NativeFrame> {
    addrs
        .iter()
        .map(|a| {
            let address = a.address();
            let mapping = maps.iter().find(|m| m.range.contains(&address));
            let mut frame = NativeFrame {
                address: format!("{address:#x}"),
                function: None,
                offset: None,
                module: mapping.and_then(|m| m.path.clone()),
                why: None,
            };
            let found = match mapping.map(|m| (m, modules.get(&(m.dev, m.inode)))) {
                None => Err("in no mapping".to_string()),
                Some((m, _)) if m.inode == 0 => Err(match m.path.as_deref() {
                    Some("[vdso]") => "the vDSO is not symbolized".to_string(),
                    _ => "anonymous memory (JIT code?)".to_string(),
                }),
                Some((_, None)) => Err(format!("past the {MAX_MODULES} files read")),
                Some((_, Some((_, _, Err(e))))) => Err(format!("file not read: {e}")),
                Some((_, Some((_, bias, Ok(info))))) => match &info.symbols {
                    Err(e) => Err(format!("no symbols: {e}")),
                    Ok(symbols) => a
                        .address_for_lookup()
                        .checked_sub(*bias)
                        .and_then(|svma| symbols.lookup(svma))
                        .ok_or_else(|| "no symbol contains the address".to_string()),
                },
            };
            match found {
                Ok((name, offset)) => {
                    frame.function = Some(name);
                    // Return addresses are looked up one byte back (inside the call).
                    frame.offset = Some(offset + (address - a.address_for_lookup()));
                }
                Err(why) => frame.why = Some(why),
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
        let modules = modules(pid, &maps);
        let addrs = unwind(&maps, &modules, &snap);
        if addrs.is_empty() {
            return Err(NativeError::NoCode(snap.ip));
        }
        Ok(symbolize(&maps, &modules, &addrs))
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
