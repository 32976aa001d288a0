//! vCPUs: creation, the boot state, the run loop, and the pure exit handler.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::x86_64::{cpuid, msr, regs};
use berth_devices::bus::Bus;

/// Errors of vCPU set-up and of running the guest.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` failed.
    #[error("cannot create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// A set-up ioctl failed.
    #[error("cannot set {0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    /// The CPUID table could not be built.
    #[error("cannot build CPUID")]
    Cpuid(#[source] vmm_sys_util::fam::Error),
    /// MSR set-up failed.
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    /// Register set-up failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// `KVM_RUN` failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// KVM could not handle an instruction (for example an emulation failure).
    #[error("KVM internal error")]
    InternalError,
    /// VM entry failed (`hardware_entry_failure_reason` {0:#x}).
    #[error("VM entry failed, reason {0:#x}")]
    FailEntry(u64),
    /// An exit we do not expect with an in-kernel irqchip.
    #[error("unexpected vCPU exit {0}")]
    UnexpectedExit(String),
    /// The vCPU thread could not be started.
    #[error("cannot start the vCPU thread")]
    Spawn(#[source] std::io::Error),
}

/// Why the guest stopped on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStop {
    /// Triple fault, i8042 reset or a reset system event: with `reboot=t` this is how the
    /// guest reboots or, for Berth, powers off.
    Reset,
    /// A shutdown system event (ACPI-less guests rarely send it).
    Shutdown,
    /// The guest reported a crash (pvpanic-style system event).
    Crash,
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again.
    Continue,
    /// The guest stopped.
    Stop(GuestStop),
}

/// Handles one vCPU exit against the port-I/O and MMIO buses.
///
/// Accesses nobody claims read as all ones on port I/O (an empty ISA bus) and as zeros on MMIO.
pub fn handle_exit(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> Result<ExitAction, VcpuError> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            tracing::trace!("out {port:#x} {data:?}");
            pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                tracing::debug!("unhandled MMIO read at {addr:#x}");
                data.fill(0);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                tracing::debug!("unhandled MMIO write at {addr:#x}");
            }
        }
        VcpuExit::Shutdown => return Ok(ExitAction::Stop(GuestStop::Reset)),
        VcpuExit::SystemEvent(kind, _) => {
            return match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Ok(ExitAction::Stop(GuestStop::Shutdown)),
                KVM_SYSTEM_EVENT_RESET => Ok(ExitAction::Stop(GuestStop::Reset)),
                KVM_SYSTEM_EVENT_CRASH => Ok(ExitAction::Stop(GuestStop::Crash)),
                other => Err(VcpuError::UnexpectedExit(format!("system event {other}"))),
            };
        }
        VcpuExit::InternalError => return Err(VcpuError::InternalError),
        VcpuExit::FailEntry(reason, _) => return Err(VcpuError::FailEntry(reason)),
        // A signal interrupted KVM_RUN; nothing to do.
        VcpuExit::Intr => {}
        other => return Err(VcpuError::UnexpectedExit(format!("{other:?}"))),
    }
    Ok(ExitAction::Continue)
}

/// What a vCPU thread reports when it stops.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The guest stopped.
    Stopped(GuestStop),
    /// The vCPU failed.
    Failed(u8, VcpuError),
}

/// Local APIC register offsets of LVT0 and LVT1, and the delivery modes we program.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// What every vCPU of a VM starts from.
#[derive(Debug, Clone)]
pub struct VcpuTemplate {
    /// `KVM_GET_SUPPORTED_CPUID`.
    pub supported_cpuid: CpuId,
    /// Whether KVM emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
}

/// Creates vCPU `id` of `count`, ready to enter the kernel at `entry`.
pub fn create(
    vm: &VmFd,
    template: &VcpuTemplate,
    id: u8,
    count: u8,
    entry: GuestAddress,
) -> Result<VcpuFd, VcpuError> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .map_err(|e| VcpuError::Create(id, e))?;
    let mut entries: Vec<kvm_cpuid_entry2> = template.supported_cpuid.as_slice().to_vec();
    cpuid::filter(&mut entries, id, count, template.tsc_deadline);
    let cpuid = CpuId::from_entries(&entries).map_err(VcpuError::Cpuid)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| VcpuError::Setup("CPUID", e))?;
    msr::setup_msrs(&vcpu)?;
    regs::setup_pvh(&vcpu, entry)?;
    let mut lapic = vcpu.get_lapic().map_err(|e| VcpuError::Setup("LAPIC", e))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes = &mut lapic.regs[offset..offset + 4];
        let reg = u32::from_le_bytes([
            bytes[0] as u8,
            bytes[1] as u8,
            bytes[2] as u8,
            bytes[3] as u8,
        ]);
        let new = set_delivery_mode(reg, mode).to_le_bytes();
        for (dst, src) in bytes.iter_mut().zip(new) {
            *dst = src as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| VcpuError::Setup("LAPIC", e))?;
    Ok(vcpu)
}

