//! Submissions: one command buffer per batch on a queue ("lane"), its
//! completion a timeline-semaphore value (or, without timeline semaphores,
//! a `VkFence`), and what it holds until then.

use std::collections::VecDeque;

use ash::vk;
use ash::vk::Handle;

use crate::VulkanError;

/// A buffer (and its memory) a submission uses until it completes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Temp {
    pub buffer: vk::Buffer,
    pub memory: vk::DeviceMemory,
}

impl Temp {
    /// # Safety
    /// Made on `device`; no pending work uses it.
    pub(crate) unsafe fn destroy(self, device: &ash::Device) {
        // SAFETY: the caller's contract.
        unsafe {
            device.destroy_buffer(self.buffer, None);
            device.free_memory(self.memory, None);
        }
    }
}

#[derive(Debug)]
struct InFlight {
    value: u64,
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
    temps: Vec<Temp>,
    set: Option<vk::DescriptorSet>,
}

/// A queue, its command pool, and the submissions not yet known complete.
#[derive(Debug)]
pub(crate) struct Lane {
    pub queue: vk::Queue,
    pool: vk::CommandPool,
    /// The timeline semaphore, or null where `VkFence`s are used.
    timeline: vk::Semaphore,
    next: u64,
    inflight: VecDeque<InFlight>,
    free_cmds: Vec<vk::CommandBuffer>,
}

fn everything() -> vk::MemoryBarrier<'static> {
    vk::MemoryBarrier::default()
        .src_access_mask(vk::AccessFlags::MEMORY_WRITE)
        .dst_access_mask(vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE)
}

impl Lane {
    pub(crate) fn new(
        device: &ash::Device,
        (family, queue): (u32, vk::Queue),
        timeline: bool,
    ) -> Result<Self, VulkanError> {
        let info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: a valid device and create info.
        let pool = unsafe { device.create_command_pool(&info, None) }
            .map_err(VulkanError::vk("creating a command pool"))?;
        let mut sem = vk::Semaphore::null();
        if timeline {
            let mut ty = vk::SemaphoreTypeCreateInfo::default()
                .semaphore_type(vk::SemaphoreType::TIMELINE)
                .initial_value(0);
            let info = vk::SemaphoreCreateInfo::default().push_next(&mut ty);
            // SAFETY: a valid device and create info; the feature is enabled.
            match unsafe { device.create_semaphore(&info, None) } {
                Ok(s) => sem = s,
                Err(e) => {
                    // SAFETY: the pool was just made and holds nothing.
                    unsafe { device.destroy_command_pool(pool, None) };
                    return Err(VulkanError::vk("creating a timeline semaphore")(e));
                }
            }
        }
        Ok(Self {
            queue,
            pool,
            timeline: sem,
            next: 0,
            inflight: VecDeque::new(),
            free_cmds: Vec::new(),
        })
    }

    /// The value of the last submission (0 before any).
    pub(crate) fn last(&self) -> u64 {
        self.next
    }

    /// Whether completions are timeline-semaphore values.
    pub(crate) fn timeline(&self) -> bool {
        !self.timeline.is_null()
    }

    /// A command buffer in the recording state, its first command a full
    /// memory barrier (so it sees every earlier submission's writes).
    pub(crate) fn begin(&mut self, device: &ash::Device) -> Result<vk::CommandBuffer, VulkanError> {
        let cmd = match self.free_cmds.pop() {
            Some(c) => c,
            None => {
                let info = vk::CommandBufferAllocateInfo::default()
                    .command_pool(self.pool)
                    .level(vk::CommandBufferLevel::PRIMARY)
                    .command_buffer_count(1);
                // SAFETY: a valid pool of this device.
                unsafe { device.allocate_command_buffers(&info) }
                    .map_err(VulkanError::vk("allocating a command buffer"))?[0]
            }
        };
        let info = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: `cmd` is not pending (fresh, or reclaimed after its
        // submission completed) and its pool allows resetting it.
        unsafe {
            device
                .begin_command_buffer(cmd, &info)
                .map_err(VulkanError::vk("recording a command buffer"))?;
            device.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::DependencyFlags::empty(),
                &[everything()],
                &[],
                &[],
            );
        }
        Ok(cmd)
    }

