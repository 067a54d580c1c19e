//! What a worker was doing when its request crossed the budget: read from /proc before the first
//! action, attached to the log line and the event stream.

use std::{collections::HashMap, fs, net::SocketAddr};

use serde::Serialize;

use crate::process;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Diagnosis {
    /// Thread state letter and name (`R (running)`, `S (sleeping)`, ...).
    pub thread_state: String,
    /// The system call the thread is in, with its arguments (`recvfrom(fd=5, 0x7f.., 8192, ...)`),
    /// or `running` when it is in user space.
    pub syscall: String,
    pub wchan: String,
    pub kernel_stack: Vec<String>,
    pub cmdline: String,
    pub cgroup: String,
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    /// The process's TCP connections other than listening sockets: `local -> peer (state)`.
    pub connections: Vec<String>,
    /// If the syscall's first argument is a TCP socket: "reading from 10.0.0.5:5432" style text.
    pub waiting_on: Option<String>,
}

/// The per-process pieces of a diagnosis that cost O(connections) to read (the TCP table, the fd
/// table). One batch of due steps shares them: a burst of 256 over-budget requests in one
/// process reads them once, not 256 times.
#[derive(Default)]
pub struct Cache {
    procs: HashMap<u32, ProcSockets>,
}

struct ProcSockets {
    table: HashMap<u64, Sock>,
    /// The process's connections other than listening sockets, as shown.
    connections: Vec<String>,
}

impl Cache {
    fn sockets(&mut self, pid: u32) -> &ProcSockets {
        self.procs.entry(pid).or_insert_with(|| {
            let table = socket_table(pid);
            let mut connections: Vec<String> = own_sockets(pid)
                .iter()
                .filter_map(|i| table.get(i))
                .filter(|s| s.state != "LISTEN")
                .map(|s| format!("{} -> {} ({})", s.local, s.remote, s.state))
                .collect();
            connections.sort();
            connections.truncate(32);
            ProcSockets { table, connections }
        })
    }
}

/// Captures the diagnosis of thread `tid` of process `pid`. Missing pieces stay empty.
pub fn capture(pid: u32, tid: u32, cache: &mut Cache) -> Diagnosis {
    let task = format!("/proc/{pid}/task/{tid}");
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let thread_state = read(&format!("{task}/status"))
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let raw_syscall = read(&format!("{task}/syscall"));
    let (syscall, first_arg) = describe_syscall(raw_syscall.trim());
    let cgroup = process::cgroup_path(pid).unwrap_or_default();
    let (pod_uid, container_id) = process::container_of(&cgroup);
    let sockets = cache.sockets(pid);
    let waiting_on = first_arg.and_then(|fd| {
        let link = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
        let inode = socket_inode(&link.to_string_lossy())?;
        let s = sockets.table.get(&inode)?;
        let verb = if is_read_syscall(&syscall) {
            "reading from"
        } else {
            "waiting on"
        };
        Some(format!("{verb} {} (fd {fd}, local {})", s.remote, s.local))
    });
    let connections = sockets.connections.clone();
    Diagnosis {
        thread_state,
        syscall,
        wchan: read(&format!("{task}/wchan")),
        kernel_stack: read(&format!("{task}/stack"))
            .lines()
            .map(|l| l.split_once(' ').map_or(l, |(_, f)| f).to_string())
            .take(16)
            .collect(),
        cmdline: read(&format!("/proc/{pid}/cmdline"))
            .replace('\0', " ")
            .trim()
            .to_string(),
        cgroup,
        pod_uid,
        container_id,
        connections,
        waiting_on,
    }
}

fn is_read_syscall(s: &str) -> bool {
    [
        "read(",
        "readv(",
        "recvfrom(",
        "recvmsg(",
        "recvmmsg(",
        "pread64(",
    ]
    .iter()
    .any(|p| s.starts_with(p))
}

