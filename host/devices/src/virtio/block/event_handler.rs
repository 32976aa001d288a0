//! The event loop's view of virtio-blk: one queue event.

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::EventSet;

use super::Block;
use crate::EventSubscriber;

impl EventSubscriber for Block {
    fn interest(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.queue_event().as_raw_fd(), EventSet::IN)]
    }

    fn process(&mut self, _fd: RawFd, _events: EventSet) {
        // Drain the counter; a notification before activation is simply dropped.
        let _ = self.queue_event().read();
        if let Err(e) = self.process_queue() {
            tracing::error!("virtio-blk: {e}");
        }
    }
}
