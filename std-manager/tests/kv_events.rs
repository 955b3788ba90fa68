//! The manager's events as a KV-aware router receives them: published in
//! vLLM's wire format over ZeroMQ by `KvEventPublisher`, received by a
//! plain SUB socket, decoded with an independent msgpack decoder (`rmpv`,
//! generic values, no knowledge of our types) and checked against the
//! manager's own events: order, content, and replay of missed batches.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

mod common;

use std::time::Duration;

use common::{config, request};
use pagedkv_manager::kv_events::{
    END_SEQ, KvEventPublisher, PublisherConfig, WireFormat, encode_batch,
};
use pagedkv_manager::{
    HostBackend, HostManager, KvCacheManager, ManagerEvent, PrefixCacheConfig, RequestId, Tier,
};
use rmpv::Value;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

fn prompt(n: u32, salt: u32) -> Vec<u32> {
    (0..n).map(|i| i * 13 + salt).collect()
}

/// Batches of events from a small cache under churn: stores, hits,
/// evictions, moves to the host tier.
async fn event_batches() -> Vec<Vec<ManagerEvent>> {
    let mut cfg = config(12);
    cfg.host_blocks = 8;
    cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
    cfg.record_events = true;
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    let mut batches = Vec::new();
    for i in 0..8u64 {
        let salt = (i % 3) as u32;
        m.allocate_request(&request(i, prompt(40, salt)))
            .await
            .unwrap();
        m.deallocate(RequestId(i)).await.unwrap();
        let mut ev = Vec::new();
        m.drain_events(&mut ev);
        batches.push(ev);
    }
    batches.retain(|b| !b.is_empty());
    batches
}

fn text(v: &Value) -> &str {
    v.as_str().expect("a string")
}

fn field<'a>(m: &'a Value, name: &str) -> &'a Value {
    m.as_map()
        .expect("a map")
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no field {name} in {m}"))
}

fn hashes(v: &Value) -> Vec<u128> {
    v.as_array()
        .expect("an array of hashes")
        .iter()
        .map(|h| u128::from_be_bytes(h.as_slice().expect("bytes").try_into().expect("16 bytes")))
        .collect()
}

fn medium(t: Tier) -> &'static str {
    match t {
        Tier::Device(_) => "GPU",
        Tier::Host => "CPU",
    }
}

/// Checks one decoded `KVEventBatch` against the manager's events.
fn check_batch(payload: &[u8], expected: &[ManagerEvent]) {
    let v = rmpv::decode::read_value(&mut &payload[..]).expect("valid msgpack");
    assert!(
        field(&v, "ts").as_f64().unwrap() > 1.7e9,
        "ts is seconds since the epoch"
    );
    assert_eq!(field(&v, "data_parallel_rank").as_u64(), Some(3));
    let events = field(&v, "events").as_array().unwrap();
    let wire: Vec<&ManagerEvent> = expected
        .iter()
        .filter(|e| !matches!(e, ManagerEvent::Preempted(_)))
        .collect();
    assert_eq!(events.len(), wire.len());
    for (got, want) in events.iter().zip(wire) {
        let kind = text(field(got, "type"));
        match want {
            ManagerEvent::Stored {
                tier,
                parent,
                keys,
                tokens,
                block_size,
            } => {
                assert_eq!(kind, "BlockStored");
                let k: Vec<u128> = keys.iter().map(|k| k.0).collect();
                assert_eq!(hashes(field(got, "block_hashes")), k);
                let p = field(got, "parent_block_hash");
                match parent {
                    Some(p0) => assert_eq!(hashes(&Value::Array(vec![p.clone()])), vec![p0.0]),
                    None => assert!(p.is_nil()),
                }
                let t: Vec<u64> = field(got, "token_ids")
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap())
                    .collect();
                assert_eq!(t, tokens.iter().map(|&x| u64::from(x)).collect::<Vec<_>>());
                assert_eq!(
                    field(got, "block_size").as_u64(),
                    Some(u64::from(*block_size))
                );
                assert!(field(got, "lora_id").is_nil());
                assert_eq!(text(field(got, "medium")), medium(*tier));
            }
            ManagerEvent::Removed { tier, keys } => {
                assert_eq!(kind, "BlockRemoved");
                let k: Vec<u128> = keys.iter().map(|k| k.0).collect();
                assert_eq!(hashes(field(got, "block_hashes")), k);
                assert_eq!(text(field(got, "medium")), medium(*tier));
            }
            ManagerEvent::Cleared { .. } | ManagerEvent::Lost { .. } => {
                assert_eq!(kind, "AllBlocksCleared")
            }
            ManagerEvent::Preempted(_) => unreachable!(),
        }
    }
}

