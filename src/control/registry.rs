//! Worker membership and health, owned by the control plane: every worker that was
//! configured, added through the admin API or discovered, its slot on the load board, and
//! its active-health state. Each change publishes a new worker-set epoch (the routable
//! workers: healthy ones) for the shards to adopt.

use std::sync::Arc;
use std::time::Duration;

use shards::breaker::Breakers;
use shards::metrics::Metrics;
use shards::route::{host_url, parse_worker_url, Protocol, Worker, WorkerRole, WorkerSet};
use shards::sync::{Directory, LoadBoard};

use super::membership::Role;

/// Active health of one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not checked yet (or never answered since it was added): not routable.
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn name(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Off: every worker is routable as soon as it is added.
    pub enabled: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub endpoint: String,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    /// 0: workers are routable at once, before their first check.
    pub startup_timeout: Duration,
    /// While starting, unknown workers are checked this often.
    pub startup_check_interval: Duration,
}

pub struct Entry {
    pub worker: Arc<Worker>,
    pub role: Role,
    pub health: Health,
    ok_streak: u32,
    fail_streak: u32,
    pub last_error: Option<String>,
}

pub struct Registry {
    directory: Arc<Directory>,
    board: Arc<LoadBoard>,
    breakers: Arc<Breakers>,
    metrics: Arc<Metrics>,
    pub health: HealthConfig,
    /// In the order workers were added.
    entries: Vec<Entry>,
    epoch: u64,
    /// `--intra-node-data-parallel-size`: how many ranks a rank-less URL added at run time
    /// (admin API, discovery) becomes; 1 leaves URLs as given.
    dp_size: u32,
    /// The epoch of the last published set, for control-plane tasks that follow the set.
    published: tokio::sync::watch::Sender<u64>,
    /// Whether the router loaded a model at start (it had a gRPC worker): gRPC workers
    /// added at run time need its tokenizer.
    grpc_ready: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AddError {
    Exists,
    Invalid(String),
    Full(usize),
}

impl Registry {
    pub fn new(
        directory: Arc<Directory>,
        board: Arc<LoadBoard>,
        breakers: Arc<Breakers>,
        metrics: Arc<Metrics>,
        health: HealthConfig,
    ) -> Self {
        let epoch = directory.epoch();
        Registry {
            directory,
            board,
            breakers,
            metrics,
            health,
            entries: Vec::new(),
            epoch,
            dp_size: 1,
            published: tokio::sync::watch::channel(epoch).0,
            grpc_ready: false,
        }
    }

    /// Whether gRPC workers can be added at run time (a model was loaded at start).
    pub fn set_grpc_ready(&mut self, ready: bool) {
        self.grpc_ready = ready;
    }

    /// Changes whenever a new worker set is published.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Sets how many data-parallel ranks a rank-less URL added at run time becomes
    /// (`--intra-node-data-parallel-size`; 0 and 1 both mean no expansion).
    pub fn set_dp_size(&mut self, size: u32) {
        self.dp_size = size.max(1);
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, url: &str) -> Option<&Entry> {
        let url = normalize(url);
        self.entries.iter().find(|e| e.worker.url == url)
    }

    /// Adds one routing target, `url` as given (not yet published: call `publish`). With
    /// health checks on, it is routable only after its first good check. The start-up
    /// workers come here already expanded to their ranks (`dp::expand`); run-time sources
    /// use `add_server`.
    pub fn add(&mut self, url: &str, role: Role) -> Result<&Entry, AddError> {
        if self.get(url).is_some() {
            return Err(AddError::Exists);
        }
        let slot = self.free_slot().ok_or(AddError::Full(self.board.slots()))?;
        let worker = parse_worker_url(url, slot).map_err(|e| AddError::Invalid(e.to_string()))?;
        Ok(self.insert(worker, role))
    }

