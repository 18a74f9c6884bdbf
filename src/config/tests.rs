//! Config parsing: the examples, errors naming line and key, durations and
//! command-line overrides.

use std::time::Duration;

use super::*;
use crate::forward::Engine;

#[test]
fn full_example_parses() {
    let text = include_str!("../../examples/splicegate.toml");
    let c = Config::parse(text, "examples/splicegate.toml").unwrap();
    assert!(!c.listeners.is_empty());
    let d = c.routes.resolve(Some("agent1.dcv.example")).unwrap();
    assert_eq!(d.target.to_string(), "10.150.248.180:8443");
}

#[test]
fn terminate_example_parses() {
    let text = include_str!("../../examples/terminate.toml");
    let c = Config::parse(text, "examples/terminate.toml").unwrap();
    let t = c.listeners[0].terminate.as_ref().unwrap();
    assert_eq!(t.certs.len(), 2);
    assert!(t.forwarded_headers);
    match c.paths.resolve("/10.150.248.180/auth?x").unwrap() {
        crate::route::path::PathDecision::Forward { target, path, .. } => {
            assert_eq!(target.to_string(), "10.150.248.180:8443");
            assert_eq!(path, "/auth?x");
        }
        other => panic!("{other:?}"),
    }
    assert!(c.paths.resolve("/10.150.249.1/").is_err());
}

#[test]
fn errors_name_line_and_key() {
    let text = "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[route]]\nsni = \"a.example\"\nagent = \"nope\"\n";
    let e = Config::parse(text, "x.toml").unwrap_err().to_string();
    assert!(e.starts_with("x.toml:6: key `agent`:"), "{e}");
    assert!(e.contains("HOST:PORT"), "{e}");

    let text = "[[listener]]\nbind = \"127.0.0.1:0\"\nbogus = 1\n";
    let e = Config::parse(text, "x.toml").unwrap_err().to_string();
    assert!(e.starts_with("x.toml:3:") && e.contains("bogus"), "{e}");

    let text = "[[listener]]\nbind = \"127.0.0.1:0\"\nidle_timeout = \"5 parsecs\"\n";
    let e = Config::parse(text, "x.toml").unwrap_err().to_string();
    assert!(e.starts_with("x.toml:3: key `idle_timeout`:"), "{e}");

    let text = "[[route]]\nsni = \"a.example\"\nagent = \"127.0.0.1:1\"\n[[route]]\nsni = \"A.example.\"\nagent = \"127.0.0.1:2\"\n";
    let e = Config::parse(text, "x.toml").unwrap_err().to_string();
    assert!(
        e.starts_with("x.toml:5: key `sni`:") && e.contains("already"),
        "{e}"
    );

    let text = "[[agent_in_name]]\nsuffix = \"agents.example\"\nallow = [\"10.0.0.1/8\"]\n";
    let e = Config::parse(text, "x.toml").unwrap_err().to_string();
    assert!(e.starts_with("x.toml:3: key `allow`:"), "{e}");
}

#[test]
fn durations() {
    for text in ["0s", "500ms", "10s", "90s", "5m", "1h", "2d", "1500ms"] {
        assert_eq!(format_duration(parse_duration(text).unwrap()), text);
    }
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
    assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("s").is_err());
}

#[test]
fn cli_overrides() {
    let mut c = Config::default();
    let a: AgentArg = "*.x.example=127.0.0.1:9".parse().unwrap();
    let p: AgentArg = "/desk1=127.0.0.1:10".parse().unwrap();
    assert_eq!(p.pattern, AgentPattern::Path("/desk1/".into()));
    c.apply_cli(
        &["127.0.0.1:0".parse().unwrap()],
        &[a, p],
        Some(Engine::Copy),
        &CliTls::default(),
    )
    .unwrap();
    assert!(c.paths.has_prefix("/desk1/"));
    assert_eq!(c.listeners[0].name, "cli");
    assert_eq!(c.listeners[0].engine, Engine::Copy);
    assert!(c.routes.resolve(Some("d.x.example")).is_ok());
}

