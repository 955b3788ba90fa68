//! The manager's cache events on the wire in vLLM's format, for KV-aware
//! routers that read vLLM's KV events (NVIDIA Dynamo's, llm-d's):
//!
//! - **Frames**: a ZeroMQ PUB socket sends each batch as three frames:
//!   topic, sequence number (8 bytes, big-endian, from 0), payload.
//! - **Payload**: a msgpack `KVEventBatch` as vLLM's msgspec structs encode
//!   it: a map `{ts, events, data_parallel_rank}` whose events are maps
//!   tagged by `type`: `BlockStored{block_hashes, parent_block_hash,
//!   token_ids, block_size, lora_id, medium, lora_name}`,
//!   `BlockRemoved{block_hashes, medium}`, `AllBlocksCleared{}`. Block
//!   hashes are the core's 128-bit keys as 16 big-endian bytes; `medium` is
//!   `"GPU"` for a device, `"CPU"` for the host tier.
//! - **Replay**: a ROUTER socket answers a request holding a start sequence
//!   number (8 bytes, big-endian) with every buffered batch from there, each
//!   `[seq, payload]`, then `[-1, empty]`; the last `buffer_steps` batches
//!   are kept.
//!
//! The manager's own events map as follows: `Stored` and `Removed` one to
//! one; `Cleared` (of any tier: vLLM's event names none) and `Lost` (the
//! core's queue overflowed, so the router's mirror is incomplete) as
//! `AllBlocksCleared`, which makes the router forget this replica's blocks
//! rather than trust a mirror with holes; `Preempted` is not a cache event
//! and is not sent.
//!
//! By default this is current vLLM's encoding (msgspec structs as maps,
//! 128-bit hashes as bytes); [`WireFormat`] selects vLLM's older array
//! encoding (what NVIDIA Dynamo's reader takes) and 64-bit integer hashes.
//!
//! A replay is served by a task of its own, each send under a timeout: a
//! subscriber that asks and never reads stalls neither the live stream nor
//! other replays.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pagedkv_core::BlockHash;
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSendHalf, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::engine::{ManagerEvent, Tier};

/// The replay protocol's end-of-replay sequence number.
pub const END_SEQ: i64 = -1;

/// Where and how events are published.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// The PUB socket's address (`tcp://127.0.0.1:5557`; port 0 picks one).
    pub endpoint: String,
    /// The ROUTER socket for replay requests, if any.
    pub replay_endpoint: Option<String>,
    /// The topic frame.
    pub topic: String,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// This replica's data-parallel rank, in every batch.
    pub data_parallel_rank: Option<u32>,
    /// The encoding.
    pub format: WireFormat,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            endpoint: "tcp://127.0.0.1:5557".into(),
            replay_endpoint: Some("tcp://127.0.0.1:5558".into()),
            topic: String::new(),
            buffer_steps: 10_000,
            data_parallel_rank: None,
            format: WireFormat::default(),
        }
    }
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A socket could not bind.
    #[error("binding {endpoint}: {reason}")]
    Bind {
        /// The address.
        endpoint: String,
        /// What ZeroMQ said.
        reason: String,
    },
    /// The publisher's thread could not start.
    #[error("starting the publisher: {0}")]
    Runtime(String),
}

/// How batches are encoded. NVIDIA Dynamo's reader needs both flags
/// ([`WireFormat::DYNAMO`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireFormat {
    /// Structs as arrays (`[ts, events, data_parallel_rank]`, each event
    /// `[tag, fields...]`): vLLM's older `array_like` encoding, which NVIDIA
    /// Dynamo's reader takes. Default: maps, as current vLLM.
    pub arrays: bool,
    /// Block hashes as unsigned 64-bit integers (the key's low 64 bits),
    /// for routers that take integers only. Default: the 128-bit key as 16
    /// big-endian bytes.
    pub int_hashes: bool,
}

impl WireFormat {
    /// Current vLLM's encoding (the default).
    pub const VLLM: Self = Self {
        arrays: false,
        int_hashes: false,
    };
    /// Arrays and 64-bit integer hashes: what NVIDIA Dynamo's reader (and
    /// vLLM's older subscribers) decode.
    pub const DYNAMO: Self = Self {
        arrays: true,
        int_hashes: true,
    };
}

/// A msgpack writer in one [`WireFormat`].
struct Enc {
    out: Vec<u8>,
    fmt: WireFormat,
}

impl Enc {
    fn hash(&mut self, k: BlockHash) {
        if self.fmt.int_hashes {
            let low = u64::try_from(k.0 & u128::from(u64::MAX)).unwrap_or(0);
            let _ = rmp::encode::write_uint(&mut self.out, low);
        } else {
            let _ = rmp::encode::write_bin(&mut self.out, &k.0.to_be_bytes());
        }
    }

    /// An array header (lengths here are events per batch, at most
    /// `KEYS_PER_EVENT` keys and `TOKENS_PER_EVENT` tokens per event).
    fn arr(&mut self, n: usize) {
        let _ = rmp::encode::write_array_len(&mut self.out, u32::try_from(n).unwrap_or(u32::MAX));
    }

