//! The prefetch profile: decode, then check against a bootstrap (the
//! second part of the input, when the first byte says where to cut).
#![no_main]

use kite_format::prefetch::Profile;
use kite_format::{Bootstrap, Digest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Profile::decode(data);
    // [len:u32 LE][profile][bootstrap]
    if data.len() < 4 {
        return;
    }
    let n = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let rest = &data[4..];
    if n > rest.len() {
        return;
    }
    let (profile, boot) = rest.split_at(n);
    if let Ok(b) = Bootstrap::parse(boot) {
        if let Ok(p) = Profile::parse_for(profile, &Digest::of(boot), &b) {
            let _ = p.footprint(&b);
        }
    }
});
