//! Configuration: the TOML file (or the `run` flags) parsed into serde structs, then validated in
//! one place into a `Config` the rest of the daemon can trust.
//!
//! Values with a syntax of their own (durations, signals, port ranges, globs) are parsed while
//! deserializing, so a bad value is reported by the TOML parser with its file, line and column.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use nix::sys::signal::Signal;
use serde::{de, Deserialize, Deserializer};

use crate::routes::{Method, Pattern, Route, RouteBudget};

/// Largest config file accepted: it decides what gets killed, it has no reason to be large.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Errors of reading and validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
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

/// A duration written as `250ms`, `2s`, `1m`, ... (humantime syntax).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. 250ms, 2s, 1m"))
    }
}

/// A signal by name (`SIGKILL`, `KILL`) or number (`9`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sig(pub Signal);

impl FromStr for Sig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let parsed = if let Ok(n) = t.parse::<i32>() {
            Signal::try_from(n).ok()
        } else {
            let upper = t.to_ascii_uppercase();
            let name = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            Signal::from_str(&name).ok()
        };
        parsed.map(Sig).ok_or_else(|| {
            format!("unknown signal {s:?}; use a name such as SIGTERM, SIGKILL, SIGINT, SIGUSR1 or a number")
        })
    }
}

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// An inclusive port range; a single port is `a..=a`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u32>() {
                Ok(n @ 1..=65535) => Ok(n as u16),
                _ => Err(format!("invalid port {p:?}: ports are 1-65535")),
            }
        };
        let r = match s.split_once('-') {
            Some((a, b)) => PortRange {
                first: port(a)?,
                last: port(b)?,
            },
            None => {
                let p = port(s)?;
                PortRange { first: p, last: p }
            }
        };
        if r.first > r.last {
            return Err(format!(
                "invalid port range {s:?}: first port is above the last"
            ));
        }
        Ok(r)
    }
}

/// A shell-style glob (`/usr/bin/python3*`).
#[derive(Clone, Debug)]
pub struct Glob(pub glob::Pattern);

impl FromStr for Glob {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        glob::Pattern::new(s)
            .map(Glob)
            .map_err(|e| format!("invalid pattern {s:?}: {e}"))
    }
}

impl PartialEq for Glob {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    )*};
}
deserialize_from_str!(Dur, Glob);

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string().parse().map_err(de::Error::custom),
            Raw::S(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string().parse().map_err(de::Error::custom),
            Raw::S(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    protect: Selector,
    #[serde(default, rename = "policy")]
    policies: Vec<RawPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    mode: Option<Mode>,
    metrics_addr: Option<SocketAddr>,
    status_socket: Option<PathBuf>,
    log_format: Option<LogFormat>,
    events: Option<PathBuf>,
    probes: Option<Probes>,
    state_dir: Option<PathBuf>,
    max_connections: Option<u32>,
    event_buffer_kib: Option<u32>,
    nice: Option<i32>,
    record_query_string: Option<bool>,
    kubelet_logs: Option<PathBuf>,
    on_interrupt: Option<OnInterrupt>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: String,
    /// Ports and ranges; `"*"` or an empty list means every port.
    #[serde(default)]
    ports: Vec<PortOrAny>,
    budget: Dur,
    signal: Option<Sig>,
    target: Option<Target>,
    mode: Option<Mode>,
    #[serde(default, rename = "match")]
    selector: Selector,
    steps: Option<Vec<RawStep>>,
    client_gone: Option<RawClientGone>,
    breaker: Option<RawBreaker>,
    min_workers: Option<u32>,
    routes: Option<toml::Spanned<Vec<toml::Spanned<RawRoute>>>>,
}

/// One entry of a policy's `routes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    method: Option<Method>,
    path: Pattern,
    budget: RouteBudget,
    steps: Option<Vec<RawStep>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortOrAny {
    Any,
    Range(PortRange),
}

impl<'de> Deserialize<'de> for PortOrAny {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        let s = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::S(s) => s,
        };
        if s.trim() == "*" {
            return Ok(PortOrAny::Any);
        }
        s.parse().map(PortOrAny::Range).map_err(de::Error::custom)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    after: Dur,
    signal: Option<Sig>,
    action: Option<String>,
    target: Option<Target>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientGone {
    signal: Option<Sig>,
    target: Option<Target>,
    grace: Option<Dur>,
    half_close_window: Option<Dur>,
    steps: Option<Vec<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    max_actions: u32,
    window: Dur,
    cooldown: Dur,
}

// ---------------------------------------------------------------------------------------------
// The validated configuration.

/// What one step of a ladder does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Signal(Sig),
    /// Abort the request's TCP connection (SOCK_DESTROY).
    Reset,
    /// Only log.
    Log,
}

