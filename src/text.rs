//! Text cut to a byte budget without splitting a character: reasons in headers, fields and
//! columns, stderr tails, replies quoted in errors.

/// The start of `text`, at most `max` bytes, ending on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The end of `text`, at most `max` bytes, starting on a character boundary.
pub fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_keep_whole_characters() {
        let cases: [(&str, usize, &str, &str); 6] = [
            ("héllo", 2, "h", "lo"),
            ("héllo", 3, "hé", "llo"),
            ("héllo", 5, "héll", "éllo"),
            ("abc", 10, "abc", "abc"),
            ("ééé", 5, "éé", "éé"),
            ("é", 0, "", ""),
        ];
        for (text, max, start, end) in cases {
            assert_eq!(truncate(text, max), start, "{text:?} {max}");
            assert_eq!(tail(text, max), end, "{text:?} {max}");
        }
    }
}
