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
///
/// Only from the kubelet's layout, by position: `kubepods[.slice]` at the root, then an
/// optional QoS level (`burstable`, `besteffort`, `kubepods-<qos>.slice`), then the pod
/// (`pod<uid>`, `kubepods[-<qos>]-pod<uid_>.slice`), then the container right below it.
/// Whatever lies below the container is the container's own (a delegated cgroup may be named
/// anything, `pod<another uid>` included) and is never read. A path seen from inside a cgroup
/// namespace starts with `..` segments up to the common ancestor: the layout is then matched
/// from the first segment after them, without the levels the `..` stand for.
pub fn container_of(cgroup: &str) -> (Option<String>, Option<String>) {
    let mut segs = cgroup.split('/').filter(|s| !s.is_empty()).peekable();
    let mut relative = false;
    while segs.peek() == Some(&"..") {
        segs.next();
        relative = true;
    }
    let mut next = segs.next();
    if matches!(next, Some("kubepods" | "kubepods.slice")) {
        next = segs.next();
    } else if !relative {
        return (None, None);
    }
    if matches!(
        next,
        Some("burstable" | "besteffort" | "kubepods-burstable.slice" | "kubepods-besteffort.slice")
    ) {
        next = segs.next();
    }
    let Some(pod) = next.and_then(pod_uid) else {
        return (None, None);
    };
    let container = segs.next().and_then(container_id);
    (Some(pod), container)
}

/// The UID of a kubelet pod cgroup: `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_>.slice`
/// (systemd).
fn pod_uid(seg: &str) -> Option<String> {
    let uid = match seg.strip_suffix(".slice") {
        Some(unit) => [
            "kubepods-pod",
            "kubepods-burstable-pod",
            "kubepods-besteffort-pod",
        ]
        .iter()
        .find_map(|p| unit.strip_prefix(p))?,
        None => seg.strip_prefix("pod")?,
    };
    let ok = uid.len() == 36
        && uid
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
    ok.then(|| uid.replace('_', "-"))
}

/// The container id of the cgroup right below a pod's: `<id>`, `<runtime>-<id>.scope`.
fn container_id(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".scope").unwrap_or(seg);
    let id = seg.rsplit(['-', ':']).next().unwrap_or(seg);
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_string())
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

    #[test]
    fn pod_identity_only_from_the_kubelet_layout() {
        let us = POD.replace('-', "_");
        const OTHER: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
        let other_us = OTHER.replace('-', "_");
        let ours = (Some(POD.to_string()), Some(CID.to_string()));
        // A delegated cgroup below a container names another pod: the container's own pod wins.
        for c in [
            format!("/kubepods/burstable/pod{POD}/{CID}/pod{OTHER}/{}", "f".repeat(64)),
            format!("/kubepods/burstable/pod{POD}/{CID}/kubepods/pod{OTHER}/x"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{us}.slice/cri-containerd-{CID}.scope/kubepods-pod{other_us}.slice/crio-{}.scope", "e".repeat(64)),
        ] {
            assert_eq!(container_of(&c), ours, "{c}");
        }
        // Seen from inside a cgroup namespace: `..` up to a common ancestor, then the layout.
        for c in [
            format!("/../../kubepods-burstable.slice/kubepods-burstable-pod{us}.slice/cri-containerd-{CID}.scope"),
            format!("/../../../besteffort/pod{POD}/{CID}"),
            format!("/../../pod{POD}/{CID}"),
        ] {
            assert_eq!(container_of(&c), ours, "{c}");
        }
        // Pod-shaped names outside the kubelet's positions claim nothing.
        for c in [
            format!("/user.slice/user-1000.slice/user@1000.service/kubepods/pod{OTHER}/{CID}"),
            format!("/system.slice/pod{OTHER}/{CID}"),
            format!("/kubepods/burstable/extra/pod{OTHER}/{CID}"),
            format!("/kubepods/pod{OTHER}x/{CID}"),
            format!("/kubepods.slice/evil-pod{other_us}.slice/{CID}"),
            format!("/../../app/pod{OTHER}/{CID}"),
            format!("/../{CID}"),
        ] {
            assert_eq!(container_of(&c).0, None, "{c}");
        }
    }

    proptest::proptest! {
        /// Whatever a container creates below itself, its identity stays the kubelet's.
        #[test]
        fn nothing_below_a_container_changes_its_identity(
            below in proptest::collection::vec("[a-z0-9_.:-]{1,70}|pod[0-9a-f_-]{36}", 0..5),
            systemd in proptest::bool::ANY,
        ) {
            let base = if systemd {
                format!("/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CID}.scope", POD.replace('-', "_"))
            } else {
                format!("/kubepods/pod{POD}/{CID}")
            };
            let path = std::iter::once(base).chain(below).collect::<Vec<_>>().join("/");
            proptest::prop_assert_eq!(
                container_of(&path),
                (Some(POD.to_string()), Some(CID.to_string()))
            );
        }
    }
}
