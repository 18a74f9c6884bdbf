//! splicegate: a Layer-4 TLS-SNI splice proxy for Amazon DCV agents behind
//! an AWS Network Load Balancer.
//!
//! A connection's way through the crate follows the data:
//! [`listener`] (accept) → [`sniff`] (ClientHello, SNI) → [`route`] (pure
//! name → agent) → [`upstream`] (connect) → [`forward`] (splice or copy)
//! with [`conn`] tying the steps together and writing the access log.
//! [`config`] parses and validates the file and command line beside that
//! path; [`server`] starts listeners and drains on shutdown.

#![warn(missing_docs)]

pub mod cidr;
pub mod config;
pub mod conn;
pub mod demo;
pub mod forward;
pub mod listener;
pub mod logging;
pub mod net;
pub mod route;
pub mod server;
pub mod sniff;
pub mod testkit;
pub mod upstream;
