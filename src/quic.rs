//! The client's QUIC Initial packets, read far enough to route on the SNI.
//!
//! A QUIC connection starts with Initial packets protected only by keys
//! derived from the client's Destination Connection ID (RFC 9001 §5.2), so
//! a relay holding no secret of the agent can remove their header
//! protection, decrypt them, and read the TLS ClientHello in their CRYPTO
//! frames. rustls derives the keys and does the cryptography; this module
//! parses long headers (QUIC v1, RFC 9000, and v2, RFC 9369), decodes
//! packet numbers, walks frames, and reassembles the CRYPTO stream across
//! packets and datagrams — in any order and with overlaps, as browsers
//! shuffle their CRYPTO frames — until the ClientHello is complete.
//!
//! Nothing here does I/O; [`InitialSniffer`] is fed whole datagrams and
//! never changes them (it decrypts a copy): the relay forwards the
//! originals untouched.

use rustls::quic::{DirectionalKeys, Keys, Version};
use rustls::Side;

use crate::sniff::{parse_handshake, ClientHello, SniffError};

/// QUIC version 1 (RFC 9000).
pub const VERSION_1: u32 = 1;
/// QUIC version 2 (RFC 9369).
pub const VERSION_2: u32 = 0x6b33_43cf;
/// A client's datagram carrying an Initial is at least this long (RFC 9000
/// §14.1); shorter ones are dropped, as a server does.
pub const MIN_INITIAL_DATAGRAM: usize = 1200;
/// Shortest Destination Connection ID a client may choose for its first
/// Initial (RFC 9000 §7.2).
pub const MIN_CLIENT_DCID: usize = 8;
/// Longest connection ID in QUIC v1 and v2.
const MAX_CID: usize = 20;
/// Ranges of CRYPTO data held apart before they join up; a client needs a
/// handful (browsers split the hello into a few shuffled frames).
const MAX_CRYPTO_RANGES: usize = 64;

/// Why a datagram did not (or not yet) yield a ClientHello. The labels of
/// [`InitialError::kind`] are the `outcome` of
/// `splicegate_quic_initial_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitialError {
    /// Not a QUIC long-header packet at all.
    #[error("not QUIC: {0}")]
    NotQuic(String),
    /// A long header with a version splicegate cannot decrypt (version 0 is
    /// version negotiation).
    #[error("QUIC version 0x{0:08x} is not supported (v1 and v2 are)")]
    UnsupportedVersion(u32),
    /// A long header of another type (0-RTT, Handshake, Retry) where a new
    /// flow needs an Initial.
    #[error("a QUIC {0} packet where a new flow needs an Initial")]
    NotInitial(&'static str),
    /// The first datagram is shorter than a client's Initial may be.
    #[error("datagram of {0} bytes is below the 1200 bytes a client Initial is padded to")]
    TooShort(usize),
    /// Header fields that cannot be right.
    #[error("malformed QUIC Initial: {0}")]
    Malformed(String),
    /// Authentication failed: not an Initial for this connection ID, or
    /// corrupted.
    #[error("QUIC Initial failed to decrypt (corrupted, or not protected with this connection ID's keys)")]
    DecryptFailed,
    /// The CRYPTO data is not a usable ClientHello.
    #[error(transparent)]
    Hello(#[from] SniffError),
}

impl InitialError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            InitialError::NotQuic(_) => "not_quic",
            InitialError::UnsupportedVersion(_) => "unsupported_version",
            InitialError::NotInitial(_) => "not_initial",
            InitialError::TooShort(_) => "too_short",
            InitialError::Malformed(_) => "malformed",
            InitialError::DecryptFailed => "decrypt_failed",
            InitialError::Hello(SniffError::TooLarge { .. }) => "too_large",
            InitialError::Hello(_) => "bad_hello",
        }
    }
}

fn malformed(what: impl Into<String>) -> InitialError {
    InitialError::Malformed(what.into())
}

/// The fields of a long-header packet the relay needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongHeader<'a> {
    /// QUIC version.
    pub version: u32,
    /// Destination Connection ID.
    pub dcid: &'a [u8],
    /// Source Connection ID.
    pub scid: &'a [u8],
    /// An Initial packet (for its version's type bits).
    pub initial: bool,
    /// Offset of the (protected) packet number; Initial packets only.
    pub pn_offset: usize,
    /// Length of the whole packet within the datagram (coalesced packets
    /// follow it).
    pub len: usize,
}

