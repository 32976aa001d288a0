//! Muxer tests: host clients on real unix sockets, the guest through mock queues.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::vsock::test_utils::{guest_header, memory, TestGuest, GUEST_CID};
use crate::vsock::{CONN_BUF_SIZE, MAX_PKT_DATA, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// What a Linux guest advertises by default.
const GUEST_BUF: u32 = 256 * 1024;
/// The guest port host clients connect to.
const AGENT_PORT: u32 = 1024;
/// Long enough for anything these tests wait for, short enough that a stall fails the test.
const DEADLINE: Duration = Duration::from_secs(20);

fn muxer(dir: &Path) -> VsockMuxer {
    VsockMuxer::new(MuxerConfig {
        guest_cid: GUEST_CID,
        uds_path: dir.join("vm.vsock"),
    })
    .expect("muxer")
}

/// Lets the muxer handle everything that happened on host sockets (accept, then the line).
fn pump(muxer: &mut VsockMuxer) {
    for _ in 0..4 {
        muxer.process_events().expect("events");
    }
}

fn client(muxer: &VsockMuxer, line: &[u8]) -> UnixStream {
    let mut stream = UnixStream::connect(muxer.uds_path()).expect("connect");
    stream.write_all(line).expect("write line");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    stream
}

/// Reads the `OK <port>\n` line byte by byte, as a hybrid-vsock client does.
fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).expect("read line") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).expect("utf-8")
}

/// The guest's answer to a REQUEST: a RESPONSE with its credit.
fn respond(guest: &mut TestGuest, muxer: &mut VsockMuxer, request: &Header) {
    let key = ConnKey {
        local_port: request.src_port,
        peer_port: request.dst_port,
    };
    guest.send(muxer, guest_header(key, op::RESPONSE, GUEST_BUF, 0), b"");
}

/// A host client connected to the guest's `AGENT_PORT` through the whole handshake.
fn connected(guest: &mut TestGuest, muxer: &mut VsockMuxer) -> (UnixStream, ConnKey) {
    let mut stream = client(muxer, format!("CONNECT {AGENT_PORT}\n").as_bytes());
    pump(muxer);
    let packets = guest.recv_all(muxer);
    assert_eq!(packets.len(), 1, "{packets:?}");
    let request = packets[0].0;
    respond(guest, muxer, &request);
    let line = read_line(&mut stream);
    assert_eq!(line, format!("OK {}", request.src_port));
    (
        stream,
        ConnKey {
            local_port: request.src_port,
            peer_port: request.dst_port,
        },
    )
}

/// Whether the muxer closed the client: end of file, or a reset when it closed with the
/// client's bytes still unread.
fn closed_by_peer(stream: &mut UnixStream) -> bool {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn host_connect_sends_request_to_guest_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let _stream = client(&muxer, b"CONNECT 52\n");

    pump(&mut muxer);
    let packets = guest.recv_all(&mut muxer);

    assert_eq!(packets.len(), 1);
    let request = packets[0].0;
    assert_eq!(request.op, op::REQUEST);
    assert_eq!((request.src_cid, request.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(request.dst_port, 52);
    assert!(request.src_port >= FIRST_LOCAL_PORT);
}

#[test]
fn host_connect_response_answers_ok_with_local_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);

    let (_stream, key) = connected(&mut guest, &mut muxer);

    assert_eq!(key.peer_port, AGENT_PORT);
    assert_eq!(muxer.connection_count(), 1);
}

#[test]
fn host_connect_rst_from_guest_closes_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut stream = client(&muxer, b"CONNECT 7\n");
    pump(&mut muxer);
    let request = guest.recv_all(&mut muxer)[0].0;

    guest.send(
        &mut muxer,
        guest_header(
            ConnKey {
                local_port: request.src_port,
                peer_port: 7,
            },
            op::RST,
            0,
            0,
        ),
        b"",
    );

    assert!(closed_by_peer(&mut stream));
    assert_eq!(muxer.connection_count(), 0);
}

#[test]
fn host_connect_lines_that_are_not_the_convention_close_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let bad: [&[u8]; 7] = [
        b"CONNEKT 1\n",
        b"CONNECT\n",
        b"CONNECT \n",
        b"CONNECT -1\n",
        b"CONNECT 4294967296\n",
        b"connect 1\n",
        b"CONNECT 111111111111111111111111111111111111111111",
    ];
    let mut clients: Vec<UnixStream> = bad.iter().map(|line| client(&muxer, line)).collect();

    pump(&mut muxer);

    for (stream, line) in clients.iter_mut().zip(bad) {
        assert!(
            closed_by_peer(stream),
            "{:?} was not refused",
            String::from_utf8_lossy(line)
        );
    }
    assert!(guest.recv_all(&mut muxer).is_empty());
    assert_eq!(muxer.connection_count(), 0);
}

