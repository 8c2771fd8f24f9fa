//! Prefect's string patterns, compiled once and matched many times.
//!
//! Prefect uses three different pattern dialects, and Spur must reproduce each exactly:
//!
//! * **Label values** (`match`, `match_related`): Python's `fnmatch.fnmatchcase` — a shell glob
//!   over the whole string, case-sensitive, where `*` matches any run (including none, and
//!   crossing `.` and `/`), `?` one character, `[seq]`/`[!seq]` a character class — behind an
//!   optional leading `!` that negates the result. A missing label never matches, negated or not.
//!   See [`LabelPattern`].
//! * **The trigger index pre-filter** over event names (`expect ∪ after`): plain `fnmatchcase`,
//!   no `!` handling. See [`Glob`].
//! * **`EventTrigger.covers`**: a regular expression built from `expect ∪ after` where every `*`
//!   becomes `.+` (one or more characters), everything else is literal, and the match is anchored
//!   at the start only. See [`PrefixRegex`].
//!
//! All three are compiled into small token lists; matching never allocates. Compiled patterns
//! are kept small because a large automation set holds hundreds of thousands of them: a
//! literal token is a byte range into the pattern's own text rather than a copy of it, and
//! every list is boxed to its exact length.

use std::fmt;

/// One piece of a compiled shell glob.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    /// A literal run of characters: the byte range `start..end` of the glob's source.
    Literal(u32, u32),
    /// `?`: exactly one character.
    AnyChar,
    /// `*`: any run of characters, possibly empty.
    AnyRun,
    /// `[...]` / `[!...]`: one character in (or not in) the class.
    Class {
        negated: bool,
        items: Box<[ClassItem]>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ClassItem {
    Char(char),
    Range(char, char),
}

/// A shell glob with Python `fnmatch.fnmatchcase` semantics, matched against a whole string.
///
/// Compiling follows `fnmatch.translate`: a `[` without a closing `]` is a literal `[`; a `]`
/// directly after `[` or `[!` is part of the class; there is no escape character.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    /// The text the glob was compiled from. For a [`LabelPattern`] this includes its leading
    /// `!`, so the pattern's text is stored once; the glob itself starts at `body`.
    source: Box<str>,
    /// Byte offset of the glob's first character in `source`.
    body: u32,
    tokens: Box<[Token]>,
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.as_str())
    }
}

impl Glob {
    /// Compiles `pattern`. Every string is a valid glob, so this cannot fail.
    pub fn new(pattern: &str) -> Glob {
        Glob::compile(pattern, 0)
    }

