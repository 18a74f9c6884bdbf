//! How a connection ended: one stable label per outcome, shared by the
//! access log (`outcome`), `/metrics` (`splicegate_connections_closed_total`),
//! terminate mode's error pages (their status) and passthrough refusals
//! (their TLS alert). Every step's error type maps onto a [`Kind`]; the
//! labels are spelt once, here.

use std::fmt;

/// A connection's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Both directions reached EOF.
    Done,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
    /// The drain deadline passed during shutdown.
    DrainDeadline,
    /// An operator closed the session (`splicegate ctl close`).
    OperatorClose,
    /// The session moved to the new process of a live upgrade (the old
    /// process's metrics; the new one logs the session's end).
    HandedOver,
    /// A socket failed while forwarding (or before, writing to the agent).
    IoError,
    /// A LOCAL PROXY header then a close: a load balancer's health probe.
    HealthProbe,
    /// The PROXY header is invalid.
    ProxyInvalid,
    /// The PROXY header did not arrive in time.
    ProxyTimeout,
    /// The peer closed before the PROXY header was complete.
    ProxyTruncated,
    /// A PROXY header from an untrusted peer, or a second one.
    ProxyUntrusted,
    /// The VPC endpoint is not allowed on the listener or route.
    VpceNotAllowed,
    /// The client is at `max_per_client`.
    ClientLimit,
    /// The first bytes are not TLS.
    NotTls,
    /// The ClientHello exceeds the cap.
    TooLarge,
    /// The ClientHello did not arrive in time.
    Timeout,
    /// The peer closed before its ClientHello (or request head) was complete.
    Truncated,
    /// TLS records, but not a well-formed ClientHello.
    Malformed,
    /// A UDP flow whose first datagram is not a QUIC Initial splicegate can
    /// read (another protocol, another QUIC version, or undecryptable).
    NotQuic,
    /// Reading the ClientHello failed.
    Io,
    /// No SNI, and no default route (or `no_sni = "reject"`).
    NoSni,
    /// No route for the name or path.
    NoRoute,
    /// The agent named by the client is outside the allowed networks.
    AgentNotAllowed,
    /// The agent refused the connection.
    AgentRefused,
    /// Connecting to (or sending to) the agent timed out.
    AgentTimeout,
    /// The agent's name did not resolve.
    AgentResolve,
    /// Another connect error (unreachable network, ...).
    AgentUnreachable,
    /// The session resolver did not answer (timeout, refused, 5xx).
    ResolverUnavailable,
    /// The session resolver does not know the session (404).
    SessionUnknown,
    /// The session resolver's answer is unusable: not the expected JSON,
    /// the wrong session or transport, or an endpoint outside the
    /// allowlist.
    ResolverBadAnswer,
    /// The agent is drained by an operator (`splicegate ctl drain-agent`),
    /// and the route has no other.
    AgentDraining,
    /// No agent of the pool may be chosen.
    PoolUnavailable,
    /// Every agent the pool tried failed.
    PoolFailed,
    /// No local socket for the agent: the ephemeral ports toward it are
    /// used up, or the process is at its descriptor limit.
    NoLocalPort,
    /// QUIC: the flow's hello was not complete when the pending-flow
    /// budget (`max_pending`, `pending_bytes_max`) was full; the oldest
    /// pending flow makes room.
    PendingLimit,
    /// Terminate mode: the TLS handshake with the client failed.
    TlsHandshake,
    /// Terminate mode: TLS, then a close without a request.
    NoRequest,
    /// Terminate mode: the request head exceeds `head_max_bytes`.
    HeadTooLarge,
    /// Terminate mode: the request head did not arrive in time.
    HeadTimeout,
    /// Terminate mode: a malformed request (or address in the path).
    BadRequest,
    /// Terminate mode: more header lines than allowed.
    TooManyHeaders,
    /// Terminate mode: the health path, answered locally.
    Health,
    /// Terminate mode: a redirect to the slashed prefix.
    Redirect,
    /// Terminate mode: the TLS handshake with the agent failed.
    AgentTls,
    /// Terminate mode: the agent closed without a response.
    AgentEmpty,
    /// Terminate mode: the agent's answer to a WebSocket handshake is not
    /// HTTP.
    BadResponse,
}

/// A TLS alert (RFC 8446 §6.2) a refused passthrough client receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Alert {
    /// 49: the name or endpoint is not allowed.
    AccessDenied = 49,
    /// 80: no agent could be reached.
    InternalError = 80,
    /// 112: no route for the name the client asked for.
    UnrecognizedName = 112,
}

impl Kind {
    /// Every kind, for documentation checks.
    pub const ALL: [Kind; 46] = [
        Kind::Done,
        Kind::IdleTimeout,
        Kind::DrainDeadline,
        Kind::OperatorClose,
        Kind::HandedOver,
        Kind::IoError,
        Kind::HealthProbe,
        Kind::ProxyInvalid,
        Kind::ProxyTimeout,
        Kind::ProxyTruncated,
        Kind::ProxyUntrusted,
        Kind::VpceNotAllowed,
        Kind::ClientLimit,
        Kind::NotTls,
        Kind::TooLarge,
        Kind::Timeout,
        Kind::Truncated,
        Kind::Malformed,
        Kind::NotQuic,
        Kind::Io,
        Kind::NoSni,
        Kind::NoRoute,
        Kind::AgentNotAllowed,
        Kind::AgentRefused,
        Kind::AgentTimeout,
        Kind::AgentResolve,
        Kind::AgentUnreachable,
        Kind::ResolverUnavailable,
        Kind::SessionUnknown,
        Kind::ResolverBadAnswer,
        Kind::AgentDraining,
        Kind::PoolUnavailable,
        Kind::PoolFailed,
        Kind::NoLocalPort,
        Kind::PendingLimit,
        Kind::TlsHandshake,
        Kind::NoRequest,
        Kind::HeadTooLarge,
        Kind::HeadTimeout,
        Kind::BadRequest,
        Kind::TooManyHeaders,
        Kind::Health,
        Kind::Redirect,
        Kind::AgentTls,
        Kind::AgentEmpty,
        Kind::BadResponse,
    ];

