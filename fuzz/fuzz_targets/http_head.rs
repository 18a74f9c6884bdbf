//! The terminate-mode request head, differentially against httparse: a
//! head splicegate accepts, httparse accepts identically; the head
//! splicegate sends to the agent is exactly one well-formed head (nothing
//! after it that an agent could read as a second request) with the
//! client's framing and Host unchanged and splicegate's own forwarding
//! headers only. The response-head parser never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate::terminate::http::{self, Forwarded, MAX_HEADERS};

fn values<'a>(headers: &[(&'a str, &'a [u8])], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let _ = http::parse_response(data);
    let ours = http::parse(data);
    let Some(len) = http::head_end(data, 0) else {
        assert!(ours.is_err());
        return;
    };
    let Ok(h) = ours else {
        return;
    };
    let head = &data[..len];
    assert_eq!(h.len, len);
    assert!(!head.contains(&0));

    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    assert_eq!(req.parse(head), Ok(httparse::Status::Complete(len)));
    assert_eq!(req.method, Some(h.method));
    assert_eq!(req.version, Some(h.minor));
    assert_eq!(req.headers.len(), h.headers.len());

    let client = "192.0.2.1".parse().unwrap();
    let out = http::rewrite(&h, h.target, Some(Forwarded { client }));
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS + 8];
    let mut sent = httparse::Request::new(&mut slots);
    assert_eq!(
        sent.parse(&out),
        Ok(httparse::Status::Complete(out.len())),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let sent: Vec<(&str, &[u8])> = sent.headers.iter().map(|x| (x.name, x.value)).collect();
    for framing in ["host", "content-length", "transfer-encoding"] {
        assert_eq!(
            values(&sent, framing),
            values(&h.headers, framing),
            "{framing}"
        );
    }
    assert_eq!(values(&sent, "connection").len(), 1);
    assert_eq!(values(&sent, "x-forwarded-for"), vec![&b"192.0.2.1"[..]]);
    assert_eq!(values(&sent, "x-real-ip"), vec![&b"192.0.2.1"[..]]);
    for theirs in ["forwarded", "x-forwarded-host", "x-forwarded-port"] {
        assert!(values(&sent, theirs).is_empty(), "{theirs}");
    }
    // splicegate reads what it sends as it read the original (unless its
    // own forwarding headers took the count past the client limit).
    let again = match http::parse(&out) {
        Err(http::HeadError::TooManyHeaders) if h.headers.len() + 5 > MAX_HEADERS => return,
        r => r.expect("splicegate refuses its own rewrite"),
    };
    assert_eq!((again.body, again.websocket), (h.body, h.websocket));
});
