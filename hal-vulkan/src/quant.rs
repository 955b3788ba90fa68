//! The quantize / dequantize compute pipeline (`shaders/quant.wgsl`, its
//! SPIR-V committed beside it) and its dispatch.

#![allow(
    clippy::cast_possible_truncation,
    reason = "Vulkan sizes and indices: checked against u32 and the region size first; hosts are 64-bit"
)]

use ash::vk;
use pagedkv_core::{BlockOrder, DType, KvLayout, QuantFormat, RegionDesc, ValidatedBatch};

use crate::{VulkanBackend, VulkanError, VulkanFence, VulkanRegion};

/// The committed SPIR-V of `shaders/quant.wgsl`.
pub(crate) const SPIRV: &[u8] = include_bytes!("../shaders/quant.spv");

/// The shader's push constants (`Params` in the WGSL).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Params {
    items: u32,
    parts: u32,
    heads: u32,
    tokens: u32,
    dim: u32,
    full_type: u32,
    q_type: u32,
    dir: u32,
    full_block: u32,
    full_part: u32,
    q_block: u32,
    q_part: u32,
    q_data: u32,
    first: u32,
}

impl Params {
    fn bytes(&self) -> Vec<u8> {
        [
            self.items,
            self.parts,
            self.heads,
            self.tokens,
            self.dim,
            self.full_type,
            self.q_type,
            self.dir,
            self.full_block,
            self.full_part,
            self.q_block,
            self.q_part,
            self.q_data,
            self.first,
        ]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
    }
}

const SETS_PER_POOL: u32 = 64;

#[derive(Debug)]
pub(crate) struct Pipeline {
    module: vk::ShaderModule,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    pipeline: vk::Pipeline,
    pools: Vec<vk::DescriptorPool>,
}

impl Pipeline {
    fn new(d: &ash::Device) -> Result<Self, VulkanError> {
        let words = ash::util::read_spv(&mut std::io::Cursor::new(SPIRV))
            .map_err(|e| VulkanError::other("reading the SPIR-V").with_detail(e.to_string()))?;
        let mut p = Self {
            module: vk::ShaderModule::null(),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            pipeline: vk::Pipeline::null(),
            pools: Vec::new(),
        };
        // Each step stores its object in `p` at once, so a failure later
        // destroys what was made (`destroy` skips null handles).
        let r = (|| {
            // SAFETY: valid create infos on a valid device; the SPIR-V is
            // naga's output for the committed WGSL (checked by a test).
            unsafe {
                p.module = d
                    .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None)
                    .map_err(VulkanError::vk("creating the shader module"))?;
                let bindings: Vec<_> = (0..3)
                    .map(|b| {
                        vk::DescriptorSetLayoutBinding::default()
                            .binding(b)
                            .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                            .descriptor_count(1)
                            .stage_flags(vk::ShaderStageFlags::COMPUTE)
                    })
                    .collect();
                p.set_layout = d
                    .create_descriptor_set_layout(
                        &vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings),
                        None,
                    )
                    .map_err(VulkanError::vk("creating a descriptor set layout"))?;
                let push = [vk::PushConstantRange::default()
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
                    .size(std::mem::size_of::<Params>() as u32)];
                let layouts = [p.set_layout];
                p.layout = d
                    .create_pipeline_layout(
                        &vk::PipelineLayoutCreateInfo::default()
                            .set_layouts(&layouts)
                            .push_constant_ranges(&push),
                        None,
                    )
                    .map_err(VulkanError::vk("creating a pipeline layout"))?;
                let stage = vk::PipelineShaderStageCreateInfo::default()
                    .stage(vk::ShaderStageFlags::COMPUTE)
                    .module(p.module)
                    .name(c"main");
                let info = vk::ComputePipelineCreateInfo::default()
                    .stage(stage)
                    .layout(p.layout);
                p.pipeline = d
                    .create_compute_pipelines(vk::PipelineCache::null(), &[info], None)
                    .map_err(|(_, e)| VulkanError::vk("creating the compute pipeline")(e))?[0];
            }
            Ok(())
        })();
        match r {
            Ok(()) => Ok(p),
            Err(e) => {
                // SAFETY: made above on `d`, unused.
                unsafe { p.destroy(d) };
                Err(e)
            }
        }
    }

    /// A descriptor set: a reused one, or one from a (new) pool.
    fn set(
        &mut self,
        d: &ash::Device,
        free: &mut Vec<vk::DescriptorSet>,
    ) -> Result<vk::DescriptorSet, VulkanError> {
        if let Some(s) = free.pop() {
            return Ok(s);
        }
        let layouts = [self.set_layout];
        if let Some(&pool) = self.pools.last() {
            let info = vk::DescriptorSetAllocateInfo::default()
                .descriptor_pool(pool)
                .set_layouts(&layouts);
            // SAFETY: a pool and layout of this device.
            if let Ok(s) = unsafe { d.allocate_descriptor_sets(&info) } {
                return Ok(s[0]);
            }
        }
        let sizes = [vk::DescriptorPoolSize::default()
            .ty(vk::DescriptorType::STORAGE_BUFFER)
            .descriptor_count(3 * SETS_PER_POOL)];
        // SAFETY: a valid create info.
        let pool = unsafe {
            d.create_descriptor_pool(
                &vk::DescriptorPoolCreateInfo::default()
                    .max_sets(SETS_PER_POOL)
                    .pool_sizes(&sizes),
                None,
            )
        }
        .map_err(VulkanError::vk("creating a descriptor pool"))?;
        self.pools.push(pool);
        let info = vk::DescriptorSetAllocateInfo::default()
            .descriptor_pool(pool)
            .set_layouts(&layouts);
        // SAFETY: a fresh pool with room.
        Ok(unsafe { d.allocate_descriptor_sets(&info) }
            .map_err(VulkanError::vk("allocating a descriptor set"))?[0])
    }

    /// # Safety
    /// Made on `d`; no pending work uses it.
    pub(crate) unsafe fn destroy(&self, d: &ash::Device) {
        // SAFETY: the caller's contract; null handles are ignored by Vulkan.
        unsafe {
            for &p in &self.pools {
                d.destroy_descriptor_pool(p, None);
            }
            d.destroy_pipeline(self.pipeline, None);
            d.destroy_pipeline_layout(self.layout, None);
            d.destroy_descriptor_set_layout(self.set_layout, None);
            d.destroy_shader_module(self.module, None);
        }
    }
}

