//! The terminate-mode path router: never panics, dials an address from
//! the path only inside the allowed networks and ports, hands the resolver
//! only valid session ids, and redirects only
//! to paths on the proxy itself (never `//host`, an open redirect).
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate::cidr::Cidr;
use splicegate::route::path::{
    PathAgent, PathDecision, PathTable, PrefixRoute, SessionSource, AGENT_IN_PATH,
};
use splicegate::route::{valid_session_id, Target};

fn table() -> PathTable {
    let mut t = PathTable::new();
    t.agent_in_path = Some(PathAgent {
        allow: vec!["10.150.248.0/24".parse().unwrap()],
        ports: vec![8443, 8444],
        strip: true,
    });
    for (prefix, agent, strip) in [
        ("/", "10.0.0.1:8443", true),
        ("/desk1/", "10.0.0.2:8443", true),
        ("/keep/", "10.0.0.3:8443", false),
    ] {
        t.insert(PrefixRoute {
            prefix: prefix.into(),
            target: agent.parse().unwrap(),
            strip,
        });
    }
    t.session = Some(SessionSource::Path("/session/".into()));
    t
}

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let table = table();
    let decision = table.resolve(target);
    if !target.starts_with('/') {
        return;
    }
    match decision {
        Ok(PathDecision::Forward {
            route,
            target: agent,
            path,
        }) => {
            assert!(path.starts_with('/'), "{path:?}");
            if route == AGENT_IN_PATH {
                let Target::Addr(a) = agent else {
                    panic!("{agent:?}")
                };
                let allow: Cidr = "10.150.248.0/24".parse().unwrap();
                assert!(
                    allow.contains(a.ip()) && [8443, 8444].contains(&a.port()),
                    "{a}"
                );
            } else if route == "session-in-path" {
                let Target::Session(id) = &agent else {
                    panic!("{agent:?}")
                };
                assert!(valid_session_id(id), "{id:?}");
            } else {
                let known = ["10.0.0.1:8443", "10.0.0.2:8443", "10.0.0.3:8443"];
                assert!(known.contains(&agent.to_string().as_str()), "{agent}");
            }
        }
        Ok(PathDecision::Redirect(location)) => {
            assert!(
                location.starts_with('/')
                    && !location.starts_with("//")
                    && !location.starts_with("/\\"),
                "{location:?}"
            );
        }
        Ok(PathDecision::Health) => {
            assert_eq!(target.split('?').next(), Some("/health"));
        }
        Err(e) => {
            let _ = (e.kind(), e.kind().http_status());
        }
    }
});
