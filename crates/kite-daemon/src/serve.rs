//! The kernel request loop.
//!
//! One task reads requests from the cache device whenever it is readable
//! and never awaits the network: OPEN and CLOSE are answered on the spot
//! (registry lookups and a `copen`), and each batch of READs is planned
//! together (so adjacent missing chunks of one blob become one range
//! request) and then handed to one task per READ. Each READ task owns a
//! [`Completion`] that completes the request when dropped, whether the
//! task finishes, fails, or panics: a reader can get EIO but never hang.
//!
//! Cancellation: dropping the loop's future stops reading new requests;
//! READ tasks already spawned still complete their requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kite_format::Digest;
use kite_kernel::cachefiles::{CacheDevice, CacheObject, Request};
use kite_kernel::uring::AlignedBuf;

use crate::blob::BlobState;
use crate::registry::{Image, Registry};
use crate::DaemonError;

/// Daemon-wide request counters (for status and tests).
#[derive(Debug, Default)]
pub struct RequestStats {
    pub opens: AtomicU64,
    pub open_refused: AtomicU64,
    pub closes: AtomicU64,
    pub reads: AtomicU64,
    pub reads_failed: AtomicU64,
    /// READs handed to tasks and not yet completed.
    pub reads_inflight: AtomicU64,
    pub malformed: AtomicU64,
}

enum Target {
    Bootstrap(Arc<Image>),
    Blob(Arc<BlobState>),
}

struct OpenObject {
    target: Target,
    object: Arc<dyn CacheObject>,
}

/// Shared state of a running daemon.
pub struct Daemon {
    pub registry: Mutex<Registry>,
    objects: Mutex<HashMap<u32, OpenObject>>,
    pub stats: RequestStats,
    /// Largest stored-byte span of one merged fetch.
    pub merge_bound: u64,
}

impl Daemon {
    pub fn new(registry: Registry, merge_bound: u64) -> Arc<Self> {
        Arc::new(Self {
            registry: Mutex::new(registry),
            objects: Mutex::new(HashMap::new()),
            stats: RequestStats::default(),
            merge_bound,
        })
    }

    /// Number of cache objects currently open (for tests and status).
    pub fn open_objects(&self) -> usize {
        self.objects.lock().map(|o| o.len()).unwrap_or(0)
    }
}

/// Counts a kernel request as in flight until dropped (a graceful stop
/// waits for the count to reach zero before the worker exits).
pub(crate) struct Inflight(Arc<Daemon>);

