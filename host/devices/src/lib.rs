//! Device models of `berth-vmm`.
//!
//! Nothing here holds a KVM handle: devices see guest memory, an interrupt trait and their queue
//! events, so every model is unit-tested without `/dev/kvm`. The VMM wires them in one place
//! (`berth_vmm::device_manager`).

pub mod bus;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod legacy;
pub mod virtio;
pub mod vsock;

/// Guest memory as every device sees it: anonymous mappings without dirty-page tracking.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// An event source the VMM's epoll loop dispatches to.
///
/// The loop registers every fd of [`EventSubscriber::interest`] once, at wiring time, and calls
/// [`EventSubscriber::process`] with the fd that fired.
pub trait EventSubscriber: Send {
    /// The fds to poll and the events each one is interested in.
    fn interest(&self) -> Vec<(std::os::fd::RawFd, vmm_sys_util::epoll::EventSet)>;
    /// Handles `events` that fired on `fd`.
    fn process(&mut self, fd: std::os::fd::RawFd, events: vmm_sys_util::epoll::EventSet);
}