#[test]
fn host_connect_line_in_pieces_is_assembled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut stream = client(&muxer, b"CONN");
    pump(&mut muxer);

    stream.write_all(b"ECT 99\r\n").expect("rest of line");
    pump(&mut muxer);

    let packets = guest.recv_all(&mut muxer);
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.dst_port, 99);
}

#[test]
fn host_bytes_right_after_connect_line_reach_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut stream = client(&muxer, b"CONNECT 5\nhello");
    pump(&mut muxer);
    let request = guest.recv_all(&mut muxer)[0].0;
    respond(&mut guest, &mut muxer, &request);
    read_line(&mut stream);

    pump(&mut muxer);
    let packets = guest.recv_all(&mut muxer);

    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::RW);
    assert_eq!(packets[0].1, b"hello");
}

#[test]
fn host_connections_get_fresh_local_ports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);

    let (_first, a) = connected(&mut guest, &mut muxer);
    guest.send(&mut muxer, guest_header(a, op::RST, 0, 0), b"");
    let (_second, b) = connected(&mut guest, &mut muxer);

    // The first connection is gone, yet its port is not handed out again at once.
    assert_eq!(muxer.connection_count(), 1);
    assert_ne!(a.local_port, b.local_port);
}

#[test]
fn guest_connect_reaches_port_listener_and_carries_data_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let mut path = muxer.uds_path().as_os_str().to_owned();
    path.push("_1023");
    let listener = UnixListener::bind(PathBuf::from(path)).expect("port listener");
    let key = ConnKey {
        local_port: 1023,
        peer_port: 40_000,
    };

    guest.send(
        &mut muxer,
        guest_header(key, op::REQUEST, GUEST_BUF, 0),
        b"",
    );
    let (mut host, _) = listener.accept().expect("muxer connected");
    let response = guest.recv_all(&mut muxer);
    guest.send(
        &mut muxer,
        guest_header(key, op::RW, GUEST_BUF, 0),
        b"ready",
    );
    let mut got = [0u8; 5];
    host.read_exact(&mut got).expect("guest data");
    host.write_all(b"ack").expect("host data");
    pump(&mut muxer);
    let reply = guest.recv_all(&mut muxer);

    assert_eq!(response.len(), 1);
    assert_eq!(response[0].0.op, op::RESPONSE);
    assert_eq!(
        (response[0].0.src_port, response[0].0.dst_port),
        (1023, 40_000)
    );
    assert_eq!(&got, b"ready");
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0].1, b"ack");
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let key = ConnKey {
        local_port: 4444,
        peer_port: 40_001,
    };

    guest.send(
        &mut muxer,
        guest_header(key, op::REQUEST, GUEST_BUF, 0),
        b"",
    );
    let packets = guest.recv_all(&mut muxer);

    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::RST);
    assert_eq!(
        (packets[0].0.src_port, packets[0].0.dst_port),
        (4444, 40_001)
    );
    assert_eq!(muxer.connection_count(), 0);
}

#[test]
fn packet_for_no_connection_is_reset_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let key = ConnKey {
        local_port: 1500,
        peer_port: 1501,
    };

    guest.send(&mut muxer, guest_header(key, op::RW, GUEST_BUF, 0), b"x");
    guest.send(&mut muxer, guest_header(key, op::RW, GUEST_BUF, 0), b"y");
    let packets = guest.recv_all(&mut muxer);

    assert_eq!(packets.len(), 1, "{packets:?}");
    assert_eq!(packets[0].0.op, op::RST);
}

#[test]
fn rst_for_no_connection_is_not_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let key = ConnKey {
        local_port: 1500,
        peer_port: 1501,
    };

    guest.send(&mut muxer, guest_header(key, op::RST, 0, 0), b"");

    assert!(!muxer.has_pending_rx());
}

#[test]
fn packet_with_foreign_source_cid_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let (_stream, key) = connected(&mut guest, &mut muxer);
    let mut header = guest_header(key, op::RST, 0, 0);
    header.src_cid = GUEST_CID + 1;

    guest.send(&mut muxer, header, b"");

    assert_eq!(muxer.connection_count(), 1);
    assert!(!muxer.has_pending_rx());
}

