//! Queue-level tests: what the guest can put on the rings, well-formed or not.

use std::io::Write;

use virtio_vsock::packet::PKT_HEADER_SIZE;

use super::*;
use crate::vsock::packet::ConnKey;
use crate::vsock::test_utils::{guest_header, memory, TestGuest, ABSOLUTE, GUEST_CID, RX_ROOM};
use crate::vsock::{op, MuxerConfig, MAX_PKT_DATA};

const GUEST_BUF: u32 = 256 * 1024;
/// An address past the end of the test memory.
const OUTSIDE: u64 = ABSOLUTE;

fn muxer(dir: &std::path::Path) -> VsockMuxer {
    VsockMuxer::new(MuxerConfig {
        guest_cid: GUEST_CID,
        uds_path: dir.join("vm.vsock"),
    })
    .expect("muxer")
}

/// A packet for a connection that does not exist, so the device owes exactly one RST.
fn stray_header() -> Header {
    guest_header(
        ConnKey {
            local_port: 7000,
            peer_port: 7001,
        },
        op::RW,
        GUEST_BUF,
        0,
    )
}

#[test]
fn tx_header_in_write_only_buffer_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);

    let used = guest.send_raw(
        &mut muxer,
        &[(0, PKT_HEADER_SIZE as u32, true)],
        Some(stray_header()),
    );

    assert_eq!(used.len(), 1, "the chain is returned");
    assert!(!muxer.has_pending_rx());
}

#[test]
fn tx_header_buffer_too_short_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);

    let used = guest.send_raw(&mut muxer, &[(0, 10, false)], Some(stray_header()));

    assert_eq!(used.len(), 1);
    assert!(!muxer.has_pending_rx());
}

#[test]
fn tx_header_outside_memory_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);

    let used = guest.send_raw(
        &mut muxer,
        &[(OUTSIDE, PKT_HEADER_SIZE as u32, false)],
        None,
    );

    assert_eq!(used.len(), 1);
    assert!(!muxer.has_pending_rx());
}

#[test]
fn tx_payload_shorter_than_header_len_resets_its_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut header = stray_header();
    header.len = 100;

    let used = guest.send_raw(
        &mut muxer,
        &[(0, PKT_HEADER_SIZE as u32, false), (0x100, 10, false)],
        Some(header),
    );

    assert_eq!(used.len(), 1);
    let packets = guest.recv_all(&mut muxer);
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::RST);
}

#[test]
fn tx_len_above_maximum_resets_its_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut header = stray_header();
    header.len = MAX_PKT_DATA + 1;

    guest.send_raw(
        &mut muxer,
        &[
            (0, PKT_HEADER_SIZE as u32, false),
            (0x100, MAX_PKT_DATA + 1, false),
        ],
        Some(header),
    );

    let packets = guest.recv_all(&mut muxer);
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::RST);
}

#[test]
fn tx_payload_outside_memory_resets_its_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut header = stray_header();
    header.len = 16;

    guest.send_raw(
        &mut muxer,
        &[(0, PKT_HEADER_SIZE as u32, false)],
        Some(header),
    );
    // The same packet, its payload now in a descriptor pointing outside memory.
    let used = guest.send_raw(
        &mut muxer,
        &[(0, PKT_HEADER_SIZE as u32, false), (OUTSIDE, 16, false)],
        Some(header),
    );

    assert_eq!(used.len(), 1);
    let packets = guest.recv_all(&mut muxer);
    assert_eq!(packets.len(), 1, "one RST for both bad packets");
    assert_eq!(packets[0].0.op, op::RST);
}

#[test]
fn tx_single_descriptor_with_header_and_payload_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut header = stray_header();
    header.len = 8;

    // Linux 6.2+ may put header and payload in one buffer; the payload follows the header.
    guest.send_raw(
        &mut muxer,
        &[(0, PKT_HEADER_SIZE as u32 + 8, false)],
        Some(header),
    );

    // A well-formed packet for no connection: answered with an RST, not dropped.
    let packets = guest.recv_all(&mut muxer);
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::RST);
}

#[test]
fn rx_read_only_buffer_is_returned_unused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    guest.send(&mut muxer, stray_header(), b"x");

    guest.offer_rx_chain(&[(0, PKT_HEADER_SIZE as u32, false), (0x100, RX_ROOM, false)]);
    let used = guest.recv_raw(&mut muxer);

    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 0);
    assert!(
        muxer.has_pending_rx(),
        "the RST still waits for a good buffer"
    );
    assert_eq!(guest.recv_all(&mut muxer)[0].0.op, op::RST);
}

#[test]
fn rx_header_only_buffer_is_returned_unused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    guest.send(&mut muxer, stray_header(), b"x");

    guest.offer_rx_chain(&[(0, PKT_HEADER_SIZE as u32, true)]);
    let used = guest.recv_raw(&mut muxer);

    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 0);
    assert!(muxer.has_pending_rx());
}

#[test]
fn rx_payload_outside_memory_is_returned_unused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    guest.send(&mut muxer, stray_header(), b"x");

    guest.offer_rx_chain(&[(0, PKT_HEADER_SIZE as u32, true), (OUTSIDE, RX_ROOM, true)]);
    let used = guest.recv_raw(&mut muxer);

    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 0);
}

