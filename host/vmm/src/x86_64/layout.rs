//! Where things live in guest-physical memory.
//!
//! ```text
//! 0x0000_0500  GDT for the PVH entry (then an empty IDT)
//! 0x0000_6000  hvm_start_info, module list, memory map
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (the last KiB of base memory, where Linux looks for it)
//! 0x0010_0000  the kernel (at its ELF load addresses), initramfs at the top of low memory
//! 0xc000_0000  MMIO gap up to 4 GiB: virtio-mmio devices, IOAPIC, LAPIC, TSS
//! 0x1_0000_0000 the rest of RAM, if any
//! ```

/// GDT used at the PVH entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// The `hvm_start_info` structure; `rbx` points here at entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (the initramfs).
pub const MODLIST_START: u64 = 0x6040;
/// The PVH memory map.
pub const MEMMAP_START: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line, including the NUL (Linux's `COMMAND_LINE_SIZE` on x86).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA; RAM below it is usable, the MP table lives here.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of high memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Last address available to virtio-mmio windows (the IOAPIC comes after).
pub const VIRTIO_MMIO_END: u64 = 0xfec0_0000;
/// The IOAPIC's MMIO window.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO window.
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel (in the gap, never guest RAM).
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// First interrupt line for virtio devices (0-4 are the PIT, keyboard, cascade and COM ports).
pub const IRQ_BASE: u32 = 5;
/// Last interrupt line (the IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;

// The virtio windows sit in the MMIO gap, below the IOAPIC.
const _: () = assert!(VIRTIO_MMIO_START >= MMIO_GAP_START && VIRTIO_MMIO_END <= IOAPIC_START);

/// Guest RAM regions for `mem_size` bytes of memory, skipping the MMIO gap.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        return vec![(0, mem_size)];
    }
    vec![
        (0, MMIO_GAP_START),
        (MMIO_GAP_END, mem_size - MMIO_GAP_START),
    ]
}

/// End of RAM below the MMIO gap.
pub fn low_mem_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn ram_regions_small_memory_is_one_region() {
        assert_eq!(ram_regions(512 * MIB), vec![(0, 512 * MIB)]);
    }

    #[test]
    fn ram_regions_large_memory_skips_gap() {
        assert_eq!(ram_regions(4 * GIB), vec![(0, 3 * GIB), (4 * GIB, GIB)]);
    }
}
