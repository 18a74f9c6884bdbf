//! Test helpers: synthetic ClientHellos and TLS record framing, and the
//! demo's loopback agents again under this name. Compiled for the crate's
//! own tests and with the `testkit` feature (the integration tests and the
//! benchmarks turn it on); not part of the shipped binary.

pub use crate::demo::agents::*;

/// A minimal well-formed TLS 1.2/1.3 ClientHello carrying `sni` and
/// `alpn`, with a GREASE extension, split into records of at most
/// `per_record` handshake bytes.
pub fn client_hello(sni: Option<&str>, alpn: &[&str], per_record: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    let mut push = |ty: u16, data: &[u8]| {
        exts.extend_from_slice(&ty.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(data);
    };
    push(0x0a0a, &[]);
    if let Some(name) = sni {
        let mut d = Vec::new();
        d.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        d.push(0);
        d.extend_from_slice(&(name.len() as u16).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        push(0, &d);
    }
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p.as_bytes());
        }
        let mut d = (list.len() as u16).to_be_bytes().to_vec();
        d.extend_from_slice(&list);
        push(16, &d);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    frame_records(&hs, per_record)
}

/// Frame handshake bytes into TLS handshake records of at most
/// `per_record` bytes each.
pub fn frame_records(handshake: &[u8], per_record: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in handshake.chunks(per_record.max(1)) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Extract the handshake payload from a buffer of complete handshake
/// records (the inverse of [`frame_records`]).
pub fn unframe_records(mut records: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while !records.is_empty() {
        let len = usize::from(u16::from_be_bytes([*records.get(3)?, *records.get(4)?]));
        out.extend_from_slice(records.get(5..5 + len)?);
        records = &records[5 + len..];
    }
    Some(out)
}

/// A client Initial datagram as a QUIC client sends it: long header for
/// `version` (v1 or v2) with `dcid` and `scid`, packet number `pn` in four
/// bytes, `frames` as the payload padded with PADDING frames so the
/// datagram is `datagram_len` bytes (or as long as it must be), protected
/// with the Initial keys of `dcid` (rustls derives them).
pub fn quic_initial(
    version: u32,
    dcid: &[u8],
    scid: &[u8],
    pn: u64,
    frames: &[u8],
    datagram_len: usize,
) -> Vec<u8> {
    use rustls::quic::Version;
    use rustls::Side;
    let v = if version == crate::quic::VERSION_2 {
        Version::V2
    } else {
        Version::V1
    };
    let type_bits: u8 = if version == crate::quic::VERSION_2 {
        1
    } else {
        0
    };
    let mut header = vec![0xc0 | (type_bits << 4) | 0x03];
    header.extend_from_slice(&version.to_be_bytes());
    header.push(dcid.len() as u8);
    header.extend_from_slice(dcid);
    header.push(scid.len() as u8);
    header.extend_from_slice(scid);
    header.push(0); // no token
    let fixed = header.len() + 2 + 4 + 16; // length varint, pn, AEAD tag
    let mut payload = frames.to_vec();
    if fixed + payload.len() < datagram_len {
        payload.resize(datagram_len - fixed, 0);
    }
    let length = 4 + payload.len() + 16;
    assert!(length < 1 << 14, "the test packet fits a 2-byte length");
    header.extend_from_slice(&(0x4000 | length as u16).to_be_bytes());
    let pn_offset = header.len();
    header.extend_from_slice(&(pn as u32).to_be_bytes());
    let keys = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|s| s.quic_suite())
        .expect("QUIC suite")
        .keys(dcid, Side::Client, v);
    let tag = keys
        .local
        .packet
        .encrypt_in_place(pn, &header, &mut payload)
        .expect("seal");
    let mut packet = header;
    packet.extend_from_slice(&payload);
    packet.extend_from_slice(tag.as_ref());
    let sample = packet[pn_offset + 4..pn_offset + 20].to_vec();
    let (head, rest) = packet.split_at_mut(pn_offset);
    keys.local
        .header
        .encrypt_in_place(&sample, &mut head[0], &mut rest[..4])
        .expect("header protection");
    packet
}

/// A CRYPTO frame carrying `data` at `offset`.
pub fn quic_crypto_frame(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x06];
    quic_varint(&mut f, offset);
    quic_varint(&mut f, data.len() as u64);
    f.extend_from_slice(data);
    f
}

/// Append a QUIC variable-length integer.
pub fn quic_varint(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=63 => out.push(v as u8),
        64..=16383 => out.extend_from_slice(&(0x4000 | v as u16).to_be_bytes()),
        16384..=0x3fff_ffff => out.extend_from_slice(&(0x8000_0000 | v as u32).to_be_bytes()),
        _ => out.extend_from_slice(&(0xc000_0000_0000_0000 | v).to_be_bytes()),
    }
}

/// The datagrams of a client whose ClientHello (SNI `sni`, ALPN `alpn`,
/// grown by `extra` bytes of an unknown extension) is cut into
/// `chunk`-byte CRYPTO frames, one Initial per datagram of 1200 bytes.
pub fn quic_hello_datagrams(
    version: u32,
    dcid: &[u8],
    sni: Option<&str>,
    alpn: &[&str],
    extra: usize,
    chunk: usize,
) -> Vec<Vec<u8>> {
    let hello = quic_client_hello(sni, alpn, extra);
    hello
        .chunks(chunk.max(1))
        .enumerate()
        .map(|(i, piece)| {
            let frame = quic_crypto_frame((i * chunk) as u64, piece);
            quic_initial(version, dcid, b"client", i as u64, &frame, 1200)
        })
        .collect()
}

/// A ClientHello handshake message (no record layer), grown by `extra`
/// bytes of an unknown extension, as QUIC carries it in CRYPTO frames.
pub fn quic_client_hello(sni: Option<&str>, alpn: &[&str], extra: usize) -> Vec<u8> {
    let records = client_hello(sni, alpn, 1 << 14);
    let mut msg = unframe_records(&records).expect("well-formed records");
    if extra > 0 {
        // Append one extension 0xff01 of `extra` bytes and fix the lengths:
        // handshake (bytes 1..4), then the extensions block (its last two
        // length bytes sit right before the first extension).
        let ext_len_at = extensions_length_offset(&msg);
        let mut ext = vec![0xff, 0x01];
        ext.extend_from_slice(&(extra as u16).to_be_bytes());
        ext.resize(4 + extra, 0x61);
        msg.extend_from_slice(&ext);
        let ext_total =
            u16::from_be_bytes([msg[ext_len_at], msg[ext_len_at + 1]]) as usize + ext.len();
        msg[ext_len_at..ext_len_at + 2].copy_from_slice(&(ext_total as u16).to_be_bytes());
        let body = msg.len() - 4;
        msg[1..4].copy_from_slice(&(body as u32).to_be_bytes()[1..]);
    }
    msg
}

/// Offset of the extensions-block length in a ClientHello message.
fn extensions_length_offset(msg: &[u8]) -> usize {
    // header 4, version 2, random 32, session id, cipher suites, compression.
    let mut at = 4 + 2 + 32;
    at += 1 + usize::from(msg[at]);
    at += 2 + usize::from(u16::from_be_bytes([msg[at], msg[at + 1]]));
    at += 1 + usize::from(msg[at]);
    at
}
