#![doc = include_str!("../README.md")]
#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]

mod backend;
mod error;
mod memory;
mod quant;
mod setup;
mod submit;

use std::collections::HashMap;
use std::ptr::NonNull;

use ash::vk;
use pagedkv_core::RegionDesc;

pub use backend::REGIONS_PER_COMMAND;
pub use error::VulkanError;

/// Which physical device to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The `n`-th device the loader lists.
    Index(usize),
    /// The first device whose name contains this text.
    Name(String),
}

/// How to open the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VulkanOptions {
    /// The device; `None` prefers a discrete GPU, then integrated, virtual,
    /// and a CPU implementation (lavapipe) last.
    pub device: Option<DeviceChoice>,
    /// Reach device memory only through host-visible staging buffers, even
    /// where it is host-visible (lavapipe's only memory type is): tests the
    /// path a discrete GPU takes.
    pub force_staging: bool,
    /// Signal completions with `VkFence`s even where timeline semaphores
    /// exist: tests the path of drivers without them.
    pub force_fences: bool,
    /// Enable the Khronos validation layer and count its messages
    /// ([`VulkanBackend::validation_messages`]); opening fails where the
    /// layer is missing. Default: `PAGEDKV_VULKAN_VALIDATION=1`.
    pub validation: bool,
}

impl Default for VulkanOptions {
    fn default() -> Self {
        Self {
            device: None,
            force_staging: false,
            force_fences: false,
            validation: std::env::var("PAGEDKV_VULKAN_VALIDATION").as_deref() == Ok("1"),
        }
    }
}

/// A region of blocks in one `VkBuffer` with its own memory.
///
/// The backend that created it frees it in `destroy_region` (or when the
/// backend is dropped). Regions are not `Clone`.
#[derive(Debug)]
pub struct VulkanRegion {
    pub(crate) desc: RegionDesc,
    pub(crate) buffer: vk::Buffer,
    pub(crate) bytes: u64,
    /// The host mapping, where the memory is host-visible and not forced
    /// through staging.
    pub(crate) mapped: Option<NonNull<u8>>,
    pub(crate) address: Option<u64>,
    pub(crate) owner: usize,
    pub(crate) id: u64,
}

// SAFETY: handles and an address; the bytes are reached only through the
// backend (`&mut`) or by queued work under the unsafe batch contract.
unsafe impl Send for VulkanRegion {}
// SAFETY: shared references read the description and handles only.
unsafe impl Sync for VulkanRegion {}

impl VulkanRegion {
    /// What the region was created with.
    pub fn desc(&self) -> &RegionDesc {
        &self.desc
    }

    /// Bytes in the region.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The `VkBuffer` (for an engine recording its own commands on it).
    pub fn buffer(&self) -> vk::Buffer {
        self.buffer
    }
}

/// Completion of a batch: a value on a queue's timeline semaphore (or its
/// `VkFence`). Polling never blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VulkanFence {
    lane: u8,
    value: u64,
    owner: usize,
}

/// The Vulkan backend: regions are `VkBuffer`s in device-local memory
/// (`MemoryKind::Device(_)`: every device number is this one physical
/// device, as hal-host simulates devices) or host-visible, host-coherent
/// memory (`PinnedHost`, `Host`). Copies are one `vkCmdCopyBuffer` per batch
/// (on a transfer-only queue where the device has one); quantization is a
/// compute shader.
pub struct VulkanBackend {
    o: setup::Opened,
    compute: submit::Lane,
    transfer: Option<submit::Lane>,
    families: Vec<u32>,
    owner: usize,
    next_id: u64,
    /// Every live region's buffer and memory (freed on drop).
    live: HashMap<u64, (vk::Buffer, vk::DeviceMemory)>,
    force_staging: bool,
    quant: Option<quant::Pipeline>,
    /// The staging buffer (buffer, mapping, bytes), made on first use.
    staging: Option<(submit::Temp, NonNull<u8>, u64)>,
    free_sets: Vec<vk::DescriptorSet>,
    ranges: Vec<vk::BufferCopy>,
}

// SAFETY: Vulkan handles may be used from any thread when access is
// externally synchronized, which `&mut self` on every method provides; the
// staging mapping is reached only through `&mut self`.
unsafe impl Send for VulkanBackend {}

impl std::fmt::Debug for VulkanBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VulkanBackend")
            .field("device", &self.describe())
            .finish_non_exhaustive()
    }
}

static NEXT_OWNER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

