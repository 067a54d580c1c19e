//! The Python stack of the thread that owns a stuck request, read from outside before the first
//! action: py-spy used as a library, non-blocking (the process is never stopped or ptrace-
//! attached; its memory is read with process_vm_readv, which needs CAP_SYS_PTRACE), under a
//! time limit so that the action never waits long for it.
//!
//! On a gevent server the OS thread's current Python stack is the running greenlet's: the one
//! that spins or blocks, which is the one that owns the request.

use std::{sync::mpsc, time::Duration, time::Instant};

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

/// Is `pid` a Python interpreter (its executable, or a libpython it loaded, as uWSGI does)?
pub fn is_python(pid: u32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    if exe
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("python"))
    {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains("libpython"))
}

/// The Python stack of thread `tid` of process `pid`, if it is a Python interpreter; waits at
/// most `limit` for it (past that the record says it timed out and the read finishes on its own
/// thread, unseen).
pub fn capture(pid: u32, tid: u32, limit: Duration) -> Option<StackReport> {
    if !is_python(pid) {
        return None;
    }
    let t = Instant::now();
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("watchdog-stack".into())
        .spawn(move || {
            let _ = tx.send(read(pid, tid));
        });
    let ms = || t.elapsed().as_secs_f64() * 1e3;
    let result = match spawned {
        Err(e) => Err(format!("no thread to read it: {e}")),
        Ok(_) => match rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {} ms", limit.as_millis())),
        },
    };
    Some(match result {
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
    })
}

fn read(pid: u32, tid: u32) -> Result<Vec<StackFrame>, String> {
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
