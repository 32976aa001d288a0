//! Building and running one VM from a [`VmConfig`].
//!
//! Boot flow: validate the config → block termination signals → open KVM, create the VM with
//! an in-kernel irqchip and PIT → map guest memory → load kernel and initramfs → wire the
//! devices (console, i8042, virtio: vsock, disks in order, rng, balloon, shares, net) → write command line,
//! PVH start info, MP table and GDT → create and start the vCPUs → run the event loop until
//! the guest stops or a signal arrives.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use linux_loader::loader::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, BootError};
use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::{self, ControlFds, EventLoopError};
use crate::exit::VmOutcome;
use crate::memory::{create_guest_memory, MemoryError};
use crate::signals::SignalFd;
use crate::vcpu::{self, VcpuError};
use crate::vhost_user_fs::{VhostUserFs, VhostUserFsError};
use crate::x86_64::layout::{ram_regions, CMDLINE_MAX_SIZE, KVM_TSS_START};
use crate::x86_64::mptable::{self, MptableError};
use crate::x86_64::regs::{self, RegsError};
use berth_devices::legacy::PanicWatch;
use berth_devices::virtio::balloon::{Balloon, BalloonError};
use berth_devices::virtio::block::{Block, BlockError};
use berth_devices::virtio::net::{Net, NetError};
use berth_devices::virtio::rng::{OsEntropy, Rng};
use berth_devices::vsock::{MuxerConfig, Vsock, VsockMuxer};
use berth_devices::GuestMemoryMmap;

