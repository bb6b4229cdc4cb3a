//! Writer -> reader round trips over trees that exercise every layout
//! decision: inline and plain directories, multi-block directories with
//! names sorting before `.`, extended inodes, xattrs, devices, hardlinks.

use kite_erofs::ondisk::*;
use kite_erofs::*;

fn meta(perm: u16) -> Metadata {
    Metadata {
        perm,
        mtime: 1_000,
        ..Default::default()
    }
}

fn dir(entries: Vec<(&str, NodeId)>) -> NodeKind {
    NodeKind::Dir(
        entries
            .into_iter()
            .map(|(n, i)| (n.as_bytes().to_vec(), i))
            .collect(),
    )
}

fn collect(img: &Image) -> Vec<(String, Inode)> {
    let mut out = Vec::new();
    img.walk(&mut |p, i| {
        out.push((String::from_utf8_lossy(p).into_owned(), i.clone()));
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn small_tree_roundtrips() {
    let mut tree = Tree::default();
    // 0 root, 1 file (chunked), 2 symlink, 3 subdir, 4 fifo, 5 chardev
    tree.nodes.push(Node {
        meta: meta(0o755),
        kind: dir(vec![
            ("f", 1),
            ("link", 2),
            ("sub", 3),
            ("-a", 4),
            ("!b", 5),
            ("hard", 1),
        ]),
    });
    tree.nodes.push(Node {
        meta: Metadata {
            perm: 0o4755,
            uid: 70_000,
            gid: 3,
            mtime: 5,
            mtime_nsec: 7,
            xattrs: vec![
                (b"user.k".to_vec(), b"v".to_vec()),
                (b"security.capability".to_vec(), vec![1, 0, 0, 2, 0xff]),
                (b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0]),
            ],
        },
        kind: NodeKind::File(FileData::Chunked {
            size: (5u64 << 30) + 1,
            chunk_bits: 20,
            chunks: (0..5121u32)
                .map(|i| {
                    if i % 2 == 0 {
                        ChunkIndex {
                            device_id: 1,
                            blkaddr: i,
                        }
                    } else {
                        ChunkIndex::HOLE
                    }
                })
                .collect(),
        }),
    });
    tree.nodes.push(Node {
        meta: meta(0o777),
        kind: NodeKind::Symlink(b"../target".to_vec()),
    });
    tree.nodes.push(Node {
        meta: meta(0o1777),
        kind: dir(vec![]),
    });
    tree.nodes.push(Node {
        meta: meta(0o644),
        kind: NodeKind::Fifo,
    });
    tree.nodes.push(Node {
        meta: meta(0o600),
        kind: NodeKind::CharDev {
            major: 259,
            minor: 70_000,
        },
    });
    let dev = Device {
        tag: [b'a'; 64],
        blocks: 9000,
    };
    let bytes = write_image(&tree, &[dev], &ImageOptions::default()).unwrap();
    let img = Image::open(&bytes).unwrap();
    assert_eq!(img.devices().unwrap()[0].tag_str(), "a".repeat(64));
    assert_eq!(img.superblock().build_time, 1_000);
    let all = collect(&img);
    let names: Vec<&str> = all.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(names, ["/", "/!b", "/-a", "/f", "/hard", "/link", "/sub"]);
    let f = &all.iter().find(|(p, _)| p == "/f").unwrap().1;
    let hard = &all.iter().find(|(p, _)| p == "/hard").unwrap().1;
    assert_eq!(f.nid, hard.nid);
    assert!(f.raw.extended);
    assert_eq!(f.raw.nlink, 2);
    assert_eq!(f.raw.uid, 70_000);
    assert_eq!((f.mtime, f.mtime_nsec), (5, 7));
    assert_eq!(f.raw.mode, S_IFREG | 0o4755);
    let idx = img.chunk_indexes(f).unwrap();
    assert_eq!(idx.len(), 5121);
    assert_eq!(
        idx[4],
        ChunkIndex {
            device_id: 1,
            blkaddr: 4
        }
    );
    assert!(idx[5].is_hole());
    let mut x = img.xattrs(f).unwrap();
    x.sort();
    assert_eq!(x[2], (b"user.k".to_vec(), b"v".to_vec()));
    assert_eq!(x[0].0, b"security.capability");
    let root = &all[0].1;
    assert_eq!(root.raw.nlink, 3);
    assert!(!root.raw.extended);
    let l = &all.iter().find(|(p, _)| p == "/link").unwrap().1;
    assert_eq!(img.flat_data(l).unwrap(), b"../target");
    let c = &all.iter().find(|(p, _)| p == "/!b").unwrap().1;
    assert_eq!(c.rdev(), (259, 70_000));
    let sub = &all.iter().find(|(p, _)| p == "/sub").unwrap().1;
    let e = img.dir_entries(sub).unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!(e[1].nid, root.nid, "`..` of /sub is the root");
}

#[test]
fn wide_directory_spans_blocks_sorted() {
    let mut tree = Tree::default();
    let n = 5000;
    let mut entries = Vec::new();
    for i in 0..n {
        let name = format!("{}{:05}", if i % 3 == 0 { "-" } else { "f" }, i);
        entries.push((name.into_bytes(), 1 + i));
    }
    // A 255-byte name too.
    entries.push((vec![b'z'; 255], 1 + n));
    tree.nodes.push(Node {
        meta: meta(0o755),
        kind: NodeKind::Dir(entries),
    });
    for _ in 0..=n {
        tree.nodes.push(Node {
            meta: meta(0o644),
            kind: NodeKind::File(FileData::Inline(Vec::new())),
        });
    }
    let bytes = write_image(&tree, &[], &ImageOptions::default()).unwrap();
    let img = Image::open(&bytes).unwrap();
    let root = img.inode(img.root_nid()).unwrap();
    assert_eq!(root.raw.layout, LAYOUT_FLAT_PLAIN);
    let e = img.dir_entries(&root).unwrap();
    assert_eq!(e.len(), n + 3);
    assert!(e.windows(2).all(|w| w[0].name < w[1].name));
    assert_eq!(e.last().unwrap().name, vec![b'z'; 255]);
}

#[test]
fn inline_files_and_plain_fallback() {
    let mut tree = Tree::default();
    tree.nodes.push(Node {
        meta: meta(0o755),
        kind: dir(vec![("small", 1), ("big", 2)]),
    });
    tree.nodes.push(Node {
        meta: meta(0o644),
        kind: NodeKind::File(FileData::Inline(b"hello".to_vec())),
    });
    let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    tree.nodes.push(Node {
        meta: meta(0o644),
        kind: NodeKind::File(FileData::Inline(big.clone())),
    });
    let bytes = write_image(&tree, &[], &ImageOptions::default()).unwrap();
    let img = Image::open(&bytes).unwrap();
    let all = collect(&img);
    let small = &all.iter().find(|(p, _)| p == "/small").unwrap().1;
    assert_eq!(small.raw.layout, LAYOUT_FLAT_INLINE);
    assert_eq!(img.flat_data(small).unwrap(), b"hello");
    let b = &all.iter().find(|(p, _)| p == "/big").unwrap().1;
    assert_eq!(b.raw.layout, LAYOUT_FLAT_PLAIN);
    assert_eq!(img.flat_data(b).unwrap(), big);
}

#[test]
fn corrupt_images_are_errors_not_panics() {
    let mut tree = Tree::default();
    tree.nodes.push(Node {
        meta: meta(0o755),
        kind: dir(vec![("a", 1)]),
    });
    tree.nodes.push(Node {
        meta: meta(0o644),
        kind: NodeKind::Symlink(b"x".to_vec()),
    });
    let bytes = write_image(&tree, &[], &ImageOptions::default()).unwrap();
    // Flip each byte of the first two blocks in turn; parsing must never panic.
    for i in 0..bytes.len().min(8192) {
        let mut b = bytes.clone();
        b[i] ^= 0x5a;
        if let Ok(img) = Image::open(&b) {
            let _ = img.walk(&mut |_, i| img.xattrs(i).map(|_| ()));
        }
    }
    let mut b = bytes.clone();
    b[1024 + 40] ^= 1;
    assert!(matches!(
        Image::open(&b),
        Err(ErofsError::BadChecksum { .. })
    ));
}

#[test]
fn rejects_bad_names_and_unknown_xattrs() {
    let mut tree = Tree::default();
    tree.nodes.push(Node {
        meta: meta(0o755),
        kind: NodeKind::Dir(vec![(vec![b'x'; 256], 1)]),
    });
    tree.nodes.push(Node {
        meta: meta(0o644),
        kind: NodeKind::Fifo,
    });
    assert!(matches!(
        write_image(&tree, &[], &ImageOptions::default()),
        Err(ErofsError::BadName { .. })
    ));
    tree.nodes[0].kind = dir(vec![("ok", 1)]);
    tree.nodes[1]
        .meta
        .xattrs
        .push((b"system.weird".to_vec(), vec![]));
    assert!(matches!(
        write_image(&tree, &[], &ImageOptions::default()),
        Err(ErofsError::Unsupported { .. })
    ));
}
