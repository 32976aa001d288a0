//! The event loop's view of virtio-fs: the backend's call eventfds, never the kicks (those are
//! the backend's to read).

use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::EventSet;

use super::VhostUserFs;
use berth_devices::EventSubscriber;

impl EventSubscriber for VhostUserFs {
    fn interest(&self) -> Vec<(RawFd, EventSet)> {
        self.call_events()
            .iter()
            .map(|call| (call.as_raw_fd(), EventSet::IN))
            .collect()
    }

    fn process(&mut self, fd: RawFd, _events: EventSet) {
        let Some(call) = self.call_events().iter().find(|c| c.as_raw_fd() == fd) else {
            return;
        };
        // Drain the counter; the interrupt says "queues have used buffers", not how many.
        let _ = call.read();
        self.signal_used();
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{activate, guest_memory, FakeBackend, FakeBackendConfig};
    use super::*;
    use crate::config::ShareConfig;

    #[test]
    fn process_call_event_raises_interrupt_and_drains_it() {
        let backend = FakeBackend::start(FakeBackendConfig::default());
        let mem = guest_memory();
        let mut fs = VhostUserFs::new(&ShareConfig {
            tag: "host".into(),
            socket: backend.socket().to_owned(),
        })
        .unwrap();
        let interrupt = activate(&mut fs, &mem).unwrap();
        fs.call_events()[1].write(1).unwrap();
        let fd = fs.call_events()[1].as_raw_fd();

        fs.process(fd, EventSet::IN);

        assert_eq!(interrupt.count(), 1);
        assert!(
            fs.call_events()[1].read().is_err(),
            "call event not drained"
        );
    }

    #[test]
    fn interest_is_the_call_events_only() {
        let dir = tempfile::tempdir().unwrap();
        let fs = VhostUserFs::new(&ShareConfig {
            tag: "host".into(),
            socket: dir.path().join("missing.sock"),
        })
        .unwrap();

        let fds: Vec<RawFd> = fs.interest().into_iter().map(|(fd, _)| fd).collect();

        let calls: Vec<RawFd> = fs.call_events().iter().map(AsRawFd::as_raw_fd).collect();
        assert_eq!(fds, calls);
    }
}