    /// Adds the targets `url` names, as the admin API and discovery announce them (not yet
    /// published): with a data-parallel size N > 1 a rank-less `http://h:p` is its N ranks
    /// `http://h:p@0` .. `@N-1`, all or none (`Full` when the table cannot hold them all,
    /// `Exists` when the server or any of its ranks is there already); a URL with `@rank`,
    /// or any URL when N is 1, is the one target `add` makes. Each rank gets `role` (a
    /// prefill worker's bootstrap port included). Returns the URLs added.
    ///
    /// N is the flag's value: unlike at start (`dp::expand`), the server's
    /// `/get_server_info` is not asked, since that probe is blocking std I/O and this runs
    /// on the control plane's tokio thread.
    pub fn add_server(&mut self, url: &str, role: Role) -> Result<Vec<String>, AddError> {
        let mut base = parse_worker_url(url, 0).map_err(|e| AddError::Invalid(e.to_string()))?;
        if base.protocol == Protocol::Grpc && !self.grpc_ready {
            return Err(AddError::Invalid(format!(
                "{url}: a gRPC worker needs the model's tokenizer, which the router loads at \
                 start from its gRPC workers; this one was started with none (give it a \
                 grpc:// worker in --worker-urls)"
            )));
        }
        if base.dp_rank.is_some() || self.dp_size <= 1 {
            if self.get(&base.url).is_some() {
                return Err(AddError::Exists);
            }
            base.slot = self.free_slot().ok_or(AddError::Full(self.board.slots()))?;
            return Ok(vec![self.insert(base, role).worker.url.clone()]);
        }
        if !self.named(&base.url).is_empty() {
            return Err(AddError::Exists);
        }
        let slots = self
            .free_slots(self.dp_size as usize)
            .ok_or(AddError::Full(self.board.slots()))?;
        let mut added = Vec::with_capacity(slots.len());
        for (rank, slot) in (0..self.dp_size).zip(slots) {
            let worker = Worker {
                url: format!("{}@{rank}", base.url),
                authority: base.authority.clone(),
                addr: base.addr,
                slot,
                role: WorkerRole::Regular,
                dp_rank: Some(rank),
                protocol: base.protocol,
            };
            added.push(self.insert(worker, role.clone()).worker.url.clone());
        }
        Ok(added)
    }

    /// Makes `worker` (in a free slot) a member with `role`.
    fn insert(&mut self, mut worker: Worker, role: Role) -> &Entry {
        let slot = worker.slot;
        worker.role = match role {
            Role::Regular => WorkerRole::Regular,
            Role::Prefill { .. } => WorkerRole::Prefill,
            Role::Decode => WorkerRole::Decode,
        };
        self.board.reset_slot(slot);
        self.breakers.assign(slot);
        self.metrics.rebase_slot(slot);
        let routable_at_once = !self.health.enabled || self.health.startup_timeout.is_zero();
        self.entries.push(Entry {
            worker: Arc::new(worker),
            role,
            health: if routable_at_once {
                Health::Healthy
            } else {
                Health::Unknown
            },
            ok_streak: 0,
            fail_streak: 0,
            last_error: None,
        });
        self.entries.last().expect("just pushed")
    }

    /// The members `url` names: with `@rank`, that target; without, the server's targets
    /// (itself or all its ranks).
    pub fn named(&self, url: &str) -> Vec<&Entry> {
        let url = normalize(url);
        let has_rank = host_url(url) != url;
        self.entries
            .iter()
            .filter(|e| {
                if has_rank {
                    e.worker.url == url
                } else {
                    e.worker.host_url() == url
                }
            })
            .collect()
    }

    /// Removes the members `url` names (see `named`: a rank-less URL removes all the
    /// server's ranks, `url@r` just that rank), not yet published; returns them in the
    /// order they were added. Their requests in flight finish.
    pub fn remove_server(&mut self, url: &str) -> Vec<Entry> {
        let urls: Vec<String> = self
            .named(url)
            .iter()
            .map(|e| e.worker.url.clone())
            .collect();
        let mut removed = Vec::with_capacity(urls.len());
        let mut i = 0;
        while i < self.entries.len() {
            if urls.contains(&self.entries[i].worker.url) {
                removed.push(self.entries.remove(i));
            } else {
                i += 1;
            }
        }
        removed
    }

    /// The lowest slot no member holds and nothing is in flight on (a removed worker's
    /// slot is reused only once its last request ended).
    fn free_slot(&self) -> Option<usize> {
        self.free_slots(1).map(|s| s[0])
    }

