//! One stream between a host unix socket and a guest vsock port.
//!
//! The state machine covers the handshake in both directions, credit flow control, guest data
//! the host socket cannot take yet, half-close and reset. It does no epoll bookkeeping itself:
//! it says which socket events it wants ([`Connection::wanted_events`]) and whether it owes the
//! guest a packet ([`Connection::has_pending_rx`]), and the muxer acts on both after every call.
//!
//! Directions are named from the guest's queues: *to host* is guest data written into the host
//! socket (TX), *to guest* is host data read from the host socket into RX buffers.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::packet::{ConnKey, Header};
use super::{
    op, CONN_BUF_SIZE, CREDIT_UPDATE_THRESHOLD, MAX_PKT_DATA, SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// A host client asked for it: our REQUEST is owed or sent, the guest has not answered.
    Connecting,
    /// The guest asked for it and the host socket is connected: our RESPONSE is owed.
    Accepting,
    /// Both sides agreed; data may flow.
    Established,
    /// Finished or failed: only an RST is left to send.
    Killed,
    /// Nothing left to do; the muxer drops it.
    Closed,
}

/// One vsock stream and its host socket.
#[derive(Debug)]
pub(super) struct Connection {
    stream: UnixStream,
    key: ConnKey,
    state: State,
    /// A REQUEST is owed (host-initiated, before the guest answered).
    request_owed: bool,
    /// A CREDIT_UPDATE is owed, unless another packet carries our counters first.
    credit_update_owed: bool,
    /// The host socket reported readable and has not yet been read dry.
    host_readable: bool,

    /// Guest data the host socket has not taken yet; never more than [`CONN_BUF_SIZE`].
    to_host: VecDeque<u8>,
    /// Guest bytes written to the host socket, wrapping (our `fwd_cnt`).
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    last_sent_fwd_cnt: Wrapping<u32>,

    /// Host bytes sent to the guest, wrapping.
    to_guest_cnt: Wrapping<u32>,
    /// The guest's receive buffer size.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed of what we sent, wrapping.
    peer_fwd_cnt: Wrapping<u32>,

    /// The guest said it will send no more.
    peer_shut_send: bool,
    /// The guest said it will receive no more.
    peer_shut_rcv: bool,
    /// The host socket reached end of file and the guest has been told (SHUTDOWN/SEND).
    host_eof: bool,
    /// The host socket's write side is shut down (after the guest's SHUTDOWN/SEND).
    host_write_shut: bool,
}

/// What the muxer must do after the guest spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Keep the connection (its flags say what is owed).
    Keep,
    /// The guest reset it: drop it without answering.
    Drop,
}

impl Connection {
    /// A connection a host client asked for: a REQUEST to `key.peer_port` is owed.
    pub(super) fn connecting(stream: UnixStream, key: ConnKey) -> Self {
        let mut conn = Self::new(stream, key, State::Connecting);
        conn.request_owed = true;
        conn
    }

    /// A connection the guest asked for with `request`, whose host socket is connected.
    pub(super) fn accepting(stream: UnixStream, request: &Header) -> Self {
        let mut conn = Self::new(stream, request.key(), State::Accepting);
        conn.update_peer_credit(request);
        conn
    }

    fn new(stream: UnixStream, key: ConnKey, state: State) -> Self {
        Self {
            stream,
            key,
            state,
            request_owed: false,
            credit_update_owed: false,
            host_readable: false,
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_sent_fwd_cnt: Wrapping(0),
            to_guest_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shut_send: false,
            peer_shut_rcv: false,
            host_eof: false,
            host_write_shut: false,
        }
    }

    pub(super) fn state(&self) -> State {
        self.state
    }

