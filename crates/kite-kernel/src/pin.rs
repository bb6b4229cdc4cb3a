//! Keeping a file's pages in memory: a read-only shared mapping locked with
//! mlock(2). The daemon pins each mounted image's bootstrap this way on the
//! fanotify path, where file-backed EROFS reads its metadata through the
//! bootstrap file's page cache: locked pages are never evicted (not by
//! memory pressure, not by `drop_caches`), so `stat`, `readdir` and lookups
//! never wait for the disk. The mapping is never read through; it exists
//! only to hold the lock.

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::{mlock, mmap, munlock, munmap, MapFlags, ProtFlags};

/// A file whose page-cache pages are locked in memory until dropped.
pub struct PinnedFile {
    addr: NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is never dereferenced; the pointer is only handed
// back to munlock/munmap in Drop, which is sound from any thread.
unsafe impl Send for PinnedFile {}
// SAFETY: as above; `&PinnedFile` gives no access to the memory.
unsafe impl Sync for PinnedFile {}

impl PinnedFile {
    /// Map all of `file` and lock its pages (reading them in if needed).
    /// Needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK.
    pub fn pin(file: &File) -> io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::other("file too large to pin"))?;
        let Some(nz) = NonZeroUsize::new(len) else {
            return Err(io::Error::other("cannot pin an empty file"));
        };
        // SAFETY: a new shared read-only mapping chosen by the kernel (no
        // address hint, so nothing existing is replaced). It is never read
        // or written through, so changes to the file cannot cause UB here.
        let addr = unsafe {
            mmap(
                None,
                nz,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                file,
                0,
            )
        }
        .map_err(io::Error::from)?;
        // SAFETY: `addr`/`len` are exactly the mapping created above.
        if let Err(e) = unsafe { mlock(addr, len) } {
            // SAFETY: unmapping the mapping created above, used nowhere else.
            let _ = unsafe { munmap(addr, len) };
            return Err(io::Error::from(e));
        }
        Ok(Self { addr, len })
    }

    /// Bytes locked.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedFile {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are the mapping created in `pin`, locked
        // there, unmapped only here, and never dereferenced.
        unsafe {
            let _ = munlock(self.addr, self.len);
            let _ = munmap(self.addr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pins_and_reports_the_length() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; 3 * 4096 + 5]).unwrap();
        match PinnedFile::pin(f.as_file()) {
            Ok(p) => assert_eq!(p.len(), 3 * 4096 + 5),
            // Unprivileged runs may hit RLIMIT_MEMLOCK; the error is clear.
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(PinnedFile::pin(empty.as_file()).is_err());
    }
}
