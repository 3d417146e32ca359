//! KMM's `containerImage` / `sign` template substitution, reproduced exactly.
//!
//! Kernel Module Management normalizes the node's kernel version, derives `KERNEL_*`
//! variables from it (plus `MOD_NAME` / `MOD_NAMESPACE` for `containerImage`) and runs
//! the template through `github.com/a8m/envsubst` v1.4.2 (`parse` package, empty
//! `Restrictions`). This file is a faithful port of that lexer and parser, quirks
//! included, so that the image names kmodforge pushes are the names KMM pulls.
//! Facts: `tests/kmm/FACTS.md` §1.1-1.4; cases from KMM's own code:
//! `tests/kmm/template-cases.toml`.

use std::sync::LazyLock;

use regex::Regex;

/// Message of envsubst's only lexing error (unclosed `${`, or a newline inside braces).
const CLOSING_BRACE: &str = "closing brace expected";

/// Templates on which envsubst v1.4.2 never returns (a `$_` inside `${...}` makes its
/// parser spin on a closed channel); we report them instead of hanging.
const NEVER_RETURNS: &str = "envsubst would never return on this template (a `$_` inside `${...}`): \
     KMM's reconciler would hang on it";

/// The kernel variables KMM defines for every substituted field.
pub const KERNEL_VARS: [&str; 6] = [
    "KERNEL_FULL_VERSION",
    "KERNEL_VERSION",
    "KERNEL_XYZ",
    "KERNEL_X",
    "KERNEL_Y",
    "KERNEL_Z",
];

/// What `containerImage` gets besides: the Module's name and namespace.
pub const MODULE_VARS: [&str; 2] = ["MOD_NAME", "MOD_NAMESPACE"];

/// KMM's normalization of a kernel version: every char outside [A-Za-z0-9._-] becomes '_'.
pub fn normalize(kver: &str) -> String {
    kver.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// KMM's variables for a kernel (values normalized, split on [.,-] of the normalized version;
/// error "invalid kernel version <v>: expected at least three components (major.minor.patch)"
/// when fewer than 3 fields), plus MOD_NAME/MOD_NAMESPACE when given (containerImage only).
///
/// `kver` is the version as KMM's kernel mapper receives it (a node's kernel has already lost
/// one trailing `+`; PreflightValidation passes it unchanged). The order is KMM's.
pub fn kmm_vars(
    kver: &str,
    module: Option<(&str, &str)>,
) -> Result<Vec<(&'static str, String)>, String> {
    let norm = normalize(kver);
    let fields: Vec<&str> = norm.split(['.', ',', '-']).collect();
    if fields.len() < 3 {
        return Err(format!(
            "invalid kernel version {norm}: expected at least three components (major.minor.patch)"
        ));
    }
    let mut vars = vec![
        ("KERNEL_FULL_VERSION", norm.clone()),
        ("KERNEL_VERSION", norm.clone()),
        ("KERNEL_XYZ", fields[..3].join(".")),
        ("KERNEL_X", fields[0].to_string()),
        ("KERNEL_Y", fields[1].to_string()),
        ("KERNEL_Z", fields[2].to_string()),
    ];
    if let Some((name, namespace)) = module {
        vars.push(("MOD_NAME", name.to_string()));
        vars.push(("MOD_NAMESPACE", namespace.to_string()));
    }
    Ok(vars)
}

/// a8m/envsubst v1.4.2 semantics with KMM's Restrictions{}: $NAME and ${NAME}, greedy unbraced names
/// (letters incl. Unicode, digits, '_'), unknown -> empty, $$ -> $, ${V-d} ${V:-d} ${V=d} ${V:=d} ${V+a} ${V:+a},
/// lone '$' kept, '${}' kept, unclosed '${' -> Err("closing brace expected") ... exactly as FACTS.md 1.4 says.
///
/// Only `vars` are consulted (never the process environment); the first entry of a name wins.
pub fn substitute(template: &str, vars: &[(&str, String)]) -> Result<String, String> {
    let (nodes, err) = parse(template);
    if let Some(err) = err {
        return Err(err.to_string());
    }
    Ok(nodes.iter().map(|n| n.eval(vars)).collect())
}

/// What KMM makes of a template for a kernel: kmm_vars then substitute; errors as KMM words them
/// (for the substitution error: failed to substitute "<template>": closing brace expected).
///
/// `module` is `Some((name, namespace))` for `containerImage`, `None` for `sign` fields.
pub fn kmm_resolve(
    template: &str,
    kver: &str,
    module: Option<(&str, &str)>,
) -> Result<String, String> {
    let vars = kmm_vars(kver, module)?;
    substitute(template, &vars)
        .map_err(|e| format!("failed to substitute {}: {e}", go_quote(template)))
}

/// The variable names a template references (braced or not), for config checks.
///
/// Names come in order of first appearance, without duplicates, exactly as envsubst looks
/// them up (so an odd `${$X}` yields `$X`, which no variable can match). For a template
/// that does not parse, the names before the failing `${`.
pub fn referenced(template: &str) -> Vec<String> {
    let (nodes, _) = parse(template);
    let mut names: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    };
    for node in &nodes {
        match node {
            Node::Text(_) => {}
            Node::Var(n) => add(n),
            Node::Subst { var, default, .. } => {
                add(var);
                if let Some(Node::Var(d)) = default.as_deref() {
                    add(d);
                }
            }
        }
    }
    names
}