    /// Compiles `source[body..]`, keeping all of `source` (see [`LabelPattern`]).
    fn compile(source: &str, body: usize) -> Glob {
        // Char positions paired with their byte offsets, so literal runs become byte ranges.
        let chars: Vec<(usize, char)> = source
            .char_indices()
            .skip_while(|&(at, _)| at < body)
            .collect();
        let only: Vec<char> = chars.iter().map(|&(_, c)| c).collect();
        let mut tokens: Vec<Token> = Vec::new();
        // The open literal run as a byte range, if any.
        let mut literal: Option<(usize, usize)> = None;
        let mut i = 0;
        let flush = |literal: &mut Option<(usize, usize)>, tokens: &mut Vec<Token>| {
            if let Some((start, end)) = literal.take() {
                tokens.push(Token::Literal(start as u32, end as u32));
            }
        };
        let extend = |literal: &mut Option<(usize, usize)>, (at, c): (usize, char)| {
            let end = at + c.len_utf8();
            *literal = Some(match *literal {
                Some((start, _)) => (start, end),
                None => (at, end),
            });
        };
        while i < chars.len() {
            match chars[i].1 {
                '*' => {
                    flush(&mut literal, &mut tokens);
                    // Consecutive stars are one star.
                    if tokens.last() != Some(&Token::AnyRun) {
                        tokens.push(Token::AnyRun);
                    }
                    i += 1;
                }
                '?' => {
                    flush(&mut literal, &mut tokens);
                    tokens.push(Token::AnyChar);
                    i += 1;
                }
                '[' => match parse_class(&only, i) {
                    Some((token, next)) => {
                        flush(&mut literal, &mut tokens);
                        tokens.push(token);
                        i = next;
                    }
                    None => {
                        extend(&mut literal, chars[i]);
                        i += 1;
                    }
                },
                _ => {
                    extend(&mut literal, chars[i]);
                    i += 1;
                }
            }
        }
        flush(&mut literal, &mut tokens);
        Glob {
            source: source.into(),
            body: body as u32,
            tokens: tokens.into_boxed_slice(),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source[self.body as usize..]
    }

    /// The text of a literal token.
    fn text(&self, start: u32, end: u32) -> &str {
        &self.source[start as usize..end as usize]
    }

    /// True when the pattern has no special characters: it matches only itself.
    pub fn is_literal(&self) -> bool {
        self.tokens.iter().all(|t| matches!(t, Token::Literal(..)))
    }

    /// If the pattern is `prefix*` (one trailing star, nothing else special), the prefix.
    pub fn trailing_star_prefix(&self) -> Option<&str> {
        match &*self.tokens {
            [Token::AnyRun] => Some(""),
            [Token::Literal(start, end), Token::AnyRun] => Some(self.text(*start, *end)),
            _ => None,
        }
    }

    /// The literal text every match must start with (empty when the pattern starts with a
    /// special character).
    pub fn literal_prefix(&self) -> &str {
        match self.tokens.first() {
            Some(Token::Literal(start, end)) => self.text(*start, *end),
            _ => "",
        }
    }

    /// True when the only special character is `*` (no `?` and no classes).
    pub fn only_stars(&self) -> bool {
        self.tokens
            .iter()
            .all(|t| matches!(t, Token::Literal(..) | Token::AnyRun))
    }

    /// Whole-string, case-sensitive match.
    pub fn matches(&self, text: &str) -> bool {
        match_tokens(&self.source, &self.tokens, text)
    }
}

/// Parses a character class starting at `chars[start] == '['`. Returns the token and the index
/// after the closing `]`, or `None` when the class is not closed (then `[` is literal).
fn parse_class(chars: &[char], start: usize) -> Option<(Token, usize)> {
    let mut j = start + 1;
    let mut negated = false;
    if j < chars.len() && chars[j] == '!' {
        negated = true;
        j += 1;
    }
    let body_start = j;
    // A `]` right at the start of the body is a member, not the end.
    if j < chars.len() && chars[j] == ']' {
        j += 1;
    }
    while j < chars.len() && chars[j] != ']' {
        j += 1;
    }
    if j >= chars.len() {
        return None;
    }
    let body = &chars[body_start..j];
    let mut items = Vec::new();
    let mut k = 0;
    while k < body.len() {
        if k + 2 < body.len() && body[k + 1] == '-' {
            let (lo, hi) = (body[k], body[k + 2]);
            // Python drops reversed ranges like `z-a` (they match nothing).
            if lo <= hi {
                items.push(ClassItem::Range(lo, hi));
            }
            k += 3;
        } else {
            items.push(ClassItem::Char(body[k]));
            k += 1;
        }
    }
    Some((
        Token::Class {
            negated,
            items: items.into_boxed_slice(),
        },
        j + 1,
    ))
}

fn class_matches(negated: bool, items: &[ClassItem], c: char) -> bool {
    let hit = items.iter().any(|item| match *item {
        ClassItem::Char(x) => x == c,
        ClassItem::Range(lo, hi) => lo <= c && c <= hi,
    });
    hit != negated
}

/// Iterative glob matching with single-star backtracking (linear in practice, no recursion).
fn match_tokens(source: &str, tokens: &[Token], text: &str) -> bool {
    let mut t = 0; // token index
    let mut pos = 0; // byte offset in text
    // Where to resume after the most recent `*`: (token index after it, text offset it absorbed to).
    let mut backtrack: Option<(usize, usize)> = None;
    loop {
        if t < tokens.len() {
            let step = match &tokens[t] {
                Token::Literal(start, end) => {
                    let lit = &source[*start as usize..*end as usize];
                    text[pos..].starts_with(lit).then_some(lit.len())
                }
                Token::AnyChar => text[pos..].chars().next().map(char::len_utf8),
                Token::Class { negated, items } => text[pos..]
                    .chars()
                    .next()
                    .filter(|&c| class_matches(*negated, items, c))
                    .map(char::len_utf8),
                Token::AnyRun => {
                    backtrack = Some((t + 1, pos));
                    t += 1;
                    continue;
                }
            };
            if let Some(len) = step {
                pos += len;
                t += 1;
                continue;
            }
        } else if pos == text.len() {
            return true;
        }
        // Mismatch: let the last star absorb one more character, or fail.
        match backtrack {
            Some((resume, absorbed)) if absorbed < text.len() => {
                let next = absorbed + text[absorbed..].chars().next().map_or(1, char::len_utf8);
                backtrack = Some((resume, next));
                t = resume;
                pos = next;
            }
            _ => return false,
        }
    }
}

/// A label-value pattern from `match`/`match_related`: an optional leading `!`, then a [`Glob`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelPattern {
    /// Compiled from the text after any `!`, but holding the whole text (`!` included).
    glob: Glob,
}

impl LabelPattern {
    /// Compiles a label-value pattern.
    pub fn new(pattern: &str) -> LabelPattern {
        let body = usize::from(pattern.starts_with('!'));
        LabelPattern {
            glob: Glob::compile(pattern, body),
        }
    }

    /// The pattern as written, `!` included.
    pub fn as_str(&self) -> &str {
        &self.glob.source
    }

    /// True for a `!`-negated pattern.
    pub fn is_negated(&self) -> bool {
        self.glob.body != 0
    }

    /// The glob after any leading `!`.
    pub fn glob(&self) -> &Glob {
        &self.glob
    }

    /// Prefect's server `matches(pattern, value)`: a missing value never matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match value {
            None => false,
            Some(v) => self.glob.matches(v) != self.is_negated(),
        }
    }
}

