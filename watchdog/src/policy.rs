//! Policy decisions, as plain functions of facts: which policy a request falls under, whether a
//! process may be acted on at all, and whether a policy's circuit breaker lets an action through.
//! Nothing here touches the kernel or /proc; `process.rs` gathers the facts.

use std::{collections::VecDeque, time::Duration};

use crate::config::{BreakerConfig, Config, Policy, Selector};
pub use crate::process::ProcessFacts;

/// Does `sel` cover this process? Every non-empty list must match (AND), any entry of a list
/// may match (OR). An empty selector covers every process.
pub fn selects(sel: &Selector, p: &ProcessFacts) -> bool {
    let container = || crate::process::container_of(&p.cgroup);
    // A process outside any pod has no pod UID or container id: a selector on them misses it.
    let names = |f: fn(&crate::pods::PodNames) -> Option<String>| p.pod.as_ref().and_then(f);
    let any = |globs: &[crate::config::Glob], value: Option<String>| {
        globs.is_empty() || value.is_some_and(|v| globs.iter().any(|g| g.0.matches(&v)))
    };
    (sel.pids.is_empty() || p.lineage.iter().any(|pid| sel.pids.contains(pid)))
        && (sel.comm.is_empty() || sel.comm.iter().any(|g| g.0.matches(&p.comm)))
        && (sel.exe.is_empty() || sel.exe.iter().any(|g| g.0.matches(&p.exe)))
        && (sel.cgroup.is_empty() || sel.cgroup.iter().any(|g| g.0.matches(&p.cgroup)))
        && (sel.pod_uid.is_empty() || any(&sel.pod_uid, container().0))
        && (sel.container_id.is_empty() || any(&sel.container_id, container().1))
        && (sel.namespace.is_empty() || any(&sel.namespace, names(|n| Some(n.namespace.clone()))))
        && (sel.pod.is_empty() || any(&sel.pod, names(|n| Some(n.pod.clone()))))
        && (sel.container.is_empty() || any(&sel.container, names(|n| n.container.clone())))
}

/// Does a selector of `cfg` (a policy's or `[protect]`) name processes by pid, so that `selects`
/// needs the owners' ancestors (`ProcessFacts::lineage`)?
pub fn uses_lineage(cfg: &crate::config::Config) -> bool {
    !cfg.protect.pids.is_empty() || cfg.policies.iter().any(|p| !p.selector.pids.is_empty())
}

/// The policy for a request on `port` owned by `p`: the first, in file order, whose ports and
/// selector both match.
pub fn select<'a>(cfg: &'a Config, port: u16, p: &ProcessFacts) -> Option<&'a Policy> {
    cfg.policies
        .iter()
        .find(|pol| pol.covers_port(port) && selects(&pol.selector, p))
}

/// Why an action was refused by a rule that no policy can override.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Init (pid 1) holds the system together.
    #[error("refused: pid 1 is never acted on")]
    Init,
    /// The daemon never signals itself.
    #[error("refused: the target is the watchdog itself")]
    SelfTarget,
    /// Kernel threads cannot own user requests and must not be signalled.
    #[error("refused: the target is a kernel thread")]
    KernelThread,
    /// Listed in `[protect]`.
    #[error("refused: the target is protected by the [protect] list")]
    Protected,
    /// Acting would leave fewer live workers than the policy's `min_workers`.
    #[error("refused: fewer than min_workers workers would remain")]
    WorkerFloor,
    /// The task the action would reach is not the request's owner: its id now names a task of
    /// another process, or one that started after the request (`actions::pin`).
    #[error("refused: the target is not the request's owner")]
    NotOwner,
    /// The process the action would reach is no longer one the policy selects (it exec'd
    /// another program, moved to another cgroup): judged on the pinned process, not on what
    /// the request's owner was when the request started.
    #[error("refused: the policy no longer selects the target")]
    NotSelected,
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Init => "refused_init",
            Refusal::SelfTarget => "refused_self",
            Refusal::KernelThread => "refused_kernel_thread",
            Refusal::Protected => "refused_protected",
            Refusal::WorkerFloor => "refused_worker_floor",
            Refusal::NotOwner => "refused_not_owner",
            Refusal::NotSelected => "refused_not_selected",
        }
    }
}

/// The safety rules, applied before every action.
pub fn guard(p: &ProcessFacts, protect: &Selector, own_pid: u32) -> Result<(), Refusal> {
    if p.pid <= 1 || p.tid <= 1 {
        return Err(Refusal::Init);
    }
    if p.pid == own_pid {
        return Err(Refusal::SelfTarget);
    }
    if p.kernel_thread || p.exe.is_empty() {
        return Err(Refusal::KernelThread);
    }
    if !protect.is_empty() && selects(protect, p) {
        return Err(Refusal::Protected);
    }
    Ok(())
}

