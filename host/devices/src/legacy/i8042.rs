//! The i8042 keyboard controller, reduced to what a VMM needs: command `0xFE` on port `0x64`
//! pulses the CPU reset line, which ends the VM.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// First port of the controller (data port).
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports `0x60..=0x64`: data at offset 0, command/status at offset 4.
pub const I8042_PORT_LEN: u64 = 5;

/// The i8042 on the port-I/O bus; the reset command writes to its reset eventfd.
#[derive(Debug)]
pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    /// A controller that signals `reset` when the guest asks for a CPU reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.0.write(offset, *value) {
            tracing::error!("i8042: cannot signal the reset event: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Offset of the command port (0x64) from the data port (0x60).
    const COMMAND: u64 = 4;

    fn device() -> (I8042, EventFd) {
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let trigger = EventFdTrigger::new(reset.try_clone().unwrap());
        (I8042::new(trigger), reset)
    }

    #[test]
    fn write_reset_command_signals_reset() {
        let (mut i8042, reset) = device();

        i8042.write(COMMAND, &[0xfe]);

        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn write_other_command_does_not_signal() {
        let (mut i8042, reset) = device();

        i8042.write(COMMAND, &[0xaa]);
        i8042.write(0, &[0xfe]);

        assert!(reset.read().is_err());
    }

    #[test]
    fn read_status_returns_zero() {
        let (mut i8042, _reset) = device();
        let mut data = [0xffu8];

        i8042.read(COMMAND, &mut data);

        assert_eq!(data, [0]);
    }
}
