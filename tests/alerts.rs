//! deploy/prometheus/alerts.yml: the rules are valid (`promtool check
//! rules`), fire and stay quiet as their tests say (`promtool test
//! rules`), and every series they name is one splicegate's `/metrics`
//! exports — a renamed metric would otherwise silence an alert.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Proxy;

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir("deploy/prometheus")
        .output()
        .expect("run promtool");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_check_and_pass_their_tests() {
    if !common::require_tool("promtool", "--version") {
        return;
    }
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_series_the_alerts_name_is_exported() {
    let rules = std::fs::read_to_string("deploy/prometheus/alerts.yml").unwrap();
    let named: BTreeSet<String> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("splicegate_"))
        .map(str::to_owned)
        .collect();
    assert!(named.len() >= 8, "{named:?}");
    // A pool (agent series) and a UDP listener (QUIC series).
    let cfg = "[[listener]]\nbind = \"127.0.0.1:0\"\n\
               [[udp_listener]]\nbind = \"127.0.0.1:0\"\n\
               [[pool]]\nname = \"p\"\n[[pool.agents]]\naddr = \"127.0.0.1:9\"\n\
               [[route]]\nsni = \"*.p.test\"\npool = \"p\"\n\
               [admin]\nbind = \"127.0.0.1:0\"\n";
    let mut proxy = Proxy::start(Some(cfg), &[]);
    let udp: std::net::SocketAddr = proxy.find_event("listening", |v| v["proto"] == "udp")["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(b"not a QUIC Initial", udp).unwrap();
    let admin = proxy.admin.unwrap();
    let deadline = Instant::now() + common::WAIT;
    let text = loop {
        let text = common::admin_get(admin, "/metrics");
        if text.contains("splicegate_quic_initial_total") {
            break text;
        }
        assert!(Instant::now() < deadline, "no QUIC series: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for name in &named {
        assert!(
            exported.contains(name.as_str()),
            "alerts.yml names {name}, which /metrics does not export"
        );
    }
}
