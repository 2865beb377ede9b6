//! LUKS1 as qcow2 embeds it (`crypt_method = 2`, `encrypt.format=luks`): the header the
//! full disk encryption extension points to, unlocked with the administrator's key, and
//! the data cipher the unlocked master key drives.
//!
//! The header follows the LUKS1 on-disk format (cryptsetup's "LUKS On-Disk Format
//! Specification", version 1.2): big-endian fields, eight key slots, each slot's key
//! material split into 4000 anti-forensic stripes and encrypted with a key derived from
//! the passphrase by PBKDF2. Offsets of key material count 512-byte sectors from the
//! start of the LUKS header, which in qcow2 sits in clusters of the image file.
//!
//! Data: each 512-byte sector of a data cluster is encrypted on its own with
//! AES-XTS, the tweak the sector's number in the *image file* (plain64: a little-endian
//! 64-bit sector number); qcow2 encrypts by host offset for LUKS (a cluster's
//! ciphertext is tied to where it lies in the file, not to the guest offset).
//!
//! Everything here is tenant input: the header's iteration counts are bounded (a
//! hostile image must not make the backend spin for hours before its first request),
//! every slot offset must lie inside the encryption header's clusters, and only the
//! ciphers cellvm implements (AES-128/256 in XTS mode with plain64 tweaks, hashes
//! SHA-1, SHA-256, SHA-512) are accepted; anything else is refused by name.

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use xts_mode::{get_tweak_default, Xts128};

/// The LUKS1 magic, "LUKS\xba\xbe".
const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The header's fixed part: magic, version, names, offsets, digest, uuid, eight slots.
pub const HEADER_LEN: usize = 592;
const SLOTS: usize = 8;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
/// LUKS1 always splits key material into 4000 stripes.
const STRIPES: u32 = 4000;
/// The unit of LUKS key material offsets and of the data cipher.
pub const SECTOR: u64 = 512;
const DIGEST_LEN: usize = 20;
/// The most PBKDF2 iterations a slot or the master key digest may ask for. qemu's
/// default (`iter-time` 2 s) gives about 2 million on a current core; this bound lets
/// every slot of an image from a machine many times faster unlock, and keeps a hostile
/// image from holding the backend for longer than a minute or so.
pub const MAX_ITERATIONS: u32 = 50_000_000;
/// The longest key (passphrase) read from a secret file.
pub const MAX_KEY_LEN: usize = 4096;

/// Why a LUKS header was refused or could not be unlocked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LuksError {
    #[error("LUKS header: {0}")]
    Invalid(String),
    #[error("LUKS header: {0} is not supported (cellvm implements aes with xts-plain64, hashes sha1, sha256, sha512)")]
    Unsupported(String),
    #[error("the key does not open any active LUKS key slot")]
    WrongKey,
}

fn invalid(what: impl Into<String>) -> LuksError {
    LuksError::Invalid(what.into())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hash {
    Sha1,
    Sha256,
    Sha512,
}

impl Hash {
    fn parse(name: &str) -> Result<Hash, LuksError> {
        match name {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            "sha512" => Ok(Hash::Sha512),
            other => Err(LuksError::Unsupported(format!("hash {other:?}"))),
        }
    }

    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            Hash::Sha1 => run::<Sha1>(parts),
            Hash::Sha256 => run::<Sha256>(parts),
            Hash::Sha512 => run::<Sha512>(parts),
        }
    }

    fn size(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
            Hash::Sha512 => 64,
        }
    }

    fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        use hmac::Hmac;
        // Output lengths here are at most 64 bytes and never 0, which pbkdf2 accepts.
        let _ = match self {
            Hash::Sha1 => pbkdf2::pbkdf2::<Hmac<Sha1>>(password, salt, rounds, out),
            Hash::Sha256 => pbkdf2::pbkdf2::<Hmac<Sha256>>(password, salt, rounds, out),
            Hash::Sha512 => pbkdf2::pbkdf2::<Hmac<Sha512>>(password, salt, rounds, out),
        };
    }
}

/// One active key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub iterations: u32,
    pub salt: [u8; 32],
    /// Bytes from the start of the LUKS header.
    pub material_offset: u64,
}

