//! The enforcement chain, as one pure function: may this step of a ladder act now?
//!
//! still current → safety guard → blame → worker floor → mode → breaker → act. Each link can only stop
//! the chain; none can force an action. The daemon gathers the inputs (kernel state, /proc) and
//! carries out the verdict (`actions.rs`); nothing here does I/O. The breaker is the one link
//! with state: it is consulted (and counts the action) only when everything before it let the
//! step through.

use crate::{
    blame::Blame,
    config::{Action, BreakerConfig, Mode},
    policy::{Breaker, BreakerVerdict, Refusal},
};

/// What one step of a ladder comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The request is no longer the one the ladder is about (it ended, its owner went away).
    Ended,
    /// A rule no policy can override said no.
    Refused(Refusal),
    /// A `log` step: the record is the action.
    Logged,
    /// Observe mode, or the breaker holds the policy in observe-only: logged, not done.
    Observed,
    /// This action trips the breaker: not done, and the policy observes for its cool-down.
    Tripped,
    /// Carry out the step's action.
    Act,
    /// The time is the client's and it has stalled: abort its connection (reset) instead of
    /// the step's action; the worker is never signalled (`blame.rs`).
    CutClient,
    /// The time is the client's and it is still sending: nothing is done to either side.
    ClientSending,
}

/// The facts one step is decided on.
pub struct Inputs<'a> {
    pub action: Action,
    /// The policy's effective mode (the daemon's `observe` wins).
    pub mode: Mode,
    /// The kernel still names the same request of the same task (`tracker::still_current`).
    pub still_current: bool,
    /// `policy::guard_target` on the process the step would reach, read after it was pinned
    /// (`actions::pin`): the guard, `[protect]` and the step's own policy.
    pub guard: Result<(), Refusal>,
    /// `min_workers` of the policy, with the count of live processes it selects (read only if
    /// a floor is set and the step would act).
    pub floor: Option<(u32, &'a dyn Fn() -> usize)>,
    pub breaker: &'a BreakerConfig,
    pub now_ns: u64,
    /// Whose time it is (`blame::blame`), read right before the step.
    pub blame: Blame,
}

/// The verdict on one step.
pub fn decide(i: Inputs<'_>, breaker: &mut Breaker) -> Verdict {
    if !i.still_current {
        return Verdict::Ended;
    }
    if let Err(r) = i.guard {
        return Verdict::Refused(r);
    }
    // The client's time: no enforcing step touches the worker. Cutting a stalled client harms
    // no worker, so neither the worker floor nor the breaker (both about workers) holds it;
    // observe mode does.
    if let (Blame::Client { stalled }, false) = (i.blame, matches!(i.action, Action::Log)) {
        return match (stalled, i.mode) {
            (false, _) => Verdict::ClientSending,
            (true, Mode::Enforce) => Verdict::CutClient,
            (true, _) => Verdict::Observed,
        };
    }
    let enforcing = !matches!(i.action, Action::Log) && i.mode == Mode::Enforce;
    if enforcing {
        if let Some((k, alive)) = i.floor {
            if alive() <= k as usize {
                return Verdict::Refused(Refusal::WorkerFloor);
            }
        }
    }
    if !enforcing {
        return if matches!(i.action, Action::Log) {
            Verdict::Logged
        } else {
            Verdict::Observed
        };
    }
    match breaker.check(i.breaker, i.now_ns) {
        BreakerVerdict::Allow => Verdict::Act,
        BreakerVerdict::Trip => Verdict::Tripped,
        BreakerVerdict::Open => Verdict::Observed,
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::Signal;
    use proptest::prelude::*;

    use super::*;
    use crate::config::Sig;

    fn action(k: u8) -> Action {
        match k % 4 {
            0 => Action::Signal(Sig(Signal::SIGKILL)),
            1 => Action::Reset,
            2 => Action::KillQuery,
            _ => Action::Log,
        }
    }

    proptest! {
        /// Both directions: a step acts exactly when it is still current, the guard allows it,
        /// it is an enforcing step in enforce mode, the worker floor holds and the breaker
        /// allows it; and it never acts otherwise.
        #[test]
        fn acts_exactly_when_every_link_allows(
            k in 0u8..4,
            observe in any::<bool>(),
            current in any::<bool>(),
            refused in any::<bool>(),
            floor in proptest::option::of((0u32..4, 0usize..6)),
            tripped_before in 0u32..3,
            blame_k in 0u8..4,
        ) {
            let blame = match blame_k {
                0 => Blame::Server,
                1 => Blame::Unknown,
                2 => Blame::Client { stalled: false },
                _ => Blame::Client { stalled: true },
            };
            let cfg = BreakerConfig { max_actions: 2, ..BreakerConfig::default() };
            let mut breaker = Breaker::default();
            for n in 0..tripped_before {
                breaker.check(&cfg, u64::from(n));
            }
            let allows = breaker.clone().check(&cfg, 10) == BreakerVerdict::Allow;
            let alive_reads = std::cell::Cell::new(0);
            let alive = |n: usize| {
                alive_reads.set(alive_reads.get() + 1);
                n
            };
            let count = floor.map(|(_, n)| n).unwrap_or(0);
            let f = move || alive(count);
            let v = decide(
                Inputs {
                    action: action(k),
                    mode: if observe { Mode::Observe } else { Mode::Enforce },
                    still_current: current,
                    guard: if refused { Err(Refusal::Protected) } else { Ok(()) },
                    floor: floor.map(|(k, _)| (k, &f as &dyn Fn() -> usize)),
                    breaker: &cfg,
                    now_ns: 10,
                    blame,
                },
                &mut breaker,
            );
            let enforcing = !matches!(action(k), Action::Log) && !observe;
            let floor_ok = floor.is_none_or(|(k, n)| n > k as usize);
            let client = matches!(blame, Blame::Client { .. }) && !matches!(action(k), Action::Log);
            let should_act = current && !refused && !client && enforcing && floor_ok && allows;
            // The worker is never acted on for a client's time; a stalled client is cut
            // exactly when the step would enforce (enforce mode, not a log step).
            if current && !refused && client {
                let want = match blame {
                    Blame::Client { stalled: false } => Verdict::ClientSending,
                    _ if observe => Verdict::Observed,
                    _ => Verdict::CutClient,
                };
                prop_assert_eq!(v, want);
                prop_assert_eq!(alive_reads.get(), 0);
                return Ok(());
            }
            prop_assert!(v != Verdict::CutClient && v != Verdict::ClientSending);
            prop_assert_eq!(v == Verdict::Act, should_act, "{:?}", v);
            if !current {
                prop_assert_eq!(v, Verdict::Ended);
            } else if refused {
                prop_assert_eq!(v, Verdict::Refused(Refusal::Protected));
            } else if enforcing && !floor_ok {
                prop_assert_eq!(v, Verdict::Refused(Refusal::WorkerFloor));
            } else if !enforcing {
                let want = if matches!(action(k), Action::Log) { Verdict::Logged } else { Verdict::Observed };
                prop_assert_eq!(v, want);
            }
            // /proc is scanned only for an enforcing step that got past the guard.
            prop_assert!(alive_reads.get() <= usize::from(current && !refused && enforcing));
        }
    }
}
