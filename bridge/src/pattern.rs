//! `(source, event)` patterns: each side exact, `*` (anything) or a prefix `foo*`.

use std::fmt;

/// One side of a [`Pattern`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Any,
    Exact(String),
    Prefix(String),
}

impl Part {
    fn parse(s: &str) -> Part {
        if s == "*" {
            Part::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Part::Prefix(p.to_string())
        } else {
            Part::Exact(s.to_string())
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Part::Any => true,
            Part::Exact(e) => e == s,
            Part::Prefix(p) => s.starts_with(p.as_str()),
        }
    }

    fn as_str(&self) -> String {
        match self {
            Part::Any => "*".to_string(),
            Part::Exact(e) => e.clone(),
            Part::Prefix(p) => format!("{p}*"),
        }
    }
}

/// A `(source, event)` pattern: each side is exact, `*` (anything), or a prefix ending in
/// `*` (`"crud*"` matches `"crud"` and `"crud.routes"`).
///
/// ```
/// use worker_events_bridge::Pattern;
/// let p = Pattern::new("cache", "purge*");
/// assert!(p.matches("cache", "purge"));
/// assert!(p.matches("cache", "purge-all"));
/// assert!(!p.matches("cache", "set"));
/// assert!(Pattern::parse("crud:*").unwrap().matches("crud", "anything"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: Part,
    event: Part,
}

impl Pattern {
    /// A pattern from its two sides.
    pub fn new(source: &str, event: &str) -> Pattern {
        Pattern { source: Part::parse(source), event: Part::parse(event) }
    }

    /// Parse `"source:event"` (split at the first `:`); a bare `"source"` means
    /// `"source:*"`.
    ///
    /// # Errors
    /// An empty source.
    ///
    /// ```
    /// # use worker_events_bridge::Pattern;
    /// assert_eq!(Pattern::parse("cache").unwrap(), Pattern::new("cache", "*"));
    /// assert!(Pattern::parse("").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let (source, event) = s.split_once(':').unwrap_or((s, "*"));
        if source.is_empty() || event.is_empty() {
            return Err(format!("pattern {s:?}: expected \"source:event\" (each side exact, * or prefix*)"));
        }
        Ok(Pattern::new(source, event))
    }

    /// Does `(source, event)` match?
    pub fn matches(&self, source: &str, event: &str) -> bool {
        self.source.matches(source) && self.event.matches(event)
    }

    /// The two sides as the core's `divert_unique` takes them.
    pub fn sides(&self) -> (String, String) {
        (self.source.as_str(), self.event.as_str())
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source.as_str(), self.event.as_str())
    }
}

/// Does any of `patterns` match `(source, event)`?
pub(crate) fn any_match(patterns: &[Pattern], source: &str, event: &str) -> bool {
    patterns.iter().any(|p| p.matches(source, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_and_matching() {
        let p = Pattern::new("*", "x");
        assert!(p.matches("a", "x") && !p.matches("a", "y"));
        let p = Pattern::parse("cr*:del*").unwrap();
        assert!(p.matches("crud", "delete") && !p.matches("crud", "set") && !p.matches("c", "delete"));
        assert_eq!(p.sides(), ("cr*".to_string(), "del*".to_string()));
        assert_eq!(p.to_string(), "cr*:del*");
        assert!(Pattern::parse("a:").is_err());
        assert!(any_match(&[Pattern::new("a", "b"), Pattern::new("c", "*")], "c", "z"));
        assert!(!any_match(&[], "c", "z"));
    }
}
