//! Admission at the file-descriptor limit: a client is accepted only when
//! a descriptor for its agent is left, so under a small `ulimit -n` every
//! client waits in the backlog and is served, none is dropped.

mod common;

use std::process::Command;

use common::{alpha_agent, Proxy, WAIT};
use splicegate::testkit::{client_config, greet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_ulimit_64_sixty_waiting_clients_are_all_served() {
    let (id, agent) = alpha_agent().await;
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\"", common::bin()])
        .args(["--log-format", "json", "run", "--listen", "127.0.0.1:0"])
        .args(["--agent", &format!("alpha.test={}", agent.addr)]);
    let proxy = Proxy::start_command(&mut cmd);
    let cap = proxy
        .seen_event("capacity")
        .expect("a capacity event at start");
    assert_eq!(cap["fd_limit"], 64, "{cap}");
    let connections = cap["connections"].as_u64().unwrap();
    assert!((1..60).contains(&connections), "{cap}");

    let tls = client_config(&[&id], &[]).unwrap();
    let clients: Vec<_> = (0..60u8)
        .map(|i| {
            let (tls, addr) = (tls.clone(), proxy.addr);
            tokio::spawn(async move {
                let (greeting, mut s) = greet(addr, "alpha.test", tls).await?;
                s.write_all(&[i; 32]).await?;
                let mut back = [0u8; 32];
                s.read_exact(&mut back).await?;
                assert_eq!(back, [i; 32]);
                s.shutdown().await?;
                Ok::<_, std::io::Error>(greeting)
            })
        })
        .collect();
    let mut failed = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        match tokio::time::timeout(WAIT, c).await {
            Ok(Ok(Ok(g))) => assert_eq!(g, "agent alpha"),
            other => failed.push(format!("client {i}: {other:?}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 60 clients failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert_eq!(agent.accepted(), 60);
}
