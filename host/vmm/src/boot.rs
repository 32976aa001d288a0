//! Loading the guest: kernel (ELF with a PVH entry), initramfs, command line, and the PVH
//! `hvm_start_info` with the memory map.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::x86_64::layout::{
    low_mem_end, ram_regions, CMDLINE_START, EBDA_START, HIMEM_START, MEMMAP_START, MODLIST_START,
    PVH_INFO_START,
};
use berth_devices::GuestMemoryMmap;

/// Errors of loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image could not be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The kernel path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not a loadable ELF.
    #[error("cannot load the kernel")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// The kernel has no PVH entry note (`CONFIG_PVH`).
    #[error("kernel has no PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvhEntry,
    /// The initramfs could not be read.
    #[error("cannot read initramfs {path}")]
    ReadInitramfs {
        /// The initramfs path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of low memory.
    #[error("initramfs of {size} bytes does not fit in guest memory")]
    InitramfsTooLarge {
        /// Size of the initramfs.
        size: u64,
    },
    /// Writing to guest memory failed.
    #[error("cannot write {0} to guest memory")]
    Memory(&'static str, #[source] vm_memory::GuestMemoryError),
    /// The command line could not be written.
    #[error("cannot write the command line")]
    Cmdline(#[source] linux_loader::loader::Error),
    /// The PVH boot parameters could not be written.
    #[error("cannot write the PVH boot parameters")]
    StartInfo(#[source] linux_loader::configurator::Error),
}

/// `hvm_start_info.magic` ("xEn3" with the top bit set).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// E820 type of usable RAM.
const E820_RAM: u32 = 1;
const PAGE_SIZE: u64 = 4096;

/// The loaded kernel and initramfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedGuest {
    /// The PVH entry point.
    pub entry: GuestAddress,
    /// Address and size of the initramfs, if any.
    pub initramfs: Option<(GuestAddress, u64)>,
}

/// Loads the ELF kernel at `path`; returns its PVH entry and the end of its image.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<(GuestAddress, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.display().to_string(),
        source,
    })?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::LoadKernel)?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok((entry, loaded.kernel_end)),
        _ => Err(BootError::NoPvhEntry),
    }
}

/// Where an initramfs of `size` bytes goes: page-aligned at the top of low memory, above the
/// kernel.
pub fn initramfs_address(mem_size: u64, kernel_end: u64, size: u64) -> Option<GuestAddress> {
    let top = low_mem_end(mem_size);
    let start = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= kernel_end).then_some(GuestAddress(start))
}

/// Loads the initramfs at `path` above `kernel_end`.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(GuestAddress, u64), BootError> {
    let read_error = |source| BootError::ReadInitramfs {
        path: path.display().to_string(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(read_error)?;
    let size = bytes.len() as u64;
    let addr = initramfs_address(mem_size, kernel_end, size)
        .ok_or(BootError::InitramfsTooLarge { size })?;
    mem.write_slice(&bytes, addr)
        .map_err(|e| BootError::Memory("initramfs", e))?;
    Ok((addr, size))
}

/// The PVH memory map for `mem_size` bytes of RAM.
pub fn memmap(mem_size: u64) -> Vec<hvm_memmap_table_entry> {
    let mut entries = vec![entry(0, EBDA_START)];
    for (start, size) in ram_regions(mem_size) {
        let (start, size) = if start == 0 {
            (HIMEM_START, size.saturating_sub(HIMEM_START))
        } else {
            (start, size)
        };
        if size > 0 {
            entries.push(entry(start, size));
        }
    }
    entries
}

fn entry(addr: u64, size: u64) -> hvm_memmap_table_entry {
    hvm_memmap_table_entry {
        addr,
        size,
        type_: E820_RAM,
        reserved: 0,
    }
}

/// Writes the command line and the PVH start info.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: &Cmdline,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::Cmdline)?;
    let memmap = memmap(mem_size);
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if initramfs.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = MODLIST_START;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    if let Some((addr, size)) = initramfs {
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::StartInfo)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn memmap_small_memory_has_base_and_high_ram() {
        let map = memmap(256 * MIB);

        let ranges: Vec<_> = map.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(
            ranges,
            vec![(0, EBDA_START), (HIMEM_START, 256 * MIB - HIMEM_START)]
        );
    }

    #[test]
    fn memmap_large_memory_has_ram_above_4g() {
        let map = memmap(4096 * MIB);

        assert_eq!(
            map.last().map(|e| (e.addr, e.size)),
            Some((1 << 32, 1024 * MIB))
        );
    }

    #[test]
    fn initramfs_address_is_page_aligned_at_top() {
        let addr = initramfs_address(256 * MIB, 32 * MIB, 5000).unwrap();

        assert_eq!(addr.0, 256 * MIB - 8192);
    }

    #[test]
    fn initramfs_address_overlapping_kernel_is_none() {
        assert_eq!(initramfs_address(64 * MIB, 60 * MIB, 8 * MIB), None);
    }
}
