//! The fanotify path's event handling against a scripted pre-content
//! group (the double of `kite_kernel::fanotify::Group`, as `SimKernel` is
//! for cachefiles): events for real sparse blob files in a temporary
//! cache, answers recorded. No root, no kernel feature needed.
//!
//! Fail-closed cases: an unknown file, a failed fstat and a forgotten blob
//! are denied with EIO; a worker that dies with events pending allows
//! none of them (the real event denies on drop, and the holder denies
//! what a dead process had read).

mod common;

use std::collections::VecDeque;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{backend, fixture, Fixture, TestBackend};
use kite_daemon::daemon::Daemon;
use kite_daemon::fanotify::FanotifyPath;
use kite_daemon::registry::Registry;
use kite_kernel::cachefiles::{CacheObject, WriteFuture};
use kite_kernel::fanotify::{EventsFuture, PreContent, PreContentEvent};
use kite_kernel::uring::{AlignedBuf, Writer};
use kite_kernel::KernelError;
use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Allowed,
    Denied(i32),
    /// Dropped without an answer (the real event then denies with EIO).
    Dropped,
}

type Log = Arc<Mutex<Vec<(u32, Outcome)>>>;

#[derive(Default)]
struct ScriptedGroup {
    queue: Mutex<VecDeque<Box<dyn PreContentEvent>>>,
    wake: Notify,
    /// (path, true = mark, false = unmark), in order.
    marks: Mutex<Vec<(PathBuf, bool)>>,
}

impl ScriptedGroup {
    fn push(&self, ev: Event) {
        self.queue.lock().unwrap().push_back(Box::new(ev));
        self.wake.notify_one();
    }
    fn unmarked(&self, p: &Path) -> bool {
        self.marks.lock().unwrap().iter().any(|(q, m)| q == p && !m)
    }
}

impl PreContent for ScriptedGroup {
    fn next_events(self: Arc<Self>) -> EventsFuture {
        Box::pin(async move {
            loop {
                let batch: Vec<_> = self.queue.lock().unwrap().drain(..).collect();
                if !batch.is_empty() {
                    return Ok(batch);
                }
                self.wake.notified().await;
            }
        })
    }
    fn mark(&self, path: &Path) -> Result<(), KernelError> {
        self.marks.lock().unwrap().push((path.to_path_buf(), true));
        Ok(())
    }
    fn unmark(&self, path: &Path) -> Result<(), KernelError> {
        self.marks.lock().unwrap().push((path.to_path_buf(), false));
        Ok(())
    }
}

/// One scripted event: a read of `range` of `file` (None: fstat fails).
struct Event {
    id: u32,
    file: Option<PathBuf>,
    range: Option<(u64, u64)>,
    log: Log,
    answered: bool,
}

impl PreContentEvent for Event {
    fn range(&self) -> Option<(u64, u64)> {
        self.range
    }
    fn pid(&self) -> i32 {
        4242
    }
    fn file_id(&self) -> std::io::Result<(u64, u64)> {
        let p = self
            .file
            .as_ref()
            .ok_or_else(|| std::io::Error::from_raw_os_error(9))?;
        let md = std::fs::metadata(p)?;
        Ok((md.dev(), md.ino()))
    }
    fn object(&self, _writer: &Arc<Writer>) -> Arc<dyn CacheObject> {
        Arc::new(FileObject(
            self.file.clone().expect("an object of a known file"),
        ))
    }
    fn answer(mut self: Box<Self>, result: Result<(), i32>) {
        self.answered = true;
        let o = match result {
            Ok(()) => Outcome::Allowed,
            Err(e) => Outcome::Denied(e),
        };
        self.log.lock().unwrap().push((self.id, o));
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if !self.answered {
            self.log.lock().unwrap().push((self.id, Outcome::Dropped));
        }
    }
}

/// Writes into the blob file, as an event's fd does.
struct FileObject(PathBuf);

impl CacheObject for FileObject {
    fn write_at(&self, off: u64, buf: AlignedBuf) -> WriteFuture {
        let r = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.0)
            .and_then(|f| f.write_all_at(buf.as_slice(), off));
        Box::pin(async move { r })
    }
    fn complete_read(&self, _msg_id: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn target(&self) -> u64 {
        std::fs::metadata(&self.0).map(|m| m.ino()).unwrap_or(0)
    }
}

struct Setup {
    _cache: tempfile::TempDir,
    fan: Arc<FanotifyPath>,
    group: Arc<ScriptedGroup>,
    daemon: Arc<Daemon>,
    backend: Arc<TestBackend>,
    blob_file: PathBuf,
    log: Log,
}

