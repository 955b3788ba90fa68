//! [`RemoteTier`]: the remote store behind calls that never wait. The tier
//! runs its network work on a runtime of its own (one thread), so a
//! scheduler on any executor, or none, starts a lookup and polls it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use pagedkv_core::BlockHash;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::value::{self, BadValue, Codec};
use super::{
    KeyScheme, MAX_LOOKUP_KEYS, Namespace, PutOutcome, RedisStore, RemoteConfig, RemoteStore,
    StoreError,
};

/// Whether the tier is serving.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub enum TierState {
    /// Lookups and writes go to the store.
    On,
    /// Turned off after repeated failures: lookups miss at once, writes are
    /// skipped, and a probe with backoff turns it on again.
    Off,
}

/// Why a lookup returned fewer blocks than it asked for.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum LookupEnd {
    /// Every key asked for was found and checked.
    Complete,
    /// The chain continues no further in the store.
    Missing,
    /// A value failed its checks (it was deleted and counted).
    Bad(BadValue),
    /// An operation passed its timeout.
    Timeout,
    /// The store failed.
    Error(StoreError),
    /// The tier is off.
    Off,
}

/// What a lookup found: the leading blocks of the chain asked for, each
/// checked whole, in chain order.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// `(block key, payload)` for the leading run found.
    pub blocks: Vec<(BlockHash, Vec<u8>)>,
    /// Why it stopped where it did.
    pub end: LookupEnd,
}

/// A lookup under way. Dropping it abandons the result (the fetch stops
/// before its next batch); nothing is published by the tier itself.
#[derive(Debug)]
pub struct Lookup {
    rx: Option<oneshot::Receiver<Fetched>>,
    ready: Option<Fetched>,
}

fn lost() -> Fetched {
    Fetched {
        blocks: Vec::new(),
        end: LookupEnd::Error(StoreError::Io("remote tier shut down".into())),
    }
}

impl Lookup {
    fn ready(f: Fetched) -> Self {
        Self {
            rx: None,
            ready: Some(f),
        }
    }

    /// The result if it has arrived; `None` while pending. Never waits.
    pub fn poll(&mut self) -> Option<Fetched> {
        if let Some(f) = self.ready.take() {
            return Some(f);
        }
        let rx = self.rx.as_mut()?;
        match rx.try_recv() {
            Ok(f) => {
                self.rx = None;
                Some(f)
            }
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                self.rx = None;
                Some(lost())
            }
        }
    }

    /// Waits for the result: bounded by the operations' timeouts, at most
    /// `(2 + keys / fetch_batch) * op_timeout`.
    pub async fn wait(mut self) -> Fetched {
        if let Some(f) = self.ready.take() {
            return f;
        }
        match self.rx.take() {
            Some(rx) => rx.await.unwrap_or_else(|_| lost()),
            None => lost(),
        }
    }

    /// Waits for the result from a thread outside any async runtime.
    pub fn wait_blocking(mut self) -> Fetched {
        if let Some(f) = self.ready.take() {
            return f;
        }
        match self.rx.take() {
            Some(rx) => rx.blocking_recv().unwrap_or_else(|_| lost()),
            None => lost(),
        }
    }
}

/// The tier's counters (blocks unless named bytes).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize)]
pub struct RemoteStats {
    /// Lookups started.
    pub lookups: u64,
    /// Blocks found, checked and returned.
    pub hits: u64,
    /// Blocks asked for and not returned.
    pub misses: u64,
    /// Values that failed their checks (each deleted).
    pub bad_values: u64,
    /// Operations past their timeout.
    pub timeouts: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Values written.
    pub written: u64,
    /// Writes that found the key already present.
    pub existed: u64,
    /// Writes the store refused for lack of memory.
    pub refused: u64,
    /// Writes not attempted: tier off, or the bytes-in-flight cap reached.
    pub skipped: u64,
    /// Writes lost to a failed or timed-out operation.
    pub write_failures: u64,
    /// Times the tier turned itself off.
    pub disabled: u64,
    /// Times a probe turned it back on.
    pub recovered: u64,
    /// Value bytes read.
    pub bytes_read: u64,
    /// Value bytes written.
    pub bytes_written: u64,
}

