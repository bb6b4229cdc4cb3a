//! The index section (blob and chunk tables): parse, then every lookup the
//! daemon makes.
#![no_main]

use kite_format::index::Index;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(idx) = Index::parse(data) else {
        return;
    };
    for b in idx.blobs() {
        for c in 0..b.chunk_count.min(4096) {
            let rec = idx.chunk(&b, c);
            let _ = idx.find_chunk(&b, rec.uncompressed_offset);
        }
        let _ = idx.find_chunk(&b, u64::MAX);
    }
});
