//! Discovery end to end: the real kube-rs client and watcher against the stub API server
//! (the `stub-apiserver` dev-dependency) on 127.0.0.1, changes read off the membership channel.
//!
//! No test bounds how fast anything happens (a loaded 2-core machine may be slow): waits
//! poll with a generous deadline, and "nothing else was announced" is proven by ordering:
//! after the events that must announce nothing, a sentinel pod is added on the same watch,
//! and the next change must be the sentinel's.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::sync::mpsc;

use super::pod::BOOTSTRAP_PORT_ANNOTATION;
use super::*;
use crate::control::membership::{MembershipChange, Role};
use stub_apiserver::{pod, Cluster, Port};

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(60);

const TEST_BACKOFF: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_millis(50),
    max: Duration::from_millis(1000),
};

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    discovery: DiscoveryArgs,
}

fn flags(extra: &[&str]) -> DiscoveryArgs {
    let argv = [
        "ringrouter",
        "--service-discovery",
        "--service-discovery-port",
        "8000",
    ];
    Flags::try_parse_from(argv.iter().chain(extra))
        .unwrap()
        .discovery
}

fn add(url: &str, role: Role) -> MembershipChange {
    MembershipChange::Add {
        url: url.into(),
        role,
    }
}

fn regular(ip: &str) -> MembershipChange {
    add(&format!("http://{ip}:8000"), Role::Regular)
}

fn remove(ip: &str) -> MembershipChange {
    MembershipChange::Remove {
        url: format!("http://{ip}:8000"),
    }
}

/// Discovery running on this test's runtime, and the receiving end of its changes.
struct Discovery {
    changes: mpsc::UnboundedReceiver<MembershipChange>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Discovery {
    fn start(url: &str, args: DiscoveryArgs, pd_mode: bool) -> Discovery {
        args.validate(pd_mode).unwrap();
        let client = client_for_url(url).unwrap();
        let (tx, changes) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_with_backoff(args, client, pd_mode, tx, TEST_BACKOFF));
        Discovery { changes, task }
    }

    async fn next(&mut self) -> MembershipChange {
        tokio::time::timeout(PATIENCE, self.changes.recv())
            .await
            .expect("no membership change within the deadline")
            .expect("discovery stopped")
    }

    /// The next changes are exactly these, in this order.
    async fn expect(&mut self, want: &[MembershipChange]) {
        for w in want {
            assert_eq!(&self.next().await, w);
        }
    }

    /// The next `want.len()` changes are these, in any order (from several watches).
    async fn expect_unordered(&mut self, want: &[MembershipChange]) {
        let mut got = Vec::new();
        for _ in want {
            got.push(self.next().await);
        }
        for w in want {
            assert!(got.contains(w), "wanted {w:?} among {got:?}");
        }
    }
}

/// Waits until `cond` holds, polling; panics after the (generous) deadline.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Captures this thread's log lines (the test's current-thread runtime runs discovery on
/// this thread too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn count(&self, needle: &str) -> usize {
        self.text().lines().filter(|l| l.contains(needle)).count()
    }
}

#[tokio::test]
async fn a_ready_pod_is_added_once_leaves_when_not_ready_and_comes_back() {
    let cluster = Cluster::new();
    cluster.put(pod("a", "10.0.0.1").json());
    let server = cluster.serve().unwrap();
    let mut d = Discovery::start(&server.url(), flags(&["--selector", "app=vllm"]), false);
    d.expect(&[regular("10.0.0.1")]).await;

    // Modified but still routable (a status or annotation update): nothing to announce.
    cluster.put(pod("a", "10.0.0.1").annotate("note", "x").json());
    cluster.put(pod("a", "10.0.0.1").annotate("note", "y").json());
    cluster.put(pod("sentinel-1", "10.0.9.1").json());
    d.expect(&[regular("10.0.9.1")]).await;

    cluster.put(pod("a", "10.0.0.1").ready(false).json());
    d.expect(&[remove("10.0.0.1")]).await;
    cluster.put(pod("a", "10.0.0.1").json());
    d.expect(&[regular("10.0.0.1")]).await;
    // Terminating (deletionTimestamp set) while still Ready: out at once.
    cluster.put(pod("a", "10.0.0.1").deleting().json());
    d.expect(&[remove("10.0.0.1")]).await;
    // Its final DELETED announces nothing more.
    cluster.delete("default", "a");
    cluster.put(pod("sentinel-2", "10.0.9.2").json());
    d.expect(&[regular("10.0.9.2")]).await;

    // A Ready pod deleted outright.
    cluster.put(pod("b", "10.0.0.2").json());
    d.expect(&[regular("10.0.0.2")]).await;
    cluster.delete("default", "b");
    d.expect(&[remove("10.0.0.2")]).await;
    // Phase Failed (the kubelet gave up on it) with the Ready condition stale.
    cluster.put(pod("sentinel-1", "10.0.9.1").phase("Failed").json());
    d.expect(&[remove("10.0.9.1")]).await;
}

