//! The bootstrap validator: an EROFS image checked in full before the
//! kernel parses it.
//!
//! The kernel is the last line of defence against a crafted image; this is
//! the first. [`check`] accepts exactly the shape of image kite's writer
//! produces and nothing looser: known superblock fields only, every inode
//! reachable from the root once per name, every structure inside the EROFS
//! part of the file and inside its own block where the kernel expects it,
//! no two structures overlapping, every directory a tree node (no loops, no
//! hard-linked directories), every name valid and sorted, every dirent's
//! type the inode's type, every xattr area filled exactly by well-formed
//! entries, every chunk index a hole or a block range inside its device.
//! What the chunks hold is checked one level up (`kite-format`), against the
//! index section.
//!
//! Each rule is one the kernel enforces with an error (EFSCORRUPTED,
//! EOPNOTSUPP, ENODEV, ELOOP from the dcache) or one whose violation makes
//! it answer wrongly without an error (unsorted names, a wrong dirent
//! type); see `kernel-notes/erofs-format.md`.

use std::collections::HashMap;

use crate::ondisk::*;
use crate::reader::{Image, Inode};
use crate::ErofsError;

/// What a successful check saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub inodes: u64,
    pub directories: u64,
    /// Directory entries, `.` and `..` excluded.
    pub entries: u64,
    pub chunk_files: u64,
    pub chunk_indexes: u64,
    pub xattrs: u64,
}

fn corrupt(msg: String) -> ErofsError {
    ErofsError::Corrupt(msg)
}

