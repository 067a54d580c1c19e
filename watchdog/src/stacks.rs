//! The Python stack of the thread that owns a stuck request, read from outside before the first
//! action: py-spy used as a library, non-blocking (the process is never stopped or ptrace-
//! attached; its memory is read with process_vm_readv, which needs CAP_SYS_PTRACE), under a
//! time limit so that the action never waits long for it.
//!
//! On a gevent server the OS thread's current Python stack is the running greenlet's: the one
//! that spins or blocks, which is the one that owns the request.

mod pool;

use std::{time::Duration, time::Instant};

use serde::Serialize;

/// One Python frame, innermost first in a stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StackFrame {
    pub function: String,
    pub file: String,
    pub line: i32,
}

/// What the read found, and how long it took.
#[derive(Clone, Debug, Serialize)]
pub struct StackReport {
    /// The owning thread's frames, innermost first (empty when `error` says why).
    pub frames: Vec<StackFrame>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub ms: f64,
}

impl StackReport {
    /// The innermost few frames, for a log line: `spin (app.py:52) < handle (app.py:80)`.
    pub fn compact(&self, n: usize) -> String {
        if let Some(e) = &self.error {
            return format!("({e})");
        }
        self.frames
            .iter()
            .take(n)
            .map(|f| {
                let file = f.file.rsplit('/').next().unwrap_or(&f.file);
                format!("{} ({file}:{})", f.function, f.line)
            })
            .collect::<Vec<_>>()
            .join(" < ")
    }
}

/// Is `pid`'s executable a Python interpreter? (A readlink: no wait on the process's memory
/// lock, so the acting thread may ask.)
fn exe_is_python(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap_or_default()
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("python"))
}

/// Is `pid` a Python interpreter (its executable, or a libpython it loaded, as uWSGI does)?
/// Reading its maps waits on its memory lock: readers only.
pub fn is_python(pid: u32) -> bool {
    exe_is_python(pid)
        || std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .is_ok_and(|m| m.contains("libpython"))
}

/// What one capture found: the Python stack (a Python owner only) and the native frames.
#[derive(Debug, Default)]
pub struct Captured {
    pub stack: Option<StackReport>,
    pub native: Option<crate::native::NativeReport>,
}

/// Reads under way for one owner: started by `start`, collected by `finish`.
pub struct Pending {
    t: Instant,
    limit: Duration,
    /// Whether the executable says Python (a read that times out is then reported).
    python_exe: bool,
    /// The Python read: `None` from the reader when the process is no Python interpreter.
    python: Option<Reader<Option<PythonRead>>>,
    native: Option<Reader<crate::native::NativeReport>>,
}

/// A Python read's frames or why there are none.
type PythonRead = Result<Vec<StackFrame>, String>;

/// A read handed to the reader pool (or why it was not); its answer or why there is none.
type Reader<T> = Result<pool::Ticket<T>, String>;

/// Starts reading the Python stack of thread `tid` of process `pid` if it is a Python
/// interpreter, and (with `native`) its native frames, side by side on the reader pool's
/// threads. The reads of a whole batch start at once, so that the batch waits for them
/// together. Nothing here waits on the process (its maps are read by the reader).
pub fn start(pid: u32, tid: u32, limit: Duration, native: bool) -> Pending {
    let t = Instant::now();
    Pending {
        t,
        limit,
        python_exe: exe_is_python(pid),
        python: Some(pool::submit(move || is_python(pid).then(|| read(pid, tid)))),
        native: native.then(|| pool::submit(move || crate::native::capture(pid, tid, limit))),
    }
}

impl Pending {
    /// Reads not made (`why`): the record still says which stacks it lacks and why.
    pub fn skipped(pid: u32, native: bool, why: &'static str) -> Pending {
        let python_exe = exe_is_python(pid);
        Pending {
            t: Instant::now(),
            limit: Duration::ZERO,
            python_exe,
            python: python_exe.then(|| Err(why.to_string())),
            native: native.then(|| Err(why.to_string())),
        }
    }