#[test]
fn seqpacket_request_is_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    /// VIRTIO_VSOCK_TYPE_SEQPACKET, which this device does not offer.
    const TYPE_SEQPACKET: u16 = 2;
    let mut header = guest_header(
        ConnKey {
            local_port: 1023,
            peer_port: 40_002,
        },
        op::REQUEST,
        GUEST_BUF,
        0,
    );
    header.type_ = TYPE_SEQPACKET;

    guest.send(&mut muxer, header, b"");

    let packets = guest.recv_all(&mut muxer);
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::RST);
}

#[test]
fn host_close_after_half_close_reaches_guest_as_shutdown_then_guest_close_resets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let (mut stream, key) = connected(&mut guest, &mut muxer);
    stream.write_all(b"input").expect("write");
    stream.shutdown(Shutdown::Write).expect("half-close");

    pump(&mut muxer);
    let first = guest.recv_all(&mut muxer);
    guest.send(
        &mut muxer,
        guest_header(key, op::RW, GUEST_BUF, 5),
        b"output",
    );
    let mut shutdown = guest_header(key, op::SHUTDOWN, GUEST_BUF, 5);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    guest.send(&mut muxer, shutdown, b"");
    let last = guest.recv_all(&mut muxer);
    let mut output = Vec::new();
    stream.read_to_end(&mut output).expect("read to eof");

    let ops: Vec<u16> = first.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, [op::RW, op::SHUTDOWN]);
    assert_eq!(first[0].1, b"input");
    assert_eq!(first[1].0.flags, SHUTDOWN_SEND);
    assert_eq!(output, b"output");
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].0.op, op::RST);
    assert_eq!(muxer.connection_count(), 0);
}

#[test]
fn guest_rst_on_established_connection_closes_host_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let (mut stream, key) = connected(&mut guest, &mut muxer);

    guest.send(&mut muxer, guest_header(key, op::RST, 0, 0), b"");

    assert!(closed_by_peer(&mut stream));
    assert_eq!(muxer.connection_count(), 0);
}

#[test]
fn host_client_gone_resets_guest_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let (stream, key) = connected(&mut guest, &mut muxer);
    drop(stream);

    guest.send(
        &mut muxer,
        guest_header(key, op::RW, GUEST_BUF, 0),
        b"anyone?",
    );
    pump(&mut muxer);
    let packets = guest.recv_all(&mut muxer);

    assert_eq!(packets.last().expect("packets").0.op, op::RST);
    assert_eq!(muxer.connection_count(), 0);
}

/// The stranding bug class: a connection at the head of the ready queue that turns out to
/// have nothing to send must not keep the ones behind it from being served.
#[test]
fn idle_connection_at_queue_head_does_not_strand_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    let (mut first, first_key) = connected(&mut guest, &mut muxer);
    let (mut second, _) = connected(&mut guest, &mut muxer);
    let (mut third, _) = connected(&mut guest, &mut muxer);
    for stream in [&mut first, &mut second, &mut third] {
        stream.write_all(b"data").expect("host writes");
    }
    pump(&mut muxer);
    // The first connection is queued with data, then the guest takes all its credit away:
    // its queue entry is now stale.
    guest.send(
        &mut muxer,
        guest_header(first_key, op::CREDIT_UPDATE, 0, 0),
        b"",
    );

    let packets = guest.recv_all(&mut muxer);

    let served: Vec<u32> = packets.iter().map(|(h, _)| h.src_port).collect();
    assert_eq!(packets.len(), 2, "{packets:?}");
    assert!(!served.contains(&first_key.local_port));
    assert!(packets.iter().all(|(h, d)| h.op == op::RW && d == b"data"));
    assert!(!muxer.has_pending_rx());
}

/// Many connections with work and few RX buffers at a time: every one is served, in turn.
#[test]
fn many_connections_with_pending_work_are_all_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    /// Several times the RX buffers the test queue can hold at once.
    const CONNECTIONS: usize = 40;
    /// More than one RX buffer's worth each, so connections need several turns.
    const PER_CONNECTION: usize = 10_000;
    let mut clients: Vec<(UnixStream, ConnKey)> = (0..CONNECTIONS)
        .map(|_| connected(&mut guest, &mut muxer))
        .collect();
    for (i, (stream, _)) in clients.iter_mut().enumerate() {
        stream
            .write_all(&vec![i as u8; PER_CONNECTION])
            .expect("host writes");
    }
    pump(&mut muxer);

    let mut received = vec![0usize; CONNECTIONS];
    let started = Instant::now();
    while received.iter().any(|n| *n < PER_CONNECTION) {
        assert!(started.elapsed() < DEADLINE, "stalled at {received:?}");
        // Never more than a few new buffers at a time, as a busy guest would.
        for _ in 0..2 {
            if guest.rx.has_room() {
                guest.offer_rx();
            }
        }
        for (header, data) in guest.recv(&mut muxer) {
            let i = clients
                .iter()
                .position(|(_, key)| key.local_port == header.src_port)
                .expect("known connection");
            assert_eq!(header.op, op::RW);
            assert!(data.iter().all(|b| *b == i as u8));
            received[i] += data.len();
        }
        pump(&mut muxer);
    }

    assert!(received.iter().all(|n| *n == PER_CONNECTION));
}

