//! Test helpers for the virtio-fs frontend: a fake `virtiofsd` that records what the frontend
//! set up, guest memory like the VMM's, and the driver's side of queue set-up.
//!
//! The fake is a real vhost-user backend built on the `vhost-user-backend` crate, as
//! `virtiofsd` itself is, so the frontend is tested against the same protocol handling: the
//! backend maps our memfd, translates our ring addresses through the memory table, polls the
//! kicks and writes the calls.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use vhost::vhost_user::{Listener, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{
    ShutdownHandle, VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_RING_PACKED;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{VhostUserFs, NUM_QUEUES, QUEUE_SIZE};
use crate::memory::create_guest_memory;
use berth_devices::virtio::{
    ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use berth_devices::GuestMemoryMmap;

/// Size of the test guest memory.
pub const MEM_SIZE: u64 = 0x40_0000;
/// Entries of each test queue.
pub const QUEUE_LEN: u16 = 16;
/// Queue 0's descriptor table; its avail and used rings follow at 16 KiB steps.
pub const DESC: u64 = 0x1_0000;
/// Distance between the rings of consecutive queues.
pub const RING_STRIDE: u64 = 0x1_0000;
/// Where the test writes [`MARKER`] for the backend to find.
pub const MARKER_ADDR: u64 = 0x20_0000;
/// A value the backend can only read if it mapped the right file at the right offset.
pub const MARKER: u64 = 0x6874_7265_625f_7366;
/// How long the fake gets to react.
const DEADLINE: Duration = Duration::from_secs(5);

/// Guest memory as the VMM allocates it: one memfd.
pub fn guest_memory() -> GuestMemoryMmap {
    create_guest_memory(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("test memory")
}

/// The queues as a driver would have set them up: [`QUEUE_LEN`] entries, rings at
/// [`DESC`] + queue × [`RING_STRIDE`].
pub fn driver_queues(mem: &GuestMemoryMmap) -> Vec<Queue> {
    (0..NUM_QUEUES as u64)
        .map(|index| {
            let base = DESC + index * RING_STRIDE;
            let mut queue = Queue::new(QUEUE_SIZE).expect("valid queue size");
            queue.set_size(QUEUE_LEN);
            queue.set_desc_table_address(Some(base as u32), Some(0));
            queue.set_avail_ring_address(Some((base + 0x4000) as u32), Some(0));
            queue.set_used_ring_address(Some((base + 0x8000) as u32), Some(0));
            queue.set_ready(true);
            assert!(queue.is_valid(mem), "test queue {index} invalid");
            queue
        })
        .collect()
}

/// Activates `fs` on [`driver_queues`]; returns the interrupt it signals.
pub fn activate(
    fs: &mut VhostUserFs,
    mem: &GuestMemoryMmap,
) -> Result<Arc<CountingInterrupt>, ActivateError> {
    let interrupt = Arc::new(CountingInterrupt::default());
    fs.activate(mem.clone(), interrupt.clone(), driver_queues(mem))?;
    Ok(interrupt)
}

/// Whether `event` becomes readable within the deadline.
pub fn wait_readable(event: &EventFd) -> bool {
    let epoll = Epoll::new().expect("epoll");
    epoll
        .ctl(
            ControlOperation::Add,
            event.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .expect("epoll add");
    let mut events = [EpollEvent::default()];
    let timeout = DEADLINE.as_millis() as i32;
    epoll.wait(timeout, &mut events).expect("epoll wait") == 1
}

/// Counts the queue interrupts a device raises.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    queue: AtomicU32,
}

impl CountingInterrupt {
    /// Queue interrupts raised so far.
    pub fn count(&self) -> u32 {
        self.queue.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal(&self, kind: InterruptKind) -> io::Result<()> {
        if kind == InterruptKind::Queue {
            self.queue.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A queue as the backend saw it when kicked, in guest addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenQueue {
    /// Entries.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// What the fake backend was told.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// `(guest address, size)` of every region of the last memory table.
    pub regions: Vec<(u64, u64)>,
    /// The features of the last `SET_FEATURES`.
    pub acked_features: Option<u64>,
    /// Each queue as it was when last kicked.
    pub kicked: [Option<SeenQueue>; NUM_QUEUES],
    /// The value at [`MARKER_ADDR`], read through the backend's mapping when a queue was kicked.
    pub marker: Option<u64>,
    /// Queues stopped by `GET_VRING_BASE`, in order.
    pub stopped: Vec<u32>,
}

/// How the fake presents itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeBackendConfig {
    /// Offer no `VIRTIO_F_VERSION_1`, like a legacy-only device.
    pub legacy: bool,
}

struct Fake {
    config: FakeBackendConfig,
    record: Arc<Mutex<Record>>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
}

impl Fake {
    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().expect("record lock")
    }
}

impl VhostUserBackendMut for Fake {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.config.legacy {
            return protocol;
        }
        // What virtiofsd offers, plus packed rings, which the guest must not be offered.
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_F_RING_PACKED)
            | protocol
    }

    fn acked_features(&mut self, features: u64) {
        self.record().acked_features = Some(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let regions = mem
            .memory()
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        self.record().regions = regions;
        self.mem = Some(mem);
        Ok(())
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        self.record().stopped.push(queue_index);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            return Ok(());
        };
        let seen = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            SeenQueue {
                size: queue.size(),
                desc: queue.desc_table(),
                avail: queue.avail_ring(),
                used: queue.used_ring(),
            }
        };
        let marker = self
            .mem
            .as_ref()
            .and_then(|m| m.memory().read_obj(GuestAddress(MARKER_ADDR)).ok());
        {
            let mut record = self.record();
            record.kicked[index] = Some(seen);
            record.marker = marker;
        }
        vring.signal_used_queue()
    }
}

/// A fake `virtiofsd` listening on a socket in a temporary directory; it serves one
/// connection.
#[derive(Debug)]
pub struct FakeBackend {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    record: Arc<Mutex<Record>>,
    shutdown: mpsc::Receiver<Option<ShutdownHandle>>,
}

impl FakeBackend {
    /// Binds the socket (so a connection succeeds at once) and serves it from a thread.
    pub fn start(config: FakeBackendConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("fs.sock");
        let mut listener = Listener::new(&socket, true).expect("bind the fake's socket");
        let record = Arc::new(Mutex::new(Record::default()));
        let fake = Fake {
            config,
            record: record.clone(),
            mem: None,
        };
        let (sender, shutdown) = mpsc::channel();
        thread::spawn(move || {
            let mut daemon = VhostUserDaemon::new(
                "fake-virtiofsd".into(),
                Arc::new(Mutex::new(fake)),
                GuestMemoryAtomic::new(GuestMemoryMmap::default()),
            )
            .expect("fake daemon");
            if daemon.start(&mut listener).is_ok() {
                let _ = sender.send(daemon.shutdown_handle());
                let _ = daemon.wait();
            }
        });
        Self {
            _dir: dir,
            socket,
            record,
            shutdown,
        }
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the backend was told so far.
    pub fn record(&self) -> Record {
        self.record.lock().expect("record lock").clone()
    }

    /// Closes the connection from the backend's side, as a `virtiofsd` that exits does.
    pub fn disconnect(&self) {
        let handle = self
            .shutdown
            .recv_timeout(DEADLINE)
            .expect("the fake accepted a connection")
            .expect("the fake is connected");
        handle.shutdown();
    }
}
