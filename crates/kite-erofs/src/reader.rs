//! The EROFS image reader.
//!
//! Reads the subset of EROFS that kite writes (uncompressed, plain/inline/
//! chunk-based layouts, inline xattrs, device table) from a byte slice, which
//! may be an mmap. Every offset taken from the image is bounds-checked, so a
//! corrupt or hostile image yields an [`ErofsError`], never a panic.

use crate::ondisk::*;
use crate::ErofsError;

/// A parsed view of an EROFS image.
pub struct Image<'a> {
    data: &'a [u8],
    sb: SuperBlock,
}

/// A decoded inode with its location.
#[derive(Debug, Clone)]
pub struct Inode {
    pub nid: u64,
    pub raw: RawInode,
    /// Effective mtime (the superblock's for compact inodes).
    pub mtime: u64,
    pub mtime_nsec: u32,
    /// Byte offset just past inode + inline xattrs.
    body_off: u64,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.raw.mode & S_IFMT == S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.raw.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.raw.mode & S_IFMT == S_IFLNK
    }
    /// log2 of the chunk size of a chunk-based inode.
    pub fn chunk_bits(&self) -> Option<u8> {
        (self.raw.layout == LAYOUT_CHUNK_BASED)
            .then(|| BLOCK_BITS + (self.raw.i_u as u16 & CHUNK_FORMAT_BLKBITS_MASK) as u8)
    }
    /// (major, minor) for device nodes.
    pub fn rdev(&self) -> (u32, u32) {
        decode_dev(self.raw.i_u)
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub nid: u64,
    pub file_type: u8,
}

impl<'a> Image<'a> {
    /// Parse and validate the superblock (magic, checksum, block size,
    /// feature bits).
    pub fn open(data: &'a [u8]) -> Result<Self, ErofsError> {
        if data.len() < BLOCK_SIZE {
            return Err(ErofsError::Truncated {
                what: "image",
                need: BLOCK_SIZE,
                have: data.len(),
            });
        }
        let sb = SuperBlock::decode(&data[SUPER_OFFSET..])?;
        if sb.blkszbits != BLOCK_BITS {
            return Err(ErofsError::Unsupported {
                node: 0,
                what: format!("block size 2^{}", sb.blkszbits),
            });
        }
        if sb.feature_compat & FEATURE_COMPAT_SB_CHKSUM != 0 {
            let want = superblock_checksum(&data[SUPER_OFFSET..BLOCK_SIZE]);
            if want != sb.checksum {
                return Err(ErofsError::BadChecksum {
                    stored: sb.checksum,
                    computed: want,
                });
            }
        }
        let unknown = sb.feature_incompat & !FEATURE_INCOMPAT_SUPPORTED;
        if unknown != 0 {
            return Err(ErofsError::Unsupported {
                node: 0,
                what: format!("incompat features {unknown:#x}"),
            });
        }
        let img = Self { data, sb };
        if (img.sb.blocks as u64) * BLOCK_SIZE as u64 > data.len() as u64 {
            return Err(ErofsError::Truncated {
                what: "image blocks",
                need: img.sb.blocks as usize * BLOCK_SIZE,
                have: data.len(),
            });
        }
        Ok(img)
    }

    /// The image's bytes (the whole file, index section included).
    pub(crate) fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Byte offset just past an inode and its inline xattrs: where its
    /// inline data (a directory's entries, a symlink's target) starts.
    pub fn inline_data_offset(&self, inode: &Inode) -> u64 {
        inode.body_off
    }

