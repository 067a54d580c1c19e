//! Names of maps and programs, used by both sides. Userspace never spells them out itself.

/// Per-socket state (socket-local storage): `SockState`. Kernel only.
pub const MAP_SOCKS: &str = "SOCKS";
/// Tracked connections by socket cookie: `ConnRecord` (timer + `ConnInfo`).
pub const MAP_CONNS: &str = "CONNS";
/// Live tasks that own requests, by tid: `TaskInfo`.
pub const MAP_TASKS: &str = "TASKS";
/// Watched ports, indexed by port number (index 0 = every port): `PortConfig`.
pub const MAP_PORTS: &str = "PORTS";
/// Per-connection state by socket cookie, for the syscall probe set: `SockState`. Kernel only.
pub const MAP_SOCK_STATES: &str = "SOCK_STATES";
/// Processes (tgids) that accepted a tracked connection: the syscall set's cheap first filter.
pub const MAP_OWNERS: &str = "OWNERS";
/// Routes of watched ports: LPM trie, (port, method, path prefix) -> `RouteValue`.
pub const MAP_ROUTES: &str = "ROUTES";
/// Per-CPU scratch space for building a route key. Kernel only.
pub const MAP_SCRATCH: &str = "SCRATCH";
/// HTTP/2 streams in flight: `StreamKey` -> `StreamRecord` (timer + `StreamInfo` + head).
pub const MAP_STREAMS: &str = "STREAMS";
/// Stamp of a pinned state: `Meta` at index 0. Written by userspace only.
pub const MAP_META: &str = "META";
/// Rare events for userspace: `Event`.
pub const MAP_EVENTS: &str = "EVENTS";
/// Global counters (per CPU): see `stat`.
pub const MAP_STATS: &str = "STATS";
/// Per-port counters and histograms (per CPU): see `port_stat`.
pub const MAP_PORT_STATS: &str = "PORT_STATS";

/// sock_ops program: connection accepted, state changes (close, peer FIN).
pub const PROG_SOCK_OPS: &str = "conn_sock_ops";
/// tp_btf sock_recv_length: bytes in, request start.
pub const PROG_RECV: &str = "request_enter_recv";
/// tp_btf sock_send_length: bytes out, request end.
pub const PROG_SEND: &str = "request_exit_send";
/// tp_btf tcp_receive_reset: the peer reset the connection.
pub const PROG_RESET: &str = "conn_enter_receive_reset";
/// tp_btf sched_process_exit: drop what an exiting task owned.
pub const PROG_TASK_EXIT: &str = "task_exit";
/// tp_btf sched_process_exec: a non-leader thread's tid vanishes at exec.
pub const PROG_TASK_EXEC: &str = "task_exec";

/// iter/tcp: established connections on watched ports, open before the port was watched,
/// taken into tracking (run by the daemon at start and when a reload watches a new port).
pub const PROG_ADOPT: &str = "conn_adopt";
/// tp_btf inet_sock_set_state: close and peer FIN of adopted connections (sock_ops never saw
/// them, so it cannot have asked for their state changes).
pub const PROG_ADOPTED_STATE: &str = "conn_adopted_state";
/// iter/task_file (syscall set): processes holding a tracked socket join `OWNERS`.
pub const PROG_ADOPT_OWNERS: &str = "owners_adopt";

/// tp_btf sys_exit: the syscall probe set (accept, recv*, send*, read, write...).
pub const PROG_SYS_EXIT: &str = "syscall_exit";
/// tp_btf sched_process_fork: a child inherits its parent's tracked file table.
pub const PROG_FORK: &str = "task_fork";

/// Maps a restarted daemon opens from the pin directory (the kernel-only maps stay referenced
/// by the pinned programs).
pub const PINNED_MAPS: [&str; 9] = [
    MAP_CONNS,
    MAP_STREAMS,
    MAP_ROUTES,
    MAP_TASKS,
    MAP_PORTS,
    MAP_EVENTS,
    MAP_STATS,
    MAP_PORT_STATS,
    MAP_META,
];

/// Read-only globals of the eBPF object, set at load time.
pub const GLOBAL_PROBE_SET: &str = "PROBE_SET";
pub const GLOBAL_OFFSETS: &str = "OFFSETS";

/// BTF tracepoint names attached to, in the same order as the programs above.
pub const TP_RECV: &str = "sock_recv_length";
pub const TP_SEND: &str = "sock_send_length";
pub const TP_RESET: &str = "tcp_receive_reset";
pub const TP_TASK_EXIT: &str = "sched_process_exit";
pub const TP_TASK_EXEC: &str = "sched_process_exec";
pub const TP_SYS_EXIT: &str = "sys_exit";
pub const TP_FORK: &str = "sched_process_fork";
pub const TP_SET_STATE: &str = "inet_sock_set_state";
/// BPF iterator targets (`bpf_iter_<target>`), written as the hook of their programs.
pub const ITER_TCP: &str = "iter/tcp";
pub const ITER_TASK_FILE: &str = "iter/task_file";
