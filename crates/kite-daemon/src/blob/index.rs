//! The node-wide chunk index: for a chunk's sha256, a blob on this node
//! whose cache already holds that content.
//!
//! A new image version usually rebuilds a layer with most files unchanged:
//! its blob is new, but most of its chunks (file content, chunked per
//! file) are byte-identical to chunks of the old blob already on disk.
//! Before fetching a run, the fetcher looks each chunk up here and copies
//! the ones found from the other blob's local data instead ([`LocalRead`]),
//! verifying the copy's sha256 first: a copy that does not match is never
//! written, its entry is dropped, and the chunk is fetched remotely.
//!
//! The index is derived, never authoritative: it is built from the blobs'
//! fetched maps (which the paths persist only after the data is synced)
//! as blobs are registered, and grows as chunks are written. So it needs
//! no file of its own to survive a crash, can never claim data that was
//! not made durable first, and anything it gets wrong costs one
//! verification. Entries are compact (16 bytes of the digest as the key,
//! a blob slot and a chunk number as the value; the full digest is
//! compared before a copy is used), one holder per chunk; when a blob is
//! dropped its entries go to other blobs holding the same chunks.
//!
//! A source is read through its [`LocalRead`], which the kernel path
//! sets: the fanotify path's blob file, or on the cachefiles path the
//! kernel's cache file, which has a name (and can be read) only while no
//! object uses it; a source that cannot be read now (`NotFound`) keeps its
//! entry and the chunk is fetched.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use kite_format::Digest;

use super::BlobState;

/// Reads a blob's uncompressed layout from this node's cache, without
/// the kernel path's involvement in correctness (the caller verifies).
pub trait LocalRead: Send + Sync {
    /// Fill `buf` from offset `off` of the uncompressed layout.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Make the kernel path hand this blob a cache object, if it can
    /// without a mount (the fanotify path: a read that raises an event at
    /// `off`); `Unsupported` otherwise.
    fn poke(&self, _off: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

fn key(d: &Digest) -> u128 {
    let mut k = [0u8; 16];
    k.copy_from_slice(&d.0[..16]);
    u128::from_le_bytes(k)
}

#[derive(Default)]
struct Inner {
    /// Digest prefix -> (blob slot, chunk index).
    by_key: HashMap<u128, (u32, u32)>,
    blobs: HashMap<u32, Weak<BlobState>>,
    next_slot: u32,
}

/// See the module doc.
#[derive(Default)]
pub struct ChunkIndex {
    inner: Mutex<Inner>,
}

impl ChunkIndex {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make `blob` a member: it records its chunks here as they are
    /// written, and the chunks it already holds are added now. A blob
    /// joins one index once.
    pub fn attach(self: &Arc<Self>, blob: &Arc<BlobState>) {
        let slot = {
            let mut g = self.lock();
            let slot = g.next_slot;
            g.next_slot = g.next_slot.wrapping_add(1);
            g.blobs.insert(slot, Arc::downgrade(blob));
            slot
        };
        if blob.index.set((Arc::clone(self), slot)).is_err() {
            self.lock().blobs.remove(&slot);
            return;
        }
        let held: Vec<usize> = blob
            .fetched_map()
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(i, _)| i)
            .collect();
        self.add(slot, blob, &held);
    }

    /// Record chunks `chunks` of the blob in `slot` as on disk. An entry
    /// whose blob is still alive is kept (first holder wins).
    pub(super) fn add(&self, slot: u32, blob: &BlobState, chunks: &[usize]) {
        if chunks.is_empty() {
            return;
        }
        let mut g = self.lock();
        let g = &mut *g;
        for &i in chunks {
            let Some(rec) = blob.chunks.get(i) else {
                continue;
            };
            let k = key(&rec.digest);
            let held = g
                .by_key
                .get(&k)
                .is_some_and(|e| g.blobs.get(&e.0).is_some_and(|w| w.strong_count() > 0));
            if !held {
                g.by_key.insert(k, (slot, i as u32));
            }
        }
    }

    /// A blob other than the one in slot `not` holding a chunk with
    /// `digest` on disk and able to read it locally: (blob, chunk index).
    pub fn lookup(&self, digest: &Digest, not: u32) -> Option<(Arc<BlobState>, usize)> {
        let (slot, weak, chunk) = {
            let g = self.lock();
            let &(slot, chunk) = g.by_key.get(&key(digest))?;
            if slot == not {
                return None;
            }
            (slot, g.blobs.get(&slot)?.clone(), chunk as usize)
        };
        // Upgraded (and possibly dropped) outside the lock: the last
        // reference going away runs BlobState's drop, which detaches.
        let blob = weak.upgrade()?;
        // No reader yet (the kernel path sets it just after registration):
        // not now, but the entry stays.
        blob.local.get()?;
        let usable =
            blob.chunks.get(chunk).map(|c| &c.digest) == Some(digest) && blob.is_fetched(chunk);
        if usable {
            Some((blob, chunk))
        } else {
            drop(blob);
            self.forget(digest, slot);
            None
        }
    }

    /// Drop the entry for `digest` if it points into `slot` (a copy from
    /// there failed verification, or the chunk is gone there), and offer
    /// the chunk from another blob holding it, if any.
    pub fn forget(&self, digest: &Digest, slot: u32) {
        let others: Vec<(u32, Weak<BlobState>)> = {
            let mut g = self.lock();
            if g.by_key.get(&key(digest)).is_none_or(|e| e.0 != slot) {
                return;
            }
            g.by_key.remove(&key(digest));
            g.blobs
                .iter()
                .filter(|(s, _)| **s != slot)
                .map(|(s, w)| (*s, w.clone()))
                .collect()
        };
        // Another holder (upgraded, scanned and dropped outside the lock;
        // rare: only after a failed copy).
        for (other, weak) in others {
            let Some(blob) = weak.upgrade() else { continue };
            let held = blob
                .chunks
                .iter()
                .position(|c| &c.digest == digest)
                .filter(|&i| blob.is_fetched(i));
            if let Some(i) = held {
                self.add(other, &blob, &[i]);
                return;
            }
        }
    }

    /// Remove a dropped blob and its entries; another blob holding the
    /// same content takes each entry over (the index keeps one holder per
    /// chunk, so a forgotten image must not hide the copies others hold).
    pub(super) fn detach(&self, slot: u32) {
        let (lost, others) = {
            let mut g = self.lock();
            g.blobs.remove(&slot);
            let mut lost = std::collections::HashSet::new();
            g.by_key.retain(|k, e| {
                let keep = e.0 != slot;
                if !keep {
                    lost.insert(*k);
                }
                keep
            });
            let others: Vec<(u32, Weak<BlobState>)> =
                g.blobs.iter().map(|(s, w)| (*s, w.clone())).collect();
            (lost, others)
        };
        if lost.is_empty() {
            return;
        }
        // Blobs are upgraded, read and dropped outside the lock.
        for (other, weak) in others {
            let Some(blob) = weak.upgrade() else { continue };
            let held: Vec<usize> = blob
                .fetched_map()
                .iter()
                .enumerate()
                .filter(|(i, f)| **f && lost.contains(&key(&blob.chunks[*i].digest)))
                .map(|(i, _)| i)
                .collect();
            self.add(other, &blob, &held);
        }
    }

    /// Chunks indexed.
    pub fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
