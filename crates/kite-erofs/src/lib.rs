//! EROFS on-disk format for kite: a writer and a reader, no I/O policy.
//!
//! kite writes uncompressed EROFS images with 4 KiB blocks whose regular
//! files are chunk-based with 8-byte indexes pointing into extra devices
//! (the data blobs). This crate owns the byte layout and nothing else: it
//! never opens files, knows nothing of blobs' contents, tokio or the kernel.
//! The running kernel is the final judge of the format; see the host mount
//! tests and `kernel-notes/erofs-format.md`.

#![forbid(unsafe_code)]

pub mod check;
pub mod ondisk;
pub mod reader;
pub mod writer;

pub use ondisk::{ChunkIndex, DeviceSlot, BLOCK_SIZE};
pub use reader::{DirEntry, Image, Inode};
pub use writer::{
    write_image, Device, FileData, ImageOptions, Metadata, Node, NodeId, NodeKind, Tree,
};

/// Errors from encoding or decoding an EROFS image.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("EROFS {what} truncated: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("not an EROFS image (magic {0:#010x})")]
    BadMagic(u32),
    #[error(
        "EROFS superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    BadChecksum { stored: u32, computed: u32 },
    #[error("corrupt EROFS image: {0}")]
    Corrupt(String),
    #[error("unsupported by kite's EROFS writer/reader (node {node}): {what}")]
    Unsupported { node: usize, what: String },
    #[error("invalid name {name:?} in directory node {dir}")]
    BadName { dir: usize, name: String },
}
