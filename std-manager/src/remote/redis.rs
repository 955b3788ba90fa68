//! [`RemoteStore`] on Redis (or Valkey): one multiplexed connection that
//! reconnects by itself; existence of a chain in one script call, values
//! and writes in one pipeline each.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script, Value};

use super::{PutOutcome, RemoteStore, StoreError};

/// The leading run of present keys, computed by the server: one round trip
/// however long the chain. Flagged read-only and allowed under memory
/// pressure (Redis 7+, Valkey), so a server pausing writes (`CLIENT PAUSE
/// WRITE`, a failover) or full still answers it. Single node: on a
/// cluster its keys would span slots.
const LEADING: &str = "#!lua flags=no-writes,allow-oom
for i = 1, #KEYS do \
    if redis.call('EXISTS', KEYS[i]) == 0 then return i - 1 end \
end \
return #KEYS";

/// A Redis server as the remote tier's store.
#[derive(Clone)]
pub struct RedisStore {
    con: ConnectionManager,
    leading: Script,
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
            leading: Script::new(LEADING),
        })
    }
}

#[async_trait]
impl RemoteStore for RedisStore {
    async fn leading(&self, keys: &[Vec<u8>]) -> Result<usize, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut con = self.con.clone();
        let mut inv = self.leading.prepare_invoke();
        for k in keys {
            inv.key(k.as_slice());
        }
        let n: usize = inv.invoke_async(&mut con).await.map_err(io)?;
        Ok(n.min(keys.len()))
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
        // A key of another type answers with an error: that key is a bad
        // value (empty bytes fail every check), not a failed batch.
        let replies: Vec<RedisResult<Value>> = pipe
            .ignore_errors()
            .query_async(&mut con)
            .await
            .map_err(io)?;
        Ok(replies
            .into_iter()
            .map(|r| match r {
                Ok(Value::Nil) => None,
                Ok(Value::BulkString(b)) => Some(b),
                _ => Some(Vec::new()),
            })
            .collect())
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