/// Check the whole image. `chunks` is called once per chunk-based inode
/// with its chunk indexes (already checked against the device table), so
/// the caller can check them against what the devices hold.
pub fn check_with(
    img: &Image<'_>,
    chunks: &mut dyn FnMut(&Inode, &[ChunkIndex]) -> Result<(), ErofsError>,
) -> Result<CheckReport, ErofsError> {
    let sb = img.superblock();
    let data = img.data();
    let bs = BLOCK_SIZE as u64;
    let end = img.image_len();

    // Superblock: only what kite writes. Unknown compat bits change how the
    // kernel reads the image (an xattr name filter, say), and the reserved
    // bytes name features this validator does not know.
    let raw_sb = &data[SUPER_OFFSET..SUPER_OFFSET + SUPERBLOCK_SIZE];
    if sb.feature_compat & !FEATURE_COMPAT_SB_CHKSUM != 0 {
        return Err(corrupt(format!(
            "superblock: unknown compat features {:#x}",
            sb.feature_compat & !FEATURE_COMPAT_SB_CHKSUM
        )));
    }
    if raw_sb[13] != 0 || raw_sb[84..86] != [0, 0] || raw_sb[90..].iter().any(|&b| b != 0) {
        return Err(corrupt(
            "superblock: reserved or unsupported fields are set (extension slots, compression, xattr prefixes, packed inode)".into(),
        ));
    }
    if sb.xattr_blkaddr != 0 {
        return Err(corrupt(format!(
            "superblock: shared xattr area at block {} (kite writes none)",
            sb.xattr_blkaddr
        )));
    }
    let meta = sb.meta_blkaddr as u64 * bs;
    if meta >= end {
        return Err(corrupt(format!(
            "superblock: metadata block {} is past the image's {} blocks",
            sb.meta_blkaddr, sb.blocks
        )));
    }
    let has_devt = sb.feature_incompat & FEATURE_INCOMPAT_DEVICE_TABLE != 0;
    if has_devt != (sb.extra_devices > 0) {
        return Err(corrupt(format!(
            "superblock: device table feature {has_devt} with {} devices",
            sb.extra_devices
        )));
    }
    // Occupied byte ranges: superblock, device table, then every inode's
    // metadata and every data block, none may overlap another.
    let mut used: Vec<(u64, u64, String)> = vec![(
        0,
        (SUPER_OFFSET + SUPERBLOCK_SIZE) as u64,
        "superblock".into(),
    )];
    let devices = img.devices()?;
    if !devices.is_empty() {
        let start = sb.devt_slotoff as u64 * DEVICE_SLOT_SIZE as u64;
        let len = devices.len() as u64 * DEVICE_SLOT_SIZE as u64;
        if start + len > end {
            return Err(corrupt("device table runs past the image".into()));
        }
        used.push((start, start + len, "device table".into()));
    }
    let devt = sb.devt_slotoff as usize * DEVICE_SLOT_SIZE;
    for (i, d) in devices.iter().enumerate() {
        // Past tag, blocks and mapped address: fields newer kernels read
        // (the high halves of 48-bit block numbers) and reserved bytes.
        let slot = &data[devt + i * DEVICE_SLOT_SIZE..devt + (i + 1) * DEVICE_SLOT_SIZE];
        if slot[72..].iter().any(|&b| b != 0) {
            return Err(corrupt(format!("device slot {i}: reserved bytes are set")));
        }
        if d.mapped_blkaddr != 0 || d.blocks == 0 {
            return Err(corrupt(format!(
                "device slot {i}: {} blocks mapped at {} (kite writes unmapped, non-empty devices)",
                d.blocks, d.mapped_blkaddr
            )));
        }
    }

    let mut report = CheckReport::default();
    // nid -> its file type, for inodes already checked
    let mut seen: HashMap<u64, u8> = HashMap::new();
    let root = img.root_nid();
    // Bytes of data and chunk indexes the check may still read. A well
    // formed image holds each byte in one structure, so reading more than
    // the image holds means structures share bytes: refused before a
    // crafted image (many symlinks or directories over one huge block
    // range) can make the check copy the same bytes without end. Every
    // overlap is also named by the final overlap check.
    let mut budget = end;
    let mut spend = |nid: u64, bytes: u64| -> Result<(), ErofsError> {
        budget = budget.checked_sub(bytes).ok_or_else(|| {
            corrupt(format!(
                "nid {nid}: the image's structures share bytes (more data than the image holds)"
            ))
        })?;
        Ok(())
    };
    // (nid, parent nid, expected file type). No depth limit: the walk
    // keeps its own stack, and every directory is visited once.
    let mut stack: Vec<(u64, u64, u8)> = vec![(root, root, FT_DIR)];
    while let Some((nid, parent, want_type)) = stack.pop() {
        if let Some(&prev) = seen.get(&nid) {
            if prev == FT_DIR || want_type == FT_DIR {
                return Err(corrupt(format!(
                    "directory nid {nid} is reachable twice (a loop or a hard-linked directory)"
                )));
            }
            if prev != want_type {
                return Err(corrupt(format!(
                    "nid {nid}: a directory entry says file type {want_type}, the inode is type {prev}"
                )));
            }
            // A hard link to a file already checked.
            continue;
        }
        let inode = img.inode(nid)?;
        let raw = &inode.raw;
        let ft = file_type_of(raw.mode);
        if ft == FT_UNKNOWN {
            return Err(corrupt(format!("nid {nid}: bogus mode {:o}", raw.mode)));
        }
        if ft != want_type {
            return Err(corrupt(format!(
                "nid {nid}: its directory entry says file type {want_type}, the inode is type {ft}"
            )));
        }
        seen.insert(nid, ft);
        report.inodes += 1;

        let pos = meta + nid * 32;
        // Reserved fields are zero, as kite writes them: newer kernels give
        // some a meaning (an extended inode's bytes 6-7 are the high half
        // of a 48-bit start block on 6.15+, which turned a valid-looking
        // directory into EIO in the mutation campaign).
        let raw_inode = &data[pos as usize..pos as usize + raw.disk_size()];
        let reserved: &[std::ops::Range<usize>] = if raw.extended {
            &[6..8, 48..64]
        } else {
            &[12..16, 28..32]
        };
        if reserved
            .iter()
            .any(|r| raw_inode[r.clone()].iter().any(|&b| b != 0))
        {
            return Err(corrupt(format!("nid {nid}: reserved inode fields are set")));
        }
        let head = raw.disk_size() as u64 + xattr_ibody_size(raw.xattr_icount) as u64;
        if raw.xattr_icount == 1 {
            return Err(corrupt(format!(
                "nid {nid}: an xattr area of only a header (the kernel refuses it)"
            )));
        }
        report.xattrs += check_xattrs(img, &inode)?;

        // Where the inode's data lives, by type and layout.
        let mut meta_len = head;
        match (ft, raw.layout) {
            (FT_DIR | FT_SYMLINK | FT_REG_FILE, LAYOUT_FLAT_INLINE) => {
                if raw.size == 0 || raw.size >= bs {
                    return Err(corrupt(format!(
                        "nid {nid}: inline layout for {} bytes",
                        raw.size
                    )));
                }
                meta_len += raw.size;
            }
            (FT_DIR | FT_SYMLINK | FT_REG_FILE, LAYOUT_FLAT_PLAIN) => {
                if raw.size > 0 {
                    let start = raw.i_u as u64 * bs;
                    let stop = start
                        .checked_add(raw.size)
                        .filter(|&s| s <= end && start >= meta)
                        .ok_or_else(|| {
                            corrupt(format!(
                                "nid {nid}: data blocks {}+{} are outside the image",
                                raw.i_u, raw.size
                            ))
                        })?;
                    used.push((start, stop, format!("data of nid {nid}")));
                } else if raw.i_u != 0 {
                    return Err(corrupt(format!(
                        "nid {nid}: empty but has block {}",
                        raw.i_u
                    )));
                }
            }
            (FT_REG_FILE, LAYOUT_CHUNK_BASED) => {
                let Some(bits) = inode.chunk_bits() else {
                    return Err(corrupt(format!(
                        "nid {nid}: chunk layout without chunk bits"
                    )));
                };
                let format = raw.i_u;
                if format & !(CHUNK_FORMAT_INDEXES | CHUNK_FORMAT_BLKBITS_MASK) as u32 != 0
                    || format & CHUNK_FORMAT_INDEXES as u32 == 0
                    || bits > 30
                    || raw.size == 0
                {
                    return Err(corrupt(format!(
                        "nid {nid}: chunk format {format:#x} for {} bytes (kite writes 8-byte indexes, chunks up to 1 GiB, no empty chunked files)",
                        raw.size
                    )));
                }
                // The count the size implies, paid for before it is read.
                let count = raw.size.div_ceil(1u64 << bits);
                spend(nid, count.saturating_mul(CHUNK_INDEX_SIZE as u64))?;
                let idx = img.chunk_indexes(&inode)?;
                let idx_start = align_up(pos + head, 8);
                meta_len = idx_start - pos + (idx.len() * CHUNK_INDEX_SIZE) as u64;
                check_chunk_indexes(img, &inode, bits, &idx, &devices)?;
                report.chunk_files += 1;
                report.chunk_indexes += idx.len() as u64;
                chunks(&inode, &idx)?;
            }
            (FT_CHRDEV | FT_BLKDEV | FT_FIFO | FT_SOCK, LAYOUT_FLAT_PLAIN) => {
                if raw.size != 0 || (matches!(ft, FT_FIFO | FT_SOCK) && raw.i_u != 0) {
                    return Err(corrupt(format!(
                        "nid {nid}: special file with size {} and i_u {:#x}",
                        raw.size, raw.i_u
                    )));
                }
            }
            (_, layout) => {
                return Err(corrupt(format!(
                    "nid {nid}: layout {layout} for file type {ft}"
                )))
            }
        }
        // The inode stays in its block, and so does inline data (the
        // kernel refuses inline data that crosses one); the xattrs between
        // them may span blocks when they are larger than a block (the
        // kernel reads them entry by entry), as the writer then makes them.
        if pos % bs + raw.disk_size() as u64 > bs {
            return Err(corrupt(format!(
                "nid {nid}: the inode crosses a block boundary"
            )));
        }
        if raw.layout == LAYOUT_FLAT_INLINE && (pos + head) % bs + raw.size > bs {
            return Err(corrupt(format!(
                "nid {nid}: inline data crosses a block boundary"
            )));
        }
        if pos + meta_len > end {
            return Err(corrupt(format!(
                "nid {nid}: runs past the image's metadata"
            )));
        }
        used.push((pos, pos + meta_len, format!("inode {nid}")));

        match ft {
            FT_SYMLINK => {
                // The writer's limit, checked before anything is read.
                if raw.size == 0 || raw.size >= bs {
                    return Err(corrupt(format!(
                        "nid {nid}: symlink target of {} bytes",
                        raw.size
                    )));
                }
                spend(nid, raw.size)?;
                let target = img.flat_data(&inode)?;
                if target.contains(&0) {
                    return Err(corrupt(format!(
                        "nid {nid}: symlink target holds a NUL byte"
                    )));
                }
            }
            FT_DIR => {
                report.directories += 1;
                spend(nid, raw.size)?;
                let entries = img.dir_entries(&inode)?;
                check_dir_blocks(img, &inode, &img.flat_data(&inode)?)?;
                let (mut dot, mut dotdot) = (false, false);
                for e in &entries {
                    match e.name.as_slice() {
                        b"." => {
                            dot = true;
                            if e.nid != nid || e.file_type != FT_DIR {
                                return Err(corrupt(format!(
                                    "dir nid {nid}: \".\" names nid {}",
                                    e.nid
                                )));
                            }
                        }
                        b".." => {
                            dotdot = true;
                            if e.nid != parent || e.file_type != FT_DIR {
                                return Err(corrupt(format!(
                                    "dir nid {nid}: \"..\" names nid {}, its parent is {parent}",
                                    e.nid
                                )));
                            }
                        }
                        name => {
                            if name.is_empty()
                                || name.len() > NAME_LEN_MAX
                                || name.contains(&b'/')
                                || name.contains(&0)
                            {
                                return Err(ErofsError::BadName {
                                    dir: nid as usize,
                                    name: String::from_utf8_lossy(name).into_owned(),
                                });
                            }
                            report.entries += 1;
                            stack.push((e.nid, nid, e.file_type));
                        }
                    }
                }
                if !(dot && dotdot) {
                    return Err(corrupt(format!("dir nid {nid}: no \".\" or \"..\" entry")));
                }
            }
            _ => {}
        }
    }

    used.sort();
    for w in used.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(corrupt(format!("{} overlaps {}", w[0].2, w[1].2)));
        }
    }
    Ok(report)
}

