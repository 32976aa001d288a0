//! The host side of the device: the hybrid-vsock listener, host clients still writing their
//! `CONNECT` line, every connection, and the queue of connections that owe the guest a packet.
//!
//! Everything host-side is non-blocking and sits in one epoll set; the transport polls
//! [`VsockMuxer`]'s fd (`AsRawFd`) and calls [`VsockMuxer::process_events`] when it fires.
//! After every change to a connection, [`VsockMuxer::refresh`] re-derives its epoll interest
//! and its place in the ready queue from the connection's own state, so neither can drift.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, State, Verdict};
use super::packet::{ConnKey, Header};
use super::{op, VsockError, HOST_CID, TYPE_STREAM};

/// Epoll token of the listener; connections and clients get tokens above it.
const LISTENER_TOKEN: u64 = 0;
/// Host ports for host-initiated connections start here and wrap back here.
const FIRST_LOCAL_PORT: u32 = 1024;
/// `CONNECT 4294967295\n` is 19 bytes; a longer line is not the convention.
const MAX_CONNECT_LINE: usize = 32;
/// RSTs for packets that belong to no connection, waiting for RX buffers. A guest that keeps
/// sending to dead ports without reading only loses its own answers past this.
const MAX_PENDING_RESETS: usize = 1024;
/// Host events handled per [`VsockMuxer::process_events`] call; the rest stay ready in epoll.
const EVENTS_PER_CALL: usize = 64;
/// Host clients accepted per listener event, so a flood cannot starve the guest's traffic.
const ACCEPTS_PER_CALL: usize = 32;