const fn code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::Fp8E4M3 => 3,
        DType::Int8 => 4,
    }
}

fn words(x: u64) -> Result<u32, VulkanError> {
    if !x.is_multiple_of(4) {
        return Err(VulkanError::unsupported(
            "quantization needs 4-byte aligned parts",
        ));
    }
    u32::try_from(x / 4)
        .map_err(|_| VulkanError::unsupported("region beyond 16 GiB for the shader"))
}

/// (block stride, part stride) in words.
fn strides(desc: &RegionDesc) -> Result<(u32, u32), VulkanError> {
    let l = &desc.layout;
    let pb = l.part_bytes()?;
    Ok(match l.order {
        BlockOrder::BlockMajor => (words(l.block_bytes()?)?, words(pb)?),
        BlockOrder::LayerMajor => (words(pb)?, words(pb * u64::from(desc.block_count))?),
    })
}

fn check_shapes(full: &KvLayout, q: &KvLayout, format: QuantFormat) -> Result<(), VulkanError> {
    if q.dtype != pagedkv_hal_host::quant::format_dtype(format) {
        return Err(VulkanError::unsupported(
            "compressed region has another element type",
        ));
    }
    if full.dtype.is_quantized() {
        return Err(VulkanError::unsupported("source must be f32, f16 or bf16"));
    }
    if full.with_dtype(q.dtype) != *q {
        return Err(VulkanError::other("regions have different shapes"));
    }
    if !full.head_size.is_multiple_of(4) {
        return Err(VulkanError::unsupported(
            "the Vulkan shader needs head_size a multiple of 4",
        ));
    }
    Ok(())
}