/// Errors of setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("invalid VM config")]
    Config(#[from] ConfigError),
    /// A KVM ioctl failed.
    #[error("KVM: cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be allocated.
    #[error("cannot allocate guest memory")]
    Memory(#[source] MemoryError),
    /// Loading the guest failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Wiring a device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// The boot GDT could not be written.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// A vCPU could not be created or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The console log could not be opened.
    #[error("cannot open the console log")]
    Console(#[source] std::io::Error),
    /// An eventfd or the signalfd could not be created.
    #[error("cannot create the VMM's control fds")]
    Control(#[source] std::io::Error),
    /// A device could not be created.
    #[error("cannot create device {0}")]
    CreateDevice(&'static str, #[source] std::io::Error),
    /// The vsock device's host socket could not be set up.
    #[error("cannot set up the vsock device")]
    Vsock(#[source] berth_devices::vsock::VsockError),
    /// A disk image could not be attached.
    #[error("cannot attach disk {index}")]
    Disk {
        /// Position of the disk in the config (0 is /dev/vda).
        index: usize,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// The balloon could not be created.
    #[error("cannot create the balloon device")]
    Balloon(#[source] BalloonError),
    /// The event loop failed.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The network device could not reach its backend.
    #[error("cannot set up the network device")]
    Net(#[source] NetError),
    /// A virtio-fs device could not be created.
    #[error("cannot create the virtio-fs device {0:?}")]
    Share(String, #[source] VhostUserFsError),
}

/// Boots the VM described by `config` and runs it to its end.
pub fn run(config: &VmConfig) -> Result<VmOutcome, VmError> {
    config.validate()?;
    // Before any thread exists, so every vCPU thread inherits the mask.
    let signals = SignalFd::block_terminating().map_err(VmError::Control)?;

    let kvm = Kvm::new().map_err(|e| VmError::Kvm("open /dev/kvm", e))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("create the VM", e))?;
    vm.set_tss_address(KVM_TSS_START as usize)
        .map_err(|e| VmError::Kvm("set the TSS address", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("create the irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("create the PIT", e))?;

    let mem_size = config.mem_bytes();
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(mem_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    let mem = create_guest_memory(&ranges).map_err(VmError::Memory)?;
    register_memory(&vm, &mem)?;

    let (entry, kernel_end) = boot::load_kernel(&mem, &config.kernel)?;
    let initramfs = match &config.initramfs {
        Some(path) => Some(boot::load_initramfs(&mem, mem_size, kernel_end, path)?),
        None => None,
    };

    let console = open_console(config)?;
    let panicked = console.panicked();
    let reset = EventFd::new(EFD_NONBLOCK).map_err(VmError::Control)?;
    let mut devices = DeviceManager::new();
    devices.register_legacy(&vm, console, &reset)?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(VmError::Cmdline)?;
    cmdline
        .insert_str(&config.cmdline)
        .map_err(VmError::Cmdline)?;
    if let Some(vsock) = &config.vsock {
        let muxer = VsockMuxer::new(MuxerConfig {
            guest_cid: u64::from(vsock.guest_cid),
            uds_path: vsock.uds_path.clone(),
        })
        .map_err(VmError::Vsock)?;
        let device = Vsock::new(u64::from(vsock.guest_cid), muxer)
            .map_err(|e| VmError::CreateDevice("vsock", e))?;
        devices.register_mmio_virtio(
            &vm,
            &mem,
            &mut cmdline,
            "vsock",
            Arc::new(Mutex::new(device)),
        )?;
    }
    // Disks in config order, so the guest names them vda, vdb, ... in that order.
    for (index, disk) in config.disks.iter().enumerate() {
        let block = Block::open(&disk.path, disk.read_only)
            .map_err(|source| VmError::Disk { index, source })?;
        let name = format!("blk{index}");
        devices.register_mmio_virtio(
            &vm,
            &mem,
            &mut cmdline,
            &name,
            Arc::new(Mutex::new(block)),
        )?;
    }
    if config.rng {
        let entropy = OsEntropy::open().map_err(|e| VmError::CreateDevice("rng", e))?;
        let rng = Rng::new(entropy).map_err(|e| VmError::CreateDevice("rng", e))?;
        devices.register_mmio_virtio(&vm, &mem, &mut cmdline, "rng", Arc::new(Mutex::new(rng)))?;
    }
    if config.balloon {
        let balloon = Balloon::new().map_err(VmError::Balloon)?;
        let balloon = Arc::new(Mutex::new(balloon));
        devices.register_mmio_virtio(&vm, &mem, &mut cmdline, "balloon", balloon)?;
    }
    for share in &config.shares {
        // A backend that cannot be reached leaves the device broken, not the VM unbootable.
        let fs = VhostUserFs::new(share).map_err(|e| VmError::Share(share.tag.clone(), e))?;
        let name = format!("fs {}", share.tag);
        devices.register_mmio_virtio(&vm, &mem, &mut cmdline, &name, Arc::new(Mutex::new(fs)))?;
    }

    if let Some(net) = &config.net {
        let device = Net::connect(&net.socket, net.mac).map_err(VmError::Net)?;
        devices.register_mmio_virtio(
            &vm,
            &mem,
            &mut cmdline,
            "net",
            Arc::new(Mutex::new(device)),
        )?;
    }

    boot::write_boot_info(&mem, mem_size, &cmdline, initramfs)?;
    mptable::write_mptable(&mem, config.vcpus)?;
    regs::write_gdt(&mem)?;

    let template = vcpu::VcpuTemplate {
        supported_cpuid: kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("get the supported CPUID", e))?,
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    let vcpu_wake = EventFd::new(EFD_NONBLOCK).map_err(VmError::Control)?;
    let (sender, receiver) = mpsc::channel();
    let pio = Arc::new(devices.pio.clone());
    let mmio = Arc::new(devices.mmio.clone());
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        vcpus.push(vcpu::create(&vm, &template, id, config.vcpus, entry)?);
    }
    for (id, fd) in (0..).zip(vcpus) {
        let wake = vcpu_wake.try_clone().map_err(VmError::Control)?;
        // The threads run until the process exits: the VMM is one-shot.
        vcpu::spawn(id, fd, pio.clone(), mmio.clone(), sender.clone(), wake)?;
    }

    let control = ControlFds {
        vcpu_wake,
        reset,
        signals,
        panicked,
    };
    Ok(event_loop::run(&control, &receiver, devices.subscribers())?)
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let region_desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
        // outlives the VM: both live until the process exits.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|e| VmError::Kvm("register guest memory", e))?;
    }
    Ok(())
}

type Console = PanicWatch<LineWriter<Box<dyn Write + Send>>>;

fn open_console(config: &VmConfig) -> Result<Console, VmError> {
    let out: Box<dyn Write + Send> = match &config.console_log {
        Some(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(VmError::Console)?,
        ),
        None => Box::new(std::io::stdout()),
    };
    Ok(PanicWatch::new(LineWriter::new(out)))
}
