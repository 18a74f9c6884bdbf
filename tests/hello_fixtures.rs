//! ClientHello parsing on real hellos captured from curl, `openssl s_client`
//! and headless Chromium (whose 2 KB hello carries the post-quantum
//! X25519MLKEM768 key share and is larger than one 1460-byte TCP segment).
//! Captured with tests/fixtures/capture_hello.py.

use splicegate::sniff::{HelloParser, Progress};
use splicegate::testkit::{frame_records, unframe_records};

const FIXTURES: [(&str, &[u8]); 3] = [
    ("curl", include_bytes!("fixtures/hello/curl.bin")),
    ("openssl", include_bytes!("fixtures/hello/openssl.bin")),
    ("chromium", include_bytes!("fixtures/hello/chromium.bin")),
];

fn sni_of(buf: &[u8]) -> Option<String> {
    match HelloParser::new(16384).advance(buf) {
        Ok(Progress::Done(h)) => h.sni,
        other => panic!("expected a complete hello, got {other:?}"),
    }
}

#[test]
fn every_fixture_yields_the_sni() {
    for (name, bytes) in FIXTURES {
        assert_eq!(
            sni_of(bytes).as_deref(),
            Some("agent1.dcv.example"),
            "{name}"
        );
    }
    // Chromium's hello is the large post-quantum one.
    assert!(
        FIXTURES[2].1.len() > 1800,
        "chromium fixture is {} bytes",
        FIXTURES[2].1.len()
    );
}

#[test]
fn every_proper_prefix_is_incomplete() {
    for (name, bytes) in FIXTURES {
        for end in 0..bytes.len() {
            let r = HelloParser::new(16384).advance(&bytes[..end]);
            assert_eq!(r, Ok(Progress::Incomplete), "{name}: prefix of {end} bytes");
        }
    }
}

#[test]
fn growing_one_byte_at_a_time_gives_the_same_result() {
    for (name, bytes) in FIXTURES {
        let mut p = HelloParser::new(16384);
        for end in 1..bytes.len() {
            assert_eq!(
                p.advance(&bytes[..end]),
                Ok(Progress::Incomplete),
                "{name} at {end}"
            );
        }
        let Ok(Progress::Done(h)) = p.advance(bytes) else {
            panic!("{name}: not complete at the end")
        };
        assert_eq!(h.sni.as_deref(), Some("agent1.dcv.example"));
    }
}

#[test]
fn every_split_point_gives_the_same_sni() {
    for (name, bytes) in FIXTURES {
        for split in 1..bytes.len() {
            let mut p = HelloParser::new(16384);
            assert_eq!(
                p.advance(&bytes[..split]),
                Ok(Progress::Incomplete),
                "{name} split {split}"
            );
            match p.advance(bytes) {
                Ok(Progress::Done(h)) => assert_eq!(
                    h.sni.as_deref(),
                    Some("agent1.dcv.example"),
                    "{name} split {split}"
                ),
                other => panic!("{name} split {split}: {other:?}"),
            }
        }
    }
}

#[test]
fn reframed_into_one_byte_records_gives_the_same_hello() {
    for (name, bytes) in FIXTURES {
        let handshake = unframe_records(bytes).unwrap();
        let original = HelloParser::new(16384).advance(bytes).unwrap();
        for per_record in [1, 2, 3, 100, 1000] {
            let reframed = frame_records(&handshake, per_record);
            let again = HelloParser::new(16384).advance(&reframed).unwrap();
            assert_eq!(again, original, "{name} in records of {per_record}");
        }
    }
}

#[test]
fn alpn_is_extracted() {
    let Ok(Progress::Done(curl)) = HelloParser::new(16384).advance(FIXTURES[0].1) else {
        panic!()
    };
    assert_eq!(curl.alpn, vec!["h2", "http/1.1"]);
    let Ok(Progress::Done(chromium)) = HelloParser::new(16384).advance(FIXTURES[2].1) else {
        panic!()
    };
    assert_eq!(chromium.alpn, vec!["h2", "http/1.1"]);
}

#[test]
fn a_cap_below_the_hello_size_is_too_large() {
    let chromium = FIXTURES[2].1;
    let e = HelloParser::new(1024).advance(chromium).unwrap_err();
    assert_eq!(e.kind(), "too_large", "{e}");
}
