//! Cache-file writes through io_uring, on one dedicated thread.
//!
//! Cache files are opened O_DIRECT by the kernel, so every write needs a
//! page-aligned buffer, offset and length: [`AlignedBuf`] provides the
//! buffer without unsafe allocation (an over-sized Vec and an aligned window
//! into it). The [`Writer`] thread owns an io_uring; each operation owns its
//! buffer and its fd until the kernel reports completion. If the caller's
//! future is dropped (cancelled), the thread still holds the buffer until
//! the completion arrives and only then frees it: the kernel never writes
//! from freed memory. Where io_uring is unavailable the same thread falls
//! back to pwrite.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::oneshot;

/// Page size assumed for O_DIRECT alignment.
pub const PAGE: usize = 4096;

/// A zero-initialised, page-aligned byte buffer.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

/// Storage of dropped large buffers, reused by [`AlignedBuf::with_zero_tail`]
/// so a stream of chunk buffers does not fault in and zero fresh pages for
/// every chunk.
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// Buffers smaller than this are not pooled.
const POOL_MIN: usize = 64 << 10;
/// At most this many buffers wait in the pool.
const POOL_MAX_BUFFERS: usize = 48;

impl AlignedBuf {
    /// `len` bytes of zeros, page-aligned. `len` should be a page multiple
    /// for O_DIRECT writes.
    pub fn zeroed(len: usize) -> Self {
        let storage = vec![0u8; len + PAGE];
        let start = storage.as_ptr().align_offset(PAGE);
        debug_assert!(start < PAGE);
        Self {
            storage,
            start,
            len,
        }
    }

    /// `len` bytes, page-aligned, of which `[head..len]` are zeros and
    /// `[..head]` hold old bytes the caller must overwrite before use (for
    /// a chunk decoded into the head and written with its zero padding).
    /// Large buffers come from a pool of dropped ones.
    pub fn with_zero_tail(len: usize, head: usize) -> Self {
        let need = len + PAGE;
        if len >= POOL_MIN {
            let reused = POOL.lock().ok().and_then(|mut pool| {
                let i = pool
                    .iter()
                    .position(|v| v.len() >= need && v.len() <= need * 2)?;
                Some(pool.swap_remove(i))
            });
            if let Some(storage) = reused {
                let start = storage.as_ptr().align_offset(PAGE);
                let mut b = Self {
                    storage,
                    start,
                    len,
                };
                let h = head.min(len);
                b.as_mut_slice()[h..].fill(0);
                return b;
            }
        }
        Self::zeroed(len)
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
    fn as_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len < POOL_MIN {
            return;
        }
        if let Ok(mut pool) = POOL.lock() {
            if pool.len() < POOL_MAX_BUFFERS {
                pool.push(std::mem::take(&mut self.storage));
            }
        }
    }
}

struct Op {
    fd: Arc<OwnedFd>,
    off: u64,
    buf: AlignedBuf,
    done: oneshot::Sender<io::Result<()>>,
}

/// Submits writes to the writer thread.
pub struct Writer {
    tx: mpsc::Sender<Op>,
    /// "io_uring" or "pwrite".
    pub mode: &'static str,
}

impl Writer {
    /// Start the writer thread, with io_uring if the kernel has it.
    pub fn start() -> Arc<Writer> {
        let (tx, rx) = mpsc::channel::<Op>();
        let ring = io_uring::IoUring::new(256).ok();
        let mode = if ring.is_some() { "io_uring" } else { "pwrite" };
        std::thread::Builder::new()
            .name("kite-uring".into())
            .spawn(move || match ring {
                Some(r) => uring_loop(r, rx),
                None => pwrite_loop(rx),
            })
            .expect("spawn writer thread");
        Arc::new(Writer { tx, mode })
    }

    /// Queue a write of `buf` at `off`; the receiver yields its result.
    pub fn submit(
        &self,
        fd: Arc<OwnedFd>,
        off: u64,
        buf: AlignedBuf,
    ) -> oneshot::Receiver<io::Result<()>> {
        let (done, rx) = oneshot::channel();
        if let Err(mpsc::SendError(op)) = self.tx.send(Op { fd, off, buf, done }) {
            let _ = op.done.send(Err(io::Error::other("writer thread stopped")));
        }
        rx
    }
}

fn pwrite_loop(rx: mpsc::Receiver<Op>) {
    for op in rx {
        let r = pwrite_all(&op.fd, op.off, op.buf.as_slice());
        let _ = op.done.send(r);
    }
}

fn pwrite_all(fd: &OwnedFd, mut off: u64, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = nix::sys::uio::pwrite(fd, data, off as i64).map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "cache write wrote nothing",
            ));
        }
        data = &data[n..];
        off += n as u64;
    }
    Ok(())
}

/// Operations in flight at most: well under the completion queue's size,
/// so completions can never overflow it.
const MAX_INFLIGHT: usize = 128;

fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

fn uring_loop(mut ring: io_uring::IoUring, rx: mpsc::Receiver<Op>) {
    let mut inflight: HashMap<u64, Op> = HashMap::new();
    let mut next_id = 0u64;
    let mut open = true;
    loop {
        // Gather new work: block only when nothing is in flight.
        let mut new = Vec::new();
        if inflight.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(op) => new.push(op),
                Err(_) => return,
            }
        }
        while inflight.len() + new.len() < MAX_INFLIGHT {
            match rx.try_recv() {
                Ok(op) => new.push(op),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        for op in new {
            let id = next_id;
            next_id += 1;
            let Ok(len) = u32::try_from(op.buf.len()) else {
                let _ = op
                    .done
                    .send(Err(io::Error::other("write larger than 4 GiB")));
                continue;
            };
            let entry = io_uring::opcode::Write::new(
                io_uring::types::Fd(op.fd.as_raw_fd()),
                op.buf.as_ptr(),
                len,
            )
            .offset(op.off)
            .build()
            .user_data(id);
            inflight.insert(id, op);
            loop {
                // SAFETY: the buffer pointer and the fd stay valid until the
                // completion for `id` is reaped, because the Op owning both
                // stays in `inflight` until then (even if the submitter has
                // gone away).
                let pushed = unsafe { ring.submission().push(&entry) };
                if pushed.is_ok() {
                    break;
                }
                // Queue full: hand what we have to the kernel and retry.
                if let Err(e) = ring.submit() {
                    if transient(&e) {
                        continue;
                    }
                    fail_all(&mut inflight, &e);
                    return;
                }
            }
        }
        if inflight.is_empty() {
            continue;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            // EBUSY: completions must be reaped first, which happens below.
            if !transient(&e) {
                fail_all(&mut inflight, &e);
                return;
            }
        }
        for cqe in ring.completion() {
            let Some(op) = inflight.remove(&cqe.user_data()) else {
                continue;
            };
            let res = cqe.result();
            let r = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if res as usize != op.buf.len() {
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short cache write: {res} of {} bytes", op.buf.len()),
                ))
            } else {
                Ok(())
            };
            // The buffer is freed here, after the kernel is done with it.
            let _ = op.done.send(r);
        }
    }
}

fn fail_all(inflight: &mut HashMap<u64, Op>, e: &io::Error) {
    // The ring is unusable; completions will never be reaped. Leak the
    // buffers rather than free memory the kernel may still write from.
    for (_, op) in inflight.drain() {
        let _ = op
            .done
            .send(Err(io::Error::other(format!("io_uring failed: {e}"))));
        std::mem::forget(op.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        for len in [0, 4096, 3 * 4096] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_slice().as_ptr() as usize % PAGE, 0);
            let mut big = AlignedBuf::with_zero_tail(POOL_MIN * 2, 10);
            big.as_mut_slice().fill(9);
            drop(big);
            // Reused or fresh, the tail is zero and the buffer aligned.
            let again = AlignedBuf::with_zero_tail(POOL_MIN * 2, 100);
            assert_eq!(again.as_slice().as_ptr() as usize % PAGE, 0);
            assert!(again.as_slice()[100..].iter().all(|&x| x == 0));
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(7);
            assert_eq!(b.len(), len);
        }
    }

    #[tokio::test]
    async fn writes_land_and_dropped_waiters_are_harmless() {
        let dir = std::env::temp_dir().join(format!("kite-uring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let file = std::fs::File::create(&path).unwrap();
        let fd: OwnedFd = file.into();
        let fd = Arc::new(fd);
        let w = Writer::start();
        let mut bufs = Vec::new();
        for i in 0..8u8 {
            let mut b = AlignedBuf::zeroed(PAGE);
            b.as_mut_slice().fill(b'a' + i);
            bufs.push(w.submit(Arc::clone(&fd), i as u64 * PAGE as u64, b));
        }
        // Drop half of the waiters before completion: the writes still land.
        let kept: Vec<_> = bufs.into_iter().step_by(2).collect();
        for rx in kept {
            rx.await.unwrap().unwrap();
        }
        // A final write after all others, awaited, orders the check.
        let mut b = AlignedBuf::zeroed(PAGE);
        b.as_mut_slice().fill(b'z');
        w.submit(Arc::clone(&fd), 8 * PAGE as u64, b)
            .await
            .unwrap()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 9 * PAGE);
        for i in 0..8 {
            assert!(data[i * PAGE..(i + 1) * PAGE]
                .iter()
                .all(|&c| c == b'a' + i as u8));
        }
        // A bad fd reports an error instead of hanging.
        let bad: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let bad = Arc::new(bad);
        assert!(w
            .submit(bad, 0, AlignedBuf::zeroed(PAGE))
            .await
            .unwrap()
            .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
