//! An address bus: maps port-I/O or MMIO ranges to the devices that serve them.
//!
//! vCPU threads share one immutable [`Bus`] per address space after setup; each device sits
//! behind its own mutex, so two vCPUs touching different devices never contend.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes in its bus range.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared, lockable bus device.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of [`Bus::insert`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range has zero length or wraps past the end of the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// Address ranges to devices. Ranges never overlap.
#[derive(Clone, Default)]
pub struct Bus {
    /// Keyed by the start of each range.
    ranges: BTreeMap<u64, Entry>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(base, e)| (*base, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_previous = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(start, e)| start + e.len > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(&Entry, u64)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((entry, offset))
    }

    /// Reads from the device at `addr`; `false` when no device covers it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((entry, offset)) = self.resolve(addr) else {
            return false;
        };
        // A poisoned lock means another vCPU panicked inside the device; the VM is going down
        // anyway, and the data of that device is still the best answer we have.
        let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        device.read(offset, data);
        true
    }

    /// Writes to the device at `addr`; `false` when no device covers it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((entry, offset)) = self.resolve(addr) else {
            return false;
        };
        let mut device = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        device.write(offset, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access and answers reads with the offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn insert_overlapping_range_fails() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();

        let err = bus.insert(probe(), 0x108, 0x10).unwrap_err();

        assert_eq!(
            err,
            BusError::Overlap {
                base: 0x108,
                len: 0x10
            }
        );
    }

    #[test]
    fn insert_range_ending_inside_next_fails() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();

        let err = bus.insert(probe(), 0xf8, 0x10).unwrap_err();

        assert_eq!(
            err,
            BusError::Overlap {
                base: 0xf8,
                len: 0x10
            }
        );
    }

    #[test]
    fn insert_adjacent_ranges_succeeds() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();

        assert!(bus.insert(probe(), 0x110, 0x10).is_ok());
        assert!(bus.insert(probe(), 0xf0, 0x10).is_ok());
    }

    #[test]
    fn insert_empty_or_wrapping_range_fails() {
        let mut bus = Bus::new();

        assert!(matches!(
            bus.insert(probe(), 0x100, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn read_inside_range_passes_offset() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();
        let mut data = [0u8; 2];

        assert!(bus.read(0x10f, &mut data));

        assert_eq!(data, [0xf, 0xf]);
    }

    #[test]
    fn write_inside_range_reaches_device() {
        let mut bus = Bus::new();
        let device = probe();
        bus.insert(device.clone(), 0x100, 0x10).unwrap();

        assert!(bus.write(0x104, &[7]));

        assert_eq!(device.lock().unwrap().last_write, Some((4, vec![7])));
    }

    #[test]
    fn access_outside_any_range_is_unhandled() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();

        assert!(!bus.read(0x110, &mut [0u8; 1]));
        assert!(!bus.write(0xff, &[0]));
    }
}
