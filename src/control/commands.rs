//! The control socket's commands: one function each, answering JSON. The
//! words are those `splicegate ctl` takes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::fail;
use crate::logging::{printable, rfc3339};
use crate::process::{Process, UpgradeState};
use crate::route::Target;
use crate::session::Session;
use crate::shutdown::Halt;

/// The commands, with their one-line help.
pub const COMMANDS: &[(&str, &str)] = &[
    ("help", "this list"),
    (
        "status",
        "pid, version, uptime, draining and the deadline left, open sessions, live upgrade state",
    ),
    (
        "sessions [--agent ADDR] [--route ROUTE] [--sni NAME]",
        "every open session (passthrough, terminate, QUIC) with the access log's fields and its bytes so far",
    ),
    (
        "agents",
        "every agent the routes and pools name: health, drained or not, open sessions",
    ),
    (
        "drain-agent ADDR",
        "route no new session to the agent (pools use their other agents); open ones go on",
    ),
    ("undrain-agent ADDR", "put the agent back in rotation"),
    (
        "close ID | close --agent ADDR [--over SECS]",
        "close one session, or every session of an agent spread over SECS seconds",
    ),
    (
        "drain [--deadline SECS]",
        "start the process's drain as SIGTERM does, with this drain timeout",
    ),
    (
        "upgrade [--timeout SECS]",
        "start the binary at this process's path and hand it every socket and session that can move",
    ),
];

/// Longest `--over` and `--deadline`: a day.
const MAX_SECS: u64 = 86_400;

/// Flags of a command: `--name value` pairs after the verb, and the words
/// that are not flags.
struct Flags<'a> {
    pairs: Vec<(&'a str, &'a str)>,
    positional: Vec<&'a str>,
}

/// Parse `words` taking the flags in `known`; an unknown flag, or one
/// without its value, is an error naming it.
fn flags<'a>(words: &[&'a str], known: &[&str]) -> Result<Flags<'a>, Value> {
    let mut pairs = Vec::new();
    let mut positional = Vec::new();
    let mut it = words.iter();
    while let Some(&w) = it.next() {
        if let Some(name) = w.strip_prefix("--") {
            if !known.contains(&name) {
                return Err(fail(
                    "bad_request",
                    format!("unknown option --{}", printable(name)),
                ));
            }
            let Some(&v) = it.next() else {
                return Err(fail("bad_request", format!("--{name} needs a value")));
            };
            pairs.push((name, v));
        } else {
            positional.push(w);
        }
    }
    Ok(Flags { pairs, positional })
}

impl Flags<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    /// Whole seconds from 1 to `max`.
    fn seconds(&self, name: &str, max: u64) -> Result<Option<Duration>, Value> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(Some(Duration::from_secs(n))),
            _ => Err(fail(
                "bad_request",
                format!(
                    "--{name} takes whole seconds from 1 to {max}, not `{}`",
                    printable(v)
                ),
            )),
        }
    }

    /// No more words than `n`.
    fn at_most(&self, n: usize) -> Result<(), Value> {
        match self.positional.get(n) {
            Some(extra) => Err(fail(
                "bad_request",
                format!("unexpected `{}`", printable(extra)),
            )),
            None => Ok(()),
        }
    }
}

/// An agent as the access log names it: `IP:PORT` or `HOST:PORT`.
fn agent_arg(s: &str) -> Result<String, Value> {
    match s.parse::<Target>() {
        Ok(t @ (Target::Addr(_) | Target::Host { .. })) => Ok(t.to_string()),
        _ => Err(fail(
            "bad_address",
            format!(
                "`{}` is not an agent address (IP:PORT or HOST:PORT, IPv6 in brackets)",
                printable(s)
            ),
        )),
    }
}

/// Run one command.
pub async fn command(p: &Arc<Process>, words: &[&str]) -> Value {
    let Some((&verb, rest)) = words.split_first() else {
        return fail("bad_request", "empty request; try `help`");
    };
    let r = match verb {
        "help" => Ok(help()),
        "status" => flags(rest, &[])
            .and_then(|f| f.at_most(0))
            .map(|()| status(p)),
        "sessions" => sessions(p, rest),
        "agents" => flags(rest, &[])
            .and_then(|f| f.at_most(0))
            .map(|()| agents(p)),
        "drain-agent" => drain_agent(p, rest, true),
        "undrain-agent" => drain_agent(p, rest, false),
        "close" => close(p, rest),
        "drain" => drain(p, rest),
        "upgrade" => upgrade(p, rest).await,
        other => Err(fail(
            "unknown_command",
            format!("unknown command `{}`; try `help`", printable(other)),
        )),
    };
    r.unwrap_or_else(|v| v)
}

