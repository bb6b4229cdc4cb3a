//! The EROFS image writer.
//!
//! Input is an in-memory [`Tree`] of nodes (metadata plus where each regular
//! file's data lives); output is the bytes of an uncompressed EROFS image with
//! 4 KiB blocks. The writer decides every layout question (compact or
//! extended inode, inline or plain directory, where metadata and directory
//! blocks go) and nothing else: it never reads file data and does no I/O.
//!
//! Image layout: block 0 holds the superblock at 1024 and the device table
//! right after it (spilling into further blocks for many devices). Inodes
//! follow from the next block (with `meta_blkaddr` 0, so nids count from the
//! image start and the root's nid stays small). After the metadata come
//! directory and symlink blocks that did not fit inline.

use std::collections::HashMap;

use crate::ondisk::*;
use crate::ErofsError;

/// Index of a node in [`Tree::nodes`].
pub type NodeId = usize;

/// Inode metadata common to every file type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits (incl. setuid/setgid/sticky); type bits come from the kind.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
    /// Full xattr names (`user.x`, `security.capability`, ...) and values.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// Stored in the bootstrap itself (inline tail or plain blocks).
    Inline(Vec<u8>),
    /// Stored in chunks of `1 << chunk_bits` bytes on the devices.
    Chunked {
        size: u64,
        chunk_bits: u8,
        chunks: Vec<ChunkIndex>,
    },
}