/// Runs `vcpu` on its own thread until the guest stops or the vCPU fails; reports through
/// `events` and wakes the event loop with `wake`.
pub fn spawn(
    id: u8,
    mut vcpu: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: Sender<VcpuEvent>,
    wake: EventFd,
) -> Result<JoinHandle<()>, VcpuError> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            let event = run(&mut vcpu, &pio, &mmio)
                .map_or_else(|e| VcpuEvent::Failed(id, e), VcpuEvent::Stopped);
            // The receiver only goes away when the process is exiting anyway.
            let _ = events.send(event);
            let _ = wake.write(1);
        })
        .map_err(VcpuError::Spawn)
}

fn run(vcpu: &mut VcpuFd, pio: &Bus, mmio: &Bus) -> Result<GuestStop, VcpuError> {
    loop {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(VcpuError::Run(e)),
        };
        let triple_fault = matches!(exit, VcpuExit::Shutdown);
        if let ExitAction::Stop(stop) = handle_exit(exit, pio, mmio)? {
            if triple_fault {
                // With `reboot=t` a triple fault is also how the guest reboots, so it ends the
                // VM cleanly; where it stopped tells a reboot from a crash when one surprises.
                match vcpu.get_regs() {
                    Ok(regs) => tracing::info!(
                        "triple fault (a reboot=t reboot, or a crash) at rip {:#x} rsp {:#x}",
                        regs.rip,
                        regs.rsp
                    ),
                    Err(e) => tracing::info!("triple fault; cannot read the registers: {e}"),
                }
            }
            return Ok(stop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_devices::bus::BusDevice;
    use std::sync::Mutex;

    /// Answers every read with 0x42 and remembers the last write.
    #[derive(Default)]
    struct Probe(Vec<u8>);

    impl BusDevice for Probe {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data.to_vec();
        }
    }

    fn buses() -> (Bus, Bus, Arc<Mutex<Probe>>) {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut pio = Bus::new();
        pio.insert(probe.clone(), 0x3f8, 8).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(probe.clone(), 0xd000_0000, 0x1000).unwrap();
        (pio, mmio, probe)
    }

    #[test]
    fn handle_exit_io_in_reads_device() {
        let (pio, mmio, _) = buses();
        let mut data = [0u8; 1];

        let action = handle_exit(VcpuExit::IoIn(0x3f8, &mut data), &pio, &mmio).unwrap();

        assert_eq!((action, data), (ExitAction::Continue, [0x42]));
    }

    #[test]
    fn handle_exit_unclaimed_port_reads_all_ones() {
        let (pio, mmio, _) = buses();
        let mut data = [0u8; 2];

        handle_exit(VcpuExit::IoIn(0x80, &mut data), &pio, &mmio).unwrap();

        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn handle_exit_mmio_write_reaches_device() {
        let (pio, mmio, probe) = buses();

        handle_exit(VcpuExit::MmioWrite(0xd000_0070, &[1, 0, 0, 0]), &pio, &mmio).unwrap();

        assert_eq!(probe.lock().unwrap().0, vec![1, 0, 0, 0]);
    }

    #[test]
    fn handle_exit_unclaimed_mmio_reads_zero() {
        let (pio, mmio, _) = buses();
        let mut data = [0xffu8; 4];

        handle_exit(VcpuExit::MmioRead(0x1000, &mut data), &pio, &mmio).unwrap();

        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn handle_exit_shutdown_stops_with_reset() {
        let (pio, mmio, _) = buses();

        let action = handle_exit(VcpuExit::Shutdown, &pio, &mmio).unwrap();

        assert_eq!(action, ExitAction::Stop(GuestStop::Reset));
    }

    #[test]
    fn handle_exit_crash_event_stops_with_crash() {
        let (pio, mmio, _) = buses();

        let action = handle_exit(
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[]),
            &pio,
            &mmio,
        )
        .unwrap();

        assert_eq!(action, ExitAction::Stop(GuestStop::Crash));
    }

    #[test]
    fn handle_exit_internal_error_fails() {
        let (pio, mmio, _) = buses();

        let result = handle_exit(VcpuExit::InternalError, &pio, &mmio);

        assert!(matches!(result, Err(VcpuError::InternalError)));
    }

    #[test]
    fn handle_exit_hlt_is_unexpected_with_irqchip() {
        let (pio, mmio, _) = buses();

        let result = handle_exit(VcpuExit::Hlt, &pio, &mmio);

        assert!(matches!(result, Err(VcpuError::UnexpectedExit(_))));
    }

    #[test]
    fn set_delivery_mode_replaces_only_mode_bits() {
        assert_eq!(set_delivery_mode(0x1_0700, APIC_MODE_NMI), 0x1_0400);
    }
}
