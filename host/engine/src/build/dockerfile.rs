//! The Dockerfile parser and Docker's shell-like variable expansion.
//!
//! [`parse`] follows the rules of Docker's Dockerfile frontend (moby buildkit's
//! `frontend/dockerfile/parser` and `instructions` packages): parser directives at the top of the
//! file, `#` comments, line continuations with the escape character (comment lines and empty
//! lines may sit inside a continuation), case-insensitive instruction names, `--flag=value`
//! options, JSON (exec) form with a fallback to shell form when the JSON is invalid, and stages.
//!
//! Values are kept as written, quotes included: Docker expands variables when it dispatches an
//! instruction, with the environment of the stage at that point, so the builder calls
//! [`expand`] on each word (ENV and LABEL keys and values, ARG defaults, WORKDIR, USER, COPY and
//! ADD sources, destination and `--chown`/`--chmod`/`--from`, EXPOSE, VOLUME, STOPSIGNAL, FROM
//! image and `--platform`). Shell-form RUN, CMD and ENTRYPOINT are never expanded by the
//! builder: the shell in the container does that.

use std::time::Duration;

use thiserror::Error;

/// The default escape character; `# escape=`` ` switches it to a backtick.
pub const DEFAULT_ESCAPE: char = '\\';

/// How deeply `${a:-${b:-...}}` may nest before expansion gives up (bounds the recursion on
/// untrusted input).
const MAX_EXPANSION_DEPTH: usize = 64;

/// A Dockerfile that failed to parse, with the line the problem starts on (1-based).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("dockerfile parse error on line {line}: {message}")]
pub struct ParseError {
    /// 1-based line of the instruction (its first physical line) or directive at fault.
    pub line: usize,
    /// What is wrong, in Docker's words where Docker has them.
    pub message: String,
}

impl ParseError {
    fn new(line: usize, message: impl Into<String>) -> Self {
        ParseError {
            line,
            message: message.into(),
        }
    }
}

/// A word that [`expand`] could not expand; the messages are Docker's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExpandError {
    /// `${` without its closing brace.
    #[error("syntax error: missing '}}'")]
    MissingBrace,
    /// `${}`, `${:...}` and the like.
    #[error("syntax error: bad substitution")]
    BadSubstitution,
    /// A modifier other than `-`, `+`, `?` (with or without `:`).
    #[error("unsupported modifier ({0}) in substitution")]
    UnsupportedModifier(String),
    /// A `'` without its closing quote.
    #[error("unexpected end of statement while looking for matching single-quote")]
    UnterminatedSingleQuote,
    /// A `"` without its closing quote.
    #[error("unexpected end of statement while looking for matching double-quote")]
    UnterminatedDoubleQuote,
    /// `${VAR?message}` or `${VAR:?message}` with the variable unset (or empty).
    #[error("{name}: {message}")]
    Required {
        /// The variable.
        name: String,
        /// The word after `?`, or Docker's default text.
        message: String,
    },
    /// Substitutions nested deeper than the parser allows.
    #[error("variable substitutions nested too deeply")]
    TooDeep,
}

/// A parsed Dockerfile: its directives, the ARGs before the first FROM, and its stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The escape character in effect (`\` or `` ` ``), needed again by [`expand`].
    pub escape: char,
    /// The `# syntax=` directive, recorded but not acted upon.
    pub syntax: Option<String>,
    /// ARG instructions before the first FROM: usable in FROM lines only, unless a stage
    /// declares them again.
    pub global_args: Vec<ArgSpec>,
    /// The build stages in file order; never empty.
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    /// The index of the stage `name_or_index` names: a stage name (case-insensitive, as Docker
    /// lowercases them) first, then a decimal stage index. `None` means it names no stage, so
    /// `COPY --from` treats it as an image reference and `--target` fails.
    pub fn stage_index(&self, name_or_index: &str) -> Option<usize> {
        let wanted = name_or_index.to_ascii_lowercase();
        if let Some(i) = self
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(wanted.as_str()))
        {
            return Some(i);
        }
        match name_or_index.parse::<usize>() {
            Ok(i) if i < self.stages.len() => Some(i),
            _ => None,
        }
    }

    /// The stage `name_or_index` names, as [`Dockerfile::stage_index`] resolves it.
    pub fn stage(&self, name_or_index: &str) -> Option<&Stage> {
        self.stage_index(name_or_index).map(|i| &self.stages[i])
    }
}

/// One build stage: a FROM and the instructions up to the next FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The `AS` name, lowercased; `None` for an unnamed stage.
    pub name: Option<String>,
    /// The base image as written (still to be expanded with the global ARGs).
    pub base: String,
    /// The `--platform` flag as written.
    pub platform: Option<String>,
    /// Line of the FROM instruction.
    pub line: usize,
    /// The instructions after FROM, in order.
    pub steps: Vec<Step>,
}

/// One instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// First physical line (1-based).
    pub line: usize,
    /// Last physical line, after continuations.
    pub end_line: usize,
    /// The logical line with continuations joined, as the image history shows it.
    pub original: String,
    /// The typed instruction.
    pub instruction: Instruction,
}

/// A command in exec (JSON array) form or shell form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellOrExec {
    /// `["executable", "arg"]`: run as is, no shell, no expansion.
    Exec(Vec<String>),
    /// Anything else: handed to the stage's SHELL (`/bin/sh -c` by default).
    Shell(String),
}

/// One name of an ARG instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgSpec {
    /// The variable name.
    pub name: String,
    /// The default value as written (quotes kept), if any.
    pub default: Option<String>,
}

/// The options of `HEALTHCHECK CMD`; `None` means the flag was not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthOptions {
    /// `--interval`; zero means inherit.
    pub interval: Option<Duration>,
    /// `--timeout`; zero means inherit.
    pub timeout: Option<Duration>,
    /// `--start-period`; zero means inherit.
    pub start_period: Option<Duration>,
    /// `--start-interval`; zero means inherit.
    pub start_interval: Option<Duration>,
    /// `--retries`.
    pub retries: Option<u32>,
}

/// A HEALTHCHECK instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable any check inherited from the base image.
    None,
    /// `HEALTHCHECK [options] CMD command`: the image config's test is `["CMD", ...]` for exec
    /// form and `["CMD-SHELL", command]` for shell form.
    Cmd {
        /// The command.
        command: ShellOrExec,
        /// The timing flags.
        options: HealthOptions,
    },
}

