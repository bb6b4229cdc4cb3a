//! Persisted fetch state: which chunks of each blob this node has fetched.
//!
//! One small file per blob, `<state dir>/<hex>.fetched`, one byte per chunk
//! (1 = fetched), written to a temporary name and renamed.
//!
//! On the cachefiles path the kernel's cache file is the authority on what
//! is present (a READ is only sent for missing ranges): this file only
//! feeds status across restarts. On the fanotify path it is authoritative:
//! a chunk marked here is treated as on disk and never fetched again, so it
//! is only ever saved from a snapshot taken before the blob file was
//! synced (`persist` in lib.rs).

use std::path::Path;

use kite_format::Digest;

pub fn load(dir: &Path, blob: &Digest) -> Option<Vec<bool>> {
    let data = std::fs::read(dir.join(format!("{}.fetched", blob.hex()))).ok()?;
    Some(data.into_iter().map(|b| b == 1).collect())
}

pub fn save(dir: &Path, blob: &Digest, map: &[bool]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}.fetched", blob.hex()));
    let tmp = dir.join(format!(".{}.fetched.tmp", blob.hex()));
    let bytes: Vec<u8> = map.iter().map(|&b| b as u8).collect();
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
        assert!(load(dir.path(), &d).is_none());
        save(dir.path(), &d, &[true, false, true]).unwrap();
        assert_eq!(load(dir.path(), &d).unwrap(), vec![true, false, true]);
    }
}
