//! A tiny decoder-only transformer on the CPU, the proof that the manager's
//! paged KV is what an engine's attention needs: grouped-query attention with
//! rotary positions, RMS norms, a ReLU MLP, f32, weights drawn from a seed,
//! greedy decoding. Its last layer attends over a sliding window.
//!
//! Attention reads and writes K and V only through [`Kv`]: [`ContigKv`] is
//! the reference (one contiguous buffer per request), [`PagedKv`] goes
//! through the manager's block tables as [`KvView`]s over hal-host regions,
//! exactly as a kernel would through device pointers. Both run the same
//! arithmetic in the same order, so their logits are equal bit for bit
//! unless a block holds the wrong KV.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "small dimensions and positions"
)]

pub mod engine;

use pagedkv_manager::{DType, KvCacheHandle, KvView, ManagerError};

/// The model's shape.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Vocabulary.
    pub vocab: usize,
    /// Hidden size.
    pub dim: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple: grouped-query attention).
    pub kv_heads: usize,
    /// Size of a head.
    pub head_dim: usize,
    /// MLP width.
    pub hidden: usize,
    /// Full-attention layers (the manager group of the full layers).
    pub full_layers: usize,
    /// Tokens the last layer attends to (its own manager group).
    pub window: usize,
}

impl Config {
    /// The test's model: 3 layers (2 full, 1 windowed over 8 tokens), 4 query
    /// heads sharing 2 KV heads of 8.
    pub fn tiny() -> Self {
        Self {
            vocab: 61,
            dim: 32,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            hidden: 64,
            full_layers: 2,
            window: 8,
        }
    }

    /// All layers (the windowed one last).
    pub fn layers(&self) -> usize {
        self.full_layers + 1
    }
}

struct Layer {
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<f32>,
}

/// Weights drawn from a seed.
pub struct Model {
    /// Its shape.
    pub cfg: Config,
    emb: Vec<f32>,
    layers: Vec<Layer>,
    out: Vec<f32>,
}

/// Where attention keeps K and V.
pub trait Kv {
    /// Stores the keys and values (all KV heads) of `layer` at `pos`.
    fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]);
    /// Loads the key and value of KV head `head` at `pos` of `layer`.
    fn load(&self, layer: usize, pos: usize, head: usize, k: &mut [f32], v: &mut [f32]);
}

/// `x · w` for `w` of `x.len()` rows and `out.len()` columns, row-major.
fn matmul(x: &[f32], w: &[f32], out: &mut [f32]) {
    let n = out.len();
    out.fill(0.0);
    for (i, &xi) in x.iter().enumerate() {
        for (o, &wij) in out.iter_mut().zip(&w[i * n..(i + 1) * n]) {
            *o += xi * wij;
        }
    }
}

fn rms_norm(x: &[f32]) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + 1e-5).sqrt();
    x.iter().map(|v| v * r).collect()
}

/// Rotary position embedding of each head of `x` at `pos`.
fn rope(x: &mut [f32], head_dim: usize, pos: usize) {
    for head in x.chunks_mut(head_dim) {
        for i in 0..head_dim / 2 {
            let theta = pos as f32 / 10_000f32.powf(2.0 * i as f32 / head_dim as f32);
            let (s, c) = theta.sin_cos();
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * c - b * s;
            head[2 * i + 1] = a * s + b * c;
        }
    }
}

impl Model {
    /// Weights uniform in ±1/√fan-in from `seed` (xorshift).
    pub fn new(cfg: Config, seed: u64) -> Self {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut draw = |rows: usize, cols: usize| -> Vec<f32> {
            let a = 1.0 / (rows as f32).sqrt();
            (0..rows * cols)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
                })
                .collect()
        };
        let (d, q, kv) = (
            cfg.dim,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
        );
        let emb = draw(cfg.vocab, d).iter().map(|v| v * 8.0).collect();
        let layers = (0..cfg.layers())
            .map(|_| Layer {
                wq: draw(d, q),
                wk: draw(d, kv),
                wv: draw(d, kv),
                wo: draw(q, d),
                w1: draw(d, cfg.hidden),
                w2: draw(cfg.hidden, d),
            })
            .collect();
        let out = draw(d, cfg.vocab);
        Self {
            cfg,
            emb,
            layers,
            out,
        }
    }

    /// The logits after `token` at `pos`; writes the K and V of every layer
    /// at `pos` first, then attends over `0..=pos` (the window's last tokens
    /// in the last layer).
    pub fn forward(&self, token: u32, pos: usize, kv: &mut dyn Kv) -> Vec<f32> {
        let c = &self.cfg;
        let t = token as usize % c.vocab;
        let mut x = self.emb[t * c.dim..(t + 1) * c.dim].to_vec();
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let (mut kh, mut vh) = (vec![0.0; c.head_dim], vec![0.0; c.head_dim]);
        for (l, w) in self.layers.iter().enumerate() {
            let h = rms_norm(&x);
            let mut q = vec![0.0; c.heads * c.head_dim];
            let mut k = vec![0.0; c.kv_heads * c.head_dim];
            let mut v = vec![0.0; c.kv_heads * c.head_dim];
            matmul(&h, &w.wq, &mut q);
            matmul(&h, &w.wk, &mut k);
            matmul(&h, &w.wv, &mut v);
            rope(&mut q, c.head_dim, pos);
            rope(&mut k, c.head_dim, pos);
            kv.store(l, pos, &k, &v);
            let first = if l == c.full_layers {
                (pos + 1).saturating_sub(c.window)
            } else {
                0
            };
            let mut attn = vec![0.0; c.heads * c.head_dim];
            let mut scores = Vec::with_capacity(pos + 1 - first);
            for (head, out) in attn.chunks_mut(c.head_dim).enumerate() {
                let qh = &q[head * c.head_dim..(head + 1) * c.head_dim];
                scores.clear();
                for p in first..=pos {
                    kv.load(l, p, head / group, &mut kh, &mut vh);
                    scores.push(qh.iter().zip(&kh).map(|(a, b)| a * b).sum::<f32>() * scale);
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0;
                for s in &mut scores {
                    *s = (*s - max).exp();
                    total += *s;
                }
                for (i, p) in (first..=pos).enumerate() {
                    kv.load(l, p, head / group, &mut kh, &mut vh);
                    let wgt = scores[i] / total;
                    for (o, vv) in out.iter_mut().zip(&vh) {
                        *o += wgt * vv;
                    }
                }
            }
            let mut o = vec![0.0; c.dim];
            matmul(&attn, &w.wo, &mut o);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms_norm(&x);
            let mut mid = vec![0.0; c.hidden];
            matmul(&h, &w.w1, &mut mid);
            mid.iter_mut().for_each(|m| *m = m.max(0.0));
            let mut o = vec![0.0; c.dim];
            matmul(&mid, &w.w2, &mut o);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        let mut logits = vec![0.0; c.vocab];
        matmul(&rms_norm(&x), &self.out, &mut logits);
        logits
    }
}

/// The greedy token of `logits` (the first of equal maxima).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `rank`-th most likely token (0: greedy), for parallel sampling.
pub fn ranked(logits: &[f32], rank: usize) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order[rank % order.len()] as u32
}

