//! A RON document tree that remembers where every value came from.
//!
//! Recipes are merged (base + child + `--set` overrides) before they are typed, and every error
//! must still name the file, line and column of the offending value. `ron::Value` drops both
//! positions and enum variant names, so recipes are parsed into this tree instead; it implements
//! `serde::Deserializer`, and its errors carry the span and the path of the failing value.

use std::fmt;
use std::sync::Arc;

/// Where a value was written: a file (or `--set`) and a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub source: Arc<str>,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.source, self.line, self.col)
    }
}

/// One value of a RON document.
#[derive(Debug, Clone)]
pub struct Node {
    pub span: Span,
    pub kind: Kind,
}

/// A named field of a struct, with the span of its name.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub name_span: Span,
    pub value: Node,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    /// `Some(x)` or `None`.
    Opt(Option<Box<Node>>),
    /// `[a, b]`.
    Seq(Vec<Node>),
    /// `Name(a, b)` or `(a, b)`.
    Tuple(Option<String>, Vec<Node>),
    /// `Name(a: 1, b: 2)` or `(a: 1)`.
    Struct(Option<String>, Vec<Field>),
    /// `{ "k": v }`.
    Map(Vec<(Node, Node)>),
    /// A bare identifier: a unit enum variant or unit struct.
    Ident(String),
}

impl Kind {
    pub fn describe(&self) -> &'static str {
        match self {
            Kind::Bool(_) => "a boolean",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a float",
            Kind::Str(_) => "a string",
            Kind::Opt(_) => "an option",
            Kind::Seq(_) => "a list",
            Kind::Tuple(..) => "a tuple",
            Kind::Struct(..) => "a struct",
            Kind::Map(_) => "a map",
            Kind::Ident(_) => "an identifier",
        }
    }
}

impl Node {
    pub fn new(kind: Kind, span: Span) -> Self {
        Node { span, kind }
    }

