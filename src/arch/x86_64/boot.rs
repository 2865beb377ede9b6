//! Loading a kernel and handing it the boot information: PVH `hvm_start_info` for ELF
//! kernels with a PVH note, Linux `boot_params` (the 64-bit boot protocol) for ELF
//! vmlinux without one and for bzImage. Loading goes through linux-loader; every size
//! and address that comes from the kernel file is checked against guest RAM here.

use std::fs::File;
use std::io::{Read, Seek};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::layout;

const PVH_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// setup_header.xloadflags: the kernel has a 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Oldest boot protocol with the fields we rely on (xloadflags, 64-bit entry).
const MIN_BZIMAGE_PROTOCOL: u16 = 0x020c;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {0}: file is empty")]
    Empty(String),
    #[error("kernel {path}: not a loadable kernel: as ELF: {elf}; as bzImage: {bzimage}")]
    NotAKernel {
        path: String,
        elf: loader::Error,
        bzimage: loader::Error,
    },
    #[error("kernel {path}: {source}")]
    Load { path: String, source: loader::Error },
    #[error(
        "kernel {0}: bzImage boot protocol {1:#x} is older than 2.12 or has no 64-bit entry point"
    )]
    OldBzImage(String, u16),
    #[error(
        "kernel {path}: image ends at {end:#x}, beyond guest RAM ({ram:#x} bytes below 4 GiB)"
    )]
    TooLarge { path: String, end: u64, ram: u64 },
    #[error("initrd {path}: {source}")]
    Initrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd {path}: {size} bytes do not fit in guest RAM ({available} bytes free between the kernel and {limit:#x})")]
    InitrdTooLarge {
        path: String,
        size: u64,
        available: u64,
        limit: u64,
    },
    #[error("command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("command line: byte {byte:#04x} at offset {offset} is not printable ASCII")]
    CmdlineNotAscii { byte: u8, offset: usize },
    #[error("cannot write boot information into guest memory: {0}")]
    BootInfo(String),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// 32-bit protected mode, paging off, %ebx = hvm_start_info.
    Pvh,
    /// 64-bit long mode on identity page tables, %rsi = boot_params.
    Linux64,
}

/// Which protocol to use for an ELF kernel that offers both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH when the ELF has a PVH note, else the Linux 64-bit protocol.
    #[default]
    Auto,
    Pvh,
    Linux,
}

#[derive(Debug)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    pub protocol: Protocol,
    /// First free address after the kernel image.
    pub end: u64,
    header: Option<setup_header>,
}

#[derive(Copy, Clone, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: plain-old-data C struct without padding or pointers.
unsafe impl ByteValued for StartInfo {}

#[derive(Copy, Clone, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: plain-old-data C struct without padding or pointers.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Copy, Clone, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: plain-old-data C struct without padding or pointers.
unsafe impl ByteValued for ModlistEntry {}

#[derive(Copy, Clone, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: boot_params is a packed plain-old-data C struct.
unsafe impl ByteValued for ZeroPage {}

/// Loads a kernel image (ELF or bzImage) from `image`.
pub fn load_kernel<F>(
    mem: &GuestMemoryMmap,
    path: &str,
    image: &mut F,
    mem_size: u64,
    want: BootProtocol,
) -> Result<LoadedKernel, Error>
where
    F: Read + ReadVolatile + Seek,
{
    let size = image
        .seek(std::io::SeekFrom::End(0))
        .map_err(|source| Error::Open {
            path: path.into(),
            source,
        })?;
    if size == 0 {
        return Err(Error::Empty(path.into()));
    }
    let ram_top = layout::low_ram_end(mem_size);
    let elf = match Elf::load(mem, None, image, Some(GuestAddress(layout::HIGH_RAM_START))) {
        Ok(r) => r,
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber))
        | Err(loader::Error::Elf(loader::elf::Error::ReadElfHeader)) => {
            return load_bzimage(mem, path, image, ram_top);
        }
        // A segment that cannot be read (truncated file, or beyond guest RAM) comes back
        // as linux-loader's own error, named as it is.
        Err(source) => {
            return Err(Error::Load {
                path: path.into(),
                source,
            })
        }
    };
    let end = elf.kernel_end;
    check_end(path, end, ram_top)?;
    let (entry, protocol) = match (elf.pvh_boot_cap, want) {
        (PvhBootCapability::PvhEntryPresent(addr), BootProtocol::Auto | BootProtocol::Pvh) => {
            (addr, Protocol::Pvh)
        }
        (_, BootProtocol::Pvh) => {
            return Err(Error::Load {
                path: path.into(),
                source: loader::Error::Elf(loader::elf::Error::InvalidPvhNote),
            })
        }
        _ => (elf.kernel_load, Protocol::Linux64),
    };
    Ok(LoadedKernel {
        entry,
        protocol,
        end,
        header: None,
    })
}

