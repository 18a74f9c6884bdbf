//! QUIC peers nobody here wrote (quinn): agents that answer streams with
//! their name and echo streams and datagrams, and clients that verify the
//! agent's certificate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::PrivateKeyDer;
use splicegate::testkit::{identity, Identity};

/// The application protocol agents and clients agree on (QUIC requires one).
pub const ALPN: &[u8] = b"dcv-test";

/// A quinn agent that answers every stream with its name, a newline, and
/// then everything the stream carries, and every datagram with itself.
pub struct QuicAgent {
    pub addr: SocketAddr,
    pub id: Identity,
    pub connections: Arc<AtomicUsize>,
    _endpoint: quinn::Endpoint,
}

pub async fn agent(name: &'static str) -> QuicAgent {
    agent_at(name, name, "127.0.0.1:0".parse().unwrap()).await
}

/// An agent named `name` with a certificate for `sni`, on `bind`.
pub async fn agent_at(name: &'static str, sni: &str, bind: SocketAddr) -> QuicAgent {
    let id = identity(&[sni]).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![id.cert.clone()],
        PrivateKeyDer::Pkcs8(id.key.clone_key()),
    )
    .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
    ));
    let ep = quinn::Endpoint::server(cfg, bind).unwrap();
    let addr = ep.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let (ep2, count) = (ep.clone(), Arc::clone(&connections));
    tokio::spawn(async move {
        while let Some(incoming) = ep2.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                // Datagrams come back as they came.
                let echo = conn.clone();
                tokio::spawn(async move {
                    while let Ok(d) = echo.read_datagram().await {
                        let _ = echo.send_datagram(d);
                    }
                });
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let _ = send.write_all(format!("{name}\n").as_bytes()).await;
                        let _ = tokio::io::copy(&mut recv, &mut send).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    QuicAgent {
        addr,
        id,
        connections,
        _endpoint: ep,
    }
}

/// A client trusting `roots`, offering `alpn`, on its own UDP port.
pub fn client(roots: &[&Identity], alpn: &[Vec<u8>], idle: Duration) -> quinn::Endpoint {
    client_from("127.0.0.1:0".parse().unwrap(), roots, alpn, idle)
}

/// [`client`] from a chosen local address.
pub fn client_from(
    local: SocketAddr,
    roots: &[&Identity],
    alpn: &[Vec<u8>],
    idle: Duration,
) -> quinn::Endpoint {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.cert.clone()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    tls.alpn_protocols = alpn.to_vec();
    tls.alpn_protocols.push(ALPN.to_vec());
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle.try_into().unwrap()));
    cfg.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client(local).unwrap();
    ep.set_default_client_config(cfg);
    ep
}

/// Open a stream to `name` through `via`; returns the agent's name and the
/// echo of `data`.
pub async fn exchange(
    ep: &quinn::Endpoint,
    via: SocketAddr,
    name: &str,
    data: &[u8],
) -> Result<(String, Vec<u8>), String> {
    let conn = ep
        .connect(via, name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let writer = {
        let data = data.to_vec();
        tokio::spawn(async move {
            send.write_all(&data).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())
        })
    };
    let all = recv
        .read_to_end(data.len() + 64)
        .await
        .map_err(|e| e.to_string())?;
    writer.await.map_err(|e| e.to_string())??;
    conn.close(0u32.into(), b"done");
    let at = all.iter().position(|&b| b == b'\n').ok_or("no name line")?;
    Ok((
        String::from_utf8_lossy(&all[..at]).into_owned(),
        all[at + 1..].to_vec(),
    ))
}