/// A LUKS1 header, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    hash: Hash,
    /// Master key bytes: 32 (AES-128-XTS) or 64 (AES-256-XTS).
    pub key_bytes: usize,
    mk_digest: [u8; DIGEST_LEN],
    mk_salt: [u8; 32],
    mk_iterations: u32,
    pub slots: Vec<Slot>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

/// A NUL-padded name field.
fn name(b: &[u8], at: usize, len: usize, what: &str) -> Result<String, LuksError> {
    let field = &b[at..at + len];
    let end = field.iter().position(|&c| c == 0).unwrap_or(len);
    std::str::from_utf8(&field[..end])
        .ok()
        .filter(|s| s.bytes().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .ok_or_else(|| invalid(format!("{what} is not a printable name")))
}

impl Header {
    /// Parses and checks the header at the start of `area`, the encryption header's
    /// clusters (`area_len` bytes of them): every active slot's key material must lie
    /// inside them.
    pub fn parse(b: &[u8], area_len: u64) -> Result<Header, LuksError> {
        if b.len() < HEADER_LEN {
            return Err(invalid(format!(
                "{} bytes, shorter than the {HEADER_LEN} of a LUKS1 header",
                b.len()
            )));
        }
        if b[..6] != MAGIC {
            return Err(invalid("no LUKS magic where the qcow2 header points"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(LuksError::Unsupported(format!("LUKS version {version}")));
        }
        let cipher = name(b, 8, 32, "cipher name")?;
        let mode = name(b, 40, 32, "cipher mode")?;
        let hash = Hash::parse(&name(b, 72, 32, "hash")?)?;
        if cipher != "aes" {
            return Err(LuksError::Unsupported(format!("cipher {cipher:?}")));
        }
        if mode != "xts-plain64" {
            return Err(LuksError::Unsupported(format!("cipher mode {mode:?}")));
        }
        let key_bytes = be32(b, 108) as usize;
        if key_bytes != 32 && key_bytes != 64 {
            return Err(invalid(format!(
                "key_bytes {key_bytes}: aes-xts takes 32 or 64"
            )));
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_salt = [0u8; 32];
        mk_salt.copy_from_slice(&b[132..164]);
        let mk_iterations = be32(b, 164);
        if mk_iterations == 0 || mk_iterations > MAX_ITERATIONS {
            return Err(invalid(format!(
                "master key digest iterations {mk_iterations}: expected 1 to {MAX_ITERATIONS}"
            )));
        }
        let material_len = key_bytes as u64 * u64::from(STRIPES);
        let mut slots = Vec::new();
        for i in 0..SLOTS {
            let s = 208 + i * 48;
            let active = be32(b, s);
            match active {
                SLOT_INACTIVE => continue,
                SLOT_ACTIVE => {}
                other => {
                    return Err(invalid(format!(
                        "key slot {i}: state {other:#x} is neither active nor inactive"
                    )))
                }
            }
            let iterations = be32(b, s + 4);
            if iterations == 0 || iterations > MAX_ITERATIONS {
                return Err(invalid(format!(
                    "key slot {i}: iterations {iterations}: expected 1 to {MAX_ITERATIONS}"
                )));
            }
            let mut salt = [0u8; 32];
            salt.copy_from_slice(&b[s + 8..s + 40]);
            let material_offset = u64::from(be32(b, s + 40)) * SECTOR;
            let stripes = be32(b, s + 44);
            if stripes != STRIPES {
                return Err(invalid(format!(
                    "key slot {i}: {stripes} stripes (LUKS1 uses {STRIPES})"
                )));
            }
            if material_offset < HEADER_LEN as u64 || material_offset + material_len > area_len {
                return Err(invalid(format!(
                    "key slot {i}: key material at {material_offset} (+{material_len}) does not lie inside the {area_len}-byte encryption header"
                )));
            }
            slots.push(Slot {
                iterations,
                salt,
                material_offset,
            });
        }
        if slots.is_empty() {
            return Err(invalid("no active key slot"));
        }
        Ok(Header {
            hash,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations,
            slots,
        })
    }

    /// The bytes of one slot's key material.
    pub fn material_len(&self) -> usize {
        self.key_bytes * STRIPES as usize
    }

    /// Tries `key` on one slot, given its key material (`material_len` bytes read from
    /// `material_offset`): the master key's cipher when the key opens it.
    pub fn unlock_slot(&self, slot: &Slot, material: &[u8], key: &[u8]) -> Option<Cipher> {
        if material.len() != self.material_len() {
            return None;
        }
        let mut slot_key = vec![0u8; self.key_bytes];
        self.hash
            .pbkdf2(key, &slot.salt, slot.iterations, &mut slot_key);
        let mut split = material.to_vec();
        Cipher::new(&slot_key)?.decrypt(&mut split, 0);
        let master = af_merge(&split, self.key_bytes, self.hash);
        let mut digest = [0u8; DIGEST_LEN];
        self.hash
            .pbkdf2(&master, &self.mk_salt, self.mk_iterations, &mut digest);
        // Not a secret comparison worth timing: a wrong key costs a full PBKDF2 anyway.
        (digest == self.mk_digest)
            .then(|| Cipher::new(&master))
            .flatten()
    }
}

/// The anti-forensic merge: the stripes XORed together, each partial result diffused
/// by the header's hash.
fn af_merge(split: &[u8], key_bytes: usize, hash: Hash) -> Vec<u8> {
    let mut d = vec![0u8; key_bytes];
    let stripes: Vec<&[u8]> = split.chunks_exact(key_bytes).collect();
    let Some((last, rest)) = stripes.split_last() else {
        return d;
    };
    for stripe in rest {
        xor(&mut d, stripe);
        d = diffuse(&d, hash);
    }
    xor(&mut d, last);
    d
}

fn xor(into: &mut [u8], from: &[u8]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a ^= b;
    }
}

/// Each digest-sized block replaced by the hash of its index (big-endian u32) and
/// itself; a short last block by the start of its hash.
fn diffuse(d: &[u8], hash: Hash) -> Vec<u8> {
    let mut out = Vec::with_capacity(d.len());
    for (i, block) in d.chunks(hash.size()).enumerate() {
        let h = hash.digest(&[&(i as u32).to_be_bytes(), block]);
        out.extend_from_slice(&h[..block.len()]);
    }
    out
}

/// AES-XTS with plain64 tweaks over 512-byte sectors.
pub enum Cipher {
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

impl Cipher {
    /// A cipher for an XTS key (two AES keys back to back), None for another length.
    pub fn new(key: &[u8]) -> Option<Cipher> {
        let half = key.len() / 2;
        let (k1, k2) = key.split_at(half);
        match key.len() {
            32 => Some(Cipher::Aes128(Box::new(Xts128::new(
                Aes128::new_from_slice(k1).ok()?,
                Aes128::new_from_slice(k2).ok()?,
            )))),
            64 => Some(Cipher::Aes256(Box::new(Xts128::new(
                Aes256::new_from_slice(k1).ok()?,
                Aes256::new_from_slice(k2).ok()?,
            )))),
            _ => None,
        }
    }

    /// Encrypts whole sectors in place; `sector` is the first one's number. A tail
    /// shorter than a sector is left as it is (callers hand whole sectors).
    pub fn encrypt(&self, buf: &mut [u8], sector: u64) {
        let n = buf.len() / SECTOR as usize * SECTOR as usize;
        let area = &mut buf[..n];
        match self {
            Cipher::Aes128(x) => {
                x.encrypt_area(area, SECTOR as usize, sector.into(), get_tweak_default)
            }
            Cipher::Aes256(x) => {
                x.encrypt_area(area, SECTOR as usize, sector.into(), get_tweak_default)
            }
        }
    }

    /// Decrypts whole sectors in place; `sector` is the first one's number.
    pub fn decrypt(&self, buf: &mut [u8], sector: u64) {
        let n = buf.len() / SECTOR as usize * SECTOR as usize;
        let area = &mut buf[..n];
        match self {
            Cipher::Aes128(x) => {
                x.decrypt_area(area, SECTOR as usize, sector.into(), get_tweak_default)
            }
            Cipher::Aes256(x) => {
                x.decrypt_area(area, SECTOR as usize, sector.into(), get_tweak_default)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IEEE 1619 XTS-AES-128 vector 2: key1 = 0x11.., key2 = 0x22.., data unit 0x3333333333,
    /// 32 bytes of 0x44. (Checked through a 512-byte sector whose first 32 bytes are the
    /// vector's: XTS tweaks each 16-byte block by position, so the first two blocks are
    /// the vector's ciphertext.)
    #[test]
    fn xts_matches_the_ieee_1619_vector() {
        let mut key = [0x11u8; 32];
        key[16..].fill(0x22);
        let c = Cipher::new(&key).unwrap();
        let mut sector = [0x44u8; 512];
        c.encrypt(&mut sector, 0x33_3333_3333);
        let want = [
            0xc4, 0x54, 0x18, 0x5e, 0x6a, 0x16, 0x93, 0x6e, 0x39, 0x33, 0x40, 0x38, 0xac, 0xef,
            0x83, 0x8b, 0xfb, 0x18, 0x6f, 0xff, 0x74, 0x80, 0xad, 0xc4, 0x28, 0x93, 0x82, 0xec,
            0xd6, 0xd3, 0x94, 0xf0,
        ];
        assert_eq!(sector[..32], want);
        c.decrypt(&mut sector, 0x33_3333_3333);
        assert!(sector.iter().all(|&b| b == 0x44));
    }

    #[test]
    fn af_merge_of_one_stripe_is_the_stripe() {
        let s = [7u8; 32];
        assert_eq!(af_merge(&s, 32, Hash::Sha256), s.to_vec());
    }

    fn header_bytes() -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[7] = 1;
        b[8..11].copy_from_slice(b"aes");
        b[40..51].copy_from_slice(b"xts-plain64");
        b[72..78].copy_from_slice(b"sha256");
        b[104..108].copy_from_slice(&4096u32.to_be_bytes());
        b[108..112].copy_from_slice(&64u32.to_be_bytes());
        b[164..168].copy_from_slice(&1000u32.to_be_bytes());
        for i in 0..SLOTS {
            let s = 208 + i * 48;
            b[s..s + 4].copy_from_slice(&SLOT_INACTIVE.to_be_bytes());
            b[s + 44..s + 48].copy_from_slice(&STRIPES.to_be_bytes());
        }
        let s = 208;
        b[s..s + 4].copy_from_slice(&SLOT_ACTIVE.to_be_bytes());
        b[s + 4..s + 8].copy_from_slice(&1000u32.to_be_bytes());
        b[s + 40..s + 44].copy_from_slice(&8u32.to_be_bytes());
        b
    }

    #[test]
    fn a_hostile_header_is_refused_by_field() {
        let area = 8 * 512 + 64 * 4000;
        assert!(Header::parse(&header_bytes(), area).is_ok());
        let refused = |f: &dyn Fn(&mut Vec<u8>), area: u64| {
            let mut b = header_bytes();
            f(&mut b);
            Header::parse(&b, area).unwrap_err().to_string()
        };
        assert!(refused(&|b| b[0] = b'X', area).contains("magic"));
        assert!(
            refused(&|b| b[40..51].copy_from_slice(b"cbc-plain64"), area).contains("cbc-plain64")
        );
        assert!(refused(&|b| b[72..78].copy_from_slice(b"md5\0\0\0"), area).contains("md5"));
        assert!(
            refused(&|b| b[108..112].copy_from_slice(&48u32.to_be_bytes()), area)
                .contains("key_bytes")
        );
        // A slot asking for 2^32-1 iterations would spin the backend for hours.
        assert!(refused(
            &|b| b[212..216].copy_from_slice(&u32::MAX.to_be_bytes()),
            area
        )
        .contains("iterations"));
        assert!(
            refused(&|b| b[164..168].copy_from_slice(&0u32.to_be_bytes()), area)
                .contains("iterations")
        );
        // Key material past the encryption header's clusters.
        assert!(refused(&|_| {}, area - 1).contains("does not lie inside"));
        assert!(refused(
            &|b| b[248..252].copy_from_slice(&u32::MAX.to_be_bytes()),
            area
        )
        .contains("does not lie inside"));
        assert!(
            refused(&|b| b[252..256].copy_from_slice(&1u32.to_be_bytes()), area)
                .contains("stripes")
        );
        assert!(refused(
            &|b| b[208..212].copy_from_slice(&SLOT_INACTIVE.to_be_bytes()),
            area
        )
        .contains("no active key slot"));
        assert!(
            refused(&|b| b[208..212].copy_from_slice(&7u32.to_be_bytes()), area)
                .contains("neither active")
        );
        assert!(Header::parse(&header_bytes()[..100], area).is_err());
    }
}
