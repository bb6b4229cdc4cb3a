//! EROFS on-disk structures as checked plain data.
//!
//! Every structure here is encoded and decoded field by field in little
//! endian, with its size fixed by a constant and asserted at compile time.
//! Decoding is purely syntactic (lengths, magic numbers); semantic checks
//! (does a nid point inside the image, do names sort) live in the reader.

use crate::ErofsError;

/// Block size of every image kite writes (fscache mode needs page size).
pub const BLOCK_SIZE: usize = 4096;
/// log2 of [`BLOCK_SIZE`].
pub const BLOCK_BITS: u8 = 12;
/// Byte offset of the superblock inside block 0.
pub const SUPER_OFFSET: usize = 1024;
/// Superblock magic.
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;

pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// Incompat bits this crate understands; the reader refuses anything else.
pub const FEATURE_INCOMPAT_SUPPORTED: u32 =
    FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE;

pub const LAYOUT_FLAT_PLAIN: u8 = 0;
pub const LAYOUT_FLAT_INLINE: u8 = 2;
pub const LAYOUT_CHUNK_BASED: u8 = 4;

/// Chunk format flag: 8-byte chunk indexes (needed for multi-device files).
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;
/// Chunk index block address that marks a hole.
pub const NULL_ADDR: u32 = 0xFFFF_FFFF;

pub const SUPERBLOCK_SIZE: usize = 128;
pub const INODE_COMPACT_SIZE: usize = 32;
pub const INODE_EXTENDED_SIZE: usize = 64;
pub const DIRENT_SIZE: usize = 12;
pub const DEVICE_SLOT_SIZE: usize = 128;
pub const CHUNK_INDEX_SIZE: usize = 8;
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
pub const XATTR_ENTRY_HEADER_SIZE: usize = 4;
/// Longest name a directory entry may carry.
pub const NAME_LEN_MAX: usize = 255;

pub const FT_UNKNOWN: u8 = 0;
pub const FT_REG_FILE: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

pub const S_IFMT: u16 = 0o170000;
pub const S_IFSOCK: u16 = 0o140000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFIFO: u16 = 0o010000;

/// The EROFS file type byte for a mode's type bits.
pub fn file_type_of(mode: u16) -> u8 {
    match mode & S_IFMT {
        S_IFREG => FT_REG_FILE,
        S_IFDIR => FT_DIR,
        S_IFCHR => FT_CHRDEV,
        S_IFBLK => FT_BLKDEV,
        S_IFIFO => FT_FIFO,
        S_IFSOCK => FT_SOCK,
        S_IFLNK => FT_SYMLINK,
        _ => FT_UNKNOWN,
    }
}

/// Whether a device number fits EROFS's 32-bit `i_u` (`new_encode_dev`:
/// a 12-bit major, a 20-bit minor). A number that does not fit would be
/// stored truncated, naming another device.
pub fn dev_fits(major: u32, minor: u32) -> bool {
    major < (1 << 12) && minor < (1 << 20)
}

/// Linux `new_encode_dev`: the 32-bit device number stored in `i_u`.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Inverse of [`encode_dev`].
pub fn decode_dev(dev: u32) -> (u32, u32) {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    (major, minor)
}

/// Round `v` up to a multiple of `align` (a power of two).
pub const fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn need(what: &'static str, buf: &[u8], len: usize) -> Result<(), ErofsError> {
    if buf.len() < len {
        return Err(ErofsError::Truncated {
            what,
            need: len,
            have: buf.len(),
        });
    }
    Ok(())
}

/// The 128-byte superblock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuperBlock {
    pub checksum: u32,
    pub feature_compat: u32,
    pub blkszbits: u8,
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub build_time_nsec: u32,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: u32,
    pub extra_devices: u16,
    pub devt_slotoff: u16,
}

const _: () = assert!(SUPERBLOCK_SIZE == 128);