/// `guard`, then the step's own policy on the same facts: the rules for the process an action
/// would reach, read after that process was pinned (`actions::pin`). Runs before anything is
/// read about the target beyond these facts (diagnosis, stacks, ptrace).
pub fn guard_target(
    p: &ProcessFacts,
    protect: &Selector,
    own_pid: u32,
    policy: &Selector,
) -> Result<(), Refusal> {
    guard(p, protect, own_pid)?;
    if !selects(policy, p) {
        return Err(Refusal::NotSelected);
    }
    Ok(())
}

/// A kill-rate circuit breaker: one per policy and workload (`breakers.rs`). Times are
/// monotonic nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct Breaker {
    recent: VecDeque<u64>,
    open_until: Option<u64>,
    pub trips: u64,
}

/// What the breaker says about one action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerVerdict {
    Allow,
    /// This action would exceed the limit: the breaker opens now.
    Trip,
    /// Open (observe-only) until the cool-down ends.
    Open,
}

impl Breaker {
    /// Is the breaker open at `now`? Read only: `is_open` re-arms it.
    pub fn is_open_at(&self, now: u64) -> bool {
        self.open_until.is_some_and(|t| now < t)
    }

    /// Is the breaker open at `now`? Re-arms itself once the cool-down is over.
    pub fn is_open(&mut self, now: u64) -> bool {
        match self.open_until {
            Some(t) if now < t => true,
            Some(_) => {
                self.open_until = None;
                self.recent.clear();
                false
            }
            None => false,
        }
    }

    /// Asks to take one action at `now`; records it when allowed.
    pub fn check(&mut self, cfg: &BreakerConfig, now: u64) -> BreakerVerdict {
        if self.is_open(now) {
            return BreakerVerdict::Open;
        }
        let window = nanos(cfg.window);
        while self
            .recent
            .front()
            .is_some_and(|&t| now.saturating_sub(t) >= window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() as u64 >= u64::from(cfg.max_actions) {
            self.open_until = Some(now + nanos(cfg.cooldown));
            self.trips += 1;
            return BreakerVerdict::Trip;
        }
        self.recent.push_back(now);
        BreakerVerdict::Allow
    }
}

pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Glob;

    #[test]
    fn lineage_is_read_only_for_a_pid_selector_and_then_reaches_init() {
        let mut cfg = crate::config::Config::observe_everything();
        assert!(!uses_lineage(&cfg));
        let pid = std::process::id();
        let alone = crate::process::FactsCache::new(false)
            .get(pid, pid)
            .unwrap();
        assert_eq!(alone.lineage, vec![pid]);
        let full = crate::process::FactsCache::new(true).get(pid, pid).unwrap();
        assert_eq!(full.lineage.first(), Some(&pid));
        assert_eq!(full.lineage.last(), Some(&1), "{:?}", full.lineage);
        // A tree named by its root: the policy selects it only with the lineage.
        cfg.protect.pids = vec![1];
        assert!(uses_lineage(&cfg));
        assert!(selects(&cfg.protect, &full) && !selects(&cfg.protect, &alone));
        cfg.protect.pids.clear();
        cfg.policies[0].selector.pids = vec![1];
        assert!(uses_lineage(&cfg));
    }

    fn facts() -> ProcessFacts {
        ProcessFacts {
            pid: 200,
            tid: 201,
            comm: "gunicorn".into(),
            exe: "/usr/bin/python3.11".into(),
            cgroup: "/kubepods/pod1/abc".into(),
            lineage: vec![200, 100, 1],
            kernel_thread: false,
            pod: None,
        }
    }

    fn glob(s: &str) -> Glob {
        s.parse().unwrap()
    }

