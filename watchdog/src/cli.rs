//! Command-line flags as written (clap). `main` turns them into a validated `Config`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{Dur, LogFormat, OnInterrupt, PortRange, Probes, Sig, Target};

/// Stops requests that run past their time budget, from the kernel, for any server.
#[derive(Debug, Parser)]
#[command(name = "watchdog", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch requests and enforce budgets (needs root).
    Run(RunArgs),
    /// Validate a config and probe what this kernel and these privileges allow.
    Check(CheckArgs),
    /// Show requests in flight, policies and recent actions of the running daemon.
    Status(StatusArgs),
    /// Detach the kernel programs a stopped daemon left pinned (the daemon keeps them pinned
    /// across restarts on purpose).
    Unload(UnloadArgs),
}

#[derive(Debug, Args)]
pub struct UnloadArgs {
    /// The daemon's pinned state directory.
    #[arg(long, default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file (TOML). Without it and without policy flags: observe every port, 30 s budget.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Watched local port or range (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<PortRange>,
    /// Time budget of a request, e.g. 250ms, 2s, 1m.
    #[arg(long)]
    pub budget: Option<Dur>,
    /// Signal sent when the budget is spent (name or number).
    #[arg(long, default_value = "SIGKILL")]
    pub signal: Sig,
    /// Signal the owning thread or its whole process.
    #[arg(long, value_enum, default_value_t = Target::Process)]
    pub target: Target,
    /// Only act on this process and its descendants (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Log what would be done, do nothing.
    #[arg(long)]
    pub observe: bool,
    /// Signal the worker as soon as its caller hangs up on an in-flight request.
    #[arg(long, value_name = "SIGNAL")]
    pub client_gone: Option<Sig>,
    /// Prometheus metrics and health probes listen here.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Unix socket for `watchdog status`.
    #[arg(long)]
    pub status_socket: Option<PathBuf>,
    /// Write one JSON line per action to this file (`-` for stdout).
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Kernel probe set: the sock tracepoints (6.3+), the syscall set, or the best available.
    #[arg(long, value_enum, env = "WATCHDOG_PROBES")]
    pub probes: Option<Probes>,
    /// bpffs directory holding the pinned kernel state a restarted daemon adopts.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Connections tracked at once (kernel table size).
    #[arg(long)]
    pub max_connections: Option<u32>,
    /// Kernel-to-daemon event ring buffer in KiB (power of two).
    #[arg(long)]
    pub event_buffer_kib: Option<u32>,
    /// What SIGINT (Ctrl-C) does: detach the kernel programs (default) or keep them pinned as
    /// SIGTERM does.
    #[arg(long, value_enum)]
    pub on_interrupt: Option<OnInterrupt>,
    /// Read the owner's Python stack and native frames before the first action (`true`, the
    /// default; each read adds up to `stack_timeout` to that action's lateness).
    #[arg(long, value_name = "BOOL")]
    pub stacks: Option<bool>,
}

impl RunArgs {
    /// Were any single-policy flags given?
    pub fn has_policy_flags(&self) -> bool {
        !self.ports.is_empty()
            || self.budget.is_some()
            || !self.pids.is_empty()
            || self.client_gone.is_some()
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Policy file to validate.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Only validate the config; do not probe the kernel.
    #[arg(long)]
    pub config_only: bool,
    /// Load this probe set in the kernel check instead of the best available.
    #[arg(long, value_enum)]
    pub probes: Option<Probes>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon's status socket.
    #[arg(long, default_value = crate::config::DEFAULT_STATUS_SOCKET)]
    pub status_socket: PathBuf,
    /// Print the raw JSON document.
    #[arg(long)]
    pub json: bool,
}