/// How to set up a [`VsockMuxer`].
#[derive(Debug, Clone)]
pub struct MuxerConfig {
    /// The guest's context ID.
    pub guest_cid: u64,
    /// The hybrid-vsock listener; guest-initiated connections go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

/// A host client that connected and has not finished its `CONNECT <port>\n` line.
#[derive(Debug)]
struct HandshakeClient {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A connection and the muxer's bookkeeping for it.
#[derive(Debug)]
struct Entry {
    conn: Connection,
    token: u64,
    /// The events the stream is registered for in epoll; empty means not registered.
    registered: EventSet,
    /// Whether the key is in the ready queue.
    queued: bool,
    /// Whether the host asked for it (its local port was allocated by us).
    host_initiated: bool,
}

/// The host side of a virtio-vsock device (see the module docs of [`crate::vsock`]).
#[derive(Debug)]
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    clients: HashMap<u64, HandshakeClient>,
    conns: HashMap<ConnKey, Entry>,
    tokens: HashMap<u64, ConnKey>,
    next_token: u64,
    /// Connections that owe the guest a packet, each at most once, served round-robin.
    ready: VecDeque<ConnKey>,
    /// Answers to packets for no connection.
    resets: VecDeque<Header>,
    reset_keys: HashSet<ConnKey>,
    /// Local ports of host-initiated connections.
    local_ports: HashSet<u32>,
    next_port: u32,
}

impl VsockMuxer {
    /// Listens at `config.uds_path`, replacing a stale socket file.
    pub fn new(config: MuxerConfig) -> Result<Self, VsockError> {
        let bind_err = |source| VsockError::Bind {
            path: config.uds_path.clone(),
            source,
        };
        match std::fs::remove_file(&config.uds_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(&config.uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Self {
            guest_cid: config.guest_cid,
            uds_path: config.uds_path,
            listener,
            epoll,
            clients: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            ready: VecDeque::new(),
            resets: VecDeque::new(),
            reset_keys: HashSet::new(),
            local_ports: HashSet::new(),
            next_port: FIRST_LOCAL_PORT,
        })
    }

    /// The hybrid-vsock listener's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Number of live connections (not counting clients mid-handshake).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether the guest is owed at least one packet.
    pub fn has_pending_rx(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// Handles what happened on host sockets since the last call, without blocking.
    pub fn process_events(&mut self) -> Result<(), VsockError> {
        let mut events = [EpollEvent::default(); EVENTS_PER_CALL];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(VsockError::Epoll(e)),
        };
        for event in &events[..n] {
            let token = event.data();
            if token == LISTENER_TOKEN {
                self.accept_clients();
            } else if self.clients.contains_key(&token) {
                self.read_connect_line(token);
            } else if let Some(key) = self.tokens.get(&token).copied() {
                if let Some(entry) = self.conns.get_mut(&key) {
                    entry.conn.on_host_event(event.event_set());
                }
                self.refresh(key);
            }
            // Otherwise the token's owner went away earlier in this batch.
        }
        Ok(())
    }

    /// Handles a packet the guest put on the TX queue: its header and its payload, in pieces.
    pub fn send_pkt<B: BitmapSlice>(&mut self, header: &Header, data: &[VolatileSlice<'_, B>]) {
        let header = *header;
        if header.src_cid != self.guest_cid {
            tracing::debug!(?header, "vsock: packet with a foreign source cid, dropped");
            return;
        }
        if header.dst_cid != HOST_CID || header.type_ != TYPE_STREAM {
            tracing::debug!(?header, "vsock: not a stream to the host, refused");
            self.queue_reset(&header);
            return;
        }
        let key = header.key();
        match self.conns.get_mut(&key) {
            Some(entry) => {
                if entry.conn.on_guest_packet(&header, data) == Verdict::Drop {
                    self.remove(key);
                } else {
                    self.refresh(key);
                }
            }
            None if header.op == op::REQUEST => self.accept_guest_connection(&header),
            None => self.queue_reset(&header),
        }
    }

    /// Handles a guest packet whose descriptor chain was malformed but whose header could be
    /// read: its connection cannot stay in sync, so it is reset.
    pub fn reject(&mut self, header: &Header) {
        if header.src_cid != self.guest_cid {
            return;
        }
        let key = header.key();
        match self.conns.get_mut(&key) {
            Some(entry) => {
                entry.conn.kill();
                self.refresh(key);
            }
            None => self.queue_reset(header),
        }
    }

    /// Writes the next packet the guest is owed into `pkt` (an RX buffer) and returns its
    /// length, or `None` when nothing is owed. Connections are served round-robin; one that
    /// turns out to have nothing to send is skipped, never allowed to stop the others.
    pub fn recv_pkt<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Option<u32> {
        if let Some(header) = self.resets.pop_front() {
            self.reset_keys.remove(&reset_key(&header));
            header.write_to(pkt);
            return Some(PKT_HEADER_SIZE as u32);
        }
        // Each connection queued now is asked at most once per call, so one that keeps
        // claiming work without producing any cannot spin this loop.
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.queued = false;
            let produced = entry.conn.fill_rx(self.guest_cid, pkt);
            self.refresh(key);
            if produced.is_some() {
                return produced;
            }
        }
        None
    }

    /// Drops every connection and client (the driver reset the device).
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        let tokens: Vec<u64> = self.clients.keys().copied().collect();
        for token in tokens {
            self.drop_client(token);
        }
        self.resets.clear();
        self.reset_keys.clear();
    }

