//! The text log's field formatter: every value is written with its control characters
//! escaped, so nothing a traced process chooses (its `comm`, command line, cgroup, a request's
//! bytes) can end a line and forge another (`srv\nFAKE-LINE` is written as `srv\nFAKE-LINE`,
//! on one line). The JSON format escapes through serde already.

use std::fmt;

use tracing::field::Field;
use tracing_subscriber::{
    field::MakeExt,
    fmt::{format::Writer, FormatFields},
};

/// `message key=value key=value`, as tracing-subscriber's default, with control characters
/// escaped in every value (Display values included, which the default writes raw).
pub fn fields() -> impl for<'w> FormatFields<'w> + 'static {
    tracing_subscriber::fmt::format::debug_fn(
        |w: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug| {
            let raw = format!("{value:?}");
            let text = escape(&raw);
            if field.name() == "message" {
                w.write_str(&text)
            } else {
                write!(w, "{}={text}", field.name())
            }
        },
    )
    .delimited(" ")
}

/// `s` with each control character (newline, carriage return, escape, ...) written as its
/// Rust escape (`\n`, `\r`, `\u{1b}`); everything else as it is.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_survive() {
        assert_eq!(escape("srv\nFAKE-LINE"), "srv\\nFAKE-LINE");
        assert_eq!(escape("a\r\u{1b}[31mb"), "a\\r\\u{1b}[31mb");
        assert_eq!(escape("plain é"), "plain é");
    }

    proptest::proptest! {
        #[test]
        fn escaped_text_is_one_line(s in "\\PC*|[\\x00-\\x1f\\x7f\\u{85}\\u{2028}a-z]{0,40}") {
            let e = escape(&s);
            proptest::prop_assert!(!e.contains('\n') && !e.contains('\r'));
            proptest::prop_assert!(!e.chars().any(char::is_control));
        }
    }
}
