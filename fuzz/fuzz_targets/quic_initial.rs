//! The QUIC Initial sniffer. Two ways in:
//!
//! - the input as datagrams (a length byte before each): whatever they
//!   hold, reading them never panics, and a second sniffer fed the same
//!   datagrams reaches the same result (no state outside the sniffer);
//! - the input as a ClientHello handshake message that a client protects
//!   in Initial packets (rustls seals them with the Initial keys), cut
//!   into CRYPTO frames that arrive shuffled over up to four datagrams,
//!   the first one sometimes led by a 0-RTT packet it coalesces:
//!   splicegate must read exactly what `sniff::parse_handshake` reads from
//!   the plain message — the decryption and reassembly add nothing and
//!   lose nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate::quic::{InitialSniffer, VERSION_1, VERSION_2};
use splicegate::sniff::parse_handshake;
use splicegate::testkit::{quic_crypto_frame, quic_initial};

const CAP: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        datagrams(rest);
    } else {
        sealed(mode, rest);
    }
});

fn datagrams(mut rest: &[u8]) {
    let mut list = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let n = (usize::from(len) * 8).min(tail.len());
        list.push(&tail[..n]);
        rest = &tail[n..];
    }
    let run = || {
        let first = list.first()?;
        let mut s = InitialSniffer::start(first, CAP).ok()?;
        let tag = s.tag();
        let mut last = None;
        for d in &list {
            // Whether a datagram belongs to the flow is read without
            // panicking, whatever it holds.
            let _ = tag.belongs(d);
            last = Some(s.feed(d));
            if matches!(last, Some(Ok(Some(_))) | Some(Err(_))) {
                break;
            }
        }
        last
    };
    assert_eq!(run(), run());
}

fn sealed(mode: u8, hello: &[u8]) {
    if hello.len() < 4 || hello.len() > 3000 {
        return;
    }
    let version = if mode & 2 == 0 { VERSION_1 } else { VERSION_2 };
    // Pieces of 64..=1000 bytes, dealt to 1-4 datagrams in an order the
    // mode byte picks.
    let piece = 64 + usize::from(mode >> 2) * 15;
    let pieces: Vec<(usize, &[u8])> = hello
        .chunks(piece)
        .enumerate()
        .map(|(i, c)| (i * piece, c))
        .collect();
    let datagrams = pieces.len().div_ceil(1).min(4).max(1);
    let mut frames = vec![Vec::new(); datagrams];
    for (k, (offset, bytes)) in pieces.iter().enumerate() {
        let slot = (k * usize::from(mode | 1)) % datagrams;
        let mut f = quic_crypto_frame(*offset as u64, bytes);
        if mode & 0x40 != 0 {
            f.insert(0, 0x01); // a PING between frames
        }
        // Reverse the order within a datagram for some modes.
        if mode & 0x80 != 0 {
            f.extend(std::mem::take(&mut frames[slot]));
            frames[slot] = f;
        } else {
            frames[slot].extend(f);
        }
    }
    let dcid = [mode; 8];
    let mut sealed: Vec<Vec<u8>> = frames
        .iter()
        .enumerate()
        .filter(|(_, f)| f.len() < 1100)
        .map(|(pn, f)| quic_initial(version, &dcid, b"c", pn as u64, f, 1200))
        .collect();
    if mode & 0x20 != 0 && version == VERSION_1 {
        // A 0-RTT packet (type 1, opaque to a relay) before the Initial.
        let mut zero_rtt = vec![0xd3];
        zero_rtt.extend(VERSION_1.to_be_bytes());
        zero_rtt.push(8);
        zero_rtt.extend(dcid);
        zero_rtt.push(1);
        zero_rtt.push(b'c');
        zero_rtt.extend([0x40, 100]);
        zero_rtt.extend([0xa5; 100]);
        if let Some(first) = sealed.first_mut() {
            zero_rtt.extend(std::mem::take(first));
            *first = zero_rtt;
        }
    }
    if sealed.len() != frames.len() {
        return; // a datagram would exceed one Initial
    }
    let expected = parse_handshake(hello);
    let mut s = InitialSniffer::start(&sealed[0], CAP).expect("our own Initial starts a flow");
    let mut got = None;
    for d in &sealed {
        match s.feed(d) {
            Ok(None) => continue,
            other => {
                got = Some(other);
                break;
            }
        }
    }
    let total =
        4 + ((usize::from(hello[1]) << 16) | (usize::from(hello[2]) << 8) | usize::from(hello[3]));
    match (got, expected) {
        // The message is complete and parses: splicegate reads the same.
        (Some(Ok(Some(h))), Ok(e)) => assert_eq!(h, e),
        // It announced more than it carries: still waiting.
        (None, _) => assert!(
            total > hello.len() || hello[0] != 1,
            "complete but no result"
        ),
        // Refusals agree that the hello is unusable, unless the hello is
        // longer than announced (the stream stops at its announced end).
        (Some(Err(_)), Err(_)) => {}
        (Some(Ok(Some(h))), Err(_)) => assert!(total < hello.len(), "read {h:?} from a bad hello"),
        (Some(Err(e)), Ok(_)) => assert!(total < hello.len(), "refused a good hello: {e}"),
        (Some(Ok(None)), _) => unreachable!(),
    }
}
