//! `${VAR}` and `${VAR:-default}` interpolation inside TOML string values.
//!
//! Interpolation runs on parsed string values, never on the raw text, so a variable's value
//! can hold quotes or newlines without breaking the TOML around it.

/// Why a string's `${...}` cannot be replaced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    #[error("unterminated `${{` in {0:?}")]
    Unterminated(String),
    #[error("invalid variable name `{name}` in `${{{body}}}`")]
    InvalidName { name: String, body: String },
    #[error(
        "environment variable `{0}` is not set and `${{{0}}}` has no default (write `${{{0}:-default}}`)"
    )]
    Unset(String),
}

/// Replaces every `${NAME}` / `${NAME:-default}` in `input`. `$$` is a literal `$`.
/// A variable that is unset and has no default is an error naming it.
pub fn interpolate(
    input: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, InterpolateError> {
    if !input.contains('$') {
        return Ok(input.to_owned());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body_start) = after.strip_prefix('{') {
            let end = body_start
                .find('}')
                .ok_or_else(|| InterpolateError::Unterminated(input.to_owned()))?;
            let body = &body_start[..end];
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(InterpolateError::InvalidName {
                    name: name.to_owned(),
                    body: body.to_owned(),
                });
            }
            match (
                lookup(name).filter(|v| !v.is_empty() || default.is_none()),
                default,
            ) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(InterpolateError::Unset(name.to_owned()));
                }
            }
            rest = &body_start[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::interpolate;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("rabbit.internal".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn replaces_set_variables_and_defaults() {
        assert_eq!(
            interpolate("amqp://${HOST}:5672", &env).unwrap(),
            "amqp://rabbit.internal:5672"
        );
        assert_eq!(interpolate("${MISSING:-x}", &env).unwrap(), "x");
        assert_eq!(interpolate("${EMPTY:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(interpolate("${EMPTY}", &env).unwrap(), "");
        assert_eq!(
            interpolate("cost $$5 and $x", &env).unwrap(),
            "cost $5 and $x"
        );
    }

    #[test]
    fn unset_without_default_names_the_variable() {
        let err = interpolate("${NOPE}", &env).unwrap_err().to_string();
        assert!(err.contains("`NOPE`"), "{err}");
        assert!(
            interpolate("${OPEN", &env)
                .unwrap_err()
                .to_string()
                .contains("unterminated")
        );
        assert!(
            interpolate("${a-b}", &env)
                .unwrap_err()
                .to_string()
                .contains("invalid variable name")
        );
    }
}
