//! Agent pools end to end: real loopback agents the test stops and starts,
//! policies measured over ≥ 1000 connections, stickiness, failover, retries,
//! limits and file-descriptor exhaustion.
//!
//! Agents here are plain TCP: they answer every connection with their name,
//! after the client's ClientHello has been replayed to them.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::Proxy;
use splicegate::testkit::client_hello;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// A loopback agent that writes `NAME\n` on each connection, then echoes.
struct NamedAgent {
    name: String,
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl NamedAgent {
    async fn start(name: &str) -> NamedAgent {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_on(name: &str, addr: SocketAddr) -> NamedAgent {
        let mut a = NamedAgent {
            name: name.to_owned(),
            addr,
            accepted: Arc::default(),
            task: None,
            conns: Arc::default(),
        };
        a.resume().await;
        a
    }

    /// (Re)bind the same address and serve.
    async fn resume(&mut self) {
        let l = TcpListener::bind(self.addr).await.unwrap();
        self.addr = l.local_addr().unwrap();
        let (name, accepted, conns) = (
            format!("{}\n", self.name),
            Arc::clone(&self.accepted),
            Arc::clone(&self.conns),
        );
        self.task = Some(tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                let name = name.clone();
                let h = tokio::spawn(async move {
                    let _ = s.write_all(name.as_bytes()).await;
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        let _ = s.write_all(&buf[..n]).await;
                    }
                });
                conns.lock().unwrap().push(h);
            }
        }));
    }

    /// Close the listening socket (new connects are refused) and, with
    /// `kill_conns`, every open connection.
    fn stop(&mut self, kill_conns: bool) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if kill_conns {
            for h in self.conns.lock().unwrap().drain(..) {
                h.abort();
            }
        }
    }
}

impl Drop for NamedAgent {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// Connect from `from` (any 127/8 address), send a hello for `sni`, return
/// the agent's name and the open stream.
async fn ask(
    proxy: SocketAddr,
    from: IpAddr,
    sni: &str,
) -> std::io::Result<(String, BufReader<TcpStream>)> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    let mut s = sock.connect(proxy).await?;
    s.write_all(&client_hello(Some(sni), &[], 1 << 14)).await?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed by the proxy",
        ));
    }
    // A refusal after the hello is a TLS alert record (type 21), then EOF.
    if line.as_bytes()[0] == 21 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("refused by the proxy with TLS alert {:?}", line.as_bytes()),
        ));
    }
    Ok((line.trim_end().to_owned(), r))
}

fn me() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

fn client(n: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(0x7f01_0000 + n))
}

fn pool_config(policy: &str, agents: &[(&NamedAgent, &str)], extra: &str) -> String {
    let mut s = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\nsni = \"desk.test\"\npool = \"fleet\"\n\
         [[pool]]\nname = \"fleet\"\npolicy = \"{policy}\"\n{extra}\n"
    );
    for (a, opts) in agents {
        s.push_str(&format!("[[pool.agents]]\naddr = \"{}\"\n{opts}\n", a.addr));
    }
    s
}

