//! The ClientHello sniffer: bytes fed in arbitrary pieces give exactly the
//! result of feeding them whole, and whenever rustls (a well-kept TLS
//! stack) accepts the hello, splicegate agrees on the SNI and ALPN.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate::logging::printable;
use splicegate::sniff::{ClientHello, HelloParser, Progress, SniffError};

const CAP: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let mut whole_parser = HelloParser::new(CAP);
    let whole = whole_parser.advance(stream);

    // The same bytes in pieces of varying sizes derived from the seed.
    let mut parser = HelloParser::new(CAP);
    let mut end = 0;
    let mut step = 1 + usize::from(seed % 7);
    let split = loop {
        end = (end + step).min(stream.len());
        step = step * 3 % 1499 + 1;
        match parser.advance(&stream[..end]) {
            Ok(Progress::Incomplete) if end < stream.len() => continue,
            r => break r,
        }
    };
    match (&whole, &split) {
        (Ok(Progress::Done(a)), Ok(Progress::Done(b))) => {
            assert_eq!(a, b);
            assert_eq!(whole_parser.consumed(), parser.consumed());
        }
        (Ok(Progress::Incomplete), Ok(Progress::Incomplete)) => {}
        (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind(), "{a} / {b}"),
        _ => panic!("whole: {whole:?}, in pieces: {split:?}"),
    }

    if let Some((sni, alpn)) = rustls_view(stream) {
        match &whole {
            Ok(Progress::Done(ours)) => agree(ours, sni.as_deref(), &alpn),
            // splicegate refuses some names rustls takes (it allows only
            // letters, digits, '-', '_' and '.').
            Err(SniffError::Malformed(_)) => {}
            other => panic!("rustls accepted a hello splicegate saw as {other:?}"),
        }
    }
});

fn agree(ours: &ClientHello, sni: Option<&str>, alpn: &[Vec<u8>]) {
    if let Some(name) = sni {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        assert_eq!(ours.sni.as_deref(), Some(name.as_str()));
    }
    let theirs: Vec<String> = alpn
        .iter()
        .map(|p| printable(&String::from_utf8_lossy(p)).into_owned())
        .collect();
    assert_eq!(ours.alpn, theirs);
}

/// SNI and ALPN as rustls's server-side acceptor reads them, if it accepts
/// the bytes as a complete ClientHello.
fn rustls_view(mut stream: &[u8]) -> Option<(Option<String>, Vec<Vec<u8>>)> {
    let mut acceptor = rustls::server::Acceptor::default();
    while !stream.is_empty() {
        if acceptor.read_tls(&mut stream).ok()? == 0 {
            break;
        }
    }
    let accepted = acceptor.accept().ok()??;
    let hello = accepted.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    let alpn = hello
        .alpn()
        .map(|it| it.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    Some((sni, alpn))
}
