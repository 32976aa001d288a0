//! The `.dockerignore` matcher: which paths of a build context the build leaves out.
//!
//! The rules are those of Docker's `ignorefile.ReadAll` and `patternmatcher`: `#` comment
//! lines and blank lines are skipped, each pattern is trimmed, cleaned like Go's
//! `filepath.Clean` and loses a leading `/` (so `/a`, `./a` and `a/` all mean `a`); patterns
//! use Go's `filepath.Match` syntax (`*` and `?` never cross a `/`, `[a-z]` and `[^a-z]`
//! classes, `\` escapes) plus `**`, which matches any number of directories, even none; a
//! pattern also excludes everything under a directory it matches; `!pattern` re-includes, and
//! the last pattern that matches a path decides.
//!
//! The Dockerfile and `.dockerignore` are always sent with the context, even when a pattern
//! excludes them, because the builder must read them (the docker CLI adds `!Dockerfile` and
//! `!.dockerignore` exceptions for that). The daemon's classic builder then removes them from
//! the context it copies from when [`Matcher::excluded`] says they are excluded, so that
//! `COPY . .` does not pick them up: read the Dockerfile first, then drop those two paths if
//! excluded.

use thiserror::Error;

/// A `.dockerignore` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DockerignoreError {
    /// A line holding only `!`.
    #[error("illegal exclusion pattern: \"!\" on line {line}")]
    IllegalExclusion {
        /// 1-based line in the file.
        line: usize,
    },
    /// A pattern `filepath.Match` rejects (an unclosed `[`, a bad range, a trailing `\`).
    #[error("syntax error in pattern {pattern:?} on line {line}")]
    BadPattern {
        /// 1-based line in the file.
        line: usize,
        /// The pattern after cleaning.
        pattern: String,
    },
}

/// One element of a compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A character matched as is.
    Literal(char),
    /// `?`: any one character except `/`.
    AnyChar,
    /// `*`: any run of characters without `/`.
    Star,
    /// `**/` or `**` inside a pattern: empty, or anything ending in `/`.
    AnyDirs,
    /// `**` at the end of a pattern: anything at all.
    AnyRest,
    /// `[...]`: one character (never `/`) in or, negated, not in the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// A compiled pattern.
#[derive(Debug, Clone)]
struct Pattern {
    /// The cleaned text (without `!`).
    text: String,
    exception: bool,
    tokens: Vec<Token>,
    /// Docker's shortcut for `**` followed by wildcard-free text: a plain suffix test.
    suffix: Option<String>,
}

/// The compiled `.dockerignore` of a build context.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    patterns: Vec<Pattern>,
}

