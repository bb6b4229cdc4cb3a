//! The index section (blob and chunk tables): parse, then every lookup the
//! daemon makes, with the section's checksum recomputed over the input.
#![no_main]

use kite_format::index::{seal_index, Index, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The size field and checksum made right, so mutations reach the
    // tables (the checksum itself is covered by the unit tests).
    let mut data = data.to_vec();
    if data.len() >= HEADER_SIZE {
        let len = data.len() as u64;
        data[48..56].copy_from_slice(&len.to_le_bytes());
        seal_index(&mut data);
    }
    let Ok(idx) = Index::parse(&data) else {
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
