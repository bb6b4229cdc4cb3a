//! Prefetch profiles: which chunks a workload read, in the order it first
//! read them.
//!
//! A profile is recorded by the daemon while a workload runs on a cold
//! cache (`kite profile`), stored beside the bootstrap in the image
//! directory and published as one more manifest layer. A daemon mounting
//! the image later fetches the profile's chunks in that order, in parallel
//! with the workload, so the workload's reads find them present instead of
//! each waiting for a round trip.
//!
//! Encoding (little endian):
//!
//! ```text
//! 0   magic "KITEPRF1"
//! 8   sha256 of the bootstrap the profile belongs to (32 bytes)
//! 40  entry count n (u32), reserved (u32, zero)
//! 48  n entries: blob index (u32, into the bootstrap's blob table),
//!     chunk index (u32, within that blob)
//! ```
//!
//! A profile names its bootstrap, so one recorded for another build of the
//! image is refused rather than prefetching unrelated chunks.

use crate::{Bootstrap, Digest};

pub const MAGIC: &[u8; 8] = b"KITEPRF1";
const HEADER_LEN: usize = 48;
const ENTRY_LEN: usize = 8;
/// More entries than any bootstrap can have chunks (the index caps blobs
/// and chunks far lower); bounds what a hostile file can make us allocate.
pub const MAX_ENTRIES: usize = 1 << 26;

/// One profile entry: a chunk of one of the bootstrap's blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub blob: u32,
    pub chunk: u32,
}

/// A decoded profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The bootstrap this profile was recorded for.
    pub bootstrap: Digest,
    /// Chunks in first-access order.
    pub entries: Vec<Entry>,
}

/// Bytes a profile's chunks take, stored and uncompressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub stored_bytes: u64,
    pub uncompressed_bytes: u64,
}

/// Why a profile was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("not a kite prefetch profile (bad magic)")]
    Magic,
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("recorded for bootstrap {recorded}, not this one ({actual})")]
    OtherBootstrap { recorded: String, actual: String },
    #[error("entry {entry}: blob index {blob} out of range ({blobs} blobs)")]
    BadBlob {
        entry: usize,
        blob: u32,
        blobs: usize,
    },
    #[error("entry {entry}: chunk {chunk} of blob {blob} out of range ({chunks} chunks)")]
    BadChunk {
        entry: usize,
        blob: u32,
        chunk: u32,
        chunks: usize,
    },
    #[error("entry {entry}: blob {blob} chunk {chunk} listed twice")]
    Duplicate { entry: usize, blob: u32, chunk: u32 },
}

