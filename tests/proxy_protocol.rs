//! PROXY protocol in and out, end to end through the binary: headers built
//! from the spec (the crate's encoder is checked against hand-built bytes
//! in its unit tests), trust by source address, the AWS VPC endpoint TLV,
//! and every malformed-header case.

mod common;

use std::net::SocketAddr;

use common::{raw_client, recording_agent, Proxy};
use splicegate::proxy_protocol::{encode_v1, encode_v2, parse, Mode, Parsed, V2_SIGNATURE};
use splicegate::testkit::client_hello;

const VPCE: &str = "vpce-02c333708db2e72b7";

fn aws_tlv(id: &str) -> (u8, Vec<u8>) {
    (0xEA, [&[0x01u8][..], id.as_bytes()].concat())
}

fn real_client() -> SocketAddr {
    "203.0.113.45:51515".parse().unwrap()
}

fn nlb_side() -> SocketAddr {
    "10.0.1.5:8443".parse().unwrap()
}

fn cfg(agent: SocketAddr, listener_extra: &str, route_extra: &str) -> String {
    format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nhello_timeout = \"1s\"\nproxy_protocol = \"any\"\nproxy_trusted = [\"127.0.0.1/32\"]\n{listener_extra}\n\
         [[route]]\nsni = \"agent1.dcv.example\"\nagent = \"{agent}\"\n{route_extra}\n"
    )
}

