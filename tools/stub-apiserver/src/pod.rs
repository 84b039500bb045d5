//! Pods as the API server returns them, for tests to put in a [`Cluster`](crate::Cluster).

use serde_json::{json, Value};

/// A pod as the API server returns it; by default `default/<name>`, labelled `app=vllm`,
/// Running and Ready.
#[derive(Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    pub phase: &'static str,
    pub ready: bool,
    pub ip: Option<String>,
    pub deleting: bool,
}

/// A Running, Ready pod `default/<name>` labelled `app=vllm`, with pod IP `ip`.
pub fn pod(name: &str, ip: &str) -> PodSpec {
    PodSpec {
        namespace: "default".into(),
        name: name.into(),
        labels: vec![("app".into(), "vllm".into())],
        annotations: Vec::new(),
        phase: "Running",
        ready: true,
        ip: Some(ip.into()),
        deleting: false,
    }
}

impl PodSpec {
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.into();
        self
    }
    pub fn labels(mut self, labels: &[(&str, &str)]) -> Self {
        self.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self
    }
    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        self.annotations.push((k.into(), v.into()));
        self
    }
    pub fn phase(mut self, phase: &'static str) -> Self {
        self.phase = phase;
        self
    }
    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }
    pub fn ip(mut self, ip: Option<&str>) -> Self {
        self.ip = ip.map(str::to_string);
        self
    }
    pub fn deleting(mut self) -> Self {
        self.deleting = true;
        self
    }

    /// The pod object, as `kubectl get pod -o json` would show it.
    pub fn json(&self) -> Value {
        let map = |kv: &[(String, String)]| {
            Value::Object(kv.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
        };
        let mut metadata = json!({
            "name": self.name,
            "namespace": self.namespace,
            "uid": format!("uid-{}-{}", self.namespace, self.name),
            "labels": map(&self.labels),
            "annotations": map(&self.annotations),
        });
        if self.deleting {
            metadata["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        let ready = if self.ready { "True" } else { "False" };
        let mut status = json!({
            "phase": self.phase,
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": ready},
                {"type": "ContainersReady", "status": ready},
            ],
        });
        if let Some(ip) = &self.ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
            "status": status,
        })
    }
}
