//! Bytes captured from real peers (tests/fixtures/capture_first_bytes.py):
//! request heads from curl and headless Chromium, PROXY headers from
//! HAProxy. Each parses to what its sender meant; they also seed the fuzz
//! targets.

use splicegate::proxy_protocol::{parse, Command, Mode, Parsed};
use splicegate::terminate::http;

#[test]
fn request_heads_from_curl_and_chromium() {
    for (name, bytes, method, target, websocket) in [
        (
            "curl-get",
            &include_bytes!("fixtures/http/curl-get.txt")[..],
            "GET",
            "/10.150.248.180/auth?authToken=x",
            false,
        ),
        (
            "curl-post",
            include_bytes!("fixtures/http/curl-post.txt"),
            "POST",
            "/desk1/upload",
            false,
        ),
        (
            "chromium-get",
            include_bytes!("fixtures/http/chromium-get.txt"),
            "GET",
            "/10.150.248.180/",
            false,
        ),
        (
            "chromium-websocket",
            include_bytes!("fixtures/http/chromium-websocket.txt"),
            "GET",
            "/auth",
            true,
        ),
    ] {
        let h = http::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (h.method, h.target, h.websocket, h.len),
            (method, target, websocket, bytes.len()),
            "{name}"
        );
    }
    let post = http::parse(include_bytes!("fixtures/http/curl-post.txt")).unwrap();
    assert_eq!(post.body, http::Body::Length(7));
}

#[test]
fn proxy_headers_from_haproxy_and_the_aws_layout() {
    let done = |bytes: &[u8]| match parse(bytes, Mode::Any) {
        Ok(Parsed::Done(h, n)) => {
            assert_eq!(n, bytes.len());
            h
        }
        other => panic!("{other:?}"),
    };
    let v1 = done(include_bytes!("fixtures/proxy/haproxy-v1.bin"));
    assert_eq!((v1.version, v1.command), (1, Command::Proxy));
    assert!(v1.source.unwrap().ip().is_loopback());
    let v2 = done(include_bytes!("fixtures/proxy/haproxy-v2.bin"));
    assert_eq!((v2.version, v2.command), (2, Command::Proxy));
    let ids = done(include_bytes!("fixtures/proxy/haproxy-v2-crc-uniqueid.bin"));
    assert!(ids.tlvs.unique_id.is_some(), "{ids:?}");
    // HAProxy's health check: LOCAL with an unspecified family.
    let check = done(include_bytes!("fixtures/proxy/haproxy-v2-check-local.bin"));
    assert_eq!((check.command, check.source), (Command::Local, None));
    // The layout AWS documents (endpoint id TLV, CRC32C, NOOP), built from
    // the documentation by make_aws_like_header.py, not captured from AWS.
    let aws = done(include_bytes!(
        "fixtures/proxy/aws-like-v2-vpce-crc-noop.bin"
    ));
    assert_eq!(aws.tlvs.vpce_id.as_deref(), Some("vpce-0123456789abcdef0"));
    assert_eq!(aws.source, Some("203.0.113.7:40000".parse().unwrap()));
}
