//! Unit tests of SNI routing.

use super::*;

fn t(s: &str) -> Target {
    s.parse().unwrap()
}

fn table() -> RouteTable {
    let mut r = RouteTable::new();
    r.insert("agent1.dcv.example".parse().unwrap(), t("10.0.0.1:8443"));
    r.insert("*.dcv.example".parse().unwrap(), t("10.0.0.2:8443"));
    r.add_agent_in_name(AgentInName {
        suffix: "agents.dcv.example".into(),
        port: 8443,
        allow: vec!["10.150.248.0/24".parse().unwrap()],
    });
    r
}

#[test]
fn precedence_and_wildcard_depth() {
    let r = table();
    let d = r.resolve(Some("agent1.dcv.example")).unwrap();
    assert_eq!(d.route, RouteKind::Exact("agent1.dcv.example".into()));
    let d = r.resolve(Some("desk.dcv.example")).unwrap();
    assert_eq!(d.target, t("10.0.0.2:8443"));
    // Two more labels: no match, no default.
    assert_eq!(
        r.resolve(Some("a.desk.dcv.example")),
        Err(RouteError::NoRoute("a.desk.dcv.example".into()))
    );
    // The bare suffix is not matched by the wildcard.
    assert!(r.resolve(Some("dcv.example")).is_err());
}

#[test]
fn agent_in_name_allowlist() {
    let r = table();
    let d = r
        .resolve(Some("10-150-248-180.agents.dcv.example"))
        .unwrap();
    assert_eq!(d.target, t("10.150.248.180:8443"));
    assert!(matches!(
        r.resolve(Some("10-150-249-1.agents.dcv.example")),
        Err(RouteError::NotAllowed { .. })
    ));
    assert!(matches!(
        r.resolve(Some("999-1-1-1.agents.dcv.example")),
        Err(RouteError::BadAgentLabel { .. })
    ));
}

#[test]
fn default_and_no_sni() {
    let mut r = table();
    assert_eq!(
        r.resolve(None),
        Err(RouteError::NoSni("there is no default route"))
    );
    r.set_default(Some(t("10.0.0.9:8443")));
    assert_eq!(r.resolve(None).unwrap().route, RouteKind::Default);
    assert_eq!(
        r.resolve(Some("other.example")).unwrap().route,
        RouteKind::Default
    );
    r.set_no_sni(NoSni::Reject);
    assert!(r.resolve(None).is_err());
    r.set_override(Some(t("127.0.0.1:1")));
    assert_eq!(r.resolve(None).unwrap().route, RouteKind::Override);
}

#[test]
fn vpce_restricted_route() {
    let mut r = table();
    r.insert_restricted(
        "agent1.dcv.example".parse().unwrap(),
        t("10.0.0.1:8443"),
        vec!["vpce-1".into()],
    );
    assert!(r
        .resolve_from(Some("agent1.dcv.example"), Some("vpce-1"))
        .is_ok());
    assert!(matches!(
        r.resolve_from(Some("agent1.dcv.example"), Some("vpce-2")),
        Err(RouteError::VpceNotAllowed { .. })
    ));
    assert!(r.resolve_from(Some("agent1.dcv.example"), None).is_err());
    assert!(r.resolve_from(Some("x.dcv.example"), None).is_ok());
}

#[test]
fn dashed_ipv4() {
    assert_eq!(
        parse_dashed_ipv4("10-150-248-180"),
        Some(Ipv4Addr::new(10, 150, 248, 180))
    );
    for bad in [
        "10-150-248",
        "10-150-248-180-1",
        "256-0-0-1",
        "01-0-0-1",
        "a-b-c-d",
        "1--1-1",
    ] {
        assert_eq!(parse_dashed_ipv4(bad), None, "{bad}");
    }
}

#[test]
fn patterns_and_targets() {
    assert_eq!(
        "*.A.b.".parse::<SniPattern>().unwrap(),
        SniPattern::Wildcard("a.b".into())
    );
    assert!("a*.b".parse::<SniPattern>().is_err());
    assert!("*.*.b".parse::<SniPattern>().is_err());
    assert_eq!(t("[::1]:9"), Target::Addr("[::1]:9".parse().unwrap()));
    assert_eq!(
        t("Agent.Example:8443"),
        Target::Host {
            name: "agent.example".into(),
            port: 8443
        }
    );
    assert!("agent".parse::<Target>().is_err());
    for bad in ["999.1.1.1:8443", "10.1.1:8443", "1.2.3.4.5:1"] {
        let e = bad.parse::<Target>().unwrap_err();
        assert!(e.contains("not a valid IPv4 address"), "{bad}: {e}");
    }
    assert!("agent:0".parse::<Target>().is_err());
}

#[test]
fn a_label_under_a_session_suffix_is_a_session() {
    let mut r = table();
    r.add_session_in_name("sessions.dcv.example".into());
    r.insert(
        "fixed.sessions.dcv.example".parse().unwrap(),
        t("10.0.0.9:8443"),
    );
    let d = r.resolve(Some("abc-123.sessions.dcv.example")).unwrap();
    assert_eq!(
        d.route,
        RouteKind::SessionInName("sessions.dcv.example".into())
    );
    assert_eq!(d.target, Target::Session("abc-123".into()));
    assert_eq!(d.route.to_string(), "session-in-name:sessions.dcv.example");
    // An exact name still wins; two labels under the suffix match nothing.
    assert_eq!(
        r.resolve(Some("fixed.sessions.dcv.example"))
            .unwrap()
            .target,
        t("10.0.0.9:8443")
    );
    assert!(r.resolve(Some("a.b.sessions.dcv.example")).is_err());
    assert!(r.has_sessions());
    assert!(r.has_suffix("agents.dcv.example") && r.has_suffix("sessions.dcv.example"));
}