impl FileData {
    pub fn size(&self) -> u64 {
        match self {
            FileData::Inline(d) => d.len() as u64,
            FileData::Chunked { size, .. } => *size,
        }
    }
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// Entries without `.` and `..`, in any order; the writer sorts them.
    Dir(Vec<(Vec<u8>, NodeId)>),
    File(FileData),
    Symlink(Vec<u8>),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

impl NodeKind {
    fn type_bits(&self) -> u16 {
        match self {
            NodeKind::Dir(_) => S_IFDIR,
            NodeKind::File(_) => S_IFREG,
            NodeKind::Symlink(_) => S_IFLNK,
            NodeKind::CharDev { .. } => S_IFCHR,
            NodeKind::BlockDev { .. } => S_IFBLK,
            NodeKind::Fifo => S_IFIFO,
            NodeKind::Socket => S_IFSOCK,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub meta: Metadata,
    pub kind: NodeKind,
}

/// A file tree to write. Node 0 is the root and must be a directory. A node
/// reachable through several directory entries is a hardlink.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

/// One extra device (a data blob).
#[derive(Debug, Clone)]
pub struct Device {
    /// 64 ASCII bytes: the blob digest's hex.
    pub tag: [u8; 64],
    pub blocks: u32,
}

/// Image-wide settings.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
}

/// Planned placement of one inode.
struct Slot {
    node: NodeId,
    /// Byte offset of the inode in the image.
    pos: u64,
    raw: RawInode,
    xattr_body: Vec<u8>,
    /// Inline tail bytes (FLAT_INLINE) placed right after inode + xattrs.
    inline: Vec<u8>,
    /// Chunk indexes (CHUNK_BASED), placed 8-aligned after inode + xattrs.
    chunks: Vec<ChunkIndex>,
    /// Full blocks of data placed in the data area (FLAT_PLAIN / INLINE head).
    plain: Vec<u8>,
}

/// Directory content split into blocks; names are sorted across blocks.
struct DirBlocks {
    /// (entries of the block as (name, target node))
    blocks: Vec<Vec<(Vec<u8>, NodeId)>>,
    /// Bytes used in the last block.
    last_used: usize,
}

fn plan_dir(entries: Vec<(Vec<u8>, NodeId)>) -> DirBlocks {
    let mut blocks: Vec<Vec<(Vec<u8>, NodeId)>> = vec![Vec::new()];
    let mut used = 0usize;
    for (name, id) in entries {
        let add = DIRENT_SIZE + name.len();
        if used + add > BLOCK_SIZE {
            blocks.push(Vec::new());
            used = 0;
        }
        used += add;
        blocks
            .last_mut()
            .expect("at least one block")
            .push((name, id));
    }
    DirBlocks {
        blocks,
        last_used: used,
    }
}

fn encode_dir_block(entries: &[(Vec<u8>, NodeId)], nids: &[u64], tree: &Tree, out: &mut Vec<u8>) {
    let start = out.len();
    let mut nameoff = DIRENT_SIZE * entries.len();
    out.resize(start + nameoff, 0);
    for (i, (name, id)) in entries.iter().enumerate() {
        let de = Dirent {
            nid: nids[*id],
            nameoff: nameoff as u16,
            file_type: file_type_of(tree.nodes[*id].kind.type_bits()),
        };
        de.encode(&mut out[start + i * DIRENT_SIZE..start + (i + 1) * DIRENT_SIZE]);
        nameoff += name.len();
    }
    for (name, _) in entries {
        out.extend_from_slice(name);
    }
}

fn encode_xattrs(node: NodeId, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>, ErofsError> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut entries: Vec<(u8, &[u8], &[u8])> = Vec::with_capacity(xattrs.len());
    for (name, value) in xattrs {
        let (idx, suffix) = split_xattr_name(name).ok_or_else(|| ErofsError::Unsupported {
            node,
            what: format!(
                "xattr name {:?} has no EROFS prefix",
                String::from_utf8_lossy(name)
            ),
        })?;
        if suffix.len() > 255 || value.len() > u16::MAX as usize {
            return Err(ErofsError::Unsupported {
                node,
                what: format!("xattr {:?} too large", String::from_utf8_lossy(name)),
            });
        }
        entries.push((idx, suffix, value));
    }
    entries.sort();
    let mut b = vec![0u8; XATTR_IBODY_HEADER_SIZE];
    for (idx, suffix, value) in entries {
        b.push(suffix.len() as u8);
        b.push(idx);
        b.extend_from_slice(&(value.len() as u16).to_le_bytes());
        b.extend_from_slice(suffix);
        b.extend_from_slice(value);
        b.resize(align_up(b.len() as u64, 4) as usize, 0);
    }
    Ok(b)
}

/// Pick the superblock build time: the most common mtime, so that as many
/// inodes as possible can be compact.
fn pick_build_time(tree: &Tree) -> (u64, u32) {
    let mut counts: HashMap<(u64, u32), usize> = HashMap::new();
    for n in &tree.nodes {
        *counts.entry((n.meta.mtime, n.meta.mtime_nsec)).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(t, _)| t)
        .unwrap_or((0, 0))
}

/// Write `tree` as an EROFS image with `devices` as the device table.
pub fn write_image(
    tree: &Tree,
    devices: &[Device],
    opts: &ImageOptions,
) -> Result<Vec<u8>, ErofsError> {
    let root = tree
        .nodes
        .first()
        .ok_or_else(|| ErofsError::Corrupt("empty tree".into()))?;
    if !matches!(root.kind, NodeKind::Dir(_)) {
        return Err(ErofsError::Corrupt("root is not a directory".into()));
    }
    if devices.len() > u16::MAX as usize - 1 {
        return Err(ErofsError::Unsupported {
            node: 0,
            what: format!("{} devices", devices.len()),
        });
    }

    // Order nodes depth-first from the root, each once; count links and
    // find parents (for `..`).
    let n = tree.nodes.len();
    let mut order: Vec<NodeId> = Vec::with_capacity(n);
    let mut nlink = vec![0u32; n];
    let mut parent = vec![usize::MAX; n];
    let mut seen = vec![false; n];
    parent[0] = 0;
    seen[0] = true;
    let mut stack = vec![0usize];
    while let Some(id) = stack.pop() {
        order.push(id);
        if let NodeKind::Dir(entries) = &tree.nodes[id].kind {
            let mut subdirs = 0u32;
            for (name, child) in entries.iter().rev() {
                check_name(id, name)?;
                let child = *child;
                if child >= n {
                    return Err(ErofsError::Corrupt(format!("dangling node id {child}")));
                }
                let is_dir = matches!(tree.nodes[child].kind, NodeKind::Dir(_));
                if is_dir {
                    subdirs += 1;
                    if seen[child] {
                        return Err(ErofsError::Corrupt(format!(
                            "directory node {child} linked twice"
                        )));
                    }
                    parent[child] = id;
                }
                if !is_dir {
                    nlink[child] += 1;
                }
                if !seen[child] {
                    seen[child] = true;
                    stack.push(child);
                }
            }
            nlink[id] = 2 + subdirs;
        }
    }

    let (build_time, build_time_nsec) = pick_build_time(tree);
    let mut incompat = 0u32;
    if !devices.is_empty() {
        incompat |= FEATURE_INCOMPAT_DEVICE_TABLE;
    }

    // Plan every inode: its raw fields, xattrs, inline tail, chunk indexes.
    let mut slots: Vec<Slot> = Vec::with_capacity(order.len());
    let mut dir_plans: HashMap<NodeId, DirBlocks> = HashMap::new();
    for (seq, &id) in order.iter().enumerate() {
        let node = &tree.nodes[id];
        let xattr_body = encode_xattrs(id, &node.meta.xattrs)?;
        let xattr_icount = if xattr_body.is_empty() {
            0
        } else {
            (1 + (xattr_body.len() - XATTR_IBODY_HEADER_SIZE) / 4) as u16
        };
        let mut raw = RawInode {
            extended: false,
            layout: LAYOUT_FLAT_PLAIN,
            xattr_icount,
            mode: node.kind.type_bits() | (node.meta.perm & 0o7777),
            nlink: nlink[id],
            size: 0,
            i_u: 0,
            ino: seq as u32 + 1,
            uid: node.meta.uid,
            gid: node.meta.gid,
            mtime: node.meta.mtime,
            mtime_nsec: node.meta.mtime_nsec,
        };
        let inline = Vec::new();
        let mut chunks = Vec::new();
        let mut plain = Vec::new();
        match &node.kind {
            NodeKind::Dir(entries) => {
                let mut all: Vec<(Vec<u8>, NodeId)> = entries.clone();
                all.push((b".".to_vec(), id));
                all.push((b"..".to_vec(), parent[id]));
                all.sort_by(|a, b| a.0.cmp(&b.0));
                for w in all.windows(2) {
                    if w[0].0 == w[1].0 {
                        return Err(ErofsError::Corrupt(format!(
                            "duplicate name {:?} in directory node {id}",
                            String::from_utf8_lossy(&w[0].0)
                        )));
                    }
                }
                let plan = plan_dir(all);
                raw.size = ((plan.blocks.len() - 1) * BLOCK_SIZE + plan.last_used) as u64;
                dir_plans.insert(id, plan);
            }
            NodeKind::File(FileData::Inline(data)) => {
                raw.size = data.len() as u64;
                plain = data.clone();
            }
            NodeKind::File(FileData::Chunked {
                size,
                chunk_bits,
                chunks: c,
            }) => {
                if *chunk_bits < BLOCK_BITS || *chunk_bits > BLOCK_BITS + 31 {
                    return Err(ErofsError::Unsupported {
                        node: id,
                        what: format!("chunk bits {chunk_bits}"),
                    });
                }
                let expect = size.div_ceil(1u64 << chunk_bits);
                if c.len() as u64 != expect {
                    return Err(ErofsError::Corrupt(format!(
                        "node {id}: {} chunk indexes for size {size}, expected {expect}",
                        c.len()
                    )));
                }
                for ci in c {
                    if !ci.is_hole() && ci.device_id as usize > devices.len() {
                        return Err(ErofsError::Corrupt(format!(
                            "node {id}: chunk on device {} of {}",
                            ci.device_id,
                            devices.len()
                        )));
                    }
                }
                raw.size = *size;
                if *size > 0 {
                    raw.layout = LAYOUT_CHUNK_BASED;
                    raw.i_u = ((*chunk_bits - BLOCK_BITS) as u32) | CHUNK_FORMAT_INDEXES as u32;
                    chunks = c.clone();
                    incompat |= FEATURE_INCOMPAT_CHUNKED_FILE;
                }
            }
            NodeKind::Symlink(target) => {
                if target.is_empty() || target.len() >= BLOCK_SIZE {
                    return Err(ErofsError::Unsupported {
                        node: id,
                        what: format!("symlink target of {} bytes", target.len()),
                    });
                }
                raw.size = target.len() as u64;
                plain = target.clone();
            }
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                raw.i_u = encode_dev(*major, *minor);
            }
            NodeKind::Fifo | NodeKind::Socket => {}
        }
        raw.extended = raw.size > u32::MAX as u64
            || raw.uid > u16::MAX as u32
            || raw.gid > u16::MAX as u32
            || raw.nlink > u16::MAX as u32
            || (raw.mtime, raw.mtime_nsec) != (build_time, build_time_nsec);
        slots.push(Slot {
            node: id,
            pos: 0,
            raw,
            xattr_body,
            inline,
            chunks,
            plain,
        });
    }

