//! PROXY protocol (HAProxy's spec, versions 1 and 2): the header an AWS
//! Network Load Balancer puts in front of each connection to carry the real
//! client address and, over PrivateLink, the VPC endpoint id.
//!
//! [`parse`] is pure and incremental: call it with the bytes received so far
//! until it returns [`Parsed::Done`] with the header length; whatever follows
//! (usually the ClientHello, often in the same segment) belongs to the next
//! step. [`encode_v1`] and [`encode_v2`] build headers for agents that accept
//! them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Longest v1 line, CRLF included.
pub const V1_MAX: usize = 107;
/// Longest v2 header accepted (16-byte fixed part plus addresses and TLVs).
/// The spec allows up to 65 551; real senders (AWS, HAProxy) send well under
/// 1 KiB, so anything above this is treated as an attack.
pub const V2_MAX: usize = 4096;

const TLV_ALPN: u8 = 0x01;
const TLV_AUTHORITY: u8 = 0x02;
const TLV_CRC32C: u8 = 0x03;
const TLV_NOOP: u8 = 0x04;
const TLV_UNIQUE_ID: u8 = 0x05;
const TLV_SSL: u8 = 0x20;
const TLV_SSL_VERSION: u8 = 0x21;
const TLV_SSL_CN: u8 = 0x22;
const TLV_NETNS: u8 = 0x30;
const TLV_AWS: u8 = 0xEA;
const AWS_VPCE_ID: u8 = 0x01;

/// Which versions a listener expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No header expected; one that arrives is not a ClientHello.
    #[default]
    Off,
    /// Version 1 (text) only.
    V1,
    /// Version 2 (binary) only.
    V2,
    /// Either version.
    Any,
}

/// LOCAL (sent by the balancer itself, e.g. health checks) or PROXY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The connection was made by the sender itself; addresses carry no
    /// client information.
    Local,
    /// A relayed connection.
    Proxy,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2.
    pub version: u8,
    /// LOCAL or PROXY (v1 is always PROXY; `UNKNOWN` has no addresses).
    pub command: Command,
    /// The original client (None for LOCAL, UNKNOWN, UNIX or UNSPEC).
    pub source: Option<SocketAddr>,
    /// The original destination.
    pub destination: Option<SocketAddr>,
    /// TLVs (v2 only).
    pub tlvs: Tlvs,
}

/// The TLVs splicegate understands, plus every TLV as received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tlvs {
    /// ALPN negotiated by the sender (0x01).
    pub alpn: Option<Vec<u8>>,
    /// Host name the client asked for, typically the SNI (0x02).
    pub authority: Option<String>,
    /// Opaque connection id (0x05).
    pub unique_id: Option<Vec<u8>>,
    /// TLS details when the sender terminated TLS (0x20).
    pub ssl: Option<SslInfo>,
    /// Network namespace name (0x30).
    pub netns: Option<String>,
    /// AWS PrivateLink VPC endpoint id (0xEA, subtype 0x01).
    pub vpce_id: Option<String>,
    /// Every TLV in order, as (type, value), CRC32C and NOOP excluded; used
    /// to pass TLVs through to agents.
    pub raw: Vec<(u8, Vec<u8>)>,
}

/// The SSL TLV's summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SslInfo {
    /// Client flags (bit 0: connected over SSL/TLS).
    pub client: u8,
    /// 0 when the client certificate verified.
    pub verify: u32,
    /// TLS version string (0x21).
    pub version: Option<String>,
    /// Client certificate common name (0x22).
    pub cn: Option<String>,
}

