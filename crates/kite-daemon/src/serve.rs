//! The kernel request loop.
//!
//! One task reads requests from the cache device whenever it is readable
//! and never awaits the network: OPEN and CLOSE are answered on the spot
//! (registry lookups and a `copen`), and each batch of READs is planned
//! together by the shared dispatcher ([`crate::dispatch`]: adjacent
//! missing chunks of one blob become one range request) and answered by
//! one task per READ. Each READ owns a [`Completion`] that completes the
//! request when dropped, whether the task finishes, fails, or panics: a
//! reader can get EIO but never hang.
//!
//! Cancellation: dropping the loop's future stops reading new requests;
//! READ tasks already spawned still complete their requests.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kite_format::Digest;
use kite_kernel::cachefiles::{CacheDevice, CacheObject, Request};
use kite_kernel::uring::AlignedBuf;

use crate::blob::BlobState;
use crate::daemon::{lock, Daemon, Inflight};
use crate::dispatch::{Answer, Miss};
use crate::registry::Image;
use crate::DaemonError;

enum Target {
    Bootstrap(Arc<Image>),
    Blob(Arc<BlobState>),
}

struct OpenObject {
    target: Target,
    object: Arc<dyn CacheObject>,
}

/// cachefiles: the cache objects the kernel opened, by object_id.
#[derive(Default)]
pub(crate) struct Objects(Mutex<HashMap<u32, OpenObject>>);

impl Objects {
    pub(crate) fn len(&self) -> usize {
        lock(&self.0).len()
    }
}

/// Completes a READ when dropped: exactly once, on every path.
pub struct Completion {
    object: Arc<dyn CacheObject>,
    msg_id: u32,
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Err(e) = self.object.complete_read(self.msg_id) {
            tracing::warn!(msg_id = self.msg_id, "completing READ failed: {e}");
        } else {
            tracing::debug!(msg_id = self.msg_id, "READ completed");
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
                }) = lock(&daemon.objects.0).remove(&object_id)
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
                        let obj = lock(&daemon.objects.0)
                            .get(&object_id)
                            .map(|e| Arc::clone(&e.object));
                        if let Some(object) = obj {
                            drop(Completion { object, msg_id });
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
        Target::Bootstrap(img) => kite_format::align4k(img.bootstrap.len()),
        Target::Blob(b) => b.uncompressed_size,
    };
    tracing::debug!(msg_id, object_id, cookie = %cookie, size, "OPEN");
    let blob = match &target {
        Target::Blob(b) => Some(Arc::clone(b)),
        Target::Bootstrap(_) => None,
    };
    lock(&daemon.objects.0).insert(
        object_id,
        OpenObject {
            target,
            object: Arc::clone(&object),
        },
    );
    if let Err(e) = dev.copen(msg_id, size as i64) {
        // The kernel gave up on this OPEN (e.g. the mount was killed):
        // forget the object so its fd is closed.
        lock(&daemon.objects.0).remove(&object_id);
        return Err(e.into());
    }
    // The object can be written from now on: a queued profile starts.
    if let Some(b) = blob {
        b.object_available(|| object, daemon.merge_bound);
    }
    Ok(())
}

fn dispatch_reads(daemon: &Arc<Daemon>, reads: Vec<(u32, u32, u64, u64)>) {
    let objects = lock(&daemon.objects.0);
    let mut misses = Vec::new();
    for (msg_id, object_id, off, len) in reads {
        daemon.stats.reads.fetch_add(1, Ordering::Relaxed);
        let Some(entry) = objects.get(&object_id) else {
            // No object: nothing to write into, nothing to complete on.
            daemon.stats.reads_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(msg_id, object_id, "READ for an unknown object");
            continue;
        };
        tracing::debug!(msg_id, object_id, off, len, "READ");
        let done = Completion {
            object: Arc::clone(&entry.object),
            msg_id,
        };
        match &entry.target {
            Target::Bootstrap(img) => {
                let (img, d) = (Arc::clone(img), Arc::clone(daemon));
                let inflight = Inflight::new(daemon);
                tokio::spawn(async move {
                    let _inflight = inflight;
                    if let Err(e) = serve_bootstrap(&img, off, len, &done.object).await {
                        d.stats.reads_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(msg_id, fsid = %img.fsid, off, len, "bootstrap READ failed: {e}");
                    }
                    drop(done);
                });
            }
            Target::Blob(b) => {
                let want: Vec<usize> = b.chunks_for(off, len).collect();
                b.record_access(want.iter().copied());
                misses.push(Miss {
                    blob: Arc::clone(b),
                    object: Arc::clone(&entry.object),
                    want,
                    answer: Answer::Read(done),
                    off,
                    len,
                });
            }
        }
    }
    drop(objects);
    crate::dispatch::dispatch(daemon, misses, None);
}

async fn serve_bootstrap(
    img: &Image,
    off: u64,
    len: u64,
    object: &Arc<dyn CacheObject>,
) -> Result<(), String> {
    let size = img.bootstrap.len();
    let end = off.saturating_add(len).min(kite_format::align4k(size));
    if off >= end {
        return Err(format!("range {off}+{len} beyond the bootstrap"));
    }
    let data_end = end.min(size);
    let boot = img.bootstrap.clone();
    // A kept bootstrap is read from its file: off the async workers.
    let buf = tokio::task::spawn_blocking(move || {
        let mut buf = AlignedBuf::zeroed(kite_format::align4k(end - off) as usize);
        if off < data_end {
            boot.read_at(off, &mut buf.as_mut_slice()[..(data_end - off) as usize])
                .map_err(|e| format!("reading the bootstrap: {e}"))?;
        }
        Ok::<_, String>(buf)
    })
    .await
    .map_err(|e| format!("bootstrap read task: {e}"))??;
    object
        .write_at(off, buf)
        .await
        .map_err(|e| format!("writing the cache: {e}"))
}
