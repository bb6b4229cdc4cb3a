//! The daemon's request handling against a simulated cachefiles kernel:
//! a scripted queue of OPEN/READ/CLOSE messages, and objects that record
//! every write and completion. No root, no kernel feature needed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{backend, fixture, fixture_of, fixture_small_files, Fixture, TestBackend};
use kite_daemon::backend::LocalDir;
use kite_daemon::daemon::Daemon;
use kite_daemon::registry::Registry;
use kite_daemon::serve;
use kite_format::Digest;
use kite_kernel::cachefiles::{CacheDevice, CacheObject, Request, WaitFuture, WriteFuture};
use kite_kernel::uring::AlignedBuf;
use kite_kernel::KernelError;
use tokio::sync::Notify;

#[derive(Default)]
struct SimKernel {
    queue: Mutex<VecDeque<Request>>,
    copens: Mutex<Vec<(u32, i64)>>,
    /// A `copen` for this msg_id fails, as when the mount was killed.
    fail_copen: Mutex<Option<u32>>,
    wake: Notify,
}

impl SimKernel {
    fn push(&self, r: Request) {
        self.queue.lock().unwrap().push_back(r);
        self.wake.notify_one();
    }
    fn copen_of(&self, msg_id: u32) -> Option<i64> {
        self.copens
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.0 == msg_id)
            .map(|c| c.1)
    }
}

impl CacheDevice for SimKernel {
    fn next_request(&self) -> Result<Option<Request>, KernelError> {
        Ok(self.queue.lock().unwrap().pop_front())
    }
    fn copen(&self, msg_id: u32, size: i64) -> Result<(), KernelError> {
        if *self.fail_copen.lock().unwrap() == Some(msg_id) {
            return Err(KernelError::Io {
                what: "copen".into(),
                source: std::io::Error::from_raw_os_error(22),
            });
        }
        self.copens.lock().unwrap().push((msg_id, size));
        Ok(())
    }
    fn wait(&self) -> WaitFuture<'_> {
        Box::pin(async move {
            self.wake.notified().await;
            Ok(())
        })
    }
}

/// A cache file in memory.
#[derive(Default)]
struct SimObject {
    writes: Mutex<BTreeMap<u64, Vec<u8>>>,
    completed: Mutex<Vec<u32>>,
    done: Notify,
    dropped: Arc<AtomicBool>,
}

impl SimObject {
    fn read(&self, off: u64, len: usize) -> Option<Vec<u8>> {
        let w = self.writes.lock().unwrap();
        for (&o, d) in w.range(..=off).rev() {
            if o <= off && off + len as u64 <= o + d.len() as u64 {
                let s = (off - o) as usize;
                return Some(d[s..s + len].to_vec());
            }
        }
        None
    }
    fn is_completed(&self, msg_id: u32) -> bool {
        self.completed.lock().unwrap().contains(&msg_id)
    }
    async fn wait_completed(&self, msg_id: u32) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !self.is_completed(msg_id) {
                let n = self.done.notified();
                if self.is_completed(msg_id) {
                    break;
                }
                n.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("READ {msg_id} never completed"));
    }
}

