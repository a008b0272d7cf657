//! The kernel command line: `key=value` and bare `flag` words separated by blanks, where a value
//! (or a whole word) may be double-quoted to hold blanks, as Linux reads it.

use core::fmt;

/// Longest command line read; the rest is ignored (Linux on x86 stops at 2048).
pub const MAX_LEN: usize = 4096;

/// Errors reading or interpreting the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("Command line is not UTF-8")]
    NotUtf8,
    #[error("Bad number for {key}")]
    BadNumber { key: Key },
}

/// A parameter name kept inline (errors carry it without borrowing the command line).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 32],
    len: u8,
}

impl Key {
    fn new(s: &str) -> Self {
        let mut bytes = [0u8; 32];
        let len = s.len().min(bytes.len());
        bytes[..len].copy_from_slice(&s.as_bytes()[..len]);
        Key {
            bytes,
            len: len as u8,
        }
    }

    /// The name (cut at 32 bytes, and at a character boundary).
    pub fn as_str(&self) -> &str {
        let b = &self.bytes[..usize::from(self.len)];
        match core::str::from_utf8(b) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&b[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A parsed view of a command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cmdline<'a> {
    text: &'a str,
}

impl<'a> Cmdline<'a> {
    /// The command line in `bytes`, up to the first NUL and at most [`MAX_LEN`] bytes.
    pub fn new(bytes: &'a [u8]) -> Result<Self, Error> {
        let bytes = &bytes[..bytes.len().min(MAX_LEN)];
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        let text = core::str::from_utf8(&bytes[..end]).map_err(|_| Error::NotUtf8)?;
        Ok(Cmdline { text })
    }

    /// The whole command line.
    pub fn as_str(&self) -> &'a str {
        self.text
    }

    /// Every parameter in order: `(key, Some(value))` for `key=value`, `(word, None)` for a flag.
    pub fn params(&self) -> Params<'a> {
        Params { rest: self.text }
    }

    /// The value of the last `key=value` (a later one overrides an earlier one).
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.params()
            .filter(|(k, _)| *k == key)
            .filter_map(|(_, v)| v)
            .last()
    }

    /// Whether `key` appears, bare or with a value.
    pub fn has(&self, key: &str) -> bool {
        self.params().any(|(k, _)| k == key)
    }

    /// The value of `key` as a number (decimal, or hex with `0x`); `None` when absent.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, Error> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_u64(v)
                .map(Some)
                .ok_or(Error::BadNumber { key: Key::new(key) }),
        }
    }
}

/// Iterator over the parameters of a [`Cmdline`].
#[derive(Debug, Clone)]
pub struct Params<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a str, Option<&'a str>);

    fn next(&mut self) -> Option<Self::Item> {
        let text = self.rest.trim_start_matches(is_blank);
        if text.is_empty() {
            self.rest = text;
            return None;
        }
        let mut in_quote = false;
        let mut end = text.len();
        for (i, c) in text.char_indices() {
            if c == '"' {
                in_quote = !in_quote;
            } else if !in_quote && is_blank(c) {
                end = i;
                break;
            }
        }
        let (word, rest) = text.split_at(end);
        self.rest = rest;
        Some(split_word(word))
    }
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t' || c == '\n' || c == '\r'
}

/// Splits one word at its first `=` outside quotes, dropping the quotes Linux drops.
fn split_word(word: &str) -> (&str, Option<&str>) {
    // A fully quoted word ("key=a b") loses its outer quotes first.
    let word = match word.strip_prefix('"') {
        Some(inner) => inner.strip_suffix('"').unwrap_or(inner),
        None => word,
    };
    match word.find('=') {
        None => (word, None),
        Some(eq) => {
            let (key, value) = (&word[..eq], &word[eq + 1..]);
            let value = match value.strip_prefix('"') {
                Some(inner) => inner.strip_suffix('"').unwrap_or(inner),
                None => value,
            };
            (key, Some(value))
        }
    }
}

/// A decimal or `0x` hex number without sign; `None` on anything else or on overflow.
pub fn parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    digits.chars().try_fold(0u64, |acc, c| {
        let d = u64::from(c.to_digit(radix)?);
        acc.checked_mul(radix.into())?.checked_add(d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cl(s: &str) -> Cmdline<'_> {
        Cmdline::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn reads_values_and_flags() {
        let c = cl("console=ttyS0 outboard.run=heartbeat  outboard.interval_ms=50 quiet\n");
        assert_eq!(c.get("outboard.run"), Some("heartbeat"));
        assert_eq!(c.get_u64("outboard.interval_ms"), Ok(Some(50)));
        assert!(c.has("quiet"));
        assert_eq!(c.get("quiet"), None);
        assert_eq!(c.get("missing"), None);
        assert_eq!(c.get_u64("missing"), Ok(None));
    }

    #[test]
    fn later_value_overrides_earlier() {
        assert_eq!(cl("a=1 a=2").get("a"), Some("2"));
    }

    #[test]
    fn quoted_values_keep_blanks() {
        let c = cl(r#"x="a b c" "y=d e" z=""#);
        assert_eq!(c.get("x"), Some("a b c"));
        assert_eq!(c.get("y"), Some("d e"));
        assert_eq!(c.get("z"), Some(""));
    }

    #[test]
    fn unterminated_quote_runs_to_the_end() {
        let c = cl(r#"a=1 b="x y"#);
        assert_eq!(c.get("a"), Some("1"));
        assert_eq!(c.get("b"), Some("x y"));
    }

    #[test]
    fn stops_at_nul_and_at_max_len() {
        let c = Cmdline::new(b"a=1\0b=2").unwrap();
        assert_eq!(c.get("b"), None);
        let long = [b'x'; MAX_LEN + 100];
        assert_eq!(Cmdline::new(&long).unwrap().as_str().len(), MAX_LEN);
    }

    #[test]
    fn rejects_non_utf8() {
        assert_eq!(Cmdline::new(b"a=\xff").unwrap_err(), Error::NotUtf8);
    }

    #[test]
    fn numbers_reject_garbage_and_overflow() {
        assert_eq!(parse_u64("0x1f"), Some(31));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_u64(""), None);
        assert_eq!(parse_u64("0x"), None);
        assert_eq!(parse_u64("-1"), None);
        assert_eq!(parse_u64("12ms"), None);
        let err = cl("n=abc").get_u64("n").unwrap_err();
        assert_eq!(err, Error::BadNumber { key: Key::new("n") });
    }

    #[test]
    fn empty_and_blank_lines_have_no_params() {
        assert_eq!(cl("").params().count(), 0);
        assert_eq!(cl(" \t\n ").params().count(), 0);
        assert_eq!(cl("=").params().next(), Some(("", Some(""))));
    }
}
