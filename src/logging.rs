//! Log output: human text or JSON lines, on stderr. The level comes from
//! `SPLICEGATE_LOG` (tracing-subscriber filter syntax), default `info`
//! (`warn` for the demo, whose results go to stdout). Text is coloured
//! only when stderr is a terminal and `NO_COLOR` is not set.

use tracing_subscriber::EnvFilter;

/// The tracing target of the access log's events (`routed`, `progress`,
/// `closed`), for every transport.
pub const ACCESS_LOG: &str = "splicegate::conn";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, with the connection span's fields.
    Json,
}

/// Install the global subscriber, at `default_level` unless
/// `SPLICEGATE_LOG` says otherwise. Call once.
pub fn init(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    let filter =
        EnvFilter::try_from_env("SPLICEGATE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// `s` with every control character (C0 — CR, LF and ESC among them —,
/// DEL and C1) written as a `\u{..}` escape, for strings a client chose
/// (ALPN names, PROXY TLVs, request paths): in the text log format a raw
/// CR or LF would start a forged line, and ESC would drive the terminal.
/// Borrowed when there is nothing to escape.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `t` as an RFC 3339 UTC timestamp to the millisecond
/// (`2026-12-08T01:20:53.123Z`), as the JSON log writes them.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::{printable, rfc3339};
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("h2"), "h2");
        assert_eq!(
            printable("a\r\nb\x1b[31m\u{9b}é"),
            "a\\u{d}\\u{a}b\\u{1b}[31m\\u{9b}é"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_433_653_123);
        assert_eq!(rfc3339(t), "2026-12-05T01:20:53.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
