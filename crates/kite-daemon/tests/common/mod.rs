//! Shared by the simulated-kernel tests: a converted one-layer fixture
//! and a backend that can be slowed down, corrupted or failed.

#![allow(dead_code)]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kite_daemon::backend::{Backend, Counters, FetchError, FetchFuture, LocalDir};
use kite_format::Digest;

/// Wraps a backend: counts calls, can delay, corrupt or fail.
pub struct TestBackend {
    pub inner: LocalDir,
    pub calls: AtomicU64,
    pub delay: Duration,
    pub corrupt: bool,
    pub fail: bool,
    /// Panic inside the fetch (a backend bug).
    pub panic: bool,
}

impl Backend for TestBackend {
    fn fetch(&self, blob: Digest, range: Range<u64>) -> FetchFuture<'_> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            if self.panic {
                panic!("backend bug");
            }
            if self.fail {
                return Err(FetchError::Failed {
                    blob,
                    start: range.start,
                    end: range.end,
                    why: "backend down".into(),
                });
            }
            let mut f = self.inner.fetch(blob, range).await?;
            if self.corrupt {
                let mut v = f.bytes.to_vec();
                let last = v.len() - 1;
                v[last] ^= 0x55;
                f.bytes = Bytes::from(v);
            }
            Ok(f)
        })
    }
    fn counters(&self) -> &Counters {
        self.inner.counters()
    }
    fn describe(&self) -> String {
        "test".into()
    }
}

pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub conv: PathBuf,
    pub bootstrap: Vec<u8>,
    pub blob: Digest,
    pub raw: Vec<u8>,
}

/// Convert the files `write` puts in a source directory into a one-layer
/// image, and unpack its blob's uncompressed layout.
pub fn fixture_of(write: impl FnOnce(&std::path::Path)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write(&src);
    let conv = dir.path().join("conv");
    kite_convert::convert(
        &kite_convert::Source::Dir(src),
        &conv,
        &kite_convert::ConvertOptions::default(),
        &kite_convert::NoProgress,
    )
    .unwrap();
    let bootstrap = std::fs::read(conv.join("bootstrap")).unwrap();
    let bs = kite_format::Bootstrap::parse(&bootstrap).unwrap();
    let blob = bs.index.blob(0).record.digest;
    let raw_path = dir.path().join("raw");
    kite_convert::inspect::unpack(
        &bootstrap,
        &conv.join("blobs/sha256").join(blob.hex()),
        &raw_path,
    )
    .unwrap();
    let raw = std::fs::read(&raw_path).unwrap();
    Fixture {
        _dir: dir,
        conv,
        bootstrap,
        blob,
        raw,
    }
}

/// A one-layer image of 20 small files f00..f19 (one 4 KiB-aligned chunk
/// each, at i * 4096 in the blob).
pub fn fixture_small_files() -> Fixture {
    fixture_of(|src| {
        for i in 0..20u8 {
            std::fs::write(
                src.join(format!("f{i:02}")),
                vec![b'a' + i; 1000 + usize::from(i)],
            )
            .unwrap();
        }
    })
}

/// A one-layer image with a 3 MiB file (3 chunks of 1 MiB) and a small file.
pub fn fixture() -> Fixture {
    fixture_of(|src| {
        // xorshift64: no period within the file, so no chunk dedups away.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let big: Vec<u8> = (0..3u32 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8 & 0x3f
            })
            .collect();
        std::fs::write(src.join("big"), &big).unwrap();
        std::fs::write(src.join("small"), b"hello").unwrap();
    })
}

pub fn backend(conv: &Path) -> TestBackend {
    TestBackend {
        inner: LocalDir::new(conv.to_path_buf()),
        calls: AtomicU64::new(0),
        delay: Duration::ZERO,
        corrupt: false,
        fail: false,
        panic: false,
    }
}
