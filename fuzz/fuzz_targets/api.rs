//! The control API's request parsing: method, path, query and body. An
//! accepted request names a well-formed image id and came with its method.
#![no_main]

use hyper::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // [method selector][path len][path][query len][query][body]
    if data.len() < 3 {
        return;
    }
    let method = match data[0] % 5 {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::DELETE,
        3 => Method::PUT,
        _ => Method::HEAD,
    };
    let rest = &data[1..];
    let n = (rest[0] as usize).min(rest.len() - 1);
    let path = String::from_utf8_lossy(&rest[1..1 + n]);
    let rest = &rest[1 + n..];
    let (query, body) = match rest.split_first() {
        Some((&q, r)) => {
            let q = (q as usize).min(r.len());
            (Some(String::from_utf8_lossy(&r[..q]).into_owned()), &r[q..])
        }
        None => (None, rest),
    };
    use kite_daemon::api::ApiRequest;
    let is_fsid = |f: &str| {
        f.len() == 64
            && f.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    };
    match kite_daemon::api::parse_request(&method, &path, query.as_deref(), body) {
        Ok(ApiRequest::Profile(f) | ApiRequest::Prefetch(f) | ApiRequest::Pull(f)) => {
            assert!(is_fsid(&f))
        }
        Ok(ApiRequest::Mounted { fsid, notice }) => {
            assert!(is_fsid(&fsid) && notice.mountpoint.is_absolute() && method == Method::POST)
        }
        Ok(ApiRequest::Forget { fsid, .. }) => assert!(is_fsid(&fsid) && method == Method::DELETE),
        Ok(ApiRequest::Register(_) | ApiRequest::Gc { .. }) => assert_eq!(method, Method::POST),
        Ok(ApiRequest::Health | ApiRequest::Images) => assert_eq!(method, Method::GET),
        Err(r) => assert!(r.status.is_client_error()),
    }
});