/// Why a header was refused. Each is a distinct close reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The bytes are not a PROXY header of an expected version.
    #[error("expected a PROXY protocol {expected} header, got {got}")]
    Missing {
        /// What the listener expects.
        expected: &'static str,
        /// What arrived instead.
        got: String,
    },
    /// A v1 line is malformed.
    #[error("bad PROXY v1 header: {0}")]
    V1(String),
    /// The v2 version nibble is not 2.
    #[error("PROXY v2 header with unsupported version {0}")]
    Version(u8),
    /// The v2 command nibble is not LOCAL or PROXY.
    #[error("PROXY v2 header with unknown command 0x{0:x}")]
    Command(u8),
    /// The v2 family/transport byte is unknown.
    #[error("PROXY v2 header with unknown address family/transport 0x{0:02x}")]
    Family(u8),
    /// The announced length exceeds the cap.
    #[error("PROXY v2 header of {len} bytes exceeds the cap of {cap}")]
    TooLong {
        /// Announced total length.
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// The address block is shorter than the family requires.
    #[error("PROXY v2 address block of {got} bytes is too short for {family} ({need} needed)")]
    ShortAddresses {
        /// Family name.
        family: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A TLV is truncated or invalid.
    #[error("bad PROXY v2 TLV: {0}")]
    Tlv(String),
    /// The CRC32C TLV does not match.
    #[error("PROXY v2 CRC32C mismatch: header says {expected:08x}, computed {computed:08x}")]
    Crc32c {
        /// Value in the TLV.
        expected: u32,
        /// Value computed.
        computed: u32,
    },
}

impl ProxyError {
    /// Stable short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Missing { .. } => "missing",
            ProxyError::V1(_) => "bad_v1",
            ProxyError::Version(_) => "bad_version",
            ProxyError::Command(_) => "bad_command",
            ProxyError::Family(_) => "bad_family",
            ProxyError::TooLong { .. } => "too_long",
            ProxyError::ShortAddresses { .. } => "bad_addresses",
            ProxyError::Tlv(_) => "bad_tlv",
            ProxyError::Crc32c { .. } => "bad_crc32c",
        }
    }
}

/// Result of [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // one per connection, never stored
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A complete header of this many bytes.
    Done(Header, usize),
}

/// Whether `buf` starts like a PROXY header of either version (enough
/// bytes permitting). Used to refuse headers from untrusted peers and a
/// second header after the first.
pub fn looks_like_header(buf: &[u8]) -> bool {
    let n = buf.len().min(V2_SIGNATURE.len());
    (n > 0 && buf[..n] == V2_SIGNATURE[..n]) || {
        let m = buf.len().min(6);
        m > 0 && buf[..m] == b"PROXY "[..m]
    }
}

/// Whether `buf` starts with a PROXY header: `Some(true)` certainly (full
/// v2 signature or `PROXY `), `Some(false)` possibly (a proper prefix of
/// one), `None` not.
pub fn header_start(buf: &[u8]) -> Option<bool> {
    let full = |sig: &[u8]| buf.len() >= sig.len() && buf[..sig.len()] == *sig;
    if full(&V2_SIGNATURE) || full(b"PROXY ") {
        return Some(true);
    }
    (!buf.is_empty() && looks_like_header(buf)).then_some(false)
}

/// Parse a header at the start of `buf`.
pub fn parse(buf: &[u8], mode: Mode) -> Result<Parsed, ProxyError> {
    let v1_ok = matches!(mode, Mode::V1 | Mode::Any);
    let v2_ok = matches!(mode, Mode::V2 | Mode::Any);
    let expected = match mode {
        Mode::V1 => "v1",
        Mode::V2 => "v2",
        _ => "v1 or v2",
    };
    let n = buf.len().min(V2_SIGNATURE.len());
    if v2_ok && buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(Parsed::Incomplete)
        } else {
            parse_v2(buf)
        };
    }
    let m = buf.len().min(6);
    if v1_ok && buf[..m] == b"PROXY "[..m] {
        return if m < 6 {
            Ok(Parsed::Incomplete)
        } else {
            parse_v1(buf)
        };
    }
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let got = if looks_like_header(buf) {
        let v = if buf[0] == b'P' { "v1" } else { "v2" };
        format!("a {v} header")
    } else if buf[0] == 0x16 {
        "a TLS record (the sender is not configured to send PROXY headers?)".to_owned()
    } else {
        format!("bytes starting 0x{:02x}", buf[0])
    };
    Err(ProxyError::Missing { expected, got })
}

