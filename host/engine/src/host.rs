//! What the host can do for virtualization, measured rather than assumed.
//!
//! A `/dev/kvm` that opens is not enough: on PVM hosts (`kvm_pvm`, pagetable-based
//! virtualization for machines without VT-x/AMD-V) the device accepts the usual ioctls but a
//! stock Linux guest dies early in boot with an emulation failure. So hardware KVM is reported
//! only when the device opens *and* the CPU advertises VMX or SVM *and* the module behind it is
//! not PVM.

use std::fs::OpenOptions;
use std::path::Path;

/// How the host can accelerate a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmSupport {
    /// `/dev/kvm` backed by VT-x or AMD-V: a stock kernel boots.
    Hardware,
    /// `/dev/kvm` is PVM: only PVM-patched guest kernels boot, ours is not one.
    PvmOnly,
    /// No usable `/dev/kvm`; the string says why.
    Unavailable(String),
}

impl KvmSupport {
    /// One sentence for the log: what was found and what it means for booting our kernel.
    pub fn explain(&self) -> String {
        match self {
            Self::Hardware => "/dev/kvm is backed by hardware virtualization (VMX/SVM)".into(),
            Self::PvmOnly => "/dev/kvm is PVM (module kvm_pvm), which cannot boot a stock \
                              Linux guest kernel"
                .into(),
            Self::Unavailable(why) => format!("no usable /dev/kvm: {why}"),
        }
    }
}

/// The facts [`classify_kvm`] decides from, gathered from the host by [`probe_kvm`].
#[derive(Debug, Clone)]
pub struct KvmFacts {
    /// `Err` holds why `/dev/kvm` could not be opened read-write.
    pub device: Result<(), String>,
    /// The kvm module is PVM (`/sys/module/kvm_pvm` exists).
    pub pvm_module: bool,
    /// `/proc/cpuinfo` lists `vmx` or `svm`.
    pub cpu_has_virt: bool,
}

/// Decides what the facts allow.
pub fn classify_kvm(facts: &KvmFacts) -> KvmSupport {
    if let Err(why) = &facts.device {
        return KvmSupport::Unavailable(why.clone());
    }
    if facts.pvm_module {
        return KvmSupport::PvmOnly;
    }
    if !facts.cpu_has_virt {
        return KvmSupport::Unavailable(
            "the CPU advertises neither vmx nor svm, so /dev/kvm cannot run a stock kernel".into(),
        );
    }
    KvmSupport::Hardware
}

/// Looks at this host.
pub fn probe_kvm() -> KvmSupport {
    classify_kvm(&gather_facts(Path::new("/")))
}

fn gather_facts(root: &Path) -> KvmFacts {
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("dev/kvm"))
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm read-write: {e}"));
    let pvm_module = root.join("sys/module/kvm_pvm").exists();
    let cpu_has_virt = std::fs::read_to_string(root.join("proc/cpuinfo"))
        .map(|text| cpuinfo_has_virt(&text))
        .unwrap_or(false);
    KvmFacts {
        device,
        pvm_module,
        cpu_has_virt,
    }
}

fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .flat_map(|line| line.split_whitespace())
        .any(|flag| flag == "vmx" || flag == "svm")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(device_ok: bool, pvm_module: bool, cpu_has_virt: bool) -> KvmFacts {
        KvmFacts {
            device: if device_ok {
                Ok(())
            } else {
                Err("No such file or directory".into())
            },
            pvm_module,
            cpu_has_virt,
        }
    }

    #[test]
    fn classify_kvm_pvm_module_is_pvm_only_even_with_device() {
        assert_eq!(classify_kvm(&facts(true, true, false)), KvmSupport::PvmOnly);
    }

    #[test]
    fn classify_kvm_device_and_vmx_is_hardware() {
        assert_eq!(
            classify_kvm(&facts(true, false, true)),
            KvmSupport::Hardware
        );
    }

    #[test]
    fn classify_kvm_missing_device_is_unavailable() {
        assert!(matches!(
            classify_kvm(&facts(false, false, true)),
            KvmSupport::Unavailable(_)
        ));
    }

    #[test]
    fn classify_kvm_device_without_cpu_virt_is_unavailable() {
        assert!(matches!(
            classify_kvm(&facts(true, false, false)),
            KvmSupport::Unavailable(_)
        ));
    }

    #[test]
    fn cpuinfo_has_virt_finds_svm_flag() {
        let text = "processor\t: 0\nflags\t\t: fpu vme de svm sse2\n";

        assert!(cpuinfo_has_virt(text));
    }

    #[test]
    fn cpuinfo_has_virt_ignores_flag_substrings() {
        // "svm_lock" and "vmx_ept" are not the flags themselves.
        let text = "flags\t\t: fpu svm_lock vmx_ept\n";

        assert!(!cpuinfo_has_virt(text));
    }
}