/// The reference: a request's K and V in contiguous buffers, per layer
/// `[pos][kv head][head_dim]`.
#[derive(Clone, Default)]
pub struct ContigKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    width: usize,
    head_dim: usize,
}

impl ContigKv {
    /// Empty, for `cfg`.
    pub fn new(cfg: &Config) -> Self {
        Self {
            k: vec![Vec::new(); cfg.layers()],
            v: vec![Vec::new(); cfg.layers()],
            width: cfg.kv_heads * cfg.head_dim,
            head_dim: cfg.head_dim,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.k.first().map_or(0, |k| k.len() / self.width)
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the positions from `len` on (rejected draft tokens).
    pub fn truncate(&mut self, len: usize) {
        for b in self.k.iter_mut().chain(&mut self.v) {
            b.truncate(len * self.width);
        }
    }
}

impl Kv for ContigKv {
    fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let w = self.width;
        for (buf, src) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            if buf.len() < (pos + 1) * w {
                buf.resize((pos + 1) * w, f32::NAN);
            }
            buf[pos * w..(pos + 1) * w].copy_from_slice(src);
        }
    }

    fn load(&self, layer: usize, pos: usize, head: usize, k: &mut [f32], v: &mut [f32]) {
        let at = pos * self.width + head * self.head_dim;
        k.copy_from_slice(&self.k[layer][at..at + self.head_dim]);
        v.copy_from_slice(&self.v[layer][at..at + self.head_dim]);
    }
}

/// A request's K and V through the manager: the views of its full layers
/// (one group) and of its windowed layer (another), taken after the step's
/// manager calls and used before the next (a later call may move blocks).
pub struct PagedKv {
    views: Vec<(KvView, KvView)>,
}

impl PagedKv {
    /// The views of `full` (layers `0..full_layers`) and `window` (layer 0
    /// of the window group); `None` while either is off its device.
    pub fn new(
        cfg: &Config,
        full: &dyn KvCacheHandle,
        window: &dyn KvCacheHandle,
    ) -> Result<Option<Self>, ManagerError> {
        let mut views = Vec::with_capacity(cfg.layers());
        for (h, layer) in (0..cfg.full_layers)
            .map(|l| (full, l))
            .chain(std::iter::once((window, 0)))
        {
            let (Some(k), Some(v)) = h.kv_cache(layer)? else {
                return Ok(None);
            };
            assert!(k.dtype == DType::F32 && v.dtype == DType::F32, "f32 KV");
            views.push((k, v));
        }
        Ok(Some(Self { views }))
    }

    /// The address of `head` at `pos` in `view`.
    fn at(view: &KvView, pos: usize, head: usize) -> *mut u8 {
        let bs = view.tokens_per_block as usize;
        let block = view.block_addrs.get(pos / bs).copied().unwrap_or(0);
        assert_ne!(block, 0, "position {pos} is not in the block table");
        let a = block + (pos % bs) as u64 * view.token_stride + head as u64 * view.head_stride;
        a as usize as *mut u8
    }
}

impl Kv for PagedKv {
    fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (kv, vv) = &self.views[layer];
        let hd = kv.head_stride as usize / 4;
        for h in 0..k.len() / hd {
            for (view, src) in [(kv, k), (vv, v)] {
                let p = Self::at(view, pos, h);
                // SAFETY: `p` points into a hal-host region the manager holds
                // for this request's block (its table was read under the
                // manager's lock and no manager call ran since, so the block
                // is still this request's and on its device); the head's
                // `hd` f32s lie inside the block by the layout's strides.
                // Bytes are copied, so no alignment is assumed.
                unsafe {
                    std::ptr::copy_nonoverlapping(src[h * hd..].as_ptr().cast::<u8>(), p, hd * 4);
                }
            }
        }
    }

    fn load(&self, layer: usize, pos: usize, head: usize, k: &mut [f32], v: &mut [f32]) {
        let (kv, vv) = &self.views[layer];
        for (view, dst) in [(kv, k), (vv, v)] {
            let p = Self::at(view, pos, head);
            // SAFETY: as in `store`; `dst` holds one head.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    p.cast_const(),
                    dst.as_mut_ptr().cast::<u8>(),
                    dst.len() * 4,
                );
            }
        }
    }
}