/// A guest that consumes what it receives and keeps the device informed, the way Linux does.
struct ReadingGuest {
    key: ConnKey,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl ReadingGuest {
    /// Sends a credit update once the device's view of free space is low.
    fn consumed(&mut self, guest: &mut TestGuest, muxer: &mut VsockMuxer, n: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        guest.send(
            muxer,
            guest_header(self.key, op::CREDIT_UPDATE, self.buf_alloc, self.fwd_cnt),
            b"",
        );
    }
}

#[test]
fn host_to_guest_megabyte_respects_small_guest_credit_and_arrives_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    /// A guest buffer far smaller than the transfer, so credit gates it many times over.
    const GUEST_SMALL_BUF: u32 = 16 * 1024;
    const SIZE: usize = 1 << 20;
    let (stream, key) = connected(&mut guest, &mut muxer);
    let mut reader = ReadingGuest {
        key,
        buf_alloc: GUEST_SMALL_BUF,
        fwd_cnt: 0,
    };
    reader.consumed(&mut guest, &mut muxer, 0);
    let payload: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let expected = payload.clone();
    let writer = thread::spawn(move || {
        let mut stream = stream;
        stream.write_all(&payload).expect("host writes");
        stream
    });

    let mut got = Vec::new();
    let mut in_flight = 0usize;
    let started = Instant::now();
    while got.len() < SIZE {
        assert!(
            started.elapsed() < DEADLINE,
            "stalled at {} bytes",
            got.len()
        );
        pump(&mut muxer);
        for (header, data) in guest.recv_all(&mut muxer) {
            assert_eq!(header.op, op::RW);
            in_flight += data.len();
            assert!(in_flight <= GUEST_SMALL_BUF as usize, "credit overrun");
            got.extend_from_slice(&data);
        }
        let n = std::mem::take(&mut in_flight);
        reader.consumed(&mut guest, &mut muxer, n);
    }
    drop(writer.join().expect("writer"));

    assert!(got == expected, "bytes differ");
}

#[test]
fn guest_to_host_megabyte_within_our_credit_never_stalls_and_arrives_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut muxer = muxer(dir.path());
    let mem = memory();
    let mut guest = TestGuest::new(&mem);
    const SIZE: usize = 1 << 20;
    let (stream, key) = connected(&mut guest, &mut muxer);
    // A slow host reader, so the device must buffer and flush.
    let reader = thread::spawn(move || {
        let mut stream = stream;
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < SIZE {
            let n = stream.read(&mut chunk).expect("read");
            assert_ne!(n, 0, "eof before all data");
            got.extend_from_slice(&chunk[..n]);
            thread::sleep(Duration::from_micros(50));
        }
        got
    });
    let payload: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    // The guest's view of our credit, from the headers we send it; the REQUEST that
    // `connected` consumed carried our full buffer and nothing forwarded yet.
    let mut peer_buf_alloc = CONN_BUF_SIZE;
    let mut peer_fwd_cnt = 0u32;
    let mut sent = 0usize;
    let started = Instant::now();

    while sent < SIZE || !reader.is_finished() {
        assert!(started.elapsed() < DEADLINE, "stalled at {sent} bytes");
        let in_flight = (sent as u32).wrapping_sub(peer_fwd_cnt);
        let credit = peer_buf_alloc.saturating_sub(in_flight) as usize;
        let n = credit.min(MAX_PKT_DATA as usize).min(SIZE - sent);
        if n > 0 {
            guest.send(
                &mut muxer,
                guest_header(key, op::RW, GUEST_BUF, 0),
                &payload[sent..sent + n],
            );
            sent += n;
        }
        pump(&mut muxer);
        for (header, _) in guest.recv_all(&mut muxer) {
            peer_buf_alloc = header.buf_alloc;
            peer_fwd_cnt = header.fwd_cnt;
        }
    }
    let got = reader.join().expect("reader");

    assert!(got == payload, "bytes differ");
}