/// Go's `%q` (`strconv.Quote`) for the template KMM quotes in its error.
fn go_quote(s: &str) -> String {
    // strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space.
    static PRINTABLE: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^[\p{L}\p{M}\p{N}\p{P}\p{S} ]$").expect("static regex"));
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if PRINTABLE.is_match(c.encode_utf8(&mut [0; 4])) => out.push(c),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// Go's `unicode.IsLetter(r) || unicode.IsDigit(r) || r == '_'` (categories L and Nd).
fn is_name_char(c: char) -> bool {
    static UNICODE_NAME: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^[\p{L}\p{Nd}]$").expect("static regex"));
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    UNICODE_NAME.is_match(c.encode_utf8(&mut [0; 4]))
}

/// envsubst's token types (`itemType`), `Closed` standing for a read after the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    Error,
    Eof,
    Text,
    Plus,
    Dash,
    Equals,
    ColonEquals,
    ColonDash,
    ColonPlus,
    Variable,
    LeftDelim,
    RightDelim,
    Closed,
}

/// One token with the input text it covers (for `Error`, the message).
#[derive(Clone, Copy, Debug)]
struct Item<'a> {
    typ: Tok,
    val: &'a str,
}

/// The lexer's state functions.
#[derive(Clone, Copy)]
enum State {
    Text,
    Variable,
    SubstOperator,
    Substitution,
}

/// Port of envsubst's state-machine lexer; byte positions as in Go.
struct Lexer<'a> {
    input: &'a str,
    pos: usize,
    start: usize,
    width: usize,
    last_pos: usize,
    subs_depth: i64,
    items: Vec<Item<'a>>,
}