/// `/proc/.../syscall` is `NR arg0 arg1 ... sp pc`, `running`, or `-1 sp pc` (not in a syscall).
fn describe_syscall(raw: &str) -> (String, Option<u64>) {
    let mut it = raw.split_whitespace();
    let Some(nr) = it.next() else {
        return (String::new(), None);
    };
    let Ok(nr) = nr.parse::<i64>() else {
        return (raw.to_string(), None);
    };
    if nr < 0 {
        return ("none (between system calls)".into(), None);
    }
    let args: Vec<u64> = it
        .take(6)
        .filter_map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .collect();
    let name = syscall_name(nr).map_or_else(|| format!("syscall_{nr}"), str::to_string);
    let fd_first = matches!(
        name.as_str(),
        "read"
            | "write"
            | "readv"
            | "writev"
            | "recvfrom"
            | "sendto"
            | "recvmsg"
            | "sendmsg"
            | "pread64"
            | "accept"
            | "accept4"
            | "connect"
            | "recvmmsg"
    );
    let shown = args.iter().take(4).enumerate().map(|(i, a)| {
        if i == 0 && fd_first {
            format!("fd={a}")
        } else {
            format!("{a:#x}")
        }
    });
    (
        format!("{name}({}, ...)", shown.collect::<Vec<_>>().join(", ")),
        if fd_first {
            args.first().copied()
        } else {
            None
        },
    )
}

/// x86_64 numbers of the system calls a stuck worker is usually in.
fn syscall_name(nr: i64) -> Option<&'static str> {
    Some(match nr {
        0 => "read",
        1 => "write",
        7 => "poll",
        17 => "pread64",
        19 => "readv",
        20 => "writev",
        23 => "select",
        35 => "nanosleep",
        42 => "connect",
        43 => "accept",
        44 => "sendto",
        45 => "recvfrom",
        46 => "sendmsg",
        47 => "recvmsg",
        61 => "wait4",
        202 => "futex",
        230 => "clock_nanosleep",
        232 => "epoll_wait",
        270 => "pselect6",
        271 => "ppoll",
        281 => "epoll_pwait",
        288 => "accept4",
        299 => "recvmmsg",
        441 => "epoll_pwait2",
        _ => return None,
    })
}

struct Sock {
    local: SocketAddr,
    remote: SocketAddr,
    state: String,
}

fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn own_sockets(pid: u32) -> Vec<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return vec![];
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| socket_inode(&l.to_string_lossy()))
        .collect()
}

/// TCP sockets in the process's network namespace, by inode.
fn socket_table(pid: u32) -> HashMap<u64, Sock> {
    let mut out = HashMap::new();
    let Ok(p) = procfs::process::Process::new(pid as i32) else {
        return out;
    };
    let entries = p
        .tcp()
        .unwrap_or_default()
        .into_iter()
        .chain(p.tcp6().unwrap_or_default());
    for e in entries {
        out.insert(
            e.inode,
            Sock {
                local: e.local_address,
                remote: e.remote_address,
                state: format!("{:?}", e.state).to_uppercase(),
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_lines() {
        assert_eq!(describe_syscall("running"), ("running".into(), None));
        assert_eq!(
            describe_syscall("-1 0x7ffd 0x7f00").0,
            "none (between system calls)"
        );
        let (s, fd) = describe_syscall("45 0x5 0x7f0000 0x2000 0x0 0x0 0x0 0x7ffd 0x7f00");
        assert_eq!(s, "recvfrom(fd=5, 0x7f0000, 0x2000, 0x0, ...)");
        assert_eq!(fd, Some(5));
        assert!(
            describe_syscall("230 0x1 0x0 0x7ffd 0x0 0x0 0x0 0x7ffd 0x7f00")
                .0
                .starts_with("clock_nanosleep(")
        );
    }

    #[test]
    fn captures_this_process() {
        let pid = std::process::id();
        // SAFETY: gettid has no failure mode.
        let tid = unsafe { libc::gettid() } as u32;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let d = capture(pid, tid, &mut Cache::default());
        assert!(d.thread_state.starts_with('R'), "{}", d.thread_state);
        assert!(!d.cmdline.is_empty());
        let port = listener.local_addr().unwrap().port();
        assert!(
            d.connections
                .iter()
                .any(|c| c.contains(&format!(":{port}"))),
            "{:?}",
            d.connections
        );
    }
}