    /// Fields of a struct node (an empty `()` counts as a struct without fields).
    pub fn fields(&self) -> Option<&[Field]> {
        match &self.kind {
            Kind::Struct(_, f) => Some(f),
            Kind::Tuple(_, items) if items.is_empty() => Some(&[]),
            _ => None,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Node> {
        self.fields()?
            .iter()
            .find(|f| f.name == name)
            .map(|f| &f.value)
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields()?.iter().find(|f| f.name == name)
    }

    /// The string inside, looking through `Some(..)`.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Str(s) => Some(s),
            Kind::Opt(Some(inner)) => inner.as_str(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match &self.kind {
            Kind::Int(i) => Some(*i as f64),
            Kind::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// Merge `over` on top of `self`: structs merge field by field (recursively), anything else
    /// is replaced by the overriding value.
    pub fn merge(&mut self, over: Node) {
        match (&mut self.kind, over.kind) {
            (Kind::Struct(_, base), Kind::Struct(_, fields)) => {
                for f in fields {
                    match base.iter_mut().find(|b| b.name == f.name) {
                        Some(b) => b.value.merge(f.value),
                        None => base.push(f),
                    }
                }
            }
            (_, kind) => {
                self.kind = kind;
                self.span = over.span;
            }
        }
    }

    /// Set the value at a dotted path (`train.epochs`, `regularizers.0.weight`), creating
    /// struct fields as needed. Returns an error message when the path crosses a non-struct.
    pub fn set_path(&mut self, path: &[&str], value: Node) -> Result<(), String> {
        let Some((head, rest)) = path.split_first() else {
            *self = value;
            return Ok(());
        };
        let span = value.span.clone();
        if let Kind::Tuple(_, items) = &self.kind {
            if items.is_empty() {
                self.kind = Kind::Struct(None, Vec::new());
            }
        }
        match &mut self.kind {
            Kind::Struct(_, fields) => {
                if let Some(f) = fields.iter_mut().find(|f| f.name == *head) {
                    return f.value.set_path(rest, value);
                }
                let mut fresh = Node::new(Kind::Struct(None, Vec::new()), span.clone());
                fresh.set_path(rest, value)?;
                fields.push(Field {
                    name: head.to_string(),
                    name_span: span,
                    value: fresh,
                });
                Ok(())
            }
            Kind::Seq(items) | Kind::Tuple(_, items) => {
                let idx: usize = head
                    .parse()
                    .map_err(|_| format!("`{head}` is not an index into a list"))?;
                let len = items.len();
                let item = items
                    .get_mut(idx)
                    .ok_or_else(|| format!("index {idx} is out of range (the list has {len})"))?;
                item.set_path(rest, value)
            }
            Kind::Opt(Some(inner)) => inner.set_path(path, value),
            other => Err(format!("cannot set `{head}` inside {}", other.describe())),
        }
    }
}

/// A syntax error with its position.
#[derive(Debug, Clone)]
pub struct ParseError {
    pub span: Span,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.span, self.message)
    }
}

/// Parse a RON document into a [`Node`].
pub fn parse(source: &str, name: &str) -> Result<Node, ParseError> {
    let mut p = Parser {
        chars: source.chars().collect(),
        pos: 0,
        line: 1,
        col: 1,
        source: Arc::from(name),
    };
    p.skip_ws()?;
    let node = p.value()?;
    p.skip_ws()?;
    if p.pos < p.chars.len() {
        return Err(p.error(format!(
            "unexpected `{}` after the end of the document",
            p.chars[p.pos]
        )));
    }
    Ok(node)
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    col: usize,
    source: Arc<str>,
}

impl Parser {
    fn span(&self) -> Span {
        Span {
            source: self.source.clone(),
            line: self.line,
            col: self.col,
        }
    }

    fn error(&self, message: String) -> ParseError {
        ParseError {
            span: self.span(),
            message,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn skip_ws(&mut self) -> Result<(), ParseError> {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                Some('/') if self.chars.get(self.pos + 1) == Some(&'/') => {
                    while let Some(c) = self.peek() {
                        if c == '\n' {
                            break;
                        }
                        self.bump();
                    }
                }
                Some('/') if self.chars.get(self.pos + 1) == Some(&'*') => {
                    let start = self.span();
                    self.bump();
                    self.bump();
                    loop {
                        match self.bump() {
                            None => {
                                return Err(ParseError {
                                    span: start,
                                    message: "unterminated block comment".into(),
                                })
                            }
                            Some('*') if self.peek() == Some('/') => {
                                self.bump();
                                break;
                            }
                            _ => {}
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn expect(&mut self, want: char) -> Result<(), ParseError> {
        self.skip_ws()?;
        match self.peek() {
            Some(c) if c == want => {
                self.bump();
                Ok(())
            }
            Some(c) => Err(self.error(format!("expected `{want}`, found `{c}`"))),
            None => Err(self.error(format!("expected `{want}`, found the end of the file"))),
        }
    }

    fn ident(&mut self) -> String {
        let mut s = String::new();
        while let Some(c) = self.peek() {
            if c.is_alphanumeric() || c == '_' {
                s.push(c);
                self.bump();
            } else {
                break;
            }
        }
        s
    }

    fn value(&mut self) -> Result<Node, ParseError> {
        self.skip_ws()?;
        let span = self.span();
        let Some(c) = self.peek() else {
            return Err(self.error("expected a value, found the end of the file".into()));
        };
        let kind = match c {
            '"' => Kind::Str(self.string()?),
            '[' => {
                self.bump();
                let items = self.list(']')?;
                Kind::Seq(items)
            }
            '{' => {
                self.bump();
                let mut entries = Vec::new();
                loop {
                    self.skip_ws()?;
                    if self.peek() == Some('}') {
                        self.bump();
                        break;
                    }
                    let k = self.value()?;
                    self.expect(':')?;
                    let v = self.value()?;
                    entries.push((k, v));
                    self.skip_ws()?;
                    match self.peek() {
                        Some(',') => {
                            self.bump();
                        }
                        Some('}') => {}
                        _ => return Err(self.error("expected `,` or `}` in a map".into())),
                    }
                }
                Kind::Map(entries)
            }
            '(' => self.parens(None)?,
            c if c == '-' || c == '+' || c == '.' || c.is_ascii_digit() => self.number()?,
            c if c.is_alphabetic() || c == '_' => {
                let name = self.ident();
                match name.as_str() {
                    "true" => Kind::Bool(true),
                    "false" => Kind::Bool(false),
                    "None" => Kind::Opt(None),
                    "inf" => Kind::Float(f64::INFINITY),
                    "NaN" => Kind::Float(f64::NAN),
                    "Some" => {
                        self.expect('(')?;
                        let inner = self.value()?;
                        self.skip_ws()?;
                        if self.peek() == Some(',') {
                            self.bump();
                        }
                        self.expect(')')?;
                        Kind::Opt(Some(Box::new(inner)))
                    }
                    _ => {
                        self.skip_ws()?;
                        if self.peek() == Some('(') {
                            self.parens(Some(name))?
                        } else {
                            Kind::Ident(name)
                        }
                    }
                }
            }
            other => return Err(self.error(format!("unexpected `{other}`: expected a value"))),
        };
        Ok(Node::new(kind, span))
    }

    /// After an optional name, at `(`: a struct with named fields or a tuple.
    fn parens(&mut self, name: Option<String>) -> Result<Kind, ParseError> {
        self.expect('(')?;
        self.skip_ws()?;
        // A struct if the first thing is `ident :` (and not `ident(`/`ident,`).
        let save = (self.pos, self.line, self.col);
        let is_struct = if self.peek().is_some_and(|c| c.is_alphabetic() || c == '_') {
            let _ = self.ident();
            self.skip_ws()?;
            let colon = self.peek() == Some(':');
            (self.pos, self.line, self.col) = save;
            colon
        } else {
            false
        };
        if !is_struct {
            let items = self.list(')')?;
            return Ok(Kind::Tuple(name, items));
        }
        let mut fields: Vec<Field> = Vec::new();
        loop {
            self.skip_ws()?;
            if self.peek() == Some(')') {
                self.bump();
                break;
            }
            let name_span = self.span();
            let fname = self.ident();
            if fname.is_empty() {
                let found = self
                    .peek()
                    .map_or("the end of the file".into(), |c| format!("`{c}`"));
                return Err(self.error(format!("expected a field name, found {found}")));
            }
            if fields.iter().any(|f| f.name == fname) {
                return Err(ParseError {
                    span: name_span,
                    message: format!("field `{fname}` is given twice"),
                });
            }
            self.expect(':')?;
            let value = self.value()?;
            fields.push(Field {
                name: fname,
                name_span,
                value,
            });
            self.skip_ws()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(')') => {}
                Some(c) => {
                    return Err(
                        self.error(format!("expected `,` or `)` after a field, found `{c}`"))
                    )
                }
                None => return Err(self.error("unclosed `(`: expected `)`".into())),
            }
        }
        Ok(Kind::Struct(name, fields))
    }

    fn list(&mut self, close: char) -> Result<Vec<Node>, ParseError> {
        let mut items = Vec::new();
        loop {
            self.skip_ws()?;
            if self.peek() == Some(close) {
                self.bump();
                return Ok(items);
            }
            items.push(self.value()?);
            self.skip_ws()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(c) if c == close => {}
                Some(c) => {
                    return Err(self.error(format!("expected `,` or `{close}`, found `{c}`")))
                }
                None => return Err(self.error(format!("unclosed list: expected `{close}`"))),
            }
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        let start = self.span();
        self.bump();
        let mut s = String::new();
        loop {
            match self.bump() {
                None => {
                    return Err(ParseError {
                        span: start,
                        message: "unterminated string".into(),
                    })
                }
                Some('"') => return Ok(s),
                Some('\\') => match self.bump() {
                    Some('n') => s.push('\n'),
                    Some('t') => s.push('\t'),
                    Some('r') => s.push('\r'),
                    Some('0') => s.push('\0'),
                    Some('\\') => s.push('\\'),
                    Some('"') => s.push('"'),
                    Some(c) => return Err(self.error(format!("unknown escape `\\{c}`"))),
                    None => return Err(self.error("unterminated string".into())),
                },
                Some(c) => s.push(c),
            }
        }
    }

    fn number(&mut self) -> Result<Kind, ParseError> {
        let start = self.span();
        let mut text = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_') {
                // A sign is only part of a number at its start or after an exponent.
                if matches!(c, '-' | '+')
                    && !(text.is_empty() || text.ends_with('e') || text.ends_with('E'))
                {
                    break;
                }
                text.push(c);
                self.bump();
            } else {
                break;
            }
        }
        let clean: String = text.chars().filter(|c| *c != '_').collect();
        if let Ok(i) = clean.parse::<i128>() {
            return Ok(Kind::Int(i));
        }
        if clean.chars().any(|c| c.is_ascii_digit()) && !clean.contains("inf") {
            if let Ok(f) = clean.parse::<f64>() {
                return Ok(Kind::Float(f));
            }
        }
        if clean == "-inf" {
            return Ok(Kind::Float(f64::NEG_INFINITY));
        }
        Err(ParseError {
            span: start,
            message: format!("`{text}` is not a number"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_structures_with_positions() {
        let src = "Recipe(\n  name: \"x\",\n  regs: [(plugin: \"u\", w: 1e-4, f: Cls)],\n  b: Some(3), t: (0.9, -0.95),\n)";
        let n = parse(src, "r.ron").unwrap();
        assert_eq!(n.get("name").unwrap().as_str(), Some("x"));
        let regs = n.get("regs").unwrap();
        let Kind::Seq(items) = &regs.kind else {
            panic!()
        };
        assert_eq!(items[0].get("w").unwrap().as_f64(), Some(1e-4));
        assert!(matches!(&items[0].get("f").unwrap().kind, Kind::Ident(s) if s == "Cls"));
        assert_eq!(regs.span.line, 3);
        assert_eq!(regs.span.col, 9);
        let Kind::Tuple(None, t) = &n.get("t").unwrap().kind else {
            panic!()
        };
        assert_eq!(t[1].as_f64(), Some(-0.95));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("(a: 1,\n b: ]", "f.ron").unwrap_err();
        assert_eq!((e.span.line, e.span.col), (2, 5), "{e}");
        let e = parse("(a: 1", "f.ron").unwrap_err();
        assert!(e.message.contains("unclosed"), "{e}");
        let e = parse("(a: 1, a: 2)", "f.ron").unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
    }

    #[test]
    fn merge_and_set_path() {
        let mut base = parse("(a: (x: 1, y: 2), l: [1, 2])", "base").unwrap();
        let child = parse("(a: (y: 3), l: [5])", "child").unwrap();
        base.merge(child);
        assert_eq!(base.get("a").unwrap().get("x").unwrap().as_f64(), Some(1.0));
        assert_eq!(base.get("a").unwrap().get("y").unwrap().as_f64(), Some(3.0));
        let v = parse("7", "--set").unwrap();
        base.set_path(&["l", "0"], v.clone()).unwrap();
        let Kind::Seq(l) = &base.get("l").unwrap().kind else {
            panic!()
        };
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].as_f64(), Some(7.0));
        base.set_path(&["new", "deep"], v.clone()).unwrap();
        assert_eq!(
            base.get("new").unwrap().get("deep").unwrap().as_f64(),
            Some(7.0)
        );
        assert!(base.set_path(&["l", "9"], v).is_err());
    }
}

impl Node {
    /// Write the node back as RON text (used to save the resolved recipe beside a run).
    pub fn to_ron(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, indent: usize) {
        let pad = |n: usize| "    ".repeat(n);
        match &self.kind {
            Kind::Bool(b) => out.push_str(&b.to_string()),
            Kind::Int(i) => out.push_str(&i.to_string()),
            Kind::Float(f) => {
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15 {
                    out.push_str(&format!("{f:.1}"))
                } else if f.is_nan() {
                    out.push_str("NaN")
                } else if f.is_infinite() {
                    out.push_str(if *f > 0.0 { "inf" } else { "-inf" })
                } else {
                    out.push_str(&format!("{f:?}"))
                }
            }
            Kind::Str(s) => out.push_str(&format!("{s:?}")),
            Kind::Opt(None) => out.push_str("None"),
            Kind::Opt(Some(n)) => {
                out.push_str("Some(");
                n.write(out, indent);
                out.push(')');
            }
            Kind::Ident(s) => out.push_str(s),
            Kind::Seq(items) | Kind::Tuple(_, items) => {
                let (open, close) = if matches!(self.kind, Kind::Seq(_)) {
                    ('[', ']')
                } else {
                    ('(', ')')
                };
                if let Kind::Tuple(Some(name), _) = &self.kind {
                    out.push_str(name);
                }
                out.push(open);
                for (i, n) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    n.write(out, indent);
                }
                out.push(close);
            }
            Kind::Struct(name, fields) => {
                if let Some(name) = name {
                    out.push_str(name);
                }
                if fields.is_empty() {
                    out.push_str("()");
                    return;
                }
                out.push_str("(\n");
                for f in fields {
                    out.push_str(&pad(indent + 1));
                    out.push_str(&f.name);
                    out.push_str(": ");
                    f.value.write(out, indent + 1);
                    out.push_str(",\n");
                }
                out.push_str(&pad(indent));
                out.push(')');
            }
            Kind::Map(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    k.write(out, indent);
                    out.push_str(": ");
                    v.write(out, indent);
                }
                out.push('}');
            }
        }
    }
}

#[cfg(test)]
mod print_tests {
    use super::*;

    #[test]
    fn to_ron_round_trips() {
        let src = "Recipe(name: \"a\\\"b\", x: [1, 2.5, -3e-5], o: Some((k: Cls)), t: (1.0, true), n: None, e: ())";
        let n = parse(src, "a").unwrap();
        let again = parse(&n.to_ron(), "b").unwrap();
        assert_eq!(n.to_ron(), again.to_ron());
        assert_eq!(again.get("x").unwrap().to_ron().trim(), "[1, 2.5, -3e-5]");
    }
}
