//! Configuration: the TOML file (or the `run` flags) parsed into serde structs (`raw.rs`), then
//! validated in one place (`validate.rs`, `flags.rs`) into a `Config` the rest of the daemon can
//! trust. `values.rs` holds the value syntaxes, `crate::routes` the route patterns.

mod flags;
mod raw;
mod secret;
mod validate;
mod values;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

pub use flags::{Overrides, PolicyFlags, Source};
pub use secret::read_password;
pub use values::{Dur, Glob, PortRange, Sig};

use crate::routes::Route;

/// Largest config file accepted: it decides what gets killed, it has no reason to be large.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Errors of reading and validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (the reason is the source, not part of this message: an
    /// error chain prints each once).
    #[error("{path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not acceptable as a config file (size, encoding, permissions).
    #[error("{path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    /// TOML syntax, an unknown key, or a value of the wrong form (with line and column).
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// The file parsed but does not make sense.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        path: String,
        field: String,
        reason: String,
    },
    /// The same, for a value whose place in the file is known.
    #[error("{path}: line {line}: {field}: {reason}")]
    InvalidAt {
        path: String,
        line: usize,
        field: String,
        reason: String,
    },
}

/// Enforce, or only log what would be done.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Observe,
}

/// Who receives a signal.
#[derive(
    Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The whole process (thread group) that owns the request.
    #[default]
    Process,
    /// Only the thread that received the request's first bytes.
    Thread,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Which kernel probe set to use (see `kernel_btf::ProbeSet`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Probes {
    /// The sock tracepoints where the kernel has them (6.3+), else the syscall set.
    #[default]
    Auto,
    /// sock:sock_recv_length / sock_send_length.
    Sock,
    /// raw_syscalls:sys_exit with an fd-to-socket walk.
    Syscalls,
}

/// What SIGINT (Ctrl-C) does to the pinned kernel state. SIGTERM always keeps it.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnInterrupt {
    /// Detach the kernel programs, as `watchdog unload` does: a terminal session leaves nothing.
    #[default]
    Unload,
    /// Keep them pinned for the next start, as SIGTERM does.
    Keep,
}

/// Which processes a policy (or the protect list) covers. Empty lists match everything.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Processes and all their descendants.
    #[serde(default)]
    pub pids: Vec<u32>,
    /// Globs on the process name (`/proc/PID/comm`).
    #[serde(default)]
    pub comm: Vec<Glob>,
    /// Globs on the executable path (`/proc/PID/exe`).
    #[serde(default)]
    pub exe: Vec<Glob>,
    /// Globs on the cgroup v2 path (`/proc/PID/cgroup`, the `0::` line; v1 lines as fallback).
    #[serde(default)]
    pub cgroup: Vec<Glob>,
    /// Globs on the Kubernetes pod UID read from the cgroup path (dashes, as the API shows it).
    #[serde(default)]
    pub pod_uid: Vec<Glob>,
    /// Globs on the container id read from the cgroup path (64 hex digits; `abc123*` works).
    #[serde(default)]
    pub container_id: Vec<Glob>,
    /// Kubernetes namespace names (globs work too), from the kubelet's log directories
    /// (`pods.rs`).
    #[serde(default)]
    pub namespace: Vec<Glob>,
    /// Globs on the pod name (`api-*`), from the same directories.
    #[serde(default)]
    pub pod: Vec<Glob>,
    /// Globs on the container name as the pod spec gives it (`app`), from the same directories.
    #[serde(default)]
    pub container: Vec<Glob>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
            && self.comm.is_empty()
            && self.exe.is_empty()
            && self.cgroup.is_empty()
            && self.pod_uid.is_empty()
            && self.container_id.is_empty()
            && self.namespace.is_empty()
            && self.pod.is_empty()
            && self.container.is_empty()
    }
}

/// What one step of a ladder does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Signal(Sig),
    /// Abort the request's TCP connection (SOCK_DESTROY).
    Reset,
    /// Only log.
    Log,
    /// `KILL QUERY` on the MySQL/MariaDB connection of the request (`mysql.rs`), through the
    /// policy's `mysql` account.
    KillQuery,
}

