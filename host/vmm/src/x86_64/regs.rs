//! vCPU register state at the PVH entry point.
//!
//! PVH enters the kernel in 32-bit protected mode with paging off: flat 4 GiB code and data
//! segments from a GDT we place in guest memory, `CR0.PE` set, `rbx` pointing at
//! `hvm_start_info` (Xen's PVH ABI, `arch/x86/platform/pvh/head.S`).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{BOOT_GDT_START, BOOT_IDT_START, PVH_INFO_START};
use berth_devices::GuestMemoryMmap;

/// Errors of the register set-up.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("cannot {0} vCPU registers")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The GDT or IDT could not be written to guest memory.
    #[error("cannot write the boot GDT/IDT")]
    Memory(#[source] GuestMemoryError),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
/// Default x87 control word and SSE control/status, as after FNINIT and reset.
const FPU_FCW: u16 = 0x37f;
const FPU_MXCSR: u32 = 0x1f80;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;

/// Segment descriptor flags (access byte plus the G/D/L/AVL nibble).
const GDT_CODE32: u16 = 0xc09b;
const GDT_DATA32: u16 = 0xc093;
const GDT_TSS: u16 = 0x008b;

/// The boot GDT: null, 32-bit code (selector 0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(GDT_CODE32, 0, 0xfffff),
    gdt_entry(GDT_DATA32, 0, 0xfffff),
    gdt_entry(GDT_TSS, 0, 0xfffff),
];

/// Encodes a segment descriptor.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// The KVM view of GDT entry `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let granular = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if granular == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and an empty IDT into guest memory.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::Memory)
}

/// Segment and control registers for the PVH entry, on top of KVM's reset state.
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment_from_gdt(BOOT_GDT[1], 1);
    let data = kvm_segment_from_gdt(BOOT_GDT[2], 2);
    let tss = kvm_segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers for the PVH entry at `entry`.
pub fn pvh_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rip: entry.0,
        rbx: PVH_INFO_START,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

/// Puts `vcpu` at the PVH entry point.
pub fn setup_pvh(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), RegsError> {
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("get special", e))?;
    vcpu.set_sregs(&pvh_sregs(sregs))
        .map_err(|e| RegsError::Kvm("set special", e))?;
    vcpu.set_regs(&pvh_regs(entry))
        .map_err(|e| RegsError::Kvm("set general", e))?;
    let fpu = kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: FPU_MXCSR,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("set FPU", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entry_flat_code_matches_known_encoding() {
        assert_eq!(gdt_entry(GDT_CODE32, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn kvm_segment_flat_code_is_32bit_4gib() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[1], 1);

        assert_eq!((seg.base, seg.limit, seg.selector), (0, 0xffff_ffff, 0x08));
        assert_eq!(
            (seg.type_, seg.present, seg.db, seg.l, seg.g, seg.s),
            (0xb, 1, 1, 0, 1, 1)
        );
    }

    #[test]
    fn kvm_segment_null_entry_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn pvh_sregs_enter_protected_mode_without_paging() {
        let sregs = pvh_sregs(kvm_sregs::default());

        assert_eq!(sregs.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(sregs.cr0 & (1 << 31), 0);
        assert_eq!(sregs.efer, 0);
        assert_eq!(sregs.ds.selector, 0x10);
    }

    #[test]
    fn pvh_regs_point_rbx_at_start_info() {
        let regs = pvh_regs(GuestAddress(0x100_0000));

        assert_eq!(
            (regs.rip, regs.rbx, regs.rflags),
            (0x100_0000, PVH_INFO_START, 2)
        );
    }
}