/// What the reader's entry list does not show of a directory's blocks:
/// each dirent's reserved byte is zero, and a plain directory's last block
/// is zero past the directory's size. The kernel's lookup reads the last
/// name of a block up to a NUL or the block's end, past `i_size`, where
/// readdir stops at `i_size`: a byte there makes a listed name impossible
/// to look up (ENOENT in the mutation campaign).
fn check_dir_blocks(img: &Image<'_>, inode: &Inode, bytes: &[u8]) -> Result<(), ErofsError> {
    let nid = inode.nid;
    for (bi, block) in bytes.chunks(BLOCK_SIZE).enumerate() {
        let count = le16(block, 8) as usize / DIRENT_SIZE;
        if (0..count).any(|i| block[i * DIRENT_SIZE + 11] != 0) {
            return Err(corrupt(format!(
                "dir nid {nid} block {bi}: reserved dirent byte set"
            )));
        }
    }
    let tail = inode.raw.size % BLOCK_SIZE as u64;
    if inode.raw.layout == LAYOUT_FLAT_PLAIN && tail != 0 {
        let end = inode.raw.i_u as u64 * BLOCK_SIZE as u64 + inode.raw.size;
        let slack = img
            .data()
            .get(end as usize..align_up(end, BLOCK_SIZE as u64) as usize);
        if !slack.is_some_and(|s| s.iter().all(|&b| b == 0)) {
            return Err(corrupt(format!(
                "dir nid {nid}: bytes past its size in its last block are not zero"
            )));
        }
    }
    Ok(())
}

