//! What a worker was doing when its request crossed the budget: read from /proc before the first
//! action, attached to the log line and the event stream.

use std::{
    collections::HashMap,
    fs,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
};

use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};

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

/// The process's connection list, read once per batch of due steps: a burst of 256 over-budget
/// requests in one process reads it once, not 256 times.
///
/// Whole diagnoses are kept per thread (and its life stamp, so a reused tid is read anew) for
/// `THREAD_TTL` too: an event-loop thread that owns a thousand over-budget requests is in one
/// state at one instant, and is read once, not once per batch of a burst (twenty batches of a
/// burst of 5,000 took 80 reads of four threads, about 55 µs each, in front of the actions).
///
/// A process's connection list is kept across batches for `CONNECTIONS_TTL`: listing it walks
/// the process's descriptor table in /proc (a thousand entries at a time for a server holding
/// 15,000 connections), which a burst arriving in twenty batches would otherwise do twenty
/// times, in front of the actions.
#[derive(Default)]
pub struct Cache {
    procs: HashMap<u32, (std::time::Instant, Vec<String>)>,
    threads: HashMap<(u32, u32, u64), (std::time::Instant, Arc<Diagnosis>)>,
}

/// How long a process's connection list is reused.
const CONNECTIONS_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a thread's diagnosis is reused: a few batches of a burst, far below any budget.
const THREAD_TTL: std::time::Duration = std::time::Duration::from_millis(5);

impl Cache {
    /// A new batch: thread states older than `THREAD_TTL` and connection lists older than
    /// `CONNECTIONS_TTL` are dropped.
    pub fn next_batch(&mut self) {
        let now = std::time::Instant::now();
        self.threads
            .retain(|_, (at, _)| now.duration_since(*at) < THREAD_TTL);
        self.procs
            .retain(|_, (at, _)| now.duration_since(*at) < CONNECTIONS_TTL);
    }

    /// Is this thread's diagnosis read already (`life`: its `TASKS` life stamp)?
    #[cfg(test)]
    pub fn has(&self, pid: u32, tid: u32, life: u64) -> bool {
        self.threads.contains_key(&(pid, tid, life))
    }

    /// This process's connection list, if read within `CONNECTIONS_TTL`.
    pub fn connections_of(&self, pid: u32) -> Option<Vec<String>> {
        self.procs.get(&pid).map(|(_, c)| c.clone())
    }

    /// A diagnosis read elsewhere (`read`, on a helper thread): kept for this thread and its
    /// process's connection list for the process.
    pub fn remember(&mut self, pid: u32, tid: u32, life: u64, d: Arc<Diagnosis>) {
        let now = std::time::Instant::now();
        self.procs
            .entry(pid)
            .or_insert_with(|| (now, d.connections.clone()));
        self.threads.insert((pid, tid, life), (now, d));
    }

    /// This thread's diagnosis, if read within `THREAD_TTL`.
    pub fn get(&self, pid: u32, tid: u32, life: u64) -> Option<Arc<Diagnosis>> {
        self.threads.get(&(pid, tid, life)).map(|(_, d)| d.clone())
    }
}

/// The process's TCP connections other than listening sockets (at most `MAX_CONNECTIONS`).
fn list_connections(pid: u32) -> Vec<String> {
    let mut c: Vec<String> = match crate::actions::pidfd_open(pid, 0) {
        Ok(pidfd) => socket_fds(pid)
            .filter_map(|fd| tcp_socket(&pidfd, fd))
            .filter(|s| s.state != "LISTEN")
            .map(|s| s.to_string())
            .take(MAX_CONNECTIONS)
            .collect(),
        Err(_) => Vec::new(),
    };
    c.sort();
    c
}

/// At most this many of a process's connections are listed.
const MAX_CONNECTIONS: usize = 32;

