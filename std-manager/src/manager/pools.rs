//! The manager's pools by role: device `d`, the compressed pool of device
//! `d`, and the host tier. The arithmetic that maps a role to a core
//! `PoolId` (and to the memory behind it) lives here and nowhere else.
#![allow(
    clippy::cast_possible_truncation,
    reason = "pool ids are below the core's MAX_POOLS (8)"
)]

use pagedkv_core::{BlockId, KvLayout, MemoryKind, PoolId, QuantFormat};

use super::Place;

/// Which core pool plays which role. Devices `0..n` are pools `0..n`, the
/// host tier (if any) pool `n`; compressed pools are added on demand, one
/// per device and format, after them (see [`CompressedPool`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct PoolMap {
    devices: usize,
    host: bool,
}

/// A compressed pool, created the first time a request of `device` is
/// compressed to `format`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct CompressedPool {
    pub(super) device: usize,
    pub(super) format: QuantFormat,
    pub(super) pool: PoolId,
}

impl PoolMap {
    pub(super) fn new(devices: usize, host: bool) -> Self {
        Self { devices, host }
    }

    /// Device pools.
    pub(super) fn devices(&self) -> usize {
        self.devices
    }

    /// The pool of device `d`.
    pub(super) fn device(&self, d: usize) -> PoolId {
        PoolId(d as u16)
    }

    /// The pools of every device.
    pub(super) fn device_ids(&self) -> impl Iterator<Item = PoolId> + '_ {
        (0..self.devices).map(|d| self.device(d))
    }

    /// The host tier.
    pub(super) fn host(&self) -> Option<PoolId> {
        self.host.then_some(PoolId(self.devices as u16))
    }

    /// The id the next compressed pool takes, after those in `compressed`.
    pub(super) fn next_compressed(&self, compressed: &[CompressedPool]) -> usize {
        self.devices + usize::from(self.host) + compressed.len()
    }

    /// The role of `pool`.
    pub(super) fn place_of(&self, pool: PoolId, compressed: &[CompressedPool]) -> Place {
        let p = pool.0 as usize;
        if p < self.devices {
            return Place::Device(p);
        }
        match compressed.iter().find(|c| c.pool == pool) {
            Some(c) => Place::Compressed(c.device, c.format),
            None => Place::Host,
        }
    }

    /// The device of `pool`, if it is a device pool.
    pub(super) fn device_of(&self, pool: PoolId) -> Option<usize> {
        let p = pool.0 as usize;
        (p < self.devices).then_some(p)
    }

    /// Where the memory of `pool` is kept (the index of its `PoolMem`:
    /// pools and their memory are created in the same order).
    pub(super) fn mem(&self, pool: PoolId) -> usize {
        pool.0 as usize
    }
}

/// The memory behind one core pool: regions of `blocks_per_region` blocks.
#[derive(Debug)]
pub(super) struct PoolMem<R> {
    pub(super) layout: KvLayout,
    pub(super) memory: MemoryKind,
    pub(super) blocks_per_region: u32,
    pub(super) regions: Vec<R>,
}

impl<R> PoolMem<R> {
    /// The region holding block `b` of the pool, and the block's index in it.
    pub(super) fn locate(&self, b: BlockId) -> Option<(&R, BlockId)> {
        let per = self.blocks_per_region.max(1);
        let r = self.regions.get((b.0 / per) as usize)?;
        Some((r, BlockId(b.0 % per)))
    }

    /// Blocks backed by memory.
    pub(super) fn backed(&self) -> u32 {
        self.blocks_per_region
            .saturating_mul(self.regions.len() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_map_to_distinct_pools() {
        let m = PoolMap::new(3, true);
        assert_eq!(m.device(2), PoolId(2));
        assert_eq!(m.host(), Some(PoolId(3)));
        let fp8 = QuantFormat::Fp8E4M3PerHead;
        let c = [CompressedPool {
            device: 2,
            format: fp8,
            pool: PoolId(4),
        }];
        assert_eq!(m.next_compressed(&c), 5);
        assert_eq!(m.place_of(PoolId(1), &c), Place::Device(1));
        assert_eq!(m.place_of(PoolId(4), &c), Place::Compressed(2, fp8));
        assert_eq!(m.place_of(PoolId(3), &c), Place::Host);
        assert_eq!(m.device_of(PoolId(4)), None);
        assert_eq!(PoolMap::new(1, false).host(), None);
        assert_eq!(PoolMap::new(1, false).next_compressed(&[]), 1);
        let mem = PoolMem::<u8> {
            layout: pagedkv_core::KvLayout {
                layers: 1,
                kv_heads: 1,
                head_size: 1,
                tokens_per_block: 1,
                dtype: pagedkv_core::DType::F32,
                order: pagedkv_core::BlockOrder::BlockMajor,
            },
            memory: MemoryKind::Host,
            blocks_per_region: 4,
            regions: vec![10, 11],
        };
        assert_eq!(mem.locate(BlockId(5)), Some((&11, BlockId(1))));
        assert_eq!(mem.locate(BlockId(8)), None);
        assert_eq!(mem.backed(), 8);
    }
}
