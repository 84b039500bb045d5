//! Test harness: the real `ringrouter` binary as a child process, in-process mock vLLM
//! workers, raw upstreams that send exactly the bytes a test wants, and a plain HTTP/1.1
//! client over std sockets. Everything on 127.0.0.1.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub use mock_vllm::{MockConfig, MockServer};

pub struct Router {
    pub child: Child,
    pub addr: SocketAddr,
    /// The Prometheus endpoint (`--prometheus-port 0` unless the test chose a port).
    pub metrics: Option<SocketAddr>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Router {
    /// Starts the router on an ephemeral port with `args` (plus `--port 0 --no-pin-cores`).
    pub fn start(args: &[&str]) -> Router {
        Self::start_with(None, args).expect("router starts")
    }

    /// Starts the router with these environment variables set too; `Err` as `start_with`.
    pub fn start_env(env: &[(&str, &str)], args: &[&str]) -> Result<Router, String> {
        Self::spawn(None, env, args)
    }

    /// Runs the router behind `wrapper` (e.g. the nouring seccomp wrapper) if given.
    /// `Err` carries the stderr of a router that exited before listening.
    pub fn start_with(wrapper: Option<&str>, args: &[&str]) -> Result<Router, String> {
        Self::spawn(wrapper, &[], args)
    }

    fn spawn(wrapper: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> Result<Router, String> {
        let bin = env!("CARGO_BIN_EXE_ringrouter");
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(w);
                c.arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["--port", "0", "--no-pin-cores"]);
        // The control plane's /metrics scrapes would show up in the workers' request
        // counts; tests about load scraping turn it on themselves.
        if !args.contains(&"--load-scrape-interval-ms") {
            cmd.args(["--load-scrape-interval-ms", "0"]);
        }
        // Likewise the active health checks (and raw upstreams expect only the test's
        // requests); tests about health turn them on.
        if !args.contains(&"--health-check-interval-secs") {
            cmd.args(["--health-check-interval-secs", "0"]);
        }
        // Routers run side by side: never the default metrics port.
        if !args.contains(&"--prometheus-port") {
            cmd.args(["--prometheus-port", "0"]);
        }
        cmd.args(args)
            .env_remove("RUST_LOG")
            // Never a real cluster: Kubernetes discovery talks to what a test gives it.
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawn ringrouter");
        Self::attach(child, Duration::from_secs(20))
    }

    /// Follows a spawned router (stdout and stderr piped): its stderr is collected, and once
    /// it prints its listening line (after the metrics one) it is a `Router`. `Err` carries
    /// the stderr of a router that exited or did not listen within `within`.
    pub fn attach(mut child: Child, within: Duration) -> Result<Router, String> {
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut metrics = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line
                    .strip_prefix("ringrouter metrics on http://")
                    .and_then(|a| a.strip_suffix("/metrics"))
                {
                    metrics = Some(a.parse::<SocketAddr>().unwrap());
                }
                if let Some(a) = line.strip_prefix("ringrouter listening on http://") {
                    let _ = tx.send((a.parse::<SocketAddr>().unwrap(), metrics));
                }
            }
        });
        match rx.recv_timeout(within) {
            Ok((addr, metrics)) => Ok(Router {
                child,
                addr,
                metrics,
                stderr: log,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                Err(log.lock().unwrap().clone())
            }
        }
    }

    /// Waits up to 5 s for the router's log to contain `needle`; returns whether it did.
    pub fn log_contains(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The text of `GET /metrics`.
    pub fn scrape(&self) -> String {
        let addr = self.metrics.expect("the router serves metrics");
        let r = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` mock workers named mock-0.., each configured by `f`.
pub fn mocks(n: usize, f: impl Fn(&mut MockConfig)) -> Vec<MockServer> {
    (0..n)
        .map(|i| {
            let mut c = MockConfig::named(format!("mock-{i}"));
            c.model = "mock-model".into();
            f(&mut c);
            MockServer::spawn(c).unwrap()
        })
        .collect()
}

pub fn worker_args(mocks: &[MockServer]) -> Vec<String> {
    let mut a = vec!["--worker-urls".to_string()];
    a.extend(mocks.iter().map(|m| m.url()));
    a
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body as framed on the wire (chunk framing included when chunked).
    pub raw_body: Vec<u8>,
    /// The body with any chunked framing removed.
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
    /// Asserts the OpenAI-style error shape and returns the message.
    pub fn error_message(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string(), "no error.message in {v}");
        assert!(e["type"].is_string(), "no error.type in {v}");
        assert_eq!(e["code"].as_u64(), Some(self.status as u64), "{v}");
        e["message"].as_str().unwrap().to_string()
    }
}

/// Reads one response from `s`, using `pending` for bytes already read past the previous
/// response. `head_request`: the response has no body whatever its headers say.
pub fn read_response_from(
    s: &mut impl Read,
    pending: &mut Vec<u8>,
    head_request: bool,
) -> Option<Response> {
    let mut buf = std::mem::take(pending);
    let mut tmp = [0u8; 65536];
    let (status, headers, head_len) = loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut hdrs);
        if let Ok(httparse::Status::Complete(n)) = r.parse(&buf) {
            let h: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let code = r.code.unwrap();
            if code == 100 {
                buf.drain(..n);
                continue;
            }
            break (code, h, n);
        }
        let n = s.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut rest = buf.split_off(head_len);
    let chunked = get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let (raw_body, body) = if head_request || status == 204 || status == 304 {
        *pending = rest;
        (Vec::new(), Vec::new())
    } else if chunked {
        loop {
            if let Some((end, decoded)) = dechunk(&rest) {
                *pending = rest.split_off(end);
                break (rest, decoded);
            }
            let n = s.read(&mut tmp).ok()?;
            if n == 0 {
                return None;
            }
            rest.extend_from_slice(&tmp[..n]);
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len.trim().parse().unwrap();
        while rest.len() < len {
            let n = s.read(&mut tmp).ok()?;
            if n == 0 {
                return None;
            }
            rest.extend_from_slice(&tmp[..n]);
        }
        *pending = rest.split_off(len);
        (rest.clone(), rest)
    } else {
        loop {
            let n = s.read(&mut tmp).ok()?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&tmp[..n]);
        }
        (rest.clone(), rest)
    };
    Some(Response {
        status,
        headers,
        raw_body,
        body,
    })
}

/// Complete chunked body at the start of `b`: (its length, decoded payload).
pub fn dechunk(b: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        let line_end = i + b[i..].windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&b[i..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            // Trailers until an empty line.
            loop {
                let e = i + b[i..].windows(2).position(|w| w == b"\r\n")?;
                let empty = e == i;
                i = e + 2;
                if empty {
                    return Some((i, out));
                }
            }
        }
        if b.len() < i + size + 2 {
            return None;
        }
        out.extend_from_slice(&b[i..i + size]);
        i += size + 2;
    }
}

pub fn read_response(s: &mut TcpStream) -> Response {
    read_response_from(s, &mut Vec::new(), false).expect("a response")
}

/// Sends raw bytes on a new connection and reads one response.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(raw).unwrap();
    read_response(&mut s)
}

pub fn post_json(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `method path` with a JSON `body` to the router (the worker admin API and the like).
pub fn call(r: &Router, method: &str, path: &str, body: &str) -> Response {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(r.addr, raw.as_bytes())
}

pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: router\r\n\r\n").into_bytes()
}

/// Whether the peer closed `s` (EOF or reset) within `within`.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A one-connection-at-a-time upstream that answers each request with `script(request)`.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub url: String,
}

impl RawUpstream {
    /// `on_conn` gets each accepted connection; it runs on its own thread.
    pub fn spawn(on_conn: impl Fn(TcpStream) + Send + Sync + 'static) -> RawUpstream {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let on_conn = std::sync::Arc::new(on_conn);
        std::thread::spawn(move || {
            for s in l.incoming().map_while(Result::ok) {
                let f = on_conn.clone();
                std::thread::spawn(move || f(s));
            }
        });
        RawUpstream {
            addr,
            url: format!("http://{addr}"),
        }
    }
}

/// Reads one request (head + Content-Length body) from `s`; None on EOF.
pub fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p + 4]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < p + 4 + len {
                let n = s.read(&mut tmp).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            return Some((head, buf[p + 4..p + 4 + len].to_vec()));
        }
        let n = s.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// The `health` the router's `/workers` shows for `url`.
pub fn worker_health(r: &Router, url: &str) -> String {
    let v = exchange(r.addr, &get("/workers")).json();
    let w = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["url"] == url)
        .unwrap_or_else(|| panic!("{url} not in {v}"));
    w["health"].as_str().unwrap().to_string()
}

/// Runs `client(i)` for `i` in `0..n` all at once on one tokio thread (each its own
/// connection, as many clients would) and returns their results in order.
pub fn concurrently<T, F, Fut>(n: usize, client: F) -> Vec<Result<T, String>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(client(i))).collect();
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

/// Fails with how many of `results` failed and the first failure.
pub fn assert_all_ok<T>(results: &[Result<T, String>]) {
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
}

/// When the router closed a worker's connections, in order, as the worker saw them go.
pub type Closes = std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>;

/// The time of close number `n` (from 0), waited for up to 5 s.
pub fn nth_close(closes: &Closes, n: usize) -> Option<std::time::Instant> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while closes.lock().unwrap().len() <= n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    closes.lock().unwrap().get(n).copied()
}