#[tokio::test]
async fn pending_pods_and_pods_without_an_ip_are_ignored_until_routable() {
    let cluster = Cluster::new();
    let server = cluster.serve().unwrap();
    let mut d = Discovery::start(&server.url(), flags(&["--selector", "app=vllm"]), false);
    cluster.put(
        pod("pending", "10.0.0.1")
            .phase("Pending")
            .ready(false)
            .json(),
    );
    cluster.put(
        pod("scheduled", "10.0.0.2")
            .ip(None)
            .phase("Pending")
            .json(),
    );
    cluster.put(pod("no-ip", "10.0.0.3").ip(None).json());
    cluster.put(pod("starting", "10.0.0.4").ready(false).json());
    cluster.put(
        pod("other-app", "10.0.0.5")
            .labels(&[("app", "other")])
            .json(),
    );
    cluster.put(pod("sentinel", "10.0.9.1").json());
    d.expect(&[regular("10.0.9.1")]).await;

    cluster.put(pod("pending", "10.0.0.1").json());
    d.expect(&[regular("10.0.0.1")]).await;
    cluster.put(pod("no-ip", "10.0.0.3").json());
    d.expect(&[regular("10.0.0.3")]).await;
    cluster.put(pod("starting", "10.0.0.4").json());
    d.expect(&[regular("10.0.0.4")]).await;
}

#[tokio::test]
async fn a_pod_whose_labels_stop_matching_leaves() {
    let cluster = Cluster::new();
    let server = cluster.serve().unwrap();
    let mut d = Discovery::start(
        &server.url(),
        flags(&["--selector", "app=vllm", "tier=gpu"]),
        false,
    );
    let gpu = [("app", "vllm"), ("tier", "gpu")];
    cluster.put(pod("a", "10.0.0.1").labels(&gpu).json());
    d.expect(&[regular("10.0.0.1")]).await;
    // As a real API server does it: the relabelled pod comes as DELETED on this watch.
    cluster.put(pod("a", "10.0.0.1").labels(&[("app", "vllm")]).json());
    d.expect(&[remove("10.0.0.1")]).await;
    cluster.put(pod("a", "10.0.0.1").labels(&gpu).json());
    d.expect(&[regular("10.0.0.1")]).await;
    // A server that sends it as MODIFIED with the new labels: our own check removes it.
    cluster.set_lax_label_filter(true);
    cluster.put(
        pod("a", "10.0.0.1")
            .labels(&[("app", "vllm"), ("tier", "cpu")])
            .json(),
    );
    d.expect(&[remove("10.0.0.1")]).await;
    let requests = cluster.requests();
    assert!(
        requests.iter().all(
            |r| r.starts_with("/api/v1/pods?") && r.contains("labelSelector=app=vllm,tier=gpu")
        ),
        "the selector goes to the API server: {requests:?}"
    );
}

#[tokio::test]
async fn a_pod_whose_ip_changes_is_removed_then_added() {
    let cluster = Cluster::new();
    cluster.put(pod("a", "10.0.0.1").json());
    let server = cluster.serve().unwrap();
    let mut d = Discovery::start(&server.url(), flags(&["--selector", "app=vllm"]), false);
    d.expect(&[regular("10.0.0.1")]).await;
    cluster.put(pod("a", "10.0.0.7").json());
    d.expect(&[remove("10.0.0.1"), regular("10.0.0.7")]).await;
    // IPv6 pod IPs are bracketed in the URL.
    cluster.put(pod("a", "fd00::7").json());
    d.expect(&[
        remove("10.0.0.7"),
        add("http://[fd00::7]:8000", Role::Regular),
    ])
    .await;
}

