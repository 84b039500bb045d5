//! Changes to the worker set, as the control plane's sources announce them (the admin API,
//! Kubernetes discovery). The registry applies them and publishes a new worker-set epoch to
//! the shards; sources only say what they saw.

/// What a worker serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Plain mode: any request.
    Regular,
    /// P/D mode: the prefill leg; `bootstrap_port` as given on `--prefill URL PORT` or the
    /// pod annotation `vllm.ai/bootstrap-port`.
    Prefill { bootstrap_port: Option<u16> },
    /// P/D mode: the decode leg.
    Decode,
}

/// One change to the worker set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Route to `url` (`http://host:port`) from now on (a no-op if it is there already
    /// with the same role).
    Add { url: String, role: Role },
    /// Stop routing new requests to `url`; its requests in flight finish.
    Remove { url: String },
}

/// Where sources send changes; the registry owns the receiving end.
pub type MembershipSender = tokio::sync::mpsc::UnboundedSender<MembershipChange>;
