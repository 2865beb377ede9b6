//! The framing of a state file: a header (the magic, the format version, the producer
//! and a CRC-32 of them), then sections, each with a tag, a version, flags, a length, the
//! payload and a CRC-32 over all of it, ending with an `END` section. Integers are
//! little-endian. Everything read
//! here is untrusted (a file an operator hands over, or a stream): every length is
//! bounded before anything is allocated, every read is checked against what is left, and
//! each failure names the section and the field.

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"CELLVMSS";
/// The framing's own version (sections have theirs).
pub const FORMAT_VERSION: u32 = 1;
/// The most a state file may hold: vCPU state is a few KiB each; RAM is elsewhere.
pub const MAX_FILE: usize = 64 << 20;
/// The most one section may hold.
pub const MAX_SECTION: usize = 16 << 20;
/// The most sections a file may hold.
pub const MAX_SECTIONS: usize = 4096;
/// The longest producer string (the cellvm version that wrote the file).
const MAX_PRODUCER: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("not a cellvm state file (no CELLVMSS magic)")]
    Magic,
    #[error("state file format version {0}: this cellvm reads version {FORMAT_VERSION} only (written by {1:?})")]
    Version(u32, String),
    #[error("state file: {0} bytes: more than the {MAX_FILE}-byte limit")]
    TooLarge(usize),
    #[error("state file: truncated in {0}")]
    Truncated(String),
    #[error("state file: section {tag}: {len} bytes: more than the {MAX_SECTION}-byte limit")]
    SectionTooLarge { tag: String, len: usize },
    #[error("state file: section {0}: checksum mismatch (the file is damaged)")]
    Checksum(String),
    #[error("state file: more than {MAX_SECTIONS} sections")]
    TooManySections,
    #[error("state file: {0} bytes after the END section")]
    Trailing(usize),
    #[error("state file: section {tag}: {what}")]
    Bad { tag: String, what: String },
}