impl Action {
    /// Bounded label for metrics.
    pub fn label(&self) -> String {
        match self {
            Action::Signal(s) => s.to_string(),
            Action::Reset => "reset".into(),
            Action::Log => "log".into(),
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
    /// Show a request's query string in records (it often carries tokens: off by default).
    pub record_query_string: bool,
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

impl Config {
    /// The embedded default: observe every accepted TCP connection with a 30 s budget.
    pub fn observe_everything() -> Self {
        let budget = Duration::from_secs(30);
        Self::with_policies(vec![Policy {
            name: "default".into(),
            ports: vec![],
            budget,
            steps: vec![Step {
                after: budget,
                action: Action::Log,
                target: Target::Process,
            }],
            selector: Selector::default(),
            mode: Mode::Observe,
            client_gone: None,
            breaker: BreakerConfig::default(),
            min_workers: None,
            routes: vec![],
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
            record_query_string: false,
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

    /// The one policy built from `watchdog run --port ... --budget ...` flags.
    pub fn from_flags(f: &PolicyFlags) -> Result<Self, ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            path: "command line".into(),
            field: field.into(),
            reason,
        };
        if f.budget.0.is_zero() {
            return Err(invalid("--budget", "must be greater than zero".into()));
        }
        let client_gone = f.client_gone.map(|sig| ClientGone {
            grace: Duration::ZERO,
            half_close_window: DEFAULT_HALF_CLOSE_WINDOW,
            steps: vec![Step {
                after: Duration::ZERO,
                action: Action::Signal(sig),
                target: f.target,
            }],
        });
        let mut cfg = Self::with_policies(vec![Policy {
            name: "cli".into(),
            ports: f.ports.clone(),
            budget: f.budget.0,
            steps: vec![Step {
                after: f.budget.0,
                action: Action::Signal(f.signal),
                target: f.target,
            }],
            selector: Selector {
                pids: f.pids.clone(),
                ..Selector::default()
            },
            mode: if f.observe {
                Mode::Observe
            } else {
                Mode::Enforce
            },
            client_gone,
            breaker: BreakerConfig::default(),
            min_workers: None,
            routes: vec![],
        }]);
        if f.observe {
            cfg.mode = Mode::Observe;
        }
        Ok(cfg)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_config_file(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.into(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        validate(raw, origin, text)
    }
}

/// Flags of `watchdog run` that describe a single policy.
#[derive(Clone, Debug)]
pub struct PolicyFlags {
    pub ports: Vec<PortRange>,
    pub budget: Dur,
    pub signal: Sig,
    pub target: Target,
    pub pids: Vec<u32>,
    pub observe: bool,
    pub client_gone: Option<Sig>,
}

pub const DEFAULT_HALF_CLOSE_WINDOW: Duration = Duration::from_millis(100);

fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let read_err = |source| ConfigError::Read {
        path: path.into(),
        source,
    };
    let refuse = |reason: String| ConfigError::Refused {
        path: path.into(),
        reason,
    };
    // Follows symlinks (a Kubernetes ConfigMap is a chain of them); a loop fails here with ELOOP.
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(refuse(format!(
            "{} bytes is over the {MAX_CONFIG_BYTES}-byte limit",
            meta.len()
        )));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(refuse(
            "is world-writable: it decides which processes get killed; chmod o-w it".into(),
        ));
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    String::from_utf8(bytes).map_err(|e| {
        refuse(format!(
            "is not UTF-8 (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

fn validate(raw: RawConfig, origin: &str, text: &str) -> Result<Config, ConfigError> {
    let invalid = |field: String, reason: &str| ConfigError::Invalid {
        path: origin.into(),
        field,
        reason: reason.into(),
    };
    let mut cfg = Config::with_policies(Vec::new());
    if let Some(m) = raw.daemon.mode {
        cfg.mode = m;
    }
    if let Some(a) = raw.daemon.metrics_addr {
        cfg.metrics_addr = a;
    }
    if let Some(p) = raw.daemon.status_socket {
        cfg.status_socket = p;
    }
    if let Some(f) = raw.daemon.log_format {
        cfg.log_format = f;
    }
    cfg.events = raw.daemon.events;
    cfg.probes = raw.daemon.probes.unwrap_or_default();
    if let Some(d) = raw.daemon.state_dir {
        cfg.state_dir = d;
    }
    if let Some(n) = raw.daemon.max_connections {
        cfg.max_connections = n;
    }
    if let Some(k) = raw.daemon.event_buffer_kib {
        cfg.event_buffer_kib = k;
    }
    if let Some(n) = raw.daemon.nice {
        cfg.nice = n;
    }
    cfg.record_query_string = raw.daemon.record_query_string.unwrap_or(false);
    if let Some(d) = raw.daemon.kubelet_logs {
        cfg.kubelet_logs = d;
    }
    cfg.on_interrupt = raw.daemon.on_interrupt.unwrap_or_default();
    cfg.check_limits()
        .map_err(|(field, reason)| invalid(format!("daemon.{field}"), &reason))?;
    cfg.protect = raw.protect;
    if raw.policies.is_empty() {
        return Err(invalid(
            "policy".into(),
            "no [[policy]] defined; add at least one",
        ));
    }

    for (i, rp) in raw.policies.into_iter().enumerate() {
        let at = |f: &str| format!("policy[{i}] ({}).{f}", rp.name);
        if rp.name.trim().is_empty() || rp.name.len() > 64 {
            return Err(invalid(
                format!("policy[{i}].name"),
                "must be 1-64 characters",
            ));
        }
        if cfg.policies.iter().any(|p: &Policy| p.name == rp.name) {
            return Err(invalid(at("name"), "another policy has this name"));
        }
        if rp.budget.0.is_zero() {
            return Err(invalid(at("budget"), "must be greater than zero"));
        }
        let target = rp.target.unwrap_or_default();
        let ladder = match (&rp.steps, rp.signal) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    at("signal"),
                    "give either `signal` or `steps`, not both",
                ))
            }
            (Some(s), None) => steps(s, target, &at("steps"), origin)?,
            (None, sig) => vec![Step {
                after: rp.budget.0,
                action: sig.map_or(Action::Log, Action::Signal),
                target,
            }],
        };
        if ladder.is_empty() {
            return Err(invalid(at("steps"), "needs at least one step"));
        }
        if ladder[0].after < rp.budget.0 {
            return Err(invalid(
                at("steps"),
                "the first step comes before the budget is spent",
            ));
        }
        let client_gone = match rp.client_gone {
            None => None,
            Some(cg) => {
                let t = cg.target.unwrap_or(target);
                let steps = match (&cg.steps, cg.signal) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            at("client_gone"),
                            "give either `signal` or `steps`, not both",
                        ))
                    }
                    (Some(s), None) => steps(s, t, &at("client_gone.steps"), origin)?,
                    (None, Some(sig)) => {
                        vec![Step {
                            after: Duration::ZERO,
                            action: Action::Signal(sig),
                            target: t,
                        }]
                    }
                    (None, None) => {
                        return Err(invalid(at("client_gone"), "needs `signal` or `steps`"))
                    }
                };
                Some(ClientGone {
                    grace: cg.grace.map_or(Duration::ZERO, |d| d.0),
                    half_close_window: cg
                        .half_close_window
                        .map_or(DEFAULT_HALF_CLOSE_WINDOW, |d| d.0),
                    steps,
                })
            }
        };
        let breaker = match rp.breaker {
            None => BreakerConfig::default(),
            Some(b) => {
                if b.max_actions == 0 || b.window.0.is_zero() {
                    return Err(invalid(
                        at("breaker"),
                        "max_actions and window must be above zero",
                    ));
                }
                BreakerConfig {
                    max_actions: b.max_actions,
                    window: b.window.0,
                    cooldown: b.cooldown.0,
                }
            }
        };
        let any = rp.ports.is_empty() || rp.ports.contains(&PortOrAny::Any);
        let ports = if any {
            vec![]
        } else {
            rp.ports
                .iter()
                .filter_map(|p| match p {
                    PortOrAny::Range(r) => Some(*r),
                    PortOrAny::Any => None,
                })
                .collect()
        };
        let routes = match &rp.routes {
            None => vec![],
            Some(list) => routes(list, &ladder, target, &at("routes"), origin, text)?,
        };
        let policy = Policy {
            name: rp.name.clone(),
            ports,
            budget: rp.budget.0,
            steps: ladder,
            selector: rp.selector,
            mode: rp.mode.unwrap_or(cfg.mode),
            client_gone,
            breaker,
            min_workers: rp.min_workers,
            routes,
        };
        if let (Some(list), Some(earlier)) = (
            &rp.routes,
            cfg.policies
                .iter()
                .find(|p| !p.routes.is_empty() && p.shares_a_port_with(&policy)),
        ) {
            return Err(ConfigError::InvalidAt {
                path: origin.into(),
                line: line_of(text, list.span().start),
                field: at("routes"),
                reason: format!(
                    "policy {:?} has routes on some of the same ports; a port's routes come from one policy",
                    earlier.name
                ),
            });
        }
        // Overlap rule: policies are tried in file order and the first that matches wins, so a
        // later policy with the same ports and the same selector could never apply: reject it.
        if let Some(earlier) = cfg.policies.iter().find(|p| shadows(p, &policy)) {
            return Err(ConfigError::Invalid {
                path: origin.into(),
                field: at("ports"),
                reason: format!(
                    "policy {:?} comes first with the same processes on these ports, so this one would never apply; \
                     narrow its `match` or its ports",
                    earlier.name
                ),
            });
        }
        cfg.policies.push(policy);
    }
    check_route_tables(&cfg, origin)?;
    Ok(cfg)
}

/// Line (1-based) of a byte offset in the config text.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A policy's `routes`, validated: each gets its ladder (its own `steps`, or the policy's moved
/// to its budget).
fn routes(
    list: &toml::Spanned<Vec<toml::Spanned<RawRoute>>>,
    policy_steps: &[Step],
    target: Target,
    field: &str,
    origin: &str,
    text: &str,
) -> Result<Vec<Route>, ConfigError> {
    if list.get_ref().len() > watchdog_common::limits::MAX_ROUTES as usize {
        return Err(ConfigError::InvalidAt {
            path: origin.into(),
            line: line_of(text, list.span().start),
            field: field.into(),
            reason: format!(
                "{} routes; the kernel's table holds {} in all",
                list.get_ref().len(),
                watchdog_common::limits::MAX_ROUTES
            ),
        });
    }
    let mut out = Vec::new();
    for (i, r) in list.get_ref().iter().enumerate() {
        let at = format!("{field}[{i}]");
        let invalid = |reason: &str| ConfigError::InvalidAt {
            path: origin.into(),
            line: line_of(text, r.span().start),
            field: at.clone(),
            reason: reason.into(),
        };
        let raw = r.get_ref();
        let budget = match raw.budget {
            RouteBudget::Off => None,
            RouteBudget::After(d) => Some(d),
        };
        let steps = match (&raw.steps, budget) {
            (Some(_), None) => return Err(invalid("a route with `budget = \"off\"` has no steps")),
            (Some(s), Some(b)) => {
                let s = steps(s, target, &format!("{at}.steps"), origin)?;
                if s.first().is_none_or(|first| first.after < b) {
                    return Err(invalid(
                        "the first step comes before the route's budget is spent",
                    ));
                }
                s
            }
            (None, Some(b)) => crate::routes::shifted(policy_steps, b),
            (None, None) => vec![],
        };
        out.push(Route {
            method: raw.method,
            pattern: raw.path.clone(),
            budget,
            steps,
        });
    }
    Ok(out)
}

/// Routes over all policies fit the kernel's tables: metrics slots and route-table entries.
fn check_route_tables(cfg: &Config, origin: &str) -> Result<(), ConfigError> {
    use watchdog_common::{
        head::METHODS,
        limits::{MAX_ROUTES, ROUTE_ENTRIES},
    };
    let total: usize = cfg.policies.iter().map(|p| p.routes.len()).sum();
    let entries: usize = cfg
        .policies
        .iter()
        .map(|p| {
            let ports = if p.ports.is_empty() {
                1
            } else {
                p.ports
                    .iter()
                    .map(|r| usize::from(r.last - r.first) + 1)
                    .sum()
            };
            let keys: usize = p
                .routes
                .iter()
                .map(|r| if r.method.is_some() { 1 } else { METHODS.len() })
                .sum();
            ports * keys
        })
        .sum();
    let invalid = |reason: String| ConfigError::Invalid {
        path: origin.into(),
        field: "policy.routes".into(),
        reason,
    };
    if total > MAX_ROUTES as usize {
        return Err(invalid(format!(
            "{total} routes in all; the kernel's table holds {MAX_ROUTES}"
        )));
    }
    if entries > ROUTE_ENTRIES as usize {
        return Err(invalid(format!(
            "routes x ports x methods = {entries} kernel entries; the table holds {ROUTE_ENTRIES} (give routes a `method`, or fewer ports)"
        )));
    }
    Ok(())
}

/// `a` takes every request `b` could: same selector and `a`'s ports include all of `b`'s.
fn shadows(a: &Policy, b: &Policy) -> bool {
    if a.selector != b.selector {
        return false;
    }
    if a.ports.is_empty() {
        return true;
    }
    !b.ports.is_empty()
        && b.ports
            .iter()
            .all(|rb| (rb.first..=rb.last).all(|p| a.ports.iter().any(|ra| ra.contains(p))))
}

fn steps(
    raw: &[RawStep],
    default_target: Target,
    field: &str,
    origin: &str,
) -> Result<Vec<Step>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let invalid = |reason: String| ConfigError::Invalid {
            path: origin.into(),
            field: format!("{field}[{i}]"),
            reason,
        };
        let action = match (s.signal, s.action.as_deref()) {
            (Some(sig), None) => Action::Signal(sig),
            (None, Some("reset")) => Action::Reset,
            (None, Some("log")) => Action::Log,
            (None, Some(other)) => {
                return Err(invalid(format!(
                    "unknown action {other:?}; use \"reset\" or \"log\", or give `signal`"
                )))
            }
            (None, None) => return Err(invalid("needs `signal` or `action`".into())),
            (Some(_), Some(_)) => {
                return Err(invalid("give `signal` or `action`, not both".into()))
            }
        };
        if let Some(prev) = out.last().map(|p: &Step| p.after) {
            if s.after.0 < prev {
                return Err(invalid("steps must be in order of `after`".into()));
            }
        }
        out.push(Step {
            after: s.after.0,
            action,
            target: s.target.unwrap_or(default_target),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[daemon]
mode = "enforce"

[protect]
comm = ["postgres"]

[[policy]]
name = "api"
ports = [8080, "9000-9010"]
budget = "30s"
target = "process"
match = { pids = [1234], comm = ["gunicorn"], exe = ["/usr/bin/python3*"], cgroup = ["/kubepods/*"] }
mode = "enforce"
steps = [
  { after = "30s", signal = "SIGUSR1", target = "thread" },
  { after = "35s", signal = "SIGTERM" },
  { after = "40s", signal = "SIGKILL" },
  { after = "40s", action = "reset" },
]
client_gone = { grace = "50ms", signal = "SIGKILL" }
breaker = { max_actions = 5, window = "10s", cooldown = "1m" }
"#;

    #[test]
    fn parses_the_documented_example() {
        let cfg = Config::parse(EXAMPLE, "example").unwrap();
        let p = &cfg.policies[0];
        assert_eq!(
            p.ports,
            vec![
                PortRange {
                    first: 8080,
                    last: 8080
                },
                PortRange {
                    first: 9000,
                    last: 9010
                }
            ]
        );
        assert_eq!(p.steps.len(), 4);
        assert_eq!(p.steps[0].target, Target::Thread);
        assert_eq!(p.steps[1].target, Target::Process);
        assert_eq!(p.steps[2].action, Action::Signal(Sig(Signal::SIGKILL)));
        assert_eq!(p.steps[3].action, Action::Reset);
        assert_eq!(p.first_deadline(), Duration::from_secs(30));
        assert_eq!(
            p.client_gone.as_ref().unwrap().grace,
            Duration::from_millis(50)
        );
        assert_eq!(p.breaker.max_actions, 5);
        assert!(p.covers_port(9005) && !p.covers_port(9011));
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = Config::parse("[[policy]]\nname = \"a\"\nbudget = \"2x\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.toml") && e.contains("line 3") && e.contains("invalid duration"),
            "{e}"
        );
        let e = Config::parse(
            "[[policy]]\nname = \"a\"\nbudget = \"2s\"\nsignal = \"SIGFOO\"\n",
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 4") && e.contains("unknown signal"), "{e}");
        let e = Config::parse(
            "[[policy]]\nname = \"a\"\nbudget = \"2s\"\nbugdet = 1\n",
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field") && e.contains("bugdet"), "{e}");
        let e = Config::parse(
            "[[policy]]\nname = \"a\"\nbudget = \"2s\"\nports = [70000]\n",
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ports are 1-65535"), "{e}");
        let e = Config::parse("[[policy]]\nname = \"a\"\nbudget = \"0s\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("budget") && e.contains("greater than zero"),
            "{e}"
        );
    }

    #[test]
    fn rejects_shadowed_policies_and_allows_narrowed_ones() {
        let two = |m2: &str| {
            format!(
                "[[policy]]\nname = \"a\"\nports = [8080]\nbudget = \"1s\"\n\
                 [[policy]]\nname = \"b\"\nports = [8080]\nbudget = \"2s\"\n{m2}"
            )
        };
        let e = Config::parse(&two(""), "f").unwrap_err().to_string();
        assert!(e.contains("would never apply"), "{e}");
        assert!(Config::parse(&two("match = { comm = [\"x\"] }\n"), "f").is_ok());
    }

    #[test]
    fn kubernetes_names_and_daemon_keys() {
        let cfg = Config::parse(
            "[daemon]\nkubelet_logs = \"/tmp/k\"\non_interrupt = \"keep\"\n\
             [protect]\nnamespace = [\"kube-system\"]\n\
             [[policy]]\nname = \"a\"\nbudget = \"1s\"\n\
             match = { namespace = [\"payments\"], pod = [\"api-*\"], container = [\"app\"] }\n",
            "f",
        )
        .unwrap();
        assert_eq!(cfg.kubelet_logs, PathBuf::from("/tmp/k"));
        assert_eq!(cfg.on_interrupt, OnInterrupt::Keep);
        assert!(!cfg.protect.is_empty());
        let sel = &cfg.policies[0].selector;
        assert_eq!(sel.namespace[0].0.as_str(), "payments");
        assert!(sel.pod[0].0.matches("api-7d9f8-x2x4q"));
        assert_eq!(sel.container[0].0.as_str(), "app");
        let d = Config::parse("[[policy]]\nname = \"a\"\nbudget = \"1s\"\n", "f").unwrap();
        assert_eq!(
            d.on_interrupt,
            OnInterrupt::Unload,
            "Ctrl-C leaves nothing by default"
        );
        assert_eq!(d.kubelet_logs, PathBuf::from("/var/log"));
        let e = Config::parse(
            "[daemon]\nkubelet_logs = \"var/log\"\n[[policy]]\nname = \"a\"\nbudget = \"1s\"\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("kubelet_logs") && e.contains("absolute"), "{e}");
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!("SIGKILL".parse::<Sig>().unwrap().0, Signal::SIGKILL);
        assert_eq!("term".parse::<Sig>().unwrap().0, Signal::SIGTERM);
        assert_eq!("2".parse::<Sig>().unwrap().0, Signal::SIGINT);
        assert!("SIGNOPE".parse::<Sig>().is_err());
        assert!("0".parse::<Sig>().is_err());
    }

    #[test]
    fn durations_and_ports() {
        assert_eq!(
            "250ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!("1m".parse::<Dur>().unwrap().0, Duration::from_secs(60));
        assert!("fast".parse::<Dur>().is_err());
        assert_eq!(
            "9000-9010".parse::<PortRange>().unwrap(),
            PortRange {
                first: 9000,
                last: 9010
            }
        );
        assert!("0".parse::<PortRange>().is_err());
        assert!("10-5".parse::<PortRange>().is_err());
    }

    proptest::proptest! {
        #[test]
        fn port_range_parse_roundtrip(a in 1u16.., b in 1u16..) {
            let (lo, hi) = (a.min(b), a.max(b));
            let r: PortRange = format!("{lo}-{hi}").parse().unwrap();
            proptest::prop_assert_eq!(r, PortRange { first: lo, last: hi });
        }

        #[test]
        fn duration_parse_never_panics(s in "\\PC{0,20}") {
            let _ = s.parse::<Dur>();
        }

        #[test]
        fn config_parse_never_panics(s in "\\PC{0,200}") {
            let _ = Config::parse(&s, "fuzz");
        }

        /// TOML-shaped files (real tables and keys, values good, bad and of the wrong type)
        /// never panic, and every refusal names its origin: the parser and the validation
        /// behind it are both reached (see `toml_shaped_input_reaches_validation`).
        #[test]
        fn toml_shaped_config_never_panics(text in toml_shaped()) {
            if let Err(e) = Config::parse(&text, "generated.toml") {
                proptest::prop_assert!(e.to_string().contains("generated.toml"), "{}\n{}", e, text);
            }
        }

        #[test]
        fn signal_and_port_parsers_never_panic(s in "\\PC{0,24}") {
            let _ = s.parse::<Sig>();
            let _ = s.parse::<PortRange>();
        }

        #[test]
        fn milliseconds_parse_to_themselves(n in 0u64..10_000_000) {
            proptest::prop_assert_eq!(
                format!("{n}ms").parse::<Dur>().unwrap().0,
                Duration::from_millis(n)
            );
        }

        /// Every signal nix knows parses by name, by short name and by number, to itself.
        #[test]
        fn signal_names_and_numbers_agree(i in 0usize..31) {
            let sig = Signal::iterator().nth(i).unwrap();
            let by_name: Sig = sig.as_str().parse().unwrap();
            let by_short: Sig = sig.as_str().trim_start_matches("SIG").parse().unwrap();
            let by_number: Sig = (sig as i32).to_string().parse().unwrap();
            proptest::prop_assert_eq!(by_name.0, sig);
            proptest::prop_assert_eq!(by_short.0, sig);
            proptest::prop_assert_eq!(by_number.0, sig);
        }

        #[test]
        fn reversed_zero_and_out_of_range_ports_are_refused(a in 1u32..70_000, b in 1u32..70_000) {
            let parsed = format!("{a}-{b}").parse::<PortRange>();
            proptest::prop_assert_eq!(parsed.is_ok(), a <= b && b <= 65_535);
            let zero = format!("0-{b}");
            proptest::prop_assert!(zero.parse::<PortRange>().is_err());
        }

        /// A generated policy file parses back to the values written.
        #[test]
        fn generated_policy_round_trips(
            name in "[a-z][a-z0-9-]{0,20}",
            budget_ms in 1u64..3_600_000,
            lo in 1u16..60_000,
            span in 0u16..5_000,
            observe in proptest::bool::ANY,
        ) {
            let hi = lo.saturating_add(span);
            let mode = if observe { "observe" } else { "enforce" };
            let text = format!(
                "[daemon]\nmode = \"{mode}\"\n[[policy]]\nname = \"{name}\"\nports = [\"{lo}-{hi}\"]\nbudget = \"{budget_ms}ms\"\nsignal = \"SIGTERM\"\n"
            );
            let cfg = Config::parse(&text, "generated").unwrap();
            proptest::prop_assert_eq!(cfg.mode == Mode::Observe, observe);
            let p = &cfg.policies[0];
            proptest::prop_assert_eq!(&p.name, &name);
            proptest::prop_assert_eq!(p.budget, Duration::from_millis(budget_ms));
            proptest::prop_assert_eq!(&p.ports, &vec![PortRange { first: lo, last: hi }]);
            proptest::prop_assert!(p.covers_port(lo) && p.covers_port(hi));
        }
    }

    /// `key = value` for one key of a table: mostly a value of the right kind, sometimes a bad
    /// one (wrong type, bad unit, unknown name), sometimes an arbitrary string.
    fn toml_entry(key: &'static str) -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let good: &[&str] = match key {
            "mode" => &["\"observe\"", "\"enforce\""],
            "probes" => &["\"auto\"", "\"sock\"", "\"syscalls\""],
            "on_interrupt" => &["\"unload\"", "\"keep\""],
            "record_query_string" => &["true", "false"],
            "nice" => &["-20", "0", "5"],
            "metrics_addr" => &["\"127.0.0.1:9477\""],
            "comm" | "exe" | "namespace" | "cgroup" => &["[\"gunicorn\"]", "[\"python3*\"]", "[\"/kubepods/*\"]"],
            "pids" => &["[1234]"],
            "name" => &["\"api\"", "\"b\""],
            "ports" => &["[8080]", "[8080, \"9000-9010\"]", "\"*\""],
            "budget" => &["\"2s\"", "\"250ms\"", "\"1m\""],
            "signal" => &["\"SIGKILL\"", "\"TERM\"", "15"],
            "target" => &["\"process\"", "\"thread\""],
            "match" => &["{ comm = [\"gunicorn\"] }", "{ exe = [\"/usr/bin/python3*\"], pids = [1] }"],
            "steps" => &["[{ after = \"1s\", signal = \"SIGTERM\" }, { after = \"2s\", signal = \"SIGKILL\" }]", "[{ after = \"3s\", action = \"reset\" }]"],
            "client_gone" => &["{ signal = \"SIGKILL\" }", "{ signal = \"SIGINT\", grace = \"1s\", half_close_window = \"50ms\" }"],
            "breaker" => &["{ max_actions = 2, window = \"1m\", cooldown = \"5m\" }"],
            "min_workers" => &["2"],
            "routes" => &["[{ path = \"/r/*\", budget = \"5s\" }]", "[{ method = \"POST\", path = \"/a\", budget = \"off\" }]"],
            _ => &["\"x\""],
        };
        let bad = [
            "\"soon\"",
            "\"SIGNOPE\"",
            "-3",
            "70000",
            "\"\"",
            "[]",
            "[\"10-5\"]",
            "true",
            "{ what = 1 }",
            "[{ path = \"/a*b\", budget = \"1s\" }]",
            "\"0s\"",
        ];
        prop_oneof![
            8 => proptest::sample::select(good.to_vec()).prop_map(str::to_string),
            1 => proptest::sample::select(bad.to_vec()).prop_map(str::to_string),
            1 => "\\PC{0,8}".prop_map(|s| format!("{s:?}")),
        ]
        .prop_map(move |v| format!("{key} = {v}\n"))
    }

    /// A file of `[daemon]`, `[protect]` and `[[policy]]` tables with their real keys (each at
    /// most once; now and then an unknown one), in any order.
    fn toml_shaped() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let daemon: &'static [&'static str] = &[
            "mode",
            "metrics_addr",
            "probes",
            "nice",
            "on_interrupt",
            "record_query_string",
            "bogus",
        ];
        let protect: &'static [&'static str] =
            &["comm", "exe", "namespace", "pids", "cgroup", "nope"];
        let policy: &'static [&'static str] = &[
            "ports",
            "signal",
            "target",
            "match",
            "steps",
            "client_gone",
            "breaker",
            "min_workers",
            "routes",
            "extra",
        ];
        let section =
            |head: &'static str, always: &'static [&'static str], keys: &'static [&'static str]| {
                proptest::sample::subsequence(keys.to_vec(), 0..=keys.len().min(4))
                    .prop_flat_map(move |picked| {
                        let mut all: Vec<&'static str> = always.to_vec();
                        all.extend(picked);
                        all.into_iter().map(toml_entry).collect::<Vec<_>>()
                    })
                    .prop_map(move |entries| format!("{head}\n{}", entries.concat()))
            };
        (
            proptest::option::of(section("[daemon]", &[], daemon)),
            proptest::option::of(section("[protect]", &[], protect)),
            proptest::collection::vec(section("[[policy]]", &["name", "budget"], policy), 0..3),
        )
            .prop_map(|(d, p, pols)| {
                let mut out = d.unwrap_or_default();
                out += &p.unwrap_or_default();
                out += &pols.concat();
                out
            })
    }

    /// The generator is worth running: over a fixed sample, some files are valid, and many
    /// more pass TOML syntax and are refused by validation (random strings almost never do).
    #[test]
    fn toml_shaped_input_reaches_validation() {
        use proptest::strategy::{Strategy, ValueTree};
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut valid, mut validated) = (0, 0);
        for _ in 0..2000 {
            let text = toml_shaped().new_tree(&mut runner).unwrap().current();
            let syntax_ok = toml::from_str::<toml::Table>(&text).is_ok();
            match Config::parse(&text, "generated.toml") {
                Ok(_) => valid += 1,
                Err(_) if syntax_ok => validated += 1,
                Err(_) => {}
            }
        }
        assert!(valid >= 20, "{valid} of 2000 generated files valid");
        assert!(
            validated >= 200,
            "{validated} of 2000 refused past the TOML syntax"
        );
        eprintln!("toml-shaped sample: {valid} valid, {validated} refused by validation");
    }
}