    // Directory bytes need final nids, but their sizes are already known, so
    // decide inline vs plain now: a directory is inline when it has a single
    // block, and every other data-carrying inode when its tail fits.
    // Place inodes in the metadata area.
    let devt_start = (SUPER_OFFSET + SUPERBLOCK_SIZE) as u64;
    let devt_end = devt_start + (devices.len() * DEVICE_SLOT_SIZE) as u64;
    let meta_start = align_up(devt_end, BLOCK_SIZE as u64);
    let mut cursor = meta_start;
    let bs = BLOCK_SIZE as u64;
    for slot in slots.iter_mut() {
        let head = (slot.raw.disk_size() + slot.xattr_body.len()) as u64;
        let data_len = slot.raw.size;
        let is_dir = dir_plans.contains_key(&slot.node);
        let wants_data = is_dir || !slot.plain.is_empty();
        // Tail that would go inline: the whole content if under a block.
        let tail = if wants_data && data_len < bs && head + data_len <= bs {
            data_len
        } else {
            0
        };
        let inline = wants_data && tail == data_len && data_len > 0;
        let mut total = head + if inline { tail } else { 0 };
        if !slot.chunks.is_empty() {
            total = align_up(total, 8);
        }
        // Keep inode + xattrs + inline tail inside one block.
        let fixed = head + if inline { tail } else { 0 };
        if cursor % bs + fixed > bs {
            cursor = align_up(cursor, bs);
        }
        slot.pos = cursor;
        if inline {
            slot.raw.layout = LAYOUT_FLAT_INLINE;
            if !is_dir {
                slot.inline = std::mem::take(&mut slot.plain);
            }
        }
        total += (slot.chunks.len() * CHUNK_INDEX_SIZE) as u64;
        cursor = align_up(cursor + total, 32);
    }
    let mut nids = vec![u64::MAX; n];
    for slot in &slots {
        nids[slot.node] = slot.pos / 32;
    }
    let root_nid = nids[0];
    if root_nid > u16::MAX as u64 {
        return Err(ErofsError::Corrupt(format!(
            "root nid {root_nid} too large"
        )));
    }