impl VulkanBackend {
    pub(crate) fn quant(
        &mut self,
        src: &VulkanRegion,
        dst: &VulkanRegion,
        batch: &ValidatedBatch<'_>,
        format: QuantFormat,
        dequantize: bool,
    ) -> Result<VulkanFence, VulkanError> {
        self.check_batch(src, dst, batch)?;
        // Free what completed submissions hold (pairs buffers, command
        // buffers, descriptor sets), as `copy_blocks` does.
        self.reclaim()?;
        if batch.same_region() {
            return Err(VulkanError::other("quantization needs two regions"));
        }
        let (full, q) = if dequantize { (dst, src) } else { (src, dst) };
        check_shapes(&full.desc.layout, &q.desc.layout, format)?;
        let limit = u64::from(self.o.props.limits.max_storage_buffer_range);
        if full.bytes > limit || q.bytes > limit {
            return Err(VulkanError::unsupported(
                "region larger than the device's storage buffer range",
            ));
        }
        let l = full.desc.layout;
        let items = (batch.copies().len() as u64) * 2 * u64::from(l.layers) * u64::from(l.kv_heads);
        let items = u32::try_from(items)
            .map_err(|_| VulkanError::unsupported("batch too large for one dispatch"))?;
        if items == 0 {
            return Ok(self.last_fence(0));
        }
        let (fb, fp) = strides(&full.desc)?;
        let (qb, qp) = strides(&q.desc)?;
        let mut params = Params {
            items,
            parts: 2 * l.layers,
            heads: l.kv_heads,
            tokens: l.tokens_per_block,
            dim: l.head_size,
            full_type: code(l.dtype),
            q_type: code(q.desc.layout.dtype),
            dir: u32::from(dequantize),
            full_block: fb,
            full_part: fp,
            q_block: qb,
            q_part: qp,
            q_data: words(q.desc.layout.part_data_bytes()?)?,
            first: 0,
        };
        let pairs: Vec<u8> = batch
            .copies()
            .iter()
            .flat_map(|c| [c.src.0, c.dst.0])
            .flat_map(u32::to_le_bytes)
            .collect();
        let d = self.o.device.clone();
        if self.quant.is_none() {
            self.quant = Some(Pipeline::new(&d)?);
        }
        let temp = self.upload(&pairs, vk::BufferUsageFlags::STORAGE_BUFFER)?;
        let Some(pipe) = self.quant.as_mut() else {
            return Err(VulkanError::other("pipeline missing"));
        };
        let set = match pipe.set(&d, &mut self.free_sets) {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: never used by any submission.
                unsafe { temp.destroy(&d) };
                return Err(e);
            }
        };
        let infos = [temp.buffer, full.buffer, q.buffer].map(|b| {
            [vk::DescriptorBufferInfo::default()
                .buffer(b)
                .offset(0)
                .range(vk::WHOLE_SIZE)]
        });
        let writes: Vec<_> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(i as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(info)
            })
            .collect();
        let max_groups = self.o.props.limits.max_compute_work_group_count[0].max(1);
        let (layout, pipeline) = (pipe.layout, pipe.pipeline);
        let cmd = match self.compute.begin(&d) {
            Ok(c) => c,
            Err(e) => {
                self.free_sets.push(set);
                // SAFETY: never submitted.
                unsafe { temp.destroy(&d) };
                return Err(e);
            }
        };
        // SAFETY: the set is not in use by pending work (fresh, or reclaimed
        // from a completed submission); `cmd` is recording; the buffers are
        // live; every push covers the declared range.
        unsafe {
            d.update_descriptor_sets(&writes, &[]);
            d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, pipeline);
            d.cmd_bind_descriptor_sets(cmd, vk::PipelineBindPoint::COMPUTE, layout, 0, &[set], &[]);
            let mut first = 0u32;
            while first < items {
                let n = (items - first).min(max_groups);
                params.first = first;
                d.cmd_push_constants(
                    cmd,
                    layout,
                    vk::ShaderStageFlags::COMPUTE,
                    0,
                    &params.bytes(),
                );
                d.cmd_dispatch(cmd, n, 1, 1);
                first += n;
            }
        }
        let value = self.compute.submit(&d, cmd, vec![temp], Some(set))?;
        Ok(VulkanFence {
            lane: 0,
            value,
            owner: self.owner,
        })
    }
}
