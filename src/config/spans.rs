//! Where a configuration value was written: turning a span of the file
//! into a line and a message that names the key, and the checks of single
//! values (ranges, non-zero durations) every section shares.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::file::Dur;
use super::ConfigError;

/// Where the text came from, to turn a span into a line and a message.
pub(super) struct Src<'a> {
    pub(super) text: &'a str,
    pub(super) path: &'a str,
}

impl Src<'_> {
    /// An error at `span`, naming the key written there.
    pub(super) fn at(&self, span: Range<usize>, what: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: line_of(self.text, span.start),
            what: describe(self.text, Some(span), &what),
        }
    }

    /// [`Src::at`] for the (span, message) pairs [`within`] returns.
    pub(super) fn range(&self, (span, what): (Range<usize>, String)) -> ConfigError {
        self.at(span, what)
    }

    /// An error about the file as a whole.
    pub(super) fn whole(&self, what: String) -> ConfigError {
        ConfigError::Whole {
            path: self.path.to_owned(),
            what,
        }
    }
}

/// A duration that must not be zero.
pub(super) fn positive(
    src: &Src<'_>,
    d: &Spanned<Dur>,
    key: &str,
) -> Result<Duration, ConfigError> {
    if d.get_ref().0.is_zero() {
        return Err(src.at(d.span(), format!("key `{key}`: must be more than 0")));
    }
    Ok(d.get_ref().0)
}

/// `v` if inside `lo..=hi`, else a message naming the key and the range.
pub(super) fn within<T: PartialOrd + Copy + fmt::Display>(
    v: &Spanned<T>,
    key: &str,
    lo: T,
    hi: T,
) -> Result<T, (Range<usize>, String)> {
    let x = *v.get_ref();
    if x < lo || x > hi {
        return Err((v.span(), format!("key `{key}`: {x} is outside {lo}..={hi}")));
    }
    Ok(x)
}

pub(super) fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

pub(super) fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |t| t.matches('\n').count() + 1)
}

/// The message, prefixed with the key written on the offending line when
/// the message does not name one already.
pub(super) fn describe(text: &str, span: Option<Range<usize>>, message: &str) -> String {
    let message = message.trim();
    if message.contains('`') && message.starts_with("key") {
        return message.to_owned();
    }
    let key = span.and_then(|s| {
        let start = text.get(..s.start)?.rfind('\n').map_or(0, |i| i + 1);
        let line = text.get(start..)?.lines().next()?;
        let (k, _) = line.split_once('=')?;
        let k = k.trim();
        (!k.is_empty() && !k.starts_with('[')).then(|| k.to_owned())
    });
    match key {
        Some(k) if !message.contains(&format!("`{k}`")) => format!("key `{k}`: {message}"),
        _ => message.to_owned(),
    }
}
