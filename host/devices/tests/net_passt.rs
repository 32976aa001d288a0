//! virtio-net against a real passt: the framing and the link-down path with the backend the
//! VMM uses, without KVM. The guest is virtio-queue's mock queues; the "network" is passt's
//! unix socket and passt's own answers (ARP for its gateway address), so nothing leaves the
//! machine.
//!
//! Needs `passt` on the PATH; skips saying so when it is missing, and fails instead under
//! `CI=true`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_devices::virtio::net::{MacAddr, Net, NET_HDR_SIZE};
use berth_devices::virtio::{InterruptKind, VirtioDevice, VirtioInterrupt};
use berth_devices::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

const MAC: MacAddr = MacAddr([0x02, 0x42, 0xac, 0x00, 0x00, 0x02]);
const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];
const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x20_0000;
const RX_LEN: u32 = 1536;
/// How long passt gets to answer or to go away.
const PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Interrupts {
    config: AtomicU32,
}

impl VirtioInterrupt for Interrupts {
    fn signal(&self, kind: InterruptKind) -> std::io::Result<()> {
        if kind == InterruptKind::Config {
            self.config.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn find_passt() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("passt"))
        .find(|candidate| candidate.is_file())
}

/// passt serving `socket` in one-off mode with the addresses the guest uses.
fn start_passt(passt: &Path, socket: &Path) -> Child {
    let child = Command::new(passt)
        .args(["-f", "-q", "-4", "-1", "-s"])
        .arg(socket)
        .args(["-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("passt starts");
    let deadline = Instant::now() + PATIENCE;
    while !socket.exists() {
        assert!(Instant::now() < deadline, "passt did not create its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn arp_request() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&MAC.octets());
    frame.extend_from_slice(&[0x08, 0x06]);
    // Ethernet, IPv4, 6-byte and 4-byte addresses, request.
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&MAC.octets());
    frame.extend_from_slice(&GUEST_IP);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&GATEWAY_IP);
    frame
}

fn chain(mock: &MockSplitQueue<GuestMemoryMmap>, addr: u64, len: u32, write: bool) {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, 0));
    mock.add_desc_chains(&[desc], 0).expect("chain fits");
}

#[test]
fn passt_answers_arp_through_the_device_and_its_death_takes_the_link_down() {
    let Some(passt) = find_passt() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "passt is required under CI"
        );
        eprintln!("skipped: no passt on the PATH (apt-get install passt)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Run as root, passt switches to nobody before it binds the socket.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("passt.sock");
    let mut child = start_passt(&passt, &socket);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let tx = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let mut net = Net::connect(&socket, MAC).unwrap();
    net.set_acked_features(net.avail_features());
    let interrupts = Arc::new(Interrupts::default());
    let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
    net.activate(mem.clone(), interrupts.clone(), queues)
        .unwrap();
    let request = arp_request();
    mem.write_slice(&[0; NET_HDR_SIZE], GuestAddress(TX_BUF))
        .unwrap();
    mem.write_slice(&request, GuestAddress(TX_BUF + NET_HDR_SIZE as u64))
        .unwrap();
    chain(&tx, TX_BUF, (NET_HDR_SIZE + request.len()) as u32, false);
    chain(&rx, RX_BUF, RX_LEN, true);

    net.process_tx().unwrap();
    let deadline = Instant::now() + PATIENCE;
    while rx.used().idx().load() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        net.process_socket(EventSet::IN).unwrap();
    }

    assert_eq!(rx.used().idx().load(), 1, "passt's ARP reply arrived");
    let mut reply = [0u8; NET_HDR_SIZE + 42];
    mem.read_slice(&mut reply, GuestAddress(RX_BUF)).unwrap();
    let frame = &reply[NET_HDR_SIZE..];
    assert_eq!(&frame[..6], &MAC.octets(), "addressed to the guest");
    assert_eq!(&frame[12..14], &[0x08, 0x06], "an ARP frame");
    assert_eq!(&frame[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&frame[28..32], &GATEWAY_IP, "for the gateway");

    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + PATIENCE;
    while net.link_up() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        net.process_socket(EventSet::IN | EventSet::HANG_UP)
            .unwrap();
    }
    assert!(!net.link_up());
    assert_eq!(interrupts.config.load(Ordering::SeqCst), 1);
}
