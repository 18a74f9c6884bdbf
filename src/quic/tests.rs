use super::*;
use crate::testkit::{quic_client_hello, quic_crypto_frame, quic_hello_datagrams, quic_initial};

/// RFC 9001 appendix A.2: the client's first Initial, 1200 bytes.
fn rfc_client_initial() -> Vec<u8> {
    include_bytes!("../../tests/fixtures/quic/rfc9001-client-initial.bin").to_vec()
}

const RFC_DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

#[test]
fn rfc9001_header_fields() {
    let d = rfc_client_initial();
    let h = parse_long_header(&d).unwrap();
    assert_eq!(h.version, VERSION_1);
    assert_eq!(h.dcid, RFC_DCID);
    assert!(h.scid.is_empty());
    assert!(h.initial);
    // 1 + 4 + 1+8 + 1+0 + token length 1 + length 2 (0x449e = 1182).
    assert_eq!(h.pn_offset, 18);
    assert_eq!(h.len, 18 + 1182);
}

#[test]
fn rfc9001_header_protection_and_payload() {
    let mut d = rfc_client_initial();
    let keys = InitialKeys::new(VERSION_1, &RFC_DCID).unwrap();
    let (pn, payload) = keys.open(&mut d, 18, None).unwrap();
    // A.2: packet number 2, first byte 0xc3 once unprotected, and the
    // payload starts with a CRYPTO frame at offset 0 of 241 bytes.
    assert_eq!(pn, 2);
    assert_eq!(&payload[..4], &[0x06, 0x00, 0x40, 0xf1]);
    assert_eq!(&payload[4..8], &[0x01, 0x00, 0x00, 0xed]);
    assert_eq!(d[0], 0xc3);
    assert_eq!(&d[18..22], &[0, 0, 0, 2]);
}

#[test]
fn rfc9001_client_hello_names_example_com() {
    let d = rfc_client_initial();
    let mut s = InitialSniffer::start(&d, 16384).unwrap();
    let hello = s.feed(&d).unwrap().expect("complete in one packet");
    assert_eq!(hello.sni.as_deref(), Some("example.com"));
    assert_eq!(s.version(), VERSION_1);
}

#[test]
fn a_flipped_bit_fails_to_decrypt() {
    for at in [30, 600, 1199] {
        let mut d = rfc_client_initial();
        d[at] ^= 0x01;
        let mut s = InitialSniffer::start(&d, 16384).unwrap();
        assert_eq!(s.feed(&d), Err(InitialError::DecryptFailed), "byte {at}");
    }
}

#[test]
fn packet_number_decoding_matches_rfc9000_a3() {
    // The example of RFC 9000 appendix A.3.
    assert_eq!(
        decode_packet_number(Some(0xa82f30ea), 0x9b32, 16),
        0xa82f9b32
    );
    assert_eq!(decode_packet_number(None, 0, 32), 0);
    assert_eq!(decode_packet_number(Some(2), 3, 8), 3);
}

#[test]
fn v1_and_v2_round_trip_through_our_own_client() {
    for version in [VERSION_1, VERSION_2] {
        let dcid = [7u8; 12];
        let ds = quic_hello_datagrams(version, &dcid, Some("agent.test"), &["dcv"], 0, 4000);
        assert_eq!(ds.len(), 1);
        assert!(ds[0].len() >= MIN_INITIAL_DATAGRAM);
        let mut s = InitialSniffer::start(&ds[0], 16384).unwrap();
        let hello = s.feed(&ds[0]).unwrap().unwrap();
        assert_eq!(
            hello.sni.as_deref(),
            Some("agent.test"),
            "version {version:x}"
        );
        assert_eq!(hello.alpn, vec!["dcv".to_owned()]);
    }
}

#[test]
fn a_hello_across_datagrams_completes_on_the_last() {
    // A post-quantum-sized hello (about 2.5 KB) in 1000-byte pieces.
    let dcid = [9u8; 8];
    let ds = quic_hello_datagrams(VERSION_1, &dcid, Some("big.test"), &[], 2300, 1000);
    assert_eq!(ds.len(), 3);
    let mut s = InitialSniffer::start(&ds[0], 16384).unwrap();
    assert_eq!(s.feed(&ds[0]).unwrap(), None);
    assert_eq!(s.feed(&ds[1]).unwrap(), None);
    assert_eq!(
        s.feed(&ds[2]).unwrap().unwrap().sni.as_deref(),
        Some("big.test")
    );
}

#[test]
fn shuffled_and_overlapping_crypto_frames_reassemble() {
    let hello = quic_client_hello(Some("shuffled.test"), &["h3"], 300);
    let n = hello.len();
    // Chrome-style: pieces out of order, one repeated, PING and PADDING between.
    let mut frames = Vec::new();
    frames.extend(quic_crypto_frame(100, &hello[100..n]));
    frames.push(0x01);
    frames.extend(quic_crypto_frame(40, &hello[40..120]));
    frames.extend([0, 0, 0]);
    frames.extend(quic_crypto_frame(0, &hello[..50]));
    let d = quic_initial(VERSION_1, &[1; 8], b"", 0, &frames, 1200);
    let mut s = InitialSniffer::start(&d, 16384).unwrap();
    assert_eq!(
        s.feed(&d).unwrap().unwrap().sni.as_deref(),
        Some("shuffled.test")
    );
}

