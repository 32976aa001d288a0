//! The event loop's view of virtio-balloon: one event per queue.

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::Balloon;
use crate::virtio::VirtioDevice;
use crate::EventSubscriber;

impl EventSubscriber for Balloon {
    fn interest(&self) -> Vec<(RawFd, EventSet)> {
        self.queue_events()
            .iter()
            .map(|event| (event.as_raw_fd(), EventSet::IN))
            .collect()
    }

    fn process(&mut self, fd: RawFd, _events: EventSet) {
        let Some(index) = self
            .queue_events()
            .iter()
            .position(|event: &EventFd| event.as_raw_fd() == fd)
        else {
            tracing::warn!("virtio-balloon: event on unknown fd {fd}");
            return;
        };
        // Drain the counter; a notification before activation is simply dropped.
        let _ = self.queue_events()[index].read();
        if let Err(e) = self.process_queue(index) {
            tracing::error!("virtio-balloon: {e}");
        }
    }
}
