//! The config loader under random input: it never panics, and every problem it reports has a
//! location (a line and column, or the environment variable that set the value).

use bosun::config::{Env, Location, load_str};
use bosun::handler::HandlerKinds;
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../config/bosun.toml");

/// The example config with one random edit: a deleted range, an inserted snippet, or a
/// replaced byte range, each kept on character boundaries.
fn mutated() -> impl Strategy<Value = String> {
    let snippets = prop::sample::select(vec![
        "=",
        "[",
        "]",
        "\"",
        "{",
        "}",
        ",",
        "\n",
        "[consumers.x]\nsource = \"rabbit\"\n",
        "kind = \"amqp\"\n",
        "retry = { max_attempts = 0, tiers = [] }\n",
        "prefetch = -1\n",
        "${",
        "${UNSET_VAR_FOR_FUZZ}",
        "\u{0}",
        "é",
        "[[dead_letters.d.rules]]\n",
        "handler = \"missing\"\n",
        "listen = 5\n",
        "url = \"amqp://:@/\"\n",
    ]);
    (0..EXAMPLE.len(), 0..64usize, snippets, 0..3u8).prop_map(|(at, len, snippet, op)| {
        let floor = |mut i: usize| {
            while !EXAMPLE.is_char_boundary(i) {
                i -= 1;
            }
            i
        };
        let start = floor(at);
        let end = floor((at + len).min(EXAMPLE.len()));
        match op {
            0 => format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]),
            1 => format!("{}{}{}", &EXAMPLE[..start], snippet, &EXAMPLE[start..]),
            _ => format!("{}{}{}", &EXAMPLE[..start], snippet, &EXAMPLE[end..]),
        }
    })
}

fn assert_located(text: &str) {
    if let Err(err) = load_str(text, "fuzz.toml", &HandlerKinds::builtin(), &Env::default()) {
        assert!(!err.problems.is_empty());
        for problem in &err.problems {
            assert!(
                !matches!(problem.location, Location::Unknown),
                "problem without a location: {problem:?}\n--- input ---\n{text}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn mutated_example_never_panics_and_errors_are_located(text in mutated()) {
        assert_located(&text);
    }

    #[test]
    fn arbitrary_text_never_panics_and_errors_are_located(text in "\\PC{0,400}") {
        assert_located(&text);
    }

    #[test]
    fn toml_shaped_noise_never_panics(lines in prop::collection::vec("(\\[[a-z_.]{1,20}\\]|[a-z_]{1,12} = (\"[^\"\\\\]{0,12}\"|[0-9]{1,4}|true|\\[\\]|\\{\\}))", 0..30)) {
        assert_located(&lines.join("\n"));
    }
}
