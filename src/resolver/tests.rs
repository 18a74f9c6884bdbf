use super::*;
use crate::route::valid_session_id;

fn resolver(cfg: ResolverConfig) -> Resolver {
    Resolver::new(cfg, Arc::default(), None).unwrap()
}

fn cfg() -> ResolverConfig {
    let mut c = ResolverConfig::new("http://127.0.0.1:1");
    c.allow = vec!["10.0.0.0/8".parse().unwrap()];
    c.allow_names = vec!["agents.example".to_owned()];
    c
}

fn wire(json: &str) -> Wire {
    parse_answer(json.as_bytes()).unwrap()
}

#[test]
fn answers_inside_the_allowlist_become_targets() {
    let c = cfg();
    let a = check_answer(
            &c,
            "s1",
            Transport::Http,
            wire(r#"{"SessionId":"s1","TransportProtocol":"HTTP","DcvServerEndpoint":"10.1.2.3","Port":8443,"WebUrlPath":"/dcv"}"#),
        )
        .unwrap();
    assert_eq!(a.target, Target::Addr("10.1.2.3:8443".parse().unwrap()));
    assert_eq!(a.web_url_path, "/dcv");
    // A name under an allowed suffix, the port as a string, no path.
    let a = check_answer(
            &c,
            "s1",
            Transport::Quic,
            wire(r#"{"TransportProtocol":"QUIC","DcvServerEndpoint":"Host1.Agents.Example","Port":"8443"}"#),
        )
        .unwrap();
    assert_eq!(
        a.target,
        Target::Host {
            name: "host1.agents.example".into(),
            port: 8443
        }
    );
    assert_eq!(a.web_url_path, "/");
}

#[test]
fn answers_outside_the_allowlist_are_refused() {
    let c = cfg();
    for (json, why) in [
        (
            r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"192.168.1.1","Port":8443}"#,
            "outside the allowed networks",
        ),
        (
            r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"127.0.0.1","Port":8443}"#,
            "outside the allowed networks",
        ),
        (
            r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"evilagents.example","Port":8443}"#,
            "not under an allowed",
        ),
        (
            r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"agents.example.evil","Port":8443}"#,
            "not under an allowed",
        ),
        (
            r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"10.1.1.1","Port":22}"#,
            "port 22",
        ),
        (
            r#"{"TransportProtocol":"QUIC","DcvServerEndpoint":"10.1.1.1","Port":8443}"#,
            "transport",
        ),
        (
            r#"{"SessionId":"other","TransportProtocol":"HTTP","DcvServerEndpoint":"10.1.1.1","Port":8443}"#,
            "session",
        ),
        (
            r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"10.1.1.1","Port":8443,"WebUrlPath":"/a b"}"#,
            "WebUrlPath",
        ),
        (
            r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"10.1.1.1","Port":8443,"WebUrlPath":"x"}"#,
            "WebUrlPath",
        ),
        (
            r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"a/b","Port":8443}"#,
            "neither",
        ),
    ] {
        let e = check_answer(&c, "s1", Transport::Http, wire(json)).unwrap_err();
        assert_eq!(e.kind(), Kind::ResolverBadAnswer, "{json}");
        assert!(e.to_string().contains(why), "{json}: {e}");
    }
}

#[test]
fn malformed_answers_are_bad_answers() {
    for body in [
        "",
        "null",
        "[]",
        "{}",
        r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"10.0.0.1"}"#,
        r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"10.0.0.1","Port":70000}"#,
        r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"10.0.0.1","Port":"x"}"#,
        r#"{"TransportProtocol":"HTTP","DcvServerEndpoint":"10.0.0.1","Port":0}"#,
    ] {
        let e = parse_answer(body.as_bytes()).unwrap_err();
        assert_eq!(e.kind(), Kind::ResolverBadAnswer, "{body}");
    }
}

#[test]
fn session_ids_are_restricted() {
    assert!(valid_session_id("console"));
    assert!(valid_session_id("a1b2-c3_d4.e5"));
    for bad in ["", "a b", "a&b=c", "a%20", "a/b", "ä", &"x".repeat(129)] {
        assert!(!valid_session_id(bad), "{bad:?}");
    }
}

#[tokio::test]
async fn an_invalid_id_is_unknown_without_a_request() {
    let r = Arc::new(resolver(cfg()));
    let e = r.resolve("a&b", Transport::Http, None).await.unwrap_err();
    assert_eq!(e.kind(), Kind::SessionUnknown);
}

#[tokio::test]
async fn an_unreachable_resolver_is_unavailable_and_not_cached() {
    // Port 1 on loopback: refused.
    let r = Arc::new(resolver(cfg()));
    for _ in 0..2 {
        let e = r.resolve("s1", Transport::Http, None).await.unwrap_err();
        assert_eq!(e.kind(), Kind::ResolverUnavailable, "{e}");
    }
    assert!(!r.is_up());
    assert!(r.cache.lock().is_empty());
}

#[test]
fn a_reload_keeps_the_cache_only_for_the_same_url() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let a = resolver(cfg());
    let b = Resolver::new(cfg(), Arc::default(), Some(&a)).unwrap();
    assert!(Arc::ptr_eq(&a.cache, &b.cache));
    let mut other = cfg();
    other.url = "http://127.0.0.1:2".into();
    let c = Resolver::new(other, Arc::default(), Some(&a)).unwrap();
    assert!(!Arc::ptr_eq(&a.cache, &c.cache));
    // A narrower allowlist drops what the old one admitted.
    let mut narrower = cfg();
    narrower.allow = vec!["10.1.0.0/16".parse().unwrap()];
    let d = Resolver::new(narrower, Arc::default(), Some(&a)).unwrap();
    assert!(!Arc::ptr_eq(&a.cache, &d.cache));
}
