//! Which pods are workers: the label selectors (`--selector`, `--prefill-selector`,
//! `--decode-selector`) and the one decision of this module, [`verdict`]: is this pod
//! routable right now, and at which URL and in which role.
//!
//! A pod is routable only while it matches the selector, is not being deleted, is in phase
//! `Running`, has its `Ready` condition `True`, and has a pod IP. (vllm-router keeps routing
//! to pods that turned NotReady; ringrouter does not.)

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Pod;

use crate::control::membership::Role;

/// The pod annotation that carries a prefill pod's bootstrap port (as in vllm-router).
pub const BOOTSTRAP_PORT_ANNOTATION: &str = "vllm.ai/bootstrap-port";

/// One label requirement, `key=value`, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub key: String,
    pub value: String,
}

/// Parses `key=value` with Kubernetes' label syntax: the key is an optional DNS-subdomain
/// prefix and `/`, then a name of at most 63 characters; the value is empty or a name.
pub fn parse_label(s: &str) -> Result<Label, String> {
    let bad =
        |why: &str| format!("'{s}' is not a label requirement key=value ({why}); e.g. app=vllm");
    let Some((key, value)) = s.split_once('=') else {
        return Err(bad("no '='"));
    };
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            let prefix_ok = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|part| {
                    !part.is_empty()
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !part.starts_with('-')
                        && !part.ends_with('-')
                });
            if !prefix_ok {
                return Err(bad("the key's prefix must be a DNS subdomain"));
            }
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err(bad("empty key"));
    }
    if !is_label_name(name) {
        return Err(bad(
            "the key's name is at most 63 characters of [A-Za-z0-9-_.], alphanumeric at both ends",
        ));
    }
    if !value.is_empty() && !is_label_name(value) {
        return Err(bad(
            "the value is at most 63 characters of [A-Za-z0-9-_.], alphanumeric at both ends",
        ));
    }
    Ok(Label {
        key: key.to_string(),
        value: value.to_string(),
    })
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// All of these labels, with these values (a later `key=` given twice wins, as in
/// vllm-router).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(BTreeMap<String, String>);

impl Selector {
    pub fn new(labels: &[Label]) -> Selector {
        Selector(
            labels
                .iter()
                .map(|l| (l.key.clone(), l.value.clone()))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Does a pod with these labels match? (An empty selector matches nothing here: it is
    /// never used to watch.)
    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        !self.0.is_empty()
            && labels.is_some_and(|have| self.0.iter().all(|(k, v)| have.get(k) == Some(v)))
    }
}

/// As the API server's `labelSelector` wants it: `k1=v1,k2=v2`.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// What the pods a selector finds are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Prefill,
    Decode,
}

/// One watch: a selector and the role its pods get. In P/D mode there are two, prefill
/// first: a pod that matches both selectors is a prefill worker (as in vllm-router).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub kind: Kind,
    pub selector: Selector,
}

/// A pod's identity: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn of(pod: &Pod) -> Option<PodKey> {
        Some(PodKey {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone()?,
        })
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where a routable pod is reached, and as what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    pub url: String,
    pub role: Role,
}

/// The decision for one pod as one source sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Route {
        worker: Worker,
        /// The bootstrap-port annotation was there but unreadable (the worker has none).
        bad_annotation: Option<String>,
    },
    Skip(String),
}