fn hello() -> Vec<u8> {
    client_hello(Some("agent1.dcv.example"), &["http/1.1"], 1 << 14)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_header_and_hello_in_one_write_give_the_real_client_and_endpoint() {
    let hello = hello();
    let (agent, mut got) = recording_agent(hello.len()).await;
    let mut proxy = Proxy::start(Some(&cfg(agent, "", "")), &[]);
    let mut bytes = encode_v2(real_client(), nlb_side(), &[aws_tlv(VPCE)], true);
    bytes.extend_from_slice(&hello);
    let _c = raw_client(proxy.addr, &bytes);
    // The agent receives the hello only: the header is consumed.
    assert!(got.recv().await.unwrap() == hello);
    let ev = proxy.event("routed", |_| true);
    assert_eq!(ev["span"]["client"], real_client().to_string());
    assert_eq!(ev["span"]["vpce"], VPCE);
    assert!(ev["span"]["peer"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_hello_split_byte_by_byte() {
    let hello = hello();
    let (agent, mut got) = recording_agent(hello.len()).await;
    let mut proxy = Proxy::start(Some(&cfg(agent, "", "")), &[]);
    let mut bytes = encode_v2(
        real_client(),
        nlb_side(),
        &[aws_tlv(VPCE), (0x04, vec![0; 5])],
        true,
    );
    bytes.extend_from_slice(&hello);
    let mut c = std::net::TcpStream::connect(proxy.addr).unwrap();
    c.set_nodelay(true).unwrap();
    for b in &bytes {
        std::io::Write::write_all(&mut c, std::slice::from_ref(b)).unwrap();
    }
    assert!(got.recv().await.unwrap() == hello);
    assert_eq!(
        proxy.event("routed", |_| true)["span"]["client"],
        real_client().to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_header_and_local_header() {
    let hello = hello();
    let (agent, mut got) = recording_agent(hello.len()).await;
    let mut proxy = Proxy::start(Some(&cfg(agent, "", "")), &[]);
    let mut bytes = encode_v1(real_client(), nlb_side());
    bytes.extend_from_slice(&hello);
    let _c = raw_client(proxy.addr, &bytes);
    assert!(got.recv().await.unwrap() == hello);
    assert_eq!(
        proxy.event("routed", |_| true)["span"]["client"],
        real_client().to_string()
    );

    // LOCAL (a health check by the balancer itself): the peer is the client.
    let mut bytes = V2_SIGNATURE.to_vec();
    bytes.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    bytes.extend_from_slice(&hello);
    let c = raw_client(proxy.addr, &bytes);
    assert!(got.recv().await.unwrap() == hello);
    let ev = proxy.event("routed", |_| true);
    assert_eq!(ev["span"]["client"], c.local_addr().unwrap().to_string());
}

/// Send `bytes` from a trusted peer and expect `outcome` with `reason`.
async fn refused(bytes: &[u8], outcome: &str, reason: &str) {
    let (agent, _got) = recording_agent(1).await;
    let mut proxy = Proxy::start(Some(&cfg(agent, "", "")), &[]);
    let _c = raw_client(proxy.addr, bytes);
    let ev = proxy.closed(outcome);
    let got = ev["reason"].as_str().unwrap();
    assert!(got.contains(reason), "{got:?} lacks {reason:?}");
}

fn v2_good() -> Vec<u8> {
    encode_v2(real_client(), nlb_side(), &[aws_tlv(VPCE)], false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_v1_headers() {
    refused(
        b"PROXY TCP4 203.0.113.45 10.0.1.5 99999 8443\r\n",
        "proxy_invalid",
        "bad port \"99999\"",
    )
    .await;
    refused(
        b"PROXY TCP4 203.0.113.450 10.0.1.5 1 8443\r\n",
        "proxy_invalid",
        "bad TCP4 address",
    )
    .await;
    refused(
        b"PROXY TCP6 203.0.113.45 10.0.1.5 1 8443\r\n",
        "proxy_invalid",
        "bad TCP6 address",
    )
    .await;
    let long = [b"PROXY TCP4 ".as_slice(), &[b'9'; 110], b"\r\n"].concat();
    refused(&long, "proxy_invalid", "no CRLF within 107 bytes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_v2_headers() {
    let mut sig = v2_good();
    sig[3] = 0x0b;
    refused(
        &sig,
        "proxy_invalid",
        "expected a PROXY protocol v1 or v2 header",
    )
    .await;
    let mut ver = v2_good();
    ver[12] = 0x31;
    refused(&ver, "proxy_invalid", "unsupported version 3").await;
    let mut cmd = v2_good();
    cmd[12] = 0x2e;
    refused(&cmd, "proxy_invalid", "unknown command 0xe").await;
    let mut long = v2_good();
    long[14..16].copy_from_slice(&60000u16.to_be_bytes());
    refused(&long, "proxy_invalid", "exceeds the cap of 4096").await;
    // The announced length ends inside the AWS TLV.
    let mut trunc = v2_good();
    let len = u16::from_be_bytes([trunc[14], trunc[15]]) - 4;
    trunc[14..16].copy_from_slice(&len.to_be_bytes());
    trunc.truncate(16 + usize::from(len));
    refused(&trunc, "proxy_invalid", "bad PROXY v2 TLV").await;
    let mut crc = encode_v2(real_client(), nlb_side(), &[aws_tlv(VPCE)], true);
    crc[20] ^= 0xff;
    refused(&crc, "proxy_invalid", "CRC32C mismatch").await;
    // A header that never completes.
    refused(
        &v2_good()[..20],
        "proxy_timeout",
        "timed out after 1s waiting for the PROXY header",
    )
    .await;
    // A TLS hello where a header is required.
    refused(&hello(), "proxy_invalid", "got a TLS record").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_from_untrusted_sources_are_refused_and_direct_clients_work() {
    let hello = hello();
    let (agent, mut got) = recording_agent(hello.len()).await;
    // Only 127.0.0.2 is trusted; the test connects from 127.0.0.1.
    let text = cfg(agent, "", "").replace("127.0.0.1/32", "127.0.0.2/32");
    let mut proxy = Proxy::start(Some(&text), &[]);
    let mut bytes = v2_good();
    bytes.extend_from_slice(&hello);
    let _c = raw_client(proxy.addr, &bytes);
    let ev = proxy.closed("proxy_untrusted");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("from untrusted source 127.0.0.1:"),
        "{ev}"
    );
    // A direct client without a header is served, with its own address.
    let c = raw_client(proxy.addr, &hello);
    assert!(got.recv().await.unwrap() == hello);
    assert_eq!(
        proxy.event("routed", |_| true)["span"]["client"],
        c.local_addr().unwrap().to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_header_is_not_honoured() {
    let (agent, _got) = recording_agent(1).await;
    let mut proxy = Proxy::start(Some(&cfg(agent, "", "")), &[]);
    // The NLB's header, then one the client sent itself claiming another
    // address and endpoint.
    let mut bytes = v2_good();
    bytes.extend_from_slice(&encode_v2(
        "198.51.100.1:1".parse().unwrap(),
        nlb_side(),
        &[aws_tlv("vpce-evil")],
        false,
    ));
    bytes.extend_from_slice(&hello());
    let _c = raw_client(proxy.addr, &bytes);
    let ev = proxy.closed("proxy_untrusted");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("a second PROXY header follows the first"),
        "{ev}"
    );
    assert_eq!(ev["span"]["client"], real_client().to_string());
    assert_eq!(ev["span"]["vpce"], VPCE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpc_endpoint_allowlists_on_listener_and_route() {
    let hello = hello();
    let (agent, mut got) = recording_agent(hello.len()).await;
    let text = cfg(agent, &format!("allowed_vpce = [\"{VPCE}\"]"), "");
    let mut proxy = Proxy::start(Some(&text), &[]);
    let send = |id: &str| {
        let mut b = encode_v2(real_client(), nlb_side(), &[aws_tlv(id)], false);
        b.extend_from_slice(&hello);
        b
    };
    let _ok = raw_client(proxy.addr, &send(VPCE));
    assert!(got.recv().await.unwrap() == hello);
    let _bad = raw_client(proxy.addr, &send("vpce-0other"));
    let ev = proxy.closed("vpce_not_allowed");
    assert!(ev["reason"]
        .as_str()
        .unwrap()
        .contains("endpoint vpce-0other is not allowed on this listener"));
    assert_eq!(ev["span"]["vpce"], "vpce-0other");

    // Route-level restriction.
    let text = cfg(agent, "", &format!("allowed_vpce = [\"{VPCE}\"]"));
    let mut proxy = Proxy::start(Some(&text), &[]);
    let _bad = raw_client(proxy.addr, &send("vpce-0other"));
    let ev = proxy.closed("vpce_not_allowed");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("route exact:agent1.dcv.example does not allow VPC endpoint vpce-0other"),
        "{ev}"
    );
    let _ok = raw_client(proxy.addr, &send(VPCE));
    assert!(got.recv().await.unwrap() == hello);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_out_to_agents() {
    let hello = hello();
    let incoming = encode_v2(real_client(), nlb_side(), &[aws_tlv(VPCE)], false);
    // v2 out with pass-through TLVs: same addresses and TLVs, no CRC.
    let (agent, mut got) = recording_agent(incoming.len() + hello.len()).await;
    let text = cfg(agent, "send_proxy = \"v2\"\nsend_proxy_tlvs = true", "");
    let _proxy = Proxy::start(Some(&text), &[]);
    let mut bytes = incoming.clone();
    bytes.extend_from_slice(&hello);
    let _c = raw_client(_proxy.addr, &bytes);
    let seen = got.recv().await.unwrap();
    let Ok(Parsed::Done(h, n)) = parse(&seen, Mode::V2) else {
        panic!("agent did not get a v2 header")
    };
    assert_eq!(h.source, Some(real_client()));
    assert_eq!(h.destination, Some(nlb_side()));
    assert_eq!(h.tlvs.vpce_id.as_deref(), Some(VPCE));
    assert!(seen[n..] == hello[..]);

    // v1 out from a direct client: its own address, the listener's address.
    let v1_len = encode_v1(
        "127.0.0.1:65535".parse().unwrap(),
        "127.0.0.1:65535".parse().unwrap(),
    )
    .len();
    let (agent, mut got) = recording_agent(hello.len() + 20).await;
    let text = cfg(agent, "send_proxy = \"v1\"", "").replace("127.0.0.1/32", "127.0.0.2/32");
    let proxy = Proxy::start(Some(&text), &[]);
    let c = raw_client(proxy.addr, &hello);
    let seen = got.recv().await.unwrap();
    let line = String::from_utf8_lossy(&seen[..seen.iter().position(|&b| b == b'\n').unwrap() + 1])
        .into_owned();
    let expect = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
        c.local_addr().unwrap().port(),
        proxy.addr.port()
    );
    assert_eq!(line, expect);
    assert!(line.len() <= v1_len);
}
