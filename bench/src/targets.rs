//! The targets measured: direct connections, splicegate, HAProxy and nginx,
//! each routing the four agents' names. Processes are started here and
//! stopped by PID; their CPU, memory and fds are read from /proc.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::{sni, Agents, NAMES};

/// What a target is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The client talks to the agents directly: the physical limit.
    Direct,
    /// splicegate with an engine (`splice` or `copy`).
    Splicegate(&'static str),
    /// HAProxy in `mode tcp` routing on `req.ssl_sni`, with a splice option
    /// (`""`, `"option splice-auto"` or forced request and response splice).
    Haproxy(&'static str),
    /// nginx `stream` with `ssl_preread` and a `map`.
    Nginx,
}

/// A target's display name.
pub fn name(kind: &Kind) -> String {
    match kind {
        Kind::Direct => "direct".into(),
        Kind::Splicegate(e) => format!("splicegate {e}"),
        Kind::Haproxy("") => "haproxy".into(),
        Kind::Haproxy(o) if o.contains("auto") => "haproxy splice-auto".into(),
        Kind::Haproxy(_) => "haproxy splice".into(),
        Kind::Nginx => "nginx stream".into(),
    }
}

/// A started target.
pub struct Running {
    /// Where proxies listen (None for direct).
    pub listen: Option<SocketAddr>,
    child: Option<Child>,
    dir: PathBuf,
}

impl Running {
    /// A target process started elsewhere, listening on `listen`, with its
    /// scratch directory `dir` (removed on stop).
    pub fn spawned(listen: SocketAddr, child: Child, dir: PathBuf) -> Running {
        Running {
            listen: Some(listen),
            child: Some(child),
            dir,
        }
    }

    /// No process: the client connects to the agent itself.
    pub fn none(dir: PathBuf) -> Running {
        Running {
            listen: None,
            child: None,
            dir,
        }
    }

    /// Address that reaches agent `agent` through this target.
    pub fn addr(&self, agents: &Agents, agent: &str) -> SocketAddr {
        self.listen.unwrap_or_else(|| agents.addr(agent))
    }

    /// The target's processes (the main one and its descendants).
    pub fn pids(&self) -> Vec<u32> {
        self.child
            .as_ref()
            .map_or_else(Vec::new, |c| descendants(c.id()))
    }

    /// None while alive, else how it ended.
    pub fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(status)) => Some(format!("exited: {status}")),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait: {e}")),
        }
    }

    /// Stop by PID: SIGTERM, then SIGKILL if still there after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Wait until `addr` accepts connections (bounded).