/// A Dockerfile instruction with its arguments as written (see the module doc on expansion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `FROM [--platform=p] image [AS name]`.
    From {
        /// The image reference (or earlier stage name).
        image: String,
        /// The stage name, lowercased.
        name: Option<String>,
        /// `--platform`.
        platform: Option<String>,
    },
    /// `RUN`.
    Run {
        /// What to run.
        command: ShellOrExec,
    },
    /// `CMD`.
    Cmd(ShellOrExec),
    /// `ENTRYPOINT`.
    Entrypoint(ShellOrExec),
    /// `COPY [--from] [--chown] [--chmod] [--link] src... dest`.
    Copy {
        /// Sources, relative to the context (or the `from` stage/image root).
        sources: Vec<String>,
        /// The destination in the image.
        dest: String,
        /// `--from`: a stage name, stage index or image.
        from: Option<String>,
        /// `--chown=user[:group]`.
        chown: Option<String>,
        /// `--chmod=mode`.
        chmod: Option<String>,
        /// `--link` (accepted; the classic builder copies the same way either way).
        link: bool,
    },
    /// `ADD [--chown] [--chmod] [--link] src... dest`.
    Add {
        /// Sources: context paths or URLs.
        sources: Vec<String>,
        /// The destination in the image.
        dest: String,
        /// `--chown=user[:group]`.
        chown: Option<String>,
        /// `--chmod=mode`.
        chmod: Option<String>,
        /// `--link`.
        link: bool,
    },
    /// `ENV k=v ...` or legacy `ENV k v`.
    Env(Vec<(String, String)>),
    /// `ARG name[=default] ...`.
    Arg(Vec<ArgSpec>),
    /// `WORKDIR path`.
    Workdir(String),
    /// `USER user[:group]`.
    User(String),
    /// `EXPOSE port[/proto] ...`.
    Expose(Vec<String>),
    /// `LABEL k=v ...` (or legacy `LABEL k v`).
    Label(Vec<(String, String)>),
    /// `VOLUME ["/a"]` or `VOLUME /a /b`.
    Volume(Vec<String>),
    /// `STOPSIGNAL signal`.
    StopSignal(String),
    /// `HEALTHCHECK`.
    Healthcheck(Healthcheck),
    /// `SHELL ["executable", "arg"]` (JSON form only).
    Shell(Vec<String>),
    /// `ONBUILD instruction`: stored in the image config as `expression` and run by builds
    /// that use this image as their base.
    Onbuild {
        /// The trigger as written after ONBUILD, which is what the image config records.
        expression: String,
        /// The trigger, parsed (never FROM, MAINTAINER or ONBUILD).
        instruction: Box<Instruction>,
    },
    /// `MAINTAINER name` (deprecated; sets the image's author).
    Maintainer(String),
}

/// Parses a Dockerfile.
///
/// Instructions before the first FROM may only be ARG; an empty file, or one whose first
/// instruction is not FROM or ARG, is an error.
pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let directives = parse_directives(&lines)?;
    let logical = join_lines(&lines, directives.escape);

    let mut global_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for entry in logical {
        let instruction = parse_instruction(&entry.text, directives.escape, entry.line)?;
        match instruction {
            Instruction::From {
                image,
                name,
                platform,
            } => stages.push(Stage {
                name,
                base: image,
                platform,
                line: entry.line,
                steps: Vec::new(),
            }),
            Instruction::Arg(args) if stages.is_empty() => global_args.extend(args),
            instruction => {
                let Some(stage) = stages.last_mut() else {
                    return Err(ParseError::new(
                        entry.line,
                        "no build stage in current context",
                    ));
                };
                stage.steps.push(Step {
                    line: entry.line,
                    end_line: entry.end_line,
                    original: entry.text,
                    instruction,
                });
            }
        }
    }
    if stages.is_empty() {
        let message = if global_args.is_empty() {
            "the Dockerfile has no instructions"
        } else {
            "no build stage in current context"
        };
        return Err(ParseError::new(lines.len().max(1), message));
    }
    Ok(Dockerfile {
        escape: directives.escape,
        syntax: directives.syntax,
        global_args,
        stages,
    })
}

/// The parser directives found at the top of the file.
struct Directives {
    escape: char,
    syntax: Option<String>,
}

/// Reads `# key=value` lines from the top of the file until the first line that is not a
/// known directive (an unknown directive, a plain comment, a blank line or an instruction).
fn parse_directives(lines: &[&str]) -> Result<Directives, ParseError> {
    let mut directives = Directives {
        escape: DEFAULT_ESCAPE,
        syntax: None,
    };
    let mut seen: Vec<String> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some((key, value)) = split_directive(line) else {
            break;
        };
        if !matches!(key.as_str(), "escape" | "syntax" | "check") {
            break;
        }
        if seen.contains(&key) {
            return Err(ParseError::new(
                i + 1,
                format!("only one {key} parser directive can be used"),
            ));
        }
        match key.as_str() {
            "escape" => {
                directives.escape = match value {
                    "\\" => '\\',
                    "`" => '`',
                    other => {
                        return Err(ParseError::new(
                            i + 1,
                            format!("invalid escape token '{other}' does not match ` or \\"),
                        ))
                    }
                }
            }
            "syntax" => directives.syntax = Some(value.to_string()),
            _ => {}
        }
        seen.push(key);
    }
    Ok(directives)
}

/// Matches `^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$` after leading whitespace; the key is
/// lowercased (directives are case-insensitive).
fn split_directive(line: &str) -> Option<(String, &str)> {
    let rest = line.trim_start().strip_prefix('#')?.trim_start();
    let key_len = rest
        .char_indices()
        .find(|&(_, c)| !c.is_ascii_alphanumeric())
        .map_or(rest.len(), |(i, _)| i);
    let key = &rest[..key_len];
    if !key.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let value = rest[key_len..].trim_start().strip_prefix('=')?.trim();
    if value.is_empty() {
        return None;
    }
    Some((key.to_ascii_lowercase(), value))
}

/// A logical line: physical lines joined over continuations, comments and blanks dropped.
struct LogicalLine {
    line: usize,
    end_line: usize,
    text: String,
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// Strips a trailing escape character (and whitespace after it); `None` when the line does not
/// continue.
fn strip_continuation(line: &str, escape: char) -> Option<&str> {
    line.trim_end_matches([' ', '\t']).strip_suffix(escape)
}

/// Joins physical lines into logical ones the way Docker does: the first line of an
/// instruction is left-trimmed and may be a comment; inside a continuation, comment lines and
/// empty lines are skipped and the rest is appended as is.
fn join_lines(lines: &[&str], escape: char) -> Vec<LogicalLine> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let start = i + 1;
        let first = lines[i].trim_start();
        i += 1;
        if first.starts_with('#') {
            continue;
        }
        let mut text = String::new();
        let mut continues = match strip_continuation(first, escape) {
            Some(head) => {
                text.push_str(head);
                true
            }
            None => {
                text.push_str(first);
                false
            }
        };
        if !continues && text.is_empty() {
            continue;
        }
        while continues && i < lines.len() {
            let next = lines[i];
            i += 1;
            if is_comment(next) || next.trim_start().is_empty() {
                continue;
            }
            match strip_continuation(next, escape) {
                Some(head) => text.push_str(head),
                None => {
                    text.push_str(next);
                    continues = false;
                }
            }
        }
        if text.trim().is_empty() {
            continue;
        }
        out.push(LogicalLine {
            line: start,
            end_line: i,
            text,
        });
    }
    out
}

/// Docker's `[\t\v\f\r ]`, the separator between an instruction and its arguments and in
/// whitespace-separated lists.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\u{b}' | '\u{c}' | '\r')
}

