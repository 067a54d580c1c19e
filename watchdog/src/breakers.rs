//! One circuit breaker per policy AND workload, so that one tenant tripping its breaker leaves
//! every other tenant's enforcement on. A workload is the owner's pod when the cgroup path names
//! one, else its cgroup (a container or a service unit), else the process (pid and start time).
//! The set is bounded (`MAX_BREAKERS`, least recently used goes first, closed breakers before
//! open ones), so a tenant that makes many workloads cannot grow the daemon's memory. Pure: the
//! daemon gathers the facts (`process.rs`) and asks here.

use std::collections::HashMap;

use crate::policy::{Breaker, ProcessFacts};

/// Breakers kept at most; past it the least recently used closed one is forgotten.
pub const MAX_BREAKERS: usize = 4096;

/// Whose actions one breaker counts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// A Kubernetes pod, by UID (from the kubelet's cgroup layout, `process::container_of`).
    Pod(String),
    /// A cgroup v2 path outside any pod: a container, a service unit, a slice.
    Cgroup(String),
    /// A process whose cgroup is not known: its pid and start time (clock ticks since boot),
    /// so a later process that reuses the pid is another workload.
    Process { pid: u32, start: u64 },
}

impl Workload {
    /// The workload of the process `p`; `start` reads its start time, asked only when neither
    /// a pod nor a cgroup names it.
    pub fn of(p: &ProcessFacts, start: impl FnOnce() -> Option<u64>) -> Self {
        if let (Some(uid), _) = crate::process::container_of(&p.cgroup) {
            return Workload::Pod(uid);
        }
        if !p.cgroup.is_empty() {
            return Workload::Cgroup(p.cgroup.clone());
        }
        Workload::Process {
            pid: p.pid,
            start: start().unwrap_or(0),
        }
    }

    /// For log lines.
    pub fn describe(&self) -> String {
        match self {
            Workload::Pod(uid) => format!("pod {uid}"),
            Workload::Cgroup(path) => format!("cgroup {path}"),
            Workload::Process { pid, start } => format!("process {pid} (start {start})"),
        }
    }
}

/// A process's start time (clock ticks after boot), for `Workload::of`.
pub fn start_time(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.starttime)
}

/// One breaker's key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub policy: String,
    pub workload: Workload,
}

/// The breakers, bounded.
#[derive(Debug)]
pub struct Breakers {
    map: HashMap<Key, (Breaker, u64)>,
    cap: usize,
    /// Use counter: the least recently used breaker has the smallest stamp.
    uses: u64,
}

impl Default for Breakers {
    fn default() -> Self {
        Self::with_capacity(MAX_BREAKERS)
    }
}

impl Breakers {
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap: cap.max(1),
            uses: 0,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The breaker of `key`, made (closed) if it is not kept; marks it used. At `now`, a new
    /// key over the bound forgets the least recently used closed breaker (an open one only when
    /// every kept breaker is open).
    pub fn get(&mut self, key: &Key, now: u64) -> &mut Breaker {
        self.uses += 1;
        let stamp = self.uses;
        if !self.map.contains_key(key) && self.map.len() >= self.cap {
            let victim = self
                .map
                .iter()
                .min_by_key(|(_, (b, used))| (b.is_open_at(now), *used))
                .map(|(k, _)| k.clone());
            if let Some(v) = victim {
                self.map.remove(&v);
            }
        }
        let entry = self
            .map
            .entry(key.clone())
            .or_insert_with(|| (Breaker::default(), stamp));
        entry.1 = stamp;
        &mut entry.0
    }

    /// Asks `key`'s breaker for one action at `now` (`Breaker::check`; the daemon hands `get`'s
    /// breaker to `decide::decide`, which asks it only when every link before it passed).
    #[cfg(test)]
    pub fn check(
        &mut self,
        key: &Key,
        cfg: &crate::config::BreakerConfig,
        now: u64,
    ) -> crate::policy::BreakerVerdict {
        self.get(key, now).check(cfg, now)
    }

    /// The keys whose breaker is open at `now`, sorted.
    pub fn open_at(&self, now: u64) -> Vec<&Key> {
        let mut open: Vec<&Key> = self
            .map
            .iter()
            .filter(|(_, (b, _))| b.is_open_at(now))
            .map(|(k, _)| k)
            .collect();
        open.sort();
        open
    }

