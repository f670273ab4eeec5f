//! The s-expression subset of protocol v1 (docs/protocol.md): the data type, a reader and a
//! printer. Hand-written because general Lisp-data crates misread Common Lisp floats
//! (`1.5d0`) and print escapes (`\n`) that the CL reader turns into plain letters.

use std::fmt::{self, Write as _};

/// One datum of the wire syntax.
#[derive(Debug, Clone, PartialEq)]
pub enum Sexp {
    /// `nil` / `()`: the empty list, also false.
    Nil,
    /// `t`
    T,
    /// A keyword, stored lowercase without the colon.
    Keyword(String),
    Str(String),
    Int(i64),
    Float(f64),
    List(Vec<Sexp>),
}

/// Why a payload is not a valid datum.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("malformed s-expression at byte {offset}: {reason}")]
pub struct ParseError {
    pub offset: usize,
    pub reason: String,
}

/// Nesting deeper than this is refused, so a hostile payload cannot exhaust the stack.
const MAX_DEPTH: usize = 256;

impl Sexp {
    pub fn keyword(name: &str) -> Sexp {
        Sexp::Keyword(name.to_ascii_lowercase())
    }

    pub fn string(s: impl Into<String>) -> Sexp {
        Sexp::Str(s.into())
    }

    pub fn as_keyword(&self) -> Option<&str> {
        match self {
            Sexp::Keyword(k) => Some(k),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Sexp::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Sexp::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of a list; `nil` is the empty list.
    pub fn as_list(&self) -> Option<&[Sexp]> {
        match self {
            Sexp::List(items) => Some(items),
            Sexp::Nil => Some(&[]),
            _ => None,
        }
    }

    /// True for a list of alternating keywords and values (`nil` included).
    pub fn is_plist(&self) -> bool {
        self.as_list().is_some_and(|items| {
            items.len() % 2 == 0 && items.iter().step_by(2).all(|k| k.as_keyword().is_some())
        })
    }

    /// The value under `key` in a plist.
    pub fn get(&self, key: &str) -> Option<&Sexp> {
        let items = self.as_list()?;
        items
            .chunks(2)
            .find(|pair| pair.len() == 2 && pair[0].as_keyword() == Some(key))
            .map(|pair| &pair[1])
    }

    /// Build a plist from keyword names and values.
    pub fn plist<I, K>(pairs: I) -> Sexp
    where
        I: IntoIterator<Item = (K, Sexp)>,
        K: AsRef<str>,
    {
        let mut items = Vec::new();
        for (k, v) in pairs {
            items.push(Sexp::keyword(k.as_ref()));
            items.push(v);
        }
        if items.is_empty() {
            Sexp::Nil
        } else {
            Sexp::List(items)
        }
    }

    /// Parse exactly one datum (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<Sexp, ParseError> {
        let mut reader = Reader {
            src: text.as_bytes(),
            text,
            pos: 0,
        };
        let value = reader.datum(0)?;
        reader.skip_ws();
        if reader.pos != reader.src.len() {
            return Err(reader.error("trailing data after the datum"));
        }
        Ok(value)
    }
}

struct Reader<'a> {
    src: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl Reader<'_> {
    fn error(&self, reason: impl Into<String>) -> ParseError {
        ParseError {
            offset: self.pos,
            reason: reason.into(),
        }
    }