fn split_blank(rest: &str) -> Vec<String> {
    rest.split(is_blank)
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses one logical line into an instruction.
fn parse_instruction(text: &str, escape: char, line: usize) -> Result<Instruction, ParseError> {
    let err = |message: String| ParseError::new(line, message);
    let trimmed = text.trim();
    let (word, rest) = match trimmed.find(is_blank) {
        Some(i) => (&trimmed[..i], trimmed[i..].trim_start_matches(is_blank)),
        None => (trimmed, ""),
    };
    let keyword = word.to_ascii_uppercase();
    let (flag_words, rest) = extract_flags(rest);
    let mut flags = Flags::new(flag_words);
    if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") && has_heredoc(rest) {
        return Err(err(format!("heredocs are not supported ({keyword})")));
    }
    let instruction = match keyword.as_str() {
        "FROM" => {
            let platform = flags.string("platform");
            flags.finish().map_err(err)?;
            parse_from(rest, platform).map_err(err)?
        }
        "RUN" => {
            flags.finish().map_err(err)?;
            if rest.is_empty() {
                return Err(err(at_least_one("RUN")));
            }
            Instruction::Run {
                command: shell_or_exec(rest).map_err(err)?,
            }
        }
        "CMD" => {
            flags.finish().map_err(err)?;
            Instruction::Cmd(shell_or_exec(rest).map_err(err)?)
        }
        "ENTRYPOINT" => {
            flags.finish().map_err(err)?;
            Instruction::Entrypoint(shell_or_exec(rest).map_err(err)?)
        }
        "COPY" | "ADD" => {
            let from = if keyword == "COPY" {
                flags.string("from")
            } else {
                None
            };
            let chown = flags.string("chown");
            let chmod = flags.string("chmod");
            let link = flags.bool("link");
            flags.finish().map_err(err)?;
            let link = link.map_err(err)?;
            let mut words = json_or_blank_list(rest).map_err(err)?;
            if words.len() < 2 {
                return Err(err(format!("{keyword} requires at least two arguments")));
            }
            let dest = words.pop().unwrap_or_default();
            if keyword == "COPY" {
                Instruction::Copy {
                    sources: words,
                    dest,
                    from,
                    chown,
                    chmod,
                    link,
                }
            } else {
                Instruction::Add {
                    sources: words,
                    dest,
                    chown,
                    chmod,
                    link,
                }
            }
        }
        "ENV" | "LABEL" => {
            flags.finish().map_err(err)?;
            let pairs = parse_name_values(rest, &keyword, escape).map_err(err)?;
            if keyword == "ENV" {
                Instruction::Env(pairs)
            } else {
                Instruction::Label(pairs)
            }
        }
        "ARG" => {
            flags.finish().map_err(err)?;
            let args: Vec<ArgSpec> = split_words(rest, escape)
                .into_iter()
                .map(|w| match w.split_once('=') {
                    Some((name, value)) => ArgSpec {
                        name: name.to_string(),
                        default: Some(value.to_string()),
                    },
                    None => ArgSpec {
                        name: w,
                        default: None,
                    },
                })
                .collect();
            if args.is_empty() {
                return Err(err(at_least_one("ARG")));
            }
            if args.iter().any(|a| a.name.is_empty()) {
                return Err(err("ARG names can not be blank".to_string()));
            }
            Instruction::Arg(args)
        }
        "WORKDIR" | "USER" | "STOPSIGNAL" | "MAINTAINER" => {
            flags.finish().map_err(err)?;
            if rest.is_empty() {
                return Err(err(exactly_one(&keyword)));
            }
            let value = rest.to_string();
            match keyword.as_str() {
                "WORKDIR" => Instruction::Workdir(value),
                "USER" => Instruction::User(value),
                "STOPSIGNAL" => Instruction::StopSignal(value),
                _ => Instruction::Maintainer(value),
            }
        }
        "EXPOSE" => {
            flags.finish().map_err(err)?;
            let ports = split_blank(rest);
            if ports.is_empty() {
                return Err(err(at_least_one("EXPOSE")));
            }
            Instruction::Expose(ports)
        }
        "VOLUME" => {
            flags.finish().map_err(err)?;
            let volumes = json_or_blank_list(rest).map_err(err)?;
            if volumes.is_empty() {
                return Err(err(at_least_one("VOLUME")));
            }
            if volumes.iter().any(|v| v.trim().is_empty()) {
                return Err(err(
                    "VOLUME specified can not be an empty string".to_string()
                ));
            }
            Instruction::Volume(volumes)
        }
        "SHELL" => {
            flags.finish().map_err(err)?;
            match shell_or_exec(rest).map_err(err)? {
                ShellOrExec::Exec(args) if !args.is_empty() => Instruction::Shell(args),
                ShellOrExec::Exec(_) => return Err(err(at_least_one("SHELL"))),
                ShellOrExec::Shell(_) => {
                    return Err(err(
                        "SHELL requires the arguments to be in JSON form".to_string()
                    ))
                }
            }
        }
        "HEALTHCHECK" => parse_healthcheck(rest, flags).map_err(err)?,
        "ONBUILD" => {
            flags.finish().map_err(err)?;
            parse_onbuild(rest, escape, line)?
        }
        _ => return Err(err(format!("unknown instruction: {keyword}"))),
    };
    Ok(instruction)
}

fn at_least_one(keyword: &str) -> String {
    format!("{keyword} requires at least one argument")
}

fn exactly_one(keyword: &str) -> String {
    format!("{keyword} requires exactly one argument")
}

/// `FROM image` or `FROM image AS name`.
fn parse_from(rest: &str, platform: Option<String>) -> Result<Instruction, String> {
    let words = split_blank(rest);
    let (image, name) = match words.as_slice() {
        [image] => (image.clone(), None),
        [image, as_word, name] if as_word.eq_ignore_ascii_case("as") => {
            let name = name.to_ascii_lowercase();
            if !valid_stage_name(&name) {
                return Err(format!(
                    "invalid name for build stage: {name:?}, name can't start with a number or contain symbols"
                ));
            }
            (image.clone(), Some(name))
        }
        _ => return Err("FROM requires either one or three arguments".to_string()),
    };
    Ok(Instruction::From {
        image,
        name,
        platform,
    })
}

/// Docker's `^[a-z][a-z0-9-_.]*$` for stage names.
fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// `HEALTHCHECK NONE` or `HEALTHCHECK [flags] CMD command`.
fn parse_healthcheck(rest: &str, mut flags: Flags) -> Result<Instruction, String> {
    let (kind, command) = match rest.find(char::is_whitespace) {
        Some(i) => (&rest[..i], rest[i..].trim_start()),
        None => (rest, ""),
    };
    if kind.is_empty() {
        return Err(at_least_one("HEALTHCHECK"));
    }
    let kind = kind.to_ascii_uppercase();
    if kind == "NONE" {
        // Docker does not look at the flags of HEALTHCHECK NONE.
        if !command.is_empty() {
            return Err("HEALTHCHECK NONE takes no arguments".to_string());
        }
        return Ok(Instruction::Healthcheck(Healthcheck::None));
    }
    let interval = flags.string("interval");
    let timeout = flags.string("timeout");
    let start_period = flags.string("start-period");
    let start_interval = flags.string("start-interval");
    let retries = flags.string("retries");
    flags.finish()?;
    if kind != "CMD" {
        return Err(format!("Unknown type {kind:?} in HEALTHCHECK (try CMD)"));
    }
    let command = shell_or_exec(command)?;
    let empty = match &command {
        ShellOrExec::Exec(args) => args.is_empty(),
        ShellOrExec::Shell(text) => text.is_empty(),
    };
    if empty {
        return Err("Missing command after HEALTHCHECK CMD".to_string());
    }
    let options = HealthOptions {
        interval: health_interval("interval", interval)?,
        timeout: health_interval("timeout", timeout)?,
        start_period: health_interval("start-period", start_period)?,
        start_interval: health_interval("start-interval", start_interval)?,
        retries: match retries {
            None => None,
            Some(text) => {
                let n: i64 = text
                    .parse()
                    .map_err(|_| format!("invalid --retries value {text:?}"))?;
                if n < 0 {
                    return Err(format!("--retries cannot be negative ({n})"));
                }
                Some(u32::try_from(n).map_err(|_| format!("invalid --retries value {text:?}"))?)
            }
        },
    };
    Ok(Instruction::Healthcheck(Healthcheck::Cmd {
        command,
        options,
    }))
}