/// A section's tag as text, for messages (printable ASCII, NULs dropped).
pub fn tag_name(tag: [u8; 4]) -> String {
    tag.iter()
        .filter(|b| **b != 0)
        .map(|b| {
            if b.is_ascii_graphic() {
                (*b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

/// Builds a state file.
pub struct FileWriter {
    out: Vec<u8>,
}

impl FileWriter {
    pub fn new(producer: &str) -> FileWriter {
        let mut out = Vec::with_capacity(64 << 10);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let p = &producer.as_bytes()[..producer.len().min(MAX_PRODUCER)];
        out.extend_from_slice(&(p.len() as u16).to_le_bytes());
        out.extend_from_slice(p);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        FileWriter { out }
    }

    /// Appends one section: tag, version, flags (0), length, payload, CRC-32 of them all.
    pub fn section(&mut self, tag: [u8; 4], version: u16, payload: &[u8]) {
        let start = self.out.len();
        self.out.extend_from_slice(&tag);
        self.out.extend_from_slice(&version.to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes());
        self.out
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.out.extend_from_slice(payload);
        let crc = crc32fast::hash(&self.out[start..]);
        self.out.extend_from_slice(&crc.to_le_bytes());
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.section(*b"END\0", 1, &[]);
        self.out
    }
}

/// One section as read: checked against its checksum, not yet parsed.
#[derive(Debug)]
pub struct Section<'a> {
    pub tag: [u8; 4],
    pub version: u16,
    pub payload: &'a [u8],
}

impl Section<'_> {
    pub fn name(&self) -> String {
        tag_name(self.tag)
    }

    /// A reader over the payload whose errors name this section.
    pub fn reader(&self) -> Reader<'_> {
        Reader {
            data: self.payload,
            tag: self.name(),
        }
    }
}

/// Splits a state file into its sections (END excluded), checking the framing.
pub fn read_file(data: &[u8]) -> Result<(String, Vec<Section<'_>>), Error> {
    if data.len() > MAX_FILE {
        return Err(Error::TooLarge(data.len()));
    }
    let mut r = Reader {
        data,
        tag: "the header".into(),
    };
    if r.bytes(MAGIC.len()).map_err(|_| Error::Magic)? != MAGIC {
        return Err(Error::Magic);
    }
    let version = r.u32("format version")?;
    let plen = r.u16("producer length")? as usize;
    if plen > MAX_PRODUCER {
        return Err(Error::Bad {
            tag: "header".into(),
            what: format!("producer: {plen} bytes, more than {MAX_PRODUCER}"),
        });
    }
    let producer = String::from_utf8_lossy(r.bytes(plen)?).into_owned();
    let header_len = data.len() - r.data.len();
    let crc = r.u32("header checksum")?;
    // Another version's header may differ past the version field: named first.
    if version != FORMAT_VERSION {
        return Err(Error::Version(version, producer));
    }
    if crc32fast::hash(&data[..header_len]) != crc {
        return Err(Error::Checksum("header".into()));
    }
    if version != FORMAT_VERSION {
        return Err(Error::Version(version, producer));
    }
    let mut sections = Vec::new();
    loop {
        if sections.len() > MAX_SECTIONS {
            return Err(Error::TooManySections);
        }
        let start = data.len() - r.data.len();
        r.tag = format!("section header #{}", sections.len() + 1);
        let tag: [u8; 4] = r.bytes(4)?.try_into().expect("4 bytes");
        let name = tag_name(tag);
        r.tag = name.clone();
        let version = r.u16("version")?;
        let flags = r.u16("flags")?;
        let len = r.u32("length")? as usize;
        if len > MAX_SECTION {
            return Err(Error::SectionTooLarge { tag: name, len });
        }
        let payload = r.bytes(len)?;
        let end = data.len() - r.data.len();
        let crc = r.u32("checksum")?;
        if crc32fast::hash(&data[start..end]) != crc {
            return Err(Error::Checksum(name));
        }
        if flags != 0 {
            return Err(Error::Bad {
                tag: name,
                what: format!("flags {flags:#x}: none are defined"),
            });
        }
        if &tag == b"END\0" {
            if !r.data.is_empty() {
                return Err(Error::Trailing(r.data.len()));
            }
            return Ok((producer, sections));
        }
        sections.push(Section {
            tag,
            version,
            payload,
        });
    }
}

/// Appends little-endian fields to a section's payload.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A length-prefixed (u32) run of bytes.
    pub fn blob(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
}

/// Reads a payload's fields, every read bounded by what is left.
pub struct Reader<'a> {
    data: &'a [u8],
    tag: String,
}

impl<'a> Reader<'a> {
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.data.len() {
            return Err(Error::Truncated(self.tag.clone()));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Error> {
        self.bytes(N)
            .map(|b| b.try_into().expect("N bytes"))
            .map_err(|_| Error::Truncated(format!("{}: {what}", self.tag)))
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, Error> {
        Ok(self.array::<1>(what)?[0])
    }
    pub fn u16(&mut self, what: &str) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub fn u32(&mut self, what: &str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub fn u64(&mut self, what: &str) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed run of bytes of exactly `want` bytes (a kernel structure).
    pub fn blob_exact(&mut self, what: &str, want: usize) -> Result<&'a [u8], Error> {
        let len = self.u32(what)? as usize;
        if len != want {
            return Err(self.bad(format!("{what}: {len} bytes, expected {want}")));
        }
        self.bytes(len)
            .map_err(|_| Error::Truncated(format!("{}: {what}", self.tag)))
    }

    /// A count of items each at least `item` bytes, bounded by what is left.
    pub fn count(&mut self, what: &str, item: usize, max: usize) -> Result<usize, Error> {
        let n = self.u32(what)? as usize;
        if n > max || n.saturating_mul(item) > self.data.len() {
            return Err(self.bad(format!(
                "{what}: {n}: more than {} (at most {max})",
                self.data.len() / item.max(1)
            )));
        }
        Ok(n)
    }

    pub fn bad(&self, what: String) -> Error {
        Error::Bad {
            tag: self.tag.clone(),
            what,
        }
    }

    /// The payload must be used up.
    pub fn end(&self) -> Result<(), Error> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} bytes left over", self.data.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut f = FileWriter::new("cellvm test");
        f.section(*b"AAA\0", 1, &[1, 2, 3]);
        f.section(*b"BBB\0", 2, &[]);
        f.finish()
    }

    #[test]
    fn a_file_reads_back_section_by_section() {
        let data = sample();
        let (producer, s) = read_file(&data).unwrap();
        assert_eq!(producer, "cellvm test");
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].name().as_str(), s[0].version, s[0].payload),
            ("AAA", 1, &[1u8, 2, 3][..])
        );
        assert_eq!((s[1].name().as_str(), s[1].version), ("BBB", 2));
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let data = sample();
        for n in 0..data.len() {
            assert!(read_file(&data[..n]).is_err(), "truncated at {n} accepted");
        }
        for i in 0..data.len() {
            let mut d = data.clone();
            d[i] ^= 0x40;
            assert!(read_file(&d).is_err(), "byte {i} flipped accepted");
        }
        let mut d = data.clone();
        d.push(0);
        assert_eq!(read_file(&d).unwrap_err(), Error::Trailing(1));
    }

    #[test]
    fn another_format_version_is_refused_by_name() {
        let mut d = sample();
        d[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = read_file(&d).unwrap_err();
        assert_eq!(e, Error::Version(7, "cellvm test".into()));
        assert!(e.to_string().contains("version 7"), "{e}");
    }

    #[test]
    fn an_oversized_section_length_is_refused_before_reading() {
        let mut f = FileWriter::new("x");
        f.section(*b"AAA\0", 1, &[0; 8]);
        let mut d = f.finish();
        let at = 8 + 4 + 2 + 1 + 4 + 8; // magic, version, producer, crc, tag+version+flags
        d[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_file(&d), Err(Error::SectionTooLarge { .. })));
    }
}
