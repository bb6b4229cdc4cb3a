//! The events of one fanotify `read()`: metadata records and their info
//! records (the pre-content range).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Each event takes at least its 24-byte metadata record.
    if let Ok(events) = kite_kernel::fanotify::parse_events(data) {
        assert!(events.len() * 24 <= data.len());
    }
});
