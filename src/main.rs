//! The `splicegate` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use splicegate::config::{AgentArg, CliTls, Config, ControlSocket};
use splicegate::forward::Engine;
use splicegate::inventory::Inventory;
use splicegate::logging::{self, LogFormat};
use splicegate::process::Launch;
use splicegate::server::{Server, Start};
use splicegate::upgrade::Incoming;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Layer-4 TLS-SNI splice proxy for Amazon DCV agents.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log line format (logs go to stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Validate a config file and print the effective listeners and routes.
    Check {
        /// Config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a private key and a self-signed certificate with the given
    /// SANs, for a terminate listener (or for tests).
    Cert {
        /// Directory for `cert.pem` and `key.pem` (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Subject alternative name: `DNS:name`, `DNS:*.suffix` or
        /// `IP:address`. Repeatable; the first is also the common name.
        #[arg(long, required = true)]
        san: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Upgrade the running proxy in place: it starts the binary now at its
    /// own path and hands it every listening socket and every session that
    /// can move, then exits once what stays with it has ended.
    Upgrade {
        /// The running process's control socket.
        #[arg(long, default_value = splicegate::control::DEFAULT_PATH)]
        control: PathBuf,
        /// Seconds the new process has to be ready.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
    },
    /// Operator commands to the running proxy, over its control socket:
    /// status, sessions, agents, drain-agent ADDR, undrain-agent ADDR,
    /// close ID | close --agent ADDR [--over SECS], drain [--deadline SECS],
    /// upgrade [--timeout SECS], help.
    Ctl {
        /// The running process's control socket.
        #[arg(long, default_value = splicegate::control::DEFAULT_PATH)]
        control: PathBuf,
        /// Print the answer as JSON (as the socket gives it).
        #[arg(long)]
        json: bool,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// On an auto scaling instance: when a termination lifecycle hook
    /// holds this instance, drain splicegate, record heartbeats while
    /// sessions remain, and complete the action once they have ended (or
    /// --max passed).
    LifecycleWatch {
        /// The auto scaling group.
        #[arg(long)]
        group: String,
        /// The termination lifecycle hook.
        #[arg(long)]
        hook: String,
        /// The region (default: the instance's, from its metadata).
        #[arg(long)]
        region: Option<String>,
        /// splicegate's control socket.
        #[arg(long, default_value = splicegate::control::DEFAULT_PATH)]
        control: PathBuf,
        /// The instance metadata service.
        #[arg(long, default_value = "http://169.254.169.254")]
        imds: String,
        /// The AWS CLI.
        #[arg(long, default_value = "aws")]
        aws: PathBuf,
        /// How often the metadata and the sessions are looked at.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        poll: std::time::Duration,
        /// How often a heartbeat is recorded while sessions remain (keep it
        /// below the hook's heartbeat timeout).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        heartbeat: std::time::Duration,
        /// The longest the termination waits for sessions.
        #[arg(long, default_value = "8h", value_parser = parse_duration)]
        max: std::time::Duration,
    },
    /// Start the proxy with two built-in loopback agents and show routing.
    Demo {
        /// Proxy address (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Forwarding engine.
        #[arg(long, value_enum, default_value_t = EngineArg::Splice)]
        engine: EngineArg,
        /// Exit after the sample connections.
        #[arg(long)]
        once: bool,
    },
}

/// `--engine`: how bytes are moved.
#[derive(Clone, Copy, ValueEnum)]
enum EngineArg {
    /// Copy small reads, splice(2) bulk through a pipe.
    Splice,
    /// Userspace copy through a buffer per direction.
    Copy,
}

impl From<EngineArg> for Engine {
    fn from(e: EngineArg) -> Engine {
        match e {
            EngineArg::Splice => Engine::Splice,
            EngineArg::Copy => Engine::Copy,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address; replaces the file's listeners. Repeatable.
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// UDP listen address for QUIC (DCV native clients); replaces the
    /// file's UDP listeners. Repeatable.
    #[arg(long)]
    listen_udp: Vec<SocketAddr>,
    /// `HOST:PORT` sends every connection there; `PATTERN=HOST:PORT` adds a
    /// route for an SNI pattern (`agent1.example`, `*.dcv.example`);
    /// `/PREFIX/=HOST:PORT` a path route on terminate listeners.
    /// Repeatable; wins over the file.
    #[arg(long, value_parser = parse_agent)]
    agent: Vec<AgentArg>,
    /// Forwarding engine for every listener.
    #[arg(long, value_enum)]
    engine: Option<EngineArg>,
    /// Terminate TLS with this PEM certificate chain (every listener
    /// becomes a terminate listener). Repeatable, paired with --tls-key;
    /// the first is the default certificate.
    #[arg(long)]
    tls_cert: Vec<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) for the --tls-cert at the same
    /// position.
    #[arg(long)]
    tls_key: Vec<PathBuf>,
    /// TLS to agents on terminate listeners: verify (needs --upstream-ca),
    /// insecure (no certificate check) or off (plain TCP).
    #[arg(long, value_parser = ["verify", "insecure", "off"])]
    upstream_tls: Option<String>,
    /// PEM file with the CA (or self-signed certificate) agents present.
    #[arg(long)]
    upstream_ca: Option<PathBuf>,
    /// Control socket path (`splicegate upgrade`, `splicegate ctl`);
    /// replaces the file's `[control] path`. "" turns it off.
    #[arg(long)]
    control: Option<PathBuf>,
}

fn parse_agent(s: &str) -> Result<AgentArg, String> {
    s.parse()
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = splicegate::config::parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("`{s}`: must be more than 0"));
    }
    Ok(d)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    logging::init(cli.log_format, level);
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Cert { out, san, days } => cert(&out, &san, days),
        Command::Run(args) => run(args),
        Command::Upgrade { control, timeout } => upgrade(&control, timeout),
        Command::Ctl {
            control,
            json,
            command,
        } => ctl(&control, json, &command),
        Command::LifecycleWatch {
            group,
            hook,
            region,
            control,
            imds,
            aws,
            poll,
            heartbeat,
            max,
        } => splicegate::lifecycle::run(&splicegate::lifecycle::Watch {
            imds,
            group,
            hook,
            region,
            control,
            aws,
            poll,
            heartbeat,
            max,
        }),
        Command::Demo {
            listen,
            engine,
            once,
        } => runtime().and_then(|rt| {
            rt.block_on(splicegate::demo::run(splicegate::demo::DemoOptions {
                listen,
                engine: engine.into(),
                once,
            }))
            .map_err(|e| e.to_string())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("splicegate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// A line on stdout; a closed stdout is an error, not a panic.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*).map_err(|e| format!("stdout: {e}"))?;
    }};
}

fn check(path: &std::path::Path) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    say!("{}", config.summary().trim_end());
    for l in &config.listeners {
        let Some(t) = &l.terminate else { continue };
        let store = splicegate::terminate::certs::CertStore::load(t.certs.clone())
            .map_err(|e| format!("listener {}: {e}", l.name))?;
        for w in splicegate::terminate::certs::uncovered(&store.leaves(), &config.routes) {
            say!("warning: listener {}: {w}", l.name);
        }
        if config.paths.is_empty() {
            say!(
                "warning: listener {}: no [[path_route]] or [path_agent]: every request but the health path gets 404",
                l.name
            );
        }
    }
    for u in &config.udp_listeners {
        for w in splicegate::udp::warnings(u) {
            say!("warning: udp_listener {}: {w}", u.name);
        }
    }
    say!("{}: OK", path.display());
    Ok(())
}

fn cert(out: &std::path::Path, sans: &[String], days: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let g = splicegate::terminate::certs::generate(sans, days)?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let key_path = out.join("key.pem");
    let cert_path = out.join("cert.pem");
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    key.write_all(g.key_pem.as_bytes())
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    std::fs::write(&cert_path, &g.cert_pem).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    say!("wrote {} and {}", cert_path.display(), key_path.display());
    say!("subject alternative names: {}", sans.join(", "));
    Ok(())
}

/// `splicegate ctl`: one command to the running process; its answer for a
/// person (or as JSON), and a failure as an error.
fn ctl(control: &std::path::Path, json: bool, words: &[String]) -> Result<(), String> {
    if let Some(w) = words
        .iter()
        .find(|w| w.is_empty() || w.contains(char::is_whitespace))
    {
        return Err(format!("ctl: {w:?}: one word per argument, without spaces"));
    }
    let line = words.join(" ");
    let wait = std::time::Duration::from_secs(if words[0] == "upgrade" { 3700 } else { 30 });
    let answer = runtime()?
        .block_on(splicegate::control::request(control, &line, wait))
        .map_err(|e| e.to_string())?;
    if answer["ok"] != true {
        return Err(format!(
            "{} failed ({}): {}",
            words[0],
            answer["kind"].as_str().unwrap_or("error"),
            answer["error"].as_str().unwrap_or("no reason given")
        ));
    }
    if json {
        say!("{answer}");
    } else {
        use std::io::Write as _;
        let text = splicegate::control::show::human(&words[0], &answer);
        std::io::stdout()
            .write_all(text.as_bytes())
            .map_err(|e| format!("stdout: {e}"))?;
    }
    Ok(())
}

/// `splicegate upgrade`: ask the running process, and say what it did.
fn upgrade(control: &std::path::Path, timeout: u64) -> Result<(), String> {
    let line = format!("upgrade --timeout {timeout}");
    // The handover itself takes a few seconds beyond the new process's start.
    let wait = std::time::Duration::from_secs(timeout + 60);
    let answer = runtime()?
        .block_on(splicegate::control::request(control, &line, wait))
        .map_err(|e| e.to_string())?;
    if answer["ok"] != true {
        return Err(format!(
            "upgrade failed ({}): {}",
            answer["kind"].as_str().unwrap_or("error"),
            answer["error"].as_str().unwrap_or("no reason given")
        ));
    }
    say!(
        "upgraded: new process {}; handed over {} listening sockets, {} connections ({} bytes in flight, {} pipes) and {} QUIC flows; {} stay with the old process (terminate sessions until they end, connections still in their hello until they can move)",
        answer["pid"],
        answer["listeners"],
        answer["connections"],
        answer["in_flight_bytes"],
        answer["pipes"],
        answer["flows"],
        answer["staying"]
    );
    Ok(())
}

fn load(args: &RunArgs) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let tls = CliTls {
        certs: args.tls_cert.clone(),
        keys: args.tls_key.clone(),
        upstream: args.upstream_tls.clone(),
        upstream_ca: args.upstream_ca.clone(),
    };
    config.apply_cli(
        &args.listen,
        &args.agent,
        args.engine.map(Engine::from),
        &tls,
    )?;
    config.apply_cli_udp(&args.listen_udp);
    if let Some(c) = &args.control {
        config.control = if c.as_os_str().is_empty() {
            ControlSocket::Off
        } else {
            ControlSocket::At(c.clone())
        };
    }
    Ok(config)
}

fn run(args: RunArgs) -> Result<(), String> {
    // Started by a live upgrade: the handover channel is standard input.
    let channel = splicegate::upgrade::take_channel()
        .map_err(|e| format!("cannot take the handover channel: {e}"))?;
    let launch = Launch::current();
    runtime()?.block_on(async {
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch SIGINT: {e}"))?;
        let mut hup =
            signal(SignalKind::hangup()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
        let mut usr2 = signal(SignalKind::user_defined2())
            .map_err(|e| format!("cannot watch SIGUSR2: {e}"))?;
        let mut incoming = match channel {
            Some(fd) => Some(Incoming::open(fd).await?),
            None => None,
        };
        let (inventory, upgrading, drained) = match &mut incoming {
            Some(i) => (
                Inventory::new(std::mem::take(&mut i.sockets)),
                true,
                std::mem::take(&mut i.drained),
            ),
            None => (Inventory::default(), false, Vec::new()),
        };
        let start = Start {
            inventory: std::sync::Arc::new(inventory),
            launch,
            upgrade: upgrading,
            drained,
        };
        let started = load(&args).and_then(|config| Server::start(config, start).map_err(|e| e.to_string()));
        let server = match (started, incoming) {
            (Ok(server), Some(incoming)) => {
                incoming
                    .ready(std::sync::Arc::clone(server.process()))
                    .await
                    .map_err(|e| format!("live upgrade: {e}"))?;
                server
            }
            (Ok(server), None) => server,
            (Err(e), Some(incoming)) => {
                incoming.fail(&e).await;
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        };
        let (which, timeout) = loop {
            tokio::select! {
                _ = term.recv() => break ("SIGTERM", None),
                _ = int.recv() => break ("SIGINT", None),
                timeout = server.process().drain.requested() => break ("control", timeout),
                _ = hup.recv() => reload(&args, &server),
                _ = usr2.recv() => {
                    let p = std::sync::Arc::clone(server.process());
                    // The outcome is logged (`upgraded` or `upgrade_failed`).
                    tokio::spawn(async move {
                        let _ = splicegate::upgrade::upgrade(&p, splicegate::upgrade::DEFAULT_TIMEOUT).await;
                    });
                }
                pid = server.retired() => {
                    tracing::info!(event = "retired", pid, active = server.active(), "handed over to the new process");
                    // A signal now closes what stayed here at once.
                    server.retire(stop_signal(&mut term, &mut int)).await;
                    return Ok(());
                }
            }
        };
        tracing::info!(
            event = "signal",
            signal = which,
            active = server.active(),
            "shutting down"
        );
        // A second SIGTERM or SIGINT closes remaining connections at once.
        server
            .shutdown_within(timeout, stop_signal(&mut term, &mut int))
            .await;
        Ok(())
    })
}

/// Resolves at the next SIGTERM or SIGINT.
async fn stop_signal(term: &mut Signal, int: &mut Signal) {
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// SIGHUP: re-read the file and swap the routing table for new
/// connections, and re-read terminate listeners' certificate files.
/// Established sessions keep their agents and certificates. Listener,
/// admin and shutdown settings need a restart. A bad file keeps the running
/// table; a bad certificate keeps the running certificates.
fn reload(args: &RunArgs, server: &Server) {
    match load(args) {
        Ok(config) => {
            let rules = config.routes.describe().len();
            match server.reload_routes(&config) {
                Ok(()) => tracing::info!(
                    event = "reloaded",
                    rules,
                    "routes reloaded; listener settings take effect on restart"
                ),
                Err(e) => {
                    tracing::error!(event = "reload_failed", error = %e, "reload failed; keeping the running routes")
                }
            }
        }
        Err(e) => {
            tracing::error!(event = "reload_failed", error = %e, "reload failed; keeping the running routes")
        }
    }
    server.reload_certs();
}