impl<'a> Lexer<'a> {
    /// Runs the lexer to its end; the token list ends with `Eof` or `Error`.
    fn run(input: &'a str) -> Vec<Item<'a>> {
        let mut l = Lexer {
            input,
            pos: 0,
            start: 0,
            width: 0,
            last_pos: 0,
            subs_depth: 0,
            items: Vec::new(),
        };
        let mut state = Some(State::Text);
        while let Some(s) = state {
            state = match s {
                State::Text => l.lex_text(),
                State::Variable => l.lex_variable(),
                State::SubstOperator => l.lex_subst_operator(),
                State::Substitution => l.lex_substitution(),
            };
        }
        l.items
    }

    fn next(&mut self) -> Option<char> {
        match self.input[self.pos..].chars().next() {
            None => {
                self.width = 0;
                None
            }
            Some(c) => {
                self.width = c.len_utf8();
                self.pos += self.width;
                Some(c)
            }
        }
    }

    fn peek(&mut self) -> Option<char> {
        let r = self.next();
        self.backup();
        r
    }

    fn backup(&mut self) {
        self.pos -= self.width;
    }

    fn emit(&mut self, typ: Tok) {
        self.items.push(Item {
            typ,
            val: &self.input[self.start..self.pos],
        });
        self.last_pos = self.start;
        self.start = self.pos;
    }

    fn ignore(&mut self) {
        self.start = self.pos;
    }

    fn error(&mut self) -> Option<State> {
        self.items.push(Item {
            typ: Tok::Error,
            val: CLOSING_BRACE,
        });
        None
    }

    fn after_open_brace(&self) -> bool {
        self.input[self.last_pos..].starts_with("${")
    }

    /// `lexText`: plain text up to a `$`.
    fn lex_text(&mut self) -> Option<State> {
        while let Some(r) = self.next() {
            if r != '$' {
                continue;
            }
            self.pos -= 1;
            if self.pos > self.start {
                self.emit(Tok::Text);
            }
            self.pos += 1;
            match self.peek() {
                Some('$') => {
                    self.ignore();
                    self.next();
                    self.emit(Tok::Text);
                }
                Some('{') => {
                    self.next();
                    self.subs_depth += 1;
                    self.emit(Tok::LeftDelim);
                    return Some(State::SubstOperator);
                }
                Some(c) if is_name_char(c) => return Some(State::Variable),
                _ => {}
            }
        }
        if self.pos > self.start {
            self.emit(Tok::Text);
        }
        self.emit(Tok::Eof);
        None
    }

    /// `lexVariable`: the longest run of name characters.
    fn lex_variable(&mut self) -> Option<State> {
        loop {
            match self.next() {
                Some(c) if is_name_char(c) => {}
                _ => {
                    self.backup();
                    break;
                }
            }
        }
        let v = &self.input[self.start..self.pos];
        if v == "_" || v == "$_" {
            return Some(State::Text);
        }
        self.emit(Tok::Variable);
        if self.subs_depth > 0 {
            Some(State::SubstOperator)
        } else {
            Some(State::Text)
        }
    }

    /// `lexSubstitutionOperator`: an optional operator after `${` or a variable in braces.
    fn lex_subst_operator(&mut self) -> Option<State> {
        match self.next() {
            Some('}') => {
                self.subs_depth -= 1;
                self.emit(Tok::RightDelim);
                return Some(State::Text);
            }
            None | Some('\r' | '\n') => return self.error(),
            Some(c) if is_name_char(c) && self.after_open_brace() => {
                return Some(State::Variable);
            }
            Some('+') => self.emit(Tok::Plus),
            Some('-') => self.emit(Tok::Dash),
            Some('=') => self.emit(Tok::Equals),
            Some(':') => match self.next() {
                Some('-') => self.emit(Tok::ColonDash),
                Some('=') => self.emit(Tok::ColonEquals),
                Some('+') => self.emit(Tok::ColonPlus),
                _ => {}
            },
            _ => {}
        }
        Some(State::Substitution)
    }

    /// `lexSubstitution`: the rest of a `${...}`, one character at a time.
    fn lex_substitution(&mut self) -> Option<State> {
        match self.next() {
            Some('}') => {
                self.subs_depth -= 1;
                self.emit(Tok::RightDelim);
                Some(State::Text)
            }
            None | Some('\r' | '\n') => self.error(),
            Some(c) if (is_name_char(c) && self.after_open_brace()) || c == '$' => {
                Some(State::Variable)
            }
            Some(_) => {
                self.emit(Tok::Text);
                Some(State::Substitution)
            }
        }
    }
}

/// envsubst's parse tree.
#[derive(Debug)]
enum Node<'a> {
    Text(String),
    Var(&'a str),
    Subst {
        exp: Option<Tok>,
        var: &'a str,
        default: Option<Box<Node<'a>>>,
    },
}

/// envsubst's `Env.Lookup`: the value of the first `NAME=value` pair that starts with
/// `<ident>=` (compared as envsubst does, on the joined pair).
fn lookup(vars: &[(&str, String)], ident: &str) -> Option<String> {
    let prefix = format!("{ident}=");
    vars.iter()
        .find_map(|(k, v)| format!("{k}={v}").strip_prefix(&prefix).map(str::to_string))
}

impl Node<'_> {
    fn eval(&self, vars: &[(&str, String)]) -> String {
        match self {
            Node::Text(t) => t.clone(),
            Node::Var(n) => lookup(vars, n).unwrap_or_default(),
            Node::Subst { exp, var, default } => {
                let value = lookup(vars, var);
                if let (Some(exp), Some(default)) = (exp, default) {
                    match exp {
                        Tok::ColonDash | Tok::ColonEquals => {
                            return match value {
                                Some(v) if !v.is_empty() => v,
                                _ => default.eval(vars),
                            };
                        }
                        Tok::Plus | Tok::ColonPlus => {
                            return match value {
                                Some(_) => default.eval(vars),
                                None => String::new(),
                            };
                        }
                        _ => {
                            if value.is_none() {
                                return default.eval(vars);
                            }
                        }
                    }
                }
                value.unwrap_or_default()
            }
        }
    }
}