    /// Re-derives a connection's epoll interest and ready-queue membership from its state,
    /// and drops it once it is closed.
    fn refresh(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if entry.conn.state() == State::Closed {
            self.remove(key);
            return;
        }
        let wanted = entry.conn.wanted_events();
        if wanted != entry.registered {
            let fd = entry.conn.stream().as_raw_fd();
            let operation = if entry.registered.is_empty() {
                ControlOperation::Add
            } else if wanted.is_empty() {
                ControlOperation::Delete
            } else {
                ControlOperation::Modify
            };
            match self
                .epoll
                .ctl(operation, fd, EpollEvent::new(wanted, entry.token))
            {
                Ok(()) => entry.registered = wanted,
                Err(e) => {
                    tracing::warn!(?key, "vsock: epoll registration failed: {e}");
                    entry.conn.kill();
                    if !entry.registered.is_empty() {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            fd,
                            EpollEvent::new(entry.registered, entry.token),
                        );
                        entry.registered = EventSet::empty();
                    }
                }
            }
        }
        if entry.conn.has_pending_rx() && !entry.queued {
            entry.queued = true;
            self.ready.push_back(key);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.remove(&key) else {
            return;
        };
        if !entry.registered.is_empty() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                entry.conn.stream().as_raw_fd(),
                EpollEvent::new(entry.registered, entry.token),
            );
        }
        self.tokens.remove(&entry.token);
        if entry.host_initiated {
            self.local_ports.remove(&key.local_port);
        }
        if entry.queued {
            self.ready.retain(|k| *k != key);
        }
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    fn accept_clients(&mut self) {
        for _ in 0..ACCEPTS_PER_CALL {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accept failed: {e}");
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!("vsock: host client: {e}");
                continue;
            }
            let token = self.token();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                tracing::warn!("vsock: host client: {e}");
                continue;
            }
            self.clients.insert(
                token,
                HandshakeClient {
                    stream,
                    line: Vec::new(),
                },
            );
        }
    }

    /// Reads the client's line one byte at a time, so no byte of its stream after the line is
    /// consumed here.
    fn read_connect_line(&mut self, token: u64) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match (&client.stream).read(&mut byte) {
                Ok(0) => return self.drop_client(token),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => {
                    client.line.push(byte[0]);
                    if client.line.len() > MAX_CONNECT_LINE {
                        tracing::debug!("vsock: host client line too long");
                        return self.drop_client(token);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_client(token),
            }
        }
        let Some(port) = parse_connect_line(&client.line) else {
            tracing::debug!(line = ?String::from_utf8_lossy(&client.line), "vsock: bad CONNECT");
            return self.drop_client(token);
        };
        let Some(client) = self.take_client(token) else {
            return;
        };
        let Some(local_port) = self.allocate_port(port) else {
            tracing::warn!("vsock: no free host port");
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        self.local_ports.insert(local_port);
        self.insert(key, Connection::connecting(client.stream, key), token, true);
    }

    /// Removes a client from epoll and the table, handing over its stream.
    fn take_client(&mut self, token: u64) -> Option<HandshakeClient> {
        let client = self.clients.remove(&token)?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            client.stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        );
        Some(client)
    }

    fn drop_client(&mut self, token: u64) {
        drop(self.take_client(token));
    }

    /// A host port not used by another host-initiated connection nor by a guest-initiated one
    /// to the same guest port. Ports advance (and wrap) rather than being reused at once, so a
    /// guest socket still closing on an old port is never confused with a new connection.
    fn allocate_port(&mut self, peer_port: u32) -> Option<u32> {
        // Every try that fails is a distinct live connection, so this many tries suffice.
        for _ in 0..=self.conns.len() + 1 {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.local_ports.contains(&port) && !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    fn insert(&mut self, key: ConnKey, conn: Connection, token: u64, host_initiated: bool) {
        self.tokens.insert(token, key);
        self.conns.insert(
            key,
            Entry {
                conn,
                token,
                registered: EventSet::empty(),
                queued: false,
                host_initiated,
            },
        );
        self.refresh(key);
    }

    /// The guest connects to host port `P`: connect to `<uds_path>_<P>` for it.
    fn accept_guest_connection(&mut self, request: &Header) {
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", request.dst_port));
        let stream = match UnixStream::connect(&path) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(path = ?path, "vsock: guest connection refused: {e}");
                return self.queue_reset(request);
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!("vsock: guest connection: {e}");
            return self.queue_reset(request);
        }
        let token = self.token();
        let key = request.key();
        self.insert(key, Connection::accepting(stream, request), token, false);
    }

    /// Owes the guest an RST for a packet that belongs to no connection (never for an RST).
    fn queue_reset(&mut self, to: &Header) {
        if to.op == op::RST {
            return;
        }
        let reset = Header {
            src_cid: to.dst_cid,
            dst_cid: to.src_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: to.type_,
            op: op::RST,
            ..Header::default()
        };
        if self.resets.len() >= MAX_PENDING_RESETS {
            tracing::debug!("vsock: too many pending resets, one dropped");
            return;
        }
        if self.reset_keys.insert(reset_key(&reset)) {
            self.resets.push_back(reset);
        }
    }
}

impl AsRawFd for VsockMuxer {
    /// The epoll fd covering every host socket: readable when
    /// [`VsockMuxer::process_events`] has something to do.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// The connection an RST we send is about.
fn reset_key(reset: &Header) -> ConnKey {
    ConnKey {
        local_port: reset.src_port,
        peer_port: reset.dst_port,
    }
}

/// The guest port of `CONNECT <port>`, if `line` (without its `\n`) is one.
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests;
