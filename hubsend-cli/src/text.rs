//! Text that came from outside (the hub's condition symbols and descriptions, input lines)
//! made safe to print, and errors printed with their causes.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether printing `c` could change the terminal rather than show a character: C0 and C1
/// controls (ANSI escape sequences start with ESC, titles end with BEL) and the bidirectional
/// overrides that reorder what is shown.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every character that could steer a terminal written as a `\u{…}` escape (tab
/// included, so one message stays on one line).
pub(crate) fn sanitize(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Case-insensitive markers of Event Hubs secrets: a SAS key or token, or a token's signature.
const SECRET_MARKERS: &[&str] = &["sharedaccesskey=", "sharedaccesssignature", "sig="];

/// Whether `text` holds something that looks like a secret (a key or token in a connection
/// string or SAS token).
pub(crate) fn looks_secret(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|m| lower.contains(m))
}

/// Whether `text` could be a bare key pasted where a file name was expected: 20 or more
/// base64 characters with no dot or path separator.
pub(crate) fn looks_like_key(text: &str) -> bool {
    text.len() >= 20
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'=' | b'-' | b'_'))
}

/// `text` for a message, or a placeholder when it may be a secret.
pub(crate) fn shown(text: &str) -> Cow<'_, str> {
    if looks_secret(text) || looks_like_key(text) {
        Cow::Borrowed("<not shown: it looks like a secret>")
    } else {
        sanitize(text)
    }
}

/// `error` and every cause in its `source()` chain, `: `-separated and sanitised. A cause whose
/// text the message already holds (messages often quote their cause) is not repeated.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause_text.is_empty() && !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    sanitize(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_controls_are_made_visible() {
        assert!(matches!(sanitize("plain text, é ✓"), Cow::Borrowed(_)));
        assert_eq!(
            sanitize("a\u{1b}[2Jb\u{1b}]0;title\u{7}c\r\nd\te\u{9b}f\u{202e}g"),
            "a\\u{1b}[2Jb\\u{1b}]0;title\\u{7}c\\u{d}\\u{a}d\\u{9}e\\u{9b}f\\u{202e}g"
        );
    }

    #[test]
    fn the_chain_names_every_cause_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let root = E("UnknownIssuer", None);
        let mid = E(
            "invalid peer certificate: UnknownIssuer",
            Some(Box::new(root)),
        );
        let top = E("TLS handshake failed", Some(Box::new(mid)));
        assert_eq!(
            error_chain(&top),
            "TLS handshake failed: invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(error_chain(&E("bell\u{7}", None)), "bell\\u{7}");
    }
}
