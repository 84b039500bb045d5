//! A stub Kubernetes API server for ringrouter's discovery tests (the unit tests of
//! `control::discovery` and the end-to-end tests of the binary), on real sockets on
//! 127.0.0.1: Pods only, `GET /api/v1/pods` and `GET /api/v1/namespaces/{ns}/pods`, list and `watch=true`,
//! with `labelSelector` (equality terms). It behaves as the real one does where the client
//! can tell:
//! - every change bumps a global resourceVersion; a list carries the current one;
//! - a watch from resourceVersion R replays the changes after R, then streams new ones as
//!   chunked JSON lines (`{"type":"ADDED","object":{...}}`);
//! - a watch from a resourceVersion older than the retained history gets a `410 Expired`
//!   ERROR event (`expire_history`), which makes the client re-list;
//! - with a label selector, an object that stops matching is sent as DELETED (the old
//!   object) and one that starts matching as ADDED (`lax_label_filter` sends MODIFIED with
//!   the new object instead, to test the client's own check).
//!
//! The cluster's state (`Cluster`) outlives the listener (`Server`), so a test can stop the
//! API server, change pods while it is down, and serve the same state again on the same port
//! (held meanwhile, bound but not listening: clients are refused as by a server that is down).
//!
//! [`Cluster::serve`] runs on the caller's tokio runtime; [`Cluster::serve_in_thread`] brings
//! its own, for tests without one. [`pod`] builds the pod objects.

mod pod;

pub use pod::{pod, PodSpec};

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::broadcast;
use tokio::task::{JoinHandle, JoinSet};

#[derive(Clone)]
struct Change {
    rv: u64,
    deleted: bool,
    old: Option<Value>,
    new: Value,
}

#[derive(Clone)]
enum Notice {
    Change(Change),
    DropWatches,
}

#[derive(Default)]
struct State {
    rv: u64,
    pods: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    oldest_watchable: u64,
    lax_label_filter: bool,
    requests: Vec<String>,
    open_watches: usize,
}

/// The pods, their history, and the open watches.
#[derive(Clone)]
pub struct Cluster {
    state: Arc<Mutex<State>>,
    notices: broadcast::Sender<Notice>,
}

fn key_of(pod: &Value) -> (String, String) {
    let meta = &pod["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("default").to_string(),
        meta["name"].as_str().expect("pod has a name").to_string(),
    )
}

impl Default for Cluster {
    fn default() -> Cluster {
        Cluster::new()
    }
}

impl Cluster {
    /// No pods yet.
    pub fn new() -> Cluster {
        Cluster {
            state: Arc::default(),
            notices: broadcast::channel(4096).0,
        }
    }

    /// Creates or replaces a pod (ADDED or MODIFIED).
    pub fn put(&self, mut pod: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let old = st.pods.insert(key_of(&pod), pod.clone());
        self.record(
            &mut st,
            Change {
                rv,
                deleted: false,
                old,
                new: pod,
            },
        );
    }

