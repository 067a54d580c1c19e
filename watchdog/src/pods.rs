//! Kubernetes names (namespace, pod, container) of a process, read from the files the kubelet
//! writes on every node, with no API access:
//!
//! - `<logs>/pods/<namespace>_<pod>_<uid>/<container>/` names the pod of a pod UID;
//! - `<logs>/containers/<pod>_<namespace>_<container>-<id>.log` names the container of an id.
//!
//! `<logs>` is `[daemon] kubelet_logs` (default `/var/log`). The pod UID and container id come
//! from the process's cgroup path (`process::container_of`). The two directories are indexed
//! once and re-read when their mtime changes, or on a miss at most once per `MISS_REREAD`: a
//! lookup costs two `stat` calls and two hash lookups, and only processes in a pod pay them.
//! A name found never goes stale (the kubelet never reuses a pod UID or a runtime a container
//! id); re-reading is for pods that appear, and to forget those that left.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

pub use crate::config::DEFAULT_KUBELET_LOGS;

/// A lookup that finds nothing re-reads the directories at most this often, in case a change
/// fell within one tick of the directory's coarse mtime.
const MISS_REREAD: Duration = Duration::from_secs(1);

/// The names of the pod and container a process runs in.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PodNames {
    pub namespace: String,
    pub pod: String,
    /// Known when the container id is in `containers/`; a pod's sandbox (pause) has none.
    pub container: Option<String>,
}

/// `<namespace>_<pod>_<uid>` → (namespace, pod, uid). Namespace and pod names are DNS names
/// (no `_`), the UID is 36 characters.
pub fn parse_pod_dir(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.split('_');
    let (ns, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = parts.next().is_none()
        && !ns.is_empty()
        && !pod.is_empty()
        && uid.len() == 36
        && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then_some((ns, pod, uid))
}

/// `<pod>_<namespace>_<container>-<id>.log` → (namespace, pod, container, id). The id is the
/// runtime's 64 hex digits; container names may hold `-`, so the id is after the last one.
pub fn parse_container_log(name: &str) -> Option<(&str, &str, &str, &str)> {
    let stem = name.strip_suffix(".log")?;
    let (rest, id) = stem.rsplit_once('-')?;
    let mut parts = rest.split('_');
    let (pod, ns, container) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = parts.next().is_none()
        && !pod.is_empty()
        && !ns.is_empty()
        && !container.is_empty()
        && id.len() == 64
        && id.chars().all(|c| c.is_ascii_hexdigit());
    ok.then_some((ns, pod, container, id))
}

/// What the two directories said when last read.
#[derive(Debug, Default, PartialEq)]
struct Index {
    /// Pod UID → (namespace, pod).
    pods: HashMap<String, (String, String)>,
    /// Container id → names.
    containers: HashMap<String, PodNames>,
}

impl Index {
    /// Builds the index from directory entry names.
    fn from_names<'a>(
        pod_dirs: impl IntoIterator<Item = &'a str>,
        container_logs: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut ix = Index::default();
        for (ns, pod, uid) in pod_dirs.into_iter().filter_map(parse_pod_dir) {
            ix.pods.insert(uid.into(), (ns.into(), pod.into()));
        }
        for (ns, pod, container, id) in container_logs.into_iter().filter_map(parse_container_log) {
            ix.containers.insert(
                id.into(),
                PodNames {
                    namespace: ns.into(),
                    pod: pod.into(),
                    container: Some(container.into()),
                },
            );
        }
        ix
    }

    /// The container id names the container; the pod UID alone names the pod.
    fn find(&self, uid: Option<&str>, container_id: Option<&str>) -> Option<PodNames> {
        if let Some(n) = container_id.and_then(|id| self.containers.get(id)) {
            return Some(n.clone());
        }
        let (ns, pod) = self.pods.get(uid?)?;
        Some(PodNames {
            namespace: ns.clone(),
            pod: pod.clone(),
            container: None,
        })
    }
}

/// (mtime in ns, inode) of a directory; `None` when it does not exist.
type Stamp = Option<(i128, u64)>;

fn stamp(dir: &Path) -> Stamp {
    let m = std::fs::metadata(dir).ok()?;
    Some((
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        m.ino(),
    ))
}