#[test]
fn bad_input_is_named() {
    let good = quic_hello_datagrams(VERSION_1, &[3; 8], Some("a.test"), &[], 0, 4000).remove(0);
    let start = |d: &[u8]| {
        InitialSniffer::start(d, 16384)
            .map(|_| ())
            .map_err(|e| e.kind())
    };
    assert_eq!(start(&[]), Err("not_quic"));
    assert_eq!(start(b"\x40hello short header"), Err("not_quic"));
    let mut other = good.clone();
    other[1..5].copy_from_slice(&0xff00_001du32.to_be_bytes());
    assert_eq!(start(&other), Err("unsupported_version"));
    let mut negotiation = good.clone();
    negotiation[1..5].copy_from_slice(&[0; 4]);
    assert_eq!(start(&negotiation), Err("unsupported_version"));
    let mut handshake = good.clone();
    handshake[0] = (handshake[0] & !0x30) | 0x20;
    assert_eq!(start(&handshake), Err("not_initial"));
    assert_eq!(start(&good[..600]), Err("malformed"), "length overruns");
    let small = quic_initial(
        VERSION_1,
        &[3; 8],
        b"",
        0,
        &quic_crypto_frame(0, b"\x01\0\0\x01x"),
        300,
    );
    assert_eq!(start(&small), Err("too_short"));
    let short_cid = quic_initial(VERSION_1, &[3; 4], b"", 0, &[], 1200);
    assert_eq!(start(&short_cid), Err("malformed"));
    // Truncations of a valid datagram never panic and never yield a hello.
    for cut in 0..good.len() {
        if let Ok(mut s) = InitialSniffer::start(&good[..cut], 16384) {
            assert!(!matches!(s.feed(&good[..cut]), Ok(Some(_))), "cut at {cut}");
        }
    }
}

#[test]
fn frames_an_initial_may_not_carry_are_refused() {
    // A STREAM frame (0x08) in an Initial is a protocol violation.
    let d = quic_initial(VERSION_1, &[5; 8], b"", 0, &[0x08, 0x00, 0x01, 0x61], 1200);
    let mut s = InitialSniffer::start(&d, 16384).unwrap();
    assert_eq!(s.feed(&d).map_err(|e| e.kind()), Err("malformed"));
}

#[test]
fn the_cap_holds_before_the_data_arrives() {
    let d = quic_initial(
        VERSION_1,
        &[5; 8],
        b"",
        0,
        &quic_crypto_frame(9000, b"late"),
        1200,
    );
    let mut s = InitialSniffer::start(&d, 4096).unwrap();
    assert_eq!(s.feed(&d).map_err(|e| e.kind()), Err("too_large"));
    // A hello announcing more than the cap is refused from its header.
    let header = [0x01, 0x00, 0x20, 0x00];
    let d = quic_initial(
        VERSION_1,
        &[5; 8],
        b"",
        0,
        &quic_crypto_frame(0, &header),
        1200,
    );
    let mut s = InitialSniffer::start(&d, 4096).unwrap();
    assert_eq!(s.feed(&d).map_err(|e| e.kind()), Err("too_large"));
}

#[test]
fn too_many_pieces_are_refused() {
    let mut frames = Vec::new();
    for i in 0..80u64 {
        frames.extend(quic_crypto_frame(10 + i * 3, b"x"));
    }
    let d = quic_initial(VERSION_1, &[5; 8], b"", 0, &frames, 1200);
    let mut s = InitialSniffer::start(&d, 16384).unwrap();
    assert_eq!(s.feed(&d).map_err(|e| e.kind()), Err("malformed"));
}

#[test]
fn a_damaged_later_packet_is_skipped() {
    let dcid = [4u8; 8];
    let ds = quic_hello_datagrams(VERSION_1, &dcid, Some("late.test"), &[], 1500, 1000);
    let mut s = InitialSniffer::start(&ds[0], 16384).unwrap();
    assert_eq!(s.feed(&ds[0]).unwrap(), None);
    let mut broken = ds[1].clone();
    broken[700] ^= 0xff;
    assert_eq!(s.feed(&broken).unwrap(), None, "dropped, as a server would");
    assert_eq!(
        s.feed(&ds[1]).unwrap().unwrap().sni.as_deref(),
        Some("late.test")
    );
}

