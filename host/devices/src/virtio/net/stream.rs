//! The `-netdev stream` framing over a non-blocking socket: frames out through a batching
//! buffer that survives partial writes, frames in through a bounded reassembly buffer.
//!
//! Every `write` carries whole frames and at most [`WRITE_CHUNK_BYTES`], which a unix stream
//! socket queues all or nothing. That matters to the backend, not to us: passt (as of Debian
//! bookworm's 2023-03 snapshot) reads a frame's missing tail with one more `recv` and loses the
//! framing for good if the tail is not there yet, so a frame must never reach it in two parts
//! written at different times. QEMU's stream netdev writes one frame per call for the same
//! reason.
//!
//! Nothing here knows about virtio; the device decides when to send and when to stop reading.

use std::collections::VecDeque;
use std::io::{self, ErrorKind};

use super::{NetSocket, FRAME_LEN_SIZE, MAX_FRAME_LEN};

/// Size of the reassembly buffer: room for several frames per read, and always for one whole
/// frame of the largest size after the unparsed rest is moved to the front.
pub const RX_BUFFER_BYTES: usize = 256 * 1024;
/// Most bytes of whole frames one `write` carries (a bigger frame goes alone). A unix stream
/// socket queues a write as one buffer, all or nothing, up to about 32 KiB plus a page.
pub const WRITE_CHUNK_BYTES: usize = 16 * 1024;

/// Why the stream cannot be used any more.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The backend closed the connection.
    #[error("the backend closed the connection")]
    Closed,
    /// The backend sent a length no frame can have: it is broken or speaks another protocol.
    #[error("the backend sent a frame length of {0}")]
    BadLength(u32),
    /// Reading or writing the socket failed.
    #[error("backend socket I/O")]
    Io(#[source] io::Error),
}

/// Frames over a connected, non-blocking byte stream.
#[derive(Debug)]
pub struct FrameStream<S: NetSocket> {
    socket: S,
    /// Framed bytes not yet written; `tx_sent` of them are already out.
    tx: Vec<u8>,
    tx_sent: usize,
    /// Where each frame in `tx` not yet completely written ends.
    tx_frame_ends: VecDeque<usize>,
    /// Bytes read and not yet handed out: `rx[rx_start..rx_end]`.
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    /// Whether the socket may still hold data: with edge-triggered polling, no event comes for
    /// data that was already there when the device stopped reading.
    readable: bool,
}

impl<S: NetSocket> FrameStream<S> {
    /// Frames over `socket`, which must be non-blocking.
    pub fn new(socket: S) -> Self {
        Self {
            socket,
            tx: Vec::new(),
            tx_sent: 0,
            tx_frame_ends: VecDeque::new(),
            rx: vec![0u8; RX_BUFFER_BYTES].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            // Data may have arrived before the first readiness event was registered.
            readable: true,
        }
    }

    /// The socket, for polling.
    pub fn socket(&self) -> &S {
        &self.socket
    }

    /// Records that the socket reported data (or a hang-up) to read.
    pub fn mark_readable(&mut self) {
        self.readable = true;
    }

    /// Whether the socket may hold data the stream has not read.
    pub fn readable(&self) -> bool {
        self.readable
    }

    /// Framed bytes waiting to be written.
    pub fn tx_pending(&self) -> usize {
        self.tx.len() - self.tx_sent
    }

    /// Appends a frame of `len` bytes, which `fill` writes into the slice it is given; if
    /// `fill` fails, nothing is appended.
    pub fn queue_frame<E>(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        debug_assert!(len <= MAX_FRAME_LEN, "the caller bounds the frame");
        let start = self.tx.len();
        // MAX_FRAME_LEN fits a u32.
        self.tx.extend_from_slice(&(len as u32).to_be_bytes());
        self.tx.resize(start + FRAME_LEN_SIZE + len, 0);
        let result = fill(&mut self.tx[start + FRAME_LEN_SIZE..]);
        match result {
            Ok(()) => self.tx_frame_ends.push_back(self.tx.len()),
            Err(_) => self.tx.truncate(start),
        }
        result
    }