    // Data area: directory blocks (when not inline) and plain data.
    let mut data_area: Vec<u8> = Vec::new();
    let data_start_blk = align_up(cursor, bs) / bs;
    for slot in slots.iter_mut() {
        if let Some(plan) = dir_plans.get(&slot.node) {
            let mut content = Vec::with_capacity(plan.blocks.len() * BLOCK_SIZE);
            for (i, block) in plan.blocks.iter().enumerate() {
                encode_dir_block(block, &nids, tree, &mut content);
                if i + 1 < plan.blocks.len() {
                    content.resize((i + 1) * BLOCK_SIZE, 0);
                }
            }
            debug_assert_eq!(content.len() as u64, slot.raw.size);
            if slot.raw.layout == LAYOUT_FLAT_INLINE {
                slot.inline = content;
            } else {
                slot.plain = content;
            }
        }
        if !slot.plain.is_empty() {
            let blk = data_start_blk + data_area.len() as u64 / bs;
            slot.raw.i_u = u32::try_from(blk)
                .map_err(|_| ErofsError::Corrupt("bootstrap larger than 16 TiB".into()))?;
            data_area.extend_from_slice(&slot.plain);
            data_area.resize(align_up(data_area.len() as u64, bs) as usize, 0);
        }
    }

    // Serialize.
    let total_len = data_start_blk * bs + data_area.len() as u64;
    let blocks =
        u32::try_from(total_len / bs).map_err(|_| ErofsError::Corrupt("image too large".into()))?;
    let mut img = vec![0u8; total_len as usize];
    for (i, dev) in devices.iter().enumerate() {
        let off = devt_start as usize + i * DEVICE_SLOT_SIZE;
        let slot = DeviceSlot {
            tag: dev.tag,
            blocks: dev.blocks,
            mapped_blkaddr: 0,
        };
        img[off..off + DEVICE_SLOT_SIZE].copy_from_slice(&slot.encode());
    }
    let mut buf = Vec::with_capacity(BLOCK_SIZE);
    for slot in &slots {
        buf.clear();
        slot.raw.encode(&mut buf);
        buf.extend_from_slice(&slot.xattr_body);
        buf.extend_from_slice(&slot.inline);
        if !slot.chunks.is_empty() {
            buf.resize(
                align_up(slot.pos + buf.len() as u64, 8) as usize - slot.pos as usize,
                0,
            );
            for c in &slot.chunks {
                c.encode(&mut buf);
            }
        }
        let p = slot.pos as usize;
        img[p..p + buf.len()].copy_from_slice(&buf);
    }
    let ds = (data_start_blk * bs) as usize;
    img[ds..ds + data_area.len()].copy_from_slice(&data_area);