#[tokio::test]
async fn pd_selectors_give_roles_and_the_bootstrap_port_annotation() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let cluster = Cluster::new();
    let server = cluster.serve().unwrap();
    let args = flags(&[
        // Ignored in P/D mode, as in vllm-router.
        "--selector",
        "app=vllm",
        "--prefill-selector",
        "app=vllm",
        "prefill=yes",
        "--decode-selector",
        "app=vllm",
        "decode=yes",
    ]);
    let mut d = Discovery::start(&server.url(), args, true);
    let prefill = |bootstrap_port| Role::Prefill { bootstrap_port };
    let labels = |extra: &'static str| [("app", "vllm"), (extra, "yes")];
    cluster.put(
        pod("p0", "10.0.1.1")
            .labels(&labels("prefill"))
            .annotate(BOOTSTRAP_PORT_ANNOTATION, "8998")
            .json(),
    );
    cluster.put(
        pod("p1", "10.0.1.2")
            .labels(&labels("prefill"))
            .annotate(BOOTSTRAP_PORT_ANNOTATION, "oops")
            .json(),
    );
    cluster.put(pod("p2", "10.0.1.3").labels(&labels("prefill")).json());
    cluster.put(pod("d0", "10.0.2.1").labels(&labels("decode")).json());
    cluster.put(pod("plain", "10.0.3.1").json());
    d.expect_unordered(&[
        add("http://10.0.1.1:8000", prefill(Some(8998))),
        add("http://10.0.1.2:8000", prefill(None)),
        add("http://10.0.1.3:8000", prefill(None)),
        add("http://10.0.2.1:8000", Role::Decode),
    ])
    .await;
    assert_eq!(
        logs.count("unreadable bootstrap port"),
        1,
        "the bad annotation is logged once:\n{}",
        logs.text()
    );
    assert!(logs.text().contains("oops"));

    // A pod matching both selectors is a prefill worker (as in vllm-router).
    cluster.put(
        pod("both", "10.0.4.1")
            .labels(&[("app", "vllm"), ("prefill", "yes"), ("decode", "yes")])
            .json(),
    );
    // It may come first as decode (the two watches race), but it ends as prefill.
    loop {
        match d.next().await {
            MembershipChange::Add { url, role } if url == "http://10.0.4.1:8000" => {
                if role == prefill(None) {
                    break;
                }
                assert_eq!(role, Role::Decode);
            }
            MembershipChange::Remove { url } if url == "http://10.0.4.1:8000" => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // It stops being a prefill pod: it becomes a decode worker.
    cluster.put(
        pod("both", "10.0.4.1")
            .labels(&[("app", "vllm"), ("decode", "yes")])
            .json(),
    );
    d.expect(&[
        MembershipChange::Remove {
            url: "http://10.0.4.1:8000".into(),
        },
        add("http://10.0.4.1:8000", Role::Decode),
    ])
    .await;
    // The plain `app=vllm` pod never showed up: sentinels on both watches come next.
    cluster.put(pod("s-p", "10.0.9.1").labels(&labels("prefill")).json());
    cluster.put(pod("s-d", "10.0.9.2").labels(&labels("decode")).json());
    d.expect_unordered(&[
        add("http://10.0.9.1:8000", prefill(None)),
        add("http://10.0.9.2:8000", Role::Decode),
    ])
    .await;
    let requests = cluster.requests();
    assert!(requests
        .iter()
        .any(|r| r.contains("labelSelector=app=vllm,prefill=yes")));
    assert!(requests
        .iter()
        .any(|r| r.contains("labelSelector=app=vllm,decode=yes")));
}

#[tokio::test]
async fn outside_pd_mode_the_pd_selectors_are_ignored() {
    let cluster = Cluster::new();
    cluster.put(
        pod("p", "10.0.1.1")
            .labels(&[("app", "vllm"), ("prefill", "yes")])
            .json(),
    );
    let server = cluster.serve().unwrap();
    let args = flags(&[
        "--selector",
        "app=vllm",
        "--prefill-selector",
        "prefill=yes",
    ]);
    let mut d = Discovery::start(&server.url(), args, false);
    d.expect(&[regular("10.0.1.1")]).await;
}

#[tokio::test]
async fn the_namespace_flag_scopes_the_watch() {
    let cluster = Cluster::new();
    cluster.put(pod("a", "10.0.0.1").namespace("serving").json());
    cluster.put(pod("b", "10.0.0.2").namespace("other").json());
    let server = cluster.serve().unwrap();
    let mut scoped = Discovery::start(
        &server.url(),
        flags(&[
            "--selector",
            "app=vllm",
            "--service-discovery-namespace",
            "serving",
        ]),
        false,
    );
    scoped.expect(&[regular("10.0.0.1")]).await;
    cluster.put(pod("c", "10.0.0.3").namespace("other").json());
    cluster.put(pod("d", "10.0.0.4").namespace("serving").json());
    scoped.expect(&[regular("10.0.0.4")]).await;
    let requests = cluster.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("/api/v1/namespaces/serving/pods?")),
        "{requests:?}"
    );

    // Without the flag: every namespace.
    let mut all = Discovery::start(&server.url(), flags(&["--selector", "app=vllm"]), false);
    all.expect(&[
        regular("10.0.0.1"),
        regular("10.0.0.2"),
        regular("10.0.0.3"),
        regular("10.0.0.4"),
    ])
    .await;
    assert!(cluster
        .requests()
        .iter()
        .any(|r| r.starts_with("/api/v1/pods?")));
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_its_resource_version() {
    let cluster = Cluster::new();
    cluster.put(pod("a", "10.0.0.1").json());
    let server = cluster.serve().unwrap();
    let mut d = Discovery::start(&server.url(), flags(&["--selector", "app=vllm"]), false);
    d.expect(&[regular("10.0.0.1")]).await;
    eventually("the watch is open", || cluster.open_watches() == 1).await;
    cluster.drop_watches();
    cluster.put(pod("b", "10.0.0.2").json());
    cluster.put(pod("a", "10.0.0.1").ready(false).json());
    d.expect(&[regular("10.0.0.2"), remove("10.0.0.1")]).await;
    let requests = cluster.requests();
    let lists = requests
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count();
    let watches = requests.len() - lists;
    assert_eq!(lists, 1, "no re-list after a dropped watch: {requests:?}");
    assert!(watches >= 2, "{requests:?}");
}

