//! Kubernetes discovery through the real binary: the router finds its workers by watching
//! Pods on the stub API server (`tools/stub-apiserver`), reached through a kubeconfig in
//! `KUBECONFIG`, and routes to mock vLLM workers at the pods' IPs.
//!
//! As in a cluster, every pod serves on the same port (`--service-discovery-port`) at its
//! own IP: the mocks listen on 127.0.0.2, 127.0.0.3, ... (all loopback on Linux) on one
//! port. No step bounds how fast anything happens; waits poll with a generous deadline.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use stub_apiserver::{pod, Cluster};

const PATIENCE: Duration = Duration::from_secs(60);

/// Mock workers `pod-0`, `pod-1`, ... on 127.0.0.2, 127.0.0.3, ..., all on one port.
fn pod_workers(n: usize) -> (u16, Vec<MockServer>) {
    let config = |i: usize| {
        let mut c = MockConfig::named(format!("pod-{i}"));
        c.model = "mock-model".into();
        c
    };
    // The port is free on 127.0.0.2; another process may hold it on another address.
    for _ in 0..20 {
        let first = MockServer::spawn_on(SocketAddr::from(([127, 0, 0, 2], 0)), config(0))
            .expect("a mock on 127.0.0.2");
        let port = first.addr().port();
        let rest: Result<Vec<MockServer>, _> = (1..n)
            .map(|i| {
                MockServer::spawn_on(
                    SocketAddr::from(([127, 0, 0, 2 + i as u8], port)),
                    config(i),
                )
            })
            .collect();
        if let Ok(rest) = rest {
            return (port, std::iter::once(first).chain(rest).collect());
        }
    }
    panic!("no port free on all of 127.0.0.2..");
}

/// A kubeconfig for the stub API server at `server` (plain HTTP, no credentials), in a
/// file removed on drop.
struct Kubeconfig(PathBuf);

