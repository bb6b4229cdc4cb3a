//! What a peer's request carries that the serving node parses: the blob
//! route and the Range header; and the `--peers` list.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = kite_daemon::peer::blob_route(s);
    if let Some(r) = kite_daemon::peer::parse_range(s) {
        assert!(r.start < r.end);
    }
    let _ = kite_daemon::peer::parse_peers(s);
});