    fn skip_ws(&mut self) {
        while self
            .src
            .get(self.pos)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.pos += 1;
        }
    }

    fn datum(&mut self, depth: usize) -> Result<Sexp, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nesting too deep"));
        }
        self.skip_ws();
        match self.src.get(self.pos) {
            None => Err(self.error("unexpected end of input")),
            Some(b'(') => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_ws();
                    match self.src.get(self.pos) {
                        None => return Err(self.error("unterminated list")),
                        Some(b')') => {
                            self.pos += 1;
                            return Ok(if items.is_empty() {
                                Sexp::Nil
                            } else {
                                Sexp::List(items)
                            });
                        }
                        Some(_) => items.push(self.datum(depth + 1)?),
                    }
                }
            }
            Some(b')') => Err(self.error("unexpected ')'")),
            Some(b'"') => self.string(),
            Some(_) => self.atom(),
        }
    }

    fn string(&mut self) -> Result<Sexp, ParseError> {
        self.pos += 1;
        let mut out = String::new();
        let mut run_start = self.pos;
        loop {
            match self.src.get(self.pos) {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    out.push_str(&self.text[run_start..self.pos]);
                    self.pos += 1;
                    return Ok(Sexp::Str(out));
                }
                Some(b'\\') => {
                    out.push_str(&self.text[run_start..self.pos]);
                    // CL reads `\x` as `x` for any character; keep that rule for robustness.
                    self.pos += 1;
                    let ch = self.text[self.pos..]
                        .chars()
                        .next()
                        .ok_or_else(|| self.error("unterminated string"))?;
                    out.push(ch);
                    self.pos += ch.len_utf8();
                    run_start = self.pos;
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn atom(&mut self) -> Result<Sexp, ParseError> {
        let start = self.pos;
        while let Some(&b) = self.src.get(self.pos) {
            if b.is_ascii_whitespace() || b == b'(' || b == b')' || b == b'"' {
                break;
            }
            self.pos += 1;
        }
        let token = &self.text[start..self.pos];
        if let Some(name) = token.strip_prefix(':') {
            if name.is_empty() || !name.bytes().all(is_symbol_byte) {
                return Err(ParseError {
                    offset: start,
                    reason: format!("invalid keyword {token:?}"),
                });
            }
            return Ok(Sexp::Keyword(name.to_ascii_lowercase()));
        }
        if token.eq_ignore_ascii_case("nil") {
            return Ok(Sexp::Nil);
        }
        if token.eq_ignore_ascii_case("t") {
            return Ok(Sexp::T);
        }
        parse_number(token).ok_or_else(|| ParseError {
            offset: start,
            reason: format!(
                "unsupported token {token:?} (only keywords, strings, numbers, t, nil)"
            ),
        })
    }
}

fn is_symbol_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_*+/%.<>=!?&$".contains(&b)
}

/// Integers, Common Lisp floats with any exponent marker, and ratios (as floats).
fn parse_number(token: &str) -> Option<Sexp> {
    let digits = token.strip_prefix(['+', '-']).unwrap_or(token);
    if digits.is_empty() {
        return None;
    }
    if digits.bytes().all(|b| b.is_ascii_digit()) {
        return Some(match token.parse::<i64>() {
            Ok(i) => Sexp::Int(i),
            // Beyond i64 (bignums): keep the magnitude rather than refuse the message.
            Err(_) => Sexp::Float(token.parse::<f64>().ok()?),
        });
    }
    if let Some((num, den)) = token.split_once('/') {
        let (n, d) = (num.parse::<i64>().ok()?, den.parse::<u64>().ok()?);
        return (d != 0).then(|| Sexp::Float(n as f64 / d as f64));
    }
    if !digits.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let normalized: String = token
        .chars()
        .map(|c| match c {
            'd' | 'D' | 'f' | 'F' | 's' | 'S' | 'l' | 'L' => 'e',
            other => other,
        })
        .collect();
    let valid = normalized
        .bytes()
        .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
    if !valid {
        return None;
    }
    normalized.parse::<f64>().ok().map(Sexp::Float)
}

impl fmt::Display for Sexp {
    /// Prints the wire form: keywords lowercase, strings with only `\"` and `\\` escaped,
    /// floats always with a decimal point or exponent so they read back as floats.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sexp::Nil => f.write_str("nil"),
            Sexp::T => f.write_str("t"),
            Sexp::Keyword(k) => write!(f, ":{k}"),
            Sexp::Str(s) => {
                f.write_char('"')?;
                for ch in s.chars() {
                    if ch == '"' || ch == '\\' {
                        f.write_char('\\')?;
                    }
                    f.write_char(ch)?;
                }
                f.write_char('"')
            }
            Sexp::Int(i) => write!(f, "{i}"),
            Sexp::Float(x) if x.is_finite() => {
                // `{:?}` always keeps a '.' or an exponent; `d0` makes the CL reader use doubles.
                let text = format!("{x:?}");
                match text.split_once('e') {
                    Some((mantissa, exp)) => write!(f, "{mantissa}d{exp}"),
                    None => write!(f, "{text}d0"),
                }
            }
            // The protocol has no infinities or NaN; nil is the honest "no value".
            Sexp::Float(_) => f.write_str("nil"),
            Sexp::List(items) => {
                f.write_char('(')?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_char(' ')?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_char(')')
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_common_lisp_numbers() {
        assert_eq!(Sexp::parse("1.5d0").unwrap(), Sexp::Float(1.5));
        assert_eq!(Sexp::parse("1e-3").unwrap(), Sexp::Float(0.001));
        assert_eq!(Sexp::parse("2.5f0").unwrap(), Sexp::Float(2.5));
        assert_eq!(Sexp::parse("1.0d-4").unwrap(), Sexp::Float(0.0001));
        assert_eq!(Sexp::parse("-42").unwrap(), Sexp::Int(-42));
        assert_eq!(Sexp::parse("1/2").unwrap(), Sexp::Float(0.5));
        assert_eq!(
            Sexp::parse("123456789012345678901234").unwrap(),
            Sexp::Float(1.2345678901234568e23)
        );
    }

    #[test]
    fn reads_strings_with_literal_newlines_and_escapes() {
        let s = Sexp::parse("\"a\nb \\\"q\\\" \\\\ é\"").unwrap();
        assert_eq!(s, Sexp::Str("a\nb \"q\" \\ é".into()));
        // Printing keeps the newline literal: the CL reader would turn "\n" into "n".
        assert_eq!(s.to_string(), "\"a\nb \\\"q\\\" \\\\ é\"");
    }

    #[test]
    fn reads_nested_plists_case_insensitively() {
        let s = Sexp::parse("(:RETURN 7 (:OK (:HEAP-USED 10 :GENERATIONS NIL :X T)))").unwrap();
        let value = &s.as_list().unwrap()[2];
        let ok = value.get("ok").unwrap();
        assert!(ok.is_plist());
        assert_eq!(ok.get("heap-used"), Some(&Sexp::Int(10)));
        assert_eq!(ok.get("generations"), Some(&Sexp::Nil));
        assert_eq!(ok.get("x"), Some(&Sexp::T));
        assert_eq!(Sexp::parse("()").unwrap(), Sexp::Nil);
    }

    #[test]
    fn round_trips_through_print() {
        let original = Sexp::List(vec![
            Sexp::keyword("call"),
            Sexp::Int(3),
            Sexp::keyword("backtrace"),
            Sexp::plist([
                ("tid", Sexp::Int(99)),
                ("ratio", Sexp::Float(0.25)),
                ("big", Sexp::Float(1e300)),
                ("tiny", Sexp::Float(1e-7)),
            ]),
        ]);
        let printed = original.to_string();
        assert_eq!(Sexp::parse(&printed).unwrap(), original);
        assert!(printed.contains("0.25d0"), "{printed}");
    }

    #[test]
    fn refuses_what_the_protocol_excludes() {
        for bad in [
            "foo",
            "(1 . 2)",
            "#.(run)",
            "'x",
            "(:a",
            "\"open",
            ")",
            ":",
            "(:a) extra",
            "",
            "1.2.3x",
        ] {
            assert!(Sexp::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let deep = "(".repeat(MAX_DEPTH + 2) + &")".repeat(MAX_DEPTH + 2);
        assert!(Sexp::parse(&deep).is_err());
    }
}