/// Reads the diagnosis of thread `tid` of process `pid`. Missing pieces stay empty.
///
/// It reads only what is cheap (about 0.2 ms in all): `stat` rather than `status` for the
/// state, and the cgroup path the caller already has; `connections`, when the caller has the
/// process's list already. Some of these files take the target's memory lock
/// (`/proc/PID/cmdline`): a target stuck in a page fault with a thread waiting to unmap blocks
/// this read, so it runs on a helper thread under a time limit, never on the acting thread
/// (`daemon/probe.rs`).
pub fn read(
    pid: u32,
    tid: u32,
    cgroup: Option<String>,
    connections: Option<Vec<String>>,
) -> Diagnosis {
    let task = format!("/proc/{pid}/task/{tid}");
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let thread_state = thread_state(&read(&format!("{task}/stat")));
    let raw_syscall = read(&format!("{task}/syscall"));
    let (syscall, first_arg) = describe_syscall(raw_syscall.trim());
    let cgroup = cgroup
        .or_else(|| process::cgroup_path(pid))
        .unwrap_or_default();
    let (pod_uid, container_id) = process::container_of(&cgroup);
    let waiting_on = first_arg.and_then(|fd| {
        let pidfd = crate::actions::pidfd_open(pid, 0).ok()?;
        let s = tcp_socket(&pidfd, i32::try_from(fd).ok()?)?;
        let verb = if is_read_syscall(&syscall) {
            "reading from"
        } else {
            "waiting on"
        };
        Some(format!("{verb} {} (fd {fd}, local {})", s.remote?, s.local))
    });
    let connections = connections.unwrap_or_else(|| list_connections(pid));
    Diagnosis {
        thread_state,
        syscall,
        wchan: read(&format!("{task}/wchan")),
        kernel_stack: read(&format!("{task}/stack"))
            .lines()
            .map(|l| l.split_once(' ').map_or(l, |(_, f)| f).to_string())
            .take(16)
            .collect(),
        cmdline: cmdline(pid),
        cgroup,
        pod_uid,
        container_id,
        connections,
        waiting_on,
    }
}

/// Most of a command line kept in a diagnosis (records, the event stream, the log): an
/// argument list can be megabytes, and is not the daemon's to copy whole.
pub const CMDLINE_MAX: usize = 1024;

/// The owner's command line, arguments separated by spaces, at most `CMDLINE_MAX` bytes read
/// (cut at a character boundary, `…` marking the cut).
fn cmdline(pid: u32) -> String {
    use std::io::Read;
    let mut buf = Vec::with_capacity(CMDLINE_MAX + 1);
    if let Ok(f) = fs::File::open(format!("/proc/{pid}/cmdline")) {
        let _ = f.take(CMDLINE_MAX as u64 + 1).read_to_end(&mut buf);
    }
    capped_cmdline(&buf)
}

fn capped_cmdline(raw: &[u8]) -> String {
    let cut = raw.len() > CMDLINE_MAX;
    let mut s = String::from_utf8_lossy(&raw[..raw.len().min(CMDLINE_MAX)]).replace('\0', " ");
    if cut {
        // A lossy cut may end in U+FFFD; keep at most CMDLINE_MAX bytes of text.
        while s.len() > CMDLINE_MAX - 3 {
            s.pop();
        }
        s.push('…');
    }
    s.trim().to_string()
}

/// `R (running)` style text from the state letter of a `/proc/.../stat` line.
fn thread_state(stat: &str) -> String {
    let Some(letter) = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
    else {
        return String::new();
    };
    let name = match letter {
        "R" => "running",
        "S" => "sleeping",
        "D" => "disk sleep",
        "T" => "stopped",
        "t" => "tracing stop",
        "Z" => "zombie",
        "X" => "dead",
        "I" => "idle",
        "P" => "parked",
        _ => "",
    };
    format!("{letter} ({name})")
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

/// Other architectures: the number is shown as it is (no table for them yet).
#[cfg(not(target_arch = "x86_64"))]
fn syscall_name(_nr: i64) -> Option<&'static str> {
    None
}

/// x86_64 numbers of the system calls a stuck worker is usually in.
#[cfg(target_arch = "x86_64")]
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

/// One TCP socket of another process.
struct Sock {
    local: SocketAddr,
    /// `None` for a socket that is not connected (a listener).
    remote: Option<SocketAddr>,
    state: &'static str,
}