fn entry_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The cached index of one kubelet log root.
#[derive(Debug)]
pub struct Resolver {
    pods_dir: PathBuf,
    containers_dir: PathBuf,
    stamps: (Stamp, Stamp),
    read_at: Option<Instant>,
    index: Index,
    /// Times the directories were read (for tests and the debug log).
    pub reads: u64,
}

impl Resolver {
    pub fn new(logs: &Path) -> Self {
        Self {
            pods_dir: logs.join("pods"),
            containers_dir: logs.join("containers"),
            stamps: (None, None),
            read_at: None,
            index: Index::default(),
            reads: 0,
        }
    }

    fn reread(&mut self, stamps: (Stamp, Stamp)) {
        let pods = entry_names(&self.pods_dir);
        let containers = entry_names(&self.containers_dir);
        self.index = Index::from_names(
            pods.iter().map(String::as_str),
            containers.iter().map(String::as_str),
        );
        self.stamps = stamps;
        self.read_at = Some(Instant::now());
        self.reads += 1;
        tracing::debug!(
            pods = self.index.pods.len(),
            containers = self.index.containers.len(),
            dir = %self.pods_dir.display(),
            "kubelet log directories read"
        );
    }

    /// The names for a pod UID and container id (both from the cgroup path).
    pub fn lookup(&mut self, uid: Option<&str>, container_id: Option<&str>) -> Option<PodNames> {
        if uid.is_none() && container_id.is_none() {
            return None;
        }
        let now = (stamp(&self.pods_dir), stamp(&self.containers_dir));
        if self.read_at.is_none() || now != self.stamps {
            self.reread(now);
        }
        if let Some(hit) = self.index.find(uid, container_id) {
            // A container id whose log file is not there yet falls back to the pod: look
            // again soon for the container name.
            if hit.container.is_some() || container_id.is_none() || !self.may_reread() {
                return Some(hit);
            }
        } else if !self.may_reread() {
            return None;
        }
        self.reread(now);
        self.index.find(uid, container_id)
    }

    fn may_reread(&self) -> bool {
        self.read_at.is_none_or(|t| t.elapsed() >= MISS_REREAD)
    }
}

/// The daemon's resolver; `configure` sets its root once at start.
static RESOLVER: Mutex<Option<Resolver>> = Mutex::new(None);

/// Sets the kubelet log root the daemon reads (`[daemon] kubelet_logs`).
pub fn configure(logs: &Path) {
    if let Ok(mut r) = RESOLVER.lock() {
        *r = Some(Resolver::new(logs));
    }
}

/// The names of the pod and container of a cgroup path, if it is a pod's and the kubelet's
/// files name it. Before `configure`, the default root is used.
pub fn names_of_cgroup(cgroup: &str) -> Option<PodNames> {
    let (uid, container_id) = crate::process::container_of(cgroup);
    if uid.is_none() && container_id.is_none() {
        return None;
    }
    let mut guard = RESOLVER.lock().ok()?;
    guard
        .get_or_insert_with(|| Resolver::new(Path::new(DEFAULT_KUBELET_LOGS)))
        .lookup(uid.as_deref(), container_id.as_deref())
}

/// Keeps the `namespace` label of the action metrics bounded: the first `max` namespaces acted
/// on keep their name, later ones count as `_other` (never a namespace name: those have no `_`);
/// a process outside any pod has the empty value (the label is absent in PromQL).
#[derive(Debug)]
pub struct NamespaceLabels {
    max: usize,
    seen: Vec<String>,
}

/// Namespaces that keep a label of their own.
pub const MAX_NAMESPACE_LABELS: usize = 16;
pub const OTHER_NAMESPACES: &str = "_other";

impl Default for NamespaceLabels {
    fn default() -> Self {
        Self::new(MAX_NAMESPACE_LABELS)
    }
}

