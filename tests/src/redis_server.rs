//! A private `redis-server` for the remote tier's tests: its own port on
//! the loopback, no persistence, a small `maxmemory`; killed and restarted
//! on the same port for fault tests. Nothing leaves this machine.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server (killed on drop).
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

/// Whether a missing `redis-server` fails the tests (CI sets
/// `PAGEDKV_REQUIRE_REDIS=1`) instead of skipping them.
fn required() -> bool {
    std::env::var("PAGEDKV_REQUIRE_REDIS").is_ok_and(|v| v == "1")
}

impl RedisServer {
    /// Starts a server with `maxmemory` bytes and eviction `policy`
    /// (`allkeys-lru`, `noeviction`...), plus `extra` arguments. `None`, with
    /// a message, where `redis-server` is not installed.
    pub fn start(maxmemory: &str, policy: &str, extra: &[&str]) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                !required(),
                "PAGEDKV_REQUIRE_REDIS=1 but redis-server is not installed"
            );
            eprintln!("skipped: redis-server is not installed (apt install redis-server)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let dir = std::env::temp_dir().join(format!("pagedkv-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            maxmemory,
            "--maxmemory-policy",
            policy,
            "--loglevel",
            "warning",
            "--dir",
            dir.to_str().unwrap_or("."),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = Self {
            child: None,
            port,
            dir,
            args,
        };
        s.restart();
        Some(s)
    }

    /// `redis://127.0.0.1:port/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server at once (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty: no persistence) and
    /// waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while self.ping().is_none() {
            assert!(
                Instant::now() < until,
                "redis-server did not answer in 10 s"
            );
            // Exited (its port taken meanwhile): fail here, rather than let
            // another server answer in its place.
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("redis-server on port {} exited: {status}", self.port);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends one raw command (RESP array of bulk strings) and returns the
    /// reply's bytes.
    pub fn command(&self, args: &[&[u8]]) -> Option<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        s.write_all(&req).ok()?;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        // Read until a complete reply: simple replies end at the first CRLF;
        // bulk replies carry their length.
        loop {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if reply_complete(&out) {
                break;
            }
        }
        Some(out)
    }

    fn ping(&self) -> Option<()> {
        (self.command(&[b"PING"])? == b"+PONG\r\n").then_some(())
    }

    /// The reply to `INFO section` as text.
    pub fn info(&self, section: &str) -> String {
        let r = self
            .command(&[b"INFO", section.as_bytes()])
            .unwrap_or_default();
        String::from_utf8_lossy(&r).into_owned()
    }
}

fn reply_complete(r: &[u8]) -> bool {
    let Some(eol) = r.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    match r.first() {
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&r[1..eol])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            len < 0 || r.len() >= eol + 2 + len as usize + 2
        }
        _ => true,
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
