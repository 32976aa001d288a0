//! CPUID as the guest sees it: what KVM supports, with the hypervisor bit set and the topology
//! leaves describing our vCPUs (one thread per core, one socket).

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: the local APIC timer has TSC-deadline mode. KVM emulates it but leaves the bit
/// out of `KVM_GET_SUPPORTED_CPUID` (it is reported as `KVM_CAP_TSC_DEADLINE_TIMER`).
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: the processor may have more than one logical CPU.
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_id` of `cpu_count`.
///
/// `tsc_deadline` says whether KVM emulates the TSC-deadline timer; without it the guest has to
/// calibrate the APIC timer against the PIT, which is slow and, nested, unreliable.
pub fn filter(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, cpu_count: u8, tsc_deadline: bool) {
    let id = u32::from(cpu_id);
    let count = u32::from(cpu_count);
    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                // EBX: initial APIC ID (31:24), logical processor count (23:16), CLFLUSH size
                // and brand index kept.
                entry.ebx = (id << 24) | (count << 16) | (entry.ebx & 0xffff);
                if cpu_count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            // Thermal and power management: nothing a guest can use.
            0x6 => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            // Extended topology: the x2APIC ID is the vCPU index.
            0xb | 0x1f => entry.edx = id,
            // AMD: number of cores minus one.
            0x8000_0008 => entry.ecx = (entry.ecx & !0xff) | (count - 1),
            // AMD extended APIC ID.
            0x8000_001e => {
                entry.eax = id;
                entry.ebx = (entry.ebx & !0xff) | id;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ebx: 0x0008_0800,
            ..Default::default()
        }
    }

    #[test]
    fn filter_leaf1_sets_hypervisor_and_apic_id() {
        let mut entries = [leaf(1)];

        filter(&mut entries, 3, 4, true);

        assert_ne!(entries[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);

        assert_ne!(entries[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(entries[0].ebx >> 24, 3);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_eq!(entries[0].ebx & 0xffff, 0x0800);
    }

    #[test]
    fn filter_single_cpu_clears_htt() {
        let mut entries = [kvm_cpuid_entry2 {
            function: 1,
            edx: LEAF1_EDX_HTT,
            ..leaf(1)
        }];

        filter(&mut entries, 0, 1, false);

        assert_eq!(entries[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn filter_topology_leaf_carries_x2apic_id() {
        let mut entries = [leaf(0xb)];

        filter(&mut entries, 2, 4, false);

        assert_eq!(entries[0].edx, 2);
    }
}