#[test]
fn session_resolver_example_parses() {
    let text = include_str!("../../examples/session-resolver.toml");
    let c = Config::parse(text, "examples/session-resolver.toml").unwrap();
    let r = c.resolver.as_ref().unwrap();
    assert_eq!(r.url, "http://resolver.internal.example:8080");
    assert_eq!(r.ports, [8443]);
    assert!(c.require_resolver);
    let d = c.routes.resolve(Some("s-1.sessions.dcv.example")).unwrap();
    assert_eq!(d.target, crate::route::Target::Session("s-1".into()));
    assert!(c
        .summary()
        .contains("resolver: http://resolver.internal.example:8080"));
}

#[test]
fn resolver_errors_name_the_key() {
    let base = "[[listener]]\nbind = \"127.0.0.1:0\"\n";
    for (extra, expect) in [
        ("[[session_in_name]]\nsuffix = \"s.example\"\n", "needs a [resolver]"),
        ("[resolver]\nurl = \"ftp://x\"\nallow = [\"10.0.0.0/8\"]\n", "http:// or https://"),
        ("[resolver]\nurl = \"http://x\"\n", "set `allow`"),
        ("[resolver]\nurl = \"https://x\"\nallow = [\"10.0.0.0/8\"]\n", "needs `ca`"),
        ("[resolver]\nurl = \"http://x\"\nca = \"/nope.pem\"\nallow = [\"10.0.0.0/8\"]\n", "plain http"),
        ("[resolver]\nurl = \"https://x\"\nca = \"/nope.pem\"\nallow = [\"10.0.0.0/8\"]\n", "ca /nope.pem"),
        ("[resolver]\nurl = \"https://x\"\nca = \"/nope.pem\"\ncert = \"/c.pem\"\nallow = [\"10.0.0.0/8\"]\n", "give both"),
        ("[resolver]\nurl = \"http://x\"\nallow = [\"10.0.0.0/8\"]\nports = []\n", "key `ports`"),
        ("[resolver]\nurl = \"http://x\"\nallow = [\"10.0.0.0/8\"]\nurl_typo = 1\n", "unknown field `url_typo`"),
        ("[resolver]\nurl = \"http://x?a=b\"\nallow = [\"10.0.0.0/8\"]\n", "without query"),
        ("[admin]\nbind = \"127.0.0.1:0\"\nrequire_resolver = true\n", "no [resolver]"),
        ("[resolver]\nurl = \"http://x\"\nallow = [\"10.0.0.0/8\"]\n[session_in_request]\nquery = \"a\"\nheader = \"b\"\n", "exactly one"),
        ("[resolver]\nurl = \"http://x\"\nallow = [\"10.0.0.0/8\"]\n[session_in_request]\npath_prefix = \"session\"\n", "path prefix"),
        ("[[agent_in_name]]\nsuffix = \"a.example\"\nallow = []\n[resolver]\nurl = \"http://x\"\nallow = [\"10.0.0.0/8\"]\n[[session_in_name]]\nsuffix = \"a.example\"\n", "already an agent-in-name"),
    ] {
        let text = format!("{base}{extra}");
        let e = Config::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(e.contains(expect), "{extra}: {e}");
    }
    let ok = format!("{base}[resolver]\nurl = \"http://127.0.0.1:9\"\nallow = [\"10.0.0.0/8\"]\n[session_in_request]\nheader = \"X-DCV-Session\"\n");
    let c = Config::parse(&ok, "x.toml").unwrap();
    assert_eq!(
        c.paths.session,
        Some(crate::route::path::SessionSource::Header(
            "x-dcv-session".into()
        ))
    );
}

