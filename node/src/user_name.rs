//! What a user name may be, wherever it comes from (a sign-in token, the
//! development sign-in, `SetUser`, the `user` argument of a chat message),
//! and how an anonymous name is told from a signed-in one.
//!
//! A name is 1 to 64 characters after trimming, with none that a reader
//! cannot see or that rearranges the text around it: control characters,
//! format characters (bidi overrides such as U+202E, zero-width characters,
//! the byte-order mark) and line and paragraph separators (U+2028, U+2029).
//!
//! With `auth = "optional"` signed-in and anonymous clients share the
//! cluster, so an anonymous name is shown with `ANONYMOUS_MARK` in front of
//! it (`~alice`) in chat events, history and presence, and no name, a
//! token's included, may begin with the mark: an anonymous `alice` is
//! `~alice`, never `alice`. With `auth = "off"` nobody is signed in and
//! names are shown as given; with `"required"` everyone is signed in.

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Longest user name, in characters.
pub const MAX_CHARS: usize = 64;
/// The first character of an anonymous name while sign-in is optional.
pub const ANONYMOUS_MARK: char = '~';

/// Characters a name may not hold: invisible, or moving the text around them.
fn is_forbidden(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

/// Checks a name as a client or a token gives it; answers it trimmed.
pub fn validate(name: &str) -> Result<&str, String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_CHARS || name.chars().any(is_forbidden) {
        return Err(format!(
            "a user name is 1 to {MAX_CHARS} characters, none of them control, format (bidi, zero-width) or line-separator characters"
        ));
    }
    if name.starts_with(ANONYMOUS_MARK) {
        return Err(format!("a user name may not begin with '{ANONYMOUS_MARK}', which marks anonymous names"));
    }
    Ok(name)
}

/// Checks a name as it is shown (marked or not): what another node publishes.
pub fn validate_shown(name: &str) -> Result<&str, String> {
    validate(name.strip_prefix(ANONYMOUS_MARK).unwrap_or(name)).map(|_| name)
}

/// An anonymous client's (already validated) name as others see it:
/// marked when signed-in users may be about (`mark`), as given otherwise.
pub fn shown_anonymous(name: &str, mark: bool) -> String {
    if mark {
        format!("{ANONYMOUS_MARK}{name}")
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(validate("  ann "), Ok("ann"));
        assert!(validate("").is_err() && validate("   ").is_err());
        assert!(validate(&"x".repeat(65)).is_err());
        assert_eq!(validate(&"é".repeat(64)).map(|n| n.chars().count()), Ok(64));
    }

    #[test]
    fn invisible_and_reordering_characters_are_refused() {
        for bad in [
            "a\nb",
            "a\u{7}b",
            "ali\u{202E}ecila",
            "a\u{200B}b",
            "a\u{2028}b",
            "a\u{2029}b",
            "\u{FEFF}ann",
            "a\u{2066}b",
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
        assert_eq!(validate("Zoë 🚀 日本"), Ok("Zoë 🚀 日本"));
    }

    #[test]
    fn the_anonymous_mark_is_reserved() {
        assert!(validate("~alice").is_err());
        assert_eq!(shown_anonymous("alice", true), "~alice");
        assert_eq!(shown_anonymous("alice", false), "alice");
        assert_eq!(validate_shown("~alice"), Ok("~alice"));
        assert_eq!(validate_shown("alice"), Ok("alice"));
        assert!(validate_shown("~~alice").is_err());
        assert!(validate_shown("~").is_err());
    }
}
