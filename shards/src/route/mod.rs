//! The workers a shard can route to and the policy that orders them for a request.
//!
//! A policy does not return one worker: it returns the candidates in preference order
//! (as Pingora's `BackendSelection::iter`), and the proxy walks them until one is usable.
//! One mechanism serves connect-failure fallback now and health skipping and retries later.

pub mod key;
pub mod kv_index;
mod policy;
pub mod prefix;
pub mod ring;
mod worker;

pub use policy::{Candidates, Policy, PolicyConfig, RouteInput, Selector};
pub use worker::{
    host_url, parse_worker_url, Protocol, Worker, WorkerRole, WorkerSet, WorkerUrlError,
};