    /// The stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Done => "done",
            Kind::IdleTimeout => "idle_timeout",
            Kind::DrainDeadline => "drain_deadline",
            Kind::OperatorClose => "operator_close",
            Kind::HandedOver => "handed_over",
            Kind::IoError => "io_error",
            Kind::HealthProbe => "health_probe",
            Kind::ProxyInvalid => "proxy_invalid",
            Kind::ProxyTimeout => "proxy_timeout",
            Kind::ProxyTruncated => "proxy_truncated",
            Kind::ProxyUntrusted => "proxy_untrusted",
            Kind::VpceNotAllowed => "vpce_not_allowed",
            Kind::ClientLimit => "client_limit",
            Kind::NotTls => "not_tls",
            Kind::TooLarge => "too_large",
            Kind::Timeout => "timeout",
            Kind::Truncated => "truncated",
            Kind::Malformed => "malformed",
            Kind::NotQuic => "not_quic",
            Kind::Io => "io",
            Kind::NoSni => "no_sni",
            Kind::NoRoute => "no_route",
            Kind::AgentNotAllowed => "agent_not_allowed",
            Kind::AgentRefused => "agent_refused",
            Kind::AgentTimeout => "agent_timeout",
            Kind::AgentResolve => "agent_resolve",
            Kind::AgentUnreachable => "agent_unreachable",
            Kind::ResolverUnavailable => "resolver_unavailable",
            Kind::SessionUnknown => "session_unknown",
            Kind::ResolverBadAnswer => "resolver_bad_answer",
            Kind::AgentDraining => "agent_draining",
            Kind::PoolUnavailable => "pool_unavailable",
            Kind::PoolFailed => "pool_failed",
            Kind::NoLocalPort => "no_local_port",
            Kind::PendingLimit => "pending_limit",
            Kind::TlsHandshake => "tls_handshake",
            Kind::NoRequest => "no_request",
            Kind::HeadTooLarge => "head_too_large",
            Kind::HeadTimeout => "head_timeout",
            Kind::BadRequest => "bad_request",
            Kind::TooManyHeaders => "too_many_headers",
            Kind::Health => "health",
            Kind::Redirect => "redirect",
            Kind::AgentTls => "agent_tls",
            Kind::AgentEmpty => "agent_empty",
            Kind::BadResponse => "bad_response",
        }
    }

    /// The alert a passthrough client refused after its complete
    /// ClientHello receives (None: refused before, or not a refusal).
    pub fn tls_alert(self) -> Option<Alert> {
        match self {
            Kind::NoRoute | Kind::NoSni | Kind::SessionUnknown => Some(Alert::UnrecognizedName),
            Kind::AgentNotAllowed | Kind::VpceNotAllowed => Some(Alert::AccessDenied),
            Kind::AgentRefused
            | Kind::AgentTimeout
            | Kind::AgentResolve
            | Kind::AgentUnreachable
            | Kind::ResolverUnavailable
            | Kind::ResolverBadAnswer
            | Kind::AgentDraining
            | Kind::PoolUnavailable
            | Kind::PoolFailed
            | Kind::NoLocalPort
            | Kind::IoError => Some(Alert::InternalError),
            _ => None,
        }
    }

    /// The status of terminate mode's error page for a refusal of this
    /// kind (None: nothing to answer, the client is gone or answered).
    pub fn http_status(self) -> Option<u16> {
        Some(match self {
            Kind::BadRequest | Kind::HeadTooLarge | Kind::NotTls => 400,
            Kind::AgentNotAllowed | Kind::VpceNotAllowed => 403,
            Kind::NoRoute | Kind::SessionUnknown => 404,
            Kind::HeadTimeout => 408,
            Kind::TooManyHeaders => 431,
            Kind::AgentTimeout => 504,
            Kind::ResolverUnavailable | Kind::AgentDraining | Kind::NoLocalPort => 503,
            Kind::AgentRefused
            | Kind::AgentResolve
            | Kind::AgentUnreachable
            | Kind::PoolUnavailable
            | Kind::PoolFailed
            | Kind::AgentTls
            | Kind::ResolverBadAnswer
            | Kind::BadResponse
            | Kind::IoError => 502,
            _ => return None,
        })
    }
}

impl PartialEq<&str> for Kind {
    fn eq(&self, label: &&str) -> bool {
        self.as_str() == *label
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection was not forwarded: its [`Kind`] and the sentence for
/// the access log's `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The outcome label.
    pub kind: Kind,
    /// What happened, for the log (may name agents and OS errors).
    pub why: String,
}

impl Refusal {
    /// A refusal of `kind` for `why`.
    pub fn new(kind: Kind, why: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            why: why.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Kind;

    #[test]
    fn labels_are_unique_and_documented() {
        let mut seen = std::collections::HashSet::new();
        let docs = include_str!("../docs/configuration.md");
        for k in Kind::ALL {
            assert!(seen.insert(k.as_str()), "{k} twice");
            assert!(
                docs.contains(&format!("`{k}`")),
                "docs/configuration.md lacks `{k}`"
            );
        }
    }
}
