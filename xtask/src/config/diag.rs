//! Errors in configuration files that point at `file:line:col` and say what to do.
//!
//! Every TOML file kmodforge reads (kernels.toml, a module's module.toml) is kept as a
//! [`Source`] so that any problem found while parsing or validating it can be reported
//! at the exact place, the way compilers do.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The text of one configuration file, kept to turn byte offsets into positions.
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    pub fn read(path: &Path) -> Result<Source> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", display_path(path)))?;
        Ok(Source {
            path: path.to_path_buf(),
            text,
        })
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    pub fn location(&self, span: &Range<usize>) -> Location {
        let (line, col) = self.line_col(span.start);
        Location {
            path: self.path.clone(),
            line,
            col,
        }
    }

    pub fn error(&self, span: &Range<usize>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            location: Some(self.location(span)),
            message: message.into(),
            help: None,
        }
    }

    /// Parses the whole file with serde, turning TOML and type errors into diagnostics.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, Diagnostics> {
        toml::from_str(&self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let mut d = self.error(&span, e.message().trim_end().to_string());
            if e.message().contains("unknown field") {
                d.help = Some("check the spelling; README.md lists every key".into());
            }
            Diagnostics(vec![d])
        })
    }
}

/// A place in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", display_path(&self.path), self.line, self.col)
    }
}

/// One problem, where it is, and what to do about it.
#[derive(Debug)]
pub struct Diagnostic {
    pub location: Option<Location>,
    pub message: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            location: None,
            message: message.into(),
            help: None,
        }
    }

    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        write!(f, "{}", cut_long_words(&self.message))?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {}", cut_long_words(help))?;
        }
        Ok(())
    }
}

/// A message with every run of more than 120 non-blank characters cut to its first 80:
/// a config value can be megabytes long, and a message repeats it.
pub fn cut_long_words(message: &str) -> String {
    const LONG: usize = 120;
    const KEPT: usize = 80;
    let mut out = String::with_capacity(message.len().min(4096));
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let n = word.chars().count();
        if n > LONG {
            out.extend(word.chars().take(KEPT));
            out.push_str(&format!("... ({n} characters)"));
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in message.chars() {
        if c.is_whitespace() {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// All the problems found in one pass, so a user fixes them in one go.
#[derive(Debug, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn into_result(self) -> Result<(), Diagnostics> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        if self.0.len() > 1 {
            write!(f, "\n({} problems)", self.0.len())?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// A path as a user would type it: relative to the current directory when inside it.
pub fn display_path(path: &Path) -> String {
    let rel = std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf));
    match rel {
        Some(p) if !p.as_os_str().is_empty() => p.display().to_string(),
        _ => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_in_messages() {
        let long = "x".repeat(10_000);
        let shown = cut_long_words(&format!("no toolchain named \"{long}\" here"));
        assert!(shown.starts_with("no toolchain named \"xxx"));
        assert!(shown.ends_with("... (10002 characters) here"), "{shown}");
        assert!(shown.len() < 200);
        assert_eq!(cut_long_words("a b  c"), "a b  c");
    }

    #[test]
    fn line_col_counts_characters_from_one() {
        let src = Source {
            path: "k.toml".into(),
            text: "a = 1\nbé = 2\nc".into(),
        };
        assert_eq!(src.line_col(0), (1, 1));
        assert_eq!(src.line_col(6), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(src.line_col(9), (2, 3));
        assert_eq!(src.line_col(src.text.len()), (3, 2));
    }

    #[test]
    fn parse_error_names_file_line_and_column() {
        let src = Source {
            path: "k.toml".into(),
            text: "[defaults]\ntoolchain = \n".into(),
        };
        let err = src.parse::<toml::Table>().unwrap_err().to_string();
        assert!(err.starts_with("k.toml:2:"), "{err}");
    }
}
