//! Errors are values: every mistake a caller can make, and every resource
//! exhaustion, is a variant naming the reason. None of them leaves state
//! changed: an operation that returns `Err` has done nothing.

use core::fmt;

use crate::ids::{BlockId, PlanId, PoolId, SeqId};

/// Why a core operation was refused. `Copy`, small, and `#[non_exhaustive]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error {
    /// A pool or cache was configured with zero tokens per block.
    ZeroTokensPerBlock,
    /// A pool was configured with zero blocks.
    ZeroCapacity,
    /// More blocks than block ids can address (`max` is the largest pool).
    CapacityTooLarge {
        /// Blocks asked for.
        requested: u64,
        /// Largest supported pool.
        max: u32,
    },
    /// Caller-provided storage is shorter than the configuration needs.
    StorageTooSmall {
        /// Elements needed.
        needed: usize,
        /// Elements provided.
        provided: usize,
    },
    /// A length or size computation overflowed (lengths near `u32::MAX` tokens,
    /// or a layout whose block size does not fit in `u64`).
    LengthOverflow,
    /// Not enough free or evictable blocks; nothing was allocated.
    OutOfBlocks {
        /// Blocks the operation needed.
        needed: u32,
        /// Blocks that were free or evictable.
        available: u32,
    },
    /// The request can never fit: it needs more blocks than the pool has.
    LargerThanPool {
        /// Blocks the request needs.
        needed: u64,
        /// Total blocks in the pool.
        capacity: u32,
    },
    /// A block id outside the pool.
    UnknownBlock(BlockId),
    /// `release`/`add_ref`/`register` of a block nobody holds (double free).
    BlockNotInUse(BlockId),
    /// `evict` of a block that is not cached (held, or free).
    NotCached(BlockId),
    /// A reference count would overflow.
    RefCountOverflow(BlockId),
    /// `register` of a block that already carries a key.
    AlreadyRegistered(BlockId),
    /// A `SeqId` that was never issued or whose sequence was freed (stale).
    UnknownSequence(SeqId),
    /// All sequence slots are in use.
    TooManySequences {
        /// Sequence slots in the store.
        capacity: u32,
    },
    /// The sequence would need more blocks than a block table row holds.
    SequenceTooLong {
        /// Blocks the sequence would need.
        blocks: u64,
        /// Blocks per table row.
        max_blocks: u32,
    },
    /// The sequence has a pending plan (swap or move): commit or abort it first.
    SequenceBusy(SeqId),
    /// The sequence lives on a host tier: swap it in before running it.
    SequenceSwappedOut(SeqId),
    /// `swap_in` of a sequence that is not swapped out.
    NotSwappedOut(SeqId),
    /// `swap_out` of a sequence that is not on a device pool.
    NotOnDevice(SeqId),
    /// Source and target pool of a move are the same.
    SamePool(PoolId),
    /// The target of a swap out, an offload or an import is not a host pool,
    /// or of a swap in not a device pool.
    WrongPoolKind(PoolId),
    /// A `PoolId` not registered in this cache.
    UnknownPool(PoolId),
    /// `add_pool` of a pool whose id the cache already has.
    DuplicatePool(PoolId),
    /// Sequences run in device pools: allocation in a host pool.
    NotADevicePool(PoolId),
    /// `share_prefix` between sequences of different pools.
    DifferentPools {
        /// The source's pool.
        source: PoolId,
        /// The target's pool.
        target: PoolId,
    },
    /// All pool slots are in use.
    TooManyPools,
    /// Pools of one cache must agree on tokens per block.
    TokensPerBlockMismatch {
        /// The cache's tokens per block.
        expected: u32,
        /// The pool's tokens per block.
        found: u32,
    },
    /// A `PlanId` that was never issued, or was already committed or aborted.
    UnknownPlan(PlanId),
    /// All plan slots are in use.
    TooManyPlans {
        /// Plan slots in the store.
        capacity: u32,
    },
    /// Two sequences with different cache salts cannot share blocks.
    SaltMismatch {
        /// The source sequence.
        source: SeqId,
        /// The target sequence.
        target: SeqId,
    },
    /// `share_prefix` into a sequence that already holds tokens.
    TargetNotEmpty(SeqId),
    /// `share_prefix` of the same sequence onto itself.
    SameSequence(SeqId),
    /// More tokens requested than the sequence holds.
    TooManyTokens {
        /// Tokens requested.
        requested: u64,
        /// Tokens available.
        available: u32,
    },
    /// More precomputed keys than full blocks in the prompt.
    TooManyKeys {
        /// Keys given.
        keys: usize,
        /// Full blocks in the prompt.
        full_blocks: u32,
    },
    /// An output buffer is too short; nothing was written past it.
    OutputTooSmall {
        /// Elements needed.
        needed: usize,
        /// Elements provided.
        provided: usize,
    },
    /// A copy names a block outside its region.
    CopyOutOfBounds {
        /// Index of the offending copy in the batch.
        copy: usize,
    },
    /// Two copies of one batch write the same target block.
    DuplicateTarget {
        /// Index of the offending copy in the batch.
        copy: usize,
    },
    /// A block is both read and written by one batch.
    ReadWriteOverlap {
        /// Index of the offending copy in the batch.
        copy: usize,
    },
    /// A layout dimension is zero.
    ZeroLayoutDimension,
    /// A layout so large that its byte offsets or part counts overflow.
    LayoutTooLarge,
    /// A layer index past the layout's layers.
    LayerOutOfRange {
        /// The layer asked for.
        layer: u32,
        /// Layers in the layout.
        layers: u32,
    },
    /// The allocator could not provide owned storage (nothing was built).
    AllocationFailed {
        /// Bytes asked for.
        bytes: u64,
    },
    /// Pressure thresholds must satisfy `0 <= medium <= high <= critical <= 1`.
    InvalidThresholds,
    /// An eviction policy's protected share above 100 percent.
    ProtectPercentTooLarge {
        /// The percent asked for.
        percent: u8,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Error::*;
        match *self {
            ZeroTokensPerBlock => f.write_str("tokens per block must be at least 1"),
            ZeroCapacity => f.write_str("a pool needs at least one block"),
            CapacityTooLarge { requested, max } => {
                write!(f, "{requested} blocks requested, at most {max} supported")
            }
            StorageTooSmall { needed, provided } => {
                write!(
                    f,
                    "storage too small: {needed} elements needed, {provided} provided"
                )
            }
            LengthOverflow => f.write_str("length computation overflowed"),
            OutOfBlocks { needed, available } => {
                write!(
                    f,
                    "out of blocks: {needed} needed, {available} free or evictable"
                )
            }
            LargerThanPool { needed, capacity } => {
                write!(
                    f,
                    "request needs {needed} blocks, the pool has {capacity} in all"
                )
            }
            UnknownBlock(b) => write!(f, "{b} is outside the pool"),
            BlockNotInUse(b) => write!(f, "{b} is not in use (double free?)"),
            NotCached(b) => write!(f, "{b} is not a cached block"),
            RefCountOverflow(b) => write!(f, "reference count of {b} would overflow"),
            AlreadyRegistered(b) => write!(f, "{b} already carries a prefix key"),
            UnknownSequence(s) => write!(f, "{s} is unknown or was freed"),
            TooManySequences { capacity } => write!(f, "all {capacity} sequence slots in use"),
            SequenceTooLong { blocks, max_blocks } => write!(
                f,
                "sequence needs {blocks} blocks, a block table holds at most {max_blocks}"
            ),
            SequenceBusy(s) => write!(f, "{s} has a pending move; commit or abort it first"),
            SequenceSwappedOut(s) => write!(f, "{s} is swapped out; swap it in first"),
            NotSwappedOut(s) => write!(f, "{s} is not swapped out"),
            NotOnDevice(s) => write!(f, "{s} is not on a device pool"),
            SamePool(p) => write!(f, "source and target are both {p}"),
            WrongPoolKind(p) => write!(f, "{p} is of the wrong kind for this move"),
            UnknownPool(p) => write!(f, "{p} is unknown"),
            DuplicatePool(p) => write!(f, "{p} is already in the cache (duplicate pool id)"),
            NotADevicePool(p) => {
                write!(
                    f,
                    "{p} is not a device pool: sequences are allocated on devices"
                )
            }
            DifferentPools { source, target } => write!(
                f,
                "the source is in {source} and the target in {target}: sharing needs one pool"
            ),
            TooManyPools => f.write_str("all pool slots in use"),
            TokensPerBlockMismatch { expected, found } => write!(
                f,
                "pool has {found} tokens per block, the cache uses {expected}"
            ),
            UnknownPlan(p) => write!(f, "{p} is unknown, committed or aborted"),
            TooManyPlans { capacity } => write!(f, "all {capacity} plan slots in use"),
            SaltMismatch { source, target } => {
                write!(f, "{source} and {target} have different cache salts")
            }
            TargetNotEmpty(s) => write!(f, "{s} already holds tokens"),
            SameSequence(s) => write!(f, "{s} cannot share a prefix with itself"),
            TooManyTokens {
                requested,
                available,
            } => {
                write!(f, "{requested} tokens requested, {available} available")
            }
            TooManyKeys { keys, full_blocks } => {
                write!(f, "{keys} keys for a prompt of {full_blocks} full blocks")
            }
            OutputTooSmall { needed, provided } => {
                write!(f, "output too small: {needed} needed, {provided} provided")
            }
            CopyOutOfBounds { copy } => write!(f, "copy {copy} is out of bounds"),
            DuplicateTarget { copy } => write!(f, "copy {copy} writes a block already written"),
            ReadWriteOverlap { copy } => {
                write!(f, "copy {copy} touches a block both read and written")
            }
            ZeroLayoutDimension => f.write_str("layout dimensions must be non-zero"),
            LayoutTooLarge => f.write_str("layout too large: its byte offsets would overflow"),
            LayerOutOfRange { layer, layers } => {
                write!(f, "layer {layer} is past the layout's {layers} layers")
            }
            AllocationFailed { bytes } => {
                write!(f, "the allocator refused {bytes} bytes of storage")
            }
            InvalidThresholds => {
                f.write_str("thresholds must satisfy 0 <= medium <= high <= critical <= 1")
            }
            ProtectPercentTooLarge { percent } => {
                write!(f, "a protected share of {percent}% (at most 100%)")
            }
        }
    }
}

impl core::error::Error for Error {}

/// Result alias of the core.
pub type Result<T, E = Error> = core::result::Result<T, E>;
