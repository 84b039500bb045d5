//! The worker admin API, answered from the registry: vllm-router's endpoints and shapes
//! (`/add_worker`, `/remove_worker`, `/list_workers`, `/get_loads`, `/workers[/{url}]`);
//! errors in the OpenAI JSON shape. `/get_loads` adds to vllm-router's `load` (here: the
//! router's requests in flight) what each worker last reported about itself.

use shards::admin::{AdminCall, AdminReply};
use shards::http::ApiError;

use super::membership::Role;
use super::registry::{normalize, AddError, Entry, Health, Registry};

/// What an admin call changed (the caller publishes and starts health checks).
pub enum Effect {
    None,
    Added(String),
    Removed,
}

pub fn handle(reg: &mut Registry, call: &AdminCall) -> (AdminReply, Effect) {
    let q = |k: &str| {
        form_urlencoded::parse(call.query.as_bytes())
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    match (call.method, call.path.as_str()) {
        ("POST", "/add_worker") => match q("url") {
            Some(url) => add(reg, &url, Role::Regular, false),
            None => (error(400, "missing query parameter 'url'"), Effect::None),
        },
        ("POST", "/remove_worker") => match q("url") {
            Some(url) => remove(reg, &url, false),
            None => (error(400, "missing query parameter 'url'"), Effect::None),
        },
        ("GET", "/list_workers") => {
            let urls: Vec<&str> = reg
                .entries()
                .iter()
                .map(|e| e.worker.url.as_str())
                .collect();
            (
                json(200, &serde_json::json!({ "urls": urls })),
                Effect::None,
            )
        }
        ("GET", "/get_loads") => {
            let workers: Vec<_> = reg
                .entries()
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "worker": e.worker.url,
                        "load": reg.load(&e.worker),
                        "reported": reg.reported_load(&e.worker),
                    })
                })
                .collect();
            (
                json(200, &serde_json::json!({ "workers": workers })),
                Effect::None,
            )
        }
        ("GET", "/workers") => {
            let workers: Vec<_> = reg.entries().iter().map(|e| describe(reg, e)).collect();
            let count = |r: fn(&Role) -> bool| reg.entries().iter().filter(|e| r(&e.role)).count();
            let body = serde_json::json!({
                "workers": workers,
                "total": workers.len(),
                "stats": {
                    "prefill_count": count(|r| matches!(r, Role::Prefill { .. })),
                    "decode_count": count(|r| matches!(r, Role::Decode)),
                    "regular_count": count(|r| matches!(r, Role::Regular)),
                },
            });
            (json(200, &body), Effect::None)
        }
        ("POST", "/workers") => {
            let v: serde_json::Value = match serde_json::from_slice(&call.body) {
                Ok(v) => v,
                Err(e) => return (error(400, &format!("invalid JSON body: {e}")), Effect::None),
            };
            let Some(url) = v.get("url").and_then(|u| u.as_str()) else {
                return (
                    error(400, "the body needs a string field 'url'"),
                    Effect::None,
                );
            };
            let role = match v.get("worker_type").and_then(|t| t.as_str()) {
                None | Some("regular") => Role::Regular,
                Some("decode") => Role::Decode,
                Some("prefill") => Role::Prefill {
                    bootstrap_port: v
                        .get("bootstrap_port")
                        .and_then(|p| p.as_u64())
                        .and_then(|p| u16::try_from(p).ok()),
                },
                Some(other) => {
                    return (
                        error(
                            400,
                            &format!("unknown worker_type '{other}' (regular, prefill, decode)"),
                        ),
                        Effect::None,
                    )
                }
            };
            add(reg, url, role, true)
        }
        ("GET", p) if p.starts_with("/workers/") => {
            let url = decode_path(&p["/workers/".len()..]);
            match reg.get(&url) {
                Some(e) => (json(200, &describe(reg, e)), Effect::None),
                None => (not_found(&url), Effect::None),
            }
        }
        ("DELETE", p) if p.starts_with("/workers/") => {
            let url = decode_path(&p["/workers/".len()..]);
            remove(reg, &url, true)
        }
        (m, p) => (
            error(
                405,
                &format!("{m} is not allowed on {p} (see the worker admin API in the README)"),
            ),
            Effect::None,
        ),
    }
}

