//! The mock engine's KV-cache events: `SubscribeKvEvents` streams every batch published
//! after the call (live only, as vLLM's servicer relays them), and the events themselves:
//! a prompt's whole blocks stored or removed, under engine hashes chained as vLLM chains
//! its own (each block's hash covers its parent's), but with a cheap hash.

use std::sync::Arc;

use bytes::Bytes;
use grpc_proto::common::{kv_cache_event, KvBlock, KvBlocksRemoved, KvBlocksStored, KvCacheEvent};
use h2::server::SendResponse;
use tokio::sync::broadcast::error::RecvError;

use super::server::{encode, send_head, send_status, UNIMPLEMENTED};
use super::state::GrpcState;

/// The engine hashes of the whole blocks of `prompt`.
fn block_hashes(prompt: &[u32], block_size: u32) -> Vec<i64> {
    let mut prev: u64 = 0xcbf2_9ce4_8422_2325;
    prompt
        .chunks_exact(block_size.max(1) as usize)
        .map(|block| {
            for t in block {
                for b in t.to_le_bytes() {
                    prev = (prev ^ b as u64).wrapping_mul(0x0100_0000_01b3);
                }
            }
            prev as i64
        })
        .collect()
}

pub(super) fn stored(prompt: &[u32], block_size: u32) -> KvCacheEvent {
    let hashes = block_hashes(prompt, block_size);
    KvCacheEvent {
        event_id: 0,
        data: Some(kv_cache_event::Data::Stored(KvBlocksStored {
            blocks: prompt
                .chunks_exact(block_size.max(1) as usize)
                .zip(&hashes)
                .map(|(ids, &h)| KvBlock {
                    block_hash: h,
                    token_ids: ids.to_vec(),
                    block_size: block_size as i32,
                    ..Default::default()
                })
                .collect(),
            parent_block_hash: None,
            medium: Some("GPU".into()),
            ..Default::default()
        })),
    }
}

pub(super) fn removed(prompt: &[u32], block_size: u32) -> KvCacheEvent {
    KvCacheEvent {
        event_id: 0,
        data: Some(kv_cache_event::Data::Removed(KvBlocksRemoved {
            block_hashes: block_hashes(prompt, block_size),
            medium: Some("GPU".into()),
            ..Default::default()
        })),
    }
}

/// One SubscribeKvEvents call: every batch published from now on, until the client leaves
/// or the server stops.
pub(super) async fn subscribe(mut respond: SendResponse<Bytes>, state: Arc<GrpcState>) {
    if !state.config.kv_events {
        send_status(
            &mut respond,
            UNIMPLEMENTED,
            "KV cache events not enabled. Start vLLM with --kv-events-config",
        );
        return;
    }
    let mut batches = state.kv_events.subscribe();
    let Some(mut send) = send_head(&mut respond) else {
        return;
    };
    state.record(|s| s.kv_subscriptions += 1);
    let mut shutdown = state.shutdown_signal();
    loop {
        let batch = tokio::select! {
            b = batches.recv() => b,
            _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => return,
            _ = shutdown.changed() => return,
        };
        match batch {
            Ok(b) => {
                if send.send_data(encode(&b), false).is_err() {
                    return;
                }
            }
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        }
    }
}
