//! One cachefiles on-demand message as `read()` returns it from the device.
#![no_main]

use kite_kernel::cachefiles::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = proto::parse(data) {
        let _ = (m.msg_id(), m.object_id());
    }
});