/// A healthcheck duration flag: a Go duration, zero (inherit) or at least 1ms.
fn health_interval(flag: &str, value: Option<String>) -> Result<Option<Duration>, String> {
    let Some(text) = value else {
        return Ok(None);
    };
    if text.is_empty() {
        return Ok(None);
    }
    let nanos =
        parse_go_duration(&text).ok_or_else(|| format!("time: invalid duration {text:?}"))?;
    if nanos < 0 {
        return Err(format!("Interval {flag:?} cannot be negative"));
    }
    if nanos > 0 && nanos < 1_000_000 {
        return Err(format!("Interval {flag:?} cannot be less than 1ms"));
    }
    let nanos = u64::try_from(nanos).map_err(|_| format!("time: invalid duration {text:?}"))?;
    Ok(Some(Duration::from_nanos(nanos)))
}

/// Parses Go's `time.ParseDuration` syntax (`1h30m`, `1.5s`, `300ms`, `-2us`) to nanoseconds.
fn parse_go_duration(text: &str) -> Option<i128> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_len];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    // Go refuses durations beyond i64 nanoseconds (about 292 years).
    if !total.is_finite() || total > i64::MAX as f64 {
        return None;
    }
    let nanos = total as i128;
    Some(if negative { -nanos } else { nanos })
}

/// `ONBUILD instruction`: the trigger is parsed now so a bad one fails this build, not the
/// build that inherits it.
fn parse_onbuild(rest: &str, escape: char, line: usize) -> Result<Instruction, ParseError> {
    if rest.is_empty() {
        return Err(ParseError::new(line, at_least_one("ONBUILD")));
    }
    let trigger = rest
        .split(is_blank)
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    match trigger.as_str() {
        "ONBUILD" => {
            return Err(ParseError::new(
                line,
                "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
            ))
        }
        "FROM" | "MAINTAINER" => {
            return Err(ParseError::new(
                line,
                format!("{trigger} isn't allowed as an ONBUILD trigger"),
            ))
        }
        _ => {}
    }
    let instruction = parse_instruction(rest, escape, line)?;
    Ok(Instruction::Onbuild {
        expression: rest.to_string(),
        instruction: Box::new(instruction),
    })
}

/// Whether a RUN/COPY/ADD line uses a heredoc (`<<EOF`, `<<-EOF`, `<<"EOF"`).
fn has_heredoc(rest: &str) -> bool {
    rest.split(char::is_whitespace).any(|word| {
        word.strip_prefix("<<").is_some_and(|after| {
            let after = after.strip_prefix('-').unwrap_or(after);
            let after = after.trim_start_matches(['"', '\'']);
            after
                .chars()
                .next()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    })
}

/// ENV and LABEL: `k=v k2="v 2"`, or the legacy `k the rest of the line`.
fn parse_name_values(
    rest: &str,
    keyword: &str,
    escape: char,
) -> Result<Vec<(String, String)>, String> {
    let words = split_words(rest, escape);
    let Some(first) = words.first() else {
        return Err(at_least_one(keyword));
    };
    if !first.contains('=') {
        let Some(i) = rest.find(is_blank) else {
            return Err(format!("{keyword} must have two arguments"));
        };
        let value = rest[i..].trim_start_matches(is_blank);
        return Ok(vec![(rest[..i].to_string(), value.to_string())]);
    }
    let mut pairs = Vec::with_capacity(words.len());
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(format!(
                "Syntax error - can't find = in {word:?}. Must be of the form: name=value"
            ));
        };
        if key.is_empty() {
            return Err(format!("{keyword} names can not be blank"));
        }
        pairs.push((key.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// Splits a line into words at whitespace outside quotes, keeping the quotes and escapes in
/// the words for [`expand`] to process: `a="x y" b=c` gives `a="x y"` and `b=c`. This is how
/// Docker splits ENV, LABEL and ARG arguments. An unterminated quote runs to the end.
pub fn split_words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    // Set once a quote is seen, so `a=""` and `""` survive as words.
    let mut blank_ok = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            } else if c == escape && q != '\'' {
                match chars.next() {
                    Some(next) => {
                        word.push(c);
                        word.push(next);
                    }
                    None => quote = None,
                }
                continue;
            }
            word.push(c);
            continue;
        }
        if c.is_whitespace() {
            if in_word && (blank_ok || !word.is_empty()) {
                words.push(std::mem::take(&mut word));
            }
            word.clear();
            in_word = false;
            blank_ok = false;
            continue;
        }
        in_word = true;
        if c == '\'' || c == '"' {
            quote = Some(c);
            blank_ok = true;
        } else if c == escape {
            if let Some(next) = chars.next() {
                word.push(c);
                word.push(next);
            }
            continue;
        }
        word.push(c);
    }
    if in_word && (blank_ok || !word.is_empty()) {
        words.push(word);
    }
    words
}

/// Docker's `parseMaybeJSON`: a JSON array of strings is exec form; a line that is valid JSON
/// but holds something other than strings is an error; anything else is shell form.
fn shell_or_exec(rest: &str) -> Result<ShellOrExec, String> {
    match parse_json_strings(rest) {
        JsonList::Strings(args) => Ok(ShellOrExec::Exec(args)),
        JsonList::NotStrings => Err(NOT_STRING_ARRAY.to_string()),
        JsonList::NotJson => Ok(ShellOrExec::Shell(rest.to_string())),
    }
}

/// COPY, ADD and VOLUME: a JSON array of strings, or words separated by blanks.
fn json_or_blank_list(rest: &str) -> Result<Vec<String>, String> {
    match parse_json_strings(rest) {
        JsonList::Strings(args) => Ok(args),
        JsonList::NotStrings => Err(NOT_STRING_ARRAY.to_string()),
        JsonList::NotJson => Ok(split_blank(rest)),
    }
}

const NOT_STRING_ARRAY: &str =
    "when using JSON array syntax, arrays must be comprised of strings only";

enum JsonList {
    Strings(Vec<String>),
    NotStrings,
    NotJson,
}

fn parse_json_strings(rest: &str) -> JsonList {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return JsonList::NotJson;
    }
    match serde_json::from_str::<Vec<serde_json::Value>>(rest) {
        Err(_) => JsonList::NotJson,
        Ok(values) => values
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map_or(JsonList::NotStrings, JsonList::Strings),
    }
}