/// Is `pod` a worker for `source`, right now?
pub fn verdict(pod: &Pod, source: &Source, port: u16) -> Verdict {
    if !source.selector.matches(pod.metadata.labels.as_ref()) {
        return Verdict::Skip("labels do not match the selector".into());
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Verdict::Skip("being deleted".into());
    }
    let Some(status) = pod.status.as_ref() else {
        return Verdict::Skip("no status yet".into());
    };
    let phase = status.phase.as_deref().unwrap_or("Unknown");
    if phase != "Running" {
        return Verdict::Skip(format!("phase {phase}"));
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return Verdict::Skip("not Ready".into());
    }
    let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) else {
        return Verdict::Skip("no pod IP".into());
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return Verdict::Skip(format!("unreadable pod IP '{ip}'"));
    };
    // SocketAddr brackets IPv6 addresses: http://[fd00::1]:8000.
    let url = format!("http://{}", SocketAddr::new(ip, port));
    let mut bad_annotation = None;
    let role = match source.kind {
        Kind::Regular => Role::Regular,
        Kind::Decode => Role::Decode,
        Kind::Prefill => {
            let raw = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(BOOTSTRAP_PORT_ANNOTATION));
            let bootstrap_port = match raw.map(|v| v.trim().parse::<u16>()) {
                None => None,
                Some(Ok(p)) if p > 0 => Some(p),
                Some(_) => {
                    bad_annotation = raw.cloned();
                    None
                }
            };
            Role::Prefill { bootstrap_port }
        }
    };
    Verdict::Route {
        worker: Worker { url, role },
        bad_annotation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn labels(pairs: &[(&str, &str)]) -> Vec<Label> {
        pairs
            .iter()
            .map(|(k, v)| Label {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect()
    }

    fn running_pod(ip: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                labels: Some([("app".to_string(), "vllm".to_string())].into()),
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

    fn source(kind: Kind) -> Source {
        Source {
            kind,
            selector: Selector::new(&labels(&[("app", "vllm")])),
        }
    }

    #[test]
    fn labels_parse_with_kubernetes_syntax() {
        assert_eq!(
            parse_label("app=vllm").unwrap(),
            Label {
                key: "app".into(),
                value: "vllm".into()
            }
        );
        assert!(parse_label("app.kubernetes.io/name=vllm-0.1_x").is_ok());
        assert!(parse_label("tier=").is_ok(), "empty values are labels too");
        for bad in [
            "app", "=vllm", "app=a,b", "app=-x", "a b=c", "/x=y", "UP/x=y", "app==v",
        ] {
            let e = parse_label(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("key=value"), "{bad}: {e}");
        }
    }

    #[test]
    fn selector_matches_all_its_labels_and_prints_for_the_api() {
        let s = Selector::new(&labels(&[
            ("role", "x"),
            ("app", "vllm"),
            ("role", "prefill"),
        ]));
        assert_eq!(
            s.to_string(),
            "app=vllm,role=prefill",
            "sorted, last value wins"
        );
        let have: BTreeMap<String, String> = [("app", "vllm"), ("role", "prefill"), ("z", "1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(s.matches(Some(&have)));
        let mut other = have.clone();
        other.insert("role".into(), "decode".into());
        assert!(!s.matches(Some(&other)));
        assert!(!s.matches(None));
        assert!(
            !Selector::default().matches(Some(&have)),
            "empty matches nothing"
        );
    }

    #[test]
    fn routable_only_when_running_ready_with_ip_and_not_deleting() {
        let src = source(Kind::Regular);
        let routed = |p: &Pod| matches!(verdict(p, &src, 8000), Verdict::Route { .. });
        let pod = running_pod("10.0.0.7");
        assert_eq!(
            verdict(&pod, &src, 8000),
            Verdict::Route {
                worker: Worker {
                    url: "http://10.0.0.7:8000".into(),
                    role: Role::Regular
                },
                bad_annotation: None
            }
        );
        let mut p = pod.clone();
        p.status.as_mut().unwrap().phase = Some("Pending".into());
        assert!(!routed(&p));
        let mut p = pod.clone();
        p.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        assert!(!routed(&p));
        let mut p = pod.clone();
        p.status.as_mut().unwrap().conditions = None;
        assert!(!routed(&p));
        let mut p = pod.clone();
        p.status.as_mut().unwrap().pod_ip = None;
        assert!(!routed(&p));
        let mut p = pod.clone();
        p.status.as_mut().unwrap().pod_ip = Some("not-an-ip".into());
        assert!(!routed(&p));
        let mut p = pod.clone();
        p.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert!(!routed(&p));
        let mut p = pod.clone();
        p.metadata.labels = Some([("app".to_string(), "other".to_string())].into());
        assert!(!routed(&p));
    }

    #[test]
    fn ipv6_pod_ips_are_bracketed() {
        let Verdict::Route { worker, .. } =
            verdict(&running_pod("fd00::17"), &source(Kind::Decode), 80)
        else {
            panic!("not routed")
        };
        assert_eq!(worker.url, "http://[fd00::17]:80");
        assert_eq!(worker.role, Role::Decode);
    }

    #[test]
    fn prefill_pods_carry_the_bootstrap_port_annotation() {
        let with = |v: Option<&str>| {
            let mut p = running_pod("10.0.0.1");
            if let Some(v) = v {
                p.metadata.annotations =
                    Some([(BOOTSTRAP_PORT_ANNOTATION.to_string(), v.to_string())].into());
            }
            verdict(&p, &source(Kind::Prefill), 8000)
        };
        let role = |bootstrap_port| Worker {
            url: "http://10.0.0.1:8000".into(),
            role: Role::Prefill { bootstrap_port },
        };
        assert_eq!(
            with(Some("8998")),
            Verdict::Route {
                worker: role(Some(8998)),
                bad_annotation: None
            }
        );
        assert_eq!(
            with(None),
            Verdict::Route {
                worker: role(None),
                bad_annotation: None
            }
        );
        for bad in ["x", "70000", "0", "-1", ""] {
            assert_eq!(
                with(Some(bad)),
                Verdict::Route {
                    worker: role(None),
                    bad_annotation: Some(bad.to_string())
                },
                "{bad}"
            );
        }
    }
}
