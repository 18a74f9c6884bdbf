//! splicegate: a Layer-4 TLS-SNI splice proxy for Amazon DCV agents behind
//! an AWS Network Load Balancer.
//!
//! A connection's way through the crate follows the data:
//! [`listener`] (accept) → [`proxy_protocol`] (PROXY header from the NLB) →
//! [`sniff`] (ClientHello, SNI) — or [`quic`] (the ClientHello in a QUIC
//! Initial) for the UDP relay, [`udp`] — → [`route`] (pure name → target)
//! → [`choice`] (one step to a connected agent for every transport: a
//! session through [`resolver`], a pool's agent and its slot from
//! [`upstream`], drain, the allowlist) → [`forward`] (engines that move
//! bytes) or the UDP relay → the access log ([`access`]) and [`metrics`].
//! [`conn`] takes a passthrough connection through those steps; on
//! terminate listeners it hands over to [`terminate`] after the ClientHello:
//! TLS at the proxy, the agent from the HTTP request path
//! ([`route::path`]), TLS to the agent ([`upstream::tls`]) and terminate's
//! own userspace pump.
//!
//! Imports go down that path. What several steps share sits in small
//! modules of its own: [`context`] (what one connection carries: its
//! listener's settings, the access-log record, how it ended), [`routing`]
//! (the live routing table, swapped on reload) and [`shutdown`] (drain state
//! and connection tracking). [`outcome`] spells every outcome label once.
//!
//! Beside the path: [`config`] parses and validates the file and command
//! line into the settings types of the modules above; [`server`] binds,
//! spawns and drains; [`admin`] serves health and metrics; [`notify`] talks
//! to systemd; [`demo`] runs the proxy against loopback agents.

#![cfg_attr(not(feature = "uring"), forbid(unsafe_code))]
#![cfg_attr(feature = "uring", deny(unsafe_code))]
#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod choice;
pub mod cidr;
pub mod config;
pub mod conn;
pub mod context;
pub mod control;
pub mod counters;
pub mod demo;
pub mod forward;
pub mod inventory;
pub mod lifecycle;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod maintenance;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod outcome;
pub mod process;
pub mod proxy_protocol;
pub mod quic;
pub mod resolver;
pub mod route;
pub mod routing;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sniff;
pub mod terminate;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod udp;
pub mod upgrade;
pub mod upstream;