    fn str(&mut self, s: &str) {
        let _ = rmp::encode::write_str(&mut self.out, s);
    }

    fn nil(&mut self) {
        let _ = rmp::encode::write_nil(&mut self.out);
    }

    fn uint(&mut self, v: u64) {
        let _ = rmp::encode::write_uint(&mut self.out, v);
    }

    /// A struct of `n` fields: a map, or an array.
    fn open(&mut self, n: u32) {
        let _ = if self.fmt.arrays {
            rmp::encode::write_array_len(&mut self.out, n)
        } else {
            rmp::encode::write_map_len(&mut self.out, n)
        };
    }

    /// A field's name (maps only).
    fn field(&mut self, name: &str) {
        if !self.fmt.arrays {
            self.str(name);
        }
    }

    /// A tagged event of `n` fields besides its tag.
    fn event(&mut self, tag: &str, n: u32) {
        self.open(n + 1);
        self.field("type");
        self.str(tag);
    }
}

fn medium(t: Tier) -> &'static str {
    match t {
        Tier::Device(_) => "GPU",
        Tier::Host => "CPU",
    }
}

/// Encodes `events` as one vLLM `KVEventBatch` at time `ts` (seconds since
/// the Unix epoch) in `fmt`; `None` when none of them is a cache event.
pub fn encode_batch(
    ts: f64,
    events: &[ManagerEvent],
    dp_rank: Option<u32>,
    fmt: WireFormat,
) -> Option<Vec<u8>> {
    let wire: Vec<&ManagerEvent> = events
        .iter()
        .filter(|e| !matches!(e, ManagerEvent::Preempted(_)))
        .collect();
    if wire.is_empty() {
        return None;
    }
    let mut e = Enc {
        out: Vec::with_capacity(64 + 96 * wire.len()),
        fmt,
    };
    // Arrays keep the rank's slot (nil when none); maps omit it.
    e.open(2 + u32::from(dp_rank.is_some() || fmt.arrays));
    e.field("ts");
    let _ = rmp::encode::write_f64(&mut e.out, ts);
    e.field("events");
    e.arr(wire.len());
    for ev in wire {
        match ev {
            ManagerEvent::Stored {
                tier,
                parent,
                keys,
                tokens,
                block_size,
            } => {
                e.event("BlockStored", 7);
                e.field("block_hashes");
                e.arr(keys.len());
                for &k in keys {
                    e.hash(k);
                }
                e.field("parent_block_hash");
                match parent {
                    Some(p) => e.hash(*p),
                    None => e.nil(),
                }
                e.field("token_ids");
                e.arr(tokens.len());
                for &t in tokens {
                    e.uint(u64::from(t));
                }
                e.field("block_size");
                e.uint(u64::from(*block_size));
                e.field("lora_id");
                e.nil();
                e.field("medium");
                e.str(medium(*tier));
                e.field("lora_name");
                e.nil();
            }
            ManagerEvent::Removed { tier, keys } => {
                e.event("BlockRemoved", 2);
                e.field("block_hashes");
                e.arr(keys.len());
                for &k in keys {
                    e.hash(k);
                }
                e.field("medium");
                e.str(medium(*tier));
            }
            ManagerEvent::Cleared { .. } | ManagerEvent::Lost { .. } => {
                e.event("AllBlocksCleared", 0);
            }
            ManagerEvent::Preempted(_) => {}
        }
    }
    match dp_rank {
        Some(r) => {
            e.field("data_parallel_rank");
            e.uint(u64::from(r));
        }
        None if fmt.arrays => e.nil(),
        None => {}
    }
    Some(e.out)
}

/// Publishes batches of events (ZMQ PUB) and serves replays (ZMQ ROUTER)
/// from a thread of its own; [`publish`](Self::publish) never waits.
pub struct KvEventPublisher {
    /// The next sequence number and the channel to the publisher's task:
    /// numbered and sent under one lock, so batches leave in number order.
    tx: Mutex<(u64, mpsc::UnboundedSender<(u64, Bytes)>)>,
    endpoint: String,
    replay_endpoint: Option<String>,
    rank: Option<u32>,
    format: WireFormat,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for KvEventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvEventPublisher")
            .field("endpoint", &self.endpoint)
            .field("replay_endpoint", &self.replay_endpoint)
            .finish_non_exhaustive()
    }
}

impl Drop for KvEventPublisher {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn bind_err(endpoint: &str, e: impl std::fmt::Display) -> PublishError {
    PublishError::Bind {
        endpoint: endpoint.to_string(),
        reason: e.to_string(),
    }
}

impl KvEventPublisher {
    /// Binds the sockets and starts the publisher.
    pub fn bind(cfg: PublisherConfig) -> Result<Self, PublishError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pagedkv-events")
            .enable_all()
            .build()
            .map_err(|e| PublishError::Runtime(e.to_string()))?;
        // Bound from a thread of its own: the caller may be inside a runtime.
        let bound = std::thread::scope(|s| {
            s.spawn(|| rt.block_on(bind_sockets(&cfg)))
                .join()
                .unwrap_or_else(|_| Err(PublishError::Runtime("binding panicked".into())))
        });
        let (publisher, endpoint, router, replay_endpoint) = bound?;
        let (tx, rx) = mpsc::unbounded_channel();

