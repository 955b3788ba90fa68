//! What a run will take, checked before it takes it: the memory of the
//! manager's pools and tables, of the offline references and of KV bytes,
//! against what the machine has (or `--max-memory`). A run that would not
//! fit is refused with a one-line reason instead of dying in the allocator.

use anyhow::{Result, bail};

/// Bytes a run may use.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// The limit in bytes.
    pub bytes: u64,
    /// Whether it was given (`--max-memory`) or read from the machine.
    pub given: bool,
}

const GIB: f64 = (1u64 << 30) as f64;

/// GiB a run may take without `--max-memory`, however much the machine has.
pub const DEFAULT_CAP: u64 = 16;

/// Memory the system can hand out now (`MemAvailable` on Linux), if known.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl Budget {
    /// `--max-memory` in GiB, or 80% of the memory available now (8 GiB
    /// where that cannot be read), at most [`DEFAULT_CAP`] GiB.
    pub fn new(max_memory_gib: Option<f64>) -> Result<Self> {
        match max_memory_gib {
            Some(g) if g.is_finite() && g > 0.0 => Ok(Self {
                bytes: (g * GIB) as u64,
                given: true,
            }),
            Some(g) => bail!("--max-memory must be a positive number of GiB (got {g})"),
            None => Ok(Self {
                bytes: available_memory()
                    .map_or(8 << 30, |b| b / 10 * 8)
                    .min(DEFAULT_CAP << 30),
                given: false,
            }),
        }
    }

    /// Block keys a workload may expand to (16 bytes each, and as much again
    /// for the references and the replay's copies of them).
    pub fn max_keys(&self) -> u64 {
        self.bytes / 48
    }

    /// Refuses `need` if it is over the limit, naming what takes the memory.
    pub fn check(&self, need: &Need) -> Result<()> {
        let total = need.total();
        if total > self.bytes {
            let parts: Vec<String> = need
                .parts()
                .iter()
                .filter(|(_, b)| *b > 0)
                .map(|(what, b)| format!("{what} {:.2}", *b as f64 / GIB))
                .collect();
            bail!(
                "this run needs about {:.2} GiB ({} GiB), more than the {:.2} GiB {}: \
                 use smaller pools, or set --max-memory",
                total as f64 / GIB,
                parts.join(", "),
                self.bytes as f64 / GIB,
                if self.given {
                    "of --max-memory"
                } else {
                    "allowed by default"
                }
            );
        }
        Ok(())
    }
}

/// What a run needs, by part.
#[derive(Clone, Copy, Debug, Default)]
pub struct Need {
    /// Device pools' metadata (each device also has a compressed pool).
    pub device: u64,
    /// The host tier's metadata.
    pub host: u64,
    /// Block tables and plan rows of the core.
    pub tables: u64,
    /// The offline references (ideal, Belady) and the replay's bookkeeping.
    pub references: u64,
    /// KV bytes (`--with-bytes`).
    pub kv: u64,
}

/// Metadata bytes of one pool of `blocks` blocks (slots, prefix index, events).
fn pool_bytes(blocks: u64) -> u64 {
    let slot = std::mem::size_of::<pagedkv_core::BlockSlot>() as u64;
    // The index holds 1.5 entries of 4 bytes per block (see `buckets_for`).
    blocks.saturating_mul(slot + 6) + 64 * 1024
}

impl Need {
    /// A replay of a workload of `keys` block references (`unique` of them
    /// distinct) on `device` + `host` blocks, the manager holding `seqs`
    /// sequences of up to `seq_blocks` blocks; `block_bytes` per block of
    /// KV when bytes are moved.
    pub fn replay(
        (keys, unique): (u64, u64),
        (device, host): (u32, u32),
        (seqs, seq_blocks): (u64, u64),
        block_bytes: Option<u64>,
    ) -> Self {
        let (d, h) = (u64::from(device), u64::from(host));
        Self {
            // Device pool, its compressed pool, release stamps.
            device: pool_bytes(d).saturating_mul(2).saturating_add(d * 4),
            host: if h == 0 { 0 } else { pool_bytes(h) },
            // Tables, plan targets and plan sources: one u32 per entry each.
            tables: seqs.saturating_mul(seq_blocks).saturating_mul(12),
            // Belady's next uses and maps, the ideal cache's set.
            references: keys
                .saturating_mul(16)
                .saturating_add(unique.saturating_mul(96))
                .saturating_add(d.saturating_mul(96)),
            // The device (and its int8 shadow, about half) and the host tier.
            kv: block_bytes.map_or(0, |b| b.saturating_mul(d.saturating_mul(3) / 2 + h)),
        }
    }

    fn parts(&self) -> [(&'static str, u64); 5] {
        [
            ("device pools", self.device),
            ("host tier", self.host),
            ("block tables", self.tables),
            ("references", self.references),
            ("KV bytes", self.kv),
        ]
    }

    /// Bytes in all.
    pub fn total(&self) -> u64 {
        self.parts()
            .iter()
            .fold(0u64, |t, (_, b)| t.saturating_add(*b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pools_are_refused_with_their_reason() {
        let b = Budget {
            bytes: 1 << 30,
            given: true,
        };
        let small = Need::replay((10_000, 5_000), (8_192, 8_192), (192, 512), None);
        assert!(b.check(&small).is_ok());
        let big = Need::replay((10_000, 5_000), (1_000_000_000, 0), (192, 512), None);
        let e = b.check(&big).unwrap_err().to_string();
        assert!(
            e.contains("device pools") && e.contains("--max-memory"),
            "{e}"
        );
        let bytes = Need::replay((0, 0), (100_000, 0), (1, 1), Some(2 << 20));
        assert!(
            b.check(&bytes)
                .unwrap_err()
                .to_string()
                .contains("KV bytes")
        );
        assert!(Budget::new(Some(f64::NAN)).is_err());
        assert!(Budget::new(Some(-1.0)).is_err());
        assert!(Budget::new(None).unwrap().bytes > 0);
    }
}