impl Profile {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.entries.len() * ENTRY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.bootstrap.0);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.blob.to_le_bytes());
            out.extend_from_slice(&e.chunk.to_le_bytes());
        }
        out
    }

    /// Decode, checking the framing only (see [`Profile::check`]).
    pub fn decode(data: &[u8]) -> Result<Self, ProfileError> {
        if data.len() < 8 || &data[..8] != MAGIC {
            return Err(ProfileError::Magic);
        }
        if data.len() < HEADER_LEN {
            return Err(ProfileError::Truncated(format!(
                "{} bytes, the header alone is {HEADER_LEN}",
                data.len()
            )));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
        let mut bootstrap = [0u8; 32];
        bootstrap.copy_from_slice(&data[8..40]);
        let n = u32_at(40) as usize;
        if n > MAX_ENTRIES {
            return Err(ProfileError::Truncated(format!(
                "{n} entries is more than any image has"
            )));
        }
        let want = HEADER_LEN + n * ENTRY_LEN;
        if data.len() != want {
            return Err(ProfileError::Truncated(format!(
                "{n} entries need {want} bytes, the profile has {}",
                data.len()
            )));
        }
        let entries = (0..n)
            .map(|k| {
                let o = HEADER_LEN + k * ENTRY_LEN;
                Entry {
                    blob: u32_at(o),
                    chunk: u32_at(o + 4),
                }
            })
            .collect();
        Ok(Self {
            bootstrap: Digest(bootstrap),
            entries,
        })
    }

    /// Check the profile against the bootstrap it will be used with: same
    /// bootstrap, every entry a chunk of it, none twice.
    pub fn check(
        &self,
        bootstrap_digest: &Digest,
        boot: &Bootstrap<'_>,
    ) -> Result<(), ProfileError> {
        if &self.bootstrap != bootstrap_digest {
            return Err(ProfileError::OtherBootstrap {
                recorded: self.bootstrap.oci(),
                actual: bootstrap_digest.oci(),
            });
        }
        let counts: Vec<usize> = boot.index.blobs().map(|v| v.chunk_count).collect();
        let mut seen: Vec<Vec<bool>> = counts.iter().map(|&c| vec![false; c]).collect();
        for (k, e) in self.entries.iter().enumerate() {
            let Some(s) = seen.get_mut(e.blob as usize) else {
                return Err(ProfileError::BadBlob {
                    entry: k,
                    blob: e.blob,
                    blobs: counts.len(),
                });
            };
            let chunks = s.len();
            let Some(bit) = s.get_mut(e.chunk as usize) else {
                return Err(ProfileError::BadChunk {
                    entry: k,
                    blob: e.blob,
                    chunk: e.chunk,
                    chunks,
                });
            };
            if std::mem::replace(bit, true) {
                return Err(ProfileError::Duplicate {
                    entry: k,
                    blob: e.blob,
                    chunk: e.chunk,
                });
            }
        }
        Ok(())
    }

    /// Decode and check in one step.
    pub fn parse_for(
        data: &[u8],
        bootstrap_digest: &Digest,
        boot: &Bootstrap<'_>,
    ) -> Result<Self, ProfileError> {
        let p = Self::decode(data)?;
        p.check(bootstrap_digest, boot)?;
        Ok(p)
    }

    /// What prefetching the profile costs: the stored (compressed) bytes
    /// fetched and the uncompressed bytes made present. Entries outside
    /// `boot` (an unchecked profile) are not counted.
    pub fn footprint(&self, boot: &Bootstrap<'_>) -> Footprint {
        let blobs: Vec<_> = boot.index.blobs().collect();
        let mut f = Footprint::default();
        for e in &self.entries {
            let Some(b) = blobs.get(e.blob as usize) else {
                continue;
            };
            if (e.chunk as usize) < b.chunk_count {
                let c = boot.index.chunk(b, e.chunk as usize);
                f.stored_bytes += u64::from(c.compressed_size);
                f.uncompressed_bytes += u64::from(c.uncompressed_size);
            }
        }
        f
    }

    /// The chunks of blob `blob`, in profile order.
    pub fn chunks_of(&self, blob: u32) -> Vec<usize> {
        self.entries
            .iter()
            .filter(|e| e.blob == blob)
            .map(|e| e.chunk as usize)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        Profile {
            bootstrap: Digest::of(b"boot"),
            entries: vec![
                Entry { blob: 1, chunk: 7 },
                Entry { blob: 0, chunk: 0 },
                Entry { blob: 1, chunk: 2 },
            ],
        }
    }

    #[test]
    fn round_trips_and_keeps_order() {
        let p = sample();
        let bytes = p.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 3 * ENTRY_LEN);
        let q = Profile::decode(&bytes).unwrap();
        assert_eq!(q, p);
        assert_eq!(q.chunks_of(1), vec![7, 2]);
        assert_eq!(q.chunks_of(0), vec![0]);
        assert!(q.chunks_of(2).is_empty());
    }

    #[test]
    fn bad_framing_is_refused() {
        let bytes = sample().encode();
        assert_eq!(Profile::decode(b"KITEBOOT"), Err(ProfileError::Magic));
        assert!(matches!(
            Profile::decode(&bytes[..20]),
            Err(ProfileError::Truncated(_))
        ));
        // One entry short, one byte long.
        assert!(matches!(
            Profile::decode(&bytes[..bytes.len() - 8]),
            Err(ProfileError::Truncated(_))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            Profile::decode(&long),
            Err(ProfileError::Truncated(_))
        ));
        // A huge count is refused before anything is allocated for it.
        let mut huge = bytes;
        huge[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Profile::decode(&huge),
            Err(ProfileError::Truncated(_))
        ));
    }
}
