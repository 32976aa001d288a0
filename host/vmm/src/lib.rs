//! `berth-vmm`: a one-shot KVM micro-VM monitor.
//!
//! It takes a complete [`VmConfig`](config::VmConfig), boots the guest kernel through PVH and
//! runs until the guest powers off or the process is signalled; the exit code says which (see
//! [`exit`]). Threads: one per vCPU, plus the main thread running the device event loop.
//!
//! The crate also serves our vsock device to QEMU (the `qemu` backend) as the `berth-vsock`
//! vhost-user backend: [`vhost_user_vsock`].

pub mod boot;
pub mod config;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
pub mod memory;
pub mod signals;
pub mod vcpu;
pub mod vhost_user_fs;
pub mod vhost_user_vsock;
pub mod vm;
pub mod x86_64;