    /// Deletes a pod (DELETED).
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        let Some(mut pod) = st.pods.remove(&(namespace.to_string(), name.to_string())) else {
            panic!("no pod {namespace}/{name}");
        };
        st.rv += 1;
        let rv = st.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            &mut st,
            Change {
                rv,
                deleted: true,
                old: None,
                new: pod,
            },
        );
    }

    fn record(&self, st: &mut State, change: Change) {
        st.history.push(change.clone());
        // Sent under the lock, so a watch that snapshots the history under it misses none.
        let _ = self.notices.send(Notice::Change(change));
    }

    /// Cuts every open watch connection mid-stream (no final chunk).
    pub fn drop_watches(&self) {
        let _st = self.state.lock().unwrap();
        let _ = self.notices.send(Notice::DropWatches);
    }

    /// Forgets the history: a watch resuming from a resourceVersion before the current one
    /// gets 410.
    pub fn expire_history(&self) {
        let mut st = self.state.lock().unwrap();
        st.oldest_watchable = st.rv;
        st.history.clear();
    }

    /// Sends a pod that stops matching a watch's selector as MODIFIED with its new labels
    /// (instead of DELETED), to open watches too.
    pub fn set_lax_label_filter(&self, lax: bool) {
        self.state.lock().unwrap().lax_label_filter = lax;
    }

    /// Watches streaming now.
    pub fn open_watches(&self) -> usize {
        self.state.lock().unwrap().open_watches
    }

    /// Request targets served so far (`/api/v1/pods?labelSelector=...`), decoded.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Serves this cluster on a free port of 127.0.0.1.
    pub fn serve(&self) -> io::Result<Server> {
        self.serve_on(Port::reserve()?)
    }

    /// Serves this cluster on a free port of 127.0.0.1 from a thread with its own tokio
    /// runtime, until the returned handle is dropped.
    pub fn serve_in_thread(&self) -> io::Result<ThreadServer> {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let cluster = self.clone();
        let thread = std::thread::Builder::new()
            .name("stub-apiserver".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    match cluster.serve() {
                        Ok(server) => {
                            let _ = started_tx.send(Ok(server.port));
                            let _ = stopped.await;
                            drop(server.stop().await);
                        }
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                        }
                    }
                });
            })?;
        let port = started
            .recv()
            .map_err(|_| io::Error::other("the stub API server's thread died"))??;
        Ok(ThreadServer {
            port,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Serves this cluster on a port reserved before (clients were refused until now).
    pub fn serve_on(&self, port: Port) -> io::Result<Server> {
        let listener = port.0.listen(1024)?;
        let port = listener.local_addr()?.port();
        let cluster = self.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let cluster = cluster.clone();
                conns.spawn(async move {
                    let _ = cluster.handle(sock).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Server { port, task })
    }

    async fn handle(&self, mut sock: TcpStream) -> io::Result<()> {
        let mut buf = Vec::with_capacity(4096);
        let target = loop {
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(_) = req.parse(&buf).map_err(io::Error::other)? {
                assert_eq!(req.method, Some("GET"), "the discovery only reads");
                break req.path.unwrap_or("/").to_string();
            }
            if buf.len() > 65536 {
                return Ok(());
            }
        };
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: HashMap<String, String> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        {
            let mut st = self.state.lock().unwrap();
            st.requests
                .push(format!("{path}?{}", percent_decode(query)));
        }
        let namespace = match path.split('/').collect::<Vec<_>>()[..] {
            ["", "api", "v1", "pods"] => None,
            ["", "api", "v1", "namespaces", ns, "pods"] => Some(ns.to_string()),
            _ => {
                let body = status_json(404, "NotFound", "the stub serves pods only");
                return respond(&mut sock, 404, &body.to_string()).await;
            }
        };
        let filter = Filter {
            namespace,
            selector: params
                .get("labelSelector")
                .map(|s| parse_selector(s))
                .unwrap_or_default(),
        };
        if params.get("watch").map(String::as_str) == Some("true") {
            let from = params
                .get("resourceVersion")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            self.watch(sock, filter, from).await
        } else {
            let body = {
                let st = self.state.lock().unwrap();
                let items: Vec<Value> = st
                    .pods
                    .values()
                    .filter(|p| filter.matches(p))
                    .map(|p| {
                        // Items of a list carry no kind/apiVersion, as from a real server.
                        let mut p = p.clone();
                        let obj = p.as_object_mut().unwrap();
                        obj.remove("kind");
                        obj.remove("apiVersion");
                        p
                    })
                    .collect();
                json!({
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": st.rv.to_string()},
                    "items": items,
                })
            };
            respond(&mut sock, 200, &body.to_string()).await
        }
    }

    async fn watch(&self, mut sock: TcpStream, filter: Filter, from: u64) -> io::Result<()> {
        let expired = from != 0 && from < self.state.lock().unwrap().oldest_watchable;
        if expired {
            let gone = json!({
                "type": "ERROR",
                "object": status_json(410, "Expired", &format!("too old resource version: {from}")),
            });
            sock.write_all(CHUNKED_HEAD.as_bytes()).await?;
            write_chunk(&mut sock, &gone).await?;
            return sock.write_all(b"0\r\n\r\n").await;
        }
        let (mut notices, replay, mut last) = {
            let mut st = self.state.lock().unwrap();
            let notices = self.notices.subscribe();
            let replay: Vec<(&'static str, Value)> = if from == 0 {
                // "Any" resourceVersion: the current state as ADDED.
                st.pods
                    .values()
                    .filter(|p| filter.matches(p))
                    .map(|p| ("ADDED", p.clone()))
                    .collect()
            } else {
                st.history
                    .iter()
                    .filter(|c| c.rv > from)
                    .filter_map(|c| filter.event(c, st.lax_label_filter))
                    .collect()
            };
            st.open_watches += 1;
            (notices, replay, st.rv)
        };
        let _open = OpenWatch(self.state.clone());
        sock.write_all(CHUNKED_HEAD.as_bytes()).await?;
        for (kind, object) in replay {
            write_chunk(&mut sock, &json!({"type": kind, "object": object})).await?;
        }
        loop {
            match notices.recv().await {
                Ok(Notice::Change(c)) if c.rv > last => {
                    last = c.rv;
                    let lax = self.state.lock().unwrap().lax_label_filter;
                    if let Some((kind, object)) = filter.event(&c, lax) {
                        write_chunk(&mut sock, &json!({"type": kind, "object": object})).await?;
                    }
                }
                Ok(Notice::Change(_)) => {}
                // Abruptly: the socket closes without the final chunk.
                Ok(Notice::DropWatches) | Err(_) => return Ok(()),
            }
        }
    }
}

/// Counts a watch as open while it lives.
struct OpenWatch(Arc<Mutex<State>>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.lock().unwrap().open_watches -= 1;
    }
}

struct Filter {
    namespace: Option<String>,
    selector: Vec<(String, String)>,
}

impl Filter {
    fn matches(&self, pod: &Value) -> bool {
        let meta = &pod["metadata"];
        self.namespace
            .as_deref()
            .is_none_or(|ns| meta["namespace"].as_str() == Some(ns))
            && self
                .selector
                .iter()
                .all(|(k, v)| meta["labels"][k.as_str()].as_str() == Some(v.as_str()))
    }

    /// The watch event a change is for this watch, if any (`lax`: see
    /// [`Cluster::set_lax_label_filter`]).
    fn event(&self, c: &Change, lax: bool) -> Option<(&'static str, Value)> {
        if c.deleted {
            return self.matches(&c.new).then(|| ("DELETED", c.new.clone()));
        }
        let was = c.old.as_ref().is_some_and(|o| self.matches(o));
        match (was, self.matches(&c.new)) {
            (true, true) => Some(("MODIFIED", c.new.clone())),
            (false, true) => Some(("ADDED", c.new.clone())),
            (true, false) if lax => Some(("MODIFIED", c.new.clone())),
            (true, false) => {
                let mut old = c.old.clone().unwrap();
                old["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                Some(("DELETED", old))
            }
            (false, false) => None,
        }
    }
}

/// A listener serving a [`Cluster`]; `stop` closes it and every connection.
pub struct Server {
    pub port: u16,
    task: JoinHandle<()>,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes the listener and every connection (watches end abruptly), and keeps the port
    /// so that clients are refused, as by an API server that is down, until `serve_on`.
    pub async fn stop(self) -> Port {
        self.task.abort();
        let _ = self.task.await;
        Port::hold(self.port).expect("the stopped API server's port can be held again")
    }
}

/// A [`Cluster`] served from a thread of its own; dropping it stops the server.
pub struct ThreadServer {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ThreadServer {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ThreadServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A port of 127.0.0.1 bound but not listening: connections to it are refused, and no
/// other process can take it meanwhile.
pub struct Port(TcpSocket);

impl Port {
    pub fn reserve() -> io::Result<Port> {
        Port::hold(0)
    }

    fn hold(port: u16) -> io::Result<Port> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
        Ok(Port(socket))
    }

    pub fn url(&self) -> String {
        let port = self.0.local_addr().expect("bound").port();
        format!("http://127.0.0.1:{port}")
    }
}

const CHUNKED_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            transfer-encoding: chunked\r\nconnection: close\r\n\r\n";

async fn write_chunk(sock: &mut TcpStream, event: &Value) -> io::Result<()> {
    let line = format!("{event}\n");
    let framed = format!("{:x}\r\n{line}\r\n", line.len());
    sock.write_all(framed.as_bytes()).await?;
    sock.flush().await
}

async fn respond(sock: &mut TcpStream, code: u16, body: &str) -> io::Result<()> {
    let reason = if code == 200 { "OK" } else { "Not Found" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn parse_selector(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (k, v) = t
                .split_once("==")
                .or_else(|| t.split_once('='))
                .unwrap_or_else(|| panic!("the stub knows equality selectors only: {t}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