#[test]
fn low_latency_on_tcp_and_udp_listeners() {
    let routes = "[[route]]\nsni = \"a.example\"\nagent = \"127.0.0.1:8443\"\n";
    let text = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\nlow_latency = \"spin\"\n\
         [[udp_listener]]\nbind = \"127.0.0.1:0\"\nlow_latency = \"spin\"\nspin_us = 120\n{routes}"
    );
    let c = Config::parse(&text, "x.toml").unwrap();
    assert_eq!(c.listeners[0].spin, Some(Duration::from_micros(50)));
    assert_eq!(c.udp_listeners[0].spin, Some(Duration::from_micros(120)));
    let s = c.summary();
    assert!(
        s.contains("low_latency=spin for 50 us after traffic"),
        "{s}"
    );
    assert!(
        s.contains("low_latency=spin for 120 us after datagrams"),
        "{s}"
    );

    let off = format!("[[udp_listener]]\nbind = \"127.0.0.1:0\"\nlow_latency = \"off\"\n{routes}");
    assert_eq!(
        Config::parse(&off, "x.toml").unwrap().udp_listeners[0].spin,
        None
    );

    for (udp, want) in [
        (
            "spin_us = 50",
            "x.toml:3: key `spin_us`: set `low_latency = \"spin\"` too",
        ),
        (
            "low_latency = \"busy\"",
            "x.toml:3: key `low_latency`: `busy` is not a mode",
        ),
        (
            "low_latency = \"spin\"\nspin_us = 0",
            "x.toml:4: key `spin_us`",
        ),
        (
            "low_latency = \"spin\"\nspin_us = 5000",
            "x.toml:4: key `spin_us`",
        ),
    ] {
        let text = format!("[[udp_listener]]\nbind = \"127.0.0.1:0\"\n{udp}\n{routes}");
        let e = Config::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(e.starts_with(want), "{udp}: {e}");
    }
}

#[test]
fn udp_listener_keys_and_their_checks() {
    let text = "[[udp_listener]]\nbind = \"127.0.0.1:0\"\nlb_networks = [\"10.0.0.0/24\"]\n\
                max_pending = 100\npending_bytes_max = 2097152\nudp_workers = 3\nidle_timeout = \"90s\"\n\
                [[route]]\nsni = \"a.example\"\nagent = \"127.0.0.1:1\"\n";
    let c = Config::parse(text, "x.toml").unwrap();
    let u = &c.udp_listeners[0];
    assert_eq!(u.lb_networks.len(), 1);
    assert_eq!(
        (u.max_pending, u.pending_bytes_max, u.workers),
        (100, 2 << 20, 3)
    );
    assert_eq!(u.sockets(), 3);
    let w = crate::udp::warnings(u);
    assert!(
        w.iter()
            .any(|w| w.contains("not above the NLB's fixed UDP flow timeout")),
        "{w:?}"
    );
    // The defaults need no warning about the idle timeout.
    let text = "[[udp_listener]]\nbind = \"127.0.0.1:0\"\n";
    let c = Config::parse(text, "x.toml").unwrap();
    assert_eq!(c.udp_listeners[0].idle_timeout, Duration::from_secs(180));
    assert!(crate::udp::warnings(&c.udp_listeners[0])
        .iter()
        .all(|w| !w.contains("idle_timeout")));
    for (bad, key) in [
        ("udp_workers = 0", "udp_workers"),
        ("pending_bytes_max = 1000", "pending_bytes_max"),
        ("max_pending = 0", "max_pending"),
        ("lb_networks = [\"nope\"]", "lb_networks"),
    ] {
        let text = format!("[[udp_listener]]\nbind = \"127.0.0.1:0\"\n{bad}\n");
        let e = Config::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml:3:") && e.contains(key), "{bad}: {e}");
    }
}

#[test]
fn resolver_host_names_need_networks_for_their_addresses() {
    let text = "[resolver]\nurl = \"http://127.0.0.1:1\"\nallow_names = [\"agents.example\"]\n";
    let e = Config::parse(text, "x.toml").unwrap_err().to_string();
    assert!(e.contains("also set `allow`"), "{e}");
    let text = "[resolver]\nurl = \"http://127.0.0.1:1\"\nallow_names = [\"agents.example\"]\nallow = [\"10.0.0.0/8\"]\n";
    Config::parse(text, "x.toml").unwrap();
}