impl std::fmt::Display for Sock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.remote {
            Some(r) => write!(f, "{} -> {r} ({})", self.local, self.state),
            None => write!(f, "{} ({})", self.local, self.state),
        }
    }
}

/// The descriptors of `pid` that are sockets (from the names of its /proc fd links), read lazily:
/// a server holding 15,000 connections costs a link read per descriptor, so the caller stops as
/// soon as it has listed enough (this was 1 ms per over-budget request at that scale).
pub(crate) fn socket_fds(pid: u32) -> impl Iterator<Item = i32> {
    FdNumbers::open(pid)
        .into_iter()
        .flatten()
        .filter(move |fd| {
            fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
}

/// The descriptor numbers of a process, from `/proc/PID/fd`, read `FD_DIR_BUF` bytes (about 60
/// entries) at a time. The kernel builds an entry for each name it returns, so a directory
/// read through the C library's 32 KiB buffer cost about 1.2 ms (a thousand entries) in a
/// process holding 12,500 connections, when the diagnosis wants its first 32 sockets.
struct FdNumbers {
    dir: OwnedFd,
    buf: Vec<u8>,
    len: usize,
    pos: usize,
    done: bool,
}

const FD_DIR_BUF: usize = 2048;

impl FdNumbers {
    fn open(pid: u32) -> Option<Self> {
        let path = std::ffi::CString::new(format!("/proc/{pid}/fd")).ok()?;
        // SAFETY: open of a NUL-terminated path; on success the descriptor is ours.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        Some(Self {
            // SAFETY: a freshly opened descriptor.
            dir: unsafe { OwnedFd::from_raw_fd(fd) },
            buf: vec![0; FD_DIR_BUF],
            len: 0,
            pos: 0,
            done: false,
        })
    }
}

impl Iterator for FdNumbers {
    type Item = i32;

    fn next(&mut self) -> Option<i32> {
        loop {
            // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, then the name.
            if self.pos + 19 <= self.len {
                let at = self.pos;
                let reclen =
                    usize::from(u16::from_ne_bytes([self.buf[at + 16], self.buf[at + 17]]));
                if reclen == 0 || at + reclen > self.len {
                    self.done = true;
                    return None;
                }
                self.pos += reclen;
                let name = &self.buf[at + 19..at + reclen];
                let name = name.split(|&b| b == 0).next().unwrap_or_default();
                match std::str::from_utf8(name).ok().and_then(|n| n.parse().ok()) {
                    Some(fd) => return Some(fd),
                    None => continue, // `.` and `..`
                }
            }
            if self.done {
                return None;
            }
            // SAFETY: getdents64 into a buffer we own, with its length; it writes at most that.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    self.dir.as_raw_fd(),
                    self.buf.as_mut_ptr(),
                    self.buf.len(),
                )
            };
            if n <= 0 {
                self.done = true;
                return None;
            }
            (self.len, self.pos) = (n as usize, 0);
        }
    }
}

