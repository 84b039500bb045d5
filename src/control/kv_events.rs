//! Feeds the KV-event index (`shards::route::kv_index`) from the gRPC engines' own
//! KV-cache events: one `SubscribeKvEvents` stream per gRPC server in the worker set (its
//! data-parallel ranks' batches say which rank they are), started and stopped as the set
//! changes. The servicer's contract is followed: subscribe from sequence 0 (live events);
//! a gap in a rank's sequence or a broken stream means the router no longer knows what the
//! engine holds, so its workers go back to guessed routing until a new subscription
//! delivers. An engine that publishes no events (UNIMPLEMENTED: vLLM started without
//! `--kv-events-config`) is asked again every minute; meanwhile routing guesses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use grpc_proto::common::{kv_cache_event, KvEventBatch, SubscribeKvEventsRequest};
use grpc_proto::path;
use shards::grpc::call::code;
use shards::grpc::{call, GrpcError};
use shards::route::kv_index::{EngineBlocks, KvIndex, StoredBlock};
use shards::route::{Protocol, WorkerSet};
use shards::sync::Directory;

/// Before asking an engine without events again.
const NO_EVENTS_RETRY: Duration = Duration::from_secs(60);

/// The routing targets of one server: (data-parallel rank, slot).
type Targets = Vec<(Option<u32>, usize)>;

