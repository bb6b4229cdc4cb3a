//! The tar stream reader: every entry's header (PAX, GNU long names,
//! sparse maps) and its whole logical content, as the converter reads them.
#![no_main]

use std::io::Read;

use kite_convert::tarstream::TarReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = TarReader::new(data);
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded: a sparse entry may claim a huge logical size of holes.
    let mut budget: u64 = 64 << 20;
    while let Ok(Some(entry)) = r.next_entry() {
        let _ = (entry.path.len(), entry.size);
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    assert!(n <= buf.len());
                    budget = budget.saturating_sub(n as u64);
                    if budget == 0 {
                        return;
                    }
                }
            }
        }
    }
});
