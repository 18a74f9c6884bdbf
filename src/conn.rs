//! One client connection, start to finish: sniff the ClientHello, route,
//! connect, replay the hello, forward, and write the access log.
//!
//! Each connection runs in one tracing span (`conn`, with id, client and
//! listener) and writes exactly two access events: `routed` once an agent is
//! chosen and connected, and `closed` at the end with bytes, duration and
//! the close reason. Nothing is logged per chunk of data.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::ListenerConfig;
use crate::forward::{self, End};
use crate::route::RouteTable;
use crate::sniff::{self, ClientHello};
use crate::upstream;

/// What every connection accepted on one listener shares.
#[derive(Debug)]
pub struct ListenerCtx {
    /// The listener's settings.
    pub config: ListenerConfig,
    /// The routing table.
    pub routes: Arc<RouteTable>,
    /// Turns true when the drain deadline passes.
    pub drain: watch::Receiver<bool>,
}

/// What the access log says about a connection.
#[derive(Default)]
struct Record {
    hello: Option<ClientHello>,
    route: Option<String>,
    agent: Option<String>,
    to_agent: u64,
    to_client: u64,
}

/// Serve one accepted connection to the end.
pub async fn handle(client: TcpStream, peer: SocketAddr, ctx: Arc<ListenerCtx>, id: u64) {
    let span = tracing::info_span!("conn", id, client = %peer, listener = %ctx.config.name);
    async move {
        let started = Instant::now();
        let mut rec = Record::default();
        let (outcome, reason) = match serve(client, &ctx, started, &mut rec).await {
            Ok(end) => (end.kind(), end.to_string()),
            Err((kind, reason)) => (kind, reason),
        };
        let sni = rec
            .hello
            .as_ref()
            .and_then(|h| h.sni.as_deref())
            .unwrap_or("-");
        let alpn = rec
            .hello
            .as_ref()
            .map_or_else(|| "-".to_owned(), ClientHello::alpn_display);
        tracing::info!(
            event = "closed",
            sni,
            alpn = %alpn,
            route = rec.route.as_deref().unwrap_or("-"),
            agent = rec.agent.as_deref().unwrap_or("-"),
            bytes_to_agent = rec.to_agent,
            bytes_to_client = rec.to_client,
            duration_ms = started.elapsed().as_millis() as u64,
            outcome,
            reason = %reason,
            "connection closed"
        );
    }
    .instrument(span)
    .await
}

/// Failure before forwarding: (short kind, full reason).
type Refusal = (&'static str, String);

async fn serve(
    mut client: TcpStream,
    ctx: &ListenerCtx,
    started: Instant,
    rec: &mut Record,
) -> Result<End, Refusal> {
    let cfg = &ctx.config;
    if let Err(e) = crate::net::tune(&client, cfg.keepalive) {
        tracing::debug!(error = %e, "cannot set client socket options");
    }

    let (hello, replay) =
        sniff::read_client_hello(&mut client, started, cfg.hello_timeout, cfg.hello_max_bytes)
            .await
            .map_err(|e| (e.kind(), format!("hello: {e}")))?;
    let hello_wait = started.elapsed();
    let decision = ctx.routes.resolve(hello.sni.as_deref());
    rec.hello = Some(hello);
    let decision = decision.map_err(|e| (e.kind(), format!("route: {e}")))?;
    rec.route = Some(decision.route.to_string());
    rec.agent = Some(decision.target.to_string());

    let agent = upstream::connect(&decision.target, cfg.connect_timeout, cfg.keepalive)
        .await
        .map_err(|e| (e.kind(), format!("upstream: {e}")))?;
    let connect_time = started.elapsed() - hello_wait;
    // Replay every byte read while sniffing before any spliced byte.
    let mut agent = agent;
    agent.write_all(&replay).await.map_err(|e| {
        (
            "io_error",
            format!("write to agent failed while replaying the ClientHello: {e}"),
        )
    })?;
    rec.to_agent = replay.len() as u64;
    drop(replay);

    let hello = rec.hello.as_ref();
    tracing::info!(
        event = "routed",
        sni = hello.and_then(|h| h.sni.as_deref()).unwrap_or("-"),
        alpn = %hello.map_or_else(|| "-".to_owned(), ClientHello::alpn_display),
        route = rec.route.as_deref().unwrap_or("-"),
        agent = rec.agent.as_deref().unwrap_or("-"),
        hello_us = hello_wait.as_micros() as u64,
        connect_us = connect_time.as_micros() as u64,
        "connection routed"
    );

    let opts = forward::Options {
        engine: cfg.engine,
        pipe_size: cfg.pipe_size,
        idle_timeout: cfg.idle_timeout,
    };
    let mut drain = ctx.drain.clone();
    let out = forward::run(&client, &agent, opts, &mut drain).await;
    rec.to_agent += out.to_agent;
    rec.to_client = out.to_client;
    Ok(out.end)
}