/// [`check_with`], without looking at the chunks.
pub fn check(img: &Image<'_>) -> Result<CheckReport, ErofsError> {
    check_with(img, &mut |_, _| Ok(()))
}

/// The inline xattr area: no shared xattrs, entries with known prefixes
/// and non-empty names (but the ACL entries, which have none), filling the
/// area exactly as the kernel walks it.
fn check_xattrs(img: &Image<'_>, inode: &Inode) -> Result<u64, ErofsError> {
    let size = xattr_ibody_size(inode.raw.xattr_icount);
    if size == 0 {
        return Ok(0);
    }
    let body = img.xattr_body(inode)?;
    let nid = inode.nid;
    if body[4..XATTR_IBODY_HEADER_SIZE].iter().any(|&b| b != 0) {
        return Err(corrupt(format!(
            "nid {nid}: xattr header has shared xattrs or reserved bytes set"
        )));
    }
    let mut p = XATTR_IBODY_HEADER_SIZE;
    let mut n = 0;
    while p < size {
        if p + XATTR_ENTRY_HEADER_SIZE > size {
            return Err(corrupt(format!(
                "nid {nid}: xattr entry header overruns its area"
            )));
        }
        let name_len = body[p] as usize;
        let index = body[p + 1];
        let value_len = le16(body, p + 2) as usize;
        let stop = p + XATTR_ENTRY_HEADER_SIZE + name_len + value_len;
        if stop > size {
            return Err(corrupt(format!("nid {nid}: xattr entry overruns its area")));
        }
        let acl = matches!(index, 2 | 3);
        if join_xattr_name(index, &[]).is_none() || (name_len == 0) != acl {
            return Err(corrupt(format!(
                "nid {nid}: xattr with prefix index {index} and a {name_len}-byte name"
            )));
        }
        n += 1;
        p = align_up(stop as u64, 4) as usize;
    }
    if p != size {
        return Err(corrupt(format!(
            "nid {nid}: xattr entries do not fill their area"
        )));
    }
    Ok(n)
}

