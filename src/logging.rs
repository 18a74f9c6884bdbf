//! Log output: human text or JSON lines, on stderr. The level comes from
//! `SPLICEGATE_LOG` (tracing-subscriber filter syntax), default `info`
//! (`warn` for the demo, whose results go to stdout). Text is coloured
//! only when stderr is a terminal and `NO_COLOR` is not set.

use tracing_subscriber::EnvFilter;

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

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("h2"), "h2");
        assert_eq!(
            printable("a\r\nb\x1b[31m\u{9b}é"),
            "a\\u{d}\\u{a}b\\u{1b}[31m\\u{9b}é"
        );
    }
}
