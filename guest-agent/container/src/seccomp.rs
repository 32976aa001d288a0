//! The default seccomp profile, as a hand-built classic BPF program (no libseccomp, so the agent
//! stays a static binary). It follows Docker's default profile for unprivileged containers
//! where that profile denies: kernel modules, kexec, reboot, keyrings, bpf, perf events,
//! clock setting, swap, quotas, accounting, new mount API and `mount`/`umount`, `pivot_root`,
//! namespace creation (`unshare`, `setns`, `clone` with namespace flags), handle-based opens,
//! cross-process memory access, NUMA policy, `userfaultfd`, io_uring. Denied calls fail with
//! `EPERM`; `clone3` fails with `ENOSYS` so libc falls back to `clone`, whose flags a classic
//! filter can inspect (Docker does the same).
//!
//! Only the native ABI is allowed: calls through another ABI (x32, i386 via `int 0x80`) fail
//! with `EPERM`.

use thiserror::Error;

/// Errors from installing a filter.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// The kernel refused the filter.
    #[error("cannot install seccomp filter")]
    Install(#[source] std::io::Error),
    /// The filter is too long for the kernel.
    #[error("seccomp filter of {0} instructions is too long")]
    TooLong(usize),
}

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

const RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const RET_EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
const RET_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

/// Offsets in `struct seccomp_data`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
/// The low 32 bits of the first argument (little-endian).
const OFFSET_ARG0_LOW: u32 = 16;

#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64

/// x32 syscalls carry this bit on an x86_64 arch value.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// Syscalls the default profile denies with `EPERM`.
pub fn denied_syscalls() -> Vec<libc::c_long> {
    let mut denied = vec![
        libc::SYS_acct,
        libc::SYS_add_key,
        libc::SYS_bpf,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_settime,
        libc::SYS_adjtimex,
        libc::SYS_settimeofday,
        libc::SYS_delete_module,
        libc::SYS_finit_module,
        libc::SYS_init_module,
        libc::SYS_get_mempolicy,
        libc::SYS_set_mempolicy,
        libc::SYS_mbind,
        libc::SYS_move_pages,
        libc::SYS_kcmp,
        libc::SYS_kexec_file_load,
        libc::SYS_kexec_load,
        libc::SYS_keyctl,
        libc::SYS_request_key,
        libc::SYS_lookup_dcookie,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_mount_setattr,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_pivot_root,
        libc::SYS_name_to_handle_at,
        libc::SYS_open_by_handle_at,
        libc::SYS_perf_event_open,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_quotactl,
        libc::SYS_reboot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_syslog,
        libc::SYS_userfaultfd,
        libc::SYS_fanotify_init,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ];
    #[cfg(target_arch = "x86_64")]
    denied.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_uselib,
        libc::SYS_ustat,
        libc::SYS_sysfs,
        libc::SYS__sysctl,
        libc::SYS_nfsservctl,
    ]);
    denied
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Builds the default profile's BPF program.
pub fn default_filter() -> Vec<libc::sock_filter> {
    let mut prog = vec![
        stmt(BPF_LD_W_ABS, OFFSET_ARCH),
        jump(BPF_JEQ_K, NATIVE_ARCH, 1, 0),
        stmt(BPF_RET_K, RET_EPERM),
        stmt(BPF_LD_W_ABS, OFFSET_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    prog.extend([
        jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, RET_EPERM),
    ]);
    for nr in denied_syscalls() {
        prog.push(jump(BPF_JEQ_K, nr as u32, 0, 1));
        prog.push(stmt(BPF_RET_K, RET_EPERM));
    }
    prog.push(jump(BPF_JEQ_K, libc::SYS_clone3 as u32, 0, 1));
    prog.push(stmt(BPF_RET_K, RET_ENOSYS));
    // clone: allowed unless it asks for new namespaces. The accumulator is reused, so every
    // path after this block returns.
    prog.extend([
        jump(BPF_JEQ_K, libc::SYS_clone as u32, 0, 3),
        stmt(BPF_LD_W_ABS, OFFSET_ARG0_LOW),
        jump(BPF_JSET_K, NAMESPACE_FLAGS, 0, 1),
        stmt(BPF_RET_K, RET_EPERM),
        stmt(BPF_RET_K, RET_ALLOW),
    ]);
    prog
}

/// Installs `filter` on the calling thread. The caller must have set `no_new_privs` or hold
/// `CAP_SYS_ADMIN`.
pub fn install(filter: &[libc::sock_filter]) -> Result<(), SeccompError> {
    let len = u16::try_from(filter.len()).map_err(|_| SeccompError::TooLong(filter.len()))?;
    let prog = libc::sock_fprog {
        len,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel copies the program.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(SeccompError::Install(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_filter_denies_each_listed_syscall() {
        let prog = default_filter();

        for nr in denied_syscalls() {
            let at = prog
                .iter()
                .position(|i| i.code == BPF_JEQ_K && i.k == nr as u32)
                .expect("syscall present");
            assert_eq!(prog[at + 1].k, RET_EPERM);
        }
    }

    #[test]
    fn default_filter_ends_allowing() {
        let prog = default_filter();

        assert_eq!(
            prog.last().map(|i| (i.code, i.k)),
            Some((BPF_RET_K, RET_ALLOW))
        );
    }

    /// Installs the filter in a forked child (no root needed with `no_new_privs`) and reports
    /// through the exit code what `keyctl`, `unshare` and `getpid` returned.
    #[test]
    fn install_default_filter_keyctl_gets_eperm() {
        let prog = default_filter();
        // SAFETY: the child only makes raw syscalls and exits with `_exit`; it touches no lock
        // another thread of the test harness could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: plain syscalls on valid arguments in the forked child.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                let fprog = libc::sock_fprog {
                    len: prog.len() as u16,
                    filter: prog.as_ptr().cast_mut(),
                };
                if libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &fprog) != 0 {
                    libc::_exit(10);
                }
                let keyctl = libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0);
                let keyctl_errno = *libc::__errno_location();
                let unshare = libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUTS);
                let unshare_errno = *libc::__errno_location();
                let pid_ok = libc::syscall(libc::SYS_getpid) > 0;
                let ok = keyctl == -1
                    && keyctl_errno == libc::EPERM
                    && unshare == -1
                    && unshare_errno == libc::EPERM
                    && pid_ok;
                libc::_exit(if ok { 0 } else { 11 });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };

        assert!(libc::WIFEXITED(status), "child did not exit normally");
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }
}
