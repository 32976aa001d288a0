//! The 8250 UART at COM1 (vm-superio's model) writing the guest console to a log, and a writer
//! that watches that console for a kernel panic so the VMM can report it in its exit code.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// First port of COM1.
pub const COM1_PORT_BASE: u64 = 0x3f8;
/// COM1 has eight registers.
pub const COM1_PORT_LEN: u64 = 8;
/// The ISA interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;

/// The console UART on the port-I/O bus.
#[derive(Debug)]
pub struct SerialConsole<W: Write + Send>(Serial<EventFdTrigger, NoEvents, W>);

impl<W: Write + Send> SerialConsole<W> {
    /// A UART that raises `irq` and writes what the guest transmits to `out`.
    pub fn new(irq: EventFdTrigger, out: W) -> Self {
        Self(Serial::new(irq, out))
    }

    /// The console output.
    pub fn writer(&self) -> &W {
        self.0.writer()
    }
}

impl<W: Write + Send> BusDevice for SerialConsole<W> {
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
            // The console log is best effort: a full disk must not stop the guest.
            tracing::warn!("serial: {e:?}");
        }
    }
}

/// The line Linux prints when it panics (also when PID 1 dies).
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Passes console output through to `W` and raises a flag when the guest kernel panics.
///
/// With `panic=-1` the guest resets right after panicking, which looks to the VMM exactly like a
/// requested reboot; the console is the only place the difference shows.
#[derive(Debug)]
pub struct PanicWatch<W: Write> {
    inner: W,
    /// The last bytes seen, so a marker split across writes is still found.
    tail: Vec<u8>,
    panicked: Arc<AtomicBool>,
}

impl<W: Write> PanicWatch<W> {
    /// Watches output written to `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            tail: Vec::new(),
            panicked: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A flag that turns true once the guest kernel has panicked.
    pub fn panicked(&self) -> Arc<AtomicBool> {
        self.panicked.clone()
    }
}

impl<W: Write> Write for PanicWatch<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tail.extend_from_slice(buf);
        if self
            .tail
            .windows(PANIC_MARKER.len())
            .any(|w| w == PANIC_MARKER)
        {
            self.panicked.store(true, Ordering::SeqCst);
        }
        let keep = PANIC_MARKER.len() - 1;
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
        // The flag is set even when the log cannot be written.
        self.inner.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Transmit holding register, at offset 0 while DLAB is clear.
    const THR: u64 = 0;

    #[test]
    fn serial_write_thr_reaches_output() {
        let irq = EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut serial = SerialConsole::new(irq, Vec::new());

        serial.write(THR, b"h");
        serial.write(THR, b"i");

        assert_eq!(serial.writer(), b"hi");
    }

    #[test]
    fn serial_wide_access_is_ignored() {
        let irq = EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut serial = SerialConsole::new(irq, Vec::new());

        serial.write(THR, b"hi");

        assert!(serial.writer().is_empty());
    }

    #[test]
    fn panic_watch_marker_split_across_writes_sets_flag() {
        let mut watch = PanicWatch::new(Vec::new());
        let panicked = watch.panicked();

        watch.write_all(b"[ 1.0] Kernel pa").unwrap();
        watch
            .write_all(b"nic - not syncing: Attempted to kill init!")
            .unwrap();

        assert!(panicked.load(Ordering::SeqCst));
    }

    #[test]
    fn panic_watch_ordinary_output_leaves_flag_clear() {
        let mut watch = PanicWatch::new(Vec::new());
        let panicked = watch.panicked();

        watch.write_all(b"reboot: Restarting system\n").unwrap();

        assert!(!panicked.load(Ordering::SeqCst));
        assert_eq!(watch.inner, b"reboot: Restarting system\n");
    }
}
