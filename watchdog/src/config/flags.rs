//! The `run` flags: a policy built from `--port/--budget/...`, the flags that override the
//! file's `[daemon]` table, and what a reload may change. All of it validated here.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    validate::one_step, BreakerConfig, ClientGone, Config, ConfigError, Dur, Mode, OnInterrupt,
    Policy, PortRange, Probes, Selector, Sig, Target, DEFAULT_HALF_CLOSE_WINDOW,
};

/// Where `watchdog run` takes its policies from.
pub enum Source<'a> {
    /// `--config FILE`.
    File(&'a Path),
    /// `--port ... --budget ...`.
    Flags(PolicyFlags),
    /// Neither: observe every accepted TCP connection with a 30 s budget.
    Default,
}

impl<'a> Source<'a> {
    /// The source the flags ask for; `--config` and policy flags exclude each other.
    pub fn of(config: Option<&'a Path>, flags: Option<PolicyFlags>) -> Result<Self, ConfigError> {
        match (config, flags) {
            (Some(_), Some(_)) => Err(command_line(
                "--config",
                "give either --config or policy flags (--port, --budget, ...), not both".into(),
            )),
            (Some(p), None) => Ok(Source::File(p)),
            (None, Some(f)) => Ok(Source::Flags(f)),
            (None, None) => Ok(Source::Default),
        }
    }
}

/// Flags of `watchdog run` that describe a single policy.
#[derive(Clone, Debug)]
pub struct PolicyFlags {
    pub ports: Vec<PortRange>,
    /// Required with policy flags.
    pub budget: Option<Dur>,
    pub signal: Sig,
    pub target: Target,
    pub pids: Vec<u32>,
    pub observe: bool,
    pub client_gone: Option<Sig>,
}

/// `[daemon]` settings given on the command line: they win over the file's, and hold across
/// reloads.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub metrics_addr: Option<SocketAddr>,
    pub status_socket: Option<PathBuf>,
    pub events: Option<PathBuf>,
    /// `--observe`: no policy acts, whatever the file says, until a restart.
    pub observe: bool,
    pub probes: Option<Probes>,
    pub state_dir: Option<PathBuf>,
    pub max_connections: Option<u32>,
    pub event_buffer_kib: Option<u32>,
    pub on_interrupt: Option<OnInterrupt>,
    /// `--stacks false`: no stack read before the first action (`[daemon] stacks`).
    pub stacks: Option<bool>,
}

fn command_line(field: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        path: "command line".into(),
        field: field.into(),
        reason,
    }
}

impl Config {
    /// The config `watchdog run` runs with: its source, then the command-line overrides, then
    /// the limits checked again.
    pub fn resolve(source: Source<'_>, o: &Overrides) -> Result<Self, ConfigError> {
        let mut cfg = match source {
            Source::File(p) => Config::load(p)?,
            Source::Flags(f) => Config::from_flags(&f)?,
            Source::Default => Config::observe_everything(),
        };
        if let Some(a) = o.metrics_addr {
            cfg.metrics_addr = a;
        }
        if let Some(p) = &o.status_socket {
            cfg.status_socket = p.clone();
        }
        if o.events.is_some() {
            cfg.events = o.events.clone();
        }
        if o.observe {
            cfg.mode = Mode::Observe;
        }
        if let Some(p) = o.probes {
            cfg.probes = p;
        }
        if let Some(d) = &o.state_dir {
            cfg.state_dir = d.clone();
        }
        if let Some(n) = o.max_connections {
            cfg.max_connections = n;
        }
        if let Some(k) = o.event_buffer_kib {
            cfg.event_buffer_kib = k;
        }
        if let Some(w) = o.on_interrupt {
            cfg.on_interrupt = w;
        }
        if let Some(b) = o.stacks {
            cfg.stacks = b;
        }
        cfg.check_limits().map_err(|(field, reason)| {
            command_line(&format!("--{}", field.replace('_', "-")), reason)
        })?;
        Ok(cfg)
    }

    /// The reload rule: a reload takes the mode, the protect list and the policies from `new`;
    /// the rest of the `[daemon]` table and the command-line overrides of the running config
    /// (`self`) hold until a restart. `observe_forced` (`--observe`) keeps observe mode. The
    /// flag says whether `new`'s fixed settings differ from the running ones (worth a warning).
    pub fn reloaded(&self, new: Config, observe_forced: bool) -> (Config, bool) {
        let fixed = Config {
            mode: self.mode,
            protect: self.protect.clone(),
            policies: self.policies.clone(),
            ..new.clone()
        };
        let differs = fixed != *self;
        let merged = Config {
            mode: if observe_forced {
                Mode::Observe
            } else {
                new.mode
            },
            protect: new.protect,
            policies: new.policies,
            ..self.clone()
        };
        (merged, differs)
    }

    /// The one policy built from `watchdog run --port ... --budget ...` flags.
    pub fn from_flags(f: &PolicyFlags) -> Result<Self, ConfigError> {
        let invalid = command_line;
        let Some(budget) = f.budget else {
            return Err(invalid("--budget", "is required with --port".into()));
        };
        if budget.0.is_zero() {
            return Err(invalid("--budget", "must be greater than zero".into()));
        }
        for &pid in &f.pids {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Err(invalid("--pid", format!("{pid}: no such process")));
            }
        }
        let client_gone = f.client_gone.map(|sig| ClientGone {
            grace: Duration::ZERO,
            half_close_window: DEFAULT_HALF_CLOSE_WINDOW,
            steps: one_step(Duration::ZERO, Some(sig), f.target),
        });
        let mut cfg = Self::with_policies(vec![Policy {
            name: "cli".into(),
            ports: f.ports.clone(),
            budget: budget.0,
            steps: one_step(budget.0, Some(f.signal), f.target),
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
            stacks: true,
            upgrades: true,
            mysql: None,
        }]);
        if f.observe {
            cfg.mode = Mode::Observe;
        }
        Ok(cfg)
    }
}