    /// Ends `cmd` (its writes made visible to the host), submits it and
    /// returns its completion value. `temps` and `set` are released when it
    /// completes.
    pub(crate) fn submit(
        &mut self,
        device: &ash::Device,
        cmd: vk::CommandBuffer,
        temps: Vec<Temp>,
        set: Option<vk::DescriptorSet>,
    ) -> Result<u64, VulkanError> {
        let to_host = vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::MEMORY_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ | vk::AccessFlags::HOST_WRITE);
        // SAFETY: `cmd` is recording (from `begin`).
        unsafe {
            device.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &[to_host],
                &[],
                &[],
            );
        }
        let fail = |lane: &mut Self, temps: Vec<Temp>, e| {
            // SAFETY: never submitted: nothing pending uses them.
            unsafe {
                for t in temps {
                    t.destroy(device);
                }
            }
            lane.free_cmds.push(cmd);
            e
        };
        // SAFETY: as above.
        if let Err(e) = unsafe { device.end_command_buffer(cmd) } {
            return Err(fail(
                self,
                temps,
                VulkanError::vk("ending a command buffer")(e),
            ));
        }
        let value = self.next + 1;
        let cmds = [cmd];
        let mut fence = vk::Fence::null();
        let result = if self.timeline.is_null() {
            // SAFETY: a valid device.
            match unsafe { device.create_fence(&vk::FenceCreateInfo::default(), None) } {
                Ok(f) => {
                    fence = f;
                    let info = vk::SubmitInfo::default().command_buffers(&cmds);
                    // SAFETY: `cmd` is executable; the fence is unsignalled.
                    unsafe { device.queue_submit(self.queue, &[info], fence) }
                }
                Err(e) => Err(e),
            }
        } else {
            let values = [value];
            let sems = [self.timeline];
            let mut tl =
                vk::TimelineSemaphoreSubmitInfo::default().signal_semaphore_values(&values);
            let info = vk::SubmitInfo::default()
                .command_buffers(&cmds)
                .signal_semaphores(&sems)
                .push_next(&mut tl);
            // SAFETY: `cmd` is executable; `value` is above every value
            // signalled on this semaphore before.
            unsafe { device.queue_submit(self.queue, &[info], vk::Fence::null()) }
        };
        if let Err(e) = result {
            if !fence.is_null() {
                // SAFETY: never submitted.
                unsafe { device.destroy_fence(fence, None) };
            }
            return Err(fail(self, temps, VulkanError::vk("submitting a batch")(e)));
        }
        self.next = value;
        self.inflight.push_back(InFlight {
            value,
            cmd,
            fence,
            temps,
            set,
        });
        Ok(value)
    }

    /// Whether submission `value` has completed.
    pub(crate) fn is_done(&self, device: &ash::Device, value: u64) -> Result<bool, VulkanError> {
        if value > self.next {
            return Err(VulkanError::other("fence of another backend"));
        }
        if self.timeline.is_null() {
            return match self.inflight.iter().find(|f| f.value == value) {
                None => Ok(true),
                // SAFETY: a fence of this device.
                Some(f) => unsafe { device.get_fence_status(f.fence) }
                    .map_err(VulkanError::vk("polling a fence")),
            };
        }
        // SAFETY: a timeline semaphore of this device.
        let now = unsafe { device.get_semaphore_counter_value(self.timeline) }
            .map_err(VulkanError::vk("polling a timeline semaphore"))?;
        Ok(now >= value)
    }

    /// Blocks until submission `value` has completed.
    pub(crate) fn wait(&self, device: &ash::Device, value: u64) -> Result<(), VulkanError> {
        if value > self.next {
            return Err(VulkanError::other("fence of another backend"));
        }
        if self.timeline.is_null() {
            if let Some(f) = self.inflight.iter().find(|f| f.value == value) {
                // SAFETY: a fence of this device.
                unsafe { device.wait_for_fences(&[f.fence], true, u64::MAX) }
                    .map_err(VulkanError::vk("waiting for a fence"))?;
            }
            return Ok(());
        }
        let sems = [self.timeline];
        let values = [value];
        let info = vk::SemaphoreWaitInfo::default()
            .semaphores(&sems)
            .values(&values);
        // SAFETY: a timeline semaphore of this device.
        unsafe { device.wait_semaphores(&info, u64::MAX) }
            .map_err(VulkanError::vk("waiting for a timeline semaphore"))
    }

    /// Waits for every submission.
    pub(crate) fn idle(&self, device: &ash::Device) -> Result<(), VulkanError> {
        if let Some(last) = self.inflight.back() {
            self.wait(device, last.value)?;
        }
        Ok(())
    }

    /// Releases what completed submissions held; their descriptor sets go
    /// to `sets` for reuse.
    pub(crate) fn reclaim(
        &mut self,
        device: &ash::Device,
        sets: &mut Vec<vk::DescriptorSet>,
    ) -> Result<(), VulkanError> {
        while let Some(front) = self.inflight.front() {
            if !self.is_done(device, front.value)? {
                break;
            }
            let Some(f) = self.inflight.pop_front() else {
                break;
            };
            // SAFETY: the submission completed: nothing pending uses its
            // buffers, fence or command buffer.
            unsafe {
                for t in f.temps {
                    t.destroy(device);
                }
                if !f.fence.is_null() {
                    device.destroy_fence(f.fence, None);
                }
            }
            self.free_cmds.push(f.cmd);
            sets.extend(f.set);
        }
        Ok(())
    }

    /// Destroys the lane after waiting for its work.
    ///
    /// # Safety
    /// Made on `device`; called once.
    pub(crate) unsafe fn destroy(&mut self, device: &ash::Device) {
        let _ = self.idle(device);
        let mut sets = Vec::new();
        let _ = self.reclaim(device, &mut sets);
        // SAFETY: everything completed (idle); the caller destroys once.
        unsafe {
            for f in self.inflight.drain(..) {
                for t in f.temps {
                    t.destroy(device);
                }
                if !f.fence.is_null() {
                    device.destroy_fence(f.fence, None);
                }
            }
            device.destroy_command_pool(self.pool, None);
            if !self.timeline.is_null() {
                device.destroy_semaphore(self.timeline, None);
            }
        }
    }
}
