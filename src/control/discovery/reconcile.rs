//! Turns watch events into membership changes: it remembers what each source (selector)
//! currently routes, which worker each pod is, and what has been announced to the registry,
//! and emits only differences. A re-list (after a 410 Gone, or a restart of the watch)
//! replaces a source's view whole when it completes, so pods that vanished while the watch
//! was down are removed then.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;

use super::pod::{verdict, PodKey, Source, Verdict, Worker};
use crate::control::membership::{MembershipChange, Role};

/// What one source (one selector's watch) sees as routable now.
#[derive(Default)]
struct SourceView {
    pods: HashMap<PodKey, Worker>,
    /// While a re-list is under way: what it has listed so far.
    relist: Option<HashMap<PodKey, Worker>>,
}

pub struct Reconciler {
    sources: Vec<Source>,
    port: u16,
    views: Vec<SourceView>,
    /// Each routable pod's worker, the first source (in priority order) that routes it.
    effective: HashMap<PodKey, Worker>,
    /// The pods behind each URL (normally one; two only while an IP moves between pods).
    owners: HashMap<String, BTreeSet<PodKey>>,
    /// What the registry has been told.
    announced: BTreeMap<String, Role>,
}

impl Reconciler {
    pub fn new(sources: Vec<Source>, port: u16) -> Reconciler {
        let views = sources.iter().map(|_| SourceView::default()).collect();
        Reconciler {
            sources,
            port,
            views,
            effective: HashMap::new(),
            owners: HashMap::new(),
            announced: BTreeMap::new(),
        }
    }

    /// Applies one event of source `source`'s watch; returns the changes to announce
    /// (removals first).
    pub fn apply(&mut self, source: usize, event: Event<Pod>) -> Vec<MembershipChange> {
        let mut touched = BTreeSet::new();
        match event {
            Event::Init => {
                self.views[source].relist = Some(HashMap::new());
            }
            Event::InitApply(pod) => {
                let Some(key) = PodKey::of(&pod) else {
                    return Vec::new();
                };
                let seen = self.judge(source, &key, &pod);
                let view = &mut self.views[source];
                let relist = view.relist.get_or_insert_with(HashMap::new);
                if let Ok(worker) = seen {
                    relist.insert(key, worker);
                }
            }
            Event::InitDone => {
                let view = &mut self.views[source];
                let listed = view.relist.take().unwrap_or_default();
                let before = std::mem::replace(&mut view.pods, listed);
                let mut keys: BTreeSet<PodKey> = before.into_keys().collect();
                keys.extend(self.views[source].pods.keys().cloned());
                for key in keys {
                    self.refresh(&key, "gone at re-list", &mut touched);
                }
            }
            Event::Apply(pod) => {
                let Some(key) = PodKey::of(&pod) else {
                    return Vec::new();
                };
                let reason = match self.judge(source, &key, &pod) {
                    Ok(worker) => {
                        self.views[source].pods.insert(key.clone(), worker);
                        String::new()
                    }
                    Err(why) => {
                        self.views[source].pods.remove(&key);
                        why
                    }
                };
                self.refresh(&key, &reason, &mut touched);
            }
            Event::Delete(pod) => {
                let Some(key) = PodKey::of(&pod) else {
                    return Vec::new();
                };
                self.views[source].pods.remove(&key);
                self.refresh(&key, "deleted", &mut touched);
            }
        }
        self.announce(touched)
    }

    /// The worker `pod` is for `source`, or why it is not routable. Warns about an
    /// unreadable bootstrap annotation when the pod's worker changes (not on every event).
    fn judge(&self, source: usize, key: &PodKey, pod: &Pod) -> Result<Worker, String> {
        match verdict(pod, &self.sources[source], self.port) {
            Verdict::Route {
                worker,
                bad_annotation,
            } => {
                if let Some(raw) = bad_annotation {
                    if self.views[source].pods.get(key) != Some(&worker) {
                        tracing::warn!(
                            pod = %key,
                            annotation = super::pod::BOOTSTRAP_PORT_ANNOTATION,
                            value = %raw,
                            "kubernetes discovery: unreadable bootstrap port annotation; \
                             the prefill worker has none"
                        );
                    }
                }
                Ok(worker)
            }
            Verdict::Skip(why) => Err(why),
        }
    }

    /// Recomputes `key`'s worker from the sources, in priority order.
    fn refresh(&mut self, key: &PodKey, reason: &str, touched: &mut BTreeSet<String>) {
        let new = self.views.iter().find_map(|v| v.pods.get(key)).cloned();
        let old = self.effective.get(key).cloned();
        if new == old {
            return;
        }
        match (&old, &new) {
            (_, Some(w)) => tracing::info!(
                pod = %key,
                url = %w.url,
                role = ?w.role,
                "kubernetes discovery: pod is routable"
            ),
            (Some(w), None) => tracing::info!(
                pod = %key,
                url = %w.url,
                reason,
                "kubernetes discovery: pod leaves"
            ),
            (None, None) => {}
        }
        if let Some(o) = old {
            if let Some(set) = self.owners.get_mut(&o.url) {
                set.remove(key);
                if set.is_empty() {
                    self.owners.remove(&o.url);
                }
            }
            touched.insert(o.url);
        }
        match new {
            Some(n) => {
                self.owners
                    .entry(n.url.clone())
                    .or_default()
                    .insert(key.clone());
                touched.insert(n.url.clone());
                self.effective.insert(key.clone(), n);
            }
            None => {
                self.effective.remove(key);
            }
        }
    }

