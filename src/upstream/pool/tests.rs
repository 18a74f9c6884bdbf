//! Unit tests of the pool policies, limits and passive health.

use super::*;

fn pool(policy: Policy, weights: &[(u32, bool)]) -> Pool {
    Pool::new(PoolConfig {
        name: "p".into(),
        policy,
        agents: weights
            .iter()
            .enumerate()
            .map(|(i, &(weight, backup))| AgentConfig {
                target: format!("10.0.0.{}:8443", i + 1).parse().unwrap(),
                weight,
                backup,
                max_conns: None,
            })
            .collect(),
        passive: Passive {
            max_fails: 2,
            fail_window: Duration::from_secs(10),
            fail_timeout: Duration::from_secs(30),
        },
        health: None,
        attempts: 3,
    })
}

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
}

#[test]
fn weighted_round_robin_shares() {
    let p = pool(Policy::RoundRobin, &[(3, false), (1, false), (0, false)]);
    let now = Instant::now();
    let mut counts = [0; 3];
    for _ in 0..400 {
        counts[p.order(ip(1), now, &Drained::default()).unwrap()[0]] += 1;
    }
    assert_eq!(counts, [300, 100, 0]);
}

#[test]
fn backups_only_when_primaries_are_down() {
    let p = pool(Policy::First, &[(1, false), (1, true)]);
    let now = Instant::now();
    assert_eq!(p.order(ip(1), now, &Drained::default()).unwrap(), vec![0]);
    p.agents[0].set_checked(false);
    assert_eq!(p.order(ip(1), now, &Drained::default()).unwrap(), vec![1]);
    p.agents[1].set_checked(false);
    let e = p.order(ip(1), now, &Drained::default()).unwrap_err();
    assert!(e.to_string().contains("2 down"), "{e}");
}

#[test]
fn client_hash_is_sticky_and_moves_only_the_failed_agents_clients() {
    let p = pool(Policy::ClientHash, &[(1, false), (1, false), (1, false)]);
    let now = Instant::now();
    let before: Vec<usize> = (0..3000)
        .map(|n| p.order(ip(n), now, &Drained::default()).unwrap()[0])
        .collect();
    let again: Vec<usize> = (0..3000)
        .map(|n| p.order(ip(n), now, &Drained::default()).unwrap()[0])
        .collect();
    assert_eq!(before, again);
    let mut counts = [0usize; 3];
    before.iter().for_each(|&i| counts[i] += 1);
    assert!(
        counts.iter().all(|&c| (700..1300).contains(&c)),
        "{counts:?}"
    );
    p.agents[1].set_checked(false);
    for (n, &b) in before.iter().enumerate() {
        let after = p.order(ip(n as u32), now, &Drained::default()).unwrap()[0];
        if b != 1 {
            assert_eq!(after, b, "client {n} moved although its agent is up");
        } else {
            assert_ne!(after, 1);
        }
    }
}

#[test]
fn passive_failures_mark_down_for_fail_timeout() {
    let p = pool(Policy::First, &[(1, false), (1, false)]);
    let t0 = Instant::now();
    assert!(!p.agents[0].failed(&p.config.passive, t0));
    assert!(p.agents[0].failed(&p.config.passive, t0 + Duration::from_secs(1)));
    assert_eq!(
        p.order(ip(1), t0 + Duration::from_secs(2), &Drained::default())
            .unwrap(),
        vec![1]
    );
    assert_eq!(
        p.order(ip(1), t0 + Duration::from_secs(32), &Drained::default())
            .unwrap(),
        vec![0, 1]
    );
    // Failures outside the window do not add up.
    assert!(!p.agents[1].failed(&p.config.passive, t0));
    assert!(!p.agents[1].failed(&p.config.passive, t0 + Duration::from_secs(11)));
}

#[test]
fn least_conn_and_max_conns() {
    let mut p = pool(Policy::LeastConn, &[(1, false), (1, false)]);
    p.agents = p
        .agents
        .iter()
        .map(|a| {
            let mut c = a.config.clone();
            c.max_conns = Some(1);
            Arc::new(Agent {
                name: a.name.clone(),
                config: c,
                active: AtomicUsize::new(0),
                checked_up: AtomicBool::new(true),
                passive: Mutex::new(PassiveState::default()),
            })
        })
        .collect();
    let now = Instant::now();
    let s0 = p.agents[0].try_acquire().unwrap();
    assert_eq!(p.order(ip(1), now, &Drained::default()).unwrap(), vec![1]);
    let _s1 = p.agents[1].try_acquire().unwrap();
    assert!(p.agents[1].try_acquire().is_none());
    assert!(p
        .order(ip(1), now, &Drained::default())
        .unwrap_err()
        .to_string()
        .contains("2 at max_conns"));
    drop(s0);
    assert_eq!(p.order(ip(1), now, &Drained::default()).unwrap(), vec![0]);
}

#[test]
fn drained_agents_take_no_new_connection() {
    let p = pool(Policy::LeastConn, &[(1, false), (1, false)]);
    let now = Instant::now();
    let drained = Drained::default();
    drained.insert(p.agents[0].name.clone());
    for n in 0..10 {
        assert_eq!(p.order(ip(n), now, &drained).unwrap(), vec![1]);
    }
    drained.insert(p.agents[1].name.clone());
    let e = p.order(ip(1), now, &drained).unwrap_err();
    assert_eq!(e.kind(), Kind::AgentDraining, "{e}");
    assert!(e.to_string().contains("2 drained"), "{e}");
    // One drained, the other down: the pool is unavailable, not draining.
    drained.remove(&p.agents[1].name);
    p.agents[1].set_checked(false);
    let e = p.order(ip(1), now, &drained).unwrap_err();
    assert_eq!(e.kind(), Kind::PoolUnavailable, "{e}");
}