/// Splits the leading `--flag[=value]` words off an instruction's arguments, removing quotes
/// and backslash escapes from them as Docker does. `--` alone ends the flags.
fn extract_flags(rest: &str) -> (Vec<String>, &str) {
    let mut flags = Vec::new();
    let mut remaining = rest;
    loop {
        let trimmed = remaining.trim_start();
        if !trimmed.starts_with("--") {
            return (flags, trimmed);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        let mut end = trimmed.len();
        let mut chars = trimmed.char_indices();
        while let Some((i, c)) = chars.next() {
            match quote {
                Some(q) if c == q => quote = None,
                None if c.is_whitespace() => {
                    end = i;
                    break;
                }
                None if c == '\'' || c == '"' => quote = Some(c),
                _ if c == '\\' => {
                    if let Some((_, next)) = chars.next() {
                        word.push(next);
                    }
                }
                _ => word.push(c),
            }
        }
        remaining = &trimmed[end..];
        if word == "--" {
            return (flags, remaining.trim_start());
        }
        flags.push(word);
    }
}

/// The `--flag` words of one instruction, taken by name as the instruction declares them;
/// [`Flags::finish`] rejects whatever was not taken, in Docker's words.
struct Flags {
    /// (name, value) with `value` None for `--name` without `=`.
    given: Vec<(String, Option<String>)>,
    taken: Vec<String>,
    error: Option<String>,
}

impl Flags {
    fn new(words: Vec<String>) -> Self {
        let given = words
            .into_iter()
            .map(|w| {
                let w = w.strip_prefix("--").unwrap_or(&w).to_string();
                match w.split_once('=') {
                    Some((name, value)) => (name.to_string(), Some(value.to_string())),
                    None => (w, None),
                }
            })
            .collect();
        Flags {
            given,
            taken: Vec::new(),
            error: None,
        }
    }

    fn take(&mut self, name: &str) -> Option<Option<String>> {
        self.taken.push(name.to_string());
        let mut found = self.given.iter().filter(|(n, _)| n == name);
        let first = found.next().map(|(_, v)| v.clone());
        if found.next().is_some() && self.error.is_none() {
            self.error = Some(format!("duplicate flag specified: {name}"));
        }
        first
    }

    /// A `--name=value` flag.
    fn string(&mut self, name: &str) -> Option<String> {
        match self.take(name)? {
            Some(value) => Some(value),
            None => {
                if self.error.is_none() {
                    self.error = Some(format!("missing a value on flag: {name}"));
                }
                None
            }
        }
    }

    /// A `--name` or `--name=true|false` flag.
    fn bool(&mut self, name: &str) -> Result<bool, String> {
        match self.take(name) {
            None => Ok(false),
            Some(None) => Ok(true),
            Some(Some(value)) => match value.to_ascii_lowercase().as_str() {
                "" | "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(format!(
                    "expecting boolean value for flag {name}, not: {value}"
                )),
            },
        }
    }

    fn finish(self) -> Result<(), String> {
        if let Some((name, _)) = self.given.iter().find(|(n, _)| !self.taken.contains(n)) {
            return Err(format!("unknown flag: {name}"));
        }
        if let Some(error) = self.error {
            return Err(error);
        }
        Ok(())
    }
}

/// Expands `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:+alt}`,
/// `${VAR+alt}`, `${VAR:?msg}` and `${VAR?msg}` in one word and removes its quotes, as Docker's
/// shell lexer does for the arguments of ENV, ARG, LABEL, WORKDIR, USER, COPY, ADD, EXPOSE,
/// VOLUME, STOPSIGNAL and FROM.
///
/// Single quotes keep their content literally; double quotes allow `$` expansion and escaping
/// of `"`, `$` and the escape character; outside quotes the escape character makes the next
/// character literal. An unset variable expands to the empty string.
pub fn expand<F>(word: &str, vars: &F, escape: char) -> Result<String, ExpandError>
where
    F: Fn(&str) -> Option<String>,
{
    let mut lexer = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        escape,
        vars,
        depth: 0,
    };
    lexer.process(None)
}

struct Lexer<'a, F> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    vars: &'a F,
    depth: usize,
}