/// Read a QUIC variable-length integer at `*at`.
fn varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let first = *buf.get(*at)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(*at..*at + len)?;
    let mut v = u64::from(first & 0x3f);
    for &b in &bytes[1..] {
        v = (v << 8) | u64::from(b);
    }
    *at += len;
    Some(v)
}

fn packet_type_name(version: u32, bits: u8) -> &'static str {
    // v2 rotates the type values (RFC 9369 §3.2).
    let v1_bits = if version == VERSION_2 {
        (bits + 3) % 4
    } else {
        bits
    };
    match v1_bits {
        0 => "Initial",
        1 => "0-RTT",
        2 => "Handshake",
        _ => "Retry",
    }
}

/// Parse the long header at the start of `buf` (one packet of a datagram).
pub fn parse_long_header(buf: &[u8]) -> Result<LongHeader<'_>, InitialError> {
    let Some(&first) = buf.first() else {
        return Err(InitialError::NotQuic("empty datagram".into()));
    };
    if first & 0x80 == 0 {
        return Err(InitialError::NotQuic(
            "short header (no connection this relay knows)".into(),
        ));
    }
    let Some(v) = buf.get(1..5) else {
        return Err(InitialError::NotQuic(
            "long header shorter than 5 bytes".into(),
        ));
    };
    let version = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
    if version != VERSION_1 && version != VERSION_2 {
        return Err(InitialError::UnsupportedVersion(version));
    }
    if first & 0x40 == 0 {
        return Err(malformed("fixed bit is 0"));
    }
    let mut at = 5;
    let cid = |at: &mut usize| -> Result<&[u8], InitialError> {
        let len = usize::from(
            *buf.get(*at)
                .ok_or_else(|| malformed("truncated connection ID"))?,
        );
        if len > MAX_CID {
            return Err(malformed(format!("connection ID of {len} bytes")));
        }
        let id = buf
            .get(*at + 1..*at + 1 + len)
            .ok_or_else(|| malformed("truncated connection ID"))?;
        *at += 1 + len;
        Ok(id)
    };
    let dcid = cid(&mut at)?;
    let scid = cid(&mut at)?;
    let type_bits = (first >> 4) & 0x03;
    let name = packet_type_name(version, type_bits);
    if name == "Retry" {
        // A Retry has no length field and ends the datagram.
        return Ok(LongHeader {
            version,
            dcid,
            scid,
            initial: false,
            pn_offset: 0,
            len: buf.len(),
        });
    }
    let initial = name == "Initial";
    if initial {
        let token = varint(buf, &mut at).ok_or_else(|| malformed("truncated token length"))?;
        at = usize::try_from(token)
            .ok()
            .and_then(|t| at.checked_add(t))
            .filter(|&end| end <= buf.len())
            .ok_or_else(|| malformed("token overruns the datagram"))?;
    }
    let length = varint(buf, &mut at).ok_or_else(|| malformed("truncated length"))?;
    let len = usize::try_from(length)
        .ok()
        .and_then(|l| at.checked_add(l))
        .filter(|&end| end <= buf.len())
        .ok_or_else(|| malformed(format!("length {length} overruns the datagram")))?;
    Ok(LongHeader {
        version,
        dcid,
        scid,
        initial,
        pn_offset: at,
        len,
    })
}

/// Recover a full packet number from its truncated encoding (RFC 9000
/// appendix A.3).
pub fn decode_packet_number(largest: Option<u64>, truncated: u64, bits: u32) -> u64 {
    let expected = largest.map_or(0, |l| l + 1);
    let win = 1u64 << bits;
    let half = win / 2;
    let candidate = (expected & !(win - 1)) | truncated;
    if candidate.saturating_add(half) <= expected && candidate < (1u64 << 62) - win {
        candidate + win
    } else if candidate > expected.saturating_add(half) && candidate >= win {
        candidate - win
    } else {
        candidate
    }
}

/// The keys that open a client's Initial packets for one connection ID.
pub struct InitialKeys {
    version: u32,
    keys: DirectionalKeys,
}