fn help() -> Value {
    let list: Vec<Value> = COMMANDS
        .iter()
        .map(|(c, h)| json!({"command": c, "help": h}))
        .collect();
    json!({"ok": true, "commands": list})
}

fn status(p: &Process) -> Value {
    let upgrade = p.upgrade_state().clone();
    let (state, to) = match upgrade {
        UpgradeState::Idle => ("idle", None),
        UpgradeState::InProgress => ("in_progress", None),
        UpgradeState::Retired(pid) => ("retired", Some(pid)),
    };
    let left = p
        .drain
        .deadline_at()
        .map(|at| at.saturating_duration_since(Instant::now()).as_secs());
    json!({
        "ok": true,
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": p.started.elapsed().as_secs(),
        "draining": p.drain.draining(),
        "drain_deadline_s": left,
        "sessions": p.sessions.len(),
        "connections": p.tracker.active(),
        "drained_agents": p.routes.drained.list(),
        "upgrade": state,
        "handed_over_to": to,
    })
}

/// One session in the access log's field names.
fn session_json(s: &Session, now: Instant) -> Value {
    let i = &s.info;
    let (to_agent, to_client) = s.bytes.totals();
    json!({
        "id": i.id,
        "transport": i.transport,
        "listener": i.listener,
        "client": i.client.to_string(),
        "peer": i.peer.to_string(),
        "vpce": i.vpce,
        "sni": i.sni,
        "alpn": i.alpn,
        "route": i.route,
        "agent": i.agent,
        "pool": i.pool,
        "started": rfc3339(i.started),
        "idle_s": s.idle(now).as_secs(),
        "bytes_to_agent": to_agent,
        "bytes_to_client": to_client,
    })
}

fn sessions(p: &Process, rest: &[&str]) -> Result<Value, Value> {
    let f = flags(rest, &["agent", "route", "sni"])?;
    f.at_most(0)?;
    let agent = f.get("agent").map(agent_arg).transpose()?;
    let route = f.get("route");
    let sni = f.get("sni").map(str::to_ascii_lowercase);
    let now = Instant::now();
    let list: Vec<Value> = p
        .sessions
        .list()
        .iter()
        .filter(|s| agent.as_deref().is_none_or(|a| s.info.agent == a))
        .filter(|s| route.is_none_or(|r| s.info.route == r))
        .filter(|s| {
            sni.as_deref()
                .is_none_or(|n| s.info.sni.as_deref() == Some(n))
        })
        .map(|s| session_json(s, now))
        .collect();
    Ok(json!({"ok": true, "sessions": list}))
}

fn agents(p: &Process) -> Value {
    let named = p.routes.current().named_agents();
    let drained = p.routes.drained.list();
    let mut open: BTreeMap<String, usize> = BTreeMap::new();
    for s in p.sessions.list() {
        *open.entry(s.info.agent.clone()).or_default() += 1;
    }
    let mut names: Vec<String> = named.keys().cloned().collect();
    names.extend(drained.iter().cloned());
    names.sort();
    names.dedup();
    let list: Vec<Value> = names
        .iter()
        .map(|name| {
            let n = named.get(name).cloned().unwrap_or_default();
            let health = match n.up {
                Some(true) => json!("up"),
                Some(false) => json!("down"),
                None => Value::Null,
            };
            json!({
                "agent": name,
                "routes": n.routes,
                "pools": n.pools,
                "health": health,
                "draining": drained.contains(name),
                "sessions": open.get(name).copied().unwrap_or(0),
            })
        })
        .collect();
    json!({"ok": true, "agents": list})
}

