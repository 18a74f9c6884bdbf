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