impl InitialKeys {
    /// Keys for the client's Initial packets of a connection whose first
    /// Destination Connection ID is `dcid`.
    pub fn new(version: u32, dcid: &[u8]) -> Result<InitialKeys, InitialError> {
        let v = match version {
            VERSION_1 => Version::V1,
            VERSION_2 => Version::V2,
            other => return Err(InitialError::UnsupportedVersion(other)),
        };
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .and_then(|s| s.quic_suite())
            .ok_or_else(|| malformed("no QUIC suite for TLS_AES_128_GCM_SHA256"))?;
        // As the server: `remote` opens what the client sent.
        let Keys { remote, .. } = suite.keys(dcid, Side::Server, v);
        Ok(InitialKeys {
            version,
            keys: remote,
        })
    }

    /// Remove header protection from the Initial at the start of `packet`
    /// (in place) and decrypt it; returns the packet number and the
    /// plaintext payload (a sub-slice of `packet`).
    pub fn open<'a>(
        &self,
        packet: &'a mut [u8],
        pn_offset: usize,
        largest: Option<u64>,
    ) -> Result<(u64, &'a [u8]), InitialError> {
        let sample_len = self.keys.header.sample_len();
        let sample_at = pn_offset + 4;
        if packet.len() < sample_at + sample_len {
            return Err(malformed(
                "packet too short for its header protection sample",
            ));
        }
        let (head, rest) = packet.split_at_mut(pn_offset);
        let (pn_field, after) = rest.split_at_mut(4);
        let sample = &after[..sample_len];
        self.keys
            .header
            .decrypt_in_place(sample, &mut head[0], pn_field)
            .map_err(|_| InitialError::DecryptFailed)?;
        let pn_len = usize::from(head[0] & 0x03) + 1;
        let truncated = pn_field[..pn_len]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let pn = decode_packet_number(largest, truncated, 8 * pn_len as u32);
        let header_len = pn_offset + pn_len;
        let (header, payload) = packet.split_at_mut(header_len);
        let plain = self
            .keys
            .packet
            .decrypt_in_place(pn, header, payload)
            .map_err(|_| InitialError::DecryptFailed)?;
        Ok((pn, plain))
    }

    /// The QUIC version these keys are for.
    pub fn version(&self) -> u32 {
        self.version
    }
}

/// Call `f(offset, data)` for each CRYPTO frame of a decrypted Initial
/// payload; refuse frames an Initial may not carry.
pub fn crypto_frames(
    payload: &[u8],
    mut f: impl FnMut(u64, &[u8]) -> Result<(), InitialError>,
) -> Result<(), InitialError> {
    let mut at = 0;
    while at < payload.len() {
        let ty = varint(payload, &mut at).ok_or_else(|| malformed("truncated frame type"))?;
        match ty {
            0x00 | 0x01 => {} // PADDING, PING
            0x02 | 0x03 => {
                // ACK: largest, delay, range count, first range, ranges
                // (gap, length), then ECN counts for 0x03.
                let mut field =
                    || varint(payload, &mut at).ok_or_else(|| malformed("truncated ACK"));
                field()?;
                field()?;
                let ranges = field()?;
                field()?;
                for _ in 0..ranges {
                    field()?;
                    field()?;
                }
                if ty == 0x03 {
                    for _ in 0..3 {
                        field()?;
                    }
                }
            }
            0x06 => {
                let offset =
                    varint(payload, &mut at).ok_or_else(|| malformed("truncated CRYPTO"))?;
                let len = varint(payload, &mut at).ok_or_else(|| malformed("truncated CRYPTO"))?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| at.checked_add(l))
                    .filter(|&e| e <= payload.len())
                    .ok_or_else(|| malformed("CRYPTO frame overruns the packet"))?;
                f(offset, &payload[at..end])?;
                at = end;
            }
            0x1c => {
                // CONNECTION_CLOSE: error code, frame type, reason.
                varint(payload, &mut at).ok_or_else(|| malformed("truncated CONNECTION_CLOSE"))?;
                varint(payload, &mut at).ok_or_else(|| malformed("truncated CONNECTION_CLOSE"))?;
                let len = varint(payload, &mut at)
                    .ok_or_else(|| malformed("truncated CONNECTION_CLOSE"))?;
                at = usize::try_from(len)
                    .ok()
                    .and_then(|l| at.checked_add(l))
                    .filter(|&e| e <= payload.len())
                    .ok_or_else(|| malformed("CONNECTION_CLOSE overruns the packet"))?;
            }
            other => {
                return Err(malformed(format!(
                    "frame type 0x{other:x} is not allowed in an Initial packet"
                )))
            }
        }
    }
    Ok(())
}