fn drain_agent(p: &Process, rest: &[&str], drain: bool) -> Result<Value, Value> {
    let f = flags(rest, &[])?;
    f.at_most(1)?;
    let Some(raw) = f.positional.first() else {
        return Err(fail("bad_request", "which agent? give its IP:PORT"));
    };
    let agent = agent_arg(raw)?;
    let changed = if drain {
        p.routes.drained.insert(agent.clone())
    } else {
        p.routes.drained.remove(&agent)
    };
    let open = p
        .sessions
        .list()
        .iter()
        .filter(|s| s.info.agent == agent)
        .count();
    let known = p.routes.current().named_agents().contains_key(&agent);
    tracing::info!(
        event = if drain { "agent_drained" } else { "agent_undrained" },
        agent = %agent,
        changed,
        sessions = open,
        "{}",
        if drain {
            "agent drained: no new session goes to it; open ones go on"
        } else {
            "agent back in rotation"
        }
    );
    Ok(json!({
        "ok": true,
        "agent": agent,
        "draining": drain,
        "changed": changed,
        "sessions": open,
        "named_by_routes": known,
    }))
}

fn close(p: &Process, rest: &[&str]) -> Result<Value, Value> {
    let f = flags(rest, &["agent", "over"])?;
    f.at_most(1)?;
    match (f.positional.first(), f.get("agent")) {
        (Some(_), Some(_)) => Err(fail(
            "bad_request",
            "give a session id or --agent, not both",
        )),
        (None, None) => Err(fail(
            "bad_request",
            "which session? give its id, or --agent ADDR",
        )),
        (Some(raw), None) => {
            if f.get("over").is_some() {
                return Err(fail("bad_request", "--over goes with --agent"));
            }
            let id: u64 = raw.parse().map_err(|_| {
                fail(
                    "bad_request",
                    format!("`{}` is not a session id", printable(raw)),
                )
            })?;
            let s = p.sessions.get(id).ok_or_else(|| {
                fail(
                    "unknown_session",
                    format!("no open session has id {id}; see `sessions`"),
                )
            })?;
            s.stop.raise(Halt::Close);
            tracing::info!(event = "session_closed", id, agent = %s.info.agent, "session closed by an operator");
            Ok(json!({"ok": true, "closing": 1, "ids": [id]}))
        }
        (None, Some(raw)) => {
            let agent = agent_arg(raw)?;
            let over = f.seconds("over", MAX_SECS)?.unwrap_or(Duration::ZERO);
            let targets: Vec<Arc<Session>> = p
                .sessions
                .list()
                .into_iter()
                .filter(|s| s.info.agent == agent)
                .collect();
            let ids: Vec<u64> = targets.iter().map(|s| s.info.id).collect();
            tracing::info!(event = "sessions_closing", agent = %agent, sessions = ids.len(), over = ?over, "closing an agent's sessions");
            // Spread evenly: the first now, the last `over` × (n-1)/n on,
            // so their clients do not all reconnect at once.
            let n = targets.len() as u32;
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                for (i, s) in targets.into_iter().enumerate() {
                    let at = start + over * i as u32 / n.max(1);
                    tokio::time::sleep_until(at).await;
                    s.stop.raise(Halt::Close);
                }
            });
            Ok(json!({
                "ok": true,
                "closing": ids.len(),
                "ids": ids,
                "over_s": over.as_secs(),
            }))
        }
    }
}

fn drain(p: &Process, rest: &[&str]) -> Result<Value, Value> {
    let f = flags(rest, &["deadline"])?;
    f.at_most(0)?;
    let deadline = f.seconds("deadline", MAX_SECS)?;
    if matches!(*p.upgrade_state(), UpgradeState::Retired(_)) {
        return Err(fail("retired", "this process handed over; ask the new one"));
    }
    if !p.drain.request(deadline) {
        return Err(fail("draining", "the process is already draining"));
    }
    Ok(json!({
        "ok": true,
        "draining": true,
        "drain_timeout_s": deadline.unwrap_or(p.drain_timeout).as_secs(),
        "sessions": p.sessions.len(),
    }))
}

async fn upgrade(p: &Arc<Process>, rest: &[&str]) -> Result<Value, Value> {
    let f = flags(rest, &["timeout"])?;
    f.at_most(0)?;
    let timeout = f
        .seconds("timeout", 3600)?
        .unwrap_or(crate::upgrade::DEFAULT_TIMEOUT);
    match crate::upgrade::upgrade(p, timeout).await {
        Ok(r) => Ok(json!({
            "ok": true,
            "pid": r.pid,
            "listeners": r.listeners,
            "connections": r.connections,
            "in_flight_bytes": r.in_flight,
            "pipes": r.pipes,
            "flows": r.flows,
            "staying": r.staying,
        })),
        Err(e) => Err(fail(e.kind(), e)),
    }
}
