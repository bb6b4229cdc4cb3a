//! The events of one fanotify `read()`: metadata records and their info
//! records (the pre-content range).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = kite_kernel::fanotify::parse_events(data) {
        for e in events {
            if let Some((off, len)) = e.range {
                let _ = off.checked_add(len);
            }
        }
    }
});
