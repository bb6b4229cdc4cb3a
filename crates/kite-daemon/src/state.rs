//! Persisted fetch state: which chunks of each blob this node has fetched.
//!
//! One small file per blob, `<state dir>/<hex>.fetched`, written to a
//! temporary name and renamed:
//!
//! ```text
//! "KITEFM1\n"  chunk count (u64 LE)  one byte per chunk (1 = fetched)
//! sha256 of the blob digest and everything before it (32 bytes)
//! ```
//!
//! On the cachefiles path the kernel's cache file is the authority on what
//! is present (a READ is only sent for missing ranges): this file only
//! feeds status across restarts. On the fanotify path it is authoritative:
//! a chunk marked here is treated as on disk and never fetched again, so it
//! is only ever saved from a snapshot taken before the blob file was
//! synced (`persist` in lib.rs), and it is never trusted unchecked: a file
//! whose checksum, magic, length or blob does not match is reported as
//! [`Loaded::Corrupt`] and replaced by an empty map (registry.rs), so every
//! chunk is fetched and verified again rather than read from the file.
//! Files of the older, unchecked format (kite before this format) are
//! treated the same way: a node upgraded from it fetches its data again
//! once.

use std::path::Path;

use kite_format::Digest;

const MAGIC: &[u8; 8] = b"KITEFM1\n";

/// What a state file held.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No state for this blob.
    Absent,
    /// A map that passed every check.
    Map(Vec<bool>),
    /// A file that did not pass (why).
    Corrupt(String),
}

fn checksum(blob: &Digest, body: &[u8]) -> Digest {
    let mut all = Vec::with_capacity(32 + body.len());
    all.extend_from_slice(&blob.0);
    all.extend_from_slice(body);
    Digest::of(&all)
}

/// Read and check `blob`'s state, expecting `chunks` chunks.
pub fn load(dir: &Path, blob: &Digest, chunks: usize) -> Loaded {
    let path = dir.join(format!("{}.fetched", blob.hex()));
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Absent,
        Err(e) => return Loaded::Corrupt(format!("reading {}: {e}", path.display())),
    };
    let bad = |why: &str| Loaded::Corrupt(format!("{}: {why}", path.display()));
    if data.len() < MAGIC.len() + 8 + 32 || &data[..8] != MAGIC {
        return bad("not a kite fetch-state file (or an older format)");
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if checksum(blob, body).0 != sum {
        return bad("checksum mismatch");
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&body[8..16]);
    let n = u64::from_le_bytes(n);
    let map = &body[16..];
    if n != map.len() as u64 || n != chunks as u64 {
        return bad(&format!(
            "{} chunks recorded, {} stored, the blob has {chunks}",
            n,
            map.len()
        ));
    }
    if map.iter().any(|&b| b > 1) {
        return bad("a chunk byte other than 0 or 1");
    }
    Loaded::Map(map.iter().map(|&b| b == 1).collect())
}

pub fn save(dir: &Path, blob: &Digest, map: &[bool]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}.fetched", blob.hex()));
    let tmp = dir.join(format!(".{}.fetched.tmp", blob.hex()));
    let mut bytes = Vec::with_capacity(MAGIC.len() + 8 + map.len() + 32);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(map.len() as u64).to_le_bytes());
    bytes.extend(map.iter().map(|&b| b as u8));
    let sum = checksum(blob, &bytes);
    bytes.extend_from_slice(&sum.0);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest([3; 32]);
        assert_eq!(load(dir.path(), &d, 3), Loaded::Absent);
        save(dir.path(), &d, &[true, false, true]).unwrap();
        assert_eq!(
            load(dir.path(), &d, 3),
            Loaded::Map(vec![true, false, true])
        );
    }

    #[test]
    fn every_damage_is_reported_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest([3; 32]);
        let path = dir.path().join(format!("{}.fetched", d.hex()));
        save(dir.path(), &d, &[false, false, true, false]).unwrap();
        let good = std::fs::read(&path).unwrap();
        let corrupt = |what: &str, bytes: &[u8], chunks: usize| {
            std::fs::write(&path, bytes).unwrap();
            assert!(
                matches!(load(dir.path(), &d, chunks), Loaded::Corrupt(_)),
                "{what}: not reported"
            );
        };
        // Every single flipped byte is caught (the map bytes included: a
        // 0 turned 1 would claim a hole as data).
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 1;
            corrupt(&format!("byte {i} flipped"), &b, 4);
        }
        corrupt("truncated", &good[..good.len() - 1], 4);
        corrupt("empty", &[], 4);
        corrupt("old format (bare map)", &[1, 1, 1, 1], 4);
        corrupt("another chunk count", &good, 5);
        // A file of another blob is not this blob's.
        let other = Digest([4; 32]);
        save(dir.path(), &other, &[true, true, true, true]).unwrap();
        let theirs = std::fs::read(dir.path().join(format!("{}.fetched", other.hex()))).unwrap();
        corrupt("another blob's file", &theirs, 4);
    }
}
