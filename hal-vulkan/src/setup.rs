//! Opening Vulkan: the loader, an instance (with the Khronos validation
//! layer when asked), the physical device, queues and memory types.

#![allow(
    clippy::cast_possible_truncation,
    reason = "Vulkan sizes and indices: checked against u32 and the region size first; hosts are 64-bit"
)]

use std::ffi::{CStr, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ash::vk;

use crate::{DeviceChoice, VulkanError, VulkanOptions};

const VALIDATION: &CStr = c"VK_LAYER_KHRONOS_validation";

/// Everything opened, before the backend wraps it.
pub(crate) struct Opened {
    /// Keeps the loader library loaded while the instance lives.
    #[allow(dead_code, reason = "held for its lifetime, never read")]
    pub entry: ash::Entry,
    pub instance: ash::Instance,
    pub messenger: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    pub messages: Arc<AtomicUsize>,
    pub props: vk::PhysicalDeviceProperties,
    pub device: ash::Device,
    /// (family, queue) for compute, and a transfer-only one where it exists.
    pub compute: (u32, vk::Queue),
    pub transfer: Option<(u32, vk::Queue)>,
    pub timeline: bool,
    pub device_address: bool,
    pub memory: vk::PhysicalDeviceMemoryProperties,
}

/// Counts validation warnings and errors (the test suites require none) and
/// prints each.
unsafe extern "system" fn on_message(
    severity: vk::DebugUtilsMessageSeverityFlagsEXT,
    kind: vk::DebugUtilsMessageTypeFlagsEXT,
    data: *const vk::DebugUtilsMessengerCallbackDataEXT<'_>,
    user: *mut c_void,
) -> vk::Bool32 {
    // SAFETY: the layer passes valid callback data whose message is a
    // NUL-terminated string (or null); `user` is the `AtomicUsize` the
    // backend keeps alive in an `Arc` for as long as the messenger exists.
    unsafe {
        let text = data
            .as_ref()
            .and_then(|d| d.message_as_c_str())
            .map(|m| m.to_string_lossy().into_owned())
            .unwrap_or_default();
        eprintln!("vulkan {severity:?} {kind:?}: {text}");
        if let Some(n) = user.cast::<AtomicUsize>().as_ref() {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
    vk::FALSE
}

fn layer_present(entry: &ash::Entry, name: &CStr) -> bool {
    // SAFETY: a plain query of the loader.
    unsafe { entry.enumerate_instance_layer_properties() }
        .unwrap_or_default()
        .iter()
        .any(|l| l.layer_name_as_c_str() == Ok(name))
}

/// Loads the Vulkan loader (`Unsupported` where there is none).
pub(crate) fn load() -> Result<ash::Entry, VulkanError> {
    // SAFETY: loading the system's Vulkan loader runs its initializers; it
    // is the documented way to use Vulkan without linking it.
    unsafe { ash::Entry::load() }.map_err(|e| {
        VulkanError::unsupported("no Vulkan loader (libvulkan) on this machine")
            .with_detail(e.to_string())
    })
}

fn instance(entry: &ash::Entry, validation: bool) -> Result<ash::Instance, VulkanError> {
    let app = vk::ApplicationInfo::default()
        .application_name(c"pagedkv")
        .api_version(vk::API_VERSION_1_2);
    let layers = [VALIDATION.as_ptr()];
    let exts = [ash::ext::debug_utils::NAME.as_ptr()];
    let mut info = vk::InstanceCreateInfo::default().application_info(&app);
    if validation {
        info = info
            .enabled_layer_names(&layers)
            .enabled_extension_names(&exts);
    }
    // SAFETY: the create info and everything it points to live until the
    // call returns.
    unsafe { entry.create_instance(&info, None) }
        .map_err(VulkanError::vk("creating a Vulkan instance"))
}

fn rank(t: vk::PhysicalDeviceType) -> u8 {
    match t {
        vk::PhysicalDeviceType::DISCRETE_GPU => 0,
        vk::PhysicalDeviceType::INTEGRATED_GPU => 1,
        vk::PhysicalDeviceType::VIRTUAL_GPU => 2,
        vk::PhysicalDeviceType::CPU => 3,
        _ => 4,
    }
}

/// Opens Vulkan as `options` ask. On failure everything created so far is
/// destroyed again.
pub(crate) fn open(options: &VulkanOptions) -> Result<Opened, VulkanError> {
    let entry = load()?;
    let validation = options.validation && layer_present(&entry, VALIDATION);
    if options.validation && !validation {
        return Err(VulkanError::unsupported(
            "the Khronos validation layer (VK_LAYER_KHRONOS_validation) is not installed",
        ));
    }
    let instance = instance(&entry, validation)?;
    let messages = Arc::new(AtomicUsize::new(0));
    let mut opened = Partial {
        entry,
        instance: Some(instance),
        messenger: None,
    };
    if validation {
        let du = ash::ext::debug_utils::Instance::new(&opened.entry, opened.instance());
        let info = vk::DebugUtilsMessengerCreateInfoEXT::default()
            .message_severity(
                vk::DebugUtilsMessageSeverityFlagsEXT::WARNING
                    | vk::DebugUtilsMessageSeverityFlagsEXT::ERROR,
            )
            .message_type(
                vk::DebugUtilsMessageTypeFlagsEXT::VALIDATION
                    | vk::DebugUtilsMessageTypeFlagsEXT::PERFORMANCE
                    | vk::DebugUtilsMessageTypeFlagsEXT::GENERAL,
            )
            .pfn_user_callback(Some(on_message))
            .user_data(Arc::as_ptr(&messages).cast_mut().cast());
        // SAFETY: the callback is a valid function; `user_data` outlives the
        // messenger (the backend holds the Arc and destroys the messenger
        // first).
        let m = unsafe { du.create_debug_utils_messenger(&info, None) }
            .map_err(VulkanError::vk("creating the debug messenger"))?;
        opened.messenger = Some((du, m));
    }
    let (physical, props) = choose(opened.instance(), options.device.as_ref())?;
    // SAFETY: a plain query of a valid physical device.
    let memory = unsafe {
        opened
            .instance()
            .get_physical_device_memory_properties(physical)
    };
    let (device, compute, transfer, timeline, device_address) =
        device(opened.instance(), physical, &props)?;
    let (entry, instance, messenger) = opened.disarm();
    Ok(Opened {
        entry,
        instance: instance.ok_or(VulkanError::other("instance lost"))?,
        messenger,
        messages,
        props,
        device,
        compute,
        transfer,
        timeline,
        device_address,
        memory,
    })
}

/// An instance and messenger being opened: destroyed again if dropped
/// before `disarm`.
struct Partial {
    entry: ash::Entry,
    instance: Option<ash::Instance>,
    messenger: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
}

impl Partial {
    fn instance(&self) -> &ash::Instance {
        self.instance.as_ref().expect("set at construction")
    }

    /// Hands the objects out; dropping `self` then destroys nothing.
    #[allow(clippy::type_complexity, reason = "three parts, named at the one call")]
    fn disarm(
        mut self,
    ) -> (
        ash::Entry,
        Option<ash::Instance>,
        Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    ) {
        (
            self.entry.clone(),
            self.instance.take(),
            self.messenger.take(),
        )
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        // SAFETY: objects created above and not handed out (`disarm` takes
        // them first when opening succeeds); the messenger goes first.
        unsafe {
            if let Some((du, m)) = self.messenger.take() {
                du.destroy_debug_utils_messenger(m, None);
            }
            if let Some(i) = self.instance.take() {
                i.destroy_instance(None);
            }
        }
    }
}

/// The physical device: the caller's choice, else the first discrete GPU,
/// then integrated, virtual, CPU.
fn choose(
    instance: &ash::Instance,
    choice: Option<&DeviceChoice>,
) -> Result<(vk::PhysicalDevice, vk::PhysicalDeviceProperties), VulkanError> {
    // SAFETY: plain queries of a valid instance.
    let all: Vec<_> = unsafe { instance.enumerate_physical_devices() }
        .map_err(VulkanError::vk("listing physical devices"))?
        .into_iter()
        .map(|p| (p, unsafe { instance.get_physical_device_properties(p) }))
        .filter(|(_, props)| props.api_version >= vk::API_VERSION_1_1)
        .collect();
    if all.is_empty() {
        return Err(VulkanError::unsupported("no Vulkan 1.1 device"));
    }
    let found = match choice {
        Some(DeviceChoice::Index(i)) => all.get(*i).copied(),
        Some(DeviceChoice::Name(n)) => all.iter().copied().find(|(_, p)| {
            p.device_name_as_c_str()
                .is_ok_and(|s| s.to_string_lossy().contains(n.as_str()))
        }),
        None => all.iter().copied().min_by_key(|(_, p)| rank(p.device_type)),
    };
    found.ok_or(VulkanError::unsupported(
        "no Vulkan device matches the choice",
    ))
}

type DeviceParts = (
    ash::Device,
    (u32, vk::Queue),
    Option<(u32, vk::Queue)>,
    bool,
    bool,
);

fn device(
    instance: &ash::Instance,
    physical: vk::PhysicalDevice,
    props: &vk::PhysicalDeviceProperties,
) -> Result<DeviceParts, VulkanError> {
    // SAFETY: plain queries of a valid physical device.
    let families = unsafe { instance.get_physical_device_queue_family_properties(physical) };
    let compute = families
        .iter()
        .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
        .ok_or(VulkanError::unsupported("no compute queue"))? as u32;
    let transfer = families
        .iter()
        .position(|f| {
            f.queue_flags.contains(vk::QueueFlags::TRANSFER)
                && !f
                    .queue_flags
                    .intersects(vk::QueueFlags::COMPUTE | vk::QueueFlags::GRAPHICS)
        })
        .map(|i| i as u32);
    let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
    if props.api_version >= vk::API_VERSION_1_2 {
        let mut f2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut v12);
        // SAFETY: a plain query with a valid feature chain.
        unsafe { instance.get_physical_device_features2(physical, &mut f2) };
    }
    let timeline = v12.timeline_semaphore == vk::TRUE;
    let device_address = v12.buffer_device_address == vk::TRUE;
    let mut enable = vk::PhysicalDeviceVulkan12Features::default()
        .timeline_semaphore(timeline)
        .buffer_device_address(device_address);
    let prio = [1.0f32];
    let mut queues = vec![
        vk::DeviceQueueCreateInfo::default()
            .queue_family_index(compute)
            .queue_priorities(&prio),
    ];
    if let Some(t) = transfer {
        queues.push(
            vk::DeviceQueueCreateInfo::default()
                .queue_family_index(t)
                .queue_priorities(&prio),
        );
    }
    let mut info = vk::DeviceCreateInfo::default().queue_create_infos(&queues);
    if props.api_version >= vk::API_VERSION_1_2 {
        info = info.push_next(&mut enable);
    }
    // SAFETY: the create info and its chain live until the call returns.
    let device = unsafe { instance.create_device(physical, &info, None) }
        .map_err(VulkanError::vk("creating the logical device"))?;
    // SAFETY: queue 0 of families requested just above.
    let cq = unsafe { device.get_device_queue(compute, 0) };
    let tq = transfer.map(|t| {
        // SAFETY: queue 0 of a family requested just above.
        (t, unsafe { device.get_device_queue(t, 0) })
    });
    Ok((device, (compute, cq), tq, timeline, device_address))
}

/// A memory type index with `want` flags among those `bits` allows,
/// preferring types without `avoid` flags.
pub(crate) fn memory_type(
    mem: &vk::PhysicalDeviceMemoryProperties,
    bits: u32,
    want: vk::MemoryPropertyFlags,
    avoid: vk::MemoryPropertyFlags,
) -> Option<u32> {
    let n = mem.memory_type_count.min(vk::MAX_MEMORY_TYPES as u32);
    let ok = |i: u32, avoid: vk::MemoryPropertyFlags| {
        bits & (1 << i) != 0
            && mem.memory_types[i as usize].property_flags.contains(want)
            && !mem.memory_types[i as usize]
                .property_flags
                .intersects(avoid)
    };
    (0..n)
        .find(|&i| ok(i, avoid))
        .or_else(|| (0..n).find(|&i| ok(i, vk::MemoryPropertyFlags::empty())))
}
