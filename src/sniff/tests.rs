//! Unit tests of the ClientHello reassembler.

use super::*;

use crate::testkit::{client_hello, frame_records as frame};

fn synth_hello(sni: Option<&str>, alpn: &[&str], extra: &[(u16, Vec<u8>)]) -> Vec<u8> {
    assert!(extra.is_empty() || extra.len() == 1);
    let mut hello = crate::testkit::unframe_records(&client_hello(sni, alpn, 1 << 14)).unwrap();
    for (ty, data) in extra {
        // Append one extension and fix up the lengths.
        hello.extend_from_slice(&ty.to_be_bytes());
        hello.extend_from_slice(&(data.len() as u16).to_be_bytes());
        hello.extend_from_slice(data);
        let add = 4 + data.len();
        let body_len = hello.len() - 4;
        hello[1..4].copy_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        // Extensions length sits right before the first extension.
        let ext_len_at = 4 + 2 + 32 + 1 + 4 + 2;
        let old = u16::from_be_bytes([hello[ext_len_at], hello[ext_len_at + 1]]) as usize;
        hello[ext_len_at..ext_len_at + 2].copy_from_slice(&((old + add) as u16).to_be_bytes());
    }
    frame(&hello, 1 << 14)
}

fn parse_all(buf: &[u8]) -> Result<Progress, SniffError> {
    HelloParser::new(16384).advance(buf)
}

#[test]
fn extracts_sni_alpn_and_skips_unknown_extensions() {
    let hello = synth_hello(
        Some("Agent1.Example."),
        &["h2", "http/1.1"],
        &[(0xfe0d, vec![1, 2, 3])],
    );
    let Progress::Done(h) = parse_all(&hello).unwrap() else {
        panic!("incomplete")
    };
    assert_eq!(h.sni.as_deref(), Some("agent1.example"));
    assert_eq!(h.alpn, vec!["h2", "http/1.1"]);
    assert!(h.ech);
}

#[test]
fn no_sni_is_not_an_error() {
    let hello = synth_hello(None, &[], &[]);
    assert_eq!(
        parse_all(&hello).unwrap(),
        Progress::Done(ClientHello::default())
    );
}

#[test]
fn classifies_non_tls() {
    let e = parse_all(b"GET / HTTP/1.1\r\n").unwrap_err();
    assert!(
        matches!(&e, SniffError::NotTls(m) if m.contains("GET")),
        "{e}"
    );
    let e = parse_all(&[0x80, 0x2e, 0x01, 0x00, 0x02]).unwrap_err();
    assert!(
        matches!(&e, SniffError::NotTls(m) if m.contains("SSLv2")),
        "{e}"
    );
    let e = parse_all(&[0x00, 0xff]).unwrap_err();
    assert_eq!(e.kind(), "not_tls");
}

#[test]
fn oversized_is_refused_from_the_header() {
    // Header announces 20000 bytes; only the first record header and
    // handshake header are present.
    let buf = [22, 3, 1, 0x40, 0x00, 1, 0x00, 0x4e, 0x20];
    let e = HelloParser::new(16384).advance(&buf).unwrap_err();
    assert_eq!(e.kind(), "too_large", "{e}");
}

#[test]
fn non_handshake_and_wrong_message_are_malformed() {
    let e = parse_all(&[22, 3, 1, 0, 4, 2, 0, 0, 0]).unwrap_err();
    assert_eq!(e.kind(), "malformed");
    let e = parse_all(&[22, 3, 1, 0, 1, 1, 23, 3, 3, 0, 1, 0]).unwrap_err();
    assert_eq!(e.kind(), "malformed", "{e}");
}

#[test]
fn garbage_body_is_malformed_not_a_panic() {
    let hs = [1u8, 0, 0, 6, 3, 3, 0xff, 0xff, 0xff, 0xff];
    let e = parse_all(&frame(&hs, 100)).unwrap_err();
    assert_eq!(e.kind(), "malformed");
}

#[test]
fn sni_normalisation() {
    assert_eq!(normalise_sni(b"A.B.").as_deref(), Some("a.b"));
    assert_eq!(normalise_sni(b"a..b"), None);
    assert_eq!(normalise_sni(b"."), None);
    assert_eq!(normalise_sni(b"a b"), None);
}
