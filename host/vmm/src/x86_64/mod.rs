//! x86_64 machine set-up: the guest-physical layout, the PVH boot state of the vCPUs, CPUID,
//! MSRs and the MP table that tells the guest about its CPUs and IOAPIC.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