async fn tally(proxy: SocketAddr, n: u32, from: impl Fn(u32) -> IpAddr) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let (name, _) = ask(proxy, from(i), "desk.test").await.unwrap();
        *counts.entry(name).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_over_1000_connections() {
    let a = NamedAgent::start("a").await;
    let b = NamedAgent::start("b").await;
    let z = NamedAgent::start("zero").await;
    let cfg = pool_config(
        "round_robin",
        &[(&a, "weight = 3"), (&b, "weight = 1"), (&z, "weight = 0")],
        "",
    );
    let proxy = Proxy::start(Some(&cfg), &[]);
    let counts = tally(proxy.addr, 1000, |_| me()).await;
    // Tolerance: ±2 % of the expected 750 / 250; a weight of 0 gets nothing.
    assert!((730..=770).contains(&counts["a"]), "{counts:?}");
    assert!((230..=270).contains(&counts["b"]), "{counts:?}");
    assert_eq!(z.accepted.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_balances_open_connections() {
    let a = NamedAgent::start("a").await;
    let b = NamedAgent::start("b").await;
    let proxy = Proxy::start(
        Some(&pool_config("least_conn", &[(&a, ""), (&b, "")], "")),
        &[],
    );
    let mut held = Vec::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let (name, s) = ask(proxy.addr, me(), "desk.test").await.unwrap();
        *counts.entry(name).or_default() += 1;
        held.push(s);
    }
    assert_eq!((counts["a"], counts["b"]), (20, 20), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hash_is_sticky_and_survives_another_agents_failure() {
    let a = NamedAgent::start("a").await;
    let mut b = NamedAgent::start("b").await;
    let c = NamedAgent::start("c").await;
    let health = "[pool.health]\ncheck = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n";
    let cfg = pool_config("client_hash", &[(&a, ""), (&b, ""), (&c, "")], health);
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    // 1000 clients from distinct addresses: each agent gets 333 ± 30 %.
    let mut first = Vec::new();
    for i in 0..1000 {
        first.push(ask(proxy.addr, client(i), "desk.test").await.unwrap().0);
    }
    for name in ["a", "b", "c"] {
        let n = first.iter().filter(|x| *x == name).count();
        assert!((233..=433).contains(&n), "{name}: {n}");
    }
    // Reconnects land on the same agent.
    for i in (0..1000).step_by(7) {
        assert_eq!(
            ask(proxy.addr, client(i), "desk.test").await.unwrap().0,
            first[i as usize]
        );
    }
    // b fails its health check: only b's clients move.
    b.stop(true);
    let ev = proxy.event("agent_down", |_| true);
    assert_eq!(ev["agent"], b.addr.to_string());
    for i in (0..1000).step_by(3) {
        let now = ask(proxy.addr, client(i), "desk.test").await.unwrap().0;
        if first[i as usize] == "b" {
            assert_ne!(now, "b");
        } else {
            assert_eq!(now, first[i as usize], "client {i} moved");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_only_when_primaries_are_down_and_failover_within_a_check_interval() {
    let mut a = NamedAgent::start("a").await;
    let bk = NamedAgent::start("backup").await;
    let health = "[pool.health]\ncheck = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 1\n";
    let cfg = pool_config("first", &[(&a, ""), (&bk, "backup = true")], health);
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    // Health checks reach the backup too; traffic does not.
    assert_eq!(tally(proxy.addr, 20, |_| me()).await["a"], 20);

    a.stop(true);
    let stopped = std::time::Instant::now();
    proxy.event("agent_down", |v| v["agent"] == a.addr.to_string());
    // One interval plus jitter and the check's own timeout.
    assert!(
        stopped.elapsed() < std::time::Duration::from_millis(1500),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(
        ask(proxy.addr, me(), "desk.test").await.unwrap().0,
        "backup"
    );

    // a comes back: after `rise` good checks, primaries take over again.
    a.resume().await;
    proxy.event("agent_up", |v| v["agent"] == a.addr.to_string());
    assert_eq!(ask(proxy.addr, me(), "desk.test").await.unwrap().0, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_is_invisible_and_passive_health_marks_the_agent_down() {
    let mut dead = NamedAgent::start("dead").await;
    dead.stop(true);
    let b = NamedAgent::start("b").await;
    let cfg = pool_config(
        "first",
        &[(&dead, ""), (&b, "")],
        "max_fails = 2\nfail_window = \"1m\"\nfail_timeout = \"1m\"",
    );
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    // The first agent refuses; the client still gets an answer, from the
    // second attempt.
    assert_eq!(ask(proxy.addr, me(), "desk.test").await.unwrap().0, "b");
    let ev = proxy.event("routed", |_| true);
    assert_eq!(ev["attempt"], 2);
    assert_eq!(ev["agent"], b.addr.to_string());
    // The second failure within fail_window marks it down.
    assert_eq!(ask(proxy.addr, me(), "desk.test").await.unwrap().0, "b");
    let ev = proxy.event("agent_down", |_| true);
    assert_eq!(ev["reason"], "passive");
    assert_eq!(ev["agent"], dead.addr.to_string());
    assert_eq!(proxy.event("routed", |_| true)["attempt"], 2);
    // Now the dead agent is skipped without an attempt.
    assert_eq!(ask(proxy.addr, me(), "desk.test").await.unwrap().0, "b");
    assert_eq!(proxy.event("routed", |_| true)["attempt"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_check_fails_an_agent_that_accepts_but_never_completes_tls() {
    use splicegate::testkit::{client_config, greet, identity, server_config, Agent};
    // Accepts TCP and stays silent: the TLS check cannot complete.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let id = identity(&["desk.test"]).unwrap();
    let tls_agent = Agent::spawn(
        "tls",
        server_config(&id).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n[[route]]\nsni = \"desk.test\"\npool = \"fleet\"\n\
         [[pool]]\nname = \"fleet\"\npolicy = \"first\"\n\
         [pool.health]\ncheck = \"tls\"\ninterval = \"100ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 2\n\
         [[pool.agents]]\naddr = \"{silent_addr}\"\n[[pool.agents]]\naddr = \"{}\"\n",
        tls_agent.addr
    );
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let ev = proxy.event("agent_down", |_| true);
    assert_eq!(ev["agent"], silent_addr.to_string());
    assert_eq!(ev["reason"], "no answer within 150ms", "{ev}");
    let tls = client_config(&[&id], &[]).unwrap();
    let (greeting, _s) = greet(proxy.addr, "desk.test", tls).await.unwrap();
    assert_eq!(greeting, "agent tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_agents_down_and_all_agents_full() {
    let mut a = NamedAgent::start("a").await;
    let mut b = NamedAgent::start("b").await;
    a.stop(true);
    b.stop(true);
    let cfg = pool_config("round_robin", &[(&a, ""), (&b, "")], "max_fails = 1");
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    assert!(ask(proxy.addr, me(), "desk.test").await.is_err());
    let ev = proxy.closed("pool_failed");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("pool fleet: 2 attempt(s) failed"),
        "{ev}"
    );
    assert!(ask(proxy.addr, me(), "desk.test").await.is_err());
    let ev = proxy.closed("pool_unavailable");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("no agent available (2 down, 0 at max_conns"),
        "{ev}"
    );

    let a = NamedAgent::start("a").await;
    let b = NamedAgent::start("b").await;
    let cfg = pool_config("first", &[(&a, "max_conns = 1"), (&b, "max_conns = 1")], "");
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let (n1, _h1) = ask(proxy.addr, me(), "desk.test").await.unwrap();
    let (n2, _h2) = ask(proxy.addr, me(), "desk.test").await.unwrap();
    assert_eq!((n1.as_str(), n2.as_str()), ("a", "b"));
    assert!(ask(proxy.addr, me(), "desk.test").await.is_err());
    let ev = proxy.closed("pool_unavailable");
    assert!(
        ev["reason"].as_str().unwrap().contains("2 at max_conns"),
        "{ev}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_dying_mid_session_closes_only_its_clients() {
    let mut a = NamedAgent::start("a").await;
    let b = NamedAgent::start("b").await;
    let mut proxy = Proxy::start(
        Some(&pool_config("round_robin", &[(&a, ""), (&b, "")], "")),
        &[],
    );
    let (na, mut sa) = ask(proxy.addr, me(), "desk.test").await.unwrap();
    let (nb, mut sb) = ask(proxy.addr, me(), "desk.test").await.unwrap();
    assert_eq!((na.as_str(), nb.as_str()), ("a", "b"));
    a.stop(true);
    let mut rest = Vec::new();
    // The proxy passes the agent's close on promptly.
    tokio::time::timeout(common::WAIT, sa.read_to_end(&mut rest))
        .await
        .expect("the client sees the agent's close")
        .ok();
    // The client closes its side in turn; the proxy ends the connection.
    drop(sa);
    proxy.event("closed", |v| v["agent"] == a.addr.to_string());
    // The other session still flows (its agent echoes the replayed hello,
    // then our ping).
    sb.get_mut().write_all(b"ping\n").await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"ping\n") {
        assert_ne!(
            sb.read_until(b'\n', &mut got).await.unwrap(),
            0,
            "session b ended"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_and_global_limits() {
    let a = NamedAgent::start("a").await;
    let cfg = pool_config("first", &[(&a, "")], "")
        + "[limits]\nmax_per_client = 2\nmax_connections = 3\n";
    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let _c1 = ask(proxy.addr, client(1), "desk.test").await.unwrap();
    let _c2 = ask(proxy.addr, client(1), "desk.test").await.unwrap();
    assert!(ask(proxy.addr, client(1), "desk.test").await.is_err());
    let ev = proxy.closed("client_limit");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("client 127.1.0.1 already has 2 connections"),
        "{ev}"
    );
    // A third client fits the global cap of 3; a fourth waits in the
    // backlog until one closes.
    let (_, c3) = ask(proxy.addr, client(2), "desk.test").await.unwrap();
    proxy.event("max_connections", |_| true);
    let waiting = tokio::spawn(ask(proxy.addr, client(3), "desk.test"));
    drop(c3);
    let (name, _) = tokio::time::timeout(common::WAIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(name, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_fd_limit_clients_wait_in_the_backlog_and_are_served_later() {
    let a = NamedAgent::start("a").await;
    let cfg = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nhello_timeout = \"1m\"\n[[route]]\nsni = \"desk.test\"\nagent = \"{}\"\n",
        a.addr
    );
    let file = common::tempfile_lite::TempFile::new(".toml", cfg.as_bytes());
    // Run the proxy through a shell that lowers its fd limit.
    let script = format!(
        "ulimit -n 48 && exec {} --log-format json run --config {}",
        common::bin(),
        file.0.display()
    );
    let mut proxy = Proxy::start_command(std::process::Command::new("sh").args(["-c", &script]));
    // Clients that send half a hello hold one proxy fd each: the proxy
    // takes as many as its descriptors allow with one left for each
    // agent, then leaves the rest in the backlog instead of failing
    // accept or a connect with EMFILE.
    let half = &client_hello(Some("desk.test"), &[], 1 << 14)[..10];
    let mut idle = Vec::new();
    for _ in 0..80 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(half).await.unwrap();
        idle.push(s);
    }
    proxy.event("max_connections", |_| true);
    drop(idle);
    let (name, _) = tokio::time::timeout(common::WAIT, async {
        loop {
            if let Ok(ok) = ask(proxy.addr, me(), "desk.test").await {
                break ok;
            }
        }
    })
    .await
    .expect("the proxy serves again once fds are free");
    assert_eq!(name, "a");
    assert!(!proxy.saw("accept_exhausted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_pools_and_metrics_show_agent_state() {
    let a = NamedAgent::start("a").await;
    let mut b = NamedAgent::start("b").await;
    b.stop(true);
    let cfg = pool_config(
        "client_hash",
        &[(&a, "weight = 2\nmax_conns = 50"), (&b, "backup = true")],
        "max_fails = 1",
    ) + "[admin]\nbind = \"127.0.0.1:0\"\n";
    let file = common::tempfile_lite::TempFile::new(".toml", cfg.as_bytes());
    let out = std::process::Command::new(common::bin())
        .arg("check")
        .arg("--config")
        .arg(&file.0)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("fleet policy=client_hash attempts=2 max_fails=1"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} weight=2 max_conns=50", a.addr)),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} weight=1 backup", b.addr)),
        "{text}"
    );
    assert!(text.contains("-> pool:fleet"), "{text}");

    let mut proxy = Proxy::start(Some(&cfg), &[]);
    let (_, _held) = ask(proxy.addr, me(), "desk.test").await.unwrap();
    proxy.event("routed", |_| true);
    let (code, body) = common::curl(&format!("http://{}/metrics", proxy.admin.unwrap()));
    assert_eq!(code, 200);
    let line = |agent: SocketAddr, metric: &str| {
        let key = format!("{metric}{{pool=\"fleet\",agent=\"{agent}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap_or_else(|| panic!("no {key} in {body}"))
            .to_owned()
    };
    assert_eq!(line(a.addr, "splicegate_agent_up"), "1");
    assert_eq!(line(a.addr, "splicegate_agent_active_connections"), "1");
    assert_eq!(line(b.addr, "splicegate_agent_active_connections"), "0");
}