impl SuperBlock {
    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        put32(&mut b, 0, SUPER_MAGIC);
        put32(&mut b, 4, self.checksum);
        put32(&mut b, 8, self.feature_compat);
        b[12] = self.blkszbits;
        // 13: sb_extslots = 0
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inos);
        put64(&mut b, 24, self.build_time);
        put32(&mut b, 32, self.build_time_nsec);
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        put32(&mut b, 44, self.xattr_blkaddr);
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        put32(&mut b, 80, self.feature_incompat);
        // 84: u1 (compression algorithms) = 0
        put16(&mut b, 86, self.extra_devices);
        put16(&mut b, 88, self.devt_slotoff);
        // 90..128: dirblkbits, xattr prefixes, packed nid, reserved: all 0
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, ErofsError> {
        need("superblock", b, SUPERBLOCK_SIZE)?;
        let magic = le32(b, 0);
        if magic != SUPER_MAGIC {
            return Err(ErofsError::BadMagic(magic));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[48..64]);
        let mut volume_name = [0u8; 16];
        volume_name.copy_from_slice(&b[64..80]);
        Ok(Self {
            checksum: le32(b, 4),
            feature_compat: le32(b, 8),
            blkszbits: b[12],
            root_nid: le16(b, 14),
            inos: le64(b, 16),
            build_time: le64(b, 24),
            build_time_nsec: le32(b, 32),
            blocks: le32(b, 36),
            meta_blkaddr: le32(b, 40),
            xattr_blkaddr: le32(b, 44),
            uuid,
            volume_name,
            feature_incompat: le32(b, 80),
            extra_devices: le16(b, 86),
            devt_slotoff: le16(b, 88),
        })
    }
}

/// The superblock checksum as the kernel computes it: crc32c seeded with
/// `~0` and without the final inversion, over `BLOCK_SIZE - 1024` bytes from
/// the superblock with the checksum field zeroed. The standard CRC32C applies
/// a final inversion, so the kernel's value is its complement.
pub fn superblock_checksum(block0_from_sb: &[u8]) -> u32 {
    let mut tmp = block0_from_sb[..BLOCK_SIZE - SUPER_OFFSET].to_vec();
    tmp[4..8].fill(0);
    !crc32c::crc32c(&tmp)
}

/// One on-disk inode, compact or extended, decoded to common fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawInode {
    pub extended: bool,
    pub layout: u8,
    pub xattr_icount: u16,
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    /// `i_u`: raw block address, rdev or chunk format.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    /// Only meaningful for extended inodes; compact ones take the superblock's.
    pub mtime: u64,
    pub mtime_nsec: u32,
}

const _: () = assert!(INODE_COMPACT_SIZE == 32 && INODE_EXTENDED_SIZE == 64);

impl RawInode {
    pub fn disk_size(&self) -> usize {
        if self.extended {
            INODE_EXTENDED_SIZE
        } else {
            INODE_COMPACT_SIZE
        }
    }