#[test]
fn rx_single_descriptor_buffer_carries_header_and_payload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut path = muxer.uds_path().as_os_str().to_owned();
    path.push("_1023");
    let listener = std::os::unix::net::UnixListener::bind(std::path::PathBuf::from(path))
        .expect("port listener");
    let key = ConnKey {
        local_port: 1023,
        peer_port: 9000,
    };
    guest.send(
        &mut muxer,
        guest_header(key, op::REQUEST, GUEST_BUF, 0),
        b"",
    );
    let (mut host, _) = listener.accept().expect("accepted");
    guest.offer_rx();
    guest.recv(&mut muxer);
    host.write_all(b"0123456789").expect("host writes");
    muxer.process_events().expect("events");

    guest.offer_rx_chain(&[(0, PKT_HEADER_SIZE as u32 + 4, true)]);
    let used = guest.recv_raw(&mut muxer);

    // Four bytes of room after the header: the packet carries four, the rest waits.
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, PKT_HEADER_SIZE as u32 + 4);
    assert!(muxer.has_pending_rx());
}

#[test]
fn rx_buffers_stay_available_while_nothing_is_owed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    guest.offer_rx();

    let early = guest.recv_raw(&mut muxer);
    guest.send(&mut muxer, stray_header(), b"x");
    let late = guest.recv(&mut muxer);

    assert!(early.is_empty());
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].0.op, op::RST);
}

#[test]
fn rx_work_that_evaporates_leaves_buffer_available() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut path = muxer.uds_path().as_os_str().to_owned();
    path.push("_1023");
    let listener = std::os::unix::net::UnixListener::bind(std::path::PathBuf::from(path))
        .expect("port listener");
    let key = ConnKey {
        local_port: 1023,
        peer_port: 9001,
    };
    guest.send(
        &mut muxer,
        guest_header(key, op::REQUEST, GUEST_BUF, 0),
        b"",
    );
    let (host, _) = listener.accept().expect("accepted");
    guest.recv_all(&mut muxer);
    // The connection becomes readable, then the guest takes all its credit away before
    // offering a buffer: the queued work is gone.
    (&host).write_all(b"x").expect("host writes");
    muxer.process_events().expect("events");
    guest.send(&mut muxer, guest_header(key, op::CREDIT_UPDATE, 0, 0), b"");
    guest.offer_rx();

    let used = guest.recv_raw(&mut muxer);

    assert!(used.is_empty(), "buffer kept for later");
    assert!(!muxer.has_pending_rx());
}

/// A guest port listener and a connection the guest opened to it, established.
fn guest_connection(
    guest: &mut TestGuest,
    muxer: &mut VsockMuxer,
    peer_port: u32,
) -> (std::os::unix::net::UnixStream, ConnKey) {
    let mut path = muxer.uds_path().as_os_str().to_owned();
    path.push("_1023");
    let listener = std::os::unix::net::UnixListener::bind(std::path::PathBuf::from(path))
        .expect("port listener");
    let key = ConnKey {
        local_port: 1023,
        peer_port,
    };
    guest.send(muxer, guest_header(key, op::REQUEST, GUEST_BUF, 0), b"");
    let (host, _) = listener.accept().expect("accepted");
    guest.offer_rx();
    assert_eq!(guest.recv(muxer)[0].0.op, op::RESPONSE);
    (host, key)
}

#[test]
fn tx_payload_scattered_over_buffers_arrives_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let (mut host, key) = guest_connection(&mut guest, &mut muxer, 9100);
    let mut header = guest_header(key, op::RW, GUEST_BUF, 0);
    header.len = 12;
    guest.write_tx_bytes(0, &header.to_bytes());
    guest.write_tx_bytes(0x100, b"scat");
    guest.write_tx_bytes(0x200, b"tered");
    guest.write_tx_bytes(0x300, b"!!!");

    guest.send_raw(
        &mut muxer,
        &[
            (0, PKT_HEADER_SIZE as u32, false),
            (0x100, 4, false),
            (0x200, 5, false),
            (0x300, 3, false),
        ],
        None,
    );

    let mut got = [0u8; 12];
    std::io::Read::read_exact(&mut host, &mut got).expect("payload");
    assert_eq!(&got, b"scattered!!!");
    assert!(!muxer.has_pending_rx());
}

#[test]
fn tx_header_split_over_two_buffers_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let (mut host, key) = guest_connection(&mut guest, &mut muxer, 9101);
    let mut header = guest_header(key, op::RW, GUEST_BUF, 0);
    header.len = 2;
    let raw = header.to_bytes();
    guest.write_tx_bytes(0, &raw[..20]);
    guest.write_tx_bytes(0x100, &raw[20..]);
    guest.write_tx_bytes(0x100 + (PKT_HEADER_SIZE as u64 - 20), b"ok");

    guest.send_raw(
        &mut muxer,
        &[
            (0, 20, false),
            (0x100, PKT_HEADER_SIZE as u32 - 20 + 2, false),
        ],
        None,
    );

    let mut got = [0u8; 2];
    std::io::Read::read_exact(&mut host, &mut got).expect("payload");
    assert_eq!(&got, b"ok");
}

#[test]
fn tx_writable_buffer_voids_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut header = stray_header();
    header.len = 4;

    guest.send_raw(
        &mut muxer,
        &[(0, PKT_HEADER_SIZE as u32, false), (0x100, 4, true)],
        Some(header),
    );

    assert!(
        !muxer.has_pending_rx(),
        "a writable buffer voids the whole chain"
    );
}
