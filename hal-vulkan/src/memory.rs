//! Buffers and their memory: regions, and the host-visible buffers that
//! stage uploads, downloads and batch arguments.

#![allow(
    clippy::cast_possible_truncation,
    reason = "Vulkan sizes and indices: checked against u32 and the region size first; hosts are 64-bit"
)]

use std::ptr::NonNull;

use ash::vk;
use pagedkv_core::{ErrorKind, MemoryKind, RegionDesc};

use crate::submit::Temp;
use crate::{VulkanBackend, VulkanError, VulkanRegion, setup};

/// Bytes staged per submission when the region is not mapped.
const STAGING_CHUNK: u64 = 64 << 20;

impl VulkanBackend {
    fn usage(&self) -> vk::BufferUsageFlags {
        let mut u = vk::BufferUsageFlags::TRANSFER_SRC
            | vk::BufferUsageFlags::TRANSFER_DST
            | vk::BufferUsageFlags::STORAGE_BUFFER;
        if self.o.device_address {
            u |= vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS;
        }
        u
    }

    /// A buffer of `bytes` bound to new memory of a type with `want` flags
    /// (preferring none of `avoid`). Returns it, its memory and the type's
    /// flags. Nothing leaks on failure.
    pub(crate) fn buffer(
        &self,
        bytes: u64,
        usage: vk::BufferUsageFlags,
        want: vk::MemoryPropertyFlags,
        avoid: vk::MemoryPropertyFlags,
    ) -> Result<(vk::Buffer, vk::DeviceMemory, vk::MemoryPropertyFlags), VulkanError> {
        let d = &self.o.device;
        // Refuse what no heap of a fitting type can hold before asking
        // Vulkan (a size beyond the device's limits is invalid usage).
        let mem = &self.o.memory;
        let fits = (0..mem.memory_type_count as usize).any(|i| {
            let t = mem.memory_types[i];
            t.property_flags.contains(want) && mem.memory_heaps[t.heap_index as usize].size >= bytes
        });
        if !fits {
            return Err(VulkanError::new(
                ErrorKind::OutOfMemory,
                "no memory heap holds a region this large",
            ));
        }
        let mut info = vk::BufferCreateInfo::default().size(bytes).usage(usage);
        info = if self.families.len() > 1 {
            info.sharing_mode(vk::SharingMode::CONCURRENT)
                .queue_family_indices(&self.families)
        } else {
            info.sharing_mode(vk::SharingMode::EXCLUSIVE)
        };
        // SAFETY: a valid device and create info.
        let buffer = unsafe { d.create_buffer(&info, None) }
            .map_err(VulkanError::vk("creating a buffer"))?;
        let free_buffer = |e| {
            // SAFETY: just created, unbound, unused.
            unsafe { d.destroy_buffer(buffer, None) };
            e
        };
        // SAFETY: a buffer of this device.
        let reqs = unsafe { d.get_buffer_memory_requirements(buffer) };
        let Some(ty) = setup::memory_type(mem, reqs.memory_type_bits, want, avoid) else {
            return Err(free_buffer(VulkanError::unsupported(
                "no memory type for this buffer",
            )));
        };
        let mut flags =
            vk::MemoryAllocateFlagsInfo::default().flags(vk::MemoryAllocateFlags::DEVICE_ADDRESS);
        let mut alloc = vk::MemoryAllocateInfo::default()
            .allocation_size(reqs.size)
            .memory_type_index(ty);
        if usage.contains(vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS) {
            alloc = alloc.push_next(&mut flags);
        }
        // SAFETY: a valid allocate info for this device.
        let memory = unsafe { d.allocate_memory(&alloc, None) }
            .map_err(|e| free_buffer(VulkanError::vk("allocating memory")(e)))?;
        // SAFETY: fresh buffer and memory of the required type and size.
        if let Err(e) = unsafe { d.bind_buffer_memory(buffer, memory, 0) } {
            // SAFETY: unused.
            unsafe { d.free_memory(memory, None) };
            return Err(free_buffer(VulkanError::vk("binding memory")(e)));
        }
        Ok((buffer, memory, mem.memory_types[ty as usize].property_flags))
    }