#[test]
fn aioquic_initials_name_their_agent() {
    let one = include_bytes!("../../tests/fixtures/quic/aioquic-initial.bin");
    let mut s = InitialSniffer::start(one, 16384).unwrap();
    let hello = s.feed(one).unwrap().expect("one datagram");
    assert_eq!(hello.sni.as_deref(), Some("agent1.dcv.example"));
    assert_eq!(hello.alpn, vec!["dcv".to_owned()]);

    // A hello grown past one Initial: complete only with the second datagram.
    let first = include_bytes!("../../tests/fixtures/quic/aioquic-pq-1.bin");
    let second = include_bytes!("../../tests/fixtures/quic/aioquic-pq-2.bin");
    let mut s = InitialSniffer::start(first, 16384).unwrap();
    assert_eq!(s.feed(first).unwrap(), None);
    let hello = s.feed(second).unwrap().expect("two datagrams");
    assert_eq!(hello.sni.as_deref(), Some("agent1.dcv.example"));
    assert_eq!(hello.alpn.len(), 61);
}

/// RFC 9369 appendix A.2: the client's first Initial in QUIC version 2,
/// 1200 bytes as the RFC prints them.
#[test]
fn rfc9369_v2_client_initial_names_example_com() {
    let d = include_bytes!("../../tests/fixtures/quic/rfc9369-client-initial.bin").to_vec();
    assert_eq!(d.len(), 1200);
    let h = parse_long_header(&d).unwrap();
    assert_eq!(h.version, VERSION_2);
    assert!(h.initial, "v2 rotates the type bits: 0b01 is Initial");
    assert_eq!(h.dcid, RFC_DCID);
    let mut s = InitialSniffer::start(&d, 16384).unwrap();
    let hello = s.feed(&d).unwrap().expect("complete in one packet");
    assert_eq!(hello.sni.as_deref(), Some("example.com"));
    assert_eq!(s.version(), VERSION_2);
    assert_eq!(s.largest, Some(2), "the RFC's packet number");
    // A flipped bit anywhere fails, as for v1.
    let mut bad = d.clone();
    bad[700] ^= 0x10;
    let mut s = InitialSniffer::start(&bad, 16384).unwrap();
    assert_eq!(s.feed(&bad), Err(InitialError::DecryptFailed));
}

/// A long-header packet of `kind` bits (v1 numbering) for `dcid`, with a
/// payload of `len` opaque bytes: what the relay sees of 0-RTT and
/// Handshake packets (it cannot open them).
fn opaque_long_packet(type_bits: u8, dcid: &[u8], len: usize) -> Vec<u8> {
    let mut p = vec![0xc0 | (type_bits << 4) | 0x03];
    p.extend(VERSION_1.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend(dcid);
    p.push(4);
    p.extend([5, 6, 7, 8]);
    let n = len as u16;
    p.extend((0x4000 | n).to_be_bytes());
    p.extend(std::iter::repeat_n(0xa5, len));
    p
}

#[test]
fn an_initial_is_found_in_any_position_of_a_coalesced_datagram() {
    let dcid = [3u8; 8];
    let initial =
        quic_hello_datagrams(VERSION_1, &dcid, Some("coalesced.test"), &[], 0, 4000).remove(0);
    let zero_rtt = opaque_long_packet(1, &dcid, 300);
    let handshake = opaque_long_packet(2, &dcid, 200);
    // Initial first, then 0-RTT and a Handshake packet.
    let mut after: Vec<u8> = initial.clone();
    after.extend(&zero_rtt);
    after.extend(&handshake);
    // 0-RTT before the Initial (RFC 9000 §12.2 fixes no order).
    let mut before = zero_rtt.clone();
    before.extend(&initial);
    for (what, d) in [("initial first", &after), ("0-RTT first", &before)] {
        let mut s = InitialSniffer::start(d, 16384).unwrap_or_else(|e| panic!("{what}: {e}"));
        let hello = s.feed(d).unwrap().unwrap_or_else(|| panic!("{what}"));
        assert_eq!(hello.sni.as_deref(), Some("coalesced.test"), "{what}");
        assert!(s.tag().belongs(d), "{what}");
    }
    // A datagram of 0-RTT alone (reordered ahead of its Initial) starts
    // nothing, and says why.
    let mut only = zero_rtt.clone();
    only.resize(1200, 0);
    assert_eq!(
        InitialSniffer::start(&only, 16384).unwrap_err(),
        InitialError::NotInitial("0-RTT")
    );
    // Another connection's packets do not belong to this flow.
    let s = InitialSniffer::start(&after, 16384).unwrap();
    assert!(!s.tag().belongs(&opaque_long_packet(1, &[4u8; 8], 100)));
    assert!(!s.tag().belongs(&[0x40, 1, 2, 3]));
}

#[test]
fn a_pending_sniffer_counts_what_it_holds() {
    let dcid = [5u8; 8];
    let ds = quic_hello_datagrams(VERSION_1, &dcid, Some("big.test"), &[], 2300, 1000);
    let mut s = InitialSniffer::start(&ds[0], 16384).unwrap();
    let empty = s.heap_bytes();
    assert_eq!(s.feed(&ds[0]).unwrap(), None);
    assert!(
        s.heap_bytes() >= empty + 900,
        "{} vs {empty}",
        s.heap_bytes()
    );
    assert!(s.heap_bytes() < empty + 4096, "{}", s.heap_bytes());
}