#[tokio::test]
async fn pods_gone_while_the_api_server_was_down_are_removed_at_the_relist() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let cluster = Cluster::new();
    for (name, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")] {
        cluster.put(pod(name, ip).json());
    }
    let server = cluster.serve().unwrap();
    let mut d = Discovery::start(&server.url(), flags(&["--selector", "app=vllm"]), false);
    d.expect(&[
        regular("10.0.0.1"),
        regular("10.0.0.2"),
        regular("10.0.0.3"),
    ])
    .await;
    eventually("the watch is open", || cluster.open_watches() == 1).await;

    let port = server.stop().await;
    cluster.delete("default", "a");
    cluster.put(pod("b", "10.0.0.22").json());
    cluster.put(pod("d", "10.0.0.4").json());
    // The history the watch would resume from is gone: 410 on reconnect, then a re-list.
    cluster.expire_history();
    eventually("the watch fails while the API server is down", || {
        logs.count("watch failed") >= 2
    })
    .await;
    let _server = cluster.serve_on(port).unwrap();

    d.expect(&[
        remove("10.0.0.1"),
        remove("10.0.0.2"),
        regular("10.0.0.22"),
        regular("10.0.0.4"),
    ])
    .await;
    // c was there all along: not announced again.
    cluster.put(pod("sentinel", "10.0.9.1").json());
    d.expect(&[regular("10.0.9.1")]).await;
    let requests = cluster.requests();
    let lists = requests
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count();
    assert_eq!(lists, 2, "re-listed once after the 410: {requests:?}");
    assert!(logs.text().contains("410 Gone"), "{}", logs.text());
    assert!(logs.text().contains("API server answers again"));
}

#[tokio::test]
async fn an_api_server_down_at_start_is_waited_for() {
    let logs = Logs::default();
    let _guard = logs.capture();
    // A port nobody listens on (yet): connections are refused.
    let port = Port::reserve().unwrap();
    let mut d = Discovery::start(&port.url(), flags(&["--selector", "app=vllm"]), false);
    eventually("the list fails a few times", || {
        logs.count("watch failed") >= 3
    })
    .await;
    let warn_lines = logs.count("WARN");
    assert_eq!(
        warn_lines,
        logs.count("watch failed"),
        "one warning per failed attempt, nothing else:\n{}",
        logs.text()
    );
    let cluster = Cluster::new();
    cluster.put(pod("a", "10.0.0.1").json());
    let _server = cluster.serve_on(port).unwrap();
    d.expect(&[regular("10.0.0.1")]).await;
    assert_eq!(logs.count("API server answers again"), 1, "{}", logs.text());
}

