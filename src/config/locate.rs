//! Finding where a key path lives in the TOML text, so every error can name a line and column.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// A line and column, both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Converts a byte offset into a 1-based line and column (columns count characters).
pub fn position(text: &str, offset: usize) -> Position {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    Position { line, column }
}

/// Finds the span of the deepest element of `path` present in the document: the key itself
/// when the path names a key, an array element's value when it names an index.
pub fn locate(text: &str, path: &[String]) -> Option<Range<usize>> {
    let doc = DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut best: Option<Range<usize>> = None;
    let mut segments = path.iter().peekable();
    while let Some(segment) = segments.next() {
        let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == segment) else {
            return best;
        };
        best = Some(key.span());
        let mut value = value;
        // Walk through array indices that follow a key: `bindings.0.exchange`.
        while let Some(index) = segments.peek().and_then(|s| s.parse::<usize>().ok()) {
            let DeValue::Array(items) = value.get_ref() else {
                return best;
            };
            let Some(item) = items.get(index) else {
                return best;
            };
            segments.next();
            best = Some(item.span());
            value = item;
        }
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => return best,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Vec<String> {
        p.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn finds_nested_keys_and_array_items() {
        let text = "[consumers.orders]\nsource = \"rabbit\"\nretry = { initial = \"1x\" }\nbindings = [{ exchange = \"a\" }, { exchange = \"b\" }]\n";
        let span = locate(text, &path("consumers.orders.retry.initial")).unwrap();
        assert_eq!(&text[span.clone()], "initial");
        assert_eq!(
            position(text, span.start),
            Position {
                line: 3,
                column: 11
            }
        );
        let span = locate(text, &path("consumers.orders.bindings.1.exchange")).unwrap();
        assert_eq!(position(text, span.start).line, 4);
        assert!(span.start > text.find("\"a\"").unwrap());
        // A missing leaf falls back to the deepest key that exists.
        let span = locate(text, &path("consumers.orders.nope")).unwrap();
        assert_eq!(position(text, span.start).line, 1);
        assert!(locate(text, &path("nothing.here")).is_none());
    }
}
