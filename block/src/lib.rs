//! cellvm's disk images.
//!
//! `header` reads a qcow2 image's header and says what the image is and whether cellvm may
//! serve it; it is the only part the root-running jailer links, so it depends on nothing
//! and parses only the first cluster.
//!
//! With the `engine` feature (what the blk backend links) the crate also has the one seam
//! the virtio-blk request code goes through, [`DiskImage`], and its two formats:
//!
//! - [`Raw`]: the image file as the disk, read and written with preadv/pwritev straight
//!   between the file and guest RAM (no copies); with O_DIRECT through an aligned bounce
//!   buffer only where guest buffers are not aligned.
//! - [`Qcow2`]: qcow2 v2 and v3 on the `imago` crate (0.2.6, sync mode), on descriptors
//!   handed in: the top and every layer of its backing chain arrive open, and imago's
//!   deny gate keeps it from opening anything itself (a header naming a backing file it
//!   was not given fails the open, it is never looked up).
//!
//! # What imago 0.2.6 lacks, and what cellvm does about it
//!
//! - **Encryption** (AES, LUKS): imago never looks at `crypt_method` and would serve
//!   ciphertext. [`Qcow2::open`] unlocks a LUKS top with the key it is given
//!   ([`luks`]) and moves that image's data itself, decrypting and encrypting each
//!   sector by its host offset (see `qcow2.rs`, "Encryption"). It parses every qcow2
//!   layer's header with [`header`] first and refuses what
//!   [`header::Qcow2Header::refusal_keyed`] names: legacy AES, LUKS without a key (or
//!   below the top), a key for a plain image, the dirty and
//!   corrupt bits, an external data file, extended L2, a compression type other than
//!   zlib, unknown incompatible bits, and, for a writable top, persistent bitmaps (imago
//!   clears the autoclear bits on a read-write open, which would silently invalidate
//!   them).
//! - **Bounds on hostile metadata**: imago caps the L1 and refcount tables at 4 Mi entries
//!   (32 MiB) but reads them from wherever the header points; cellvm refuses an image
//!   whose L1 table, refcount table or snapshot table does not lie inside the file, and a
//!   virtual size past 2^56 bytes (the most a qcow2 L1/L2 layout can map), before imago
//!   reads anything. And imago's file driver reads zeroes past the end of a file and
//!   writes wherever metadata points: cellvm wraps it (`bounded`) so a read that ends
//!   past the file's end fails, and a write that would take the file past what the
//!   header allows (`max_file_bytes`, the jailer's RLIMIT_FSIZE) fails with EFBIG; only
//!   that request fails.
//! - **Internal snapshots**: imago cannot create, list, apply or delete them (the
//!   snapshot table is read-only to it), but it keeps them intact when writing to an
//!   image that has them (copy-on-write for clusters whose refcount is above one).
//!   Snapshot management is offline: `cellvm-img snapshot` or `qemu-img snapshot`.
//! - **Compressed writes, zstd**: imago reads zlib-compressed clusters (a guest write
//!   to one reallocates it) and writes none; zstd images are refused. Compressing is
//!   offline (`cellvm-img convert -c`, `qemu-img convert -c`).
//! - **Check and repair**: none in imago; `qemu-img check` / `cellvm-img check` offline.
//! - **Discard concurrency**: imago's safe discard needs exclusive access (`&mut`); cellvm
//!   holds every read and write under a shared lock and a discard under the exclusive
//!   one, so no request keeps a mapping a discard frees.
//! - **Flush**: imago's `flush` writes back its metadata caches and `sync` is the fsync;
//!   a virtio FLUSH does both, in that order. Every write, discard and write-zeroes also
//!   writes the caches back when it completes (without fsync), so what the guest saw
//!   complete survives the backend being killed, as on a raw image (imago would keep it
//!   in memory until the next flush; the process ends by SIGKILL when the VMM goes).
//! - **Metadata cache**: fixed at 128 L2 tables (64 GiB of guest space at 64 KiB
//!   clusters) and 32 refcount blocks; random I/O over more than that re-reads tables.

pub mod header;

#[cfg(feature = "engine")]
mod bounded;
#[cfg(feature = "engine")]
mod image;
#[cfg(feature = "engine")]
pub mod luks;
#[cfg(feature = "engine")]
mod qcow2;
#[cfg(feature = "engine")]
mod raw;

#[cfg(feature = "engine")]
pub use image::{DiskImage, OpenError, Slice, SECTOR};
#[cfg(feature = "engine")]
pub use qcow2::{Layer, Qcow2};
#[cfg(feature = "engine")]
pub use raw::Raw;
