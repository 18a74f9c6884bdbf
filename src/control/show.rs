//! What `splicegate ctl` prints for an answer without `--json`: tables for
//! lists, `key: value` lines for the rest.

use std::fmt::Write;

use serde_json::Value;

/// A value as a table cell (`-` for none).
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".to_owned(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Rows under a header, columns padded to their widest cell.
fn table(rows: &[Value], columns: &[&str]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, items: Vec<&str>| {
        let mut l = String::new();
        for (i, item) in items.iter().enumerate() {
            if i + 1 == items.len() {
                l.push_str(item);
            } else {
                let _ = write!(l, "{item:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, columns.to_vec());
    for r in &cells {
        line(&mut out, r.iter().map(String::as_str).collect());
    }
    out
}

/// The answer to `command` for a person.
pub fn human(command: &str, answer: &Value) -> String {
    match command {
        "sessions" => {
            let rows = answer["sessions"].as_array().cloned().unwrap_or_default();
            let mut out = table(
                &rows,
                &[
                    "id",
                    "transport",
                    "client",
                    "sni",
                    "route",
                    "agent",
                    "started",
                    "idle_s",
                    "bytes_to_agent",
                    "bytes_to_client",
                ],
            );
            let _ = writeln!(out, "{} sessions", rows.len());
            out
        }
        "agents" => {
            let rows = answer["agents"].as_array().cloned().unwrap_or_default();
            table(
                &rows,
                &["agent", "health", "draining", "sessions", "pools", "routes"],
            )
        }
        "help" => {
            let rows = answer["commands"].as_array().cloned().unwrap_or_default();
            rows.iter()
                .map(|r| format!("{}\n    {}\n", cell(&r["command"]), cell(&r["help"])))
                .collect()
        }
        _ => {
            let mut out = String::new();
            if let Some(map) = answer.as_object() {
                for (k, v) in map.iter().filter(|(k, _)| *k != "ok") {
                    let _ = writeln!(out, "{k}: {}", cell(v));
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_are_tables_and_the_rest_key_value_lines() {
        let a = json!({"ok": true, "agents": [
            {"agent": "10.0.0.1:8443", "health": "up", "draining": true, "sessions": 3, "pools": ["p"], "routes": []},
            {"agent": "10.0.0.22:8443", "health": null, "draining": false, "sessions": 0, "pools": [], "routes": ["exact:a"]},
        ]});
        let t = human("agents", &a);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "agent           health  draining  sessions  pools  routes"
        );
        assert_eq!(
            lines[1],
            "10.0.0.1:8443   up      true      3         p      -"
        );
        assert_eq!(
            lines[2],
            "10.0.0.22:8443  -       false     0         -      exact:a"
        );
        let s = human(
            "drain-agent",
            &json!({"ok": true, "agent": "10.0.0.1:8443", "draining": true}),
        );
        assert_eq!(s, "agent: 10.0.0.1:8443\ndraining: true\n");
    }
}
