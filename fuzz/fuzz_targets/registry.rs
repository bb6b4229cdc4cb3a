//! What a registry or a user hands the registry client as text: the
//! `WWW-Authenticate` challenge, `Content-Range`, image references.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = kite_registry::auth::parse_challenge(s);
    let _ = kite_registry::repo::parse_content_range_start(s);
    if let Ok(r) = kite_registry::Reference::parse(s) {
        // A parsed reference prints to something that parses to itself.
        let again = kite_registry::Reference::parse(&r.to_string())
            .expect("a reference kite printed parses");
        assert_eq!(again.to_string(), r.to_string());
    }
});
