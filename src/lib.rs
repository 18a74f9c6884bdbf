//! splicegate: a Layer-4 TLS-SNI splice proxy for Amazon DCV agents behind
//! an AWS Network Load Balancer.
//!
//! A connection's way through the crate follows the data:
//! [`listener`] (accept) → [`proxy_protocol`] (PROXY header from the NLB) →
//! [`sniff`] (ClientHello, SNI) → [`route`] (pure name → agent) →
//! [`upstream`] (connect) → [`forward`] (splice or copy), with [`conn`]
//! tying the steps together and writing the access log, and [`metrics`]
//! counting. [`config`] parses and validates the file and command line
//! beside that path; [`server`] starts listeners and drains on shutdown;
//! [`admin`] serves health and metrics; [`notify`] talks to systemd.
//!
//! On terminate listeners [`terminate`] takes over after the ClientHello:
//! TLS at the proxy, the agent chosen from the HTTP request path
//! ([`route::path`]), TLS to the agent ([`upstream::tls`]) and userspace
//! streaming ([`forward::stream`]).

#![warn(missing_docs)]

pub mod admin;
pub mod cidr;
pub mod config;
pub mod conn;
pub mod demo;
pub mod forward;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod proxy_protocol;
pub mod route;
pub mod server;
pub mod sniff;
pub mod terminate;
pub mod testkit;
pub mod upstream;