/// Reads socket `fd` of the process behind `pidfd` through a duplicate of it (`pidfd_getfd`,
/// Linux 5.6, needs ptrace rights over the process): O(1), where reading /proc/net/tcp walks
/// every socket of the namespace (24 ms with ~1.1k sockets here, most of the enforcement
/// lateness before this). `None` if it is not a TCP socket.
fn tcp_socket(pidfd: &OwnedFd, fd: i32) -> Option<Sock> {
    // SAFETY: plain syscall; on success the return value is a new descriptor we own.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return None;
    }
    // SAFETY: a freshly duplicated descriptor.
    let dup = unsafe { OwnedFd::from_raw_fd(dup as i32) };
    let proto: i32 = sockopt_int(&dup, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    if proto != libc::IPPROTO_TCP {
        return None;
    }
    // struct tcp_info starts with the u8 tcpi_state.
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt into a buffer we own, with its length.
    let r = unsafe {
        libc::getsockopt(
            dup.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    let addr = |s: SockaddrStorage| -> Option<SocketAddr> {
        if let Some(a) = s.as_sockaddr_in() {
            return Some(SocketAddr::from(*a));
        }
        s.as_sockaddr_in6().map(|a| SocketAddr::from(*a))
    };
    let local = addr(getsockname::<SockaddrStorage>(dup.as_raw_fd()).ok()?)?;
    let remote = getpeername::<SockaddrStorage>(dup.as_raw_fd())
        .ok()
        .and_then(addr);
    Some(Sock {
        local,
        remote,
        state: tcp_state(info[0]),
    })
}

fn sockopt_int(fd: &OwnedFd, level: i32, name: i32) -> Option<i32> {
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: getsockopt into an int we own, with its length.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::addr_of_mut!(v).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// Names of the kernel's TCP states (include/net/tcp_states.h).
fn tcp_state(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_capped() {
        assert_eq!(
            capped_cmdline(b"python3\0app.py\08080\0"),
            "python3 app.py 8080"
        );
        let long = vec![b'a'; 100_000];
        let c = capped_cmdline(&long[..CMDLINE_MAX + 1]);
        assert!(c.len() <= CMDLINE_MAX, "{}", c.len());
        assert!(c.ends_with('…'));
        // A multi-byte character cut in half is not kept half.
        let mut odd = vec![b'a'; CMDLINE_MAX - 1];
        odd.extend("é".as_bytes());
        assert!(capped_cmdline(&odd).len() <= CMDLINE_MAX);
    }

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
    fn thread_state_reads_the_letter_after_the_command_name() {
        assert_eq!(thread_state("42 (a) b) S 1 2 3"), "S (sleeping)");
        assert_eq!(thread_state("7 (x) D 1"), "D (disk sleep)");
        assert_eq!(thread_state(""), "");
    }

    #[test]
    fn captures_this_process() {
        let pid = std::process::id();
        // SAFETY: gettid has no failure mode.
        let tid = unsafe { libc::gettid() } as u32;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let d = read(pid, tid, None, None);
        assert_eq!(d.thread_state, "R (running)");
        assert_eq!(Some(d.cgroup.clone()), process::cgroup_path(pid));
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

    #[test]
    fn descriptor_numbers_read_a_small_buffer_at_a_time_and_miss_none() {
        // Enough descriptors that the listing takes several reads of the buffer.
        let held: Vec<std::fs::File> = (0..300)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let pid = std::process::id();
        let mut ours: Vec<i32> = FdNumbers::open(pid).unwrap().collect();
        let mut std_list: Vec<i32> = fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        ours.sort_unstable();
        std_list.sort_unstable();
        // Each listing opens one directory descriptor of its own, which the other may show.
        let (a, b): (std::collections::BTreeSet<_>, std::collections::BTreeSet<_>) = (
            ours.iter().copied().collect(),
            std_list.iter().copied().collect(),
        );
        assert!(a.symmetric_difference(&b).count() <= 2, "{a:?} vs {b:?}");
        assert_eq!(a.len(), ours.len(), "no descriptor listed twice");
        for f in &held {
            assert!(a.contains(&f.as_raw_fd()), "fd {} missing", f.as_raw_fd());
        }
        assert!(ours.len() > 300);
        assert!(FdNumbers::open(u32::MAX).is_none());
    }

    #[test]
    fn a_thread_is_kept_once_per_life_stamp_for_a_few_milliseconds() {
        let pid = std::process::id();
        let mut cache = Cache::default();
        let a = Arc::new(read(pid, pid, None, None));
        cache.remember(pid, pid, 7, a.clone());
        cache.next_batch();
        assert!(cache.has(pid, pid, 7), "kept for the next batch");
        assert!(Arc::ptr_eq(&a, &cache.get(pid, pid, 7).unwrap()));
        assert_eq!(cache.connections_of(pid), Some(a.connections.clone()));
        // Another life stamp is another task, even with the same tid.
        assert!(!cache.has(pid, pid, 8));
        std::thread::sleep(THREAD_TTL + std::time::Duration::from_millis(1));
        cache.next_batch();
        assert!(!cache.has(pid, pid, 7), "read afresh after THREAD_TTL");
    }
}
