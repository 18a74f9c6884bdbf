//! Unit tests of the request-head parser, the rewrite and splicegate's own responses.

use super::*;

#[test]
fn parses_and_rewrites_a_websocket_handshake() {
    let raw = b"GET /10.0.0.1/ws?t=1 HTTP/1.1\r\nHost: proxy\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: abc\r\nX-Forwarded-For: 1.1.1.1\r\nKeep-Alive: 5\r\n\r\nBODY";
    let h = parse(raw).unwrap();
    assert_eq!(
        (h.method, h.target, h.minor),
        ("GET", "/10.0.0.1/ws?t=1", 1)
    );
    assert!(h.websocket);
    assert_eq!(&raw[h.len..], b"BODY");
    let out = rewrite(
        &h,
        "/ws?t=1",
        Some(Forwarded {
            client: "192.0.2.7".parse().unwrap(),
        }),
    );
    let out = String::from_utf8(out).unwrap();
    assert_eq!(
        out,
        "GET /ws?t=1 HTTP/1.1\r\nHost: proxy\r\nSec-WebSocket-Key: abc\r\nX-Real-IP: 192.0.2.7\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: https\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
}

#[test]
fn plain_requests_close_after_one_response() {
    let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n";
    let h = parse(raw).unwrap();
    assert!(!h.websocket);
    let out = String::from_utf8(rewrite(&h, "/", None)).unwrap();
    assert_eq!(
        out,
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn body_framing() {
    let h = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
        .unwrap();
    assert_eq!(h.body, Body::Length(5));
    let h = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    assert_eq!(h.body, Body::Chunked);
    assert_eq!(
        parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap().body,
        Body::None
    );
}

#[test]
fn absolute_form_and_http10() {
    let h = parse(b"GET https://proxy:8443/desk1/x?y HTTP/1.1\r\nHost: proxy\r\n\r\n").unwrap();
    assert_eq!(h.target, "/desk1/x?y");
    let h = parse(b"GET http://proxy HTTP/1.1\r\nHost: proxy\r\n\r\n").unwrap();
    assert_eq!(h.target, "/");
    let h = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(h.minor, 0);
}

#[test]
fn rejects_bad_heads() {
    for (raw, want) in [
        (&b"GET /\r\n\r\n"[..], "request line"),
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
        (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "version"),
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", "not a path"),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", "not a path"),
        (b"GET / HTTP/1.1\r\n\r\n", "Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "header line"),
        (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", "header line"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
        (b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", "text"),
        (b"GET / HTTP/1.1\r\nHost: a\nX-Real-IP: 1.2.3.4\r\n\r\n", "bare LF at offset 23"),
        (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", "bare CR at offset 23"),
        (b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n", "NUL"),
        (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", "request line"),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "header line"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding"),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", "Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length"),
    ] {
        let e = parse(raw).unwrap_err().to_string();
        assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(raw));
    }
}

#[test]
fn connection_cannot_remove_framing_or_host() {
    let raw = b"POST /x HTTP/1.1\r\nHost: d\r\nContent-Length: 63\r\nConnection: Content-Length, Host, Transfer-Encoding, X-Drop\r\nX-Drop: 1\r\nX-Keep: 2\r\n\r\n";
    let h = parse(raw).unwrap();
    assert_eq!(h.body, Body::Length(63));
    let out = String::from_utf8(rewrite(&h, "/x", None)).unwrap();
    assert_eq!(
        out,
        "POST /x HTTP/1.1\r\nHost: d\r\nContent-Length: 63\r\nX-Keep: 2\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn client_forwarding_headers_are_replaced() {
    let raw = b"GET / HTTP/1.1\r\nHost: d\r\nX-Real-IP: 6.6.6.6\r\nx-forwarded-for: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Port: 1\r\nX-Forwarded-Proto: http\r\n\r\n";
    let h = parse(raw).unwrap();
    let fwd = Forwarded {
        client: "192.0.2.7".parse().unwrap(),
    };
    let out = String::from_utf8(rewrite(&h, "/", Some(fwd))).unwrap();
    assert_eq!(
        out,
        "GET / HTTP/1.1\r\nHost: d\r\nX-Real-IP: 192.0.2.7\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n"
    );
    // Without the option the client's headers pass as they are.
    let out = String::from_utf8(rewrite(&h, "/", None)).unwrap();
    assert!(out.contains("X-Real-IP: 6.6.6.6\r\n") && out.contains("Forwarded: for=6.6.6.6\r\n"));
}

#[test]
fn header_count_is_capped() {
    let mut raw = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..MAX_HEADERS {
        raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    let e = parse(&raw).unwrap_err();
    assert_eq!(
        (e.kind(), e.kind().http_status()),
        (Kind::TooManyHeaders, Some(431))
    );
}

/// A head of the largest allowed size, made of Connection tokens and
/// as many headers as allowed, is rewritten in steps proportional to
/// its headers and tokens (the old rewrite compared every header with
/// every token).
#[test]
fn rewrite_is_linear_in_headers_and_tokens() {
    let mut raw = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    let mut tokens = 0;
    for i in 0..(MAX_HEADERS - 1) / 2 {
        raw.extend_from_slice(format!("X-Header-{i}: v\r\nConnection: ").as_bytes());
        let line_start = raw.len();
        while raw.len() - line_start < 16_000 {
            raw.extend_from_slice(format!("t{tokens},").as_bytes());
            tokens += 1;
        }
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    assert!(
        raw.len() <= 1 << 20 && tokens > 50_000,
        "{} {tokens}",
        raw.len()
    );
    let h = parse(&raw).unwrap();
    let headers = h.headers.len();
    REWRITE_STEPS.with(|c| c.set(0));
    let out = rewrite(&h, "/", None);
    let steps = REWRITE_STEPS.with(|c| c.get());
    assert!(
        steps <= 2 * headers + tokens,
        "{steps} steps for {headers} headers and {tokens} tokens"
    );
    assert!(out.starts_with(b"GET / HTTP/1.1\r\nHost: a\r\nX-Header-0: v\r\n"));
}

#[test]
fn response_heads() {
    let r = parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found")
        .unwrap()
        .unwrap();
    assert_eq!((r.status, r.body, r.len), (404, Some(9), 45));
    let r = parse_response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!((r.status, r.body), (101, Some(0)));
    let r = parse_response(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.body, None);
    assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
    assert!(parse_response(b"\x16\x03\x01").is_err());
}

/// Random heads built from the bytes that matter to the parser never
/// panic, and whatever parses routes without panicking too.
#[test]
fn random_heads_never_panic() {
    let alphabet: &[&[u8]] = &[
        b"GET",
        b"POST",
        b" ",
        b"/",
        b"?",
        b":",
        b"\r\n",
        b"\r",
        b"\n",
        b"\0",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"Host",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Upgrade",
        b"websocket",
        b"Connection",
        b"1",
        b"999",
        b".",
        b"10.150.248.180",
        b"\xff",
        b"\xc3\xa9",
        b"https://",
        b"\t",
        b",",
        b"*",
    ];
    let mut table = crate::route::path::PathTable::new();
    table.agent_in_path = Some(crate::route::path::PathAgent {
        allow: vec!["10.0.0.0/8".parse().unwrap()],
        ports: vec![8443],
        strip: true,
    });
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..20_000 {
        let mut head = b"GET /".to_vec();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for i in 0..(x % 40) {
            let k = (x.rotate_left(i as u32 * 5) % alphabet.len() as u64) as usize;
            head.extend_from_slice(alphabet[k]);
        }
        let target = String::from_utf8_lossy(&head[4..]).into_owned();
        let _ = table.resolve(&target);
        head.extend_from_slice(b"\r\n\r\n");
        if let Ok(h) = parse(&head) {
            let _ = rewrite(
                &h,
                h.target,
                Some(Forwarded {
                    client: "192.0.2.1".parse().unwrap(),
                }),
            );
            let _ = table.resolve(h.target);
        }
    }
}

#[test]
fn head_end_resumes() {
    let buf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nx";
    assert_eq!(head_end(buf, 0), Some(buf.len() - 1));
    assert_eq!(head_end(buf, 26), Some(buf.len() - 1));
    assert_eq!(head_end(&buf[..20], 0), None);
}

#[test]
fn statuses_and_pages() {
    assert_eq!(
        response_status(b"HTTP/1.1 101 Switching Protocols\r\n"),
        Some(101)
    );
    assert_eq!(response_status(b"HTTP/1.0 404 x"), Some(404));
    assert_eq!(response_status(b"\x16\x03\x01"), None);
    let page = String::from_utf8(error_page(403, "agent <x>", 7)).unwrap();
    assert!(page.starts_with("HTTP/1.1 403 Forbidden\r\n"));
    assert!(page.contains("agent &lt;x&gt;") && page.contains("connection 7"));
}