    #[test]
    fn selectors_on_pod_uid_and_container_id_read_the_cgroup_path() {
        const POD: &str = "3f2a1b4c-5d6e-7f80-9a1b-2c3d4e5f6a7b";
        const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let in_pod = ProcessFacts {
            // systemd driver, containerd: the UID's dashes are underscores in the path.
            cgroup: format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
                POD.replace('-', "_")
            ),
            ..facts()
        };
        let by_pod = |g: &str| Selector {
            pod_uid: vec![glob(g)],
            ..Default::default()
        };
        let by_container = |g: &str| Selector {
            container_id: vec![glob(g)],
            ..Default::default()
        };
        assert!(selects(&by_pod(POD), &in_pod));
        assert!(selects(&by_pod("3f2a1b4c-*"), &in_pod));
        assert!(!selects(&by_pod("00000000-*"), &in_pod));
        assert!(selects(&by_container("0123456789ab*"), &in_pod));
        assert!(!selects(&by_container("fedcba*"), &in_pod));
        // Not in a pod: no UID, no container id; even `*` does not select it.
        let host = ProcessFacts {
            cgroup: "/system.slice/nginx.service".into(),
            ..facts()
        };
        assert!(!selects(&by_pod("*"), &host));
        assert!(!selects(&by_container("*"), &host));
        // The same keys protect: a protected pod is refused whatever the policy.
        assert_eq!(guard(&in_pod, &by_pod(POD), 1234), Err(Refusal::Protected));
    }

    #[test]
    fn selectors_on_namespace_pod_and_container_names() {
        let in_pod = ProcessFacts {
            pod: Some(crate::pods::PodNames {
                namespace: "payments".into(),
                pod: "api-7d9f8-x2x4q".into(),
                container: Some("app".into()),
            }),
            ..facts()
        };
        let sandbox = ProcessFacts {
            pod: Some(crate::pods::PodNames {
                container: None,
                ..in_pod.pod.clone().unwrap()
            }),
            ..facts()
        };
        let sel = |ns: &[&str], pod: &[&str], c: &[&str]| Selector {
            namespace: ns.iter().map(|g| glob(g)).collect(),
            pod: pod.iter().map(|g| glob(g)).collect(),
            container: c.iter().map(|g| glob(g)).collect(),
            ..Default::default()
        };
        assert!(selects(&sel(&["payments"], &[], &[]), &in_pod));
        assert!(selects(
            &sel(&["other", "payments"], &["api-*"], &["app"]),
            &in_pod
        ));
        assert!(!selects(&sel(&["shop"], &[], &[]), &in_pod));
        assert!(!selects(&sel(&["payments"], &["web-*"], &[]), &in_pod));
        assert!(!selects(
            &sel(&["payments"], &["api-*"], &["sidecar"]),
            &in_pod
        ));
        // The pod is known but not the container: a container selector misses it.
        assert!(selects(&sel(&["payments"], &["api-*"], &[]), &sandbox));
        assert!(!selects(&sel(&[], &[], &["*"]), &sandbox));
        // Outside any pod: even `*` selects nothing.
        for s in [
            sel(&["*"], &[], &[]),
            sel(&[], &["*"], &[]),
            sel(&[], &[], &["*"]),
        ] {
            assert!(!selects(&s, &facts()));
        }
        assert_eq!(
            guard(&in_pod, &sel(&["payments"], &[], &[]), 1234),
            Err(Refusal::Protected)
        );
        assert_eq!(guard(&facts(), &sel(&["payments"], &[], &[]), 1234), Ok(()));
    }

    #[test]
    fn selectors_and_together_or_within() {
        let p = facts();
        assert!(selects(&Selector::default(), &p));
        assert!(
            selects(
                &Selector {
                    pids: vec![100],
                    ..Default::default()
                },
                &p
            ),
            "descendant of 100"
        );
        assert!(!selects(
            &Selector {
                pids: vec![300],
                ..Default::default()
            },
            &p
        ));
        assert!(selects(
            &Selector {
                comm: vec![glob("nginx"), glob("guni*")],
                ..Default::default()
            },
            &p
        ));
        assert!(selects(
            &Selector {
                exe: vec![glob("/usr/bin/python3*")],
                ..Default::default()
            },
            &p
        ));
        assert!(selects(
            &Selector {
                cgroup: vec![glob("/kubepods/*")],
                ..Default::default()
            },
            &p
        ));
        assert!(!selects(
            &Selector {
                comm: vec![glob("gunicorn")],
                cgroup: vec![glob("/system.slice/*")],
                ..Default::default()
            },
            &p
        ));
    }

    #[test]
    fn guard_refuses_what_no_policy_may_touch() {
        let p = facts();
        assert_eq!(guard(&p, &Selector::default(), 999), Ok(()));
        assert_eq!(
            guard(
                &ProcessFacts {
                    pid: 1,
                    ..p.clone()
                },
                &Selector::default(),
                999
            ),
            Err(Refusal::Init)
        );
        assert_eq!(
            guard(&p, &Selector::default(), 200),
            Err(Refusal::SelfTarget)
        );
        assert_eq!(
            guard(
                &ProcessFacts {
                    kernel_thread: true,
                    ..p.clone()
                },
                &Selector::default(),
                999
            ),
            Err(Refusal::KernelThread)
        );
        let protect = Selector {
            comm: vec![glob("gunicorn")],
            ..Default::default()
        };
        assert_eq!(guard(&p, &protect, 999), Err(Refusal::Protected));
        // The step's policy is judged on the same facts, after the guard.
        let python = Selector {
            exe: vec![glob("/usr/bin/python3*")],
            ..Default::default()
        };
        let exec_d = ProcessFacts {
            exe: "/usr/bin/sleep".into(),
            ..p.clone()
        };
        assert_eq!(guard_target(&p, &Selector::default(), 999, &python), Ok(()));
        assert_eq!(
            guard_target(&exec_d, &Selector::default(), 999, &python),
            Err(Refusal::NotSelected)
        );
        assert_eq!(
            guard_target(&exec_d, &protect, 999, &python),
            Err(Refusal::Protected),
            "the guard first"
        );
    }

    #[test]
    fn breaker_trips_at_the_limit_and_rearms_after_cooldown() {
        let cfg = BreakerConfig {
            max_actions: 2,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(5),
        };
        let s = 1_000_000_000;
        let mut b = Breaker::default();
        assert_eq!(b.check(&cfg, s), BreakerVerdict::Allow);
        assert_eq!(b.check(&cfg, 2 * s), BreakerVerdict::Allow);
        assert_eq!(b.check(&cfg, 3 * s), BreakerVerdict::Trip);
        assert_eq!(b.check(&cfg, 4 * s), BreakerVerdict::Open);
        assert!(b.is_open(7 * s));
        assert_eq!(
            b.check(&cfg, 8 * s),
            BreakerVerdict::Allow,
            "cool-down over"
        );
        assert_eq!(b.trips, 1);
    }

    proptest::proptest! {
        /// Never more than max_actions allowed within any window (when the cool-down is at least
        /// the window, as the default is).
        #[test]
        fn breaker_never_exceeds_its_rate(gaps in proptest::collection::vec(0u64..3_000_000_000, 1..200)) {
            let cfg = BreakerConfig { max_actions: 3, window: Duration::from_secs(5), cooldown: Duration::from_secs(5) };
            let mut b = Breaker::default();
            let mut now = 0;
            let mut allowed = Vec::new();
            for g in gaps {
                now += g;
                if b.check(&cfg, now) == BreakerVerdict::Allow { allowed.push(now); }
            }
            for (i, &t) in allowed.iter().enumerate() {
                let in_window = allowed[i..].iter().take_while(|&&u| u - t < 5_000_000_000).count();
                proptest::prop_assert!(in_window <= 3);
            }
        }

        /// Both bounds, against a model written from the rule: an action is allowed exactly
        /// when the breaker is not cooling down and fewer than max_actions were allowed in the
        /// window before it (counting since the last re-arm); refused only then, it trips and
        /// stays open for the cool-down. A breaker that refuses too much (or trips early, or
        /// stays open too long) fails here as surely as one that allows too much.
        #[test]
        fn breaker_allows_exactly_what_its_rule_allows(
            max in 1u32..5,
            window_ms in 1u64..5_000,
            cooldown_ms in 1u64..5_000,
            gaps in proptest::collection::vec(0u64..3_000_000_000, 1..200),
        ) {
            let ms = 1_000_000u64;
            let cfg = BreakerConfig { max_actions: max, window: Duration::from_millis(window_ms), cooldown: Duration::from_millis(cooldown_ms) };
            let mut b = Breaker::default();
            let (mut allowed, mut open_until, mut since, mut trips) = (Vec::<u64>::new(), None::<u64>, 0u64, 0u64);
            let mut now = 0;
            for g in gaps {
                now += g;
                let want = match open_until {
                    Some(t) if now < t => BreakerVerdict::Open,
                    _ => {
                        // Re-armed by this very call: what came before no longer counts.
                        if open_until.take().is_some() { since = now; }
                        let recent = allowed.iter().filter(|&&t| t >= since && now - t < window_ms * ms).count();
                        if recent >= max as usize {
                            open_until = Some(now + cooldown_ms * ms);
                            trips += 1;
                            BreakerVerdict::Trip
                        } else {
                            allowed.push(now);
                            BreakerVerdict::Allow
                        }
                    }
                };
                proptest::prop_assert_eq!(b.check(&cfg, now), want, "at {} ns", now);
            }
            proptest::prop_assert_eq!(b.trips, trips);
        }
    }
}