impl NamespaceLabels {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: Vec::new(),
        }
    }

    pub fn label(&mut self, namespace: Option<&str>) -> String {
        let Some(ns) = namespace else {
            return String::new();
        };
        if self.seen.iter().any(|s| s == ns) {
            return ns.into();
        }
        if self.seen.len() < self.max {
            self.seen.push(ns.into());
            return ns.into();
        }
        OTHER_NAMESPACES.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f2a1b4c-5d6e-7f80-9a1b-2c3d4e5f6a7b";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn pod_directory_names() {
        assert_eq!(
            parse_pod_dir(&format!("payments_api-7d9f8-x2x4q_{UID}")),
            Some(("payments", "api-7d9f8-x2x4q", UID))
        );
        assert_eq!(parse_pod_dir("payments_api"), None);
        assert_eq!(parse_pod_dir(&format!("a_b_c_{UID}")), None);
        assert_eq!(parse_pod_dir(&format!("_api_{UID}")), None);
        assert_eq!(parse_pod_dir("payments_api_not-a-uid"), None);
    }

    #[test]
    fn container_log_names() {
        assert_eq!(
            parse_container_log(&format!("api-7d9f8-x2x4q_payments_app-server-{CID}.log")),
            Some(("payments", "api-7d9f8-x2x4q", "app-server", CID))
        );
        // Not a log, a short id, an id that is not hex, a missing part.
        assert_eq!(
            parse_container_log(&format!("api_payments_app-{CID}.txt")),
            None
        );
        assert_eq!(parse_container_log("api_payments_app-0123abcd.log"), None);
        assert_eq!(
            parse_container_log(&format!("api_payments_app-{}.log", "z".repeat(64))),
            None
        );
        assert_eq!(parse_container_log(&format!("api_app-{CID}.log")), None);
    }

    #[test]
    fn container_id_names_the_container_and_uid_alone_the_pod() {
        let pod_dir = format!("payments_api-1_{UID}");
        let log = format!("api-1_payments_app-{CID}.log");
        let ix = Index::from_names([pod_dir.as_str(), "junk"], [log.as_str(), "x.log"]);
        let full = PodNames {
            namespace: "payments".into(),
            pod: "api-1".into(),
            container: Some("app".into()),
        };
        assert_eq!(ix.find(Some(UID), Some(CID)), Some(full.clone()));
        assert_eq!(ix.find(None, Some(CID)), Some(full));
        let other_cid = "f".repeat(64);
        assert_eq!(
            ix.find(Some(UID), Some(&other_cid)),
            Some(PodNames {
                namespace: "payments".into(),
                pod: "api-1".into(),
                container: None
            }),
            "a sandbox or a container without a log yet: the pod is still known"
        );
        assert_eq!(ix.find(Some("0-0"), Some(&other_cid)), None);
        assert_eq!(ix.find(None, None), None);
    }

    #[test]
    fn resolver_sees_pods_come_and_go() {
        let root = std::env::temp_dir().join(format!("watchdog-pods-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("pods")).unwrap();
        std::fs::create_dir_all(root.join("containers")).unwrap();
        let mut r = Resolver::new(&root);
        assert_eq!(r.lookup(Some(UID), Some(CID)), None);
        let pod = root.join("pods").join(format!("shop_web-0_{UID}"));
        std::fs::create_dir_all(pod.join("web")).unwrap();
        std::fs::write(
            root.join("containers")
                .join(format!("web-0_shop_web-{CID}.log")),
            "",
        )
        .unwrap();
        let n = r
            .lookup(Some(UID), Some(CID))
            .expect("the new pod is found");
        assert_eq!(
            (n.namespace.as_str(), n.pod.as_str(), n.container.as_deref()),
            ("shop", "web-0", Some("web"))
        );
        let reads = r.reads;
        assert!(r.lookup(Some(UID), Some(CID)).is_some());
        assert_eq!(r.reads, reads, "unchanged directories are not read again");
        // Past one tick of a coarse mtime clock, so the removal changes the directories' mtime.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::remove_dir_all(&pod).unwrap();
        std::fs::remove_file(
            root.join("containers")
                .join(format!("web-0_shop_web-{CID}.log")),
        )
        .unwrap();
        assert_eq!(
            r.lookup(Some(UID), Some(CID)),
            None,
            "the pod that left is forgotten"
        );
        assert_eq!(r.reads, reads + 1);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn namespace_labels_are_bounded() {
        let mut l = NamespaceLabels::new(2);
        assert_eq!(l.label(Some("a")), "a");
        assert_eq!(l.label(Some("b")), "b");
        assert_eq!(l.label(Some("c")), OTHER_NAMESPACES);
        assert_eq!(l.label(Some("a")), "a");
        assert_eq!(l.label(None), "");
    }
}