impl Inflight {
    pub(crate) fn new(d: &Arc<Daemon>) -> Self {
        d.stats.reads_inflight.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(d))
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.stats.reads_inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Completes a READ when dropped: exactly once, on every path.
struct Completion {
    object: Arc<dyn CacheObject>,
    msg_id: u32,
    /// The daemon's in-flight gauge, decremented on completion.
    gauge: Option<Arc<Daemon>>,
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Err(e) = self.object.complete_read(self.msg_id) {
            tracing::warn!(msg_id = self.msg_id, "completing READ failed: {e}");
        } else {
            tracing::debug!(msg_id = self.msg_id, "READ completed");
        }
        if let Some(d) = &self.gauge {
            d.stats.reads_inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Serve `dev` until it fails.
pub async fn serve(daemon: Arc<Daemon>, dev: Arc<dyn CacheDevice>) -> Result<(), DaemonError> {
    loop {
        drain(&daemon, dev.as_ref());
        // Re-drain at least every second: a safety net against a missed
        // readiness edge (and older kernels' poll quirks).
        if let Ok(Err(e)) =
            tokio::time::timeout(std::time::Duration::from_secs(1), dev.wait()).await
        {
            tracing::error!("waiting for kernel requests: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// Lock a daemon mutex, recovering it if a panicking holder poisoned it:
/// the request loop must keep serving.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Handle every pending request.
/// Handle every pending request. A failure of one request is logged and
/// never stops the loop: other mounts keep being served.
pub fn drain(daemon: &Arc<Daemon>, dev: &dyn CacheDevice) {
    let mut reads = Vec::new();
    let mut errors = 0;
    loop {
        let req = match dev.next_request() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                // E.g. EMFILE while the kernel installs an OPEN's fd: the
                // kernel fails that request; read on.
                tracing::error!("reading a kernel request: {e}");
                errors += 1;
                if errors > 64 {
                    break;
                }
                continue;
            }
        };
        match req {
            Request::Open {
                msg_id,
                object_id,
                volume_key,
                cookie_key,
                object,
            } => {
                if let Err(e) = handle_open(
                    daemon,
                    dev,
                    msg_id,
                    object_id,
                    &volume_key,
                    &cookie_key,
                    object,
                ) {
                    tracing::error!(msg_id, object_id, "OPEN: {e}");
                }
            }
            Request::Close { object_id, .. } => {
                daemon.stats.closes.fetch_add(1, Ordering::Relaxed);
                // Dropping the entry closes the anonymous fd; a prefetch
                // writing into it stops and lets go of it too.
                if let Some(OpenObject {
                    target: Target::Blob(b),
                    object,
                }) = lock(&daemon.objects).remove(&object_id)
                {
                    b.object_gone(Some(object.target()));
                }
            }
            Request::Read {
                msg_id,
                object_id,
                off,
                len,
            } => reads.push((msg_id, object_id, off, len)),
            Request::Malformed {
                msg_id,
                opcode,
                object_id,
                error,
            } => {
                daemon.stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(msg_id, opcode, object_id, "malformed request: {error}");
                match opcode {
                    0 => {
                        if let Err(e) = dev.copen(msg_id, -EINVAL) {
                            tracing::error!(msg_id, "refusing a malformed OPEN: {e}");
                        }
                    }
                    2 => {
                        let obj = lock(&daemon.objects)
                            .get(&object_id)
                            .map(|e| Arc::clone(&e.object));
                        if let Some(object) = obj {
                            drop(Completion {
                                object,
                                msg_id,
                                gauge: None,
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    if !reads.is_empty() {
        dispatch_reads(daemon, reads);
    }
}

const EINVAL: i64 = nix::errno::Errno::EINVAL as i64;
const ENOENT: i64 = nix::errno::Errno::ENOENT as i64;

fn handle_open(
    daemon: &Arc<Daemon>,
    dev: &dyn CacheDevice,
    msg_id: u32,
    object_id: u32,
    volume_key: &[u8],
    cookie_key: &[u8],
    object: Arc<dyn CacheObject>,
) -> Result<(), DaemonError> {
    daemon.stats.opens.fetch_add(1, Ordering::Relaxed);
    let cookie = String::from_utf8_lossy(cookie_key).into_owned();
    let target = {
        let reg = lock(&daemon.registry);
        if let Some(img) = reg.image(&cookie) {
            Some(Target::Bootstrap(img))
        } else {
            Digest::parse(&cookie)
                .and_then(|d| reg.blob(&d))
                .map(Target::Blob)
        }
    };
    let Some(target) = target else {
        daemon.stats.open_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            msg_id,
            object_id,
            volume = %String::from_utf8_lossy(volume_key),
            cookie = %cookie,
            "OPEN for an unknown image or blob: refused"
        );
        return Ok(dev.copen(msg_id, -ENOENT)?);
    };
    let size = match &target {
        Target::Bootstrap(img) => kite_format::align4k(img.bootstrap.len() as u64),
        Target::Blob(b) => b.uncompressed_size,
    };
    tracing::debug!(msg_id, object_id, cookie = %cookie, size, "OPEN");
    let blob = match &target {
        Target::Blob(b) => Some(Arc::clone(b)),
        Target::Bootstrap(_) => None,
    };
    lock(&daemon.objects).insert(
        object_id,
        OpenObject {
            target,
            object: Arc::clone(&object),
        },
    );
    if let Err(e) = dev.copen(msg_id, size as i64) {
        // The kernel gave up on this OPEN (e.g. the mount was killed):
        // forget the object so its fd is closed.
        lock(&daemon.objects).remove(&object_id);
        return Err(e.into());
    }
    // The object can be written from now on: a queued profile starts.
    if let Some(b) = blob {
        b.object_available(|| object, daemon.merge_bound);
    }
    Ok(())
}

fn dispatch_reads(daemon: &Arc<Daemon>, reads: Vec<(u32, u32, u64, u64)>) {
    let objects = lock(&daemon.objects);
    // Plan blob READs of this batch together, so adjacent chunks merge.
    let mut plans: HashMap<Digest, (Arc<BlobState>, Arc<dyn CacheObject>, Vec<usize>)> =
        HashMap::new();
    let mut tasks = Vec::new();
    for (msg_id, object_id, off, len) in reads {
        daemon.stats.reads.fetch_add(1, Ordering::Relaxed);
        let Some(entry) = objects.get(&object_id) else {
            // No object: nothing to write into, nothing to complete on.
            daemon.stats.reads_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(msg_id, object_id, "READ for an unknown object");
            continue;
        };
        tracing::debug!(msg_id, object_id, off, len, "READ");
        daemon.stats.reads_inflight.fetch_add(1, Ordering::Relaxed);
        let done = Completion {
            object: Arc::clone(&entry.object),
            msg_id,
            gauge: Some(Arc::clone(daemon)),
        };
        match &entry.target {
            Target::Bootstrap(img) => tasks.push(ReadTask::Bootstrap {
                img: Arc::clone(img),
                off,
                len,
                done,
            }),
            Target::Blob(b) => {
                let want: Vec<usize> = b.chunks_for(off, len).collect();
                b.record_access(want.iter().copied());
                let p = plans
                    .entry(b.digest)
                    .or_insert_with(|| (Arc::clone(b), Arc::clone(&entry.object), Vec::new()));
                p.2.extend_from_slice(&want);
                tasks.push(ReadTask::Blob {
                    blob: Arc::clone(b),
                    want,
                    waits: Ok(Vec::new()),
                    off,
                    len,
                    done,
                });
            }
        }
    }
    drop(objects);
    // One plan per blob for the whole batch; each READ then waits only on
    // the receivers of its own chunks.
    let batch = crate::blob::Batch::plan(
        plans.values().map(|(b, o, w)| (b, o, w.as_slice())),
        daemon.merge_bound,
    );
    for mut t in tasks {
        if let ReadTask::Blob {
            blob, want, waits, ..
        } = &mut t
        {
            *waits = batch.waits(&blob.digest, want);
        }
        let d = Arc::clone(daemon);
        tokio::spawn(async move { t.run(&d).await });
    }
}

enum ReadTask {
    Bootstrap {
        img: Arc<Image>,
        off: u64,
        len: u64,
        done: Completion,
    },
    Blob {
        blob: Arc<BlobState>,
        want: Vec<usize>,
        /// Receivers for `want`, filled in after the batch is planned.
        waits: Result<crate::blob::Waits, String>,
        off: u64,
        len: u64,
        done: Completion,
    },
}

impl ReadTask {
    async fn run(self, daemon: &Daemon) {
        match self {
            ReadTask::Bootstrap {
                img,
                off,
                len,
                done,
            } => {
                let r = serve_bootstrap(&img, off, len, &done.object).await;
                if let Err(e) = r {
                    daemon.stats.reads_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(msg_id = done.msg_id, fsid = %img.fsid, off, len, "bootstrap READ failed: {e}");
                }
                drop(done);
            }
            ReadTask::Blob {
                blob,
                want,
                waits,
                off,
                len,
                done,
            } => {
                if want.is_empty() {
                    tracing::warn!(msg_id = done.msg_id, blob = %blob.digest, off, len, "READ outside every chunk");
                }
                let r = match waits {
                    Ok(w) => blob.wait(w).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    daemon.stats.reads_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(msg_id = done.msg_id, blob = %blob.digest, off, len, "READ failed, completing without data: {e}");
                }
                drop(done);
            }
        }
    }
}

async fn serve_bootstrap(
    img: &Image,
    off: u64,
    len: u64,
    object: &Arc<dyn CacheObject>,
) -> Result<(), String> {
    let size = img.bootstrap.len() as u64;
    let end = off.saturating_add(len).min(kite_format::align4k(size));
    if off >= end {
        return Err(format!("range {off}+{len} beyond the bootstrap"));
    }
    let mut buf = AlignedBuf::zeroed(kite_format::align4k(end - off) as usize);
    let data_end = end.min(size);
    if off < data_end {
        buf.as_mut_slice()[..(data_end - off) as usize]
            .copy_from_slice(&img.bootstrap[off as usize..data_end as usize]);
    }
    object
        .write_at(off, buf)
        .await
        .map_err(|e| format!("writing the cache: {e}"))
}