impl Action {
    /// Bounded label for metrics.
    pub fn label(&self) -> String {
        match self {
            Action::Signal(s) => s.to_string(),
            Action::Reset => "reset".into(),
            Action::Log => "log".into(),
            Action::KillQuery => "kill_query".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Offset from the trigger: the request start for budget ladders, the hang-up for client-gone.
    pub after: Duration,
    pub action: Action,
    pub target: Target,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClientGone {
    /// Wait this long after the hang-up before the first step (the request may still finish).
    pub grace: Duration,
    /// A FIN this soon after the request started is a half-close (the client shut down its write
    /// side after sending), not a hang-up. RSTs always count.
    pub half_close_window: Duration,
    pub steps: Vec<Step>,
}

/// Kill-rate circuit breaker: at most `max_actions` per `window`, then observe for `cooldown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    pub max_actions: u32,
    pub window: Duration,
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            max_actions: 20,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub name: String,
    /// Empty means every port.
    pub ports: Vec<PortRange>,
    pub budget: Duration,
    /// Sorted by `after`; the first is at `budget` or later.
    pub steps: Vec<Step>,
    pub selector: Selector,
    pub mode: Mode,
    pub client_gone: Option<ClientGone>,
    pub breaker: BreakerConfig,
    pub min_workers: Option<u32>,
    /// Budgets per endpoint, tried in file order (`routes.rs`). Empty: one budget for all.
    pub routes: Vec<Route>,
    /// Read the owner's Python stack before the first action (with `[daemon] stacks`).
    pub stacks: bool,
    /// Look at the first bytes of every HTTP/1.x answer for `101 Switching Protocols`. `false`
    /// (on every policy of a port) saves two user-memory reads per request on that port; a
    /// connection upgraded there is then followed as requests, and its idle gaps end them.
    pub upgrades: bool,
    /// The account of `kill_query` steps; required when a ladder of the policy has one.
    pub mysql: Option<MysqlAccount>,
}

/// Where a MySQL/MariaDB server listens, for the daemon's own connection to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MysqlServer {
    /// A unix socket (`/run/mysqld/mysqld.sock`).
    Socket(PathBuf),
    /// A TCP address (`127.0.0.1:3306`); no name lookup.
    Address(SocketAddr),
}

/// The account `kill_query` connects with. The password stays in its file (0600, checked at
/// load) and is read at each action: it never sits in the config, its logs or its `Debug`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MysqlAccount {
    pub server: MysqlServer,
    pub user: String,
    pub password_file: PathBuf,
}

impl Policy {
    /// Does a ladder of this policy (its own, a route's, client-gone) have a `kill_query` step?
    pub fn kills_queries(&self) -> bool {
        let has = |s: &[Step]| s.iter().any(|s| s.action == Action::KillQuery);
        has(&self.steps)
            || self.routes.iter().any(|r| has(&r.steps))
            || self.client_gone.as_ref().is_some_and(|c| has(&c.steps))
    }
}