impl Matcher {
    /// Compiles the text of a `.dockerignore` file.
    pub fn new(text: &str) -> Result<Matcher, DockerignoreError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if raw.starts_with('#') {
                continue;
            }
            let mut pattern = raw.trim();
            if pattern.is_empty() {
                continue;
            }
            let exception = pattern.starts_with('!');
            if exception {
                pattern = pattern[1..].trim();
                if pattern.is_empty() {
                    return Err(DockerignoreError::IllegalExclusion { line });
                }
            }
            let mut cleaned = clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            let tokens = compile(&cleaned).ok_or_else(|| DockerignoreError::BadPattern {
                line,
                pattern: cleaned.clone(),
            })?;
            let suffix = cleaned
                .strip_prefix("**")
                .filter(|rest| !rest.is_empty() && !rest.contains(['*', '?', '[', ']', '\\']))
                .map(str::to_string);
            patterns.push(Pattern {
                text: cleaned,
                exception,
                tokens,
                suffix,
            });
        }
        Ok(Matcher { patterns })
    }

    /// Whether the file has no patterns at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether any pattern is an exception (`!`).
    pub fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exception)
    }

    /// Whether `path` (relative to the context root, `/`-separated) is left out of the build
    /// context: a pattern matching the path or one of its parent directories excludes it, and
    /// the last pattern that matches decides (Docker's `MatchesOrParentMatches`).
    pub fn excluded(&self, path: &str) -> bool {
        let path = clean(path);
        let path = path.trim_start_matches('/');
        let parents: Vec<&str> = match path.rfind('/') {
            Some(i) => path[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut excluded = false;
        for pattern in &self.patterns {
            // An exclusion cannot change an excluded path, nor an exception an included one.
            if pattern.exception != excluded {
                continue;
            }
            let mut matched = pattern.matches(path);
            if !matched {
                let mut prefix_end = 0;
                for dir in &parents {
                    prefix_end += dir.len();
                    if pattern.matches(&path[..prefix_end]) {
                        matched = true;
                        break;
                    }
                    prefix_end += 1;
                }
            }
            if matched {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// Whether a walk must still descend into the excluded directory `dir` because an
    /// exception might re-include something inside it. `false` lets the walker skip the whole
    /// directory. Conservative: wildcards in an exception count as possible matches.
    pub fn may_contain_exceptions(&self, dir: &str) -> bool {
        let dir = clean(dir);
        let dir = dir.trim_start_matches('/');
        let dir_parts: Vec<&str> = if dir.is_empty() || dir == "." {
            Vec::new()
        } else {
            dir.split('/').collect()
        };
        self.patterns
            .iter()
            .filter(|p| p.exception)
            .any(|p| exception_may_reach(&p.text, &dir_parts))
    }
}

/// Whether an exception pattern could match a path below the directory `dir_parts`: each of
/// the directory's components must match the pattern's component at the same depth until the
/// pattern reaches a `**`.
fn exception_may_reach(pattern: &str, dir_parts: &[&str]) -> bool {
    let pattern_parts: Vec<&str> = pattern.split('/').collect();
    for (i, dir_part) in dir_parts.iter().enumerate() {
        let Some(pattern_part) = pattern_parts.get(i) else {
            // The exception names a parent of `dir`; it re-includes everything below.
            return true;
        };
        if pattern_part.contains("**") {
            return true;
        }
        let matches = compile(pattern_part).is_some_and(|tokens| match_tokens(&tokens, dir_part));
        if !matches {
            return false;
        }
    }
    true
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        if let Some(suffix) = &self.suffix {
            return path.ends_with(suffix.as_str())
                || suffix.strip_prefix('/').is_some_and(|s| s == path);
        }
        match_tokens(&self.tokens, path)
    }
}

/// Go's `filepath.Clean` for `/`-separated paths: collapses `//`, drops `.`, resolves `..`
/// lexically, removes a trailing `/`; the empty path becomes `.`.
pub fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// Compiles a cleaned pattern; `None` when `filepath.Match` would call it malformed.
fn compile(pattern: &str) -> Option<Vec<Token>> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i == chars.len() {
                    tokens.push(Token::AnyRest);
                } else {
                    tokens.push(Token::AnyDirs);
                }
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::AnyChar),
            '\\' => {
                let escaped = *chars.get(i)?;
                i += 1;
                tokens.push(Token::Literal(escaped));
            }
            '[' => {
                let (token, next) = compile_class(&chars, i)?;
                tokens.push(token);
                i = next;
            }
            ']' => return None,
            other => tokens.push(Token::Literal(other)),
        }
    }
    Some(tokens)
}

/// Compiles the class starting after its `[` at `start`; returns it and the index after `]`.
fn compile_class(chars: &[char], start: usize) -> Option<(Token, usize)> {
    let mut i = start;
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        if chars.get(i) == Some(&']') && !ranges.is_empty() {
            return Some((Token::Class { negated, ranges }, i + 1));
        }
        let (lo, next) = class_char(chars, i)?;
        i = next;
        let hi = if chars.get(i) == Some(&'-') {
            let (hi, next) = class_char(chars, i + 1)?;
            i = next;
            hi
        } else {
            lo
        };
        if lo > hi {
            return None;
        }
        ranges.push((lo, hi));
    }
}

/// One character inside a class, `\` escapes allowed; `-` and `]` must be escaped.
fn class_char(chars: &[char], i: usize) -> Option<(char, usize)> {
    match *chars.get(i)? {
        '-' | ']' => None,
        '\\' => Some((*chars.get(i + 1)?, i + 2)),
        c => Some((c, i + 1)),
    }
}