impl Setup {
    fn event(&self, id: u32, file: Option<&Path>, off: u64, len: u64) {
        self.group.push(Event {
            id,
            file: file.map(Path::to_path_buf),
            range: Some((off, len)),
            log: Arc::clone(&self.log),
            answered: false,
        });
    }
    async fn outcome(&self, id: u32) -> Outcome {
        for _ in 0..1000 {
            if let Some((_, o)) = self.log.lock().unwrap().iter().find(|(i, _)| *i == id) {
                return o.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("event {id} never answered");
    }
}

/// The fixture registered, its blob file prepared, events served.
fn setup(f: &Fixture, backend: TestBackend) -> Setup {
    let cache = tempfile::tempdir().unwrap();
    let backend = Arc::new(backend);
    let mut reg = Registry::new(Some(cache.path().join("kite-state")));
    let img = reg
        .register(
            f.bootstrap.clone(),
            backend.clone(),
            Duration::from_secs(5),
            "test".into(),
        )
        .unwrap();
    let daemon = Daemon::new(reg, 4 << 20);
    let group = Arc::new(ScriptedGroup::default());
    let fan = FanotifyPath::new(
        Arc::clone(&daemon),
        group.clone(),
        Writer::start(),
        cache.path(),
        0,
    )
    .unwrap();
    let files = fan.prepare(&img).unwrap();
    let blob_file = files.devices[0].clone();
    tokio::spawn(Arc::clone(&fan).serve());
    Setup {
        _cache: cache,
        fan,
        group,
        daemon,
        backend,
        blob_file,
        log: Log::default(),
    }
}

#[tokio::test]
async fn a_missing_range_is_fetched_written_and_allowed() {
    let f = fixture();
    let s = setup(&f, backend(&f.conv));
    assert!(
        s.group
            .marks
            .lock()
            .unwrap()
            .contains(&(s.blob_file.clone(), true)),
        "an incomplete blob file is marked"
    );
    s.event(1, Some(&s.blob_file), 0, 65536);
    assert_eq!(s.outcome(1).await, Outcome::Allowed);
    let on_disk = std::fs::read(&s.blob_file).unwrap();
    assert_eq!(on_disk[..1 << 20], f.raw[..1 << 20], "chunk 0 in the file");
    assert_eq!(s.daemon.stats.reads_inflight.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_event_for_an_unknown_file_is_denied() {
    let f = fixture();
    let s = setup(&f, backend(&f.conv));
    let other = s._cache.path().join("not-a-blob");
    std::fs::write(&other, vec![0u8; 8192]).unwrap();
    s.event(1, Some(&other), 0, 4096);
    assert_eq!(s.outcome(1).await, Outcome::Denied(5));
    assert_eq!(s.backend.calls.load(Ordering::SeqCst), 0);
    assert_eq!(s.daemon.stats.reads_failed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_event_whose_file_cannot_be_identified_is_denied() {
    let f = fixture();
    let s = setup(&f, backend(&f.conv));
    s.event(1, None, 0, 4096);
    assert_eq!(s.outcome(1).await, Outcome::Denied(5));
    assert_eq!(s.backend.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_forgotten_blob_is_denied_and_keeps_its_mark() {
    let f = fixture();
    let s = setup(&f, backend(&f.conv));
    s.fan.forget(&[f.blob]);
    s.event(1, Some(&s.blob_file), 0, 4096);
    assert_eq!(s.outcome(1).await, Outcome::Denied(5));
    assert!(
        !s.group.unmarked(&s.blob_file),
        "forgetting an incomplete blob must not unmark it (holes would read as zeros)"
    );
    assert_eq!(s.backend.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_complete_blob_is_unmarked() {
    let f = fixture();
    let s = setup(&f, backend(&f.conv));
    let size = f.raw.len() as u64;
    let mut off = 0;
    let mut id = 0;
    while off < size {
        id += 1;
        s.event(id, Some(&s.blob_file), off, 65536.min(size - off));
        assert_eq!(s.outcome(id).await, Outcome::Allowed);
        off += 1 << 20;
    }
    for _ in 0..200 {
        if s.group.unmarked(&s.blob_file) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(s.group.unmarked(&s.blob_file), "complete blob still marked");
    assert_eq!(std::fs::read(&s.blob_file).unwrap(), f.raw);
}

#[test]
fn a_worker_dying_with_events_pending_allows_none_of_them() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut slow = backend(&f.conv);
    slow.delay = Duration::from_secs(30);
    let s = rt.block_on(async {
        let s = setup(&f, slow);
        for (id, off) in [(1u32, 0u64), (2, 1 << 20), (3, 2 << 20)] {
            s.event(id, Some(&s.blob_file), off, 4096);
        }
        // The events are read and waiting on the (slow) fetch.
        for _ in 0..200 {
            if s.daemon.stats.reads_inflight.load(Ordering::SeqCst) == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(s.daemon.stats.reads_inflight.load(Ordering::SeqCst), 3);
        s
    });
    // The worker dies: its runtime and every task go away.
    rt.shutdown_timeout(Duration::from_secs(1));
    let log = s.log.lock().unwrap().clone();
    assert_eq!(log.len(), 3, "every event has an outcome: {log:?}");
    assert!(
        log.iter().all(|(_, o)| *o != Outcome::Allowed),
        "an event was allowed without its data: {log:?}"
    );
    let on_disk = std::fs::read(&s.blob_file).unwrap();
    assert!(on_disk.iter().all(|b| *b == 0), "nothing was written");
}
