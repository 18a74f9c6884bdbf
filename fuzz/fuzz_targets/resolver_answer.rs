//! The Session Resolver's answer: never panics, and whatever the resolver
//! says, the agent splicegate would dial is inside the allowlist (networks
//! for addresses, suffixes on a label boundary for names, the listed
//! ports) and the path it would send is absolute and printable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splicegate::resolver::{answer, ResolverConfig, Transport};
use splicegate::route::Target;

fuzz_target!(|data: &[u8]| {
    let mut cfg = ResolverConfig::new("http://resolver.test");
    cfg.allow = vec!["10.150.248.0/24".parse().unwrap()];
    cfg.allow_names = vec!["agents.internal.example".to_owned()];
    for transport in [Transport::Http, Transport::Quic] {
        let Ok(a) = answer(&cfg, "console", transport, data) else {
            continue;
        };
        match &a.target {
            Target::Addr(addr) => {
                assert!(cfg.allow[0].contains(addr.ip()), "{addr}");
                assert_eq!(addr.port(), 8443);
            }
            Target::Host { name, port } => {
                assert!(
                    name == "agents.internal.example" || name.ends_with(".agents.internal.example"),
                    "{name}"
                );
                assert_eq!(*port, 8443);
            }
            other => panic!("{other:?}"),
        }
        assert!(a.web_url_path.starts_with('/'), "{:?}", a.web_url_path);
        assert!(a.web_url_path.bytes().all(|b| b.is_ascii_graphic()));
    }
});
