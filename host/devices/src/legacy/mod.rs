//! Legacy PC devices on the port-I/O bus: the 8250 console and the i8042 reset line.

mod i8042;
mod serial;

pub use i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{PanicWatch, SerialConsole, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN};

use vmm_sys_util::eventfd::EventFd;

/// Raises an interrupt line or an event by writing to an eventfd (an irqfd for interrupts).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `fd`.
    pub fn new(fd: EventFd) -> Self {
        Self(fd)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}