impl std::ops::AddAssign for RemoteStats {
    /// Sums the counters of several tiers (one per replica).
    fn add_assign(&mut self, o: Self) {
        self.lookups += o.lookups;
        self.hits += o.hits;
        self.misses += o.misses;
        self.bad_values += o.bad_values;
        self.timeouts += o.timeouts;
        self.errors += o.errors;
        self.written += o.written;
        self.existed += o.existed;
        self.refused += o.refused;
        self.skipped += o.skipped;
        self.write_failures += o.write_failures;
        self.disabled += o.disabled;
        self.recovered += o.recovered;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
    }
}

#[derive(Default)]
struct Counters {
    lookups: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    bad_values: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
    written: AtomicU64,
    existed: AtomicU64,
    refused: AtomicU64,
    skipped: AtomicU64,
    write_failures: AtomicU64,
    disabled: AtomicU64,
    recovered: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Relaxed);
}

struct Shared {
    store: Arc<dyn RemoteStore>,
    ns: Namespace,
    scheme: KeyScheme,
    fingerprint: u64,
    codec: Codec,
    /// The values' MAC key (from the cluster secret).
    mac: Option<[u8; 16]>,
    cfg: RemoteConfig,
    on: AtomicBool,
    failures: AtomicU32,
    /// The next probe's first delay, in microseconds.
    probe_from: AtomicU64,
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    c: Counters,
}

