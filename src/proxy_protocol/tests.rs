//! Unit tests of the PROXY protocol parser and encoders.

use super::encode::push_tlv;
use super::*;

fn done(buf: &[u8], mode: Mode) -> (Header, usize) {
    match parse(buf, mode) {
        Ok(Parsed::Done(h, n)) => (h, n),
        other => panic!("expected a header, got {other:?}"),
    }
}

#[test]
fn crc32c_check_value() {
    // The standard check value for CRC-32C.
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn v1_tcp4_and_tcp6_and_unknown() {
    let (h, n) = done(
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 8443\r\nrest",
        Mode::V1,
    );
    assert_eq!(n, 46);
    assert_eq!(h.source, Some("192.0.2.1:56324".parse().unwrap()));
    assert_eq!(h.destination, Some("198.51.100.2:8443".parse().unwrap()));
    let (h, _) = done(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n", Mode::Any);
    assert_eq!(h.source, Some("[2001:db8::1]:1".parse().unwrap()));
    let (h, _) = done(b"PROXY UNKNOWN whatever\r\n", Mode::V1);
    assert_eq!(h.source, None);
}

#[test]
fn v1_bad_input() {
    for bad in [
        &b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 8443\r\n"[..],
        b"PROXY TCP4 192.0.2.1 198.51.100.2 0123 8443\r\n",
        b"PROXY TCP4 192.0.2.300 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
        b"PROXY SCTP 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1\n",
        // Found by fuzzing: the complete line was accepted while its
        // prefixes were refused.
        b"PROXY UNKNOWN a\0b\r\n",
        b"PROXY UNKNOWN\r\r\n",
    ] {
        let e = parse(bad, Mode::V1).unwrap_err();
        assert_eq!(
            e.kind(),
            "bad_v1",
            "{:?}: {e}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
    assert!(matches!(parse(&long, Mode::V1), Err(ProxyError::V1(m)) if m.contains("107")));
}

#[test]
fn v2_round_trip_with_aws_tlv_and_crc() {
    let aws = [&[AWS_VPCE_ID][..], b"vpce-0123456789abcdef0"].concat();
    let tlvs = vec![
        (TLV_AWS, aws),
        (TLV_AUTHORITY, b"agent1.dcv.example".to_vec()),
    ];
    let src: SocketAddr = "203.0.113.7:40000".parse().unwrap();
    let dst: SocketAddr = "10.0.1.5:8443".parse().unwrap();
    let bytes = encode_v2(src, dst, &tlvs, true);
    let (h, n) = done(&bytes, Mode::V2);
    assert_eq!(n, bytes.len());
    assert_eq!(h.command, Command::Proxy);
    assert_eq!(h.source, Some(src));
    assert_eq!(h.tlvs.vpce_id.as_deref(), Some("vpce-0123456789abcdef0"));
    assert_eq!(h.tlvs.authority.as_deref(), Some("agent1.dcv.example"));
    // Every proper prefix is incomplete.
    for end in 0..bytes.len() {
        assert_eq!(
            parse(&bytes[..end], Mode::V2),
            Ok(Parsed::Incomplete),
            "prefix {end}"
        );
    }
    // A flipped bit anywhere after the fixed part breaks the CRC.
    let mut bad = bytes.clone();
    bad[20] ^= 1;
    assert_eq!(parse(&bad, Mode::V2).unwrap_err().kind(), "bad_crc32c");
}

#[test]
fn v2_local_and_ipv6() {
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let (h, n) = done(&local, Mode::V2);
    assert_eq!((h.command, h.source, n), (Command::Local, None, 16));
    let bytes = encode_v2(
        "[2001:db8::1]:5".parse().unwrap(),
        "[2001:db8::2]:6".parse().unwrap(),
        &[],
        false,
    );
    assert_eq!(
        done(&bytes, Mode::Any).0.source,
        Some("[2001:db8::1]:5".parse().unwrap())
    );
}

#[test]
fn v2_bad_input() {
    let good = encode_v2(
        "192.0.2.1:1".parse().unwrap(),
        "192.0.2.2:2".parse().unwrap(),
        &[(TLV_NOOP, vec![0; 3])],
        false,
    );
    let with = |i: usize, v: u8| {
        let mut b = good.clone();
        b[i] = v;
        b
    };
    assert_eq!(
        parse(&with(12, 0x11), Mode::V2).unwrap_err().kind(),
        "bad_version"
    );
    assert_eq!(
        parse(&with(12, 0x2f), Mode::V2).unwrap_err().kind(),
        "bad_command"
    );
    assert_eq!(
        parse(&with(13, 0x41), Mode::V2).unwrap_err().kind(),
        "bad_family"
    );
    // Length beyond the cap.
    let mut long = good.clone();
    long[14..16].copy_from_slice(&5000u16.to_be_bytes());
    assert_eq!(parse(&long, Mode::V2).unwrap_err().kind(), "too_long");
    // Address block shorter than IPv4 needs.
    let mut short = good[..16].to_vec();
    short[14..16].copy_from_slice(&4u16.to_be_bytes());
    short.extend_from_slice(&[0; 4]);
    assert_eq!(parse(&short, Mode::V2).unwrap_err().kind(), "bad_addresses");
    // Truncated TLV: the header length ends inside a TLV.
    let mut trunc = good.clone();
    let len = u16::from_be_bytes([trunc[14], trunc[15]]) - 2;
    trunc[14..16].copy_from_slice(&len.to_be_bytes());
    assert_eq!(parse(&trunc, Mode::V2).unwrap_err().kind(), "bad_tlv");
    // Wrong signature: a v2-only listener refuses v1 and garbage.
    let mut sig = good.clone();
    sig[0] = 0x0c;
    assert_eq!(parse(&sig, Mode::V2).unwrap_err().kind(), "missing");
    assert_eq!(
        parse(b"PROXY TCP4 ", Mode::V2).unwrap_err().kind(),
        "missing"
    );
    assert_eq!(
        parse(&[0x16, 3, 1], Mode::V2).unwrap_err().kind(),
        "missing"
    );
}

#[test]
fn v2_ssl_and_unique_id() {
    let mut ssl = vec![1, 0, 0, 0, 0];
    push_tlv(&mut ssl, TLV_SSL_VERSION, b"TLSv1.3");
    push_tlv(&mut ssl, TLV_SSL_CN, b"client");
    let bytes = encode_v2(
        "192.0.2.1:1".parse().unwrap(),
        "192.0.2.2:2".parse().unwrap(),
        &[
            (TLV_SSL, ssl),
            (TLV_UNIQUE_ID, vec![7; 16]),
            (TLV_NETNS, b"blue".to_vec()),
        ],
        false,
    );
    let h = done(&bytes, Mode::V2).0;
    let ssl = h.tlvs.ssl.unwrap();
    assert_eq!(
        (ssl.version.as_deref(), ssl.cn.as_deref()),
        (Some("TLSv1.3"), Some("client"))
    );
    assert_eq!(h.tlvs.netns.as_deref(), Some("blue"));
    let too_long = encode_v2(
        "192.0.2.1:1".parse().unwrap(),
        "192.0.2.2:2".parse().unwrap(),
        &[(TLV_UNIQUE_ID, vec![7; 129])],
        false,
    );
    assert_eq!(parse(&too_long, Mode::V2).unwrap_err().kind(), "bad_tlv");
}