        let topic = Bytes::from(cfg.topic.into_bytes());
        rt.spawn(serve(publisher, router, rx, topic, cfg.buffer_steps.max(1)));
        Ok(Self {
            tx: Mutex::new((0, tx)),
            endpoint,
            replay_endpoint,
            rank: cfg.data_parallel_rank,
            format: cfg.format,
            rt: Some(rt),
        })
    }

    /// The PUB socket's address (with the port chosen).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay socket's address.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// Publishes `events` (as drained from [`KvManager::drain_events`]) as
    /// one batch; returns its sequence number, or `None` when none of them
    /// goes on the wire. Encodes here; sends from the publisher's thread.
    ///
    /// [`KvManager::drain_events`]: crate::KvManager::drain_events
    pub fn publish(&self, events: &[ManagerEvent]) -> Option<u64> {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let payload = encode_batch(ts, events, self.rank, self.format)?;
        let mut g = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let seq = g.0;
        g.1.send((seq, Bytes::from(payload))).ok()?;
        g.0 += 1;
        Some(seq)
    }
}

type Bound = (PubSocket, String, Option<RouterSocket>, Option<String>);

async fn bind_sockets(cfg: &PublisherConfig) -> Result<Bound, PublishError> {
    let mut p = PubSocket::new();
    let ep = p
        .bind(&cfg.endpoint)
        .await
        .map_err(|e| bind_err(&cfg.endpoint, e))?;
    let (r, rep) = match &cfg.replay_endpoint {
        Some(addr) => {
            let mut r = RouterSocket::new();
            let ep = r.bind(addr).await.map_err(|e| bind_err(addr, e))?;
            (Some(r), Some(ep.to_string()))
        }
        None => (None, None),
    };
    Ok((p, ep.to_string(), r, rep))
}

fn msg(frames: Vec<Bytes>) -> Option<ZmqMessage> {
    ZmqMessage::try_from(frames).ok()
}

/// How long one replay message may wait for a slow subscriber.
const REPLAY_SEND_TIMEOUT: Duration = Duration::from_secs(1);

async fn serve(
    mut publisher: PubSocket,
    router: Option<RouterSocket>,
    mut rx: mpsc::UnboundedReceiver<(u64, Bytes)>,
    topic: Bytes,
    keep: usize,
) {
    let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::new();
    let (rsend, mut rrecv) = match router {
        Some(r) => {
            let (s, r) = r.split();
            (Some(Arc::new(tokio::sync::Mutex::new(s))), Some(r))
        }
        None => (None, None),
    };
    loop {
        let replay = async {
            match rrecv.as_mut() {
                Some(r) => r.recv().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            batch = rx.recv() => {
                let Some((seq, payload)) = batch else { return };
                let frames = vec![topic.clone(), Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone()];
                if let Some(m) = msg(frames) {
                    // A PUB socket drops for subscribers that are not keeping
                    // up; replay is how they catch up.
                    let _ = publisher.send(m).await;
                }
                if buffer.len() == keep {
                    buffer.pop_front();
                }
                buffer.push_back((seq, payload));
            }
            req = replay => {
                let (Some(req), Some(s)) = (req, rsend.as_ref()) else { continue };
                let frames = req.into_vec();
                // [identity, empty delimiter, start seq] (a REQ client), or
                // [identity, start seq] (a DEALER).
                let (Some(id), Some(start)) = (frames.first(), frames.last()) else { continue };
                let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else { continue };
                let start = u64::from_be_bytes(start);
                let from: Vec<(u64, Bytes)> =
                    buffer.iter().filter(|(q, _)| *q >= start).cloned().collect();
                tokio::spawn(replay_to(s.clone(), id.clone(), frames.len() == 3, from));
            }
        }
    }
}

/// Sends `batches` then the end marker to one replay client, giving up on a
/// client that does not read.
async fn replay_to(
    send: Arc<tokio::sync::Mutex<RouterSendHalf>>,
    id: Bytes,
    delim: bool,
    batches: Vec<(u64, Bytes)>,
) {
    let reply = |a: Bytes, b: Bytes| {
        let mut f = vec![id.clone()];
        if delim {
            f.push(Bytes::new());
        }
        f.extend([a, b]);
        msg(f)
    };
    let end = (END_SEQ.to_be_bytes(), Bytes::new());
    let all = batches
        .into_iter()
        .map(|(seq, p)| (seq.to_be_bytes(), p))
        .chain(std::iter::once(end));
    for (seq, payload) in all {
        let Some(m) = reply(Bytes::copy_from_slice(&seq), payload) else {
            return;
        };
        // The socket is taken per message: replays to several clients
        // interleave.
        let mut s = send.lock().await;
        match tokio::time::timeout(REPLAY_SEND_TIMEOUT, s.send(m)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}