/// The `covers` check: `re.match` of `^(?:p1|p2|…)` where each `p` is the pattern regex-escaped
/// and every `*` replaced by `.+`. Anchored at the start only, so trailing text is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixRegex {
    /// Each alternative's pattern text, split at its stars when matched (`a*b*` → `a`, `b`,
    /// ``). One string per alternative, not one per part: a trigger set of 100 000 distinct
    /// names keeps 100 000 of these.
    alternatives: Box<[Box<str>]>,
}

impl PrefixRegex {
    /// Builds the alternation; `None` means "`.+`" (any non-empty name), Prefect's rule for an
    /// empty `expect`.
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a str>) -> PrefixRegex {
        PrefixRegex {
            alternatives: patterns.into_iter().map(Box::from).collect(),
        }
    }

    /// The alternation for "any event": a single `.+` (the pattern `*`).
    pub fn any() -> PrefixRegex {
        PrefixRegex::new(["*"])
    }

    /// True if some alternative matches a prefix of `text`.
    pub fn matches(&self, text: &str) -> bool {
        self.alternatives
            .iter()
            .any(|pattern| prefix_match(pattern.split('*'), text))
    }
}

/// `parts[0] .+ parts[1] .+ … parts[n]` matched at the start of `text`, tail free. Taking the
/// earliest occurrence of each part is optimal because nothing is anchored at the end.
fn prefix_match<'p>(mut parts: impl Iterator<Item = &'p str>, text: &str) -> bool {
    let Some(first) = parts.next() else {
        return true;
    };
    if !text.starts_with(first) {
        return false;
    }
    let mut pos = first.len();
    for part in parts {
        // `.+`: at least one character (any char except newline, as Python's `.`).
        let Some(c) = text[pos..].chars().next() else {
            return false;
        };
        if c == '\n' {
            return false;
        }
        let search_from = pos + c.len_utf8();
        match find_without_newline(&text[search_from..], part) {
            Some(offset) => pos = search_from + offset + part.len(),
            None => return false,
        }
    }
    true
}

/// Finds `needle` in `hay` such that the skipped text has no newline (Python's `.` stops there).
fn find_without_newline(hay: &str, needle: &str) -> Option<usize> {
    let limit = hay.find('\n').map_or(hay.len(), |n| n);
    let offset = hay.find(needle)?;
    (offset <= limit).then_some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_basics() {
        let cases = [
            ("*", "", true),
            ("*", "anything.at/all", true),
            ("a*", "a", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbbcd", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[ab]x", "bx", true),
            ("[!ab]x", "bx", false),
            ("[!ab]x", "cx", true),
            ("[a-c]", "b", true),
            ("[]]", "]", true),
            ("[!]]", "]", false),
            ("file[1].csv", "file[1].csv", false),
            ("file[1].csv", "file1.csv", true),
            ("a[", "a[", true),
            ("*.*.*", "a.b.c", true),
            ("*a*a*a*", "aaa", true),
            ("*a*a*a*", "aa", false),
            ("héllo*", "héllo wörld", true),
            ("h?llo", "héllo", true),
            ("h?llo", "hello", true),
            ("Case", "case", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                Glob::new(pattern).matches(text),
                expected,
                "{pattern:?} vs {text:?}"
            );
        }
    }

    #[test]
    fn label_negation_never_matches_missing() {
        let p = LabelPattern::new("!qa");
        assert!(!p.matches(None));
        assert!(p.matches(Some("ops")));
        assert!(!p.matches(Some("qa")));
        assert!(LabelPattern::new("!q*").matches(Some("ops")));
        assert!(!LabelPattern::new("!q*").matches(Some("qa")));
    }

    #[test]
    fn prefix_regex_rules() {
        let r = PrefixRegex::new(["prefect.flow-run.*"]);
        assert!(r.matches("prefect.flow-run.Completed"));
        assert!(!r.matches("prefect.flow-run."));
        // Anchored at the start only.
        let lit = PrefixRegex::new(["deploy"]);
        assert!(lit.matches("deployment"));
        assert!(!lit.matches("a.deploy"));
        // `?` is literal here.
        let q = PrefixRegex::new(["prefect.x.?"]);
        assert!(!q.matches("prefect.x.a"));
        assert!(q.matches("prefect.x.?"));
        assert!(PrefixRegex::any().matches("x"));
        assert!(!PrefixRegex::any().matches(""));
        let mid = PrefixRegex::new(["a*b"]);
        assert!(mid.matches("axb"));
        assert!(!mid.matches("ab"));
        assert!(mid.matches("axxbyy"));
    }

    #[test]
    fn shape_helpers() {
        assert!(Glob::new("a.b").is_literal());
        assert_eq!(Glob::new("a.*").trailing_star_prefix(), Some("a."));
        assert_eq!(Glob::new("a.*.c").trailing_star_prefix(), None);
        assert!(Glob::new("a.*.c").only_stars());
        assert!(!Glob::new("a.?").only_stars());
    }
}