fn check_end(path: &str, end: u64, ram_top: u64) -> Result<(), Error> {
    if end > ram_top {
        return Err(Error::TooLarge {
            path: path.into(),
            end,
            ram: ram_top,
        });
    }
    Ok(())
}

fn load_bzimage<F>(
    mem: &GuestMemoryMmap,
    path: &str,
    image: &mut F,
    ram_top: u64,
) -> Result<LoadedKernel, Error>
where
    F: Read + ReadVolatile + Seek,
{
    let result = match BzImage::load(mem, None, image, Some(GuestAddress(layout::HIGH_RAM_START))) {
        Ok(r) => r,
        Err(bz) => {
            // Re-run the ELF probe only to report both reasons in one line.
            let elf = Elf::load(mem, None, image, None)
                .err()
                .unwrap_or(loader::Error::Elf(
                    loader::elf::Error::InvalidElfMagicNumber,
                ));
            return Err(Error::NotAKernel {
                path: path.into(),
                elf,
                bzimage: bz,
            });
        }
    };
    let header = result
        .setup_header
        .ok_or(Error::OldBzImage(path.into(), 0))?;
    let version = header.version;
    let xloadflags = header.xloadflags;
    if version < MIN_BZIMAGE_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::OldBzImage(path.into(), version));
    }
    check_end(path, result.kernel_end, ram_top)?;
    Ok(LoadedKernel {
        entry: GuestAddress(result.kernel_load.0 + 0x200),
        protocol: Protocol::Linux64,
        end: result.kernel_end,
        header: Some(header),
    })
}

/// The command line limit for this kernel, NUL included.
pub fn cmdline_limit(kernel: &LoadedKernel) -> usize {
    match kernel.header {
        Some(h) if h.version >= 0x0206 && h.cmdline_size > 0 => {
            (h.cmdline_size as usize + 1).min(layout::CMDLINE_MAX)
        }
        _ => layout::CMDLINE_MAX,
    }
}

/// Writes the command line at its fixed address.
pub fn load_cmdline(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    text: &str,
) -> Result<u64, Error> {
    let max = cmdline_limit(kernel);
    if text.len() + 1 > max {
        return Err(Error::CmdlineTooLong {
            len: text.len(),
            max: max - 1,
        });
    }
    // Printable ASCII only, as the kernel parses it: anything else (control bytes,
    // other encodings) is refused rather than passed on or normalised away.
    if let Some((offset, &byte)) = text
        .as_bytes()
        .iter()
        .enumerate()
        .find(|(_, b)| !(b' '..=b'~').contains(*b))
    {
        return Err(Error::CmdlineNotAscii { byte, offset });
    }
    let cmdline = Cmdline::try_from(text, max).map_err(Error::Cmdline)?;
    // What is written (linux-loader normalises, e.g. trailing blanks) is what the boot
    // information must describe.
    let written = cmdline
        .as_cstring()
        .map_err(Error::Cmdline)?
        .as_bytes()
        .len();
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE), &cmdline)
        .map_err(|e| Error::BootInfo(e.to_string()))?;
    Ok(written as u64)
}