impl Policy {
    pub fn covers_port(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|r| r.contains(port))
    }
    /// Could this policy and `other` both apply to some port?
    pub fn shares_a_port_with(&self, other: &Policy) -> bool {
        self.ports.is_empty()
            || other.ports.is_empty()
            || self.ports.iter().any(|a| {
                other
                    .ports
                    .iter()
                    .any(|b| a.first <= b.last && b.first <= a.last)
            })
    }
    /// The ladder of a request on `route` (`None`: the policy's own), and its budget; `None`
    /// when the route is never enforced.
    pub fn ladder_for(&self, route: Option<usize>) -> Option<(Duration, &[Step])> {
        match route.and_then(|i| self.routes.get(i)) {
            None => Some((self.budget, &self.steps)),
            Some(r) => r.budget.map(|b| (b, r.steps.as_slice())),
        }
    }
    /// When the kernel must wake us for a request of this policy.
    pub fn first_deadline(&self) -> Duration {
        self.steps.first().map_or(self.budget, |s| s.after)
    }

    /// When the kernel must wake us for an HTTP/2 stream of this policy, whose route the kernel
    /// does not know: the earliest first step of the policy and of any enforced route.
    pub fn first_stream_deadline(&self) -> Duration {
        (0..self.routes.len())
            .filter_map(|i| self.ladder_for(Some(i)))
            .map(|(budget, steps)| steps.first().map_or(budget, |s| s.after))
            .fold(self.first_deadline(), Duration::min)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub mode: Mode,
    pub metrics_addr: SocketAddr,
    pub status_socket: PathBuf,
    pub log_format: LogFormat,
    pub events: Option<PathBuf>,
    /// Kernel probe set; fixed for the daemon's life (a reload cannot change it).
    pub probes: Probes,
    /// Where the kernel state is pinned (bpffs) so a restarted daemon adopts it.
    pub state_dir: PathBuf,
    /// Connections tracked at once; beyond it new connections are not tracked (and counted).
    pub max_connections: u32,
    /// Kernel-to-daemon event ring buffer, KiB (power of two).
    pub event_buffer_kib: u32,
    /// The daemon's own scheduling niceness: it must get the CPU when runaway workers hold it.
    pub nice: i32,
    /// SCHED_FIFO priority of the acting thread (needs CAP_SYS_NICE); 0: the normal class at
    /// `nice`.
    pub acting_priority: u8,
    /// The CPU the acting thread is kept on, if any.
    pub acting_cpu: Option<usize>,
    /// Show a request's query string in records (it often carries tokens: off by default).
    pub record_query_string: bool,
    /// Read the owner's Python stack (and native frames) before the first action
    /// (`stacks.rs`). On by default; the read is bounded by `stack_timeout`.
    pub stacks: bool,
    /// With `stacks`: also the owner thread's native frames (`native.rs`; stops that one
    /// thread for a moment).
    pub native_stacks: bool,
    /// The longest an action waits for that stack.
    pub stack_timeout: Duration,
    /// The directory holding the kubelet's `pods/` and `containers/` log directories.
    pub kubelet_logs: PathBuf,
    /// What SIGINT does to the pinned kernel state.
    pub on_interrupt: OnInterrupt,
    pub protect: Selector,
    pub policies: Vec<Policy>,
}

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";
pub const DEFAULT_STATUS_SOCKET: &str = "/run/watchdog/status.sock";
pub const DEFAULT_STATE_DIR: &str = "/sys/fs/bpf/watchdog";
/// Where the kubelet writes pod and container logs on a node (`pods.rs` reads their names).
pub const DEFAULT_KUBELET_LOGS: &str = "/var/log";
/// Ahead of ordinary workers when they saturate the CPUs (earlyoom runs at -20 for the same
/// reason; at -10 the daemon's p99 lateness with twelve spinning workers on two CPUs was twice
/// as high), short of the realtime class: a daemon bug cannot starve the machine.
pub const DEFAULT_NICE: i32 = -20;
/// Above every normal thread, far below the kernel's own realtime threads (interrupt threads
/// run at 50, watchdog and migration threads at 99): the acting thread preempts spinning
/// workers at once, and its work per wake-up is bounded (`daemon::acting`).
pub const DEFAULT_ACTING_PRIORITY: u8 = 10;

impl Config {
    /// The embedded default: observe every accepted TCP connection with a 30 s budget.
    pub fn observe_everything() -> Self {
        let budget = Duration::from_secs(30);
        Self::with_policies(vec![Policy {
            name: "default".into(),
            ports: vec![],
            budget,
            steps: validate::one_step(budget, None, Target::Process),
            selector: Selector::default(),
            mode: Mode::Observe,
            client_gone: None,
            breaker: BreakerConfig::default(),
            min_workers: None,
            routes: vec![],
            stacks: true,
            upgrades: true,
            mysql: None,
        }])
    }

    fn with_policies(policies: Vec<Policy>) -> Self {
        Self {
            mode: Mode::Enforce,
            metrics_addr: DEFAULT_METRICS_ADDR.parse().expect("valid default address"),
            status_socket: DEFAULT_STATUS_SOCKET.into(),
            log_format: LogFormat::Text,
            events: None,
            probes: Probes::Auto,
            state_dir: DEFAULT_STATE_DIR.into(),
            max_connections: watchdog_common::limits::MAX_CONNS,
            event_buffer_kib: watchdog_common::limits::EVENTS_BYTES / 1024,
            nice: DEFAULT_NICE,
            acting_priority: DEFAULT_ACTING_PRIORITY,
            acting_cpu: None,
            record_query_string: false,
            stacks: true,
            native_stacks: true,
            stack_timeout: DEFAULT_STACK_TIMEOUT,
            kubelet_logs: DEFAULT_KUBELET_LOGS.into(),
            on_interrupt: OnInterrupt::Unload,
            protect: Selector::default(),
            policies,
        }
    }