    /// Compares what each touched URL should be with what was announced. A role change is a
    /// removal and an addition.
    fn announce(&mut self, touched: BTreeSet<String>) -> Vec<MembershipChange> {
        let mut removes = Vec::new();
        let mut adds = Vec::new();
        for url in touched {
            let want = self
                .owners
                .get(&url)
                .and_then(|pods| pods.iter().next())
                .and_then(|k| self.effective.get(k))
                .map(|w| w.role.clone());
            let had = self.announced.get(&url);
            if want.as_ref() == had {
                continue;
            }
            if had.is_some() {
                self.announced.remove(&url);
                removes.push(MembershipChange::Remove { url: url.clone() });
            }
            if let Some(role) = want {
                self.announced.insert(url.clone(), role.clone());
                adds.push(MembershipChange::Add { url, role });
            }
        }
        removes.extend(adds);
        removes
    }
}

#[cfg(test)]
mod tests {
    use super::super::pod::{Kind, Label, Selector};
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(name: &str, role: &str, ip: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some([("role".to_string(), role.to_string())].into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn source(kind: Kind, role: &str) -> Source {
        Source {
            kind,
            selector: Selector::new(&[Label {
                key: "role".into(),
                value: role.into(),
            }]),
        }
    }

    fn add(url: &str, role: Role) -> MembershipChange {
        MembershipChange::Add {
            url: url.into(),
            role,
        }
    }

    fn remove(url: &str) -> MembershipChange {
        MembershipChange::Remove { url: url.into() }
    }

    #[test]
    fn a_relist_replaces_the_view_and_only_differences_are_announced() {
        let mut r = Reconciler::new(vec![source(Kind::Regular, "w")], 80);
        assert!(r.apply(0, Event::Init).is_empty());
        assert!(r
            .apply(0, Event::InitApply(pod("a", "w", "10.0.0.1")))
            .is_empty());
        assert!(r
            .apply(0, Event::InitApply(pod("b", "w", "10.0.0.2")))
            .is_empty());
        assert_eq!(
            r.apply(0, Event::InitDone),
            vec![
                add("http://10.0.0.1:80", Role::Regular),
                add("http://10.0.0.2:80", Role::Regular)
            ]
        );
        assert!(r
            .apply(0, Event::Apply(pod("a", "w", "10.0.0.1")))
            .is_empty());
        // The watch broke; the re-list no longer has a, has b unchanged, and c new.
        r.apply(0, Event::Init);
        r.apply(0, Event::InitApply(pod("b", "w", "10.0.0.2")));
        r.apply(0, Event::InitApply(pod("c", "w", "10.0.0.3")));
        assert_eq!(
            r.apply(0, Event::InitDone),
            vec![
                remove("http://10.0.0.1:80"),
                add("http://10.0.0.3:80", Role::Regular)
            ]
        );
    }

    #[test]
    fn prefill_wins_over_decode_and_a_role_change_is_remove_then_add() {
        let mut r = Reconciler::new(
            vec![source(Kind::Prefill, "both"), source(Kind::Decode, "both")],
            80,
        );
        let p = pod("a", "both", "10.0.0.1");
        assert_eq!(
            r.apply(1, Event::Apply(p.clone())),
            vec![add("http://10.0.0.1:80", Role::Decode)]
        );
        let prefill = Role::Prefill {
            bootstrap_port: None,
        };
        assert_eq!(
            r.apply(0, Event::Apply(p.clone())),
            vec![
                remove("http://10.0.0.1:80"),
                add("http://10.0.0.1:80", prefill.clone())
            ]
        );
        assert!(
            r.apply(1, Event::Delete(p.clone())).is_empty(),
            "still prefill"
        );
        assert_eq!(
            r.apply(0, Event::Delete(p)),
            vec![remove("http://10.0.0.1:80")]
        );
    }

    #[test]
    fn an_ip_taken_over_by_another_pod_stays_announced_once() {
        let mut r = Reconciler::new(vec![source(Kind::Regular, "w")], 80);
        assert_eq!(
            r.apply(0, Event::Apply(pod("old", "w", "10.0.0.9"))).len(),
            1
        );
        // The new pod got the IP before the old one's deletion arrived.
        assert!(r
            .apply(0, Event::Apply(pod("new", "w", "10.0.0.9")))
            .is_empty());
        assert!(r
            .apply(0, Event::Delete(pod("old", "w", "10.0.0.9")))
            .is_empty());
        assert_eq!(
            r.apply(0, Event::Delete(pod("new", "w", "10.0.0.9"))),
            vec![remove("http://10.0.0.9:80")]
        );
    }
}
