//! The PROXY protocol parser: never panics; a header it accepts is
//! accepted by `ppp` (a well-kept parser) with the same addresses and
//! TLVs, every proper prefix of it is incomplete, and re-encoding what it
//! parsed gives back the same header.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use splicegate::proxy_protocol::{encode_v1, encode_v2, parse, Command, Header, Mode, Parsed};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let mode = [Mode::V1, Mode::V2, Mode::Any][usize::from(sel % 3)];
    let Ok(Parsed::Done(h, len)) = parse(bytes, mode) else {
        return;
    };
    assert!(len <= bytes.len());
    for end in 0..len {
        assert_eq!(
            parse(&bytes[..end], mode),
            Ok(Parsed::Incomplete),
            "prefix {end}"
        );
    }
    match h.version {
        1 => against_ppp_v1(&h, &bytes[..len]),
        _ => against_ppp_v2(&h, &bytes[..len]),
    }
    round_trip(&h);
});

fn against_ppp_v1(h: &Header, raw: &[u8]) {
    let Some((src, dst)) = h.source.zip(h.destination) else {
        return;
    };
    let theirs = ppp::v1::Header::try_from(raw).expect("ppp refuses a v1 header splicegate took");
    let (s, d) = match theirs.addresses {
        ppp::v1::Addresses::Tcp4(a) => (
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        ),
        ppp::v1::Addresses::Tcp6(a) => (
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        ),
        other => panic!("ppp read {other:?}"),
    };
    assert_eq!((s, d), (src, dst));
}

fn against_ppp_v2(h: &Header, raw: &[u8]) {
    let theirs = ppp::v2::Header::try_from(raw).expect("ppp refuses a v2 header splicegate took");
    assert_eq!(theirs.len(), raw.len());
    let local = matches!(theirs.command, ppp::v2::Command::Local);
    assert_eq!(local, h.command == Command::Local);
    if !local {
        let addrs = match theirs.addresses {
            ppp::v2::Addresses::IPv4(a) => Some((
                SocketAddr::new(a.source_address.into(), a.source_port),
                SocketAddr::new(a.destination_address.into(), a.destination_port),
            )),
            ppp::v2::Addresses::IPv6(a) => Some((
                SocketAddr::new(a.source_address.into(), a.source_port),
                SocketAddr::new(a.destination_address.into(), a.destination_port),
            )),
            _ => None,
        };
        assert_eq!(addrs, h.source.zip(h.destination));
    }
    // Every TLV splicegate kept, in order; ppp also yields CRC32C and NOOP.
    let tlvs: Vec<(u8, Vec<u8>)> = theirs
        .tlvs()
        .map(|t| t.expect("ppp cannot walk TLVs splicegate walked"))
        .filter(|t| t.kind != 0x03 && t.kind != 0x04)
        .map(|t| (t.kind, t.value.to_vec()))
        .collect();
    assert_eq!(tlvs, h.tlvs.raw);
}

fn round_trip(h: &Header) {
    let (Some(src), Some(dst)) = (h.source, h.destination) else {
        return;
    };
    if src.is_ipv4() != dst.is_ipv4() {
        return;
    }
    let (bytes, mode) = if h.version == 1 {
        (encode_v1(src, dst), Mode::V1)
    } else {
        (encode_v2(src, dst, &h.tlvs.raw, true), Mode::V2)
    };
    match parse(&bytes, mode) {
        Ok(Parsed::Done(again, n)) => {
            assert_eq!(n, bytes.len());
            assert_eq!((again.source, again.destination), (h.source, h.destination));
            assert_eq!(again.tlvs, h.tlvs);
        }
        other => panic!("re-encoded header does not parse: {other:?}"),
    }
}
