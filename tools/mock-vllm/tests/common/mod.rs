//! A tiny blocking HTTP/1.1 client for the tests: it keeps the response's chunk boundaries
//! and tells whether the body ended cleanly, which a general client would hide. Also reads
//! the raw captures of real vLLM in `testdata/`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub struct Resp {
    pub status: u16,
    /// Lower-case names, arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Chunked bodies: each chunk as sent.
    pub chunks: Vec<Vec<u8>>,
    /// The body ended as its framing says (terminating chunk / full content-length).
    pub complete: bool,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// SSE events (`data: ...` payloads and `: comment` lines), split on blank lines.
    pub fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// JSON payloads of `data:` events other than `[DONE]`.
    pub fn data_json(&self) -> Vec<serde_json::Value> {
        self.events()
            .iter()
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
            .collect()
    }
}

/// Read one response (head and body) from `r`.
pub fn read_response(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("header line");
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut resp = Resp {
        status,
        headers: headers.clone(),
        body: Vec::new(),
        chunks: Vec::new(),
        complete: false,
    };
    if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(resp); // EOF mid-body
            }
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            let mut chunk = vec![0; size + 2];
            if r.read_exact(&mut chunk).is_err() {
                return Ok(resp);
            }
            chunk.truncate(size);
            if size == 0 {
                resp.complete = true;
                return Ok(resp);
            }
            resp.body.extend_from_slice(&chunk);
            resp.chunks.push(chunk);
        }
    } else {
        let len: usize = find("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        resp.body = body;
        resp.complete = true;
    }
    Ok(resp)
}

/// A keep-alive connection to a mock.
pub struct Conn {
    pub reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(s),
        }
    }

    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: mock\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.reader.get_mut().write_all(req.as_bytes()).unwrap();
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Resp {
        self.send(method, path, headers, body);
        read_response(&mut self.reader).expect("response")
    }

    /// Read one line of the (chunked) body, raw.
    pub fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Ok(line)
    }

    /// True if the server closed the connection (EOF) within `within`.
    pub fn closed_within(&mut self, within: Duration) -> bool {
        self.reader
            .get_ref()
            .set_read_timeout(Some(within))
            .unwrap();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + within;
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {
                    if Instant::now() > deadline {
                        return false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

pub const JSON: (&str, &str) = ("content-type", "application/json");

/// POST a JSON body on a fresh connection.
pub fn post(addr: SocketAddr, path: &str, body: &str, extra: &[(&str, &str)]) -> Resp {
    let mut headers = vec![JSON];
    headers.extend_from_slice(extra);
    Conn::open(addr).request("POST", path, &headers, body)
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    Conn::open(addr).request("GET", path, &[], "")
}

/// Poll `f` until it is true or `within` passes.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A raw capture of real vLLM from `testdata/real-vllm-0.32/`.
pub fn capture(name: &str) -> Resp {
    let path = format!(
        "{}/testdata/real-vllm-0.32/{name}.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    read_response(&mut &bytes[..]).unwrap_or_else(|e| panic!("{path}: {e}"))
}