impl VulkanBackend {
    /// Opens the device `options` choose. `Unsupported` where there is no
    /// loader, no device, or (when asked) no validation layer.
    pub fn new(options: &VulkanOptions) -> Result<Self, VulkanError> {
        let o = setup::open(options)?;
        let timeline = o.timeline && !options.force_fences;
        let compute = match submit::Lane::new(&o.device, o.compute, timeline) {
            Ok(l) => l,
            Err(e) => {
                destroy_opened(&o);
                return Err(e);
            }
        };
        let mut be = Self {
            compute,
            transfer: None,
            families: std::iter::once(o.compute.0)
                .chain(o.transfer.map(|t| t.0))
                .collect(),
            owner: NEXT_OWNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            next_id: 0,
            live: HashMap::new(),
            force_staging: options.force_staging,
            quant: None,
            staging: None,
            free_sets: Vec::new(),
            ranges: Vec::new(),
            o,
        };
        if let Some(t) = be.o.transfer {
            be.transfer = Some(submit::Lane::new(&be.o.device, t, timeline)?);
        }
        Ok(be)
    }

    /// The device's name, type, API version and the paths in use.
    pub fn describe(&self) -> String {
        let p = &self.o.props;
        format!(
            "{} ({:?}, Vulkan {}.{}.{}, {}, {}{})",
            p.device_name_as_c_str()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            p.device_type,
            vk::api_version_major(p.api_version),
            vk::api_version_minor(p.api_version),
            vk::api_version_patch(p.api_version),
            if self.compute.timeline() {
                "timeline semaphores"
            } else {
                "fences"
            },
            if self.transfer.is_some() {
                "transfer queue"
            } else {
                "one queue"
            },
            if self.force_staging {
                ", staging forced"
            } else {
                ""
            },
        )
    }

    /// Validation warnings and errors reported so far (0 without validation).
    pub fn validation_messages(&self) -> usize {
        self.o.messages.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The validation message counter, to read after the backend moved into
    /// a manager.
    pub fn message_counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        self.o.messages.clone()
    }

    /// Waits for every queue, then frees what completed work held.
    fn idle(&mut self) -> Result<(), VulkanError> {
        let d = &self.o.device;
        self.compute.idle(d)?;
        self.compute.reclaim(d, &mut self.free_sets)?;
        if let Some(t) = self.transfer.as_mut() {
            t.idle(d)?;
            t.reclaim(d, &mut self.free_sets)?;
        }
        Ok(())
    }

    fn lane(&self, i: u8) -> Option<&submit::Lane> {
        match i {
            0 => Some(&self.compute),
            _ => self.transfer.as_ref(),
        }
    }
}

fn destroy_opened(o: &setup::Opened) {
    // SAFETY: objects of `o`, idle and unused; children before parents.
    unsafe {
        let _ = o.device.device_wait_idle();
        o.device.destroy_device(None);
        if let Some((du, m)) = &o.messenger {
            du.destroy_debug_utils_messenger(*m, None);
        }
        o.instance.destroy_instance(None);
    }
}

impl Drop for VulkanBackend {
    fn drop(&mut self) {
        let d = &self.o.device;
        // SAFETY: every object below was made on `d` by this backend; after
        // the queues are idle nothing pending uses them; each is destroyed
        // once, children before the device.
        unsafe {
            let _ = d.device_wait_idle();
            self.compute.destroy(d);
            if let Some(t) = self.transfer.as_mut() {
                t.destroy(d);
            }
            if let Some((t, _, _)) = self.staging.take() {
                t.destroy(d);
            }
            if let Some(q) = self.quant.take() {
                q.destroy(d);
            }
            for (_, (buffer, memory)) in self.live.drain() {
                d.destroy_buffer(buffer, None);
                d.free_memory(memory, None);
            }
        }
        destroy_opened(&self.o);
    }
}

/// Why a test that needs Vulkan should skip, or `None` to run it. With
/// `PAGEDKV_REQUIRE_VULKAN=1` a missing loader or device panics instead.
pub fn skip_reason(options: &VulkanOptions) -> Option<String> {
    match VulkanBackend::new(options) {
        Ok(_) => None,
        Err(e) if std::env::var("PAGEDKV_REQUIRE_VULKAN").as_deref() == Ok("1") => {
            panic!("PAGEDKV_REQUIRE_VULKAN=1 but Vulkan is not usable: {e}")
        }
        Err(e) => Some(format!("skipped: no usable Vulkan here ({e})")),
    }
}
