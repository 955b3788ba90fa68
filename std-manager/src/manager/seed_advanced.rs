//! The seed's `AdvancedKvCacheManager` over the manager.
#![allow(
    clippy::cast_possible_truncation,
    reason = "block sizes were checked at construction; ratios are small"
)]

use std::time::Instant;

use pagedkv_core::DType;

use super::{KvManager, ManagedBackend, Place, lock};
use crate::error::{ManagerError, Result};
use crate::traits::AdvancedKvCacheManager;
use crate::types::{CompressionStats, PrefixCacheConfig, RequestId};

#[async_trait::async_trait]
impl<B: ManagedBackend> AdvancedKvCacheManager for KvManager<B> {
    async fn enable_prefix_caching(&self, config: PrefixCacheConfig) -> Result<()> {
        let mut inner = lock(&self.shared.inner);
        inner.prefix = Some(config);
        self.enforce_max_prefixes(&mut inner);
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn share_prefix(
        &self,
        source: RequestId,
        target: RequestId,
        shared_tokens: usize,
    ) -> Result<()> {
        self.ensure_on_device(source).await?;
        self.ensure_on_device(target).await?;
        let mut inner = lock(&self.shared.inner);
        let seq_of = |id| inner.req(id).map(|s| s.seq);
        let (s, t) = (seq_of(source)?, seq_of(target)?);
        let tokens =
            u32::try_from(shared_tokens).map_err(|_| pagedkv_core::Error::LengthOverflow)?;
        inner.cache.share_prefix(s, t, tokens)?;
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn swap_out(&self, request_id: RequestId) -> Result<()> {
        self.move_request(request_id, Place::Host).await?;
        self.notify_pressure();
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn swap_in(&self, request_id: RequestId) -> Result<()> {
        self.ensure_on_device(request_id).await?;
        self.notify_pressure();
        Ok(())
    }

    /// Quantizes a request's KV into its device's compressed pool of the
    /// configured `compression_format` (per-head scales; the pool is created
    /// on first use). Lossy: the compressed blocks, and the blocks
    /// decompressed from them, are never published in the prefix cache, and
    /// the request publishes none of its later blocks either.
    #[tracing::instrument(skip(self))]
    async fn compress_cache(&self, request_id: RequestId, compression_ratio: f32) -> Result<()> {
        let l = self.shared.config.layout;
        let full = l.block_bytes()? as f32;
        let q = l.with_dtype(DType::Int8).block_bytes()? as f32;
        let best = q / full;
        if l.dtype.is_quantized() || compression_ratio + 0.01 < best || compression_ratio.is_nan() {
            return Err(ManagerError::UnreachableRatio {
                requested: compression_ratio,
                best,
            });
        }
        // The configured format (int8 by default: the more accurate on
        // bounded KV; fp8 has the same size).
        let format = self.shared.config.compression_format;
        let t0 = Instant::now();
        self.compress_with(request_id, format).await?;
        let mut inner = lock(&self.shared.inner);
        inner.stats.compressions += 1;
        inner.stats.compression_ratio_sum += f64::from(best);
        inner.stats.compression_ms_sum += t0.elapsed().as_secs_f64() * 1000.0;
        drop(inner);
        self.notify_pressure();
        Ok(())
    }

    fn compression_stats(&self) -> CompressionStats {
        let inner = lock(&self.shared.inner);
        let l = self.shared.config.layout;
        let (full, q) = (
            l.block_bytes().unwrap_or(0) as usize,
            l.with_dtype(DType::Int8).block_bytes().unwrap_or(0) as usize,
        );
        let mut count = 0;
        let mut saved = 0;
        for st in inner.reqs.values() {
            if let (Ok(Place::Compressed(..)), Ok(info)) =
                (self.place(&inner, st), inner.cache.info(st.seq))
            {
                count += 1;
                saved += (info.blocks - info.first_live) as usize * full.saturating_sub(q);
            }
        }
        let n = inner.stats.compressions.max(1) as f64;
        let mean = |sum: f64| {
            if inner.stats.compressions == 0 {
                0.0
            } else {
                sum / n
            }
        };
        CompressionStats {
            compressed_caches: count,
            memory_saved_bytes: saved,
            avg_compression_ratio: mean(inner.stats.compression_ratio_sum) as f32,
            avg_compression_time_ms: mean(inner.stats.compression_ms_sum),
        }
    }
}