    /// The raw inline xattr area of `inode` (header included).
    pub(crate) fn xattr_body(&self, inode: &Inode) -> Result<&'a [u8], ErofsError> {
        let size = xattr_ibody_size(inode.raw.xattr_icount);
        self.slice(inode.body_off - size as u64, size, "xattrs")
    }

    /// The raw bytes of `count` chunk indexes of `inode`.
    pub(crate) fn chunk_index_bytes(
        &self,
        inode: &Inode,
        count: usize,
    ) -> Result<&'a [u8], ErofsError> {
        self.slice(
            align_up(inode.body_off, 8),
            count * CHUNK_INDEX_SIZE,
            "chunk indexes",
        )
    }

    pub fn superblock(&self) -> &SuperBlock {
        &self.sb
    }

    /// Size in bytes of the EROFS part (the superblock's block count).
    pub fn image_len(&self) -> u64 {
        self.sb.blocks as u64 * BLOCK_SIZE as u64
    }

    fn slice(&self, off: u64, len: usize, what: &'static str) -> Result<&'a [u8], ErofsError> {
        let end = off.checked_add(len as u64).ok_or(ErofsError::Truncated {
            what,
            need: usize::MAX,
            have: self.data.len(),
        })?;
        if end > self.data.len() as u64 {
            return Err(ErofsError::Truncated {
                what,
                need: end as usize,
                have: self.data.len(),
            });
        }
        Ok(&self.data[off as usize..end as usize])
    }

    /// The device table, slot 0 first (device_id 1).
    pub fn devices(&self) -> Result<Vec<DeviceSlot>, ErofsError> {
        let base = self.sb.devt_slotoff as u64 * DEVICE_SLOT_SIZE as u64;
        (0..self.sb.extra_devices as u64)
            .map(|i| {
                DeviceSlot::decode(self.slice(
                    base + i * DEVICE_SLOT_SIZE as u64,
                    DEVICE_SLOT_SIZE,
                    "device table",
                )?)
            })
            .collect()
    }

    pub fn root_nid(&self) -> u64 {
        self.sb.root_nid as u64
    }

    pub fn inode(&self, nid: u64) -> Result<Inode, ErofsError> {
        let pos = nid
            .checked_mul(32)
            .and_then(|o| o.checked_add(self.sb.meta_blkaddr as u64 * BLOCK_SIZE as u64))
            .ok_or_else(|| ErofsError::Corrupt(format!("nid {nid} out of range")))?;
        let first = self.slice(pos, 2, "inode")?;
        let len = if first[0] & 1 == 1 {
            INODE_EXTENDED_SIZE
        } else {
            INODE_COMPACT_SIZE
        };
        let raw = RawInode::decode(self.slice(pos, len, "inode")?)
            .map_err(|e| ErofsError::Corrupt(format!("nid {nid}: {e}")))?;
        let (mtime, mtime_nsec) = if raw.extended {
            (raw.mtime, raw.mtime_nsec)
        } else {
            (self.sb.build_time, self.sb.build_time_nsec)
        };
        let body_off = pos + len as u64 + xattr_ibody_size(raw.xattr_icount) as u64;
        Ok(Inode {
            nid,
            raw,
            mtime,
            mtime_nsec,
            body_off,
        })
    }

    /// Inline xattrs as (full name, value). Shared xattrs are not written by
    /// kite and are reported as corruption.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ErofsError> {
        let size = xattr_ibody_size(inode.raw.xattr_icount);
        if size == 0 {
            return Ok(Vec::new());
        }
        let start = inode.body_off - size as u64;
        let body = self.slice(start, size, "xattrs")?;
        if body[4] != 0 {
            return Err(ErofsError::Corrupt(format!(
                "nid {}: shared xattrs are not supported",
                inode.nid
            )));
        }
        let mut out = Vec::new();
        let mut p = XATTR_IBODY_HEADER_SIZE;
        while p + XATTR_ENTRY_HEADER_SIZE <= size {
            let name_len = body[p] as usize;
            let index = body[p + 1];
            let value_len = le16(body, p + 2) as usize;
            let end = p + XATTR_ENTRY_HEADER_SIZE + name_len + value_len;
            if end > size {
                return Err(ErofsError::Corrupt(format!(
                    "nid {}: xattr entry overruns its area",
                    inode.nid
                )));
            }
            let suffix = &body[p + 4..p + 4 + name_len];
            let name = join_xattr_name(index, suffix).ok_or_else(|| {
                ErofsError::Corrupt(format!("nid {}: xattr index {index}", inode.nid))
            })?;
            out.push((name, body[p + 4 + name_len..end].to_vec()));
            p = align_up(end as u64, 4) as usize;
        }
        Ok(out)
    }

    /// The bytes of a plain or inline inode (directories, symlinks, inline
    /// files). Chunk-based files are read through their chunk indexes.
    pub fn flat_data(&self, inode: &Inode) -> Result<Vec<u8>, ErofsError> {
        let size = inode.raw.size;
        let bs = BLOCK_SIZE as u64;
        match inode.raw.layout {
            LAYOUT_FLAT_PLAIN => {
                if size == 0 {
                    return Ok(Vec::new());
                }
                let start = inode.raw.i_u as u64 * bs;
                let len = usize::try_from(size)
                    .map_err(|_| ErofsError::Corrupt(format!("nid {}: size", inode.nid)))?;
                Ok(self.slice(start, len, "plain data")?.to_vec())
            }
            LAYOUT_FLAT_INLINE => {
                let full = size / bs * bs;
                let tail = (size - full) as usize;
                let mut out = Vec::new();
                if full > 0 {
                    let start = inode.raw.i_u as u64 * bs;
                    out.extend_from_slice(self.slice(start, full as usize, "inline head")?);
                }
                if inode.body_off % bs + tail as u64 > bs {
                    return Err(ErofsError::Corrupt(format!(
                        "nid {}: inline data crosses a block boundary",
                        inode.nid
                    )));
                }
                out.extend_from_slice(self.slice(inode.body_off, tail, "inline tail")?);
                Ok(out)
            }
            other => Err(ErofsError::Corrupt(format!(
                "nid {}: layout {other} has no flat data",
                inode.nid
            ))),
        }
    }

    /// The chunk indexes of a chunk-based inode.
    pub fn chunk_indexes(&self, inode: &Inode) -> Result<Vec<ChunkIndex>, ErofsError> {
        let Some(bits) = inode.chunk_bits() else {
            return Ok(Vec::new());
        };
        if inode.raw.i_u as u16 & CHUNK_FORMAT_INDEXES == 0 {
            return Err(ErofsError::Unsupported {
                node: inode.nid as usize,
                what: "4-byte block map".into(),
            });
        }
        let count = inode.raw.size.div_ceil(1u64 << bits);
        let start = align_up(inode.body_off, 8);
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(CHUNK_INDEX_SIZE))
            .ok_or_else(|| ErofsError::Corrupt(format!("nid {}: chunk count", inode.nid)))?;
        let bytes = self.slice(start, len, "chunk indexes")?;
        bytes
            .chunks_exact(CHUNK_INDEX_SIZE)
            .map(ChunkIndex::decode)
            .collect()
    }

    /// Directory entries in on-disk order (sorted), `.` and `..` included.
    pub fn dir_entries(&self, inode: &Inode) -> Result<Vec<DirEntry>, ErofsError> {
        let data = self.flat_data(inode)?;
        let mut out = Vec::new();
        for (bi, block) in data.chunks(BLOCK_SIZE).enumerate() {
            let corrupt =
                |why: &str| ErofsError::Corrupt(format!("dir nid {} block {bi}: {why}", inode.nid));
            let first = Dirent::decode(block).map_err(|_| corrupt("short block"))?;
            let count = first.nameoff as usize / DIRENT_SIZE;
            if count == 0
                || !(first.nameoff as usize).is_multiple_of(DIRENT_SIZE)
                || count * DIRENT_SIZE > block.len()
            {
                return Err(corrupt("bad first nameoff"));
            }
            let dirents: Vec<Dirent> = (0..count)
                .map(|i| Dirent::decode(&block[i * DIRENT_SIZE..]))
                .collect::<Result<_, _>>()?;
            for i in 0..count {
                let start = dirents[i].nameoff as usize;
                let end = if i + 1 < count {
                    dirents[i + 1].nameoff as usize
                } else {
                    let rest = block
                        .get(start..)
                        .ok_or_else(|| corrupt("nameoff past end"))?;
                    start + rest.iter().position(|&c| c == 0).unwrap_or(rest.len())
                };
                if start > end || end > block.len() {
                    return Err(corrupt("name offsets out of order"));
                }
                out.push(DirEntry {
                    name: block[start..end].to_vec(),
                    nid: dirents[i].nid,
                    file_type: dirents[i].file_type,
                });
            }
        }
        for w in out.windows(2) {
            if w[0].name >= w[1].name {
                return Err(ErofsError::Corrupt(format!(
                    "dir nid {}: names not sorted ({:?} >= {:?})",
                    inode.nid,
                    String::from_utf8_lossy(&w[0].name),
                    String::from_utf8_lossy(&w[1].name)
                )));
            }
        }
        Ok(out)
    }

    /// Visit every path depth-first (root first, entries in name order),
    /// calling `f(path, inode)`. Hardlinked inodes are visited once per path.
    pub fn walk(
        &self,
        f: &mut dyn FnMut(&[u8], &Inode) -> Result<(), ErofsError>,
    ) -> Result<(), ErofsError> {
        let root = self.inode(self.root_nid())?;
        let mut stack: Vec<(Vec<u8>, Inode, usize)> = vec![(b"/".to_vec(), root, 0)];
        while let Some((path, inode, depth)) = stack.pop() {
            if depth > 4096 {
                return Err(ErofsError::Corrupt("directory nesting too deep".into()));
            }
            f(&path, &inode)?;
            if inode.is_dir() {
                let entries = self.dir_entries(&inode)?;
                for e in entries.into_iter().rev() {
                    if e.name == b"." || e.name == b".." {
                        continue;
                    }
                    let child = self.inode(e.nid)?;
                    let mut p = path.clone();
                    if p.len() > 1 {
                        p.push(b'/');
                    }
                    p.extend_from_slice(&e.name);
                    stack.push((p, child, depth + 1));
                }
            }
        }
        Ok(())
    }
}