    /// Writes as much of the pending bytes as the socket takes without blocking, whole frames
    /// at a time (see the module documentation).
    pub fn flush(&mut self) -> Result<(), StreamError> {
        while self.tx_sent < self.tx.len() {
            let end = self.next_write_end();
            match self.socket.write(&self.tx[self.tx_sent..end]) {
                Ok(0) => return Err(StreamError::Io(ErrorKind::WriteZero.into())),
                Ok(n) => self.tx_sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.drop_sent();
                    return Ok(());
                }
                Err(e) => return Err(StreamError::Io(e)),
            }
            while self
                .tx_frame_ends
                .front()
                .is_some_and(|end| *end <= self.tx_sent)
            {
                self.tx_frame_ends.pop_front();
            }
        }
        self.tx.clear();
        self.tx_sent = 0;
        self.tx_frame_ends.clear();
        Ok(())
    }

    /// The end of the next write: the rest of the first unfinished frame, and the frames after
    /// it while they fit in [`WRITE_CHUNK_BYTES`].
    fn next_write_end(&self) -> usize {
        let mut ends = self.tx_frame_ends.iter();
        let mut end = ends.next().copied().unwrap_or(self.tx.len());
        for next in ends {
            if next - self.tx_sent > WRITE_CHUNK_BYTES {
                break;
            }
            end = *next;
        }
        end
    }

    /// Drops the bytes already written, so under steady traffic (when the buffer never
    /// empties) it does not grow with everything ever sent.
    fn drop_sent(&mut self) {
        self.tx.drain(..self.tx_sent);
        for end in &mut self.tx_frame_ends {
            *end -= self.tx_sent;
        }
        self.tx_sent = 0;
    }

    /// The next complete frame, reading the socket if no complete frame is buffered; `None`
    /// when the socket has nothing more for now. The frame stays until [`Self::consume_frame`].
    pub fn peek_frame(&mut self) -> Result<Option<&[u8]>, StreamError> {
        loop {
            if let Some(len) = self.buffered_frame_len()? {
                let start = self.rx_start + FRAME_LEN_SIZE;
                return Ok(Some(&self.rx[start..start + len]));
            }
            if !self.readable {
                return Ok(None);
            }
            self.fill()?;
        }
    }

    /// Drops the frame [`Self::peek_frame`] returned.
    pub fn consume_frame(&mut self) {
        if let Ok(Some(len)) = self.buffered_frame_len() {
            self.rx_start += FRAME_LEN_SIZE + len;
        }
    }

    /// Forgets every buffered byte both ways, once the stream is no longer used.
    pub fn discard(&mut self) {
        self.tx = Vec::new();
        self.tx_sent = 0;
        self.tx_frame_ends.clear();
        self.rx_start = 0;
        self.rx_end = 0;
        self.readable = false;
    }

    /// The length of the frame at the front of the reassembly buffer, if all of it is there.
    fn buffered_frame_len(&self) -> Result<Option<usize>, StreamError> {
        let buffered = &self.rx[self.rx_start..self.rx_end];
        let Some(prefix) = buffered.first_chunk::<FRAME_LEN_SIZE>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        if len == 0 || len as usize > MAX_FRAME_LEN {
            return Err(StreamError::BadLength(len));
        }
        let len = len as usize;
        Ok((buffered.len() >= FRAME_LEN_SIZE + len).then_some(len))
    }

    /// Reads once from the socket into the reassembly buffer.
    fn fill(&mut self) -> Result<(), StreamError> {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx.len() - self.rx_end < FRAME_LEN_SIZE + MAX_FRAME_LEN {
            // Not enough room behind an incomplete frame for its rest: move it to the front.
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        loop {
            match self.socket.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(StreamError::Closed),
                Ok(n) => {
                    self.rx_end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(());
                }
                Err(e) => return Err(StreamError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    fn pair() -> (FrameStream<UnixStream>, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (FrameStream::new(ours), peer)
    }

    fn framed(frame: &[u8]) -> Vec<u8> {
        let mut out = (frame.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(frame);
        out
    }

    #[test]
    fn queue_frame_then_flush_writes_length_and_bytes() {
        let (mut stream, mut peer) = pair();

        stream
            .queue_frame(3, |buf| {
                buf.copy_from_slice(b"abc");
                Ok::<(), ()>(())
            })
            .unwrap();
        stream.flush().unwrap();

        let mut got = [0u8; 7];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got.to_vec(), framed(b"abc"));
        assert_eq!(stream.tx_pending(), 0);
    }

    /// A socket that records the length of every write and accepts at most `accept` bytes of
    /// each, the rest of its buffer being "full".
    #[derive(Debug)]
    struct RecordingSocket {
        inner: UnixStream,
        writes: Vec<usize>,
        accept: usize,
    }

    impl Read for RecordingSocket {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }

    impl Write for RecordingSocket {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.accept == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.accept);
            self.accept -= n;
            self.writes.push(buf.len());
            self.inner.write(&buf[..n])
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl std::os::fd::AsRawFd for RecordingSocket {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.inner.as_raw_fd()
        }
    }

    #[test]
    fn flush_writes_whole_frames_of_at_most_a_chunk_per_call() {
        let (ours, _peer) = UnixStream::pair().unwrap();
        let socket = RecordingSocket {
            inner: ours,
            writes: Vec::new(),
            accept: usize::MAX,
        };
        let mut stream = FrameStream::new(socket);
        // 1500-byte frames: 10 fit one chunk (10 * 1504 <= 16 KiB), an 11th would not.
        for _ in 0..25 {
            stream
                .queue_frame(1500, |buf| {
                    buf.fill(1);
                    Ok::<(), ()>(())
                })
                .unwrap();
        }

        stream.flush().unwrap();

        assert_eq!(stream.socket().writes, vec![10 * 1504, 10 * 1504, 5 * 1504]);
    }

    #[test]
    fn flush_after_partial_write_sends_the_rest_in_order() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let socket = RecordingSocket {
            inner: ours,
            writes: Vec::new(),
            accept: 1000,
        };
        let mut stream = FrameStream::new(socket);
        for seed in 0..3u8 {
            stream
                .queue_frame(1500, |buf| {
                    buf.fill(seed);
                    Ok::<(), ()>(())
                })
                .unwrap();
        }
        stream.flush().unwrap();
        stream.socket.accept = usize::MAX;

        stream.flush().unwrap();

        // The first write was cut short after 1000 bytes; the next carries everything after.
        assert_eq!(stream.socket().writes, vec![3 * 1504, 3 * 1504 - 1000]);
        let mut got = vec![0u8; 3 * 1504];
        peer.read_exact(&mut got).unwrap();
        let expected: Vec<u8> = (0..3u8).flat_map(|seed| framed(&[seed; 1500])).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn queue_frame_failing_fill_appends_nothing() {
        let (mut stream, _peer) = pair();

        let result = stream.queue_frame(3, |_| Err("guest memory"));

        assert_eq!(result, Err("guest memory"));
        assert_eq!(stream.tx_pending(), 0);
    }

    #[test]
    fn peek_frame_split_across_reads_waits_for_the_rest() {
        let (mut stream, mut peer) = pair();
        let bytes = framed(&[7u8; 100]);
        peer.write_all(&bytes[..50]).unwrap();

        assert_eq!(stream.peek_frame().unwrap(), None);
        peer.write_all(&bytes[50..]).unwrap();
        stream.mark_readable();

        assert_eq!(stream.peek_frame().unwrap(), Some(&[7u8; 100][..]));
    }

    #[test]
    fn peek_frame_zero_length_is_an_error() {
        let (mut stream, mut peer) = pair();
        peer.write_all(&[0, 0, 0, 0, 1]).unwrap();

        let err = stream.peek_frame().unwrap_err();

        assert!(matches!(err, StreamError::BadLength(0)), "{err:?}");
    }

    #[test]
    fn peek_frame_after_peer_close_is_closed() {
        let (mut stream, peer) = pair();
        drop(peer);

        let err = stream.peek_frame().unwrap_err();

        assert!(matches!(err, StreamError::Closed), "{err:?}");
    }

    #[test]
    fn frames_filling_the_buffer_many_times_all_arrive_intact() {
        let (mut stream, mut peer) = pair();
        // Frames of varying size, so frame boundaries fall everywhere in the buffer and the
        // incomplete rest gets moved to the front often.
        let frames: Vec<Vec<u8>> = (0..200u32)
            .map(|i| vec![i as u8; 1 + (i as usize * 977) % MAX_FRAME_LEN])
            .collect();
        let sender = std::thread::spawn(move || {
            for frame in &frames {
                peer.write_all(&framed(frame)).unwrap();
            }
            frames
        });
        let mut got = Vec::new();
        while got.len() < 200 {
            match stream.peek_frame().unwrap() {
                Some(frame) => {
                    got.push(frame.to_vec());
                    stream.consume_frame();
                }
                None => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    stream.mark_readable();
                }
            }
        }

        assert_eq!(got, sender.join().unwrap());
    }
}