#[tokio::test]
async fn discovery_stops_when_the_registry_goes_away() {
    let cluster = Cluster::new();
    cluster.put(pod("a", "10.0.0.1").json());
    let server = cluster.serve().unwrap();
    let client = client_for_url(&server.url()).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run_with_backoff(
        flags(&["--selector", "app=vllm"]),
        client,
        false,
        tx,
        TEST_BACKOFF,
    ));
    assert_eq!(rx.recv().await, Some(regular("10.0.0.1")));
    drop(rx);
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("run returns once nobody listens")
        .unwrap();
}

#[test]
fn flags_have_vllm_routers_names_and_defaults() {
    use crate::cli::Cli;
    let cli = Cli::try_parse_from(["ringrouter"]).unwrap();
    let d = &cli.discovery;
    assert!(!d.service_discovery);
    assert_eq!(d.service_discovery_port, 80);
    assert_eq!(d.service_discovery_namespace, None);
    assert!(d.selector.is_empty() && d.prefill_selector.is_empty() && d.decode_selector.is_empty());
    assert_eq!(d.validate(false), Ok(()), "off: nothing to check");

    let cli = Cli::try_parse_from([
        "ringrouter",
        "--service-discovery",
        "--selector",
        "app=vllm",
        "tier=gpu",
        "--service-discovery-port",
        "8000",
        "--service-discovery-namespace",
        "serving",
        "--prefill-selector",
        "role=prefill",
        "--decode-selector",
        "role=decode",
        "--policy",
        "random",
    ])
    .unwrap();
    let d = &cli.discovery;
    assert!(d.service_discovery);
    assert_eq!(
        d.selector,
        vec![
            parse_label("app=vllm").unwrap(),
            parse_label("tier=gpu").unwrap()
        ]
    );
    assert_eq!(d.service_discovery_port, 8000);
    assert_eq!(d.service_discovery_namespace.as_deref(), Some("serving"));
    assert_eq!(
        d.prefill_selector,
        vec![parse_label("role=prefill").unwrap()]
    );
    assert_eq!(d.decode_selector, vec![parse_label("role=decode").unwrap()]);
    assert_eq!(d.validate(false), Ok(()));
    assert_eq!(d.validate(true), Ok(()));

    for (argv, flag) in [
        (vec!["--selector", "app"], "--selector"),
        (
            vec!["--prefill-selector", "a=b", "role:prefill"],
            "--prefill-selector",
        ),
        (vec!["--decode-selector", "x=a b"], "--decode-selector"),
        (
            vec!["--service-discovery-namespace", "Bad_NS"],
            "--service-discovery-namespace",
        ),
        (
            vec!["--service-discovery-port", "0"],
            "--service-discovery-port",
        ),
    ] {
        let e = Cli::try_parse_from(["ringrouter"].into_iter().chain(argv.iter().copied()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(flag), "{argv:?}: {e}");
    }
}

#[test]
fn validation_names_the_missing_selector() {
    let e = flags(&[]).validate(false).unwrap_err();
    assert!(e.contains("--selector"), "{e}");
    let e = flags(&["--selector", "app=vllm"])
        .validate(true)
        .unwrap_err();
    assert!(
        e.contains("--prefill-selector") && e.contains("--decode-selector"),
        "{e}"
    );
    assert_eq!(flags(&["--decode-selector", "r=d"]).validate(true), Ok(()));
}

#[tokio::test]
async fn an_https_kubeconfig_gives_a_client() {
    // What `client_from_env` does with a kubeconfig: the TLS stack (rustls with ring)
    // must come up without a panic about crypto providers.
    let kubeconfig = kube::config::Kubeconfig::from_yaml(
        r#"
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: https://127.0.0.1:6443
    insecure-skip-tls-verify: true
users:
- name: u
  user:
    token: t
contexts:
- name: x
  context: {cluster: c, user: u, namespace: serving}
current-context: x
"#,
    )
    .unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(config.cluster_url.scheme_str(), Some("https"));
    Client::try_from(config).expect("an HTTPS client");
}
