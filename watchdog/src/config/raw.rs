//! The config file as written: serde structs, unknown keys refused. `validate.rs` turns them
//! into the types of `mod.rs`.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use super::{
    values::{Dur, PortOrAny, Sig},
    LogFormat, Mode, OnInterrupt, Probes, Selector, Target,
};
use crate::routes::{Method, Pattern, RouteBudget};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) daemon: RawDaemon,
    #[serde(default)]
    pub(super) protect: Selector,
    #[serde(default, rename = "policy")]
    pub(super) policies: Vec<RawPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub(super) mode: Option<Mode>,
    pub(super) metrics_addr: Option<SocketAddr>,
    pub(super) status_socket: Option<PathBuf>,
    pub(super) log_format: Option<LogFormat>,
    pub(super) events: Option<PathBuf>,
    pub(super) probes: Option<Probes>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) max_connections: Option<u32>,
    pub(super) event_buffer_kib: Option<u32>,
    pub(super) nice: Option<i32>,
    pub(super) acting_priority: Option<u8>,
    pub(super) acting_cpu: Option<usize>,
    pub(super) record_query_string: Option<bool>,
    pub(super) stacks: Option<bool>,
    pub(super) native_stacks: Option<bool>,
    pub(super) stack_timeout: Option<Dur>,
    pub(super) kubelet_logs: Option<PathBuf>,
    pub(super) on_interrupt: Option<OnInterrupt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) name: String,
    /// Ports and ranges; `"*"` or an empty list means every port.
    #[serde(default)]
    pub(super) ports: Vec<PortOrAny>,
    pub(super) budget: Dur,
    pub(super) signal: Option<Sig>,
    pub(super) target: Option<Target>,
    pub(super) mode: Option<Mode>,
    #[serde(default, rename = "match")]
    pub(super) selector: Selector,
    pub(super) steps: Option<Vec<RawStep>>,
    pub(super) client_gone: Option<RawClientGone>,
    pub(super) breaker: Option<RawBreaker>,
    pub(super) min_workers: Option<u32>,
    pub(super) stacks: Option<bool>,
    /// Look for a `101 Switching Protocols` answer on HTTP/1.x connections (default true).
    pub(super) upgrades: Option<bool>,
    pub(super) routes: Option<toml::Spanned<Vec<toml::Spanned<RawRoute>>>>,
    pub(super) mysql: Option<toml::Spanned<RawMysql>>,
}

/// The account `kill_query` steps connect with.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMysql {
    pub(super) socket: Option<PathBuf>,
    pub(super) address: Option<SocketAddr>,
    pub(super) user: String,
    pub(super) password_file: PathBuf,
}

/// One entry of a policy's `routes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) method: Option<Method>,
    pub(super) path: Pattern,
    pub(super) budget: RouteBudget,
    pub(super) steps: Option<Vec<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStep {
    pub(super) after: Dur,
    pub(super) signal: Option<Sig>,
    pub(super) action: Option<String>,
    pub(super) target: Option<Target>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientGone {
    pub(super) signal: Option<Sig>,
    pub(super) target: Option<Target>,
    pub(super) grace: Option<Dur>,
    pub(super) half_close_window: Option<Dur>,
    pub(super) steps: Option<Vec<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    pub(super) max_actions: u32,
    pub(super) window: Dur,
    pub(super) cooldown: Dur,
}
