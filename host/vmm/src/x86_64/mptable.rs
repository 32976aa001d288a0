//! The Intel MultiProcessor Specification (1.4) table.
//!
//! Without ACPI this is how Linux learns how many CPUs there are, where the IOAPIC is and how
//! ISA interrupts are wired. The table is built as plain bytes (every field little endian) and
//! written at [`EBDA_START`](super::layout::EBDA_START), where Linux scans for it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX};
use berth_devices::GuestMemoryMmap;

/// Errors of [`write_mptable`].
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More CPUs than APIC IDs left below the IOAPIC's.
    #[error("{0} vCPUs do not fit in an MP table")]
    TooManyCpus(u8),
    /// The table does not fit in guest memory.
    #[error("cannot write the MP table")]
    Write(#[source] GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const MP_SPEC_REV: u8 = 4;
/// Size of the floating pointer structure.
const FLOATING_POINTER_LEN: usize = 16;
/// Size of the configuration table header.
const HEADER_LEN: usize = 44;
/// Processor entries are 20 bytes, every other entry 8.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// CPUID family 6 signature and FPU/APIC feature flags, as real firmware reports them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const BUS_ISA: u8 = 0;

/// Makes the bytes of `table` sum to zero by returning the checksum byte.
fn checksum(table: &[u8]) -> u8 {
    0u8.wrapping_sub(table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// The table for `num_cpus` CPUs, placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    // APIC IDs 0..num_cpus for the CPUs, the next one for the IOAPIC.
    if num_cpus == 0 || num_cpus >= 0xfe {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for irq in 0..=IRQ_MAX as u8 {
        // Every ISA line, the timer's included, is a conforming interrupt on the IOAPIC pin
        // of the same number: that is how KVM routes them, and Linux's timer check looks for
        // IRQ 0 as an INT entry (an ExtINT entry leaves it without a vector and it faults).
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            BUS_ISA,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    // LINT0 is ExtINT and LINT1 NMI on every local APIC (0xff).
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        BUS_ISA,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        BUS_ISA,
        0,
        0xff,
        1,
    ]);
    let entry_count = u16::from(num_cpus) + 2 + (IRQ_MAX as u16 + 1) + 2;

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[MP_SPEC_REV, 0]);
    header.extend_from_slice(b"BERTH   ");
    header.extend_from_slice(b"BERTH-VMM   ");
    header.extend_from_slice(&[0; 4]); // no OEM table
    header.extend_from_slice(&[0; 2]); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // no extended table
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_POINTER_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `num_cpus` CPUs into guest memory.
pub fn write_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let table = build(num_cpus, EBDA_START)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    #[test]
    fn build_checksums_are_zero() {
        let table = build(4, EBDA_START).unwrap();

        assert_eq!(sum(&table[..FLOATING_POINTER_LEN]), 0);
        assert_eq!(sum(&table[FLOATING_POINTER_LEN..]), 0);
    }

    #[test]
    fn build_header_length_covers_all_entries() {
        let table = build(2, EBDA_START).unwrap();

        let length = u16::from_le_bytes([table[20], table[21]]);

        assert_eq!(usize::from(length), table.len() - FLOATING_POINTER_LEN);
        assert_eq!(&table[16..20], b"PCMP");
    }

    #[test]
    fn build_floating_pointer_points_at_header() {
        let table = build(1, EBDA_START).unwrap();

        let pointer = u32::from_le_bytes([table[4], table[5], table[6], table[7]]);

        assert_eq!(u64::from(pointer), EBDA_START + FLOATING_POINTER_LEN as u64);
    }

    #[test]
    fn build_marks_only_cpu0_as_bootstrap() {
        let table = build(2, EBDA_START).unwrap();
        let first = FLOATING_POINTER_LEN + HEADER_LEN;

        assert_eq!(table[first + 3], CPU_ENABLED | CPU_BOOTSTRAP);
        assert_eq!(table[first + 20 + 3], CPU_ENABLED);
    }

    #[test]
    fn build_zero_cpus_fails() {
        assert!(matches!(
            build(0, EBDA_START),
            Err(MptableError::TooManyCpus(0))
        ));
    }

    #[test]
    fn mptable_fits_below_high_memory() {
        let table = build(254 - 1, EBDA_START).unwrap();

        assert!(EBDA_START + table.len() as u64 <= super::super::layout::HIMEM_START);
    }
}