    /// Encode; the caller has checked that a compact inode's fields fit.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let format = (self.extended as u16) | ((self.layout as u16) << 1);
        if self.extended {
            let mut b = [0u8; INODE_EXTENDED_SIZE];
            put16(&mut b, 0, format);
            put16(&mut b, 2, self.xattr_icount);
            put16(&mut b, 4, self.mode);
            put64(&mut b, 8, self.size);
            put32(&mut b, 16, self.i_u);
            put32(&mut b, 20, self.ino);
            put32(&mut b, 24, self.uid);
            put32(&mut b, 28, self.gid);
            put64(&mut b, 32, self.mtime);
            put32(&mut b, 40, self.mtime_nsec);
            put32(&mut b, 44, self.nlink);
            out.extend_from_slice(&b);
        } else {
            let mut b = [0u8; INODE_COMPACT_SIZE];
            put16(&mut b, 0, format);
            put16(&mut b, 2, self.xattr_icount);
            put16(&mut b, 4, self.mode);
            put16(&mut b, 6, self.nlink as u16);
            put32(&mut b, 8, self.size as u32);
            put32(&mut b, 16, self.i_u);
            put32(&mut b, 20, self.ino);
            put16(&mut b, 24, self.uid as u16);
            put16(&mut b, 26, self.gid as u16);
            out.extend_from_slice(&b);
        }
    }

    pub fn decode(b: &[u8]) -> Result<Self, ErofsError> {
        need("inode", b, 2)?;
        let format = le16(b, 0);
        if format & !0x0f != 0 {
            return Err(ErofsError::Corrupt(format!(
                "inode format {format:#x} has unknown bits"
            )));
        }
        let extended = format & 1 == 1;
        let layout = ((format >> 1) & 0x7) as u8;
        if extended {
            need("extended inode", b, INODE_EXTENDED_SIZE)?;
            Ok(Self {
                extended,
                layout,
                xattr_icount: le16(b, 2),
                mode: le16(b, 4),
                size: le64(b, 8),
                i_u: le32(b, 16),
                ino: le32(b, 20),
                uid: le32(b, 24),
                gid: le32(b, 28),
                mtime: le64(b, 32),
                mtime_nsec: le32(b, 40),
                nlink: le32(b, 44),
            })
        } else {
            need("compact inode", b, INODE_COMPACT_SIZE)?;
            Ok(Self {
                extended,
                layout,
                xattr_icount: le16(b, 2),
                mode: le16(b, 4),
                nlink: le16(b, 6) as u32,
                size: le32(b, 8) as u64,
                i_u: le32(b, 16),
                ino: le32(b, 20),
                uid: le16(b, 24) as u32,
                gid: le16(b, 26) as u32,
                mtime: 0,
                mtime_nsec: 0,
            })
        }
    }
}

/// Size of the inline xattr area for `i_xattr_icount`.
pub fn xattr_ibody_size(icount: u16) -> usize {
    if icount == 0 {
        0
    } else {
        XATTR_IBODY_HEADER_SIZE + 4 * (icount as usize - 1)
    }
}

/// A directory entry header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    pub nid: u64,
    pub nameoff: u16,
    pub file_type: u8,
}

const _: () = assert!(DIRENT_SIZE == 12);

impl Dirent {
    pub fn encode(&self, out: &mut [u8]) {
        put64(out, 0, self.nid);
        put16(out, 8, self.nameoff);
        out[10] = self.file_type;
        out[11] = 0;
    }
    pub fn decode(b: &[u8]) -> Result<Self, ErofsError> {
        need("dirent", b, DIRENT_SIZE)?;
        Ok(Self {
            nid: le64(b, 0),
            nameoff: le16(b, 8),
            file_type: b[10],
        })
    }
}

/// An 8-byte chunk index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkIndex {
    /// 0 = the bootstrap itself, k = device slot k-1.
    pub device_id: u16,
    /// Block address within the device, or [`NULL_ADDR`] for a hole.
    pub blkaddr: u32,
}

const _: () = assert!(CHUNK_INDEX_SIZE == 8);

impl ChunkIndex {
    pub const HOLE: ChunkIndex = ChunkIndex {
        device_id: 0,
        blkaddr: NULL_ADDR,
    };
    pub fn is_hole(&self) -> bool {
        self.blkaddr == NULL_ADDR
    }
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.device_id.to_le_bytes());
        out.extend_from_slice(&self.blkaddr.to_le_bytes());
    }
    pub fn decode(b: &[u8]) -> Result<Self, ErofsError> {
        need("chunk index", b, CHUNK_INDEX_SIZE)?;
        Ok(Self {
            device_id: le16(b, 2),
            blkaddr: le32(b, 4),
        })
    }
}

/// A 128-byte device table slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// The blob's sha256 as 64 lowercase hex characters (fills the tag).
    pub tag: [u8; 64],
    pub blocks: u32,
    pub mapped_blkaddr: u32,
}

const _: () = assert!(DEVICE_SLOT_SIZE == 128);

