//! `${NAME}` in the config text, replaced from the environment before the YAML is parsed, so
//! that one file serves a fleet: per-device values come from the unit's `Environment=`,
//! `EnvironmentFile=` or systemd credentials (`${CREDENTIALS_DIRECTORY}/name`).
//!
//! - `${NAME}`: the variable's value; unset is an error naming it and its line.
//! - `${NAME:-default}`: the default when the variable is unset or empty.
//! - `$${`: a literal `${` (for a regex or a value that needs it).
//! - Comments are left alone: a `${NAME}` in a comment needs no variable.
//!
//! A value may not contain a line break (it would change the YAML's structure and every line
//! number after it), so positions in later error messages still match the file.

use crate::issue::Issue;
use crate::issue::Position;

/// Replaces every `${...}` outside comments. Reports every unset variable and bad reference.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, Vec<Issue>> {
    let mut out = String::with_capacity(text.len());
    let mut issues = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let code_end = comment_start(line).unwrap_or(line.len());
        let (code, comment) = line.split_at(code_end);
        out.push_str(&expand_line(code, n + 1, &lookup, &mut issues));
        out.push_str(comment);
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(issues)
    }
}

fn expand_line(
    code: &str,
    line: usize,
    lookup: &impl Fn(&str) -> Option<String>,
    issues: &mut Vec<Issue>,
) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let at = &rest[i..];
        let column = code.len() - at.len() + 1;
        if let Some(after) = at.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
            continue;
        }
        let Some(body) = at.strip_prefix("${") else {
            out.push('$');
            rest = &at[1..];
            continue;
        };
        let Some(close) = body.find('}') else {
            issues.push(issue(
                line,
                column,
                "`${` without a closing `}` (write `$${` for a literal `${`)".into(),
            ));
            out.push_str(at);
            return out;
        };
        let (name, default) = match body[..close].split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (&body[..close], None),
        };
        rest = &body[close + 1..];
        if !is_name(name) {
            issues.push(issue(
                line,
                column,
                format!("`${{{}}}`: a variable name is letters, digits and _, not starting with a digit", &body[..close]),
            ));
            continue;
        }
        let value = lookup(name).filter(|v| !(v.is_empty() && default.is_some()));
        match (value, default) {
            (Some(v), _) if v.contains(['\n', '\r']) => issues.push(issue(
                line,
                column,
                format!("environment variable {name} holds a line break, which a config value cannot"),
            )),
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => issues.push(issue(
                line,
                column,
                format!("environment variable {name} is not set (write ${{{name}:-default}} for a default)"),
            )),
        }
    }
    out.push_str(rest);
    out
}

fn issue(line: usize, column: usize, message: String) -> Issue {
    Issue {
        path: String::new(),
        message,
        position: Some(Position { line, column }),
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Where a YAML comment starts on this line: a `#` at the start or after white space, outside
/// quotes.
fn comment_start(line: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && prev.is_whitespace() => return Some(i),
            None => {}
        }
        prev = c;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SITE" => Some("north".into()),
            "EMPTY" => Some(String::new()),
            "MULTI" => Some("a\nb".into()),
            _ => None,
        }
    }

    #[test]
    fn variables_defaults_and_escapes_are_replaced() {
        let text =
            "a: ${SITE}\nb: ${NOPE:-fallback}\nc: ${EMPTY:-x}\nd: '$${HOME}'\ne: ${EMPTY}\nf: $5\n";
        let out = expand(text, env).unwrap();
        assert_eq!(
            out,
            "a: north\nb: fallback\nc: x\nd: '${HOME}'\ne: \nf: $5\n"
        );
    }

    #[test]
    fn comments_need_no_variables() {
        let text = "# ${UNSET}\nkey: value   # ${UNSET}\nq: \"#${SITE}\"\n";
        let out = expand(text, env).unwrap();
        assert_eq!(out, "# ${UNSET}\nkey: value   # ${UNSET}\nq: \"#north\"\n");
    }

    #[test]
    fn every_problem_is_reported_with_its_line_and_column() {
        let text = "a: ${UNSET}\nb: ok\nc: x ${MULTI}\nd: ${1BAD}\ne: ${OPEN\n";
        let issues = expand(text, env).unwrap_err();
        let found: Vec<(usize, usize, &str)> = issues
            .iter()
            .map(|i| {
                let p = i.position.unwrap();
                (p.line, p.column, i.message.as_str())
            })
            .collect();
        assert_eq!(found.len(), 4, "{found:?}");
        assert_eq!((found[0].0, found[0].1), (1, 4));
        assert!(found[0].2.contains("UNSET is not set"), "{found:?}");
        assert_eq!((found[1].0, found[1].1), (3, 6));
        assert!(found[1].2.contains("line break"), "{found:?}");
        assert_eq!(found[2].0, 4);
        assert!(found[2].2.contains("variable name"), "{found:?}");
        assert_eq!(found[3].0, 5);
        assert!(found[3].2.contains("closing"), "{found:?}");
    }
}