    /// The `n` lowest free slots (as `free_slot`), or `None` if there are fewer.
    fn free_slots(&self, n: usize) -> Option<Vec<usize>> {
        let mut used = vec![false; self.board.slots()];
        for e in &self.entries {
            used[e.worker.slot] = true;
        }
        let free: Vec<usize> = (0..used.len())
            .filter(|&s| !used[s] && self.board.in_flight(s) == 0)
            .take(n)
            .collect();
        (free.len() == n).then_some(free)
    }

    /// The first worker served by the server at `host` (a URL without `@rank`).
    pub fn get_host(&self, host: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.worker.host_url() == host)
    }

    /// Records a health check of the server at `host` (a URL without `@rank`) for every
    /// worker it serves (its data-parallel ranks are checked once, together); returns the
    /// new state if one changed.
    pub fn record_check(&mut self, host: &str, result: Result<(), String>) -> Option<Health> {
        let mut changed = None;
        for i in 0..self.entries.len() {
            if self.entries[i].worker.host_url() == host {
                changed = self.record_one(i, result.clone()).or(changed);
            }
        }
        changed
    }

    fn record_one(&mut self, i: usize, result: Result<(), String>) -> Option<Health> {
        let cfg = self.health.clone();
        let e = &mut self.entries[i];
        let before = e.health;
        match result {
            Ok(()) => {
                e.ok_streak += 1;
                e.fail_streak = 0;
                e.last_error = None;
                let needed = if before == Health::Unknown {
                    1
                } else {
                    cfg.success_threshold
                };
                if before != Health::Healthy && e.ok_streak >= needed {
                    e.health = Health::Healthy;
                }
            }
            Err(err) => {
                e.fail_streak += 1;
                e.ok_streak = 0;
                e.last_error = Some(err);
                if before == Health::Healthy && e.fail_streak >= cfg.failure_threshold {
                    e.health = Health::Unhealthy;
                }
            }
        }
        let (now, slot) = (e.health, e.worker.slot);
        if before == Health::Unhealthy && now == Health::Healthy {
            // Back after failing its checks (typically restarted): what its breaker counted
            // was about the process that died.
            self.breakers.reset(slot);
        }
        (now != before).then_some(now)
    }

    /// Publishes the routable workers (healthy ones) as a new epoch.
    pub fn publish(&mut self) {
        self.epoch += 1;
        let members = self
            .entries
            .iter()
            .filter(|e| e.health == Health::Healthy)
            .map(|e| e.worker.clone())
            .collect();
        self.directory.publish(WorkerSet::new(self.epoch, members));
        self.published.send_replace(self.epoch);
    }

    /// In-flight requests on `w` from every shard.
    pub fn load(&self, w: &Worker) -> u32 {
        self.board.in_flight(w.slot)
    }

    /// What `w` last reported about its load (`/metrics` gauges or its in-band
    /// `endpoint-load-metrics` header), in vLLM's names; `null` where it never said.
    pub fn reported_load(&self, w: &Worker) -> serde_json::Value {
        serde_json::json!({
            "num_requests_running": self.board.running(w.slot),
            "num_requests_waiting": self.board.waiting(w.slot),
            "kv_cache_usage_perc": self.board.kv_usage(w.slot),
        })
    }

    pub fn breaker_state(&self, w: &Worker) -> shards::breaker::BreakerState {
        self.breakers.state(w.slot)
    }
}