/// The remote tier: see the [module](super) documentation.
pub struct RemoteTier {
    shared: Arc<Shared>,
    writes: mpsc::UnboundedSender<(Vec<u8>, Vec<u8>)>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for RemoteTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTier")
            .field("namespace", &self.shared.ns)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Drop for RemoteTier {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl RemoteTier {
    /// A tier on the Redis server at `url` (connected lazily: a server down
    /// now is found by the probe when it comes up).
    pub fn redis(
        url: &str,
        ns: Namespace,
        scheme: KeyScheme,
        codec: Codec,
        cfg: RemoteConfig,
    ) -> Result<Self, StoreError> {
        let rt = runtime()?;
        let store = {
            let _in = rt.enter();
            RedisStore::open(url, cfg.op_timeout)?
        };
        Ok(Self::start(rt, Arc::new(store), ns, scheme, codec, cfg))
    }

    /// A tier on any store.
    pub fn new(
        store: Arc<dyn RemoteStore>,
        ns: Namespace,
        scheme: KeyScheme,
        codec: Codec,
        cfg: RemoteConfig,
    ) -> Result<Self, StoreError> {
        Ok(Self::start(runtime()?, store, ns, scheme, codec, cfg))
    }

    fn start(
        rt: tokio::runtime::Runtime,
        store: Arc<dyn RemoteStore>,
        ns: Namespace,
        scheme: KeyScheme,
        codec: Codec,
        cfg: RemoteConfig,
    ) -> Self {
        let shared = Arc::new(Shared {
            store,
            fingerprint: ns.fingerprint(),
            mac: scheme.mac_key(),
            ns,
            scheme,
            codec,
            cfg,
            on: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            probe_from: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            c: Counters::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        rt.spawn(writer(shared.clone(), rx));
        Self {
            shared,
            writes: tx,
            rt: Some(rt),
        }
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) {
        if let Some(rt) = &self.rt {
            rt.spawn(f);
        }
    }

    /// Whether the tier is serving.
    pub fn state(&self) -> TierState {
        if self.shared.on.load(Relaxed) {
            TierState::On
        } else {
            TierState::Off
        }
    }

    /// The namespace this tier reads and writes.
    pub fn namespace(&self) -> &Namespace {
        &self.shared.ns
    }

    /// The remote key of `key` (for operators and tests).
    pub fn remote_key(&self, key: BlockHash) -> Vec<u8> {
        self.shared
            .scheme
            .key(&self.shared.ns, self.shared.codec, key)
    }

    /// Starts a lookup of the chained `keys` (the first
    /// [`MAX_LOOKUP_KEYS`]): one round trip finds the leading run present,
    /// then its values are fetched in pipelined batches and checked. Never
    /// waits; a tier that is off answers at once with nothing.
    pub fn lookup(&self, keys: &[BlockHash]) -> Lookup {
        let s = &self.shared;
        add(&s.c.lookups, 1);
        let keys: Vec<BlockHash> = keys.iter().take(MAX_LOOKUP_KEYS).copied().collect();
        if !s.on.load(Relaxed) || keys.is_empty() {
            add(&s.c.misses, keys.len());
            let end = if keys.is_empty() {
                LookupEnd::Complete
            } else {
                LookupEnd::Off
            };
            return Lookup::ready(Fetched {
                blocks: Vec::new(),
                end,
            });
        }
        let (tx, rx) = oneshot::channel();
        let shared = s.clone();
        self.spawn(async move {
            let f = fetch(&shared, &keys, &tx).await;
            add(&shared.c.hits, f.blocks.len());
            add(&shared.c.misses, keys.len() - f.blocks.len());
            let _ = tx.send(f);
        });
        Lookup {
            rx: Some(rx),
            ready: None,
        }
    }

    /// Queues the block with `key` and bytes `payload` for writing (unless
    /// present). Never waits. Returns false, counted as skipped, when the tier
    /// is off or the bytes in flight would pass the cap.
    pub fn store(&self, key: BlockHash, payload: &[u8]) -> bool {
        let s = &self.shared;
        let v = value::encode(key, s.fingerprint, s.codec, s.mac, payload);
        let n = v.len();
        let cap = s.cfg.max_bytes_in_flight;
        let admitted = s.on.load(Relaxed)
            && s.in_flight
                .fetch_update(Relaxed, Relaxed, |f| (f + n <= cap).then_some(f + n))
                .is_ok();
        if !admitted {
            add(&s.c.skipped, 1);
            return false;
        }
        s.queued.fetch_add(1, Relaxed);
        if self.writes.send((self.remote_key(key), v)).is_err() {
            s.queued.fetch_sub(1, Relaxed);
            s.in_flight.fetch_sub(n, Relaxed);
            add(&s.c.skipped, 1);
            return false;
        }
        true
    }

    /// Writes queued or under way.
    pub fn pending_writes(&self) -> usize {
        self.shared.queued.load(Relaxed)
    }

    /// Waits (from outside a runtime) until queued writes are done, or
    /// `timeout`; returns whether they are.
    pub fn flush_blocking(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while self.pending_writes() > 0 {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// The counters so far.
    pub fn stats(&self) -> RemoteStats {
        let c = &self.shared.c;
        let g = |a: &AtomicU64| a.load(Relaxed);
        RemoteStats {
            lookups: g(&c.lookups),
            hits: g(&c.hits),
            misses: g(&c.misses),
            bad_values: g(&c.bad_values),
            timeouts: g(&c.timeouts),
            errors: g(&c.errors),
            written: g(&c.written),
            existed: g(&c.existed),
            refused: g(&c.refused),
            skipped: g(&c.skipped),
            write_failures: g(&c.write_failures),
            disabled: g(&c.disabled),
            recovered: g(&c.recovered),
            bytes_read: g(&c.bytes_read),
            bytes_written: g(&c.bytes_written),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, StoreError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("pagedkv-remote")
        .enable_all()
        .build()
        .map_err(|e| StoreError::Io(e.to_string()))
}

/// Runs one store operation under the timeout, keeping the tier's health.
async fn op<T>(
    s: &Arc<Shared>,
    f: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, LookupEnd> {
    match tokio::time::timeout(s.cfg.op_timeout, f).await {
        Ok(Ok(v)) => {
            s.failures.store(0, Relaxed);
            Ok(v)
        }
        Ok(Err(StoreError::Timeout)) | Err(_) => {
            add(&s.c.timeouts, 1);
            failed(s);
            Err(LookupEnd::Timeout)
        }
        Ok(Err(e)) => {
            add(&s.c.errors, 1);
            failed(s);
            Err(LookupEnd::Error(e))
        }
    }
}

/// One more consecutive failure: past the limit the tier turns off and a
/// probe starts.
fn failed(s: &Arc<Shared>) {
    let n = s.failures.fetch_add(1, Relaxed) + 1;
    if n >= s.cfg.errors_to_disable && s.on.swap(false, Relaxed) {
        add(&s.c.disabled, 1);
        tokio::spawn(probe(s.clone()));
    }
}

/// Pings with doubling delays until the store answers, then turns the tier
/// on. The first delay is where the last probe left off, halved (a server
/// that keeps failing is not pinged every `probe_min`).
async fn probe(s: Arc<Shared>) {
    let mut delay = Duration::from_micros(s.probe_from.load(Relaxed)).max(s.cfg.probe_min);
    loop {
        tokio::time::sleep(delay).await;
        if let Ok(Ok(())) = tokio::time::timeout(s.cfg.op_timeout, s.store.ping()).await {
            let next = (delay / 2).max(s.cfg.probe_min);
            s.probe_from
                .store(u64::try_from(next.as_micros()).unwrap_or(u64::MAX), Relaxed);
            s.failures.store(0, Relaxed);
            s.on.store(true, Relaxed);
            add(&s.c.recovered, 1);
            return;
        }
        delay = (delay * 2).min(s.cfg.probe_max);
    }
}

/// The lookup of `keys`; stops early (returning nothing anyone reads)
/// once the `Lookup` waiting on `tx` is dropped.
async fn fetch(s: &Arc<Shared>, keys: &[BlockHash], tx: &oneshot::Sender<Fetched>) -> Fetched {
    let rkeys: Vec<Vec<u8>> = keys
        .iter()
        .map(|&k| s.scheme.key(&s.ns, s.codec, k))
        .collect();
    let mut blocks = Vec::new();
    // A store answering more than it was asked is held to the keys asked.
    let n = match op(s, s.store.leading(&rkeys)).await {
        Ok(n) => n.min(keys.len()),
        Err(end) => return Fetched { blocks, end },
    };
    let batch = s.cfg.fetch_batch.max(1);
    let mut at = 0;
    while at < n {
        if tx.is_closed() {
            // Abandoned: fetch no more.
            return Fetched {
                blocks,
                end: LookupEnd::Missing,
            };
        }
        let to = (at + batch).min(n);
        let vals = match op(s, s.store.get(&rkeys[at..to])).await {
            Ok(v) => v,
            Err(end) => return Fetched { blocks, end },
        };
        // A short answer ends the chain where it stops.
        let answered = vals.len().min(to - at);
        for (i, v) in vals.into_iter().take(answered).enumerate() {
            let key = keys[at + i];
            let Some(mut v) = v else {
                // Evicted (or deleted) since the existence check.
                return Fetched {
                    blocks,
                    end: LookupEnd::Missing,
                };
            };
            match value::decode(&v, key, s.fingerprint, s.codec, s.mac) {
                Ok(_) => {
                    add(&s.c.bytes_read, v.len());
                    v.drain(..value::HEADER_LEN);
                    blocks.push((key, v));
                }
                Err(bad) => {
                    add(&s.c.bad_values, 1);
                    let _ = op(s, s.store.delete(&rkeys[at + i..=at + i])).await;
                    return Fetched {
                        blocks,
                        end: LookupEnd::Bad(bad),
                    };
                }
            }
        }
        if answered < to - at {
            return Fetched {
                blocks,
                end: LookupEnd::Missing,
            };
        }
        at = to;
    }
    let end = if n < keys.len() {
        LookupEnd::Missing
    } else {
        LookupEnd::Complete
    };
    Fetched { blocks, end }
}

/// Drains queued writes into pipelines of up to `fetch_batch` values.
async fn writer(s: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<(Vec<u8>, Vec<u8>)>) {
    let batch = s.cfg.fetch_batch.max(1);
    let mut items = Vec::with_capacity(batch);
    while let Some(first) = rx.recv().await {
        items.push(first);
        while items.len() < batch {
            match rx.try_recv() {
                Ok(it) => items.push(it),
                Err(_) => break,
            }
        }
        let bytes: usize = items.iter().map(|(_, v)| v.len()).sum();
        if s.on.load(Relaxed) {
            match op(&s, s.store.put_nx(&items)).await {
                Ok(outs) => {
                    for (o, (_, v)) in outs.iter().zip(&items) {
                        match o {
                            PutOutcome::Written => {
                                add(&s.c.written, 1);
                                add(&s.c.bytes_written, v.len());
                            }
                            PutOutcome::Exists => add(&s.c.existed, 1),
                            PutOutcome::Refused => add(&s.c.refused, 1),
                        }
                    }
                }
                Err(_) => add(&s.c.write_failures, items.len()),
            }
        } else {
            add(&s.c.skipped, items.len());
        }
        s.in_flight.fetch_sub(bytes, Relaxed);
        s.queued.fetch_sub(items.len(), Relaxed);
        items.clear();
    }
}
