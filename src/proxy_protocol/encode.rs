//! PROXY headers splicegate sends to agents that accept them.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use super::{crc32c, TLV_CRC32C, V2_SIGNATURE};

/// A v1 header for a connection from `src` to `dst` (`UNKNOWN` when the
/// families differ).
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let line = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            format!(
                "PROXY TCP4 {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            format!(
                "PROXY TCP6 {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
        }
        _ => "PROXY UNKNOWN\r\n".to_owned(),
    };
    line.into_bytes()
}

/// A v2 PROXY-command header for `src` → `dst` carrying `tlvs` (type,
/// value) and, when `crc` is set, a CRC32C TLV.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, Vec<u8>)], crc: bool) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    let (src, dst) = match (src, dst) {
        (SocketAddr::V6(_), SocketAddr::V4(d)) => (
            src,
            SocketAddr::new(d.ip().to_ipv6_mapped().into(), d.port()),
        ),
        (SocketAddr::V4(s), SocketAddr::V6(_)) => (
            SocketAddr::new(s.ip().to_ipv6_mapped().into(), s.port()),
            dst,
        ),
        _ => (src, dst),
    };
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
        }
        (s, d) => {
            out.push(0x21);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&v6(s.ip()).octets());
            out.extend_from_slice(&v6(d.ip()).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    for (ty, value) in tlvs {
        push_tlv(&mut out, *ty, value);
    }
    let crc_at = out.len() + 3;
    if crc {
        push_tlv(&mut out, TLV_CRC32C, &[0, 0, 0, 0]);
    }
    let len = (out.len() - 16) as u16;
    out[14..16].copy_from_slice(&len.to_be_bytes());
    if crc {
        let c = crc32c(&out);
        out[crc_at..crc_at + 4].copy_from_slice(&c.to_be_bytes());
    }
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

pub(super) fn push_tlv(out: &mut Vec<u8>, ty: u8, value: &[u8]) {
    out.push(ty);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}