    pub(super) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// How many more bytes the guest can take: its buffer minus what is in flight.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = (self.to_guest_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes waiting for the host socket.
    #[cfg(test)]
    pub(super) fn buffered_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// Whether host data may go to the guest now.
    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && !self.peer_shut_rcv
            && !self.host_eof
            && self.peer_credit() > 0
    }

    /// Whether the guest is owed a packet.
    pub(super) fn has_pending_rx(&self) -> bool {
        match self.state {
            State::Connecting => self.request_owed,
            State::Accepting | State::Killed => true,
            State::Established => {
                (self.host_readable && self.can_send_data()) || self.credit_update_owed
            }
            State::Closed => false,
        }
    }

    /// The host socket events this connection needs to hear about.
    pub(super) fn wanted_events(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.state == State::Established {
            if !self.host_readable && self.can_send_data() {
                events |= EventSet::IN;
            }
            if !self.to_host.is_empty() {
                events |= EventSet::OUT;
            }
        }
        events
    }

    /// Gives up on the connection: the host socket is shut, an RST is owed to the guest.
    pub(super) fn kill(&mut self) {
        if matches!(self.state, State::Killed | State::Closed) {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        self.to_host.clear();
        self.state = State::Killed;
    }

    /// Handles a packet the guest sent on this connection; `data` is its payload, in pieces.
    pub(super) fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        header: &Header,
        data: &[VolatileSlice<'_, B>],
    ) -> Verdict {
        if header.op == op::RST {
            let _ = self.stream.shutdown(Shutdown::Both);
            self.state = State::Closed;
            return Verdict::Drop;
        }
        if matches!(self.state, State::Killed | State::Closed) {
            // Our RST is on its way; whatever the guest still had in flight is moot.
            return Verdict::Keep;
        }
        self.update_peer_credit(header);
        match (self.state, header.op) {
            (State::Connecting, op::RESPONSE) => self.established(),
            (State::Established, op::RW) => self.guest_data(data),
            (State::Established, op::CREDIT_UPDATE) => {}
            (State::Established, op::CREDIT_REQUEST) => self.credit_update_owed = true,
            (State::Established, op::SHUTDOWN) => {
                self.peer_shut_rcv |= header.flags & SHUTDOWN_RCV != 0;
                self.peer_shut_send |= header.flags & SHUTDOWN_SEND != 0;
            }
            // A second REQUEST, a RESPONSE we did not ask for, data before the handshake, an
            // unknown operation: the guest and we disagree about this connection.
            (state, op) => {
                tracing::debug!(?self.key, ?state, op, "vsock: unexpected packet, resetting");
                self.kill();
            }
        }
        self.settle();
        Verdict::Keep
    }

    fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// The guest accepted our REQUEST: tell the host client which port it got.
    fn established(&mut self) {
        let line = format!("OK {}\n", self.key.local_port);
        // The client's socket is fresh and has room for one short line; anything else means
        // the client is gone.
        match (&self.stream).write(line.as_bytes()) {
            Ok(n) if n == line.len() => self.state = State::Established,
            Ok(_) => self.kill(),
            Err(e) => {
                tracing::debug!(?self.key, "vsock: host client gone before OK: {e}");
                self.kill();
            }
        }
    }

    /// Forwards guest data to the host socket, buffering what it cannot take now.
    fn guest_data<B: BitmapSlice>(&mut self, data: &[VolatileSlice<'_, B>]) {
        let len: usize = data.iter().map(|piece| piece.len()).sum();
        if len == 0 {
            return;
        }
        if self.peer_shut_send {
            tracing::debug!(?self.key, "vsock: data after the guest's SHUTDOWN/SEND");
            self.kill();
            return;
        }
        if self.to_host.len() + len > CONN_BUF_SIZE as usize {
            tracing::debug!(?self.key, "vsock: guest overran its credit");
            self.kill();
            return;
        }
        // Older data waits in the buffer: the new data must queue behind it.
        let mut blocked = !self.to_host.is_empty();
        let mut written_total = 0;
        for piece in data {
            let mut written = 0;
            if !blocked {
                match (&self.stream).write_volatile(piece) {
                    Ok(n) => written = n,
                    Err(VolatileMemoryError::IOError(e)) if is_transient(&e) => {}
                    Err(e) => {
                        tracing::debug!(?self.key, "vsock: host socket write failed: {e}");
                        self.kill();
                        return;
                    }
                }
                blocked = written < piece.len();
            }
            if written < piece.len() {
                let mut rest = vec![0u8; piece.len() - written];
                let copied = piece
                    .subslice(written, piece.len() - written)
                    .map(|tail| tail.copy_to(&mut rest[..]))
                    .unwrap_or(0);
                rest.truncate(copied);
                self.to_host.extend(rest);
            }
            written_total += written;
        }
        self.forwarded(written_total);
    }

    /// Counts `n` guest bytes as taken by the host socket; a credit update may now be owed.
    fn forwarded(&mut self, n: usize) {
        // `n` is at most one buffer of CONN_BUF_SIZE; the counter wraps by design.
        self.fwd_cnt += Wrapping(n as u32);
        if (self.fwd_cnt - self.last_sent_fwd_cnt).0 >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_owed = true;
        }
    }

    /// Handles events on the host socket.
    pub(super) fn on_host_event(&mut self, events: EventSet) {
        if self.state != State::Established {
            return;
        }
        let broken = EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP;
        if events.intersects(EventSet::IN | broken) {
            self.host_readable = true;
        }
        if events.intersects(EventSet::OUT | broken) && !self.to_host.is_empty() {
            self.flush();
        }
        self.settle();
    }

    /// Writes buffered guest data to the host socket until it is empty or would block.
    fn flush(&mut self) {
        let mut total = 0;
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(?self.key, "vsock: host socket write failed: {e}");
                    self.kill();
                    return;
                }
            }
        }
        self.forwarded(total);
    }

    /// Applies the consequences of shutdowns once buffered data is out.
    fn settle(&mut self) {
        if self.state != State::Established {
            return;
        }
        let to_host_done = self.peer_shut_send && self.to_host.is_empty();
        if to_host_done && !self.host_write_shut {
            // The host client reads end of file once everything the guest sent is delivered.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        let to_guest_done = self.host_eof || self.peer_shut_rcv;
        if to_host_done && to_guest_done {
            // Both directions are finished: the RST releases the guest's socket at once
            // instead of after its close timeout.
            self.kill();
        }
    }

    /// Writes the next packet owed to the guest into `pkt`; returns its length (header plus
    /// payload), or `None` if nothing is owed after all. After `None`, the connection has no
    /// pending work until something new happens.
    pub(super) fn fill_rx<B: BitmapSlice>(
        &mut self,
        guest_cid: u64,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Option<u32> {
        let packet_op = match self.state {
            State::Killed => {
                self.state = State::Closed;
                op::RST
            }
            State::Connecting if self.request_owed => {
                self.request_owed = false;
                op::REQUEST
            }
            State::Accepting => {
                self.state = State::Established;
                op::RESPONSE
            }
            State::Established => return self.fill_rx_established(guest_cid, pkt),
            State::Connecting | State::Closed => return None,
        };
        Some(self.write_header(guest_cid, packet_op, 0, 0, pkt))
    }

    fn fill_rx_established<B: BitmapSlice>(
        &mut self,
        guest_cid: u64,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Option<u32> {
        if self.host_readable && self.can_send_data() {
            match self.read_host(pkt) {
                Ok(0) => {
                    self.host_readable = false;
                    self.host_eof = true;
                    let len = self.write_header(guest_cid, op::SHUTDOWN, SHUTDOWN_SEND, 0, pkt);
                    self.settle();
                    return Some(len);
                }
                Ok(n) => return Some(self.write_header(guest_cid, op::RW, 0, n, pkt)),
                Err(e) if is_transient(&e) => self.host_readable = false,
                Err(e) => {
                    tracing::debug!(?self.key, "vsock: host socket read failed: {e}");
                    self.kill();
                    return self.fill_rx(guest_cid, pkt);
                }
            }
        }
        if self.credit_update_owed {
            return Some(self.write_header(guest_cid, op::CREDIT_UPDATE, 0, 0, pkt));
        }
        None
    }

    /// Reads host data straight into the packet's payload buffer, within the guest's credit.
    fn read_host<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) -> io::Result<u32> {
        let Some(buffer) = pkt.data_slice() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let max = (buffer.len() as u64)
            .min(u64::from(self.peer_credit()))
            .min(u64::from(MAX_PKT_DATA)) as usize;
        let mut window = buffer
            .subslice(0, max)
            .map_err(|e| io::Error::other(e.to_string()))?;
        loop {
            match (&self.stream).read_volatile(&mut window) {
                Ok(n) => return Ok(n as u32),
                Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(VolatileMemoryError::IOError(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
    }

    /// Writes a header with our credit counters; `len` payload bytes are already in place.
    fn write_header<B: BitmapSlice>(
        &mut self,
        guest_cid: u64,
        packet_op: u16,
        flags: u32,
        len: u32,
        pkt: &mut VsockPacket<'_, B>,
    ) -> u32 {
        let mut header = Header::to_guest(guest_cid, self.key, packet_op);
        header.flags = flags;
        header.len = len;
        header.buf_alloc = CONN_BUF_SIZE;
        header.fwd_cnt = self.fwd_cnt.0;
        header.write_to(pkt);
        self.last_sent_fwd_cnt = self.fwd_cnt;
        self.credit_update_owed = false;
        self.to_guest_cnt += Wrapping(len);
        PKT_HEADER_SIZE as u32 + len
    }
}

/// Whether a socket error only means "not now".
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsock::test_utils::{guest_header, PacketBuf};
    use crate::vsock::TYPE_STREAM;
    use std::io::Read;

    const GUEST_CID: u64 = 3;
    const KEY: ConnKey = ConnKey {
        local_port: 1024,
        peer_port: 5000,
    };
    /// What a Linux guest advertises by default.
    const GUEST_BUF: u32 = 256 * 1024;

    fn pair() -> (UnixStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        (ours, theirs)
    }

    fn established() -> (Connection, UnixStream) {
        let (ours, theirs) = pair();
        let request = guest_header(KEY, op::REQUEST, GUEST_BUF, 0);
        let mut conn = Connection::accepting(ours, &request);
        let mut buf = PacketBuf::new(0);
        conn.fill_rx(GUEST_CID, &mut buf.packet());
        (conn, theirs)
    }

    fn guest_sends(conn: &mut Connection, op: u16, payload: &[u8]) -> Verdict {
        guest_sends_with(conn, guest_header(KEY, op, GUEST_BUF, 0), payload)
    }

    fn guest_sends_with(conn: &mut Connection, mut header: Header, payload: &[u8]) -> Verdict {
        header.len = payload.len() as u32;
        let mut buf = PacketBuf::with_data(header, payload);
        let pkt = buf.packet();
        let data = pkt.data_slice().map(std::slice::from_ref).unwrap_or(&[]);
        conn.on_guest_packet(&header, data)
    }

    fn recv(conn: &mut Connection, room: usize) -> Option<(Header, Vec<u8>)> {
        let mut buf = PacketBuf::new(room);
        let len = conn.fill_rx(GUEST_CID, &mut buf.packet())?;
        let (header, data) = buf.contents();
        assert_eq!(len as usize, PKT_HEADER_SIZE + data.len());
        Some((header, data))
    }

    #[test]
    fn connecting_owes_request_then_waits_for_response() {
        let (ours, _theirs) = pair();
        let mut conn = Connection::connecting(ours, KEY);

        let (header, _) = recv(&mut conn, 0).expect("request");

        assert_eq!(header.op, op::REQUEST);
        assert_eq!((header.src_cid, header.dst_cid), (2, GUEST_CID));
        assert_eq!((header.src_port, header.dst_port), (1024, 5000));
        assert_eq!(header.type_, TYPE_STREAM);
        assert_eq!(header.buf_alloc, CONN_BUF_SIZE);
        assert!(!conn.has_pending_rx());
        assert!(recv(&mut conn, 0).is_none());
    }

    #[test]
    fn connecting_response_writes_ok_line_to_host_client() {
        let (ours, mut theirs) = pair();
        let mut conn = Connection::connecting(ours, KEY);
        recv(&mut conn, 0);

        guest_sends(&mut conn, op::RESPONSE, b"");

        let mut line = [0u8; 8];
        theirs.read_exact(&mut line).expect("ok line");
        assert_eq!(&line, b"OK 1024\n");
        assert_eq!(conn.state(), State::Established);
        assert_eq!(conn.wanted_events(), EventSet::IN);
    }

    #[test]
    fn connecting_rst_drops_and_closes_host_client() {
        let (ours, mut theirs) = pair();
        let mut conn = Connection::connecting(ours, KEY);
        recv(&mut conn, 0);

        let verdict = guest_sends(&mut conn, op::RST, b"");

        assert_eq!(verdict, Verdict::Drop);
        assert_eq!(conn.state(), State::Closed);
        let mut rest = Vec::new();
        assert_eq!(theirs.read_to_end(&mut rest).expect("eof"), 0);
    }

    #[test]
    fn connecting_data_before_response_is_reset() {
        let (ours, _theirs) = pair();
        let mut conn = Connection::connecting(ours, KEY);
        recv(&mut conn, 0);

        guest_sends(&mut conn, op::RW, b"early");

        assert_eq!(recv(&mut conn, 0).expect("rst").0.op, op::RST);
        assert_eq!(conn.state(), State::Closed);
    }

    #[test]
    fn accepting_owes_response_first() {
        let (ours, _theirs) = pair();
        let request = guest_header(KEY, op::REQUEST, GUEST_BUF, 0);
        let mut conn = Connection::accepting(ours, &request);

        let (header, _) = recv(&mut conn, 0).expect("response");

        assert_eq!(header.op, op::RESPONSE);
        assert_eq!(conn.state(), State::Established);
        assert_eq!(conn.peer_credit(), GUEST_BUF);
    }

    #[test]
    fn established_guest_data_reaches_host_socket() {
        let (mut conn, mut theirs) = established();

        guest_sends(&mut conn, op::RW, b"hello host");

        let mut got = [0u8; 10];
        theirs.read_exact(&mut got).expect("data");
        assert_eq!(&got, b"hello host");
        assert_eq!(conn.fwd_cnt.0, 10);
    }

    #[test]
    fn established_host_data_goes_out_within_credit() {
        let (mut conn, mut theirs) = established();
        /// Less than the payload, so credit and not the buffer limits the packet.
        const CREDIT: u32 = 5;
        guest_sends_with(
            &mut conn,
            guest_header(KEY, op::CREDIT_UPDATE, CREDIT, 0),
            b"",
        );
        theirs.write_all(b"0123456789").expect("host writes");
        conn.on_host_event(EventSet::IN);

        let (header, data) = recv(&mut conn, 4096).expect("data");

        assert_eq!(header.op, op::RW);
        assert_eq!(data, b"01234");
        assert_eq!(conn.peer_credit(), 0);
        assert!(!conn.has_pending_rx(), "no credit left, nothing owed");
        assert_eq!(conn.wanted_events(), EventSet::empty());
    }

    #[test]
    fn established_guest_credit_update_resumes_host_data() {
        let (mut conn, mut theirs) = established();
        guest_sends_with(&mut conn, guest_header(KEY, op::CREDIT_UPDATE, 5, 0), b"");
        theirs.write_all(b"0123456789").expect("host writes");
        conn.on_host_event(EventSet::IN);
        recv(&mut conn, 4096);

        // The guest consumed those 5 bytes.
        guest_sends_with(&mut conn, guest_header(KEY, op::CREDIT_UPDATE, 5, 5), b"");

        assert!(conn.has_pending_rx());
        assert_eq!(recv(&mut conn, 4096).expect("more").1, b"56789");
    }

    #[test]
    fn peer_credit_survives_counter_wraparound() {
        let (mut conn, _theirs) = established();
        /// Just below the wrap, so what is in flight straddles it.
        const BEFORE_WRAP: u32 = u32::MAX - 9;
        conn.to_guest_cnt = Wrapping(5);

        guest_sends_with(
            &mut conn,
            guest_header(KEY, op::CREDIT_UPDATE, GUEST_BUF, BEFORE_WRAP),
            b"",
        );

        // 10 bytes up to the wrap plus 5 after it are in flight.
        assert_eq!(conn.peer_credit(), GUEST_BUF - 15);
    }

    #[test]
    fn peer_fwd_cnt_ahead_of_what_was_sent_gives_no_credit() {
        let (mut conn, _theirs) = established();

        // A guest claiming to have consumed bytes it never got.
        guest_sends_with(
            &mut conn,
            guest_header(KEY, op::CREDIT_UPDATE, GUEST_BUF, 100),
            b"",
        );

        assert_eq!(conn.peer_credit(), 0);
    }

    #[test]
    fn forwarding_past_threshold_owes_credit_update() {
        let (mut conn, mut theirs) = established();
        let chunk = vec![7u8; CREDIT_UPDATE_THRESHOLD as usize];
        let reader = std::thread::spawn(move || {
            let mut sink = vec![0u8; CREDIT_UPDATE_THRESHOLD as usize];
            theirs.read_exact(&mut sink).expect("read");
        });

        guest_sends(&mut conn, op::RW, &chunk[..1]);
        assert!(!conn.has_pending_rx(), "one byte is not worth an update");
        // The rest may not fit the socket at once: flush until it all went.
        guest_sends(&mut conn, op::RW, &chunk[1..]);
        while conn.buffered_to_host() > 0 {
            conn.on_host_event(EventSet::OUT);
        }
        reader.join().expect("reader");

        let (header, _) = recv(&mut conn, 0).expect("credit update");
        assert_eq!(header.op, op::CREDIT_UPDATE);
        assert_eq!(header.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
        assert!(!conn.has_pending_rx());
    }

    #[test]
    fn credit_request_is_answered() {
        let (mut conn, _theirs) = established();

        guest_sends(&mut conn, op::CREDIT_REQUEST, b"");

        let (header, _) = recv(&mut conn, 0).expect("credit update");
        assert_eq!(header.op, op::CREDIT_UPDATE);
        assert_eq!(header.buf_alloc, CONN_BUF_SIZE);
    }

    #[test]
    fn slow_host_socket_buffers_guest_data_and_flushes_on_writable() {
        let (mut conn, mut theirs) = established();
        // Fill the socket until it refuses, so the guest's next packet must be buffered.
        let filler = vec![1u8; 64 * 1024];
        let mut sent = 0usize;
        loop {
            guest_sends(&mut conn, op::RW, &filler);
            sent += filler.len();
            if conn.buffered_to_host() > 0 {
                break;
            }
        }
        assert_eq!(conn.wanted_events(), EventSet::IN | EventSet::OUT);

        let reader = std::thread::spawn(move || {
            let mut sink = vec![0u8; sent];
            theirs.read_exact(&mut sink).expect("read");
            sink
        });
        while conn.buffered_to_host() > 0 {
            conn.on_host_event(EventSet::OUT);
        }
        let got = reader.join().expect("reader");

        assert!(got.iter().all(|b| *b == 1));
        assert_eq!(conn.fwd_cnt.0 as usize, got.len());
        assert_eq!(conn.wanted_events(), EventSet::IN);
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let (mut conn, _theirs) = established();
        let filler = vec![1u8; MAX_PKT_DATA as usize];
        // Nobody reads the host socket: the buffer fills, then one packet too many arrives.
        for _ in 0..(CONN_BUF_SIZE / MAX_PKT_DATA) * 4 {
            guest_sends(&mut conn, op::RW, &filler);
            if conn.state() == State::Killed {
                break;
            }
        }

        assert_eq!(conn.state(), State::Killed);
        assert_eq!(recv(&mut conn, 0).expect("rst").0.op, op::RST);
    }

    #[test]
    fn host_eof_sends_shutdown_send_and_keeps_guest_to_host_open() {
        let (mut conn, mut theirs) = established();
        theirs.shutdown(Shutdown::Write).expect("half-close");
        conn.on_host_event(EventSet::IN | EventSet::READ_HANG_UP);

        let (header, _) = recv(&mut conn, 4096).expect("shutdown");
        guest_sends(&mut conn, op::RW, b"still flowing");

        assert_eq!(header.op, op::SHUTDOWN);
        assert_eq!(header.flags, SHUTDOWN_SEND);
        let mut got = [0u8; 13];
        theirs.read_exact(&mut got).expect("data after half-close");
        assert_eq!(&got, b"still flowing");
        assert_eq!(conn.state(), State::Established);
    }

    #[test]
    fn guest_shutdown_send_half_closes_host_write_side_after_flush() {
        let (mut conn, mut theirs) = established();
        guest_sends(&mut conn, op::RW, b"last words");

        guest_sends_with(
            &mut conn,
            Header {
                flags: SHUTDOWN_SEND,
                ..guest_header(KEY, op::SHUTDOWN, GUEST_BUF, 0)
            },
            b"",
        );

        let mut got = Vec::new();
        theirs.read_to_end(&mut got).expect("read to eof");
        assert_eq!(got, b"last words");
        assert_eq!(conn.state(), State::Established, "host may still talk");
    }

    #[test]
    fn guest_shutdown_both_flushes_then_resets() {
        let (mut conn, mut theirs) = established();
        guest_sends(&mut conn, op::RW, b"bye");

        guest_sends_with(
            &mut conn,
            Header {
                flags: SHUTDOWN_SEND | SHUTDOWN_RCV,
                ..guest_header(KEY, op::SHUTDOWN, GUEST_BUF, 0)
            },
            b"",
        );

        let mut got = Vec::new();
        theirs.read_to_end(&mut got).expect("read to eof");
        assert_eq!(got, b"bye");
        assert_eq!(recv(&mut conn, 0).expect("rst").0.op, op::RST);
        assert_eq!(conn.state(), State::Closed);
    }

    #[test]
    fn both_directions_half_closed_resets() {
        let (mut conn, theirs) = established();
        theirs.shutdown(Shutdown::Write).expect("half-close");
        conn.on_host_event(EventSet::IN);
        recv(&mut conn, 4096).expect("shutdown");

        guest_sends_with(
            &mut conn,
            Header {
                flags: SHUTDOWN_SEND,
                ..guest_header(KEY, op::SHUTDOWN, GUEST_BUF, 0)
            },
            b"",
        );

        assert_eq!(recv(&mut conn, 0).expect("rst").0.op, op::RST);
    }

    #[test]
    fn data_after_guest_shutdown_send_is_reset() {
        let (mut conn, _theirs) = established();
        guest_sends_with(
            &mut conn,
            Header {
                flags: SHUTDOWN_SEND,
                ..guest_header(KEY, op::SHUTDOWN, GUEST_BUF, 0)
            },
            b"",
        );

        guest_sends(&mut conn, op::RW, b"zombie");

        assert_eq!(recv(&mut conn, 0).expect("rst").0.op, op::RST);
    }

    #[test]
    fn host_socket_closed_under_guest_data_resets() {
        let (mut conn, theirs) = established();
        drop(theirs);

        guest_sends(&mut conn, op::RW, b"into the void");

        assert_eq!(recv(&mut conn, 0).expect("rst").0.op, op::RST);
    }

    #[test]
    fn unknown_op_resets() {
        let (mut conn, _theirs) = established();

        guest_sends(&mut conn, 99, b"");

        assert_eq!(recv(&mut conn, 0).expect("rst").0.op, op::RST);
    }

    #[test]
    fn readable_but_empty_host_socket_owes_nothing() {
        let (mut conn, _theirs) = established();
        conn.on_host_event(EventSet::IN);
        assert!(conn.has_pending_rx());

        assert!(recv(&mut conn, 4096).is_none());

        assert!(!conn.has_pending_rx());
        assert_eq!(conn.wanted_events(), EventSet::IN);
    }
}
