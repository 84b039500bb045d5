//! Accepting and serving connections: one tokio task per TCP connection running hyper's
//! HTTP/1.1 server (keep-alive on), counted in `Stats`, all stopped by the state's shutdown
//! signal. Request handling itself is in `handler`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::handler;
use crate::state::MockState;

/// Serve `state` on `listener` until `state.shutdown()` is called. Usable from any tokio
/// runtime; [`crate::MockServer`] runs it on a runtime of its own.
pub async fn serve(listener: TcpListener, state: Arc<MockState>) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        state.set_local_addr(addr);
    }
    let mut shutdown = state.shutdown_signal();
    loop {
        if *shutdown.borrow_and_update() {
            return Ok(());
        }
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    // e.g. EMFILE: back off instead of spinning.
                    eprintln!("mock-vllm {}: accept: {e}", state.config().name);
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let conn_id = state.next_connection_id();
        state.connections_accepted.fetch_add(1, Relaxed);
        state.connections_open.fetch_add(1, Relaxed);
        let open = OpenConnection(state.clone());
        let conn_state = state.clone();
        let mut conn_shutdown = state.shutdown_signal();
        tokio::spawn(async move {
            let _open = open;
            let service = service_fn(move |req| handler::handle(req, conn_state.clone(), conn_id));
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = async { while !*conn_shutdown.borrow_and_update() {
                    if conn_shutdown.changed().await.is_err() { break; }
                } } => {}
            }
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
    )
}

/// Decrements `connections_open` when the connection task ends (or is cancelled).
struct OpenConnection(Arc<MockState>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}