impl Drop for SimObject {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

impl CacheObject for SimObject {
    fn write_at(&self, off: u64, buf: AlignedBuf) -> WriteFuture {
        // The kernel's O_DIRECT rules.
        assert_eq!(off % 4096, 0, "unaligned offset");
        assert_eq!(buf.len() % 4096, 0, "unaligned length");
        assert_eq!(
            buf.as_slice().as_ptr() as usize % 4096,
            0,
            "unaligned buffer"
        );
        self.writes
            .lock()
            .unwrap()
            .insert(off, buf.as_slice().to_vec());
        Box::pin(async { Ok(()) })
    }
    fn target(&self) -> u64 {
        self as *const SimObject as u64
    }
    fn complete_read(&self, msg_id: u32) -> std::io::Result<()> {
        let mut c = self.completed.lock().unwrap();
        assert!(!c.contains(&msg_id), "READ {msg_id} completed twice");
        c.push(msg_id);
        self.done.notify_waiters();
        Ok(())
    }
}

fn setup(f: &Fixture, backend: TestBackend) -> (Arc<Daemon>, Arc<SimKernel>, Arc<TestBackend>) {
    setup_with(f, backend, 0)
}

fn setup_with(
    f: &Fixture,
    backend: TestBackend,
    readahead: usize,
) -> (Arc<Daemon>, Arc<SimKernel>, Arc<TestBackend>) {
    setup_profiled(f, backend, readahead, &[])
}

fn open(kernel: &SimKernel, msg_id: u32, object_id: u32, cookie: &str) -> Arc<SimObject> {
    let obj = Arc::new(SimObject::default());
    kernel.push(Request::Open {
        msg_id,
        object_id,
        volume_key: b"erofs,kite".to_vec(),
        cookie_key: cookie.as_bytes().to_vec(),
        object: obj.clone(),
    });
    obj
}

fn read(kernel: &SimKernel, msg_id: u32, object_id: u32, off: u64, len: u64) {
    kernel.push(Request::Read {
        msg_id,
        object_id,
        off,
        len,
    });
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn open_read_close_sequence() {
    let f = fixture();
    let (daemon, kernel, _) = setup(&f, backend(&f.conv));
    let fsid = Digest::of(&f.bootstrap).hex();
    let boot = open(&kernel, 1, 10, &fsid);
    let blob = open(&kernel, 2, 11, &f.blob.hex());
    settle().await;
    assert_eq!(
        kernel.copen_of(1),
        Some(kite_format::align4k(f.bootstrap.len() as u64) as i64)
    );
    assert_eq!(kernel.copen_of(2), Some(f.raw.len() as i64));

    read(&kernel, 3, 10, 0, 8192);
    boot.wait_completed(3).await;
    assert_eq!(boot.read(0, 8192).unwrap(), f.bootstrap[..8192]);

    // A READ inside the second chunk gets the whole chunk written.
    read(&kernel, 4, 11, (1 << 20) + 65536, 65536);
    blob.wait_completed(4).await;
    assert_eq!(
        blob.read(1 << 20, 1 << 20).unwrap(),
        f.raw[1 << 20..2 << 20]
    );
    assert!(
        blob.read(0, 4096).is_none(),
        "only the needed chunk is fetched"
    );

    let dropped = blob.dropped.clone();
    drop(blob);
    kernel.push(Request::Close {
        msg_id: 5,
        object_id: 11,
    });
    settle().await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "CLOSE must release the object's fd"
    );
    assert_eq!(daemon.open_objects(), 1);
}

#[tokio::test]
async fn unknown_cookie_gets_negative_copen() {
    let f = fixture();
    let (daemon, kernel, _) = setup(&f, backend(&f.conv));
    let obj = open(&kernel, 7, 1, &"f".repeat(64));
    let dropped = obj.dropped.clone();
    drop(obj);
    settle().await;
    assert_eq!(kernel.copen_of(7), Some(-2));
    assert_eq!(daemon.open_objects(), 0);
    assert!(
        dropped.load(Ordering::SeqCst),
        "refused object's fd is closed"
    );
}

#[tokio::test]
async fn concurrent_reads_of_one_chunk_fetch_once() {
    let f = fixture();
    let mut b = backend(&f.conv);
    b.delay = Duration::from_millis(200);
    let (_, kernel, backend) = setup(&f, b);
    let blob = open(&kernel, 1, 1, &f.blob.hex());
    settle().await;
    for i in 0..8u32 {
        read(&kernel, 100 + i, 1, i as u64 * 4096, 4096);
        if i == 3 {
            // Half arrive in a later batch, while the fetch is in flight.
            settle().await;
        }
    }
    for i in 0..8u32 {
        blob.wait_completed(100 + i).await;
    }
    assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
    assert_eq!(blob.read(0, 1 << 20).unwrap(), f.raw[..1 << 20]);
}

#[tokio::test]
async fn adjacent_chunks_in_one_batch_are_one_request() {
    let f = fixture();
    let (_, kernel, backend) = setup(&f, backend(&f.conv));
    let blob = open(&kernel, 1, 1, &f.blob.hex());
    settle().await;
    {
        // Queue three READs for three adjacent chunks before the loop runs.
        let mut q = kernel.queue.lock().unwrap();
        for i in 0..3u64 {
            q.push_back(Request::Read {
                msg_id: 10 + i as u32,
                object_id: 1,
                off: i << 20,
                len: 4096,
            });
        }
    }
    kernel.wake.notify_one();
    for i in 0..3 {
        blob.wait_completed(10 + i).await;
    }
    assert_eq!(
        backend.calls.load(Ordering::SeqCst),
        1,
        "three adjacent chunks, one range request"
    );
    assert!(blob.read(0, 3 << 20).is_none(), "written per chunk");
    for i in 0..3u64 {
        assert_eq!(
            blob.read(i << 20, 1 << 20).unwrap(),
            f.raw[(i << 20) as usize..((i + 1) << 20) as usize]
        );
    }
}

#[tokio::test]
async fn readahead_follows_large_files_and_sequential_runs_not_small_files() {
    let f = fixture();
    let (_, kernel, backend) = setup_with(&f, backend(&f.conv), 1);
    let blob = open(&kernel, 1, 1, &f.blob.hex());
    settle().await;
    // Chunks: 0-2 are the 3 MiB file "big" (full 1 MiB chunks), 3 is the
    // 5-byte file "small". A miss in the small file fetches just it.
    read(&kernel, 2, 1, 3 << 20, 4096);
    blob.wait_completed(2).await;
    settle().await;
    assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
    assert!(
        blob.read(2 << 20, 4096).is_none(),
        "a small file's miss read ahead"
    );
    // A miss at the start of the large file (nothing before it fetched):
    // the next chunk of that file comes along, in the same request.
    read(&kernel, 3, 1, 0, 4096);
    blob.wait_completed(3).await;
    settle().await;
    assert_eq!(backend.calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        blob.read(1 << 20, 1 << 20).unwrap(),
        f.raw[1 << 20..2 << 20]
    );
    assert!(
        blob.read(2 << 20, 4096).is_none(),
        "read beyond the readahead"
    );
    // A miss right after fetched chunks (sequential): fetched, one request.
    read(&kernel, 4, 1, 2 << 20, 4096);
    blob.wait_completed(4).await;
    settle().await;
    assert_eq!(backend.calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        blob.read(2 << 20, 1 << 20).unwrap(),
        f.raw[2 << 20..3 << 20]
    );
}

#[tokio::test]
async fn a_burst_of_small_file_misses_fetches_the_next_small_files_along() {
    let f = fixture_small_files();
    let (_, kernel, backend) = setup_with(&f, backend(&f.conv), 4);
    let blob = open(&kernel, 1, 1, &f.blob.hex());
    settle().await;
    // One isolated small read: just its chunk.
    read(&kernel, 2, 1, 2 * 4096, 100);
    blob.wait_completed(2).await;
    settle().await;
    assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
    assert!(
        blob.read(3 * 4096, 100).is_none(),
        "an isolated small read fetched more"
    );
    // A second miss nearby, right after: a burst. The following small
    // files come in the same request.
    read(&kernel, 3, 1, 10 * 4096, 100);
    blob.wait_completed(3).await;
    settle().await;
    assert_eq!(backend.calls.load(Ordering::SeqCst), 2);
    for i in 11..20u64 {
        let at = i as usize * 4096;
        assert_eq!(
            blob.read(i * 4096, 1000).unwrap(),
            f.raw[at..at + 1000],
            "file f{i:02} not fetched along"
        );
    }
    assert!(blob.read(5 * 4096, 100).is_none(), "fetched backwards");
}

#[tokio::test]
async fn corrupt_chunk_is_completed_without_data() {
    let f = fixture();
    let mut b = backend(&f.conv);
    b.corrupt = true;
    let (daemon, kernel, _) = setup(&f, b);
    let blob = open(&kernel, 1, 1, &f.blob.hex());
    settle().await;
    read(&kernel, 2, 1, 0, 4096);
    blob.wait_completed(2).await;
    assert!(
        blob.writes.lock().unwrap().is_empty(),
        "corrupt bytes must never reach the cache"
    );
    assert_eq!(daemon.stats.reads_failed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn backend_error_is_completed_without_data() {
    let f = fixture();
    let mut b = backend(&f.conv);
    b.fail = true;
    let (_, kernel, _) = setup(&f, b);
    let blob = open(&kernel, 1, 1, &f.blob.hex());
    settle().await;
    read(&kernel, 2, 1, 2 << 20, 4096);
    blob.wait_completed(2).await;
    assert!(blob.writes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_retried_failed_range_fails_at_once_without_refetching() {
    let f = fixture();
    let mut b = backend(&f.conv);
    b.fail = true;
    b.delay = Duration::from_millis(300);
    let (_, kernel, backend) = setup(&f, b);
    let blob = open(&kernel, 1, 1, &f.blob.hex());
    settle().await;
    read(&kernel, 2, 1, 0, 4096);
    blob.wait_completed(2).await;
    // The kernel retries the range: answered at once, no second fetch.
    let t = std::time::Instant::now();
    read(&kernel, 3, 1, 0, 4096);
    blob.wait_completed(3).await;
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "retry waited {:?}",
        t.elapsed()
    );
    assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
    assert!(blob.writes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn malformed_messages_are_still_answered() {
    let f = fixture();
    let (_, kernel, _) = setup(&f, backend(&f.conv));
    let blob = open(&kernel, 1, 1, &f.blob.hex());
    kernel.push(Request::Malformed {
        msg_id: 5,
        opcode: 0,
        object_id: 9,
        error: kite_kernel::cachefiles::ProtoError::Short(3),
    });
    kernel.push(Request::Malformed {
        msg_id: 6,
        opcode: 2,
        object_id: 1,
        error: kite_kernel::cachefiles::ProtoError::Short(3),
    });
    settle().await;
    assert_eq!(kernel.copen_of(5), Some(-22));
    blob.wait_completed(6).await;
}

#[tokio::test]
async fn a_failed_copen_neither_stops_the_loop_nor_keeps_the_object() {
    let f = fixture();
    let (daemon, kernel, _) = setup(&f, backend(&f.conv));
    *kernel.fail_copen.lock().unwrap() = Some(1);
    let dead = open(&kernel, 1, 1, &f.blob.hex());
    let dropped = dead.dropped.clone();
    drop(dead);
    let blob = open(&kernel, 2, 2, &f.blob.hex());
    settle().await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "the failed OPEN's object must be released"
    );
    assert_eq!(kernel.copen_of(2), Some(f.raw.len() as i64));
    assert_eq!(daemon.open_objects(), 1);
    read(&kernel, 3, 2, 0, 4096);
    blob.wait_completed(3).await;
    assert!(blob.read(0, 4096).is_some(), "the loop kept serving");
}

#[tokio::test]
async fn a_panicking_fetch_still_completes_the_read_and_can_be_retried() {
    let f = fixture();
    let mut b = backend(&f.conv);
    b.panic = true;
    let (daemon, kernel, _) = setup(&f, b);
    let blob = open(&kernel, 1, 1, &f.blob.hex());
    settle().await;
    read(&kernel, 2, 1, 0, 4096);
    blob.wait_completed(2).await;
    assert!(blob.writes.lock().unwrap().is_empty());
    assert_eq!(daemon.stats.reads_failed.load(Ordering::SeqCst), 1);
    // Not stuck "in flight": a new READ starts a new fetch (and fails again).
    read(&kernel, 3, 1, 0, 4096);
    blob.wait_completed(3).await;
    assert_eq!(daemon.stats.reads_failed.load(Ordering::SeqCst), 2);
}

#[test]
fn bootstrap_with_bad_index_checksum_is_refused() {
    let f = fixture();
    let mut bad = f.bootstrap.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let mut reg = Registry::new(None);
    let err = reg
        .register(
            bad,
            Arc::new(LocalDir::new(f.conv.clone())),
            Duration::from_secs(1),
            "bad".into(),
        )
        .err()
        .expect("refused");
    assert!(err.to_string().contains("checksum"), "{err}");
}

/// The daemon serving a simulated kernel, the fixture registered, and (if
/// `chunks` is not empty) a prefetch profile of blob 0's `chunks` queued.
fn setup_profiled(
    f: &Fixture,
    backend: TestBackend,
    readahead: usize,
    chunks: &[u32],
) -> (Arc<Daemon>, Arc<SimKernel>, Arc<TestBackend>) {
    use kite_format::prefetch::{Entry, Profile};
    let backend = Arc::new(backend);
    let mut reg = Registry::new(None);
    reg.readahead = readahead;
    let img = reg
        .register(
            f.bootstrap.clone(),
            backend.clone(),
            Duration::from_secs(5),
            "test".into(),
        )
        .unwrap();
    if !chunks.is_empty() {
        let profile = Profile {
            bootstrap: Digest::of(&f.bootstrap),
            entries: chunks
                .iter()
                .map(|&chunk| Entry { blob: 0, chunk })
                .collect(),
        };
        let parsed = kite_format::Bootstrap::parse(&f.bootstrap).unwrap();
        let profile =
            Profile::parse_for(&profile.encode(), &Digest::of(&f.bootstrap), &parsed).unwrap();
        img.queue_prefetch(&profile);
    }
    let daemon = Daemon::new(reg, 4 << 20);
    let kernel = Arc::new(SimKernel::default());
    let d = Arc::clone(&daemon);
    let k: Arc<dyn CacheDevice> = kernel.clone();
    tokio::spawn(async move { serve::serve(d, k).await });
    (daemon, kernel, backend)
}

#[tokio::test]
async fn a_profile_is_prefetched_once_the_kernel_opens_the_blob() {
    let f = fixture();
    // Chunks: 0-2 the 3 MiB file, 3 the small file. The profile lists the
    // small file, then the large file's first chunk.
    let (daemon, kernel, backend) = setup_profiled(&f, backend(&f.conv), 4, &[3, 0]);
    settle().await;
    assert_eq!(
        backend.calls.load(Ordering::SeqCst),
        0,
        "fetched before any OPEN"
    );
    let obj = open(&kernel, 1, 1, &f.blob.hex());
    let state = daemon.registry.lock().unwrap().blob(&f.blob).unwrap();
    let t = std::time::Instant::now();
    while state.prefetched_chunks.load(Ordering::SeqCst) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "profile not prefetched"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    settle().await;
    // No READ was sent: both chunks are in the cache file, verified, and
    // nothing else (no readahead from a prefetch); two runs, two requests.
    assert_eq!(obj.read(3 << 20, 5).unwrap(), f.raw[3 << 20..(3 << 20) + 5]);
    assert_eq!(obj.read(0, 1 << 20).unwrap(), f.raw[..1 << 20]);
    assert!(obj.read(1 << 20, 4096).is_none());
    assert!(obj.read(2 << 20, 4096).is_none());
    assert_eq!(backend.calls.load(Ordering::SeqCst), 2);
    assert_eq!(state.fetched_chunks.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_read_of_a_profiled_chunk_joins_the_prefetch_and_adds_no_readahead() {
    let f = fixture();
    let mut b = backend(&f.conv);
    b.delay = Duration::from_millis(300);
    let (_, kernel, backend) = setup_profiled(&f, b, 4, &[0]);
    let obj = open(&kernel, 1, 1, &f.blob.hex());
    // The READ arrives while the prefetch of chunk 0 is in flight: it waits
    // for that fetch, and, the chunk being profiled, adds no readaround
    // (without the profile, chunks 1 and 2 of the file would come along).
    read(&kernel, 2, 1, 0, 4096);
    obj.wait_completed(2).await;
    settle().await;
    assert_eq!(obj.read(0, 4096).unwrap(), f.raw[..4096]);
    assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
    assert!(
        obj.read(1 << 20, 4096).is_none(),
        "readaround from a profiled chunk"
    );
}

#[tokio::test]
async fn a_profile_queued_after_the_blob_was_opened_starts_at_once() {
    let f = fixture();
    let (daemon, kernel, backend) = setup(&f, backend(&f.conv));
    let obj = open(&kernel, 1, 1, &f.blob.hex());
    settle().await;
    // A second registration (same image, or another one sharing the blob)
    // brings a profile; the kernel sends no new OPEN for an open blob.
    let img = {
        let reg = daemon.registry.lock().unwrap();
        reg.image(&Digest::of(&f.bootstrap).hex()).unwrap()
    };
    let profile = kite_format::prefetch::Profile {
        bootstrap: Digest::of(&f.bootstrap),
        entries: vec![kite_format::prefetch::Entry { blob: 0, chunk: 3 }],
    };
    assert_eq!(img.queue_prefetch(&profile), 1);
    let t = std::time::Instant::now();
    while obj.read(3 << 20, 5).is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "queued profile never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(obj.read(3 << 20, 5).unwrap(), f.raw[3 << 20..(3 << 20) + 5]);
    assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
    // Queued again: nothing new.
    assert_eq!(img.queue_prefetch(&profile), 0);
}

#[tokio::test]
async fn close_stops_the_prefetch_and_the_next_open_finishes_it() {
    // 80 incompressible 64 KiB files: 80 chunks whose stored gaps (64 KiB)
    // are too large to fill, so every profile chunk is its own request.
    let f = fixture_of(|src| {
        for i in 0..80u64 {
            let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (i + 1);
            let data: Vec<u8> = (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            std::fs::write(src.join(format!("f{i:02}")), data).unwrap();
        }
    });
    let even: Vec<u32> = (0..80).step_by(2).collect();
    let mut b = backend(&f.conv);
    b.delay = Duration::from_millis(300);
    let (_, kernel, backend) = setup_profiled(&f, b, 0, &even);
    let first = open(&kernel, 1, 1, &f.blob.hex());
    // 32 requests in flight (the prefetcher's most for small runs), eight
    // waiting for a slot; the kernel closes the object meanwhile: the
    // eight are never sent to it. Waited for rather than slept on, so a
    // loaded machine cannot close the object before the 32 are sent.
    let t = std::time::Instant::now();
    while backend.calls.load(Ordering::SeqCst) < 32 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the prefetch never filled its slots"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kernel.push(Request::Close {
        msg_id: 2,
        object_id: 1,
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(backend.calls.load(Ordering::SeqCst), 32);
    // Opened again (a remount): the rest of the profile goes to the new
    // object, and nothing is fetched twice.
    let second = open(&kernel, 3, 2, &f.blob.hex());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(backend.calls.load(Ordering::SeqCst), 40);
    for c in [64u64, 70, 78] {
        let at = (c << 16) as usize;
        assert_eq!(second.read(c << 16, 4096).unwrap(), f.raw[at..at + 4096]);
    }
    assert!(first.read(64 << 16, 4096).is_none());
}
