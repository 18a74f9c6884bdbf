//! Unit tests of path routing.

use super::*;

fn t(s: &str) -> Target {
    s.parse().unwrap()
}

fn table() -> PathTable {
    let mut p = PathTable::new();
    p.agent_in_path = Some(PathAgent {
        allow: vec!["10.150.248.0/24".parse().unwrap()],
        ports: vec![8443, 8444],
        strip: true,
    });
    p.insert(PrefixRoute {
        prefix: "/".into(),
        target: t("10.0.0.1:8443"),
        strip: true,
    });
    p.insert(PrefixRoute {
        prefix: "/desk1/".into(),
        target: t("10.0.0.2:8443"),
        strip: true,
    });
    p.insert(PrefixRoute {
        prefix: "/keep/".into(),
        target: t("10.0.0.3:8443"),
        strip: false,
    });
    p
}

fn fwd(p: &PathTable, target: &str) -> (String, String) {
    match p.resolve(target).unwrap() {
        PathDecision::Forward { target, path, .. } => (target.to_string(), path),
        other => panic!("{target}: {other:?}"),
    }
}

#[test]
fn agent_in_path_is_stripped_and_keeps_the_query() {
    let p = table();
    assert_eq!(
        fwd(&p, "/10.150.248.180/auth?x=1"),
        ("10.150.248.180:8443".into(), "/auth?x=1".into())
    );
    assert_eq!(
        fwd(&p, "/10.150.248.180:8444/"),
        ("10.150.248.180:8444".into(), "/".into())
    );
    assert_eq!(
        p.resolve("/10.150.248.180?x").unwrap(),
        PathDecision::Redirect("/10.150.248.180/?x".into())
    );
}

#[test]
fn addresses_outside_allow_or_malformed_are_refused() {
    let p = table();
    for (path, kind, status) in [
        ("/10.150.249.1/", "agent_not_allowed", 403),
        ("/127.0.0.1/", "agent_not_allowed", 403),
        ("/10.150.248.180:22/", "agent_not_allowed", 403),
        ("/999.1.1.1/", "bad_request", 400),
        ("/10.150.248.08/", "bad_request", 400),
        ("/10.150.248/", "bad_request", 400),
        ("/10.150.248.1.1/", "bad_request", 400),
        ("/10.150.248.1:0/", "bad_request", 400),
        ("/10.150.248.1:99999/", "bad_request", 400),
        ("/10.150.248.1:/", "bad_request", 400),
    ] {
        let e = p.resolve(path).unwrap_err();
        assert_eq!(
            (e.kind().as_str(), e.kind().http_status()),
            (kind, Some(status)),
            "{path}: {e}"
        );
    }
    let mut off = table();
    off.agent_in_path = None;
    let e = off.resolve("/10.150.248.180/").unwrap_err();
    assert_eq!(e.kind().http_status(), Some(403), "{e}");
}

#[test]
fn prefixes_longest_first_with_default() {
    let p = table();
    assert_eq!(
        fwd(&p, "/desk1/x/y?z"),
        ("10.0.0.2:8443".into(), "/x/y?z".into())
    );
    assert_eq!(
        fwd(&p, "/desk1x/"),
        ("10.0.0.1:8443".into(), "/desk1x/".into())
    );
    assert_eq!(fwd(&p, "/"), ("10.0.0.1:8443".into(), "/".into()));
    assert_eq!(
        fwd(&p, "/keep/a"),
        ("10.0.0.3:8443".into(), "/keep/a".into())
    );
    assert_eq!(
        p.resolve("/desk1").unwrap(),
        PathDecision::Redirect("/desk1/".into())
    );
    assert_eq!(p.resolve("/health").unwrap(), PathDecision::Health);
    assert_eq!(p.resolve("/health?full").unwrap(), PathDecision::Health);
    // Letters make it a name, not an address.
    assert_eq!(fwd(&p, "/v1.2/x").0, "10.0.0.1:8443");
}

#[test]
fn no_default_means_404() {
    let mut p = PathTable::new();
    p.insert(PrefixRoute {
        prefix: "/desk1/".into(),
        target: t("10.0.0.2:8443"),
        strip: true,
    });
    assert_eq!(p.resolve("/other").unwrap_err().kind(), Kind::NoRoute);
    assert_eq!(p.resolve("/").unwrap_err().kind(), Kind::NoRoute);
}

fn with_session(src: SessionSource) -> PathTable {
    let mut p = table();
    p.session = Some(src);
    p
}

#[test]
fn a_session_in_the_query_keeps_the_target() {
    let p = with_session(SessionSource::Query("sessionId".into()));
    let d = p.resolve("/auth?x=1&sessionId=s-1").unwrap();
    assert_eq!(
        d,
        PathDecision::Forward {
            route: "session-in-query".into(),
            target: Target::Session("s-1".into()),
            path: "/auth?x=1&sessionId=s-1".into(),
        }
    );
    // `sessionIdX=` is another parameter; without the parameter the next
    // rules apply.
    assert_eq!(
        p.resolve("/a?sessionIdX=1").unwrap(),
        table().resolve("/a?sessionIdX=1").unwrap()
    );
    assert_eq!(
        p.resolve("/a?sessionId=a%20b").unwrap_err().kind(),
        Kind::BadRequest
    );
    assert_eq!(p.resolve("/health").unwrap(), PathDecision::Health);
}

#[test]
fn a_session_in_the_path_is_stripped() {
    let p = with_session(SessionSource::Path("/session/".into()));
    assert_eq!(
        p.resolve("/session/abc/x/y?q=1").unwrap(),
        PathDecision::Forward {
            route: "session-in-path".into(),
            target: Target::Session("abc".into()),
            path: "/x/y?q=1".into(),
        }
    );
    assert_eq!(
        p.resolve("/session/abc?q").unwrap(),
        PathDecision::Redirect("/session/abc/?q".into())
    );
    assert_eq!(
        p.resolve("/session//x").unwrap_err().kind(),
        Kind::BadRequest
    );
    assert_eq!(
        p.resolve("/session/a&b/").unwrap_err().kind(),
        Kind::BadRequest
    );
}

#[test]
fn a_session_in_a_header() {
    let p = with_session(SessionSource::Header("x-dcv-session".into()));
    let hdr = |n: &str| (n == "x-dcv-session").then_some(&b" s9 "[..]);
    assert_eq!(
        p.resolve_request("/x", hdr).unwrap(),
        PathDecision::Forward {
            route: "session-in-header".into(),
            target: Target::Session("s9".into()),
            path: "/x".into(),
        }
    );
    assert_eq!(p.resolve("/x").unwrap(), table().resolve("/x").unwrap());
}

#[test]
fn paths_go_under_the_web_url_path() {
    assert_eq!(under_web_url_path("/", "/x?q"), "/x?q");
    assert_eq!(under_web_url_path("/dcv", "/x?q"), "/dcv/x?q");
    assert_eq!(under_web_url_path("/dcv/", "/"), "/dcv/");
}