/// Where an initrd went.
#[derive(Clone, Copy, Debug)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// Loads the initrd at the highest page-aligned address below the limit that still
/// clears the kernel image.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    path: &str,
    file: &mut File,
    mem_size: u64,
) -> Result<Initrd, Error> {
    let size = file
        .metadata()
        .map_err(|source| Error::Initrd {
            path: path.into(),
            source,
        })?
        .len();
    let mut limit = layout::low_ram_end(mem_size);
    if let Some(h) = kernel.header {
        let max = h.initrd_addr_max as u64;
        if max != 0 {
            limit = limit.min(max + 1);
        }
    }
    let floor = (kernel.end + 0xfff) & !0xfff;
    let available = limit.saturating_sub(floor);
    if size > available {
        return Err(Error::InitrdTooLarge {
            path: path.into(),
            size,
            available,
            limit,
        });
    }
    let addr = (limit - size) & !0xfff;
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|e| Error::Initrd {
            path: path.into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(Initrd { addr, size })
}

/// Writes the boot information for the kernel's protocol.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: u64,
    initrd: Option<Initrd>,
    rsdp: GuestAddress,
    mem_size: u64,
) -> Result<(), Error> {
    let e820 = layout::e820_map(mem_size);
    match kernel.protocol {
        Protocol::Pvh => {
            let mut info = hvm_start_info {
                magic: PVH_MAGIC,
                version: 1,
                cmdline_paddr: layout::CMDLINE,
                rsdp_paddr: rsdp.0,
                memmap_paddr: layout::PVH_MEMMAP,
                memmap_entries: e820.len() as u32,
                ..Default::default()
            };
            let memmap: Vec<MemmapEntry> = e820
                .iter()
                .map(|&(addr, size, type_)| {
                    MemmapEntry(hvm_memmap_table_entry {
                        addr,
                        size,
                        type_,
                        reserved: 0,
                    })
                })
                .collect();
            let mut params;
            if let Some(rd) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = layout::PVH_MODLIST;
                params = BootParams::new(&StartInfo(info), GuestAddress(layout::PVH_START_INFO));
                let module = ModlistEntry(hvm_modlist_entry {
                    paddr: rd.addr,
                    size: rd.size,
                    ..Default::default()
                });
                params.set_modules(&[module], GuestAddress(layout::PVH_MODLIST));
            } else {
                params = BootParams::new(&StartInfo(info), GuestAddress(layout::PVH_START_INFO));
            }
            params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP));
            PvhBootConfigurator::write_bootparams(&params, mem)
                .map_err(|e| Error::BootInfo(e.to_string()))
        }
        Protocol::Linux64 => {
            let mut zp = boot_params::default();
            match kernel.header {
                Some(h) => zp.hdr = h,
                None => {
                    zp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
                    zp.hdr.header = KERNEL_HDR_MAGIC;
                    zp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
                }
            }
            zp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            zp.hdr.cmd_line_ptr = layout::CMDLINE as u32;
            zp.hdr.cmdline_size = cmdline_len as u32;
            if let Some(rd) = initrd {
                zp.hdr.ramdisk_image = rd.addr as u32;
                zp.hdr.ramdisk_size = rd.size as u32;
            }
            zp.acpi_rsdp_addr = rsdp.0;
            for (i, &(addr, size, type_)) in e820.iter().enumerate() {
                zp.e820_table[i].addr = addr;
                zp.e820_table[i].size = size;
                zp.e820_table[i].r#type = type_;
            }
            zp.e820_entries = e820.len() as u8;
            let params = BootParams::new(&ZeroPage(zp), GuestAddress(layout::ZERO_PAGE));
            LinuxBootConfigurator::write_bootparams(&params, mem)
                .map_err(|e| Error::BootInfo(e.to_string()))
        }
    }
}

/// Reads back what `write_boot_info` wrote for a PVH boot (tests and diagnostics).
pub fn read_start_info(mem: &GuestMemoryMmap) -> Option<hvm_start_info> {
    mem.read_obj::<StartInfo>(GuestAddress(layout::PVH_START_INFO))
        .ok()
        .map(|s| s.0)
}