/// The CRYPTO stream of the Initial space, reassembled from frames in any
/// order, up to the ClientHello's length.
#[derive(Debug)]
pub struct CryptoStream {
    cap: usize,
    data: Vec<u8>,
    /// Received byte ranges, sorted and merged.
    ranges: Vec<(usize, usize)>,
}

impl CryptoStream {
    /// A stream that refuses a ClientHello longer than `cap` bytes.
    pub fn new(cap: usize) -> CryptoStream {
        CryptoStream {
            cap,
            data: Vec::new(),
            ranges: Vec::new(),
        }
    }

    /// Add one CRYPTO frame's data.
    pub fn insert(&mut self, offset: u64, bytes: &[u8]) -> Result<(), InitialError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let too_large = |len| {
            InitialError::Hello(SniffError::TooLarge {
                what: "QUIC CRYPTO data",
                len,
                cap: self.cap,
            })
        };
        let start = usize::try_from(offset).map_err(|_| too_large(usize::MAX))?;
        let end = start
            .checked_add(bytes.len())
            .ok_or_else(|| too_large(usize::MAX))?;
        if end > self.cap {
            return Err(too_large(end));
        }
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(bytes);
        // Merge [start, end) into the sorted ranges.
        let mut merged = (start, end);
        self.ranges.retain(|&(s, e)| {
            if s <= merged.1 && merged.0 <= e {
                merged = (merged.0.min(s), merged.1.max(e));
                false
            } else {
                true
            }
        });
        let at = self.ranges.partition_point(|&(s, _)| s < merged.0);
        self.ranges.insert(at, merged);
        if self.ranges.len() > MAX_CRYPTO_RANGES {
            return Err(malformed("CRYPTO data in too many separate pieces"));
        }
        Ok(())
    }

    /// Bytes received contiguously from offset 0.
    fn contiguous(&self) -> usize {
        match self.ranges.first() {
            Some(&(0, e)) => e,
            _ => 0,
        }
    }

    /// The ClientHello, once all of it arrived.
    pub fn hello(&self) -> Option<Result<ClientHello, InitialError>> {
        let have = self.contiguous();
        let h = self.data.get(..4).filter(|_| have >= 4)?;
        let total = 4 + ((usize::from(h[1]) << 16) | (usize::from(h[2]) << 8) | usize::from(h[3]));
        if h[0] != 1 {
            return Some(Err(InitialError::Hello(SniffError::Malformed(format!(
                "first handshake message has type {}, not ClientHello",
                h[0]
            )))));
        }
        if total > self.cap {
            return Some(Err(InitialError::Hello(SniffError::TooLarge {
                what: "handshake message",
                len: total,
                cap: self.cap,
            })));
        }
        (have >= total).then(|| parse_handshake(&self.data[..total]).map_err(InitialError::from))
    }
}

/// A flow's QUIC version and first Destination Connection ID: what its
/// Initial and 0-RTT packets carry until the agent's first answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTag {
    version: u32,
    dcid: [u8; MAX_CID],
    len: u8,
}

impl FlowTag {
    /// Whether `datagram` belongs to this flow's handshake: its first
    /// packet is a long-header packet (Initial or 0-RTT) of the flow's
    /// version for the flow's connection ID. The relay holds no other
    /// datagram for a flow whose hello is not complete.
    pub fn belongs(&self, datagram: &[u8]) -> bool {
        parse_long_header(datagram).is_ok_and(|h| {
            h.version == self.version && h.dcid == &self.dcid[..usize::from(self.len)]
        })
    }
}

/// Follows one new flow's Initial packets until its ClientHello is complete.
pub struct InitialSniffer {
    dcid: Vec<u8>,
    keys: InitialKeys,
    stream: CryptoStream,
    largest: Option<u64>,
}

thread_local! {
    /// A decrypted copy of one packet: one buffer per thread, not one per
    /// pending flow.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl std::fmt::Debug for InitialSniffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitialSniffer")
            .field("version", &self.keys.version)
            .field("dcid_len", &self.dcid.len())
            .field("largest", &self.largest)
            .finish_non_exhaustive()
    }
}

