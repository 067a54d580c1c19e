//! Facts about a process from /proc, for policy selection and the safety rules.

use std::{collections::HashMap, fs, sync::Arc};

/// `facts` read once per (process, thread) within one wake-up of the acting thread (its kernel
/// events and its due steps): a burst of requests owned by one thread (an event loop) reads
/// /proc once, not per request. A wake-up spans milliseconds; every action still re-checks the
/// kernel's view first. Shared, not copied: each request of a burst holds the same facts.
pub struct FactsCache {
    facts: HashMap<(u32, u32), Option<Arc<ProcessFacts>>>,
    lineage: bool,
}

impl Default for FactsCache {
    fn default() -> Self {
        Self::new(true)
    }
}

impl FactsCache {
    /// `lineage`: whether the facts need the process's ancestors (a `pids` selector of a policy
    /// or of `[protect]`). Walking them reads one `stat` per ancestor, most of the cost of
    /// `facts` for a server a few levels below init; without it, the lineage is the process.
    pub fn new(lineage: bool) -> Self {
        Self {
            facts: HashMap::new(),
            lineage,
        }
    }

    /// `facts` read now, past the cache (with the lineage if this cache reads it): for a
    /// process pinned after the cached read (`actions::pinned_facts`).
    pub fn read(&self, pid: u32, tid: u32) -> Option<ProcessFacts> {
        read_facts(pid, tid, self.lineage)
    }

    pub fn get(&mut self, pid: u32, tid: u32) -> Option<Arc<ProcessFacts>> {
        let lineage = self.lineage;
        self.facts
            .entry((pid, tid))
            .or_insert_with(|| read_facts(pid, tid, lineage).map(Arc::new))
            .clone()
    }
}

/// What is known about the process that owns a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: u32,
    /// Thread that owns the request.
    pub tid: u32,
    pub comm: String,
    /// Executable path; empty for kernel threads.
    pub exe: String,
    /// cgroup v2 path (or the first v1 path when there is no v2 line).
    pub cgroup: String,
    /// The process, its parent, grandparent ... up to pid 1.
    pub lineage: Vec<u32>,
    /// A kernel thread (PF_KTHREAD).
    pub kernel_thread: bool,
    /// Kubernetes namespace, pod and container names (`pods.rs`); `None` outside a pod or
    /// when the kubelet's files do not name it.
    pub pod: Option<crate::pods::PodNames>,
}

const PF_KTHREAD: u32 = 0x0020_0000;

/// Reads what the policy needs about `pid` (owner thread `tid`). `None` if the process is gone.
pub fn facts(pid: u32, tid: u32) -> Option<ProcessFacts> {
    read_facts(pid, tid, true)
}

/// `facts`, with the lineage only if `lineage` (else the process alone).
fn read_facts(pid: u32, tid: u32, lineage: bool) -> Option<ProcessFacts> {
    let proc = procfs::process::Process::new(pid as i32).ok()?;
    let stat = proc.stat().ok()?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let cgroup = cgroup_path(pid).unwrap_or_default();
    Some(ProcessFacts {
        pid,
        tid,
        comm: stat.comm.clone(),
        exe,
        pod: crate::pods::names_of_cgroup(&cgroup),
        cgroup,
        lineage: if lineage {
            self::lineage(pid, stat.ppid as u32)
        } else {
            vec![pid]
        },
        kernel_thread: stat.flags & PF_KTHREAD != 0,
    })
}

/// The process and its ancestors, nearest first.
fn lineage(pid: u32, mut ppid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    while ppid > 0 && out.len() < 64 && !out.contains(&ppid) {
        out.push(ppid);
        ppid = procfs::process::Process::new(ppid as i32)
            .and_then(|p| p.stat())
            .map_or(0, |s| s.ppid as u32);
    }
    out
}

/// The cgroup v2 path (`0::/...`), or the first v1 path when there is none.
pub fn cgroup_path(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    parse_cgroup(&text)
}

fn parse_cgroup(text: &str) -> Option<String> {
    let mut first = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, _controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if id == "0" {
            return Some(path.to_string());
        }
        if first.is_none() && path != "/" {
            first = Some(path.to_string());
        }
    }
    first
}

/// Kubernetes pod UID and container id from a cgroup path, for the cgroupfs and systemd
/// drivers and the containerd, CRI-O and Docker runtimes.
pub fn container_of(cgroup: &str) -> (Option<String>, Option<String>) {
    let mut pod = None;
    let mut container = None;
    for seg in cgroup.split('/') {
        let seg = seg
            .strip_suffix(".slice")
            .or_else(|| seg.strip_suffix(".scope"))
            .unwrap_or(seg);
        if let Some(i) = seg.rfind("pod") {
            let uid = &seg[i + 3..];
            if uid.len() == 36
                && uid
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
            {
                pod = Some(uid.replace('_', "-"));
                continue;
            }
        }
        let id = seg.rsplit(['-', ':']).next().unwrap_or(seg);
        if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
            container = Some(id.to_string());
        }
    }
    (pod, container)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const POD: &str = "3f2a1b4c-5d6e-7f80-9a1b-2c3d4e5f6a7b";

    #[test]
    fn cgroup_v2_line_wins() {
        assert_eq!(
            parse_cgroup("12:pids:/a\n0::/system.slice/x.service\n").as_deref(),
            Some("/system.slice/x.service")
        );
        assert_eq!(
            parse_cgroup("12:pids:/kubepods/x\n1:cpu:/\n").as_deref(),
            Some("/kubepods/x")
        );
    }

    #[test]
    fn container_ids_for_each_driver_and_runtime() {
        let us = POD.replace('-', "_");
        let cases = [
            format!("/kubepods/burstable/pod{POD}/{CID}"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{us}.slice/cri-containerd-{CID}.scope"),
            format!("/kubepods.slice/kubepods-pod{us}.slice/crio-{CID}.scope"),
            format!("/kubepods/besteffort/pod{POD}/docker-{CID}.scope"),
        ];
        for c in cases {
            assert_eq!(
                container_of(&c),
                (Some(POD.to_string()), Some(CID.to_string())),
                "{c}"
            );
        }
        assert_eq!(container_of("/system.slice/nginx.service"), (None, None));
    }
}
