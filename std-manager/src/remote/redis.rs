//! [`RemoteStore`] on Redis (or Valkey): one multiplexed connection that
//! reconnects by itself; existence of a chain in one script call, values
//! and writes in one pipeline each.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script, Value};

use super::{PutOutcome, RemoteStore, StoreError};

/// The leading run of present keys, computed by the server: one round trip
/// however long the chain. Single node: on a cluster its keys would span
/// slots.
const LEADING_BODY: &str = "for i = 1, #KEYS do \
    if redis.call('EXISTS', KEYS[i]) == 0 then return i - 1 end \
end \
return #KEYS";

/// Flags for Redis 7+ and Valkey: read-only and allowed under memory
/// pressure, so a server pausing writes (`CLIENT PAUSE WRITE`, a failover)
/// or full still answers. Older servers refuse the line: they get the plain
/// script.
const FLAGS: &str = "#!lua flags=no-writes,allow-oom\n";

/// A Redis server as the remote tier's store.
#[derive(Clone)]
pub struct RedisStore {
    con: ConnectionManager,
    leading: Script,
    plain: Script,
    /// The server refused the flagged script (older than Redis 7).
    old_server: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

fn io(e: redis::RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
    {
        StoreError::Io(e.to_string())
    } else {
        StoreError::Server(e.to_string())
    }
}

impl RedisStore {
    /// A store on the server at `url` (`redis://host:port/db` or
    /// `redis+unix:///path`). Connects lazily: a server that is down now is
    /// found when it comes up. `timeout` bounds connecting and each reply.
    /// Must be called within a tokio runtime.
    pub fn open(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(io)?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let con = ConnectionManager::new_lazy_with_config(client, cfg).map_err(io)?;
        Ok(Self {
            con,
            leading: Script::new(&format!("{FLAGS}{LEADING_BODY}")),
            plain: Script::new(LEADING_BODY),
            old_server: Default::default(),
        })
    }
}

#[async_trait]
impl RemoteStore for RedisStore {
    async fn leading(&self, keys: &[Vec<u8>]) -> Result<usize, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        use std::sync::atomic::Ordering::Relaxed;
        let mut con = self.con.clone();
        let old = self.old_server.load(Relaxed);
        let script = if old { &self.plain } else { &self.leading };
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k.as_slice());
        }
        match inv.invoke_async::<usize>(&mut con).await {
            Ok(n) => Ok(n.min(keys.len())),
            // A server that does not know the flags line: plain from now on.
            Err(e)
                if !old && {
                    let m = e.to_string();
                    m.contains("shebang") || m.contains("compiling")
                } =>
            {
                self.old_server.store(true, Relaxed);
                let mut inv = self.plain.prepare_invoke();
                for k in keys {
                    inv.key(k.as_slice());
                }
                let n: usize = inv.invoke_async(&mut con).await.map_err(io)?;
                Ok(n.min(keys.len()))
            }
            Err(e) => Err(io(e)),
        }
    }

    async fn get(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut con = self.con.clone();
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GET").arg(k.as_slice());
        }
        // A key of another type answers WRONGTYPE: that key is a bad value
        // (empty bytes fail every check), not a failed batch. Any other
        // error reply (loading, busy...) is the server failing.
        let replies: Vec<RedisResult<Value>> = pipe
            .ignore_errors()
            .query_async(&mut con)
            .await
            .map_err(io)?;
        replies
            .into_iter()
            .map(|r| match r {
                Ok(Value::Nil) => Ok(None),
                Ok(Value::BulkString(b)) => Ok(Some(b)),
                Ok(_) => Ok(Some(Vec::new())),
                Err(e) if e.code() == Some("WRONGTYPE") => Ok(Some(Vec::new())),
                Err(e) => Err(io(e)),
            })
            .collect()
    }

    async fn put_nx(&self, items: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<PutOutcome>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut con = self.con.clone();
        let mut pipe = redis::pipe();
        for (k, v) in items {
            pipe.cmd("SET")
                .arg(k.as_slice())
                .arg(v.as_slice())
                .arg("NX");
        }
        let replies: Vec<RedisResult<Value>> = pipe
            .ignore_errors()
            .query_async(&mut con)
            .await
            .map_err(io)?;
        replies
            .into_iter()
            .map(|r| match r {
                Ok(Value::Nil) => Ok(PutOutcome::Exists),
                Ok(_) => Ok(PutOutcome::Written),
                Err(e) if e.code() == Some("OOM") => Ok(PutOutcome::Refused),
                Err(e) => Err(io(e)),
            })
            .collect()
    }

    async fn delete(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut con = self.con.clone();
        let mut cmd = redis::cmd("DEL");
        for k in keys {
            cmd.arg(k.as_slice());
        }
        let _: i64 = cmd.query_async(&mut con).await.map_err(io)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        let _: String = redis::cmd("PING").query_async(&mut con).await.map_err(io)?;
        Ok(())
    }
}
