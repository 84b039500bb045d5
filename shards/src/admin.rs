//! The worker admin API (`/add_worker`, `/remove_worker`, `/list_workers`, `/get_loads`,
//! `/workers[/{url}]`) arrives on the request port like any request; shards hand it to the
//! control plane, which owns worker membership, and relay its answer.

/// One admin request, as the shard read it.
pub struct AdminCall {
    /// `GET`, `POST` or `DELETE`.
    pub method: &'static str,
    /// The path, without the query.
    pub path: String,
    /// The query string (after `?`), raw.
    pub query: String,
    pub body: Vec<u8>,
    pub reply: tokio::sync::oneshot::Sender<AdminReply>,
}

/// The control plane's answer.
pub struct AdminReply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

pub type AdminSender = tokio::sync::mpsc::UnboundedSender<AdminCall>;

/// Whether `path` belongs to the admin API.
pub fn is_admin_path(path: &[u8]) -> bool {
    matches!(
        path,
        b"/add_worker" | b"/remove_worker" | b"/list_workers" | b"/get_loads" | b"/workers"
    ) || path.starts_with(b"/workers/")
}