    /// Table and buffer sizes within what the kernel and the daemon handle. Also checked after
    /// command-line overrides.
    pub fn check_limits(&self) -> Result<(), (&'static str, String)> {
        if !(64..=1 << 20).contains(&self.max_connections) {
            return Err((
                "max_connections",
                format!("{} is outside 64..=1048576", self.max_connections),
            ));
        }
        let k = self.event_buffer_kib;
        if !(4..=1 << 16).contains(&k) || !k.is_power_of_two() {
            return Err((
                "event_buffer_kib",
                format!("{k} must be a power of two in 4..=65536"),
            ));
        }
        if !(-20..=19).contains(&self.nice) {
            return Err(("nice", format!("{} is outside -20..=19", self.nice)));
        }
        if self.acting_priority > 49 {
            return Err((
                "acting_priority",
                format!(
                    "{} is outside 0..=49 (the kernel's interrupt threads run at 50)",
                    self.acting_priority
                ),
            ));
        }
        if let Some(cpu) = self.acting_cpu {
            if cpu >= nix::libc::CPU_SETSIZE as usize {
                return Err(("acting_cpu", format!("{cpu} is not a CPU number")));
            }
        }
        if !self.kubelet_logs.is_absolute() {
            return Err((
                "kubelet_logs",
                format!("{} must be an absolute path", self.kubelet_logs.display()),
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err((
                "state_dir",
                format!("{} must be an absolute path", self.state_dir.display()),
            ));
        }
        Ok(())
    }

    /// The effective mode of a policy.
    pub fn mode_of(&self, p: &Policy) -> Mode {
        if self.mode == Mode::Observe {
            Mode::Observe
        } else {
            p.mode
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_config_file(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.into(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        validate::validate(raw, origin, text)
    }
}

fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let read_err = |source| ConfigError::Read {
        path: path.into(),
        source,
    };
    let refuse = |reason: String| ConfigError::Refused {
        path: path.into(),
        reason,
    };
    // Follows symlinks (a Kubernetes ConfigMap is a chain of them); a loop fails here with ELOOP.
    // Non-blocking, so a FIFO at the path does not hang the open; the checks are on what was
    // opened (fstat), and what is read is that same file.
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(refuse(format!(
            "{} bytes is over the {MAX_CONFIG_BYTES}-byte limit",
            meta.len()
        )));
    }
    use std::os::unix::fs::MetadataExt;
    if let Some(why) =
        unsafe_owner_or_mode(meta.uid(), meta.mode(), nix::unistd::geteuid().as_raw())
    {
        return Err(refuse(why));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    String::from_utf8(bytes).map_err(|e| {
        refuse(format!(
            "is not UTF-8 (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Why a config file with this owner and mode may not be trusted (`None`: it may). It decides
/// which processes get killed: only root (or the daemon's own user) may be able to change it.
pub(crate) fn unsafe_owner_or_mode(uid: u32, mode: u32, euid: u32) -> Option<String> {
    if uid != 0 && uid != euid {
        return Some(format!(
            "is owned by uid {uid}: it decides which processes get killed, so only root (or the daemon's user) may own it; chown root it"
        ));
    }
    if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 { "world" } else { "group" };
        return Some(format!(
            "is {who}-writable (mode {:04o}): it decides which processes get killed; chmod go-w it",
            mode & 0o7777
        ));
    }
    None
}

#[cfg(test)]
mod tests;

/// How long an action waits for the owner's Python stack by default.
pub const DEFAULT_STACK_TIMEOUT: Duration = Duration::from_millis(20);

/// A FIN this soon after the request started is a half-close, not a hang-up (default).
pub const DEFAULT_HALF_CLOSE_WINDOW: Duration = Duration::from_millis(100);