/// A byte a v1 line may not carry (anything but printable ASCII before the
/// CRLF), as an error naming it and its offset.
fn v1_bad_byte(line: &[u8]) -> Option<ProxyError> {
    let at = line.iter().position(|&b| !(0x20..0x7f).contains(&b))?;
    Some(ProxyError::V1(format!(
        "unexpected byte 0x{:02x} at offset {at}",
        line[at]
    )))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::V1(format!("no CRLF within {V1_MAX} bytes")));
        }
        // A CR as the last byte may start the CRLF still to come.
        let seen = window.strip_suffix(b"\r").unwrap_or(window);
        return match v1_bad_byte(seen) {
            Some(e) => Err(e),
            None => Ok(Parsed::Incomplete),
        };
    };
    // The same bytes are refused whether the line is complete or not.
    if let Some(e) = v1_bad_byte(&window[..end]) {
        return Err(e);
    }
    let line =
        std::str::from_utf8(&window[..end]).map_err(|_| ProxyError::V1("not ASCII".into()))?;
    let bad = |why: &str| ProxyError::V1(format!("{why} in {line:?}"));
    let parts: Vec<&str> = line.split(' ').collect();
    let header = |source, destination| Header {
        version: 1,
        command: Command::Proxy,
        source,
        destination,
        tlvs: Tlvs::default(),
    };
    match parts.get(1).copied() {
        Some("UNKNOWN") => Ok(Parsed::Done(header(None, None), end + 2)),
        Some(proto @ ("TCP4" | "TCP6")) => {
            if parts.len() != 6 {
                return Err(bad("expected 6 fields"));
            }
            let ip = |s: &str| -> Result<IpAddr, ProxyError> {
                let ip = if proto == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| bad(&format!("bad {proto} address {s:?}")))
            };
            let port = |s: &str| -> Result<u16, ProxyError> {
                let ok = !s.is_empty()
                    && s.len() <= 5
                    && s.bytes().all(|b| b.is_ascii_digit())
                    && (s == "0" || !s.starts_with('0'));
                ok.then(|| s.parse::<u16>().ok())
                    .flatten()
                    .ok_or_else(|| bad(&format!("bad port {s:?}")))
            };
            let src = SocketAddr::new(ip(parts[2])?, port(parts[4])?);
            let dst = SocketAddr::new(ip(parts[3])?, port(parts[5])?);
            Ok(Parsed::Done(header(Some(src), Some(dst)), end + 2))
        }
        _ => Err(bad("unknown protocol")),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < 16 {
        // Check what is already visible.
        if let Some(&vc) = buf.get(12) {
            check_ver_cmd(vc)?;
        }
        return Ok(Parsed::Incomplete);
    }
    let command = check_ver_cmd(buf[12])?;
    let fam = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if total > V2_MAX {
        return Err(ProxyError::TooLong {
            len: total,
            cap: V2_MAX,
        });
    }
    let (family, need) = match fam {
        0x00 => ("UNSPEC", 0),
        0x11 | 0x12 => ("IPv4", 12),
        0x21 | 0x22 => ("IPv6", 36),
        0x31 | 0x32 => ("UNIX", 216),
        other => return Err(ProxyError::Family(other)),
    };
    if len < need {
        return Err(ProxyError::ShortAddresses {
            family,
            got: len,
            need,
        });
    }
    if buf.len() < total {
        return Ok(Parsed::Incomplete);
    }
    let header = &buf[..total];
    let body = &header[16..];
    let (source, destination) = match (command, fam) {
        (Command::Local, _) => (None, None),
        (_, 0x11 | 0x12) => {
            let src = Ipv4Addr::from(<[u8; 4]>::try_from(&body[0..4]).expect("4 bytes"));
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&body[4..8]).expect("4 bytes"));
            let sp = u16::from_be_bytes([body[8], body[9]]);
            let dp = u16::from_be_bytes([body[10], body[11]]);
            (
                Some(SocketAddr::new(src.into(), sp)),
                Some(SocketAddr::new(dst.into(), dp)),
            )
        }
        (_, 0x21 | 0x22) => {
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&body[0..16]).expect("16 bytes"));
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&body[16..32]).expect("16 bytes"));
            let sp = u16::from_be_bytes([body[32], body[33]]);
            let dp = u16::from_be_bytes([body[34], body[35]]);
            (
                Some(SocketAddr::new(src.into(), sp)),
                Some(SocketAddr::new(dst.into(), dp)),
            )
        }
        _ => (None, None),
    };
    // With an unspecified family what follows has no defined layout
    // (HAProxy and ppp skip it too): no TLVs are read from it.
    let tlvs = if fam == 0x00 {
        Tlvs::default()
    } else {
        parse_tlvs(header, 16 + need)?
    };
    Ok(Parsed::Done(
        Header {
            version: 2,
            command,
            source,
            destination,
            tlvs,
        },
        total,
    ))
}

