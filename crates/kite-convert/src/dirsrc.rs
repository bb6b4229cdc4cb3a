//! `dir:PATH` sources: a plain directory read as a one-layer image.
//!
//! Entries are visited in sorted order so conversion is reproducible;
//! hardlinks are recognised by (device, inode). Extended attributes of the
//! directory's files are not read (std has no xattr API); use an OCI layout
//! when xattrs matter.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use kite_erofs::Metadata;

use crate::layer::{Applier, EntryError, EntryKind};
use crate::{ConvertError, Progress};

/// Apply the tree under `root` as one layer. Returns bytes of file data.
pub(crate) fn apply_dir(
    root: &Path,
    app: &mut Applier<'_>,
    progress: &dyn Progress,
) -> Result<u64, ConvertError> {
    let label = format!("dir:{}", root.display());
    let md = fs::symlink_metadata(root).map_err(|e| ConvertError::io(root, e))?;
    if !md.is_dir() {
        return Err(ConvertError::io(
            root,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let before = app.file_bytes;
    apply_one(root, b"", &md, app, &mut links, &label, progress)?;
    let mut stack = vec![(root.to_path_buf(), Vec::<u8>::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| ConvertError::io(&dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| ConvertError::io(&dir, e))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let mut r = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(name.as_bytes());
            let md = fs::symlink_metadata(&path).map_err(|e| ConvertError::io(&path, e))?;
            apply_one(&path, &r, &md, app, &mut links, &label, progress)?;
            if md.is_dir() {
                subdirs.push((path, r));
            }
        }
        // Visit subdirectories in name order (the stack pops the last first).
        stack.extend(subdirs.into_iter().rev());
    }
    if let Err((name, e)) = app.finish() {
        finish(Err(EntryError::Bad(e.0)), &label, &name)?;
    }
    Ok(app.file_bytes - before)
}

fn apply_one(
    path: &Path,
    rel: &[u8],
    md: &fs::Metadata,
    app: &mut Applier<'_>,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
    label: &str,
    progress: &dyn Progress,
) -> Result<(), ConvertError> {
    let ft = md.file_type();
    let meta = Metadata {
        perm: (md.mode() & 0o7777) as u16,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime().max(0) as u64,
        mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
        xattrs: Vec::new(),
    };
    let rdev = md.rdev();
    let (major, minor) = (
        ((rdev >> 8) & 0xfff) as u32 | ((rdev >> 32) & !0xfff) as u32,
        (rdev & 0xff) as u32 | ((rdev >> 12) & !0xff) as u32,
    );
    let mut empty = std::io::empty();
    let mut file;
    let mut data: &mut dyn std::io::Read = &mut empty;
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        if md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            if let Some(first) = links.get(&key) {
                return finish(
                    app.apply(rel, EntryKind::Hardlink(first.clone()), meta, data),
                    label,
                    rel,
                );
            }
            links.insert(key, rel.to_vec());
        }
        file = fs::File::open(path).map_err(|e| ConvertError::io(path, e))?;
        progress.bytes(md.len());
        data = &mut file;
        EntryKind::File
    } else if ft.is_symlink() {
        let t = fs::read_link(path).map_err(|e| ConvertError::io(path, e))?;
        EntryKind::Symlink(t.as_os_str().as_bytes().to_vec())
    } else if ft.is_char_device() {
        EntryKind::Char(major, minor)
    } else if ft.is_block_device() {
        EntryKind::Block(major, minor)
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else {
        EntryKind::Socket
    };
    finish(app.apply(rel, kind, meta, data), label, rel)
}

fn finish(r: Result<(), EntryError>, label: &str, rel: &[u8]) -> Result<(), ConvertError> {
    let entry = String::from_utf8_lossy(rel).into_owned();
    match r {
        Ok(()) => Ok(()),
        Err(EntryError::Bad(why)) => Err(ConvertError::Entry {
            layer: label.to_string(),
            entry,
            why,
        }),
        Err(EntryError::Read(source)) => Err(ConvertError::Stream {
            layer: label.to_string(),
            at: format!(" reading file {entry:?}"),
            source,
        }),
        Err(EntryError::Fatal(e)) => Err(e),
    }
}
