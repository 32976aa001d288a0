//! The single place devices are wired to the VM.
//!
//! [`DeviceManager::register_mmio_virtio`] does everything a virtio device needs: an MMIO
//! window, an ioeventfd per queue, an irqfd, the bus entry, the event-loop registration and the
//! `virtio_mmio.device=` command-line entry. Devices never see the `VmFd`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::loader::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::x86_64::layout::{IRQ_BASE, IRQ_MAX, VIRTIO_MMIO_END, VIRTIO_MMIO_START};
use berth_devices::bus::{Bus, BusError};
use berth_devices::legacy::{
    EventFdTrigger, SerialConsole, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN, I8042, I8042_PORT_BASE,
    I8042_PORT_LEN,
};
use berth_devices::virtio::mmio::{MmioTransport, QueueError, MMIO_DEVICE_SIZE};
use berth_devices::virtio::VirtioDevice;
use berth_devices::{EventSubscriber, GuestMemoryMmap};

/// Offset of the `QueueNotify` register in a virtio-mmio window.
const MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// Errors of device wiring.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No interrupt lines left.
    #[error("no free interrupt line for another device")]
    NoIrq,
    /// No MMIO space left.
    #[error("no free MMIO window for another device")]
    NoMmio,
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A KVM irqfd/ioeventfd registration failed.
    #[error("cannot register {0} with KVM")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The bus refused the device.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The transport could not be built.
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] QueueError),
    /// The command line is full.
    #[error("cannot add the device to the command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
}

/// A device the event loop polls.
pub type Subscriber = Arc<Mutex<dyn EventSubscriber>>;

/// Owns the buses while they are being filled, then hands them to the vCPUs.
#[derive(Default)]
pub struct DeviceManager {
    /// Port-I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    next_mmio: u64,
    next_irq: u32,
    subscribers: Vec<(String, Subscriber)>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .field(
                "subscribers",
                &self.subscribers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl DeviceManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self {
            next_mmio: VIRTIO_MMIO_START,
            next_irq: IRQ_BASE,
            ..Default::default()
        }
    }

    /// The devices the event loop must poll, with a name for logs.
    pub fn subscribers(&self) -> &[(String, Subscriber)] {
        &self.subscribers
    }

    /// COM1 writing to `out`, and the i8042 whose reset command writes to `reset`.
    pub fn register_legacy<W: Write + Send + 'static>(
        &mut self,
        vm: &VmFd,
        out: W,
        reset: &EventFd,
    ) -> Result<(), DeviceError> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(|e| DeviceError::Kvm("serial irqfd", e))?;
        let serial = SerialConsole::new(EventFdTrigger::new(irq), out);
        self.pio
            .insert(Arc::new(Mutex::new(serial)), COM1_PORT_BASE, COM1_PORT_LEN)?;
        let reset = reset.try_clone().map_err(DeviceError::EventFd)?;
        let i8042 = I8042::new(EventFdTrigger::new(reset));
        self.pio
            .insert(Arc::new(Mutex::new(i8042)), I8042_PORT_BASE, I8042_PORT_LEN)?;
        Ok(())
    }

    /// Wires a virtio device onto the MMIO bus; see the module documentation.
    pub fn register_mmio_virtio<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        cmdline: &mut Cmdline,
        name: &str,
        device: Arc<Mutex<D>>,
    ) -> Result<(), DeviceError>
    where
        D: VirtioDevice + EventSubscriber + 'static,
    {
        let base = self.next_mmio;
        if base + MMIO_DEVICE_SIZE > VIRTIO_MMIO_END {
            return Err(DeviceError::NoMmio);
        }
        let irq = self.next_irq;
        if irq > IRQ_MAX {
            return Err(DeviceError::NoIrq);
        }

        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(|e| DeviceError::Kvm("irqfd", e))?;
        {
            let locked = device.lock().unwrap_or_else(|e| e.into_inner());
            let notify = IoEventAddress::Mmio(base + MMIO_QUEUE_NOTIFY);
            for (index, event) in locked.queue_events().iter().enumerate() {
                // The driver writes the queue index to QueueNotify; match on it.
                vm.register_ioevent(event, &notify, index as u32)
                    .map_err(|e| DeviceError::Kvm("ioeventfd", e))?;
            }
        }
        let virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport =
            MmioTransport::new(virtio, mem.clone(), irqfd).map_err(DeviceError::Transport)?;
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_DEVICE_SIZE)?;
        cmdline
            .add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(base), irq, None)
            .map_err(DeviceError::Cmdline)?;
        self.subscribers.push((name.to_owned(), device));

        self.next_mmio += MMIO_DEVICE_SIZE;
        self.next_irq += 1;
        tracing::debug!("{name}: virtio-mmio at {base:#x}, irq {irq}");
        Ok(())
    }
}