impl InitialSniffer {
    /// Start from the first datagram of a flow: it must carry a client
    /// Initial of a supported version — first or after other long-header
    /// packets it coalesces (RFC 9000 §12.2 fixes no order) —, be padded
    /// to 1200 bytes, with a connection ID of at least 8 bytes. Feed it
    /// (and later ones) to [`InitialSniffer::feed`].
    pub fn start(datagram: &[u8], cap: usize) -> Result<InitialSniffer, InitialError> {
        let mut rest = datagram;
        let mut first_other = None;
        let h = loop {
            let h = match parse_long_header(rest) {
                Ok(h) => h,
                // Nothing after the packets already seen is an Initial.
                Err(e) => match first_other {
                    Some(kind) if rest.len() < datagram.len() => {
                        return Err(InitialError::NotInitial(kind))
                    }
                    _ => return Err(e),
                },
            };
            if h.initial {
                break h;
            }
            first_other.get_or_insert(packet_type_name(h.version, (rest[0] >> 4) & 0x03));
            rest = &rest[h.len..];
            if rest.is_empty() || rest[0] & 0x80 == 0 {
                return Err(InitialError::NotInitial(first_other.unwrap_or("0-RTT")));
            }
        };
        if datagram.len() < MIN_INITIAL_DATAGRAM {
            return Err(InitialError::TooShort(datagram.len()));
        }
        if h.dcid.len() < MIN_CLIENT_DCID {
            return Err(malformed(format!(
                "client Destination Connection ID of {} bytes (at least {MIN_CLIENT_DCID})",
                h.dcid.len()
            )));
        }
        Ok(InitialSniffer {
            keys: InitialKeys::new(h.version, h.dcid)?,
            dcid: h.dcid.to_vec(),
            stream: CryptoStream::new(cap),
            largest: None,
        })
    }

    /// What tells this flow's handshake datagrams from others.
    pub fn tag(&self) -> FlowTag {
        let mut dcid = [0u8; MAX_CID];
        dcid[..self.dcid.len()].copy_from_slice(&self.dcid);
        FlowTag {
            version: self.keys.version(),
            dcid,
            len: self.dcid.len() as u8,
        }
    }

    /// Heap bytes this sniffer holds (its reassembly buffer included), for
    /// the relay's accounting of pending flows.
    pub fn heap_bytes(&self) -> usize {
        self.dcid.capacity()
            + self.stream.data.capacity()
            + self.stream.ranges.capacity() * std::mem::size_of::<(usize, usize)>()
    }

    /// The QUIC version of the flow.
    pub fn version(&self) -> u32 {
        self.keys.version()
    }

    /// Read the Initial packets of one datagram of the flow (coalesced
    /// packets of other types are skipped). Ok(Some) once the ClientHello
    /// is complete.
    pub fn feed(&mut self, datagram: &[u8]) -> Result<Option<ClientHello>, InitialError> {
        let mut rest = datagram;
        let mut opened = false;
        while !rest.is_empty() {
            if rest[0] & 0x80 == 0 {
                break; // a short-header packet ends the long ones
            }
            let h = match parse_long_header(rest) {
                Ok(h) => h,
                // Padding after the last packet may be zeros.
                Err(_) if opened => break,
                Err(e) => return Err(e),
            };
            let len = h.len;
            if h.initial && h.version == self.keys.version() && h.dcid == self.dcid.as_slice() {
                let packet = &rest[..len];
                let read = SCRATCH.with(|cell| {
                    let mut own = Vec::new();
                    let mut borrowed = cell.try_borrow_mut();
                    let scratch = match &mut borrowed {
                        Ok(b) => &mut **b,
                        Err(_) => &mut own,
                    };
                    scratch.clear();
                    scratch.extend_from_slice(packet);
                    let (pn, payload) = self.keys.open(scratch, h.pn_offset, self.largest)?;
                    let stream = &mut self.stream;
                    crypto_frames(payload, |offset, data| stream.insert(offset, data))?;
                    Ok(pn)
                });
                match read {
                    Ok(pn) => {
                        self.largest = Some(self.largest.map_or(pn, |l| l.max(pn)));
                        opened = true;
                    }
                    // A damaged packet after the flow's first: the client
                    // retransmits, as it would to a server that dropped it.
                    Err(InitialError::DecryptFailed) if self.largest.is_some() => {}
                    Err(e) => return Err(e),
                }
            }
            rest = &rest[len..];
        }
        match self.stream.hello() {
            Some(Ok(hello)) => Ok(Some(hello)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests;