/// envsubst's parser (Quick mode): the nodes and the first error, if any; on an error the
/// nodes are those parsed before it.
fn parse(template: &str) -> (Vec<Node<'_>>, Option<&'static str>) {
    let items = Lexer::run(template);
    let mut p = Parser { items, at: 0 };
    let mut nodes = Vec::new();
    let err = p.parse(&mut nodes).err();
    (nodes, err)
}

struct Parser<'a> {
    items: Vec<Item<'a>>,
    at: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Item<'a> {
        self.items.get(self.at).copied().unwrap_or(Item {
            typ: Tok::Closed,
            val: "",
        })
    }

    fn next(&mut self) -> Item<'a> {
        let t = self.peek();
        self.at += 1;
        t
    }

    /// Lexer error messages are `&'static`; map the token to it.
    fn error_of(t: Item<'_>) -> &'static str {
        debug_assert_eq!(t.val, CLOSING_BRACE);
        CLOSING_BRACE
    }

    fn parse(&mut self, nodes: &mut Vec<Node<'a>>) -> Result<(), &'static str> {
        loop {
            let t = self.next();
            match t.typ {
                Tok::Eof => return Ok(()),
                Tok::Error => return Err(Self::error_of(t)),
                Tok::Closed => return Err(NEVER_RETURNS),
                Tok::Variable => nodes.push(Node::Var(t.val.strip_prefix('$').unwrap_or(t.val))),
                Tok::LeftDelim if self.peek().typ == Tok::Variable => {
                    let n = self.action()?;
                    nodes.push(n);
                }
                _ => nodes.push(Node::Text(t.val.to_string())),
            }
        }
    }

    /// One `${VAR...}` whose first token is a variable (its name is NOT stripped of `$`).
    fn action(&mut self) -> Result<Node<'a>, &'static str> {
        let var = self.next().val;
        let mut exp = None;
        let mut default = None;
        loop {
            let t = self.next();
            match t.typ {
                Tok::RightDelim => break,
                Tok::Error => return Err(Self::error_of(t)),
                Tok::Eof | Tok::Closed => return Err(NEVER_RETURNS),
                Tok::Variable => {
                    default = Some(Box::new(Node::Var(
                        t.val.strip_prefix('$').unwrap_or(t.val),
                    )));
                }
                Tok::Text => {
                    let mut text = t.val.to_string();
                    loop {
                        match self.peek().typ {
                            Tok::RightDelim | Tok::Error | Tok::Eof => break,
                            Tok::Closed => return Err(NEVER_RETURNS),
                            _ => text.push_str(self.next().val),
                        }
                    }
                    default = Some(Box::new(Node::Text(text)));
                }
                typ => exp = Some(typ),
            }
        }
        Ok(Node::Subst { exp, var, default })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Cases {
        case: Vec<Case>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Case {
        template: String,
        kernel: String,
        mod_name: Option<String>,
        mod_namespace: Option<String>,
        field: String,
        expect: Option<String>,
        error: Option<String>,
    }

    #[test]
    fn kmm_cases() {
        let cases: Cases =
            toml::from_str(include_str!("../../tests/kmm/template-cases.toml")).unwrap();
        assert_eq!(cases.case.len(), 72, "number of cases");
        let mut failures = Vec::new();
        for (i, c) in cases.case.iter().enumerate() {
            let module = match c.field.as_str() {
                "sign" => None,
                "containerImage" => match (&c.mod_name, &c.mod_namespace) {
                    (Some(n), Some(ns)) => Some((n.as_str(), ns.as_str())),
                    _ => None,
                },
                other => {
                    failures.push(format!(
                        "case {i} {:?}: unknown field {other:?}",
                        c.template
                    ));
                    continue;
                }
            };
            let got = kmm_resolve(&c.template, &c.kernel, module);
            let ok = match (&c.expect, &c.error, &got) {
                (Some(want), None, Ok(s)) => s == want,
                (None, Some(want), Err(e)) => e.contains(want.as_str()),
                _ => false,
            };
            if !ok {
                failures.push(format!(
                    "case {i} {:?} (kernel {:?}): want {:?} / error {:?}, got {got:?}",
                    c.template, c.kernel, c.expect, c.error
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} mismatches:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    fn kvars(kver: &str) -> Vec<(&'static str, String)> {
        kmm_vars(kver, None).unwrap()
    }

    #[test]
    fn normalizes_debian_kernel() {
        assert_eq!(normalize("6.12.117+deb12-amd64"), "6.12.117_deb12-amd64");
        assert_eq!(normalize("5.15.0~rc1 ü"), "5.15.0_rc1__");
        let v = kvars("6.12.117+deb12-amd64");
        let get = |n: &str| v.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        assert_eq!(get("KERNEL_Z"), "117_deb12");
        assert_eq!(get("KERNEL_XYZ"), "6.12.117_deb12");
        assert_eq!(get("KERNEL_FULL_VERSION"), "6.12.117_deb12-amd64");
    }

    #[test]
    fn too_few_fields() {
        let e = kmm_vars("6.1+foo", Some(("m", "ns"))).unwrap_err();
        assert_eq!(
            e,
            "invalid kernel version 6.1_foo: expected at least three components (major.minor.patch)"
        );
    }

    #[test]
    fn greedy_unbraced_names() {
        let v = kvars("6.1.0-13-amd64");
        assert_eq!(substitute("$KERNEL_X_$KERNEL_Y", &v).unwrap(), "1");
        assert_eq!(substitute("${KERNEL_X}_$KERNEL_Y", &v).unwrap(), "6_1");
        assert_eq!(substitute("$KERNEL_Xé.$KERNEL_Y", &v).unwrap(), ".1");
    }

    #[test]
    fn dollar_escapes() {
        let v = kvars("6.1.0");
        assert_eq!(substitute("$$KERNEL_X", &v).unwrap(), "$KERNEL_X");
        assert_eq!(substitute("a$$$KERNEL_X", &v).unwrap(), "a$6");
        assert_eq!(substitute("a$", &v).unwrap(), "a$");
        assert_eq!(
            substitute("a$-b ${} $_ $(X)", &v).unwrap(),
            "a$-b ${} $_ $(X)"
        );
    }

    #[test]
    fn defaults_and_alternatives() {
        let mut v = kvars("6.1.0");
        v.push(("EMPTY", String::new()));
        let s = |t: &str| substitute(t, &v).unwrap();
        assert_eq!(s("${NOPE-d}|${EMPTY-d}|${KERNEL_X-d}"), "d||6");
        assert_eq!(s("${NOPE:-d}|${EMPTY:-d}|${KERNEL_X:-d}"), "d|d|6");
        assert_eq!(s("${NOPE=d}|${EMPTY:=d}"), "d|d");
        assert_eq!(s("${NOPE+a}|${EMPTY+a}|${KERNEL_X:+a}"), "|a|a");
        assert_eq!(s("${NOPE:-$KERNEL_Y}"), "1");
        assert_eq!(s("${NOPE:-a-b.c}"), "a-b.c");
    }

    #[test]
    fn errors() {
        let v = kvars("6.1.0");
        assert_eq!(substitute("img:${KERNEL_X", &v).unwrap_err(), CLOSING_BRACE);
        assert_eq!(substitute("${A\n}", &v).unwrap_err(), CLOSING_BRACE);
        assert_eq!(substitute("${A:}", &v).unwrap_err(), CLOSING_BRACE);
        assert_eq!(substitute("${A-$_}", &v).unwrap_err(), NEVER_RETURNS);
        assert_eq!(
            kmm_resolve("i:${X", "6.1.0", None).unwrap_err(),
            r#"failed to substitute "i:${X": closing brace expected"#
        );
        assert_eq!(
            kmm_resolve("\"a\tb\u{7f}\u{a0}é${", "6.1.0", None).unwrap_err(),
            r#"failed to substitute "\"a\tb\x7f\u00a0é${": closing brace expected"#
        );
    }

    #[test]
    fn referenced_names() {
        assert_eq!(
            referenced("r/$MOD_NAMESPACE/${MOD_NAME}:${KERNEL_X:-$KERNEL_Y}-$KERNEL_X_$$A"),
            [
                "MOD_NAMESPACE",
                "MOD_NAME",
                "KERNEL_X",
                "KERNEL_Y",
                "KERNEL_X_"
            ]
        );
        assert_eq!(referenced("img:${} $_ {A} ${NOPE:-x$B}"), ["NOPE"]);
        assert_eq!(referenced("a:$X ${Y"), ["X"]);
    }
}
