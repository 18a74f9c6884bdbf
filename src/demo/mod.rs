//! `splicegate demo`: the real proxy on an embedded configuration, with two
//! built-in loopback TLS agents ([`agents`]), driven by a few clients with
//! different SNI.

pub mod agents;

use std::error::Error;
use std::net::SocketAddr;
use std::time::Instant;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::forward::Engine;
use crate::server::Server;
use agents::{client_config, greet, identity, server_config, Agent};

/// A line on stdout; a closed stdout (`demo | head`) ends the demo with an
/// error instead of a panic.
macro_rules! say {
    () => { say!("") };
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*)?;
    }};
}

/// Like [`say!`], without the newline.
macro_rules! say_raw {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($t)*)?;
    }};
}

/// The embedded configuration; `{ALPHA}` and `{BETA}` become the agents'
/// ports, `{LISTEN}` the proxy's address.
pub const EMBEDDED_CONFIG: &str = r#"
[[listener]]
name = "demo"
bind = "{LISTEN}"
hello_timeout = "10s"

[[route]]                      # exact name
sni = "alpha.demo.splicegate"
agent = "127.0.0.1:{ALPHA}"

[[route]]                      # wildcard: exactly one more label
sni = "*.beta.demo.splicegate"
agent = "127.0.0.1:{BETA}"

[[agent_in_name]]              # 127-0-0-1.agents.demo.splicegate -> 127.0.0.1:{ALPHA}
suffix = "agents.demo.splicegate"
port = {ALPHA}
allow = ["127.0.0.0/8"]

[routing]
no_sni = "reject"              # no default route: unknown names are refused
"#;

/// Demo settings from the command line.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Proxy listen address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Forwarding engine.
    pub engine: Engine,
    /// Exit after the sample connections instead of serving until Ctrl-C.
    pub once: bool,
}

/// Run the demo. Prints to stdout; the proxy's own log goes to stderr.
pub async fn run(opts: DemoOptions) -> Result<(), Box<dyn Error>> {
    let alpha_id = identity(&["alpha.demo.splicegate", "*.agents.demo.splicegate"])?;
    let beta_id = identity(&["*.beta.demo.splicegate"])?;
    let local: SocketAddr = "127.0.0.1:0".parse()?;
    let alpha = Agent::spawn("alpha", server_config(&alpha_id)?, local).await?;
    let beta = Agent::spawn("beta", server_config(&beta_id)?, local).await?;

    let text = EMBEDDED_CONFIG
        .replace("{LISTEN}", &opts.listen.to_string())
        .replace("{ALPHA}", &alpha.addr.port().to_string())
        .replace("{BETA}", &beta.addr.port().to_string());
    let mut config = Config::parse(&text, "<demo config>")?;
    config
        .apply_cli(&[], &[], Some(opts.engine), &Default::default())
        .map_err(|e| -> Box<dyn Error> { e.into() })?;
    // The demo is not operated: no control socket.
    config.control = crate::config::ControlSocket::Off;
    let server = Server::start(config.clone(), crate::server::Start::fresh())?;
    let proxy = server.local_addrs()[0].1;
    // Show the port the listener got, not the `:0` it asked for.
    config.listeners[0].bind = vec![proxy];

    say!(
        "splicegate demo: proxy on {proxy} (engine {}), agents alpha on {} and beta on {}",
        opts.engine,
        alpha.addr,
        beta.addr
    );
    say!();
    say_raw!("{}", config.summary());
    say!();
    say!("Each client verifies the agent's certificate against the SNI it sent,");
    say!("so a completed handshake proves the proxy chose the right agent.");
    say!();

    let clients = client_config(&[&alpha_id, &beta_id], &["http/1.1"])?;
    let samples = [
        ("alpha.demo.splicegate", "exact route"),
        ("desk1.beta.demo.splicegate", "wildcard route"),
        ("desk2.beta.demo.splicegate", "wildcard route"),
        ("127-0-0-1.agents.demo.splicegate", "agent-in-name, allowed"),
        (
            "10-1-2-3.agents.demo.splicegate",
            "agent-in-name, outside allow list",
        ),
        ("unknown.example", "no route"),
    ];
    for (sni, what) in samples {
        let t = Instant::now();
        let result = greet(proxy, sni, clients.clone()).await;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok((greeting, _)) => {
                say!("  {sni:<34} {what:<34} -> {greeting} (TLS verified, {ms:.1} ms)")
            }
            Err(e) => say!("  {sni:<34} {what:<34} -> refused by the proxy ({e}; {ms:.1} ms)"),
        }
    }

    // Small echo round trips, like DCV input events.
    let (_, mut tls) = greet(proxy, "alpha.demo.splicegate", clients).await?;
    let mut hist = Histogram::<u64>::new(3)?;
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..500 {
        let t = Instant::now();
        tls.write_all(&msg).await?;
        tls.read_exact(&mut back).await?;
        hist.record(t.elapsed().as_micros() as u64)?;
    }
    say!();
    say!(
        "  500 round trips of 64 bytes through the proxy: p50 {} µs, p99 {} µs, max {} µs",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    drop(tls);

    if opts.once {
        server.shutdown(std::future::pending()).await;
        return Ok(());
    }
    say!();
    say!("Try it yourself (type a line, the agent echoes it):");
    say!("  openssl s_client -quiet -connect {proxy} -servername alpha.demo.splicegate");
    say!("  openssl s_client -quiet -connect {proxy} -servername anything.beta.demo.splicegate");
    // Watch the signals before saying so, or an early SIGTERM would kill
    // the process instead of draining it.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    say!("Serving until Ctrl-C or SIGTERM.");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // Drain as `run` does; a second signal closes what is left.
    server
        .shutdown(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await;
    Ok(())
}