    let sb = SuperBlock {
        checksum: 0,
        feature_compat: FEATURE_COMPAT_SB_CHKSUM,
        blkszbits: BLOCK_BITS,
        root_nid: root_nid as u16,
        inos: order.len() as u64,
        build_time,
        build_time_nsec,
        blocks,
        meta_blkaddr: 0,
        xattr_blkaddr: 0,
        uuid: opts.uuid,
        volume_name: opts.volume_name,
        feature_incompat: incompat,
        extra_devices: devices.len() as u16,
        devt_slotoff: if devices.is_empty() {
            0
        } else {
            (devt_start / DEVICE_SLOT_SIZE as u64) as u16
        },
    };
    img[SUPER_OFFSET..SUPER_OFFSET + SUPERBLOCK_SIZE].copy_from_slice(&sb.encode());
    let csum = superblock_checksum(&img[SUPER_OFFSET..BLOCK_SIZE]);
    img[SUPER_OFFSET + 4..SUPER_OFFSET + 8].copy_from_slice(&csum.to_le_bytes());
    Ok(img)
}

fn check_name(dir: NodeId, name: &[u8]) -> Result<(), ErofsError> {
    if name.is_empty()
        || name.len() > NAME_LEN_MAX
        || name == b"."
        || name == b".."
        || name.contains(&b'/')
        || name.contains(&0)
    {
        return Err(ErofsError::BadName {
            dir,
            name: String::from_utf8_lossy(name).into_owned(),
        });
    }
    Ok(())
}