fn check_ver_cmd(vc: u8) -> Result<Command, ProxyError> {
    if vc >> 4 != 2 {
        return Err(ProxyError::Version(vc >> 4));
    }
    match vc & 0x0f {
        0 => Ok(Command::Local),
        1 => Ok(Command::Proxy),
        c => Err(ProxyError::Command(c)),
    }
}

fn parse_tlvs(header: &[u8], start: usize) -> Result<Tlvs, ProxyError> {
    let mut out = Tlvs::default();
    let mut at = start;
    while at < header.len() {
        let Some(h) = header.get(at..at + 3) else {
            return Err(ProxyError::Tlv(format!(
                "truncated TLV header at offset {at}"
            )));
        };
        let (ty, len) = (h[0], usize::from(u16::from_be_bytes([h[1], h[2]])));
        let Some(value) = header.get(at + 3..at + 3 + len) else {
            return Err(ProxyError::Tlv(format!(
                "TLV 0x{ty:02x} of {len} bytes overruns the header at offset {at}"
            )));
        };
        let text = |what: &str| -> Result<String, ProxyError> {
            std::str::from_utf8(value)
                .map(|v| crate::logging::printable(v).into_owned())
                .map_err(|_| ProxyError::Tlv(format!("{what} TLV is not UTF-8")))
        };
        match ty {
            TLV_CRC32C => {
                let expected =
                    u32::from_be_bytes(value.try_into().map_err(|_| {
                        ProxyError::Tlv(format!("CRC32C TLV has {len} bytes, not 4"))
                    })?);
                let mut copy = header.to_vec();
                copy[at + 3..at + 7].fill(0);
                let computed = crc32c(&copy);
                if computed != expected {
                    return Err(ProxyError::Crc32c { expected, computed });
                }
            }
            TLV_NOOP => {}
            _ => {
                match ty {
                    TLV_ALPN => out.alpn = Some(value.to_vec()),
                    TLV_AUTHORITY => out.authority = Some(text("AUTHORITY")?),
                    TLV_UNIQUE_ID => {
                        if len > 128 {
                            return Err(ProxyError::Tlv(format!(
                                "UNIQUE_ID of {len} bytes exceeds 128"
                            )));
                        }
                        out.unique_id = Some(value.to_vec());
                    }
                    TLV_SSL => out.ssl = Some(parse_ssl(value)?),
                    TLV_NETNS => out.netns = Some(text("NETNS")?),
                    TLV_AWS if value.first() == Some(&AWS_VPCE_ID) => {
                        let id = std::str::from_utf8(&value[1..]).map_err(|_| {
                            ProxyError::Tlv("AWS VPC endpoint id is not ASCII".into())
                        })?;
                        out.vpce_id = Some(crate::logging::printable(id).into_owned());
                    }
                    _ => {}
                }
                out.raw.push((ty, value.to_vec()));
            }
        }
        at += 3 + len;
    }
    Ok(out)
}

fn parse_ssl(value: &[u8]) -> Result<SslInfo, ProxyError> {
    if value.len() < 5 {
        return Err(ProxyError::Tlv("SSL TLV shorter than 5 bytes".into()));
    }
    let mut info = SslInfo {
        client: value[0],
        verify: u32::from_be_bytes([value[1], value[2], value[3], value[4]]),
        ..SslInfo::default()
    };
    let mut at = 5;
    while at < value.len() {
        let Some(h) = value.get(at..at + 3) else {
            return Err(ProxyError::Tlv("truncated SSL sub-TLV".into()));
        };
        let (ty, len) = (h[0], usize::from(u16::from_be_bytes([h[1], h[2]])));
        let Some(v) = value.get(at + 3..at + 3 + len) else {
            return Err(ProxyError::Tlv(format!(
                "SSL sub-TLV 0x{ty:02x} overruns the SSL TLV"
            )));
        };
        let s = crate::logging::printable(&String::from_utf8_lossy(v)).into_owned();
        match ty {
            TLV_SSL_VERSION => info.version = Some(s),
            TLV_SSL_CN => info.cn = Some(s),
            _ => {}
        }
        at += 3 + len;
    }
    Ok(info)
}

/// CRC32C (Castagnoli), as the PROXY v2 CRC32C TLV uses.
pub fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Local => "LOCAL",
            Command::Proxy => "PROXY",
        })
    }
}

mod encode;
mod read;
#[cfg(test)]
mod tests;

pub use encode::{encode_v1, encode_v2};
pub use read::{read_header, read_optional, ReadError};