    /// A host-visible buffer holding `data`, for one submission.
    pub(crate) fn upload(
        &self,
        data: &[u8],
        usage: vk::BufferUsageFlags,
    ) -> Result<Temp, VulkanError> {
        let coherent =
            vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let (buffer, memory, _) = self.buffer(
            data.len().max(4) as u64,
            usage,
            coherent,
            vk::MemoryPropertyFlags::empty(),
        )?;
        let t = Temp { buffer, memory };
        let d = &self.o.device;
        // SAFETY: host-visible memory of at least `data.len()` bytes, mapped
        // once here and unmapped before anyone else sees it.
        unsafe {
            match d.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) {
                Ok(p) => {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>(), data.len());
                    d.unmap_memory(memory);
                }
                Err(e) => {
                    t.destroy(d);
                    return Err(VulkanError::vk("mapping a staging buffer")(e));
                }
            }
        }
        Ok(t)
    }

    pub(crate) fn new_region(&mut self, desc: &RegionDesc) -> Result<VulkanRegion, VulkanError> {
        desc.layout.validate()?;
        let bytes = desc.layout.region_bytes(desc.block_count).map_err(|_| {
            VulkanError::new(ErrorKind::OutOfMemory, "region larger than 2^64 bytes")
        })?;
        self.next_id += 1;
        let mut r = VulkanRegion {
            desc: *desc,
            buffer: vk::Buffer::null(),
            bytes,
            mapped: None,
            address: None,
            owner: self.owner,
            id: self.next_id,
        };
        if bytes == 0 {
            return Ok(r);
        }
        let host = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let (want, avoid) = match desc.memory {
            MemoryKind::Device(_) => (
                vk::MemoryPropertyFlags::DEVICE_LOCAL,
                vk::MemoryPropertyFlags::empty(),
            ),
            MemoryKind::PinnedHost | MemoryKind::Host => {
                (host, vk::MemoryPropertyFlags::DEVICE_LOCAL)
            }
        };
        let (buffer, memory, flags) = self.buffer(bytes, self.usage(), want, avoid)?;
        let d = &self.o.device;
        let map = flags.contains(host)
            && !(self.force_staging && matches!(desc.memory, MemoryKind::Device(_)));
        if map {
            // SAFETY: host-visible memory bound to this buffer, mapped once
            // for its whole life (unmapped implicitly when freed).
            match unsafe { d.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) } {
                Ok(p) => r.mapped = NonNull::new(p.cast::<u8>()),
                Err(e) => {
                    // SAFETY: unused.
                    unsafe { Temp { buffer, memory }.destroy(d) };
                    return Err(VulkanError::vk("mapping a region")(e));
                }
            }
        }
        if self.o.device_address {
            let info = vk::BufferDeviceAddressInfo::default().buffer(buffer);
            // SAFETY: the buffer has SHADER_DEVICE_ADDRESS usage and memory
            // allocated with the DEVICE_ADDRESS flag.
            r.address = Some(unsafe { d.get_buffer_device_address(&info) });
        }
        r.buffer = buffer;
        self.live.insert(r.id, (buffer, memory));
        Ok(r)
    }

    /// Checks a region is a live one of this backend.
    pub(crate) fn check(&self, r: &VulkanRegion) -> Result<(), VulkanError> {
        if r.owner != self.owner {
            return Err(VulkanError::other("region of another backend"));
        }
        if r.bytes > 0 && !self.live.contains_key(&r.id) {
            return Err(VulkanError::other("region already destroyed"));
        }
        Ok(())
    }

    pub(crate) fn range(r: &VulkanRegion, offset: u64, len: usize) -> Result<u64, VulkanError> {
        offset
            .checked_add(len as u64)
            .filter(|&e| e <= r.bytes)
            .map(|_| offset)
            .ok_or(VulkanError::other("byte range outside the region"))
    }

    /// The backend's staging buffer, grown to hold `len` bytes: mapped for
    /// its whole life, reused by every staged transfer (each waits for its
    /// copy, so one buffer is never used by two at once).
    fn staging(&mut self, len: u64) -> Result<(vk::Buffer, NonNull<u8>), VulkanError> {
        if let Some(s) = self.staging.filter(|s| s.2 >= len) {
            return Ok((s.0.buffer, s.1));
        }
        if let Some((t, _, _)) = self.staging.take() {
            // SAFETY: staged transfers wait for their copy: unused now.
            unsafe { t.destroy(&self.o.device) };
        }
        let size = len.max(1 << 20);
        let usage = vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::TRANSFER_DST;
        let host = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let (buffer, memory, _) =
            self.buffer(size, usage, host, vk::MemoryPropertyFlags::empty())?;
        let t = Temp { buffer, memory };
        let d = &self.o.device;
        // SAFETY: host-visible memory, mapped once for the buffer's life.
        let p =
            match unsafe { d.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) } {
                Ok(p) => NonNull::new(p.cast::<u8>()),
                Err(e) => {
                    // SAFETY: unused.
                    unsafe { t.destroy(d) };
                    return Err(VulkanError::vk("mapping the staging buffer")(e));
                }
            };
        let Some(p) = p else {
            // SAFETY: unused.
            unsafe { t.destroy(d) };
            return Err(VulkanError::other("null staging mapping"));
        };
        self.staging = Some((t, p, size));
        Ok((buffer, p))
    }

    /// Copies `len` bytes between a region and the staging buffer through
    /// the compute queue, waiting for the copy.
    fn staged(
        &mut self,
        r: &VulkanRegion,
        offset: u64,
        data: Option<&[u8]>,
        out: Option<&mut [u8]>,
        len: u64,
    ) -> Result<(), VulkanError> {
        let (stage, p) = self.staging(len)?;
        if let Some(bytes) = data {
            // SAFETY: the staging buffer holds at least `len` bytes and no
            // copy uses it now.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.as_ptr(), bytes.len()) };
        }
        let d = &self.o.device;
        let cmd = self.compute.begin(d)?;
        let (s, t, region) = if data.is_some() {
            (
                stage,
                r.buffer,
                vk::BufferCopy {
                    src_offset: 0,
                    dst_offset: offset,
                    size: len,
                },
            )
        } else {
            (
                r.buffer,
                stage,
                vk::BufferCopy {
                    src_offset: offset,
                    dst_offset: 0,
                    size: len,
                },
            )
        };
        // SAFETY: recording; both buffers live, the range inside both.
        unsafe { d.cmd_copy_buffer(cmd, s, t, &[region]) };
        let value = self.compute.submit(d, cmd, Vec::new(), None)?;
        self.compute.wait(d, value)?;
        if let Some(out) = out {
            // SAFETY: the copy completed (waited) and its writes were made
            // visible to the host (the submission's last barrier); coherent
            // memory of at least `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), out.as_mut_ptr(), out.len()) };
        }
        Ok(())
    }

    pub(crate) fn write(
        &mut self,
        r: &VulkanRegion,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VulkanError> {
        self.check(r)?;
        let at = Self::range(r, offset, data.len())?;
        self.idle()?;
        if data.is_empty() {
            return Ok(());
        }
        if let Some(p) = r.mapped {
            // SAFETY: in bounds, live, and the queues are idle: no device
            // access runs meanwhile; coherent memory needs no flush.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    p.as_ptr().add(at as usize),
                    data.len(),
                )
            };
            return Ok(());
        }
        for (i, chunk) in data.chunks(STAGING_CHUNK as usize).enumerate() {
            let o = at + i as u64 * STAGING_CHUNK;
            self.staged(r, o, Some(chunk), None, chunk.len() as u64)?;
        }
        Ok(())
    }

    pub(crate) fn read(
        &mut self,
        r: &VulkanRegion,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), VulkanError> {
        self.check(r)?;
        let at = Self::range(r, offset, out.len())?;
        self.idle()?;
        if out.is_empty() {
            return Ok(());
        }
        if let Some(p) = r.mapped {
            // SAFETY: as in `write`; `out` is an exclusive slice.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    p.as_ptr().add(at as usize),
                    out.as_mut_ptr(),
                    out.len(),
                )
            };
            return Ok(());
        }
        for (i, chunk) in out.chunks_mut(STAGING_CHUNK as usize).enumerate() {
            let o = at + i as u64 * STAGING_CHUNK;
            let n = chunk.len() as u64;
            self.staged(r, o, None, Some(chunk), n)?;
        }
        Ok(())
    }
}
