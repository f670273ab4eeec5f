//! Caller input quoted back in error messages, bounded: a million-character argument must not
//! become a megabyte error.

/// Echoed input longer than this is cut.
const ECHO_CHARS: usize = 300;

/// `text` cut to a few hundred characters, saying how long it was.
pub fn clip(text: &str) -> String {
    clip_to(text, ECHO_CHARS)
}

/// `text` cut to `max` characters, saying how long it was.
pub fn clip_to(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((end, _)) => format!("{}... ({} chars)", &text[..end], text.chars().count()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_input_is_cut_and_says_how_long_it_was() {
        assert_eq!(super::clip("short"), "short");
        let cut = super::clip(&"é".repeat(1000));
        assert!(cut.ends_with("... (1000 chars)"), "{cut}");
        assert_eq!(cut.chars().count(), 300 + "... (1000 chars)".len());
    }
}
