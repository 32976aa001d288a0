//! The virtio-mmio transport, version 2 (virtio 1.x "modern" only), as a state machine.
//!
//! The guest driver walks the device status through ACKNOWLEDGE → DRIVER → FEATURES_OK →
//! DRIVER_OK. Feature negotiation is only accepted between DRIVER and FEATURES_OK, queue set-up
//! only between FEATURES_OK and DRIVER_OK; anything out of order is ignored, so a confused or
//! hostile driver cannot activate a half-configured device. At DRIVER_OK the queues are
//! validated against guest memory and handed to the device.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{InterruptKind, MmioInterrupt, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::GuestMemoryMmap;

pub use virtio_queue::Error as QueueError;

/// Size of the MMIO window of one device: registers plus configuration space.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;

/// "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// Our vendor ID: "BRTH" would do, but Linux only prints it; keep QEMU's convention of 0.
const VENDOR_ID: u32 = 0;

/// Device status bits (virtio 1.1, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// A virtio device behind the MMIO register layout.
#[derive(Debug)]
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    interrupt_status: Arc<AtomicU32>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, raising its interrupt through `irqfd`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> Result<Self, virtio_queue::Error> {
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let interrupt = Arc::new(MmioInterrupt::new(interrupt_status.clone(), irqfd));
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .map(|max| Queue::new(*max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            interrupt_status,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// The current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let queue = self.queues.get_mut(self.queue_select as usize)?;
        Some(queue)
    }

    /// Applies `f` to the selected queue while queue set-up is allowed.
    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        let allowed = self.has(status::FEATURES_OK) && !self.has(status::DRIVER_OK);
        if !allowed {
            tracing::warn!(
                "virtio-mmio: queue write outside of set-up, status {:#x}",
                self.status
            );
            return;
        }
        if let Some(queue) = self.selected_queue() {
            f(queue);
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let device = lock(&self.device);
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => device.avail_features() as u32,
                1 => (device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => self.update_queue(|q| q.set_size(value as u16)),
            reg::QUEUE_READY => self.update_queue(|q| q.set_ready(value == 1)),
            reg::QUEUE_DESC_LOW => {
                self.update_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.update_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_AVAIL_LOW => {
                self.update_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_AVAIL_HIGH => {
                self.update_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_USED_LOW => {
                self.update_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_USED_HIGH => {
                self.update_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(value),
            _ => tracing::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if !self.has(status::DRIVER) || self.has(status::FEATURES_OK) {
            tracing::warn!("virtio-mmio: feature write outside negotiation");
            return;
        }
        let value = u64::from(value);
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | value,
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    /// A notification that did not go through an ioeventfd (for example before the VMM
    /// registered one): forward it to the queue's event.
    fn notify_queue(&mut self, index: u32) {
        let device = lock(&self.device);
        if let Some(event) = device.queue_events().get(index as usize) {
            if let Err(e) = event.write(1) {
                tracing::error!("virtio-mmio: cannot notify queue {index}: {e}");
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        // The driver may only add bits, one step at a time, in the order of the spec.
        let added = value & !self.status;
        if value & self.status != self.status || added.count_ones() != 1 {
            tracing::warn!(
                "virtio-mmio: status {:#x} -> {value:#x} refused",
                self.status
            );
            return;
        }
        match added {
            status::ACKNOWLEDGE if self.status == 0 => self.status = value,
            status::DRIVER if self.has(status::ACKNOWLEDGE) => self.status = value,
            status::FEATURES_OK if self.has(status::DRIVER) => self.accept_features(value),
            status::DRIVER_OK if self.has(status::FEATURES_OK) => self.activate(value),
            _ => tracing::warn!(
                "virtio-mmio: status {:#x} -> {value:#x} refused",
                self.status
            ),
        }
    }

    /// Accepts the driver's features if they are a modern subset of the offer; otherwise
    /// FEATURES_OK stays clear, which tells the driver negotiation failed.
    fn accept_features(&mut self, value: u32) {
        let mut device = lock(&self.device);
        let offered = device.avail_features();
        let subset = self.acked_features & !offered == 0;
        let modern = self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0;
        if subset && modern {
            device.set_acked_features(self.acked_features);
            self.status = value;
        } else {
            tracing::warn!(
                "virtio-mmio: driver features {:#x} not acceptable (offer {offered:#x})",
                self.acked_features
            );
        }
    }

    fn activate(&mut self, value: u32) {
        // Queues past the device's count belong to features the driver declined: it leaves
        // them unset, and they are neither checked nor handed over.
        let count = lock(&self.device)
            .active_queue_count()
            .min(self.queues.len());
        let queues = &self.queues[..count];
        let invalid = queues
            .iter()
            .position(|q| !q.ready() || !q.is_valid(&self.mem));
        if let Some(index) = invalid {
            tracing::warn!("virtio-mmio: queue {index} not ready or invalid at DRIVER_OK");
            self.needs_reset();
            return;
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let queues = match queues.iter().map(|q| Queue::try_from(q.state())).collect() {
            Ok(queues) => queues,
            Err(e) => {
                tracing::warn!("virtio-mmio: cannot hand over queues: {e}");
                self.needs_reset();
                return;
            }
        };
        let result = lock(&self.device).activate(self.mem.clone(), interrupt, queues);
        match result {
            Ok(()) => self.status = value,
            Err(e) => {
                tracing::warn!("virtio-mmio: activation failed: {e}");
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.signal(InterruptKind::Config) {
            tracing::error!("virtio-mmio: cannot signal config change: {e}");
        }
    }

    fn reset(&mut self) {
        let mut device = lock(&self.device);
        if device.is_activated() && !device.reset() {
            tracing::warn!("virtio-mmio: device cannot be reset");
            self.status |= status::FAILED;
            return;
        }
        drop(device);
        self.queues.iter_mut().for_each(QueueT::reset);
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
    }
}

fn lock(
    device: &Arc<Mutex<dyn VirtioDevice>>,
) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    // A poisoned device means a panic in its own code; the VM goes down with that thread.
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const QUEUE_MAX: u16 = 16;
    /// Guest addresses of a queue's rings, all well inside the test memory.
    const DESC: u32 = 0x1000;
    const AVAIL: u32 = 0x2000;
    const USED: u32 = 0x3000;

    #[derive(Debug)]
    struct Dummy {
        acked: u64,
        active: bool,
        config: [u8; 8],
        events: Vec<EventFd>,
        resettable: bool,
        /// One entry per queue.
        sizes: Vec<u16>,
        /// Queues the driver sets up, counted from the first.
        in_use: usize,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 1
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn active_queue_count(&self) -> usize {
            self.in_use
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if queues.len() != self.in_use {
                return Err(ActivateError::QueueCount {
                    expected: self.in_use,
                    got: queues.len(),
                });
            }
            self.active = true;
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active
        }
        fn reset(&mut self) -> bool {
            self.active = false;
            self.resettable
        }
    }

    struct Fixture {
        transport: MmioTransport,
        device: Arc<Mutex<Dummy>>,
        irq: EventFd,
    }

    fn fixture() -> Fixture {
        fixture_with_queues(1, 1)
    }

    /// A device with `queues` queues of which the driver sets up the first `in_use`.
    fn fixture_with_queues(queues: usize, in_use: usize) -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let device = Arc::new(Mutex::new(Dummy {
            acked: 0,
            active: false,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            events: (0..queues)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            resettable: true,
            sizes: vec![QUEUE_MAX; queues],
            in_use,
        }));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let transport = MmioTransport::new(device.clone(), mem, irq.try_clone().unwrap()).unwrap();
        Fixture {
            transport,
            device,
            irq,
        }
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Walks the driver side up to FEATURES_OK, accepting `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        write(t, reg::STATUS, status::ACKNOWLEDGE);
        write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(t, reg::DRIVER_FEATURES_SEL, 0);
        write(t, reg::DRIVER_FEATURES, features as u32);
        write(t, reg::DRIVER_FEATURES_SEL, 1);
        write(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        write(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn set_up_queue(t: &mut MmioTransport) {
        write(t, reg::QUEUE_SEL, 0);
        write(t, reg::QUEUE_NUM, u32::from(QUEUE_MAX));
        write(t, reg::QUEUE_DESC_LOW, DESC);
        write(t, reg::QUEUE_DESC_HIGH, 0);
        write(t, reg::QUEUE_AVAIL_LOW, AVAIL);
        write(t, reg::QUEUE_AVAIL_HIGH, 0);
        write(t, reg::QUEUE_USED_LOW, USED);
        write(t, reg::QUEUE_USED_HIGH, 0);
        write(t, reg::QUEUE_READY, 1);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn read_identity_registers_returns_virtio_v2() {
        let mut f = fixture();

        assert_eq!(read(&mut f.transport, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(read(&mut f.transport, reg::VERSION), 2);
        assert_eq!(read(&mut f.transport, reg::DEVICE_ID), 42);
        assert_eq!(
            read(&mut f.transport, reg::QUEUE_NUM_MAX),
            u32::from(QUEUE_MAX)
        );
    }

    #[test]
    fn read_device_features_high_word_has_version_1() {
        let mut f = fixture();

        write(&mut f.transport, reg::DEVICE_FEATURES_SEL, 1);

        assert_eq!(read(&mut f.transport, reg::DEVICE_FEATURES), 1);
    }

    #[test]
    fn full_handshake_activates_device() {
        let mut f = fixture();
        negotiate(&mut f.transport, (1 << VIRTIO_F_VERSION_1) | 1);
        set_up_queue(&mut f.transport);

        write(&mut f.transport, reg::STATUS, ALL_OK);

        assert_eq!(read(&mut f.transport, reg::STATUS), ALL_OK);
        assert!(f.device.lock().unwrap().active);
        assert_eq!(
            f.device.lock().unwrap().acked,
            (1 << VIRTIO_F_VERSION_1) | 1
        );
    }

    #[test]
    fn driver_ok_without_queue_of_declined_feature_activates_device() {
        let mut f = fixture_with_queues(2, 1);
        negotiate(&mut f.transport, 1 << VIRTIO_F_VERSION_1);
        set_up_queue(&mut f.transport);

        write(&mut f.transport, reg::STATUS, ALL_OK);

        assert_eq!(read(&mut f.transport, reg::STATUS), ALL_OK);
        assert!(f.device.lock().unwrap().active);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mut f = fixture();

        negotiate(&mut f.transport, 1);

        assert_eq!(f.transport.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn features_not_offered_are_refused() {
        let mut f = fixture();

        negotiate(&mut f.transport, (1 << VIRTIO_F_VERSION_1) | (1 << 5));

        assert_eq!(f.transport.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn status_skipping_a_step_is_refused() {
        let mut f = fixture();

        write(
            &mut f.transport,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );

        assert_eq!(f.transport.status(), 0);
    }

    #[test]
    fn driver_ok_before_features_ok_does_not_activate() {
        let mut f = fixture();
        write(&mut f.transport, reg::STATUS, status::ACKNOWLEDGE);
        write(
            &mut f.transport,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );

        write(
            &mut f.transport,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );

        assert!(!f.device.lock().unwrap().active);
    }

    #[test]
    fn driver_ok_with_unready_queue_sets_needs_reset() {
        let mut f = fixture();
        negotiate(&mut f.transport, 1 << VIRTIO_F_VERSION_1);

        write(&mut f.transport, reg::STATUS, ALL_OK);

        assert!(!f.device.lock().unwrap().active);
        assert_ne!(f.transport.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(f.irq.read().unwrap(), 1);
    }

    #[test]
    fn driver_ok_with_rings_outside_memory_does_not_activate() {
        let mut f = fixture();
        negotiate(&mut f.transport, 1 << VIRTIO_F_VERSION_1);
        set_up_queue(&mut f.transport);
        write(&mut f.transport, reg::QUEUE_READY, 0);
        write(&mut f.transport, reg::QUEUE_USED_HIGH, 1);
        write(&mut f.transport, reg::QUEUE_READY, 1);

        write(&mut f.transport, reg::STATUS, ALL_OK);

        assert!(!f.device.lock().unwrap().active);
    }

    #[test]
    fn queue_write_after_driver_ok_is_ignored() {
        let mut f = fixture();
        negotiate(&mut f.transport, 1 << VIRTIO_F_VERSION_1);
        set_up_queue(&mut f.transport);
        write(&mut f.transport, reg::STATUS, ALL_OK);

        write(&mut f.transport, reg::QUEUE_READY, 0);

        assert_eq!(read(&mut f.transport, reg::QUEUE_READY), 1);
    }

    #[test]
    fn queue_select_out_of_range_reads_zero() {
        let mut f = fixture();

        write(&mut f.transport, reg::QUEUE_SEL, 7);

        assert_eq!(read(&mut f.transport, reg::QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn interrupt_ack_clears_status_bits() {
        let mut f = fixture();
        f.transport.interrupt.signal(InterruptKind::Queue).unwrap();
        f.transport.interrupt.signal(InterruptKind::Config).unwrap();

        write(
            &mut f.transport,
            reg::INTERRUPT_ACK,
            InterruptKind::Queue as u32,
        );

        assert_eq!(
            read(&mut f.transport, reg::INTERRUPT_STATUS),
            InterruptKind::Config as u32
        );
    }

    #[test]
    fn status_zero_resets_active_device() {
        let mut f = fixture();
        negotiate(&mut f.transport, 1 << VIRTIO_F_VERSION_1);
        set_up_queue(&mut f.transport);
        write(&mut f.transport, reg::STATUS, ALL_OK);

        write(&mut f.transport, reg::STATUS, 0);

        assert_eq!(f.transport.status(), 0);
        assert!(!f.device.lock().unwrap().active);
        assert_eq!(read(&mut f.transport, reg::QUEUE_READY), 0);
    }

    #[test]
    fn reset_of_unresettable_device_sets_failed() {
        let mut f = fixture();
        f.device.lock().unwrap().resettable = false;
        negotiate(&mut f.transport, 1 << VIRTIO_F_VERSION_1);
        set_up_queue(&mut f.transport);
        write(&mut f.transport, reg::STATUS, ALL_OK);

        write(&mut f.transport, reg::STATUS, 0);

        assert_ne!(f.transport.status() & status::FAILED, 0);
    }

    #[test]
    fn queue_notify_write_signals_queue_event() {
        let mut f = fixture();

        write(&mut f.transport, reg::QUEUE_NOTIFY, 0);

        assert_eq!(f.device.lock().unwrap().events[0].read().unwrap(), 1);
    }

    #[test]
    fn config_read_past_end_returns_zeros() {
        let mut f = fixture();
        let mut data = [0xffu8; 4];

        f.transport.read(reg::CONFIG + 6, &mut data);

        assert_eq!(data, [7, 8, 0, 0]);
    }

    #[test]
    fn narrow_register_read_returns_zero() {
        let mut f = fixture();
        let mut data = [0xffu8; 2];

        f.transport.read(reg::MAGIC, &mut data);

        assert_eq!(data, [0, 0]);
    }
}