pub fn wait_port(addr: SocketAddr, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited before listening: {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!("not listening on {addr} after 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start a target. `splicegate` is the binary to run; `conns` the most
/// connections it must hold at once (the peers' own connection caps).
pub fn start(
    kind: &Kind,
    agents: &Agents,
    splicegate: &Path,
    conns: u32,
) -> Result<Running, String> {
    let dir = std::env::temp_dir().join(format!(
        "splicegate-bench-{}-{}",
        std::process::id(),
        name(kind).replace(' ', "-")
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut running = Running {
        listen: None,
        child: None,
        dir: dir.clone(),
    };
    let routes: Vec<(String, SocketAddr)> =
        NAMES.iter().map(|n| (sni(n), agents.addr(n))).collect();
    match kind {
        Kind::Direct => return Ok(running),
        Kind::Splicegate(variant) => {
            // `splice`, `copy`, or the splice engine with another pipe
            // size: `splice-64k`, `splice-256k` (the default), `splice-1m`.
            let (engine, pipe) = match *variant {
                "splice-64k" => ("splice", Some(64 * 1024)),
                "splice-256k" => ("splice", Some(256 * 1024)),
                "splice-1m" => ("splice", Some(1 << 20)),
                e => (e, None),
            };
            // `splice-spin30`, `copy-spin50`: low-latency mode with that
            // spin window, in microseconds.
            let (engine, spin) = match engine.split_once("-spin") {
                Some((e, us)) => (e, us.parse::<u32>().ok()),
                None => (engine, None),
            };
            // The io_uring engines need a binary built with the `uring`
            // feature (bench/run.sh builds it beside the default one).
            let uring_bin;
            let splicegate = if engine.starts_with("uring") {
                uring_bin = std::env::var_os("SPLICEGATE_URING").map_or_else(
                    || PathBuf::from("target/uring/release/splicegate"),
                    PathBuf::from,
                );
                uring_bin.as_path()
            } else {
                splicegate
            };
            let mut cfg = format!("[[listener]]\nbind = \"127.0.0.1:0\"\nengine = \"{engine}\"\n");
            if let Some(p) = pipe {
                cfg.push_str(&format!("pipe_size = {p}\n"));
            }
            if let Some(us) = spin {
                cfg.push_str(&format!("low_latency = \"spin\"\nspin_us = {us}\n"));
            }
            for (n, a) in &routes {
                cfg.push_str(&format!("[[route]]\nsni = \"{n}\"\nagent = \"{a}\"\n"));
            }
            let file = dir.join("splicegate.toml");
            std::fs::write(&file, cfg).map_err(|e| e.to_string())?;
            let (child, addr) = spawn_splicegate(splicegate, &file)?;
            running.listen = Some(addr);
            running.child = Some(child);
        }
        Kind::Haproxy(option) => {
            let port = free_port().map_err(|e| e.to_string())?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("valid");
            let mut cfg = format!(
                "global\n  maxconn {maxconn}\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  {option}\n\n\
                 frontend fe\n  bind {addr}\n  tcp-request inspect-delay 5s\n  tcp-request content accept if {{ req_ssl_hello_type 1 }}\n",
                maxconn = conns.max(5000) + 100
            );
            for (i, (n, _)) in routes.iter().enumerate() {
                cfg.push_str(&format!("  use_backend b{i} if {{ req.ssl_sni -i {n} }}\n"));
            }
            for (i, (_, a)) in routes.iter().enumerate() {
                cfg.push_str(&format!("\nbackend b{i}\n  server s{i} {a}\n"));
            }
            let file = dir.join("haproxy.cfg");
            std::fs::write(&file, cfg).map_err(|e| e.to_string())?;
            let log = dir.join("haproxy.log");
            let mut child = Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
                .spawn()
                .map_err(|e| format!("cannot start haproxy: {e} (bench/run.sh installs it)"))?;
            wait_port(addr, &mut child).map_err(|e| format!("{e}: {}", last_alert(&log)))?;
            running.listen = Some(addr);
            running.child = Some(child);
        }
        Kind::Nginx => {
            let port = free_port().map_err(|e| e.to_string())?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("valid");
            let module = ["/usr/lib/nginx/modules/ngx_stream_module.so"]
                .into_iter()
                .find(|m| Path::new(m).exists())
                .map_or(String::new(), |m| format!("load_module {m};\n"));
            let mut cfg = format!(
                "{module}daemon off;\nmaster_process on;\nworker_processes auto;\nworker_rlimit_nofile {nofile};\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
                 events {{ worker_connections {worker}; }}\n\
                 stream {{\n  map $ssl_preread_server_name $agent {{\n",
                dir = dir.display(),
                worker = 2 * conns.max(4000) + 100,
                nofile = 2 * conns.max(4000) + 200,
            );
            for (n, a) in &routes {
                cfg.push_str(&format!("    {n} {a};\n"));
            }
            cfg.push_str(&format!(
                "    default 127.0.0.1:1;\n  }}\n  server {{\n    listen {addr};\n    ssl_preread on;\n    proxy_pass $agent;\n    proxy_timeout 1h;\n  }}\n}}\n"
            ));
            let child = spawn_nginx(&dir, &cfg, addr)?;
            running.listen = Some(addr);
            running.child = Some(child);
        }
    }
    Ok(running)
}

/// Start `splicegate run --config file` with JSON logs; returns the child
/// and the address of its first listener (from its `listening` event).
pub fn spawn_splicegate(splicegate: &Path, file: &Path) -> Result<(Child, SocketAddr), String> {
    let mut child = Command::new(splicegate)
        .args(["--log-format", "json", "run", "--config"])
        .arg(file)
        .env(
            "SPLICEGATE_LOG",
            std::env::var("BENCH_SPLICEGATE_LOG")
                .unwrap_or_else(|_| "warn,splicegate::server=info".to_owned()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e} (build it with cargo build --release)",
                splicegate.display()
            )
        })?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            return Err("splicegate exited before listening".into());
        };
        if let Some(i) = line.find("\"addr\":\"") {
            let rest = &line[i + 8..];
            break rest[..rest.find('"').unwrap_or(0)]
                .parse::<SocketAddr>()
                .map_err(|e| e.to_string())?;
        }
    };
    // Keep draining its log so it never blocks on a full pipe; warnings
    // and errors are kept beside its config for a look after the run.
    let log = file.with_file_name("splicegate.log");
    std::thread::spawn(move || {
        use std::io::Write;
        let mut out = std::fs::File::create(log).ok();
        for line in lines.map_while(Result::ok) {
            if let Some(f) = out.as_mut() {
                let _ = writeln!(f, "{line}");
            }
        }
    });
    Ok((child, addr))
}

/// Write `cfg` as `dir/nginx.conf`, start nginx on it in the foreground
/// and wait until it listens on `addr`.
pub fn spawn_nginx(dir: &Path, cfg: &str, addr: SocketAddr) -> Result<Child, String> {
    let file = dir.join("nginx.conf");
    std::fs::write(&file, cfg).map_err(|e| e.to_string())?;
    let mut child = Command::new("nginx")
        .arg("-c")
        .arg(&file)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start nginx: {e} (bench/run.sh installs it)"))?;
    wait_port(addr, &mut child)
        .map_err(|e| format!("{e}: {}", last_alert(&dir.join("error.log"))))?;
    Ok(child)
}

/// The last ALERT line of a log, for error messages.
pub fn last_alert(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| l.contains("ALERT") || l.contains("emerg"))
        .unwrap_or("no error logged")
        .to_owned()
}

/// `pid` and all its descendants, from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) =
                stat_fields(p).and_then(|f| f.get(1).and_then(|x| x.parse::<u32>().ok()))
            {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == cur)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out
}

/// Fields of /proc/PID/stat after the command name (field 3 onwards).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU seconds (user + system) used so far by `pids`.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|&p| stat_fields(p))
        .map(|f| {
            // utime and stime are fields 14 and 15; index from field 3.
            let t = |i: usize| {
                f.get(i - 3)
                    .and_then(|x| x.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (t(14) + t(15)) as f64 / 100.0
        })
        .sum()
}

/// Busy CPU seconds of the whole machine so far.
pub fn machine_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle, iowait.
    v.iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum::<u64>() as f64
        / 100.0
}

/// Times any CPU entered an idle state so far (the cpuidle driver's
/// per-state `usage`, summed over CPUs and states; 0 without cpuidle).
/// Per round trip it shows how often a proxy's thread is put to sleep and
/// woken again.
pub fn idle_entries() -> u64 {
    let Ok(cpus) = std::fs::read_dir("/sys/devices/system/cpu") else {
        return 0;
    };
    cpus.flatten()
        .filter(|c| {
            let n = c.file_name();
            let n = n.to_string_lossy();
            n.starts_with("cpu") && n[3..].bytes().all(|b| b.is_ascii_digit()) && n.len() > 3
        })
        .filter_map(|c| std::fs::read_dir(c.path().join("cpuidle")).ok())
        .flat_map(|states| states.flatten())
        .filter_map(|st| std::fs::read_to_string(st.path().join("usage")).ok())
        .filter_map(|u| u.trim().parse::<u64>().ok())
        .sum()
}

/// Resident memory of `pids`, KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum()
}

/// Open fds of `pids`.
pub fn fds(pids: &[u32]) -> usize {
    pids.iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|d| d.count())
        .sum()
}