    /// Is any breaker of `policy` open at `now`?
    pub fn policy_open(&self, policy: &str, now: u64) -> bool {
        self.map
            .iter()
            .any(|(k, (b, _))| k.policy == policy && b.is_open_at(now))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::{config::BreakerConfig, policy::BreakerVerdict};

    fn key(i: u8) -> Key {
        Key {
            policy: "api".into(),
            workload: Workload::Cgroup(format!("/tenant-{i}")),
        }
    }

    #[test]
    fn workload_is_the_pod_then_the_cgroup_then_the_process() {
        let pod = "3f2a1b4c-5d6e-7f80-9a1b-2c3d4e5f6a7b";
        let facts = |cgroup: &str| ProcessFacts {
            pid: 42,
            tid: 42,
            cgroup: cgroup.into(),
            ..Default::default()
        };
        let never = || -> Option<u64> { panic!("start time read although the cgroup names it") };
        assert_eq!(
            Workload::of(&facts(&format!("/kubepods/burstable/pod{pod}/0123")), never),
            Workload::Pod(pod.into())
        );
        assert_eq!(
            Workload::of(&facts("/system.slice/nginx.service"), never),
            Workload::Cgroup("/system.slice/nginx.service".into())
        );
        assert_eq!(
            Workload::of(&facts(""), || Some(7)),
            Workload::Process { pid: 42, start: 7 }
        );
        let me = std::process::id();
        assert!(start_time(me).is_some_and(|t| t > 0));
    }

    #[test]
    fn bounded_and_an_open_breaker_outlives_closed_ones() {
        let cfg = BreakerConfig {
            max_actions: 1,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(10),
        };
        let mut b = Breakers::with_capacity(3);
        // Key 0 trips at t = 1, 2.
        assert_eq!(b.check(&key(0), &cfg, 1), BreakerVerdict::Allow);
        assert_eq!(b.check(&key(0), &cfg, 2), BreakerVerdict::Trip);
        for i in 1..50 {
            assert_eq!(b.check(&key(i), &cfg, 3), BreakerVerdict::Allow);
            assert!(b.len() <= 3);
        }
        // The open breaker was kept although it is the least recently used.
        assert_eq!(b.check(&key(0), &cfg, 4), BreakerVerdict::Open);
        assert_eq!(b.open_at(4), vec![&key(0)]);
        assert!(b.policy_open("api", 4) && !b.policy_open("other", 4));
    }

    proptest! {
        /// Per key: never more than max_actions allowed within any window, whatever the other
        /// keys do meanwhile.
        #[test]
        fn breaker_never_exceeds_its_rate_per_key(
            steps in proptest::collection::vec((0u8..4, 0u64..3_000_000_000), 1..300),
        ) {
            let cfg = BreakerConfig { max_actions: 3, window: Duration::from_secs(5), cooldown: Duration::from_secs(5) };
            let mut b = Breakers::default();
            let mut now = 0;
            let mut allowed: HashMap<u8, Vec<u64>> = HashMap::new();
            for (k, g) in steps {
                now += g;
                if b.check(&key(k), &cfg, now) == BreakerVerdict::Allow {
                    allowed.entry(k).or_default().push(now);
                }
            }
            for times in allowed.values() {
                for (i, &t) in times.iter().enumerate() {
                    let in_window = times[i..].iter().take_while(|&&u| u - t < 5_000_000_000).count();
                    prop_assert!(in_window <= 3);
                }
            }
        }

        /// Isolation, both ways: every verdict of one key is exactly what a breaker set that
        /// saw only that key's actions says, however the other keys' actions interleave (and
        /// whether they trip or not). A key shared by accident, or a trip that leaks, fails.
        #[test]
        fn actions_of_one_key_never_change_another_keys_verdict(
            max in 1u32..4,
            steps in proptest::collection::vec((0u8..5, 0u64..2_000_000_000), 1..300),
        ) {
            let cfg = BreakerConfig { max_actions: max, window: Duration::from_secs(5), cooldown: Duration::from_secs(3) };
            let mut shared = Breakers::default();
            let mut alone: HashMap<u8, Breakers> = HashMap::new();
            let mut now = 0;
            for (k, g) in steps {
                now += g;
                let got = shared.check(&key(k), &cfg, now);
                let want = alone.entry(k).or_default().check(&key(k), &cfg, now);
                prop_assert_eq!(got, want, "key {} at {}", k, now);
            }
        }

        /// The bound holds whatever arrives, and a breaker that is open stays open while a
        /// closed one can be forgotten instead.
        #[test]
        fn never_more_than_the_bound(
            steps in proptest::collection::vec((0u8..40, 0u64..500_000_000), 1..300),
        ) {
            let cfg = BreakerConfig { max_actions: 1, window: Duration::from_secs(5), cooldown: Duration::from_secs(5) };
            let mut b = Breakers::with_capacity(8);
            let mut now = 0;
            for (k, g) in steps {
                now += g;
                let open_before: Vec<Key> = b.open_at(now).into_iter().cloned().collect();
                b.check(&key(k), &cfg, now);
                prop_assert!(b.len() <= 8);
                // While a closed breaker could be forgotten instead, no open one was.
                if open_before.len() < 8 {
                    let open_after = b.open_at(now);
                    prop_assert!(open_before.iter().all(|k| open_after.contains(&k)));
                }
            }
        }
    }
}