fn seq_of(b: &[u8]) -> i64 {
    i64::from_be_bytes(b.try_into().expect("8-byte sequence number"))
}

async fn replay(endpoint: &str, start: u64) -> Vec<(i64, Vec<u8>)> {
    let mut d = DealerSocket::new();
    d.connect(endpoint).await.unwrap();
    let req = ZmqMessage::try_from(vec![
        bytes::Bytes::new(),
        bytes::Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .unwrap();
    d.send(req).await.unwrap();
    let mut out = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), d.recv())
            .await
            .expect("replay answers")
            .unwrap()
            .into_vec();
        // [empty delimiter, seq, payload]
        assert_eq!(m.len(), 3, "replay frames");
        assert!(m[0].is_empty());
        let seq = seq_of(&m[1]);
        if seq == END_SEQ {
            assert!(m[2].is_empty());
            return out;
        }
        out.push((seq, m[2].to_vec()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_decodes_every_batch_in_order_and_replays_what_it_missed() {
    let batches = event_batches().await;
    assert!(batches.len() >= 5, "too few batches: {}", batches.len());
    let all: Vec<&ManagerEvent> = batches.iter().flatten().collect();
    assert!(
        all.iter()
            .any(|e| matches!(e, ManagerEvent::Removed { .. }))
    );
    assert!(
        all.iter()
            .any(|e| matches!(e, ManagerEvent::Stored { tokens, .. } if !tokens.is_empty()))
    );
    let p = KvEventPublisher::bind(PublisherConfig {
        endpoint: "tcp://127.0.0.1:0".into(),
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        topic: "kv@replica0".into(),
        buffer_steps: 100,
        data_parallel_rank: Some(3),
        format: WireFormat::default(),
    })
    .unwrap();
    // Two batches go out before anyone listens: only replay can bring them.
    assert_eq!(p.publish(&batches[0]), Some(0));
    assert_eq!(p.publish(&batches[1]), Some(1));
    let mut sub = SubSocket::new();
    sub.connect(p.endpoint()).await.unwrap();
    sub.subscribe("kv@").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, b) in batches.iter().enumerate().skip(2) {
        assert_eq!(p.publish(b), Some(i as u64));
    }
    // Live batches until the last: a subscription still settling may miss
    // the first few (PUB drops for a subscriber not yet known), which is
    // what replay is for; what arrives is in order, with no gap.
    let last = batches.len() as i64 - 1;
    let mut live: Vec<(i64, Vec<u8>)> = Vec::new();
    while live.last().map(|l| l.0) != Some(last) {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("the live batches arrive")
            .unwrap()
            .into_vec();
        assert_eq!(m.len(), 3, "topic, sequence, payload");
        assert_eq!(&m[0][..], b"kv@replica0");
        live.push((seq_of(&m[1]), m[2].to_vec()));
    }
    let first = live[0].0;
    assert!(
        first >= 2,
        "batches published before the subscriber connected"
    );
    for (i, (seq, payload)) in live.iter().enumerate() {
        assert_eq!(*seq, first + i as i64, "in order, no gap");
        check_batch(payload, &batches[*seq as usize]);
    }
    // The subscriber saw `first` first: it asks for everything from 0.
    let got = replay(p.replay_endpoint().unwrap(), 0).await;
    assert_eq!(got.len(), batches.len());
    for (i, (seq, payload)) in got.iter().enumerate() {
        assert_eq!(*seq, i as i64);
        check_batch(payload, &batches[i]);
        if let Some(l) = live.iter().find(|l| l.0 == *seq) {
            assert_eq!(payload, &l.1, "replay sends the bytes published");
        }
    }
    let tail = replay(p.replay_endpoint().unwrap(), 4).await;
    assert_eq!(tail.first().map(|t| t.0), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_keeps_the_last_buffer_steps_batches() {
    let p = KvEventPublisher::bind(PublisherConfig {
        endpoint: "tcp://127.0.0.1:0".into(),
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        topic: String::new(),
        buffer_steps: 3,
        data_parallel_rank: Some(3),
        format: WireFormat::default(),
    })
    .unwrap();
    let ev = vec![
        ManagerEvent::Stored {
            tier: Tier::Host,
            parent: Some(pagedkv_manager::core::BlockHash(u128::MAX - 5)),
            keys: vec![pagedkv_manager::core::BlockHash(7)],
            tokens: vec![],
            block_size: 16,
        },
        ManagerEvent::Removed {
            tier: Tier::Host,
            keys: vec![pagedkv_manager::core::BlockHash(7)],
        },
        ManagerEvent::Cleared { tier: Tier::Host },
        ManagerEvent::Lost { count: 3 },
    ];
    for i in 0..7 {
        assert_eq!(p.publish(&ev), Some(i));
    }
    // Preemptions alone are not cache events: nothing is sent.
    assert_eq!(p.publish(&[]), None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = replay(p.replay_endpoint().unwrap(), 0).await;
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![4, 5, 6]);
    for (_, payload) in &got {
        check_batch(payload, &ev);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_client_that_never_reads_stalls_nothing() {
    let p = KvEventPublisher::bind(PublisherConfig {
        endpoint: "tcp://127.0.0.1:0".into(),
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        topic: String::new(),
        buffer_steps: 100_000,
        data_parallel_rank: Some(3),
        format: WireFormat::default(),
    })
    .unwrap();
    // Big batches, so a client that never reads fills its queue.
    let keys: Vec<_> = (0..4).map(pagedkv_manager::core::BlockHash).collect();
    let ev: Vec<ManagerEvent> = (0..400)
        .map(|_| ManagerEvent::Stored {
            tier: Tier::Host,
            parent: None,
            keys: keys.clone(),
            tokens: vec![7; 64],
            block_size: 16,
        })
        .collect();
    for _ in 0..300 {
        p.publish(&ev);
    }
    let mut stuck = DealerSocket::new();
    stuck.connect(p.replay_endpoint().unwrap()).await.unwrap();
    let req = ZmqMessage::try_from(vec![
        bytes::Bytes::new(),
        bytes::Bytes::copy_from_slice(&0u64.to_be_bytes()),
    ])
    .unwrap();
    stuck.send(req).await.unwrap();
    // Live batches still flow to a subscriber meanwhile.
    let mut sub = SubSocket::new();
    sub.connect(p.endpoint()).await.unwrap();
    sub.subscribe("").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let small = vec![ManagerEvent::Cleared { tier: Tier::Host }];
    let seq = p.publish(&small).unwrap();
    let got = loop {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("live batches flow while a replay client is stuck")
            .unwrap()
            .into_vec();
        if seq_of(&m[1]) == seq as i64 {
            break m;
        }
    };
    check_batch(&got[2], &small);
    drop(stuck);
}

/// vLLM's older array encoding (what Dynamo's reader takes) with integer
/// hashes: the same content, positionally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_array_encoding_with_integer_hashes_carries_the_same_content() {
    let batches = event_batches().await;
    let fmt = WireFormat {
        arrays: true,
        int_hashes: true,
    };
    for b in &batches {
        let payload = encode_batch(1.8e9, b, None, fmt).unwrap();
        let v = rmpv::decode::read_value(&mut &payload[..]).unwrap();
        let top = v.as_array().expect("[ts, events, dp_rank]");
        assert_eq!(top.len(), 3);
        assert_eq!(top[0].as_f64(), Some(1.8e9));
        assert!(top[2].is_nil());
        let events = top[1].as_array().unwrap();
        assert_eq!(events.len(), b.len());
        let low = |k: u128| k as u64;
        for (got, want) in events.iter().zip(b) {
            let f = got.as_array().expect("[tag, fields...]");
            match want {
                ManagerEvent::Stored {
                    tier,
                    parent,
                    keys,
                    tokens,
                    block_size,
                } => {
                    assert_eq!(f.len(), 8);
                    assert_eq!(f[0].as_str(), Some("BlockStored"));
                    let h: Vec<u64> = f[1]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|h| h.as_u64().unwrap())
                        .collect();
                    assert_eq!(h, keys.iter().map(|k| low(k.0)).collect::<Vec<_>>());
                    assert_eq!(f[2].as_u64(), parent.map(|p| low(p.0)));
                    assert_eq!(f[3].as_array().unwrap().len(), tokens.len());
                    assert_eq!(f[4].as_u64(), Some(u64::from(*block_size)));
                    assert!(f[5].is_nil() && f[7].is_nil());
                    assert_eq!(f[6].as_str(), Some(medium(*tier)));
                }
                ManagerEvent::Removed { tier, keys } => {
                    assert_eq!(f.len(), 3);
                    assert_eq!(f[0].as_str(), Some("BlockRemoved"));
                    assert_eq!(f[1].as_array().unwrap().len(), keys.len());
                    assert_eq!(f[2].as_str(), Some(medium(*tier)));
                }
                _ => assert_eq!(f[0].as_str(), Some("AllBlocksCleared")),
            }
        }
    }
}