impl DeviceSlot {
    pub fn encode(&self) -> [u8; DEVICE_SLOT_SIZE] {
        let mut b = [0u8; DEVICE_SLOT_SIZE];
        b[..64].copy_from_slice(&self.tag);
        put32(&mut b, 64, self.blocks);
        put32(&mut b, 68, self.mapped_blkaddr);
        b
    }
    pub fn decode(b: &[u8]) -> Result<Self, ErofsError> {
        need("device slot", b, DEVICE_SLOT_SIZE)?;
        let mut tag = [0u8; 64];
        tag.copy_from_slice(&b[..64]);
        Ok(Self {
            tag,
            blocks: le32(b, 64),
            mapped_blkaddr: le32(b, 68),
        })
    }
    /// The tag as text, up to its first NUL.
    pub fn tag_str(&self) -> String {
        let end = self.tag.iter().position(|&c| c == 0).unwrap_or(64);
        String::from_utf8_lossy(&self.tag[..end]).into_owned()
    }
}

/// Known xattr name prefixes and their on-disk index. Order matters for
/// lookup: longer, more specific names first.
pub const XATTR_PREFIXES: &[(u8, &str)] = &[
    (2, "system.posix_acl_access"),
    (3, "system.posix_acl_default"),
    (1, "user."),
    (4, "trusted."),
    (6, "security."),
];

/// Split a full xattr name into (index, suffix). `None` if EROFS cannot
/// store it without long-prefix support.
pub fn split_xattr_name(name: &[u8]) -> Option<(u8, &[u8])> {
    for &(idx, prefix) in XATTR_PREFIXES {
        let p = prefix.as_bytes();
        if idx == 2 || idx == 3 {
            if name == p {
                return Some((idx, &name[p.len()..]));
            }
        } else if name.len() > p.len() && name.starts_with(p) {
            return Some((idx, &name[p.len()..]));
        }
    }
    None
}

/// Rebuild a full xattr name from its index and suffix.
pub fn join_xattr_name(index: u8, suffix: &[u8]) -> Option<Vec<u8>> {
    let prefix = XATTR_PREFIXES.iter().find(|(i, _)| *i == index)?.1;
    let mut v = prefix.as_bytes().to_vec();
    v.extend_from_slice(suffix);
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_encoding_roundtrips_large_minor() {
        for (ma, mi) in [(0, 0), (1, 3), (8, 1), (259, 0x12345), (4095, 0xfffff)] {
            assert_eq!(decode_dev(encode_dev(ma, mi)), (ma, mi));
        }
        // new_encode_dev(8, 1) as the kernel computes it.
        assert_eq!(encode_dev(8, 1), 0x801);
    }

    #[test]
    fn inode_roundtrip_compact_and_extended() {
        for extended in [false, true] {
            let ino = RawInode {
                extended,
                layout: LAYOUT_CHUNK_BASED,
                xattr_icount: 5,
                mode: S_IFREG | 0o4755,
                nlink: 3,
                size: if extended { 5 << 30 } else { 12345 },
                i_u: 0x28,
                ino: 77,
                uid: if extended { 100_000 } else { 1000 },
                gid: if extended { 200_000 } else { 100 },
                mtime: if extended { 1_700_000_000 } else { 0 },
                mtime_nsec: if extended { 123 } else { 0 },
            };
            let mut buf = Vec::new();
            ino.encode(&mut buf);
            assert_eq!(buf.len(), ino.disk_size());
            assert_eq!(RawInode::decode(&buf).unwrap(), ino);
        }
    }

    #[test]
    fn xattr_names_split_and_join() {
        assert_eq!(split_xattr_name(b"user.foo"), Some((1, &b"foo"[..])));
        assert_eq!(
            split_xattr_name(b"system.posix_acl_access"),
            Some((2, &b""[..]))
        );
        assert_eq!(split_xattr_name(b"security.capability").unwrap().0, 6);
        assert_eq!(split_xattr_name(b"system.other"), None);
        assert_eq!(split_xattr_name(b"user."), None);
        assert_eq!(join_xattr_name(4, b"x").unwrap(), b"trusted.x");
    }

    #[test]
    fn decode_rejects_short_input() {
        assert!(matches!(
            SuperBlock::decode(&[0u8; 10]),
            Err(ErofsError::Truncated { .. })
        ));
        assert!(RawInode::decode(&[1u8, 0, 0]).is_err());
    }
}