/// Keeps one subscription per gRPC server in the current worker set, for as long as the
/// process runs; `published` says when the set changed.
pub async fn run(
    directory: Arc<Directory>,
    mut published: tokio::sync::watch::Receiver<u64>,
    index: Arc<KvIndex>,
) {
    let mut subs: HashMap<String, (Targets, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut seen: Option<u64> = None;
    loop {
        let set = directory.current();
        if seen != Some(set.epoch) {
            let servers = grpc_servers(&set);
            subs.retain(|url, (targets, task)| {
                let keep = servers.get(url) == Some(targets);
                if !keep {
                    task.abort();
                }
                keep
            });
            for (url, targets) in servers {
                if subs.contains_key(&url) {
                    continue;
                }
                let task = tokio::spawn(subscribe(url.clone(), targets.clone(), index.clone()));
                subs.insert(url, (targets, task));
            }
            seen = Some(set.epoch);
        }
        if published.changed().await.is_err() {
            return;
        }
    }
}

/// The gRPC servers of `set` and their targets.
fn grpc_servers(set: &WorkerSet) -> HashMap<String, Targets> {
    let mut servers: HashMap<String, Targets> = HashMap::new();
    for w in set.iter().filter(|w| w.protocol == Protocol::Grpc) {
        servers
            .entry(w.host_url().to_string())
            .or_default()
            .push((w.dp_rank, w.slot));
    }
    for t in servers.values_mut() {
        t.sort_unstable();
    }
    servers
}

/// Subscribes to `url` again and again: after a lost stream at once (then backing off),
/// after UNIMPLEMENTED every minute. Aborting the task ends it; its workers' blocks leave
/// the index with it.
async fn subscribe(url: String, targets: Targets, index: Arc<KvIndex>) {
    let mut backoff = Duration::from_millis(200);
    let mut told_no_events = false;
    // Said once per outage, not on every retry while the engine is down.
    let mut told_lost = false;
    loop {
        let mut feeds = Feeds::new(&index, &targets);
        let outcome = follow(&url, &mut feeds).await;
        let delivered = feeds.delivered;
        drop(feeds);
        if delivered > 0 {
            backoff = Duration::from_millis(200);
            told_lost = false;
        }
        match outcome {
            Err(GrpcError::Status { code: c, message }) if c == code::UNIMPLEMENTED => {
                if !told_no_events {
                    told_no_events = true;
                    tracing::info!(worker = %url, reason = %message,
                        "the engine streams no KV-cache events: cache-aware routing guesses \
                         from what was routed to it (start vLLM with --kv-events-config to \
                         route by what it holds)");
                }
                tokio::time::sleep(NO_EVENTS_RETRY).await;
                continue;
            }
            Err(e) if !told_lost => {
                told_lost = true;
                tracing::warn!(worker = %url, error = %e,
                    "KV-cache events: stream lost; its workers are routed by guess until \
                     resubscribed");
            }
            Err(e) => tracing::debug!(worker = %url, error = %e, "KV-cache events: retrying"),
            Ok(()) => {
                tracing::warn!(worker = %url, "KV-cache events: the engine ended the stream");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// What one subscription has learnt: per target, the engine's blocks (once its first
/// batch arrived) and the sequence it is at. Dropping it takes the targets back to guessed
/// routing.
struct Feeds<'a> {
    index: &'a KvIndex,
    targets: &'a Targets,
    blocks: HashMap<usize, EngineBlocks>,
    cursors: HashMap<usize, u64>,
    delivered: u64,
}

impl<'a> Feeds<'a> {
    fn new(index: &'a KvIndex, targets: &'a Targets) -> Self {
        Feeds {
            index,
            targets,
            blocks: HashMap::new(),
            cursors: HashMap::new(),
            delivered: 0,
        }
    }

    /// The slot a batch of `rank` is for: a server routed as one target takes every rank.
    fn slot_of(&self, rank: Option<i32>) -> Option<usize> {
        match self.targets.as_slice() {
            [(None, slot)] => Some(*slot),
            many => {
                let r = rank.unwrap_or(0).max(0) as u32;
                many.iter().find(|(t, _)| *t == Some(r)).map(|(_, s)| *s)
            }
        }
    }

    /// Applies one batch; an error when the sequence skipped (events were lost).
    fn apply(&mut self, batch: &KvEventBatch) -> Result<(), GrpcError> {
        if batch.load.as_ref().is_some_and(|l| l.load_only) {
            return Ok(());
        }
        let Some(slot) = self.slot_of(batch.dp_rank) else {
            return Ok(());
        };
        let seq = batch.sequence_number;
        if let Some(&at) = self.cursors.get(&slot) {
            if seq != at + 1 {
                return Err(GrpcError::Protocol(format!(
                    "KV events of rank {} skipped from {at} to {seq}",
                    batch.dp_rank.unwrap_or(0)
                )));
            }
        }
        self.cursors.insert(slot, seq);
        self.delivered += 1;
        let index = self.index;
        let blocks = self
            .blocks
            .entry(slot)
            .or_insert_with(|| EngineBlocks::new(index, slot));
        for event in &batch.events {
            match &event.data {
                Some(kv_cache_event::Data::Stored(s)) => {
                    if !indexable(s) {
                        continue;
                    }
                    let stored: Vec<StoredBlock> = s
                        .blocks
                        .iter()
                        .map(|b| StoredBlock {
                            engine_hash: b.block_hash,
                            token_ids: &b.token_ids,
                        })
                        .collect();
                    blocks.stored(index, s.parent_block_hash, &stored);
                }
                Some(kv_cache_event::Data::Removed(r))
                    if r.group_idx.unwrap_or(0) == 0 && r.locality != Some(REMOTE) =>
                {
                    blocks.removed(index, &r.block_hashes);
                }
                Some(kv_cache_event::Data::Cleared(_)) => blocks.cleared(index),
                Some(kv_cache_event::Data::Removed(_)) | None => {}
            }
        }
        Ok(())
    }
}

impl Drop for Feeds<'_> {
    fn drop(&mut self) {
        for (_, b) in self.blocks.drain() {
            b.retire(self.index);
        }
    }
}

const REMOTE: i32 = grpc_proto::common::KvCacheLocality::Remote as i32;

/// Whether stored blocks describe prompt tokens as the router hashes them: the engine's
/// own (not a shared pool's), the first KV-cache group, no LoRA adapter or cache salt and
/// no multimodal inputs folded into the hashes.
fn indexable(s: &grpc_proto::common::KvBlocksStored) -> bool {
    s.group_idx.unwrap_or(0) == 0
        && s.locality != Some(REMOTE)
        && s.lora_name.as_deref().is_none_or(str::is_empty)
        && s.cache_salt.as_deref().is_none_or(str::is_empty)
        && s.blocks
            .iter()
            .all(|b| b.lora_id.is_none_or(|l| l == 0) && b.extra_keys.is_empty())
}

/// One subscription, until the stream ends or fails.
async fn follow(url: &str, feeds: &mut Feeds<'_>) -> Result<(), GrpcError> {
    let (send, authority) = super::engine::connect(url)
        .await
        .map_err(GrpcError::Transport)?;
    let mut c = call::start(
        &send,
        &authority,
        path::SUBSCRIBE_KV_EVENTS,
        &SubscribeKvEventsRequest {
            start_sequence_number: 0,
            load_records_before_first_batch: false,
        },
    )
    .await?;
    while let Some(batch) = c.next::<KvEventBatch>().await? {
        feeds.apply(&batch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpc_proto::common::{
        KvBlock, KvBlocksRemoved, KvBlocksStored, KvCacheCleared, KvCacheEvent,
    };

    fn stored(parent: Option<i64>, blocks: &[(i64, std::ops::Range<u32>)]) -> KvCacheEvent {
        KvCacheEvent {
            event_id: 1,
            data: Some(kv_cache_event::Data::Stored(KvBlocksStored {
                blocks: blocks
                    .iter()
                    .map(|(h, ids)| KvBlock {
                        block_hash: *h,
                        token_ids: ids.clone().collect(),
                        block_size: ids.len() as i32,
                        ..Default::default()
                    })
                    .collect(),
                parent_block_hash: parent,
                ..Default::default()
            })),
        }
    }

    fn batch(seq: u64, rank: Option<i32>, events: Vec<KvCacheEvent>) -> KvEventBatch {
        KvEventBatch {
            sequence_number: seq,
            dp_rank: rank,
            events,
            ..Default::default()
        }
    }

    #[test]
    fn batches_feed_the_rank_they_name_and_a_gap_is_an_error() {
        let index = KvIndex::new(8);
        let targets: Targets = vec![(Some(0), 4), (Some(1), 5)];
        let mut feeds = Feeds::new(&index, &targets);
        feeds
            .apply(&batch(
                7,
                Some(1),
                vec![stored(None, &[(1, 0..16), (2, 16..32)])],
            ))
            .unwrap();
        assert_eq!(index.held(5), Some(2));
        assert_eq!(index.held(4), None, "rank 0 has said nothing yet");
        feeds
            .apply(&batch(
                8,
                Some(1),
                vec![KvCacheEvent {
                    event_id: 2,
                    data: Some(kv_cache_event::Data::Removed(KvBlocksRemoved {
                        block_hashes: vec![2],
                        ..Default::default()
                    })),
                }],
            ))
            .unwrap();
        assert_eq!(index.held(5), Some(1));
        // A load-only heartbeat repeats the sequence and is no gap.
        let mut heartbeat = batch(8, Some(1), vec![]);
        heartbeat.load = Some(grpc_proto::common::EngineLoad {
            load_only: true,
            ..Default::default()
        });
        feeds.apply(&heartbeat).unwrap();
        assert!(feeds.apply(&batch(10, Some(1), vec![])).is_err());
        feeds
            .apply(&batch(
                1,
                Some(0),
                vec![
                    stored(None, &[(9, 0..16)]),
                    KvCacheEvent {
                        event_id: 3,
                        data: Some(kv_cache_event::Data::Cleared(KvCacheCleared::default())),
                    },
                ],
            ))
            .unwrap();
        assert_eq!(index.held(4), Some(0));
        drop(feeds);
        assert_eq!(
            index.exact(),
            0,
            "a lost subscription goes back to guessing"
        );
        assert!(index.is_empty());
    }

    #[test]
    fn blocks_under_an_adapter_or_salt_are_not_the_prompt_s_blocks() {
        let index = KvIndex::new(2);
        let targets: Targets = vec![(None, 0)];
        let mut feeds = Feeds::new(&index, &targets);
        let mut salted = stored(None, &[(1, 0..16)]);
        if let Some(kv_cache_event::Data::Stored(s)) = &mut salted.data {
            s.cache_salt = Some("tenant-a".into());
        }
        feeds.apply(&batch(1, None, vec![salted])).unwrap();
        assert_eq!(index.held(0), Some(0));
        feeds
            .apply(&batch(2, None, vec![stored(None, &[(1, 0..16)])]))
            .unwrap();
        assert_eq!(index.held(0), Some(1));
    }
}