    /// What the reads found, waiting at most until `limit` after their start (past that the
    /// record says they timed out and the reads are abandoned to the pool, unseen).
    pub fn finish(self) -> Captured {
        let (t, limit) = (self.t, self.limit);
        let ms = || t.elapsed().as_secs_f64() * 1e3;
        let python_exe = self.python_exe;
        let python = self.python.and_then(|rx| match wait(rx, t, limit) {
            Ok(None) => None,
            Ok(Some(r)) => Some(r),
            // Not known to be Python: a read that did not answer says nothing.
            Err(_) if !python_exe => None,
            Err(e) => Some(Err(e)),
        });
        let stack = python.map(|r| match r {
            Ok(frames) => StackReport {
                frames,
                error: None,
                ms: ms(),
            },
            Err(e) => StackReport {
                frames: Vec::new(),
                error: Some(e),
                ms: ms(),
            },
        });
        let native = self.native.map(|rx| match wait(rx, t, limit) {
            Ok(r) => r,
            Err(e) => crate::native::NativeReport {
                frames: Vec::new(),
                error: Some(e),
                stopped_ms: 0.0,
                ms: ms(),
            },
        });
        Captured { stack, native }
    }
}

/// The answer of a read started at `t`, if it comes within `limit` of `t`.
fn wait<T>(rx: Reader<T>, t: Instant, limit: Duration) -> Result<T, String> {
    rx?.wait_until(
        t + limit,
        &format!("timed out after {} ms", limit.as_millis()),
    )
}

/// py-spy memory-maps the interpreter and its libpython to parse them: a file the target's
/// user could truncate meanwhile would kill the daemon with SIGBUS. Read only when each is a
/// regular file owned by root and writable by nobody else (what a packaged Python is).
fn interpreter_files_trusted(pid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mut files = vec![format!("/proc/{pid}/exe")];
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
    files.extend(
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|path| path.contains("libpython"))
            .map(|path| format!("/proc/{pid}/root{path}")),
    );
    files.dedup();
    for f in files {
        let m = std::fs::metadata(&f).map_err(|e| format!("{f}: {e}"))?;
        if !m.is_file() || m.uid() != 0 || m.mode() & 0o022 != 0 {
            return Err(format!(
                "not read: {f} is not a root-owned file only root can write (a file the target \
                 can truncate is never mapped)"
            ));
        }
    }
    Ok(())
}

fn read(pid: u32, tid: u32) -> Result<Vec<StackFrame>, String> {
    interpreter_files_trusted(pid)?;
    let config = py_spy::Config {
        blocking: py_spy::config::LockingStrategy::NonBlocking,
        // A thread blocked in a C call (time.sleep, a socket read) counts as idle to py-spy.
        include_idle: true,
        native: false,
        ..py_spy::Config::default()
    };
    let mut spy =
        py_spy::PythonSpy::new(pid as py_spy::Pid, &config).map_err(|e| format!("{e:#}"))?;
    let traces = spy.get_stack_traces().map_err(|e| format!("{e:#}"))?;
    let owner = traces
        .iter()
        .find(|t| t.os_thread_id == Some(u64::from(tid)))
        .ok_or_else(|| format!("thread {tid} runs no Python code"))?;
    Ok(owner
        .frames
        .iter()
        .map(|f| StackFrame {
            function: f.name.clone(),
            file: f.filename.clone(),
            line: f.line,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compact_stack_reads_innermost_first() {
        let f = |function: &str, line| StackFrame {
            function: function.into(),
            file: "/srv/app.py".into(),
            line,
        };
        let r = StackReport {
            frames: vec![f("spin", 52), f("handle", 80), f("main", 99)],
            error: None,
            ms: 1.0,
        };
        assert_eq!(r.compact(2), "spin (app.py:52) < handle (app.py:80)");
        let e = StackReport {
            frames: vec![],
            error: Some("timed out after 20 ms".into()),
            ms: 20.0,
        };
        assert_eq!(e.compact(3), "(timed out after 20 ms)");
        assert!(
            !is_python(std::process::id()),
            "the test binary is not Python"
        );
    }
}