/// Chunk indexes: the reserved half-word clear, each a hole or a block
/// range that lies inside its device.
fn check_chunk_indexes(
    img: &Image<'_>,
    inode: &Inode,
    bits: u8,
    idx: &[ChunkIndex],
    devices: &[DeviceSlot],
) -> Result<(), ErofsError> {
    let nid = inode.nid;
    let raw_idx = img.chunk_index_bytes(inode, idx.len())?;
    let chunk = 1u64 << bits;
    for (i, ci) in idx.iter().enumerate() {
        if raw_idx[i * CHUNK_INDEX_SIZE..i * CHUNK_INDEX_SIZE + 2] != [0, 0] {
            return Err(corrupt(format!("nid {nid} chunk {i}: reserved bytes set")));
        }
        if ci.is_hole() {
            if ci.device_id != 0 {
                return Err(corrupt(format!(
                    "nid {nid} chunk {i}: a hole on device {}",
                    ci.device_id
                )));
            }
            continue;
        }
        let dev = (ci.device_id as usize)
            .checked_sub(1)
            .and_then(|d| devices.get(d))
            .ok_or_else(|| {
                corrupt(format!(
                    "nid {nid} chunk {i}: device {} of {}",
                    ci.device_id,
                    devices.len()
                ))
            })?;
        let len = chunk.min(inode.raw.size - i as u64 * chunk);
        let start = ci.blkaddr as u64 * BLOCK_SIZE as u64;
        if start + len > dev.blocks as u64 * BLOCK_SIZE as u64 {
            return Err(corrupt(format!(
                "nid {nid} chunk {i}: blocks {}+{len} bytes past the end of device {} ({} blocks)",
                ci.blkaddr, ci.device_id, dev.blocks
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{
        write_image, Device, FileData, ImageOptions, Metadata, Node, NodeKind, Tree,
    };

    fn sample() -> Vec<u8> {
        let meta = |perm| Metadata {
            perm,
            ..Default::default()
        };
        let node = |kind, perm| Node {
            meta: meta(perm),
            kind,
        };
        let tree = Tree {
            nodes: vec![
                node(
                    NodeKind::Dir(vec![(b"etc".to_vec(), 1), (b"big".to_vec(), 4)]),
                    0o755,
                ),
                node(
                    NodeKind::Dir(vec![(b"motd".to_vec(), 2), (b"link".to_vec(), 3)]),
                    0o755,
                ),
                node(NodeKind::File(FileData::Inline(b"hello\n".to_vec())), 0o644),
                node(NodeKind::Symlink(b"motd".to_vec()), 0o777),
                node(
                    NodeKind::File(FileData::Chunked {
                        size: 3 << 20,
                        chunk_bits: 20,
                        chunks: vec![
                            ChunkIndex {
                                device_id: 1,
                                blkaddr: 0,
                            },
                            ChunkIndex::HOLE,
                            ChunkIndex {
                                device_id: 1,
                                blkaddr: 256,
                            },
                        ],
                    }),
                    0o644,
                ),
            ],
        };
        let devices = vec![Device {
            tag: [b'a'; 64],
            blocks: 512,
        }];
        write_image(&tree, &devices, &ImageOptions::default()).unwrap()
    }

    #[test]
    fn a_written_image_passes() {
        let data = sample();
        let img = Image::open(&data).unwrap();
        let r = check(&img).unwrap();
        assert_eq!(
            (r.directories, r.entries, r.chunk_files, r.chunk_indexes),
            (2, 4, 1, 3)
        );
    }

    #[test]
    fn every_byte_flip_of_the_metadata_is_caught_or_harmless() {
        // Flip each byte of the metadata blocks: the validator refuses the
        // image, or the image still reads whole with the reader (a flip in
        // a name, a mode bit, a time: a different but well-formed image).
        let data = sample();
        let len = Image::open(&data).unwrap().image_len() as usize;
        let mut accepted = 0;
        for i in SUPER_OFFSET..len {
            let mut d = data.clone();
            d[i] ^= 0x5a;
            let Ok(img) = Image::open(&d) else { continue };
            if check(&img).is_ok() {
                accepted += 1;
                img.walk(&mut |_, inode| {
                    img.xattrs(inode)?;
                    if inode.chunk_bits().is_some() {
                        img.chunk_indexes(inode)?;
                    } else {
                        img.flat_data(inode)?;
                    }
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("flip at {i} accepted but unreadable: {e}"));
            }
        }
        assert!(accepted > 0, "some flips (names, times) are harmless");
    }

    /// A root with enough entries for a plain directory of two blocks.
    fn big_dir() -> Vec<u8> {
        let meta = Metadata {
            perm: 0o644,
            ..Default::default()
        };
        let mut nodes = vec![Node {
            meta: meta.clone(),
            kind: NodeKind::Dir(
                (1..=300)
                    .map(|i| (format!("entry-{i:04}-xxxxxxxx").into_bytes(), i))
                    .collect(),
            ),
        }];
        for i in 1..=300 {
            nodes.push(Node {
                meta: meta.clone(),
                kind: NodeKind::File(FileData::Inline(vec![i as u8])),
            });
        }
        write_image(&Tree { nodes }, &[], &ImageOptions::default()).unwrap()
    }

    #[test]
    fn a_byte_past_a_directorys_size_in_its_last_block_is_refused() {
        // Found by the mutation campaign: the kernel's lookup reads the
        // last name of a block up to a NUL, past i_size; readdir does not.
        let data = big_dir();
        let img = Image::open(&data).unwrap();
        let root = img.inode(img.root_nid()).unwrap();
        assert_eq!(root.raw.layout, LAYOUT_FLAT_PLAIN);
        assert_ne!(root.raw.size % BLOCK_SIZE as u64, 0);
        check(&img).unwrap();
        let past = (root.raw.i_u as u64 * BLOCK_SIZE as u64 + root.raw.size) as usize;
        let mut d = data.clone();
        d[past] = b'z';
        let e = check(&Image::open(&d).unwrap()).unwrap_err().to_string();
        assert!(e.contains("past its size"), "{e}");
    }

    #[test]
    fn reserved_inode_fields_are_refused() {
        // Found by the mutation campaign: bytes 6-7 of an extended inode
        // are the high half of its start block on Linux 6.15+ (EIO).
        let data = sample();
        let img = Image::open(&data).unwrap();
        let root = img.inode(img.root_nid()).unwrap();
        let at =
            (img.superblock().meta_blkaddr as u64 * BLOCK_SIZE as u64 + root.nid * 32) as usize;
        let reserved = if root.raw.extended { at + 6 } else { at + 12 };
        let mut d = data.clone();
        d[reserved] = 0xff;
        let e = check(&Image::open(&d).unwrap()).unwrap_err().to_string();
        assert!(e.contains("reserved inode fields"), "{e}");
    }

    #[test]
    fn what_the_writer_makes_at_its_limits_passes() {
        // Found in review: an xattr area larger than a block (the writer
        // starts the inode at a block and lets the xattrs span), and a tree
        // deeper than the reader's walk limit, both written by the writer.
        let mut nodes = vec![Node {
            meta: Metadata {
                perm: 0o755,
                ..Default::default()
            },
            kind: NodeKind::Dir(vec![(b"big-xattr".to_vec(), 1), (b"d".to_vec(), 2)]),
        }];
        nodes.push(Node {
            meta: Metadata {
                perm: 0o644,
                xattrs: vec![(b"user.big".to_vec(), vec![7u8; 6000])],
                ..Default::default()
            },
            kind: NodeKind::File(FileData::Inline(b"small tail".to_vec())),
        });
        let depth = 5000;
        for i in 0..depth {
            let next = nodes.len() + 1;
            nodes.push(Node {
                meta: Metadata {
                    perm: 0o755,
                    ..Default::default()
                },
                kind: NodeKind::Dir(if i + 1 < depth {
                    vec![(b"d".to_vec(), next)]
                } else {
                    Vec::new()
                }),
            });
        }
        let data = write_image(&Tree { nodes }, &[], &ImageOptions::default()).unwrap();
        let r = check(&Image::open(&data).unwrap()).unwrap();
        assert_eq!(r.directories, 1 + depth as u64);
        assert_eq!(r.xattrs, 1);
    }

    #[test]
    fn symlinks_sharing_one_data_range_are_refused_before_they_are_read_again() {
        // Found in review: N inodes pointing at one large plain range would
        // make the check copy it N times. Point every symlink of a tree at
        // the first one's target block: refused (by the read budget or the
        // overlap check), never read over and over.
        let meta = |perm| Metadata {
            perm,
            ..Default::default()
        };
        let target = vec![b'a'; 4090];
        let mut nodes = vec![Node {
            meta: meta(0o755),
            kind: NodeKind::Dir(
                (1..=40)
                    .map(|i| (format!("l{i:02}").into_bytes(), i))
                    .collect(),
            ),
        }];
        for _ in 1..=40 {
            nodes.push(Node {
                meta: meta(0o777),
                kind: NodeKind::Symlink(target.clone()),
            });
        }
        let mut data = write_image(&Tree { nodes }, &[], &ImageOptions::default()).unwrap();
        let img = Image::open(&data).unwrap();
        check(&img).unwrap();
        let root = img.inode(img.root_nid()).unwrap();
        let links: Vec<u64> = img
            .dir_entries(&root)
            .unwrap()
            .iter()
            .skip(2)
            .map(|e| e.nid)
            .collect();
        let first = img.inode(links[0]).unwrap();
        assert_eq!(first.raw.layout, LAYOUT_FLAT_PLAIN);
        let meta_at = img.superblock().meta_blkaddr as usize * BLOCK_SIZE;
        for nid in &links[1..] {
            let at = meta_at + *nid as usize * 32 + 16;
            data[at..at + 4].copy_from_slice(&first.raw.i_u.to_le_bytes());
        }
        let e = check(&Image::open(&data).unwrap()).unwrap_err().to_string();
        assert!(e.contains("share bytes") || e.contains("overlaps"), "{e}");
    }

    #[test]
    fn a_directory_loop_is_refused() {
        let data = sample();
        let img = Image::open(&data).unwrap();
        let root = img.inode(img.root_nid()).unwrap();
        let etc = img
            .dir_entries(&root)
            .unwrap()
            .into_iter()
            .find(|e| e.name == b"etc")
            .unwrap();
        // Point etc's "motd" entry at the root directory, typed as a dir.
        let etc_inode = img.inode(etc.nid).unwrap();
        let names = img.dir_entries(&etc_inode).unwrap();
        let i = names.iter().position(|e| e.name == b"motd").unwrap();
        let dirent_at = img.inline_data_offset(&etc_inode) as usize + i * DIRENT_SIZE;
        let mut d = data.clone();
        d[dirent_at..dirent_at + 8].copy_from_slice(&img.root_nid().to_le_bytes());
        d[dirent_at + 10] = FT_DIR;
        let img = Image::open(&d).unwrap();
        let e = check(&img).unwrap_err().to_string();
        assert!(e.contains("reachable twice"), "{e}");
    }
}
