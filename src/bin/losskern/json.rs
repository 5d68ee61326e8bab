//! The JSON summary, written by hand (no serde in the dependency tree).

use std::fmt;

/// A JSON value.
pub enum Json {
    Bool(bool),
    Int(u64),
    /// Written as Python's json module does: NaN, Infinity and -Infinity when not finite.
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn object<'a>(fields: impl IntoIterator<Item = (&'a str, Json)>) -> Json {
        Json::Obj(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    pub fn shape(shape: &[usize]) -> Json {
        Json::Arr(shape.iter().map(|&d| Json::Int(d as u64)).collect())
    }

    /// Objects nested up to `levels` deep get one field per line; deeper values stay on
    /// one line (an output's file, shape and value read best together).
    pub fn pretty(&self, indent: usize, levels: usize) -> String {
        match self {
            Json::Obj(fields) if levels > 0 && !fields.is_empty() => {
                let pad = "  ".repeat(indent + 1);
                let lines: Vec<String> = fields
                    .iter()
                    .map(|(key, value)| {
                        let key = Json::Str(key.clone());
                        format!("{pad}{key}: {}", value.pretty(indent + 1, levels - 1))
                    })
                    .collect();
                format!("{{\n{}\n{}}}", lines.join(",\n"), "  ".repeat(indent))
            }
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
            f.write_str("\"")?;
            for c in s.chars() {
                match c {
                    '"' => f.write_str("\\\"")?,
                    '\\' => f.write_str("\\\\")?,
                    '\n' => f.write_str("\\n")?,
                    c if u32::from(c) < 0x20 => write!(f, "\\u{:04x}", u32::from(c))?,
                    c => write!(f, "{c}")?,
                }
            }
            f.write_str("\"")
        }
        match self {
            Json::Bool(b) => write!(f, "{b}"),
            Json::Int(n) => write!(f, "{n}"),
            Json::Num(x) if x.is_nan() => f.write_str("NaN"),
            Json::Num(x) if x.is_infinite() => {
                f.write_str(if *x > 0.0 { "Infinity" } else { "-Infinity" })
            }
            // Debug keeps every digit and uses an exponent for large and small values.
            Json::Num(x) => write!(f, "{x:?}"),
            Json::Str(s) => string(f, s),
            Json::Arr(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Json::Obj(fields) => {
                f.write_str("{")?;
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    string(f, key)?;
                    write!(f, ": {value}")?;
                }
                f.write_str("}")
            }
        }
    }
}