/// Whether the whole of `text` matches `tokens`, by dynamic programming over (token, char)
/// positions so no pattern can make it exponential.
fn match_tokens(tokens: &[Token], text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    let width = n + 1;
    // at[t * width + p]: tokens[t..] match chars[p..].
    let mut at = vec![false; (tokens.len() + 1) * width];
    // inside[t * width + p]: tokens[t] is AnyDirs partway through, and chars[p..] can finish
    // it with a `/` and then match tokens[t + 1..].
    let mut inside = vec![false; (tokens.len() + 1) * width];
    at[tokens.len() * width + n] = true;
    for t in (0..tokens.len()).rev() {
        for p in (0..=n).rev() {
            let next_char = chars.get(p).copied();
            let here = t * width + p;
            let after = (t + 1) * width + p;
            at[here] = match &tokens[t] {
                Token::Literal(c) => next_char == Some(*c) && at[after + 1],
                Token::AnyChar => next_char.is_some_and(|c| c != '/') && at[after + 1],
                Token::Class { negated, ranges } => {
                    next_char.is_some_and(|c| {
                        c != '/' && ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
                    }) && at[after + 1]
                }
                Token::Star => at[after] || (next_char.is_some_and(|c| c != '/') && at[here + 1]),
                Token::AnyRest => true,
                Token::AnyDirs => {
                    inside[here] = match next_char {
                        None => false,
                        Some('/') => at[after + 1] || inside[here + 1],
                        Some(_) => inside[here + 1],
                    };
                    at[after] || inside[here]
                }
            };
        }
    }
    at[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(text: &str) -> Matcher {
        Matcher::new(text).expect("valid .dockerignore")
    }

    #[test]
    fn excluded_plain_name_matches_only_at_root() {
        let m = matcher("node_modules");
        assert!(m.excluded("node_modules"));
        assert!(m.excluded("node_modules/x/y.js"));
        assert!(!m.excluded("src/node_modules"));
    }

    #[test]
    fn new_skips_comments_and_blank_lines() {
        let m = matcher("# comment\n\n   \n  a  \n");
        assert!(m.excluded("a"));
        assert!(!m.excluded("# comment"));
    }

    #[test]
    fn new_strips_leading_slash_and_dot_slash_and_trailing_slash() {
        let m = matcher("/a\n./b\nc/\n");
        assert!(m.excluded("a"));
        assert!(m.excluded("b/file"));
        assert!(m.excluded("c"));
    }

    #[test]
    fn new_cleans_patterns_like_go() {
        let m = matcher("a//b/./c/../d");
        assert!(m.excluded("a/b/d"));
        assert!(!m.excluded("a/b/c/d"));
    }

    #[test]
    fn clean_follows_go_filepath_clean() {
        assert_eq!(clean(""), ".");
        assert_eq!(clean("./"), ".");
        assert_eq!(clean("a/../.."), "..");
        assert_eq!(clean("/../a/"), "/a");
        assert_eq!(clean("a/./b//c/"), "a/b/c");
        assert_eq!(clean("/"), "/");
    }

    #[test]
    fn excluded_star_does_not_cross_slash() {
        let m = matcher("*.md");
        assert!(m.excluded("README.md"));
        assert!(!m.excluded("docs/guide.md"));
    }

    #[test]
    fn excluded_star_in_directory_component() {
        let m = matcher("*/temp*");
        assert!(m.excluded("somedir/temporary.txt"));
        assert!(m.excluded("somedir/temp"));
        assert!(!m.excluded("a/b/temp"));
    }

    #[test]
    fn excluded_question_mark_matches_one_non_slash_char() {
        let m = matcher("temp?");
        assert!(m.excluded("tempa"));
        assert!(!m.excluded("temp"));
        assert!(!m.excluded("tempab"));
    }

    #[test]
    fn excluded_double_star_matches_any_depth() {
        let m = matcher("**/*.go");
        assert!(m.excluded("main.go"));
        assert!(m.excluded("a/b/c/main.go"));
        assert!(!m.excluded("main.gox"));
    }

    #[test]
    fn excluded_double_star_in_middle_matches_zero_or_more_dirs() {
        let m = matcher("a/**/z");
        assert!(m.excluded("a/z"));
        assert!(m.excluded("a/b/c/z"));
        assert!(!m.excluded("a/bz"));
    }

    #[test]
    fn excluded_trailing_double_star_matches_contents_only() {
        let m = matcher("build/**");
        assert!(m.excluded("build/out"));
        assert!(!m.excluded("build"));
    }

    #[test]
    fn excluded_leading_double_star_literal_is_suffix_test() {
        let m = matcher("**/secret.txt");
        assert!(m.excluded("secret.txt"));
        assert!(m.excluded("x/y/secret.txt"));
        assert!(!m.excluded("x/notsecret.txt"));
    }

    #[test]
    fn excluded_double_star_alone_matches_everything() {
        let m = matcher("**");
        assert!(m.excluded("a"));
        assert!(m.excluded("a/b/c"));
    }

    #[test]
    fn excluded_character_classes_and_negation() {
        let m = matcher("file[0-9].txt\nlog[^a-c]");
        assert!(m.excluded("file7.txt"));
        assert!(!m.excluded("filex.txt"));
        assert!(m.excluded("logz"));
        assert!(!m.excluded("logb"));
    }

    #[test]
    fn excluded_backslash_escapes_wildcard() {
        let m = matcher("a\\*b");
        assert!(m.excluded("a*b"));
        assert!(!m.excluded("axb"));
    }

    #[test]
    fn excluded_exception_reincludes_and_last_match_wins() {
        let m = matcher("*.md\n!README.md\nREADME*");
        assert!(m.excluded("CHANGES.md"));
        assert!(m.excluded("README.md"));
        let m = matcher("*.md\n!README.md");
        assert!(!m.excluded("README.md"));
    }

    #[test]
    fn excluded_exception_inside_excluded_directory() {
        let m = matcher("vendor\n!vendor/keep/**");
        assert!(m.excluded("vendor/drop/x"));
        assert!(!m.excluded("vendor/keep/x"));
    }

    #[test]
    fn excluded_exception_with_leading_whitespace_after_bang() {
        let m = matcher("*\n!  src");
        assert!(!m.excluded("src/main.rs"));
        assert!(m.excluded("target"));
    }

    #[test]
    fn excluded_accepts_unclean_paths() {
        let m = matcher("a/b");
        assert!(m.excluded("./a/b/"));
        assert!(m.excluded("/a//b/c"));
    }

    #[test]
    fn excluded_empty_matcher_excludes_nothing() {
        let m = matcher("");
        assert!(m.is_empty());
        assert!(!m.excluded("anything"));
    }

    #[test]
    fn excluded_dockerfile_is_reported_so_caller_can_keep_it() {
        let m = matcher("Dockerfile\n.dockerignore");
        assert!(m.excluded("Dockerfile"));
        assert!(m.excluded(".dockerignore"));
    }

    #[test]
    fn may_contain_exceptions_false_without_exceptions() {
        let m = matcher("vendor");
        assert!(!m.has_exceptions());
        assert!(!m.may_contain_exceptions("vendor"));
    }

    #[test]
    fn may_contain_exceptions_follows_exception_prefix() {
        let m = matcher("vendor\n!vendor/keep/file");
        assert!(m.may_contain_exceptions("vendor"));
        assert!(m.may_contain_exceptions("vendor/keep"));
        assert!(!m.may_contain_exceptions("vendor/drop"));
    }

    #[test]
    fn may_contain_exceptions_double_star_reaches_everywhere() {
        let m = matcher("*\n!**/*.rs");
        assert!(m.may_contain_exceptions("deep/down"));
    }

    #[test]
    fn may_contain_exceptions_wildcard_component_matches_dir() {
        let m = matcher("*\n!src*/lib/x");
        assert!(m.may_contain_exceptions("src2/lib"));
        assert!(!m.may_contain_exceptions("docs"));
    }

    #[test]
    fn new_lone_bang_is_an_error() {
        assert_eq!(
            Matcher::new("a\n!\n").unwrap_err(),
            DockerignoreError::IllegalExclusion { line: 2 }
        );
    }

    #[test]
    fn new_malformed_patterns_are_errors() {
        for bad in ["[abc", "a[]b", "[z-a]", "a\\", "x]", "[-]"] {
            assert!(
                matches!(
                    Matcher::new(bad),
                    Err(DockerignoreError::BadPattern { line: 1, .. })
                ),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn excluded_odd_input_never_panics() {
        let m = matcher("**/**/**/**/**/**/*a*b*c*d*e*\n![^/]\n?é*");
        let long = "a/".repeat(2_000) + "x";
        for path in ["", ".", "/", "..", "é/ü", long.as_str()] {
            let _ = m.excluded(path);
            let _ = m.may_contain_exceptions(path);
        }
    }
}