impl Kubeconfig {
    fn write(server: &str) -> Kubeconfig {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ringrouter-test-kubeconfig-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let yaml = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: stub
  cluster:
    server: {server}
users:
- name: nobody
  user: {{}}
contexts:
- name: stub
  context: {{cluster: stub, user: nobody}}
current-context: stub
"
        );
        std::fs::write(&path, yaml).unwrap();
        Kubeconfig(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Kubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn list_workers(r: &Router) -> BTreeSet<String> {
    let resp = exchange(r.addr, &get("/list_workers"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()["urls"]
        .as_array()
        .expect("urls")
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect()
}

/// Waits until `GET /list_workers` shows exactly `want`.
fn wait_for_workers(r: &Router, want: &[String]) {
    let want: BTreeSet<String> = want.iter().cloned().collect();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let have = list_workers(r);
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "workers {have:?}, wanted {want:?}; router log:\n{}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `n` completions; the names of the workers that served them.
fn served_by(r: &Router, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| {
            let body = format!(r#"{{"model":"mock-model","prompt":"p{i}","max_tokens":2}}"#);
            let resp = exchange(r.addr, &post_json("/v1/completions", &body));
            assert_eq!(resp.status, 200, "{}", resp.text());
            resp.header("x-mock-worker")
                .expect("x-mock-worker")
                .to_string()
        })
        .collect()
}

fn names(n: &[&str]) -> BTreeSet<String> {
    n.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_routing_set_follows_the_pods_kubernetes_reports() {
    let (port, w) = pod_workers(3);
    let url = |i: usize| format!("http://127.0.0.{}:{port}", 2 + i);
    let ip = |i: usize| format!("127.0.0.{}", 2 + i);
    let ns = "serving";
    let cluster = Cluster::new();
    cluster.put(pod("a", &ip(0)).namespace(ns).json());
    cluster.put(pod("b", &ip(1)).namespace(ns).json());
    // Never workers: other labels, another namespace, not Ready yet (nothing listens at
    // 127.0.0.9, so any of them in the set would show below).
    cluster.put(
        pod("web", "127.0.0.9")
            .namespace(ns)
            .labels(&[("app", "web")])
            .json(),
    );
    cluster.put(pod("elsewhere", "127.0.0.9").json());
    cluster.put(
        pod("starting", "127.0.0.9")
            .namespace(ns)
            .ready(false)
            .json(),
    );
    let api = cluster.serve_in_thread().unwrap();
    let kubeconfig = Kubeconfig::write(&api.url());
    let port_arg = port.to_string();
    let r = Router::start_env(
        &[("KUBECONFIG", kubeconfig.path())],
        &[
            "--service-discovery",
            "--selector",
            "app=vllm",
            "--service-discovery-port",
            &port_arg,
            "--service-discovery-namespace",
            ns,
            "--policy",
            "round_robin",
            "--shards",
            "1",
        ],
    )
    .unwrap();

    wait_for_workers(&r, &[url(0), url(1)]);
    assert_eq!(served_by(&r, 10), names(&["pod-0", "pod-1"]));

    // NotReady: out of the set, and no request reaches it.
    cluster.put(pod("a", &ip(0)).namespace(ns).ready(false).json());
    wait_for_workers(&r, &[url(1)]);
    let a_requests = w[0].stats().requests;
    assert_eq!(served_by(&r, 10), names(&["pod-1"]));
    assert_eq!(w[0].stats().requests, a_requests);

    // A new pod joins.
    cluster.put(pod("c", &ip(2)).namespace(ns).json());
    wait_for_workers(&r, &[url(1), url(2)]);
    assert_eq!(served_by(&r, 10), names(&["pod-1", "pod-2"]));

    // Deleted: out.
    cluster.delete(ns, "b");
    wait_for_workers(&r, &[url(2)]);
    let b_requests = w[1].stats().requests;
    assert_eq!(served_by(&r, 10), names(&["pod-2"]));
    assert_eq!(w[1].stats().requests, b_requests);

    // The watch connection breaks; the router watches again and misses nothing: the pod
    // that turns Ready meanwhile comes back.
    cluster.drop_watches();
    cluster.put(pod("a", &ip(0)).namespace(ns).json());
    wait_for_workers(&r, &[url(0), url(2)]);
    assert_eq!(served_by(&r, 10), names(&["pod-0", "pod-2"]));
    assert_eq!(w[1].stats().requests, b_requests);
}

#[test]
fn discovery_without_a_kubernetes_configuration_fails_at_start() {
    let err = Router::start_env(
        &[("KUBECONFIG", "/nonexistent/ringrouter-test-kubeconfig")],
        &["--service-discovery", "--selector", "app=vllm"],
    )
    .err()
    .expect("the router exits");
    assert!(
        err.contains("--service-discovery") && err.contains("nonexistent"),
        "{err}"
    );
}

#[test]
fn discovery_without_a_selector_is_a_usage_error() {
    let err = Router::start_env(&[], &["--service-discovery"])
        .err()
        .expect("the router exits");
    assert!(err.contains("--selector"), "{err}");
}

#[test]
fn in_pd_mode_pods_are_prefill_or_decode_workers_by_their_selectors() {
    let (port, w) = pod_workers(2);
    let cluster = Cluster::new();
    cluster.put(
        pod("p", "127.0.0.2")
            .labels(&[("app", "vllm"), ("component", "prefill")])
            .json(),
    );
    cluster.put(
        pod("d", "127.0.0.3")
            .labels(&[("app", "vllm"), ("component", "decode")])
            .json(),
    );
    let api = cluster.serve_in_thread().unwrap();
    let kubeconfig = Kubeconfig::write(&api.url());
    let port_arg = port.to_string();
    let r = Router::start_env(
        &[("KUBECONFIG", kubeconfig.path())],
        &[
            "--vllm-pd-disaggregation",
            "--service-discovery",
            "--prefill-selector",
            "component=prefill",
            "--decode-selector",
            "component=decode",
            "--service-discovery-port",
            &port_arg,
            "--shards",
            "1",
        ],
    )
    .unwrap();
    wait_for_workers(
        &r,
        &[
            format!("http://127.0.0.2:{port}"),
            format!("http://127.0.0.3:{port}"),
        ],
    );
    // The decode worker answers; the prefill worker had the prefill leg.
    assert_eq!(served_by(&r, 3), names(&["pod-1"]));
    assert_eq!(w[0].stats().prefill_legs, 3);
    assert_eq!(w[1].stats().decode_legs, 3);
}

#[test]
fn with_data_parallelism_a_pod_is_its_ranks() {
    let (port, w) = pod_workers(2);
    let url = |i: usize| format!("http://127.0.0.{}:{port}", 2 + i);
    let cluster = Cluster::new();
    cluster.put(pod("a", "127.0.0.2").json());
    let api = cluster.serve_in_thread().unwrap();
    let kubeconfig = Kubeconfig::write(&api.url());
    let port_arg = port.to_string();
    let r = Router::start_env(
        &[("KUBECONFIG", kubeconfig.path())],
        &[
            "--service-discovery",
            "--selector",
            "app=vllm",
            "--service-discovery-port",
            &port_arg,
            "--intra-node-data-parallel-size",
            "2",
            "--policy",
            "round_robin",
            "--shards",
            "1",
        ],
    )
    .unwrap();
    let ranks = |m: &MockServer| -> Vec<String> {
        let mut r: Vec<String> = m
            .received()
            .iter()
            .filter(|r| r.path.starts_with("/v1/"))
            .map(|r| r.header("x-data-parallel-rank").unwrap_or("none").into())
            .collect();
        r.sort();
        r
    };
    wait_for_workers(&r, &[format!("{}@0", url(0)), format!("{}@1", url(0))]);
    assert_eq!(served_by(&r, 4), names(&["pod-0"]));
    assert_eq!(ranks(&w[0]), ["0", "0", "1", "1"]);

    cluster.put(pod("b", "127.0.0.3").json());
    wait_for_workers(
        &r,
        &[
            format!("{}@0", url(0)),
            format!("{}@1", url(0)),
            format!("{}@0", url(1)),
            format!("{}@1", url(1)),
        ],
    );
    // Deleted: all its ranks go.
    cluster.delete("default", "a");
    wait_for_workers(&r, &[format!("{}@0", url(1)), format!("{}@1", url(1))]);
    let a_requests = w[0].stats().requests;
    assert_eq!(served_by(&r, 4), names(&["pod-1"]));
    assert_eq!(ranks(&w[1]), ["0", "0", "1", "1"]);
    assert_eq!(w[0].stats().requests, a_requests);
}
