//! The event loop's view of virtio-net: the two queue events and the backend socket.
//!
//! The socket is registered once, edge-triggered for both directions: a level-triggered
//! registration would fire without end while the device leaves a frame in the socket for want
//! of guest buffers, or after the backend hung up.

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::EventSet;

use super::{Net, NetSocket, RX_QUEUE, TX_QUEUE};
use crate::EventSubscriber;

impl<S: NetSocket> EventSubscriber for Net<S> {
    fn interest(&self) -> Vec<(RawFd, EventSet)> {
        vec![
            (self.queue_event(RX_QUEUE).as_raw_fd(), EventSet::IN),
            (self.queue_event(TX_QUEUE).as_raw_fd(), EventSet::IN),
            (
                self.socket().as_raw_fd(),
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            ),
        ]
    }

    fn process(&mut self, fd: RawFd, events: EventSet) {
        let result = if fd == self.queue_event(RX_QUEUE).as_raw_fd() {
            // Drain the counter; a notification before activation is simply dropped.
            let _ = self.queue_event(RX_QUEUE).read();
            self.process_rx()
        } else if fd == self.queue_event(TX_QUEUE).as_raw_fd() {
            let _ = self.queue_event(TX_QUEUE).read();
            self.process_tx()
        } else {
            self.process_socket(events)
        };
        if let Err(e) = result {
            tracing::error!("virtio-net: {e}");
        }
    }
}