impl<F> Lexer<'_, F>
where
    F: Fn(&str) -> Option<String>,
{
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    /// Processes until `stop` (consumed) or the end of the word.
    fn process(&mut self, stop: Option<char>) -> Result<String, ExpandError> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                return Ok(out);
            }
            match c {
                '\'' => out.push_str(&self.single_quoted()?),
                '"' => out.push_str(&self.double_quoted()?),
                '$' => out.push_str(&self.dollar()?),
                _ => {
                    self.pos += 1;
                    if c == self.escape {
                        match self.next() {
                            Some(next) => out.push(next),
                            None => break,
                        }
                    } else {
                        out.push(c);
                    }
                }
            }
        }
        match stop {
            Some(_) => Err(ExpandError::MissingBrace),
            None => Ok(out),
        }
    }

    fn single_quoted(&mut self) -> Result<String, ExpandError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err(ExpandError::UnterminatedSingleQuote),
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, ExpandError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(ExpandError::UnterminatedDoubleQuote),
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => out.push_str(&self.dollar()?),
                Some(c) => {
                    self.pos += 1;
                    if c == self.escape {
                        if let Some(next @ ('"' | '$')) = self.peek() {
                            self.pos += 1;
                            out.push(next);
                            continue;
                        }
                        if self.peek() == Some(self.escape) {
                            self.pos += 1;
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    fn lookup(&self, name: &str) -> Option<String> {
        (self.vars)(name)
    }

    /// `$name`, `${name}` or `${name<modifier>word}`, the `$` not yet consumed.
    fn dollar(&mut self) -> Result<String, ExpandError> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(self.lookup(&name).unwrap_or_default());
        }
        self.pos += 1;
        match self.peek() {
            None => return Err(ExpandError::MissingBrace),
            Some('{' | '}' | ':') => return Err(ExpandError::BadSubstitution),
            Some(_) => {}
        }
        let name = self.name();
        let Some(c) = self.next() else {
            return Err(ExpandError::MissingBrace);
        };
        let (null_is_unset, modifier) = match c {
            '}' => return Ok(self.lookup(&name).unwrap_or_default()),
            ':' => match self.next() {
                Some(m @ ('-' | '+' | '?')) => (true, m),
                Some(m) => return Err(ExpandError::UnsupportedModifier(format!(":{m}"))),
                None => return Err(ExpandError::MissingBrace),
            },
            '-' | '+' | '?' => (false, c),
            other => return Err(ExpandError::UnsupportedModifier(other.to_string())),
        };
        self.depth += 1;
        if self.depth > MAX_EXPANSION_DEPTH {
            return Err(ExpandError::TooDeep);
        }
        let word = self.process(Some('}'))?;
        self.depth -= 1;
        let value = self.lookup(&name);
        let unset = match &value {
            None => true,
            Some(v) => null_is_unset && v.is_empty(),
        };
        match modifier {
            '-' if unset => Ok(word),
            '+' if unset => Ok(String::new()),
            '+' => Ok(word),
            '?' if unset => {
                let message = match (word.is_empty(), value.is_some()) {
                    (false, _) => word,
                    (true, false) => "is not allowed to be unset".to_string(),
                    (true, true) => "is not allowed to be empty".to_string(),
                };
                Err(ExpandError::Required { name, message })
            }
            _ => Ok(value.unwrap_or_default()),
        }
    }

    /// A variable name: letters, digits and `_`; or a run of digits; or one special parameter.
    fn name(&mut self) -> String {
        let mut name = String::new();
        match self.peek() {
            Some(c) if c.is_ascii_digit() => {
                while let Some(d) = self.peek().filter(char::is_ascii_digit) {
                    self.pos += 1;
                    name.push(d);
                }
                return name;
            }
            Some(c @ ('@' | '*' | '#' | '?' | '-' | '$' | '!')) => {
                self.pos += 1;
                name.push(c);
                return name;
            }
            _ => {}
        }
        while let Some(c) = self.peek() {
            if !(c.is_alphanumeric() || c == '_') {
                break;
            }
            self.pos += 1;
            name.push(c);
        }
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only_step(text: &str) -> Instruction {
        let dockerfile = parse(text).expect("parses");
        assert_eq!(dockerfile.stages.len(), 1);
        assert_eq!(dockerfile.stages[0].steps.len(), 1);
        dockerfile.stages[0].steps[0].instruction.clone()
    }

    fn parse_error(text: &str) -> ParseError {
        parse(text).expect_err("should fail")
    }

    fn vars(name: &str) -> Option<String> {
        match name {
            "NAME" => Some("berth".to_string()),
            "EMPTY" => Some(String::new()),
            "SPACED" => Some("a b".to_string()),
            _ => None,
        }
    }

    fn exp(word: &str) -> Result<String, ExpandError> {
        expand(word, &vars, '\\')
    }

    fn words(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parse_minimal_dockerfile_gives_one_stage() {
        let dockerfile = parse("FROM alpine:3.20\nRUN echo hi\n").unwrap();
        assert_eq!(dockerfile.stages[0].base, "alpine:3.20");
        assert_eq!(dockerfile.stages[0].name, None);
        assert_eq!(
            dockerfile.stages[0].steps[0].instruction,
            Instruction::Run {
                command: ShellOrExec::Shell("echo hi".to_string())
            }
        );
    }

    #[test]
    fn parse_instruction_names_are_case_insensitive() {
        let instruction = only_step("from alpine\nrUn echo hi");
        assert!(matches!(instruction, Instruction::Run { .. }));
    }

    #[test]
    fn parse_continuation_joins_lines_and_keeps_first_line_number() {
        let dockerfile = parse("FROM a\n\nRUN echo \\\n  one \\\n  two\nUSER x").unwrap();
        let steps = &dockerfile.stages[0].steps;
        assert_eq!(steps[0].line, 3);
        assert_eq!(steps[0].end_line, 5);
        assert_eq!(
            steps[0].instruction,
            Instruction::Run {
                command: ShellOrExec::Shell("echo   one   two".to_string())
            }
        );
        assert_eq!(steps[1].line, 6);
    }

    #[test]
    fn parse_continuation_skips_comment_and_empty_lines() {
        let instruction = only_step(
            "FROM a\nRUN apt-get update && \\\n# comment\n\n   \n    apt-get install x\n",
        );
        assert_eq!(
            instruction,
            Instruction::Run {
                command: ShellOrExec::Shell("apt-get update &&     apt-get install x".to_string())
            }
        );
    }

    #[test]
    fn parse_continuation_allows_whitespace_after_escape() {
        let instruction = only_step("FROM a\nRUN a \\  \t\nb");
        assert_eq!(
            instruction,
            Instruction::Run {
                command: ShellOrExec::Shell("a b".to_string())
            }
        );
    }

    #[test]
    fn parse_continuation_at_end_of_file_keeps_instruction() {
        let instruction = only_step("FROM a\nRUN echo \\");
        assert_eq!(
            instruction,
            Instruction::Run {
                command: ShellOrExec::Shell("echo".to_string())
            }
        );
    }

    #[test]
    fn parse_crlf_line_endings_are_accepted() {
        let instruction = only_step("FROM a\r\nRUN a \\\r\n b\r\n");
        assert_eq!(
            instruction,
            Instruction::Run {
                command: ShellOrExec::Shell("a  b".to_string())
            }
        );
    }

    #[test]
    fn parse_escape_directive_switches_to_backtick() {
        let dockerfile = parse("# escape=`\nFROM windows\nRUN dir c:\\ `\n  /b\n").unwrap();
        assert_eq!(dockerfile.escape, '`');
        assert_eq!(
            dockerfile.stages[0].steps[0].instruction,
            Instruction::Run {
                command: ShellOrExec::Shell("dir c:\\   /b".to_string())
            }
        );
    }

    #[test]
    fn parse_directive_after_comment_is_only_a_comment() {
        let dockerfile = parse("# hello\n# escape=`\nFROM a\nRUN a \\\n b").unwrap();
        assert_eq!(dockerfile.escape, '\\');
    }

    #[test]
    fn parse_syntax_directive_is_recorded_and_ignored() {
        let dockerfile = parse("# syntax=docker/dockerfile:1\n#escape=\\\nFROM a").unwrap();
        assert_eq!(dockerfile.syntax.as_deref(), Some("docker/dockerfile:1"));
    }

    #[test]
    fn parse_duplicate_directive_is_an_error() {
        let error = parse_error("# escape=`\n# escape=\\\nFROM a");
        assert_eq!(error.line, 2);
        assert_eq!(
            error.message,
            "only one escape parser directive can be used"
        );
    }

    #[test]
    fn parse_invalid_escape_directive_is_an_error() {
        let error = parse_error("# escape=x\nFROM a");
        assert!(error.message.contains("invalid escape token"));
    }

    #[test]
    fn parse_unknown_instruction_reports_name_and_line() {
        let error = parse_error("FROM a\n\nFOO bar");
        assert_eq!(error.line, 3);
        assert_eq!(
            error.to_string(),
            "dockerfile parse error on line 3: unknown instruction: FOO"
        );
    }

    #[test]
    fn parse_empty_dockerfile_is_an_error() {
        let error = parse_error("# only a comment\n\n");
        assert_eq!(error.message, "the Dockerfile has no instructions");
    }

    #[test]
    fn parse_instruction_before_from_is_an_error() {
        let error = parse_error("ARG V=1\nRUN x\nFROM a");
        assert_eq!(error.line, 2);
        assert_eq!(error.message, "no build stage in current context");
    }

    #[test]
    fn parse_args_before_from_are_global() {
        let dockerfile = parse("ARG BASE=alpine\nARG TAG\nFROM $BASE:$TAG\nARG TAG").unwrap();
        assert_eq!(
            dockerfile.global_args,
            vec![
                ArgSpec {
                    name: "BASE".into(),
                    default: Some("alpine".into())
                },
                ArgSpec {
                    name: "TAG".into(),
                    default: None
                },
            ]
        );
        assert_eq!(dockerfile.stages[0].base, "$BASE:$TAG");
        assert_eq!(dockerfile.stages[0].steps.len(), 1);
    }

    #[test]
    fn parse_from_with_platform_and_stage_name() {
        let dockerfile =
            parse("FROM --platform=$BUILDPLATFORM golang AS Build\nFROM scratch").unwrap();
        assert_eq!(dockerfile.stages[0].name.as_deref(), Some("build"));
        assert_eq!(
            dockerfile.stages[0].platform.as_deref(),
            Some("$BUILDPLATFORM")
        );
        assert_eq!(dockerfile.stages.len(), 2);
    }

    #[test]
    fn parse_from_with_two_words_is_an_error() {
        let error = parse_error("FROM a AS");
        assert_eq!(error.message, "FROM requires either one or three arguments");
    }

    #[test]
    fn parse_from_with_invalid_stage_name_is_an_error() {
        let error = parse_error("FROM a AS 1st");
        assert!(error.message.starts_with("invalid name for build stage"));
    }

    #[test]
    fn stage_index_resolves_names_then_indexes() {
        let dockerfile = parse("FROM a AS builder\nFROM b\nFROM c AS 0ok-not\n").err();
        assert!(dockerfile.is_some());
        let dockerfile = parse("FROM a AS builder\nFROM b\nCOPY --from=builder /x /y").unwrap();
        assert_eq!(dockerfile.stage_index("Builder"), Some(0));
        assert_eq!(dockerfile.stage_index("1"), Some(1));
        assert_eq!(dockerfile.stage_index("2"), None);
        assert_eq!(dockerfile.stage_index("alpine"), None);
        assert_eq!(
            dockerfile.stage("builder").map(|s| s.base.as_str()),
            Some("a")
        );
    }

    #[test]
    fn parse_json_array_is_exec_form() {
        let instruction = only_step("FROM a\nCMD [\"nginx\", \"-g\", \"daemon off;\"]");
        assert_eq!(
            instruction,
            Instruction::Cmd(ShellOrExec::Exec(words(&["nginx", "-g", "daemon off;"])))
        );
    }

    #[test]
    fn parse_invalid_json_falls_back_to_shell_form() {
        let instruction = only_step("FROM a\nENTRYPOINT [\"nginx\", 'x']");
        assert_eq!(
            instruction,
            Instruction::Entrypoint(ShellOrExec::Shell("[\"nginx\", 'x']".to_string()))
        );
    }

    #[test]
    fn parse_json_array_of_non_strings_is_an_error() {
        let error = parse_error("FROM a\nRUN [\"echo\", 1]");
        assert_eq!(error.message, NOT_STRING_ARRAY);
    }

    #[test]
    fn parse_run_without_command_is_an_error() {
        let error = parse_error("FROM a\nRUN");
        assert_eq!(error.message, "RUN requires at least one argument");
    }

    #[test]
    fn parse_copy_with_flags() {
        let instruction =
            only_step("FROM a\nCOPY --from=build --chown=1000:1000 --chmod=0755 --link a b /dst/");
        assert_eq!(
            instruction,
            Instruction::Copy {
                sources: words(&["a", "b"]),
                dest: "/dst/".to_string(),
                from: Some("build".to_string()),
                chown: Some("1000:1000".to_string()),
                chmod: Some("0755".to_string()),
                link: true,
            }
        );
    }

    #[test]
    fn parse_copy_json_form_keeps_spaces() {
        let instruction = only_step("FROM a\nCOPY [\"my file\", \"/dst dir/\"]");
        assert!(matches!(
            instruction,
            Instruction::Copy { ref sources, ref dest, .. }
                if sources == &words(&["my file"]) && dest == "/dst dir/"
        ));
    }

    #[test]
    fn parse_flag_quotes_are_removed() {
        let instruction = only_step("FROM a\nCOPY --chown=\"app user\" a b");
        assert!(matches!(
            instruction,
            Instruction::Copy { chown: Some(ref c), .. } if c == "app user"
        ));
    }

    #[test]
    fn parse_add_rejects_from_flag() {
        let error = parse_error("FROM a\nADD --from=x a b");
        assert_eq!(error.message, "unknown flag: from");
    }

    #[test]
    fn parse_run_rejects_mount_flag() {
        let error = parse_error("FROM a\nRUN --mount=type=cache,target=/x make");
        assert_eq!(error.message, "unknown flag: mount");
    }

    #[test]
    fn parse_flag_without_value_is_an_error() {
        let error = parse_error("FROM a\nCOPY --chown a b");
        assert_eq!(error.message, "missing a value on flag: chown");
    }

    #[test]
    fn parse_duplicate_flag_is_an_error() {
        let error = parse_error("FROM a\nCOPY --chmod=1 --chmod=2 a b");
        assert_eq!(error.message, "duplicate flag specified: chmod");
    }

    #[test]
    fn parse_copy_with_one_argument_is_an_error() {
        let error = parse_error("FROM a\nCOPY onlyone");
        assert_eq!(error.message, "COPY requires at least two arguments");
    }

    #[test]
    fn parse_heredoc_is_rejected() {
        let error = parse_error("FROM a\nRUN <<EOF\necho hi\nEOF");
        assert!(error.message.contains("heredocs are not supported"));
    }

    #[test]
    fn parse_here_string_is_not_a_heredoc() {
        let instruction = only_step("FROM a\nRUN cat <<< hi");
        assert!(matches!(instruction, Instruction::Run { .. }));
    }

    #[test]
    fn parse_env_key_value_form_keeps_quotes_for_expansion() {
        let instruction = only_step("FROM a\nENV a=\"x y\" b=c d=");
        assert_eq!(
            instruction,
            Instruction::Env(vec![
                ("a".into(), "\"x y\"".into()),
                ("b".into(), "c".into()),
                ("d".into(), String::new()),
            ])
        );
    }

    #[test]
    fn parse_env_legacy_form_takes_rest_of_line() {
        let instruction = only_step("FROM a\nENV PATH /usr/bin:/bin  and more");
        assert_eq!(
            instruction,
            Instruction::Env(vec![("PATH".into(), "/usr/bin:/bin  and more".into())])
        );
    }

    #[test]
    fn parse_env_legacy_form_without_value_is_an_error() {
        let error = parse_error("FROM a\nENV ONLY");
        assert_eq!(error.message, "ENV must have two arguments");
    }

    #[test]
    fn parse_env_mixed_forms_is_an_error() {
        let error = parse_error("FROM a\nENV a=1 b");
        assert!(error
            .message
            .starts_with("Syntax error - can't find = in \"b\""));
    }

    #[test]
    fn parse_label_with_quoted_key_and_escaped_quote() {
        let instruction = only_step("FROM a\nLABEL \"com.x y\"=\"say \\\"hi\\\"\" v=1");
        assert_eq!(
            instruction,
            Instruction::Label(vec![
                ("\"com.x y\"".into(), "\"say \\\"hi\\\"\"".into()),
                ("v".into(), "1".into()),
            ])
        );
    }

    #[test]
    fn parse_arg_with_several_names() {
        let instruction = only_step("FROM a\nARG A B=2 C=\"x y\"");
        assert_eq!(
            instruction,
            Instruction::Arg(vec![
                ArgSpec {
                    name: "A".into(),
                    default: None
                },
                ArgSpec {
                    name: "B".into(),
                    default: Some("2".into())
                },
                ArgSpec {
                    name: "C".into(),
                    default: Some("\"x y\"".into())
                },
            ])
        );
    }

    #[test]
    fn parse_single_value_instructions_keep_whole_rest() {
        let dockerfile = parse(
            "FROM a\nWORKDIR /my dir\nUSER app:app\nSTOPSIGNAL SIGKILL\nMAINTAINER Me <me@x>",
        )
        .unwrap();
        let got: Vec<Instruction> = dockerfile.stages[0]
            .steps
            .iter()
            .map(|s| s.instruction.clone())
            .collect();
        assert_eq!(
            got,
            vec![
                Instruction::Workdir("/my dir".into()),
                Instruction::User("app:app".into()),
                Instruction::StopSignal("SIGKILL".into()),
                Instruction::Maintainer("Me <me@x>".into()),
            ]
        );
    }

    #[test]
    fn parse_expose_and_volume_lists() {
        let dockerfile =
            parse("FROM a\nEXPOSE 80/tcp  443\nVOLUME /a /b\nVOLUME [\"/c d\"]").unwrap();
        let steps = &dockerfile.stages[0].steps;
        assert_eq!(
            steps[0].instruction,
            Instruction::Expose(words(&["80/tcp", "443"]))
        );
        assert_eq!(
            steps[1].instruction,
            Instruction::Volume(words(&["/a", "/b"]))
        );
        assert_eq!(steps[2].instruction, Instruction::Volume(words(&["/c d"])));
    }

    #[test]
    fn parse_shell_requires_json_form() {
        let error = parse_error("FROM a\nSHELL /bin/bash -c");
        assert_eq!(
            error.message,
            "SHELL requires the arguments to be in JSON form"
        );
        let instruction = only_step("FROM a\nSHELL [\"/bin/bash\", \"-c\"]");
        assert_eq!(instruction, Instruction::Shell(words(&["/bin/bash", "-c"])));
    }

    #[test]
    fn parse_healthcheck_cmd_with_options() {
        let instruction = only_step(
            "FROM a\nHEALTHCHECK --interval=1m30s --timeout=500ms --start-period=0 --retries=3 \\\n  CMD curl -f http://localhost/",
        );
        assert_eq!(
            instruction,
            Instruction::Healthcheck(Healthcheck::Cmd {
                command: ShellOrExec::Shell("curl -f http://localhost/".into()),
                options: HealthOptions {
                    interval: Some(Duration::from_secs(90)),
                    timeout: Some(Duration::from_millis(500)),
                    start_period: Some(Duration::ZERO),
                    start_interval: None,
                    retries: Some(3),
                },
            })
        );
    }

    #[test]
    fn parse_healthcheck_none_and_exec_form() {
        assert_eq!(
            only_step("FROM a\nHEALTHCHECK NONE"),
            Instruction::Healthcheck(Healthcheck::None)
        );
        assert!(matches!(
            only_step("FROM a\nhealthcheck cmd [\"true\"]"),
            Instruction::Healthcheck(Healthcheck::Cmd {
                command: ShellOrExec::Exec(_),
                ..
            })
        ));
    }

    #[test]
    fn parse_healthcheck_bad_values_are_errors() {
        assert_eq!(
            parse_error("FROM a\nHEALTHCHECK --interval=-1s CMD x").message,
            "Interval \"interval\" cannot be negative"
        );
        assert_eq!(
            parse_error("FROM a\nHEALTHCHECK --timeout=10us CMD x").message,
            "Interval \"timeout\" cannot be less than 1ms"
        );
        assert_eq!(
            parse_error("FROM a\nHEALTHCHECK --retries=-2 CMD x").message,
            "--retries cannot be negative (-2)"
        );
        assert!(parse_error("FROM a\nHEALTHCHECK --interval=5 CMD x")
            .message
            .contains("invalid duration"));
        assert!(parse_error("FROM a\nHEALTHCHECK FOO x")
            .message
            .contains("Unknown type"));
        assert_eq!(
            parse_error("FROM a\nHEALTHCHECK CMD").message,
            "Missing command after HEALTHCHECK CMD"
        );
        assert_eq!(
            parse_error("FROM a\nHEALTHCHECK --bogus=1 CMD x").message,
            "unknown flag: bogus"
        );
    }

    #[test]
    fn parse_onbuild_keeps_trigger_text_and_parses_it() {
        let instruction = only_step("FROM a\nONBUILD COPY . /app");
        assert!(matches!(
            instruction,
            Instruction::Onbuild { ref expression, ref instruction }
                if expression == "COPY . /app" && matches!(**instruction, Instruction::Copy { .. })
        ));
    }

    #[test]
    fn parse_onbuild_rejects_forbidden_triggers() {
        assert!(parse_error("FROM a\nONBUILD ONBUILD RUN x")
            .message
            .contains("Chaining ONBUILD"));
        assert_eq!(
            parse_error("FROM a\nONBUILD from b").message,
            "FROM isn't allowed as an ONBUILD trigger"
        );
    }

    #[test]
    fn parse_odd_input_never_panics() {
        let long_continuation = format!("FROM a\nRUN {}", "x \\\n".repeat(10_000));
        let inputs = [
            String::new(),
            "\u{feff}".to_string(),
            "\\".to_string(),
            "FROM".to_string(),
            "FROM a\nCOPY --".to_string(),
            "FROM a\nCOPY -- a b".to_string(),
            "FROM a\nENV \"".to_string(),
            "FROM a\nLABEL =".to_string(),
            "FROM a\nHEALTHCHECK --interval=99999999999999h CMD x".to_string(),
            "FROM a\nHEALTHCHECK --interval=µ CMD x".to_string(),
            "FROM a\nARG =x".to_string(),
            "FROM a\nONBUILD".to_string(),
            "# escape=`\n`".to_string(),
            "FROM a\nRUN [".to_string(),
            "FROM a\nRUN é ü \u{0}".to_string(),
            "\u{b}\u{c}\r\n\t".to_string(),
            long_continuation,
            "FROM a\n".repeat(5_000),
        ];
        for input in &inputs {
            let _ = parse(input);
        }
    }

    #[test]
    fn split_words_keeps_quotes_and_splits_outside_them() {
        assert_eq!(
            split_words("a=\"x y\"  b=c 'd e' f\\ g \"\"", '\\'),
            words(&["a=\"x y\"", "b=c", "'d e'", "f\\ g", "\"\""])
        );
    }

    #[test]
    fn expand_plain_and_braced_variables() {
        assert_eq!(exp("$NAME-${NAME}_x$UNSET.").unwrap(), "berth-berth_x.");
    }

    #[test]
    fn expand_default_and_alternative_modifiers() {
        assert_eq!(
            exp("${UNSET:-d}|${EMPTY:-d}|${EMPTY-d}|${NAME:-d}").unwrap(),
            "d|d||berth"
        );
        assert_eq!(
            exp("${UNSET:+a}|${EMPTY:+a}|${EMPTY+a}|${NAME:+a}").unwrap(),
            "||a|a"
        );
    }

    #[test]
    fn expand_nested_default_is_expanded() {
        assert_eq!(exp("${UNSET:-${NAME}/bin}").unwrap(), "berth/bin");
    }

    #[test]
    fn expand_required_variable_errors_when_unset() {
        assert_eq!(
            exp("${UNSET:?must be set}"),
            Err(ExpandError::Required {
                name: "UNSET".into(),
                message: "must be set".into()
            })
        );
        assert_eq!(exp("${EMPTY?x}").unwrap(), "");
        assert_eq!(
            exp("${EMPTY:?}").unwrap_err().to_string(),
            "EMPTY: is not allowed to be empty"
        );
    }

    #[test]
    fn expand_quotes_are_removed_single_quotes_literal() {
        assert_eq!(exp("'$NAME'\"$NAME\"").unwrap(), "$NAMEberth");
        assert_eq!(exp("\"a b\"").unwrap(), "a b");
        assert_eq!(exp("\"say \\\"hi\\\" \\n\"").unwrap(), "say \"hi\" \\n");
    }

    #[test]
    fn expand_escaped_dollar_is_literal() {
        assert_eq!(exp("\\$NAME \\\\ \\x").unwrap(), "$NAME \\ x");
    }

    #[test]
    fn expand_with_backtick_escape() {
        assert_eq!(
            expand("`$NAME c:\\dir", &vars, '`').unwrap(),
            "$NAME c:\\dir"
        );
    }

    #[test]
    fn expand_lone_dollar_stays() {
        assert_eq!(exp("a$ $").unwrap(), "a$ $");
    }

    #[test]
    fn expand_bad_input_is_an_error() {
        assert_eq!(exp("${NAME"), Err(ExpandError::MissingBrace));
        assert_eq!(exp("${"), Err(ExpandError::MissingBrace));
        assert_eq!(exp("${}"), Err(ExpandError::BadSubstitution));
        assert_eq!(exp("${NAME:-x"), Err(ExpandError::MissingBrace));
        assert_eq!(exp("'abc"), Err(ExpandError::UnterminatedSingleQuote));
        assert_eq!(exp("\"abc"), Err(ExpandError::UnterminatedDoubleQuote));
        assert_eq!(
            exp("${NAME%x}"),
            Err(ExpandError::UnsupportedModifier("%".into()))
        );
        assert_eq!(
            exp("${NAME:x}"),
            Err(ExpandError::UnsupportedModifier(":x".into()))
        );
    }

    #[test]
    fn expand_deep_nesting_is_an_error_not_a_crash() {
        let word = format!("{}x{}", "${A:-".repeat(100_000), "}".repeat(100_000));
        assert_eq!(exp(&word), Err(ExpandError::TooDeep));
    }

    #[test]
    fn expand_env_value_from_parsed_dockerfile() {
        let instruction = only_step("FROM a\nENV greeting=\"hello $NAME\" path=${NAME:-x}/bin");
        let Instruction::Env(pairs) = instruction else {
            panic!("not ENV");
        };
        let values: Vec<String> = pairs.iter().map(|(_, v)| exp(v).unwrap()).collect();
        assert_eq!(values, words(&["hello berth", "berth/bin"]));
    }
}