/// Worker URLs compare without a trailing slash.
pub fn normalize(url: &str) -> &str {
    url.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use shards::breaker::BreakerConfig;

    fn registry(enabled: bool) -> Registry {
        let board = Arc::new(LoadBoard::new(1, 4));
        Registry::new(
            Arc::new(Directory::new(WorkerSet::default())),
            board,
            Arc::new(Breakers::new(4, BreakerConfig::default())),
            Arc::new(Metrics::new(1, 4)),
            HealthConfig {
                enabled,
                interval: Duration::from_secs(60),
                timeout: Duration::from_secs(5),
                endpoint: "/health".into(),
                failure_threshold: 3,
                success_threshold: 2,
                startup_timeout: Duration::from_secs(600),
                startup_check_interval: Duration::from_secs(1),
            },
        )
    }

    #[test]
    fn a_new_worker_is_routable_after_its_first_good_check() {
        let mut r = registry(true);
        r.add("http://127.0.0.1:9001", Role::Regular).unwrap();
        r.publish();
        assert!(r.directory.current().is_empty());
        assert_eq!(
            r.record_check("http://127.0.0.1:9001", Err("refused".into())),
            None
        );
        assert_eq!(
            r.record_check("http://127.0.0.1:9001", Ok(())),
            Some(Health::Healthy)
        );
        r.publish();
        assert_eq!(r.directory.current().len(), 1);
    }

    #[test]
    fn thresholds_decide_unhealthy_and_back() {
        let mut r = registry(true);
        let u = "http://127.0.0.1:9001";
        r.add(u, Role::Regular).unwrap();
        r.record_check(u, Ok(()));
        assert_eq!(r.record_check(u, Err("x".into())), None);
        assert_eq!(r.record_check(u, Err("x".into())), None);
        assert_eq!(r.record_check(u, Err("x".into())), Some(Health::Unhealthy));
        assert_eq!(r.record_check(u, Ok(())), None, "needs two successes");
        assert_eq!(r.record_check(u, Ok(())), Some(Health::Healthy));
    }

    #[test]
    fn a_worker_back_from_unhealthy_starts_with_a_closed_breaker() {
        let mut r = registry(true);
        let u = "http://127.0.0.1:9001";
        let slot = r.add(u, Role::Regular).unwrap().worker.slot;
        r.record_check(u, Ok(()));
        for _ in 0..10 {
            r.breakers.failure(slot, false, u);
        }
        assert_eq!(r.breakers.state(slot).name(), "open");
        for _ in 0..3 {
            r.record_check(u, Err("refused".into()));
        }
        assert_eq!(r.breakers.state(slot).name(), "open", "unhealthy keeps it");
        r.record_check(u, Ok(()));
        r.record_check(u, Ok(()));
        assert_eq!(r.breakers.state(slot).name(), "closed");
    }

    #[test]
    fn slots_are_reused_only_when_nothing_is_in_flight() {
        let mut r = registry(false);
        r.add("http://127.0.0.1:9001", Role::Regular).unwrap();
        r.add("http://127.0.0.1:9002", Role::Regular).unwrap();
        assert_eq!(r.get("http://127.0.0.1:9001").unwrap().worker.slot, 0);
        r.board.started(0, 0);
        assert_eq!(r.remove_server("http://127.0.0.1:9001/").len(), 1);
        let s = r
            .add("http://127.0.0.1:9003", Role::Regular)
            .unwrap()
            .worker
            .slot;
        assert_eq!(s, 2, "slot 0 still has a request in flight");
        r.board.finished(0, 0);
        let s = r
            .add("http://127.0.0.1:9004", Role::Regular)
            .unwrap()
            .worker
            .slot;
        assert_eq!(s, 0);
        assert_eq!(
            r.add("http://127.0.0.1:9004", Role::Regular).err(),
            Some(AddError::Exists)
        );
        r.add("http://127.0.0.1:9005", Role::Regular).unwrap();
        assert_eq!(
            r.add("http://127.0.0.1:9006", Role::Regular).err(),
            Some(AddError::Full(4))
        );
    }

    fn urls(r: &Registry) -> Vec<&str> {
        r.entries().iter().map(|e| e.worker.url.as_str()).collect()
    }

    #[test]
    fn a_rank_less_server_added_at_run_time_is_its_ranks() {
        let mut r = registry(false);
        r.set_dp_size(2);
        let u = "http://127.0.0.1:9001";
        let added = r
            .add_server(
                &format!("{u}/"),
                Role::Prefill {
                    bootstrap_port: Some(8998),
                },
            )
            .unwrap();
        assert_eq!(added, [format!("{u}@0"), format!("{u}@1")]);
        assert_eq!(urls(&r), [format!("{u}@0"), format!("{u}@1")]);
        for (rank, e) in r.entries().iter().enumerate() {
            assert_eq!(e.worker.dp_rank, Some(rank as u32));
            assert_eq!(e.worker.slot, rank);
            assert_eq!(e.worker.host_url(), u);
            assert_eq!(e.worker.role, WorkerRole::Prefill);
            assert_eq!(
                e.role,
                Role::Prefill {
                    bootstrap_port: Some(8998)
                }
            );
        }
        assert_eq!(r.add_server(u, Role::Regular).err(), Some(AddError::Exists));
        assert_eq!(
            r.add_server(&format!("{u}@1"), Role::Regular).err(),
            Some(AddError::Exists)
        );
        // An explicit rank is one target, as given.
        let added = r.add_server(&format!("{u}@7"), Role::Decode).unwrap();
        assert_eq!(added, [format!("{u}@7")]);
        assert_eq!(r.get(&format!("{u}@7")).unwrap().worker.dp_rank, Some(7));
        // Rank-less: a server some rank of which is there already is there.
        assert_eq!(
            r.add_server("http://127.0.0.1:9002@0", Role::Regular)
                .unwrap(),
            ["http://127.0.0.1:9002@0"]
        );
        assert_eq!(
            r.add_server("http://127.0.0.1:9002", Role::Regular).err(),
            Some(AddError::Exists)
        );
        assert!(matches!(
            r.add_server("ftp://x", Role::Regular),
            Err(AddError::Invalid(_))
        ));
    }

    #[test]
    fn a_server_whose_ranks_do_not_all_fit_adds_none() {
        let mut r = registry(false);
        r.set_dp_size(3);
        r.add_server("http://127.0.0.1:9001@0", Role::Regular)
            .unwrap();
        r.add_server("http://127.0.0.1:9001@1", Role::Regular)
            .unwrap();
        assert_eq!(
            r.add_server("http://127.0.0.1:9002", Role::Regular).err(),
            Some(AddError::Full(4))
        );
        assert_eq!(r.entries().len(), 2);
        // Two slots free: two ranks fit one at a time, not three at once.
        r.set_dp_size(2);
        r.add_server("http://127.0.0.1:9002", Role::Regular)
            .unwrap();
        assert_eq!(r.entries().len(), 4);
    }

    #[test]
    fn size_one_adds_urls_as_given() {
        let mut r = registry(false);
        r.set_dp_size(1);
        let added = r
            .add_server("http://127.0.0.1:9001", Role::Regular)
            .unwrap();
        assert_eq!(added, ["http://127.0.0.1:9001"]);
        assert_eq!(r.entries()[0].worker.dp_rank, None);
    }

    #[test]
    fn removing_a_rank_less_url_removes_all_its_ranks() {
        let mut r = registry(false);
        r.set_dp_size(2);
        let u = "http://127.0.0.1:9001";
        r.add_server(u, Role::Regular).unwrap();
        r.add_server("http://127.0.0.1:9002", Role::Regular)
            .unwrap();
        let gone = r.remove_server(&format!("{u}@1"));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].worker.url, format!("{u}@1"));
        assert!(r.remove_server(&format!("{u}@1")).is_empty());
        r.add_server(&format!("{u}@1"), Role::Regular).unwrap();
        let gone: Vec<String> = r
            .remove_server(&format!("{u}/"))
            .into_iter()
            .map(|e| e.worker.url.clone())
            .collect();
        assert_eq!(gone, [format!("{u}@0"), format!("{u}@1")]);
        assert_eq!(
            urls(&r),
            ["http://127.0.0.1:9002@0", "http://127.0.0.1:9002@1"]
        );
        // Another server whose address starts the same is not this one's rank.
        assert!(r.remove_server("http://127.0.0.1:900").is_empty());
        assert!(r.remove_server("http://127.0.0.1:1").is_empty());
    }

    #[test]
    fn ranks_share_one_health_check() {
        let mut r = registry(true);
        r.set_dp_size(2);
        r.add_server("http://127.0.0.1:9001", Role::Regular)
            .unwrap();
        assert_eq!(
            r.record_check("http://127.0.0.1:9001", Ok(())),
            Some(Health::Healthy)
        );
        assert!(r.entries().iter().all(|e| e.health == Health::Healthy));
        r.publish();
        assert_eq!(r.directory.current().len(), 2);
    }
}