/// Adds the targets `url` names: with `--intra-node-data-parallel-size N` a rank-less URL
/// is its N ranks, all or none (`Registry::add_server`). The answer names the URL as given
/// (normalised), as vllm-router's does.
fn add(reg: &mut Registry, url: &str, role: Role, rest: bool) -> (AdminReply, Effect) {
    match reg.add_server(url, role) {
        Ok(added) => {
            let first = added.first().cloned().unwrap_or_default();
            let named = if added.len() == 1 {
                first.clone()
            } else {
                normalize(url).to_string()
            };
            let msg = format!("Successfully added worker: {named}");
            let reply = if rest {
                json(200, &serde_json::json!({"success": true, "message": msg}))
            } else {
                text(200, msg)
            };
            // The health check is per server: any rank's URL names it.
            (reply, Effect::Added(first))
        }
        Err(AddError::Exists) => (
            error(400, &format!("Worker {url} already exists")),
            Effect::None,
        ),
        Err(AddError::Invalid(e)) => (error(400, &e), Effect::None),
        Err(AddError::Full(n)) => (
            error(
                503,
                &format!("the worker table is full ({n} workers); remove one first"),
            ),
            Effect::None,
        ),
    }
}

/// Removes the targets `url` names: a rank-less URL all the server's ranks, `url@r` that
/// rank (`Registry::remove_server`).
fn remove(reg: &mut Registry, url: &str, rest: bool) -> (AdminReply, Effect) {
    let removed = reg.remove_server(url);
    let url = match removed.as_slice() {
        [] => return (not_found(url), Effect::None),
        [one] => one.worker.url.clone(),
        _ => normalize(url).to_string(),
    };
    let reply = if rest {
        json(
            200,
            &serde_json::json!({"success": true, "message": format!("Worker {url} removed successfully")}),
        )
    } else {
        text(200, format!("Successfully removed worker: {url}"))
    };
    (reply, Effect::Removed)
}

fn describe(reg: &Registry, e: &Entry) -> serde_json::Value {
    let (worker_type, bootstrap_port) = match &e.role {
        Role::Regular => ("regular", None),
        Role::Prefill { bootstrap_port } => ("prefill", *bootstrap_port),
        Role::Decode => ("decode", None),
    };
    serde_json::json!({
        "url": e.worker.url,
        "model_id": "unknown",
        "worker_type": worker_type,
        "bootstrap_port": bootstrap_port,
        "is_healthy": e.health == Health::Healthy,
        "health": e.health.name(),
        "last_error": e.last_error,
        "circuit_breaker": reg.breaker_state(&e.worker).name(),
        "load": reg.load(&e.worker),
        "connection_mode": match e.worker.protocol {
            shards::route::Protocol::Http => "Http",
            shards::route::Protocol::Grpc => "Grpc",
        },
        "priority": 50,
        "cost": 1.0,
    })
}

fn decode_path(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn not_found(url: &str) -> AdminReply {
    error(404, &format!("Worker {url} not found"))
}

fn error(status: u16, message: &str) -> AdminReply {
    AdminReply {
        status,
        content_type: "application/json",
        body: ApiError::new(status, message).body(),
    }
}

fn json(status: u16, v: &serde_json::Value) -> AdminReply {
    AdminReply {
        status,
        content_type: "application/json",
        body: serde_json::to_vec(v).unwrap_or_default(),
    }
}

fn text(status: u16, s: String) -> AdminReply {
    AdminReply {
        status,
        content_type: "text/plain; charset=utf-8",
        body: s.into_bytes(),
    }
}
