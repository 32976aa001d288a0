//! Device tests: the muxer behind the `VirtioDevice` and `EventSubscriber` faces the VMM uses,
//! with a host client on a real unix socket and the guest through test queues.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::virtio::test_utils::CountingInterrupt;
use crate::vsock::test_utils::{guest_header, memory, TestGuest, GUEST_CID};
use crate::vsock::{op, ConnKey, MuxerConfig, PKT_HEADER_SIZE};

const AGENT_PORT: u32 = 1024;
const GUEST_BUF: u32 = 256 * 1024;

fn device(dir: &Path) -> Vsock {
    let muxer = VsockMuxer::new(MuxerConfig {
        guest_cid: GUEST_CID,
        uds_path: dir.join("vm.vsock"),
    })
    .expect("muxer");
    Vsock::new(GUEST_CID, muxer).expect("device")
}

fn activate(vsock: &mut Vsock, guest: &TestGuest, mem: &GuestMemoryMmap) -> Arc<CountingInterrupt> {
    let interrupt = Arc::new(CountingInterrupt::default());
    vsock
        .activate(mem.clone(), interrupt.clone(), guest.device_queues())
        .expect("activate");
    interrupt
}

/// What the event loop does when the muxer's fd fires (accept, then the CONNECT line).
fn host_events(vsock: &mut Vsock) {
    let fd = vsock.muxer().as_raw_fd();
    for _ in 0..4 {
        vsock.process(fd, EventSet::IN);
    }
}

/// What the event loop does when the guest notifies queue `index`.
fn kick(vsock: &mut Vsock, index: usize) {
    vsock.queue_events()[index].write(1).expect("kick");
    let fd = vsock.queue_events()[index].as_raw_fd();
    vsock.process(fd, EventSet::IN);
}

fn client(vsock: &Vsock) -> UnixStream {
    let mut stream = UnixStream::connect(vsock.muxer().uds_path()).expect("connect");
    stream
        .write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
        .expect("connect line");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
}

#[test]
fn read_config_is_guest_cid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vsock = device(dir.path());
    let mut data = [0xffu8; 8];

    vsock.read_config(0, &mut data);

    assert_eq!(data, [GUEST_CID as u8, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn activate_with_two_queues_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = memory();
    let guest = TestGuest::new(&mem);
    let mut vsock = device(dir.path());
    let mut queues = guest.device_queues();
    queues.pop();

    let result = vsock.activate(mem.clone(), Arc::new(CountingInterrupt::default()), queues);

    assert!(matches!(
        result,
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 2
        })
    ));
}

#[test]
fn host_connect_reaches_guest_and_response_answers_ok() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut vsock = device(dir.path());
    let interrupt = activate(&mut vsock, &guest, &mem);
    guest.offer_rx();
    kick(&mut vsock, RX_QUEUE);
    let mut stream = client(&vsock);

    host_events(&mut vsock);

    let packets = guest.delivered();
    assert_eq!(packets.len(), 1, "{packets:?}");
    let request = packets[0].0;
    assert_eq!((request.op, request.dst_port), (op::REQUEST, AGENT_PORT));
    assert_eq!(interrupt.count(), 1);
    let key = ConnKey {
        local_port: request.src_port,
        peer_port: request.dst_port,
    };
    guest.queue_tx(guest_header(key, op::RESPONSE, GUEST_BUF, 0), b"");
    kick(&mut vsock, TX_QUEUE);
    assert_eq!(guest.tx_completed().len(), 1);
    let mut line = [0u8; 16];
    let n = stream.read(&mut line).expect("read OK line");
    assert_eq!(&line[..n], format!("OK {}\n", request.src_port).as_bytes());
}

#[test]
fn host_data_waits_for_rx_buffers_then_arrives_on_rx_kick() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut vsock = device(dir.path());
    let interrupt = activate(&mut vsock, &guest, &mem);
    let mut stream = client(&vsock);
    host_events(&mut vsock);
    assert_eq!(interrupt.count(), 0, "no RX buffer, no interrupt");

    guest.offer_rx();
    kick(&mut vsock, RX_QUEUE);

    let packets = guest.delivered();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::REQUEST);
    assert_eq!(interrupt.count(), 1);
    let key = ConnKey {
        local_port: packets[0].0.src_port,
        peer_port: AGENT_PORT,
    };
    guest.queue_tx(guest_header(key, op::RESPONSE, GUEST_BUF, 0), b"");
    kick(&mut vsock, TX_QUEUE);
    let mut line = [0u8; 16];
    let _ = stream.read(&mut line).expect("OK line");
    stream.write_all(b"ping").expect("host data");
    host_events(&mut vsock);
    guest.offer_rx();
    kick(&mut vsock, RX_QUEUE);
    let data: Vec<u8> = guest
        .delivered()
        .into_iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, d)| d)
        .collect();
    assert_eq!(data, b"ping");
}

#[test]
fn malformed_tx_chain_is_returned_without_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut vsock = device(dir.path());
    let _interrupt = activate(&mut vsock, &guest, &mem);
    // A header-sized buffer the device may write: not a TX packet.
    guest.offer_tx_chain(&[(0, PKT_HEADER_SIZE as u32, true)]);

    kick(&mut vsock, TX_QUEUE);

    assert_eq!(guest.tx_completed(), vec![(0, 0)]);
}

#[test]
fn notification_before_activation_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vsock = device(dir.path());

    kick(&mut vsock, TX_QUEUE);

    assert!(!vsock.is_activated());
}

#[test]
fn reset_closes_host_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut vsock = device(dir.path());
    let _interrupt = activate(&mut vsock, &guest, &mem);
    guest.offer_rx();
    let mut stream = client(&vsock);
    host_events(&mut vsock);
    kick(&mut vsock, RX_QUEUE);
    let request = guest.delivered()[0].0;
    let key = ConnKey {
        local_port: request.src_port,
        peer_port: AGENT_PORT,
    };
    guest.queue_tx(guest_header(key, op::RESPONSE, GUEST_BUF, 0), b"");
    kick(&mut vsock, TX_QUEUE);
    let mut line = [0u8; 16];
    let _ = stream.read(&mut line).expect("OK line");

    assert!(vsock.reset());

    let mut rest = Vec::new();
    let closed = match stream.read_to_end(&mut rest) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(closed);
    assert!(!vsock.is_activated());
}
