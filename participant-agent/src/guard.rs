//! The statement guard: what a client's Execute may run inside a branch.
//!
//! A branch's fate belongs to the coordinator group, so a statement must never end, prepare
//! or escape the branch's transaction, nor change the session of the pooled connection it
//! runs on (the next branch on that connection is somebody else's). The guard reads the
//! statement the way PostgreSQL's lexer does (whitespace, `--` and nested `/* */` comments,
//! every kind of quoted string and identifier, dollar quoting), so a comment or a quote cannot
//! hide the command from it, and decides by an allowlist of leading commands: anything it does
//! not know is refused.
//!
//! It is the first layer only. The branch manager also asks PostgreSQL after every statement
//! whether the branch is still in its own transaction, and PREPARE TRANSACTION only runs
//! behind a check of the same (see `branches.rs`).

use std::fmt;

/// Why a statement was refused. Its text is what the client reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("empty SQL statement")]
    Empty,
    #[error("the statement contains a NUL character")]
    Nul,
    #[error("unterminated {0} in the statement")]
    Unterminated(&'static str),
    #[error(
        "more than one statement in one Execute; send each statement of the transaction on \
         its own"
    )]
    Multiple,
    /// The statement does not start with a command keyword of PostgreSQL's: PostgreSQL
    /// would answer the same.
    #[error("syntax error at or near {0}: a statement starts with an SQL command")]
    Syntax(String),
    #[error("{command} is not allowed in a transaction branch: {why}")]
    Command { command: String, why: &'static str },
    #[error(
        "the statement names paxos_commit, whose objects and settings belong to the agent \
         (its commit proofs and branch marker); branches may not read or change them"
    )]
    Reserved,
}

/// Checks one statement a client wants to run in a branch.
pub fn check(sql: &str) -> Result<(), Refused> {
    if sql.contains('\0') {
        return Err(Refused::Nul);
    }
    let tokens = lex(sql)?;
    if tokens.iter().any(Token::is_reserved) {
        return Err(Refused::Reserved);
    }
    fixed_settings_untouched(&tokens)?;
    no_denied_function(&tokens)?;
    // Empty statements (`;;`) are nothing to PostgreSQL's parser; anything else after a `;`
    // is a second statement.
    let mut statements = tokens
        .split(|t| *t == Token::Semicolon)
        .filter(|s| !s.is_empty());
    let Some(first) = statements.next() else {
        return Err(Refused::Empty);
    };
    if statements.next().is_some() {
        return Err(Refused::Multiple);
    }
    command(first)
}

/// One token, as far as the guard needs to tell them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An unquoted identifier or keyword, ASCII letters folded to lower case as PostgreSQL
    /// folds them (other letters are left alone, as PostgreSQL does in UTF-8).
    Word(String),
    /// A double-quoted identifier (`""` undone; `U&"..."` escapes decoded).
    Quoted(String),
    /// A string constant of any kind, its content decoded as far as escapes go.
    Str(String),
    Semicolon,
    LParen,
    RParen,
    Dot,
    /// Numbers, parameters, operators and other punctuation.
    Other,
}

impl Token {
    fn word(&self) -> Option<&str> {
        match self {
            Token::Word(w) => Some(w),
            _ => None,
        }
    }

    /// Whether the token names the agent's own namespace. Best effort for string contents
    /// (a string can be assembled at run time): the checks in PostgreSQL are the real fence.
    fn is_reserved(&self) -> bool {
        match self {
            Token::Word(s) | Token::Quoted(s) | Token::Str(s) => {
                s.to_lowercase().contains(RESERVED)
            }
            _ => false,
        }
    }
}

const RESERVED: &str = "paxos_commit";

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Word(w) => f.write_str(&w.to_ascii_uppercase()),
            Token::Quoted(q) => write!(f, "\"{q}\""),
            Token::Str(_) => f.write_str("a string"),
            Token::Semicolon => f.write_str(";"),
            Token::LParen => f.write_str("("),
            Token::RParen => f.write_str(")"),
            Token::Dot => f.write_str("."),
            Token::Other => f.write_str("an operator or constant"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The lexer: PostgreSQL's scan.l, reduced to token boundaries.

/// PostgreSQL's `space`: `[ \t\n\r\f\v]` (`\v` since PostgreSQL 16; earlier versions reject
/// it, which is just as safe). Other Unicode spaces are identifier characters to PostgreSQL,
/// and so they are here.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// `ident_start`: ASCII letters, `_`, and every non-ASCII character.
fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || !c.is_ascii()
}

/// `ident_cont`: also digits and `$`.
fn is_ident_cont(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == '$'
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
}

fn lex(sql: &str) -> Result<Vec<Token>, Refused> {
    let mut lx = Lexer {
        chars: sql.chars().collect(),
        pos: 0,
    };
    let mut tokens = Vec::new();
    while let Some(t) = lx.next_token()? {
        tokens.push(t);
    }
    attach_uescape(&mut tokens);
    Ok(tokens)
}

impl Lexer {
    fn peek(&self, k: usize) -> Option<char> {
        self.chars.get(self.pos + k).copied()
    }

    fn starts_with(&self, s: &str) -> bool {
        s.chars().enumerate().all(|(k, c)| self.peek(k) == Some(c))
    }

    /// Skips whitespace and comments, then reads one token.
    fn next_token(&mut self) -> Result<Option<Token>, Refused> {
        loop {
            match self.peek(0) {
                None => return Ok(None),
                Some(c) if is_space(c) => self.pos += 1,
                Some('-') if self.peek(1) == Some('-') => {
                    while let Some(c) = self.peek(0) {
                        self.pos += 1;
                        if c == '\n' || c == '\r' {
                            break;
                        }
                    }
                }
                Some('/') if self.peek(1) == Some('*') => self.block_comment()?,
                Some(_) => break,
            }
        }
        let c = self.peek(0).unwrap_or(' ');
        let next = self.peek(1);
        let token = match c {
            '\'' => {
                self.pos += 1;
                Token::Str(self.quoted('\'', false)?)
            }
            '"' => {
                self.pos += 1;
                let ident = self.quoted('"', false)?;
                Token::Quoted(ident)
            }
            // E'...' (backslash escapes), B'...', X'...', N'...'; `e` etc. followed by
            // anything else is an identifier. The longest match wins in PostgreSQL's lexer,
            // and these two-character starts beat the one-letter identifier.
            'e' | 'E' if next == Some('\'') => {
                self.pos += 2;
                Token::Str(self.quoted('\'', true)?)
            }
            'b' | 'B' | 'x' | 'X' | 'n' | 'N' if next == Some('\'') => {
                self.pos += 2;
                Token::Str(self.quoted('\'', false)?)
            }
            // U&'...' and U&"...": Unicode escapes, decoded once the UESCAPE clause (if
            // any) is known.
            'u' | 'U' if next == Some('&') && matches!(self.peek(2), Some('\'' | '"')) => {
                let quote = self.peek(2).unwrap_or('\'');
                self.pos += 3;
                let raw = self.quoted(quote, false)?;
                let marker = if quote == '\'' {
                    UNICODE_STR
                } else {
                    UNICODE_IDENT
                };
                Token::Quoted(format!("{marker}{raw}"))
            }
            '$' => self.dollar()?,
            c if is_ident_start(c) => {
                let start = self.pos;
                while self.peek(0).is_some_and(is_ident_cont) {
                    self.pos += 1;
                }
                let word: String = self.chars[start..self.pos].iter().collect();
                Token::Word(word.to_ascii_lowercase())
            }
            c if c.is_ascii_digit() || (c == '.' && next.is_some_and(|d| d.is_ascii_digit())) => {
                while self
                    .peek(0)
                    .is_some_and(|d| d.is_ascii_alphanumeric() || d == '_' || d == '.')
                {
                    self.pos += 1;
                }
                Token::Other
            }
            ';' => {
                self.pos += 1;
                Token::Semicolon
            }
            '(' => {
                self.pos += 1;
                Token::LParen
            }
            ')' => {
                self.pos += 1;
                Token::RParen
            }
            '.' => {
                self.pos += 1;
                Token::Dot
            }
            _ => {
                // Operators one character at a time: a comment start inside an operator
                // (`+--`, `*/*`) ends the operator in PostgreSQL too, and the loop above sees
                // it at the next position.
                self.pos += 1;
                Token::Other
            }
        };
        Ok(Some(token))
    }

    /// A `/* */` comment; PostgreSQL nests them.
    fn block_comment(&mut self) -> Result<(), Refused> {
        let mut depth = 0usize;
        loop {
            if self.starts_with("/*") {
                depth += 1;
                self.pos += 2;
            } else if self.starts_with("*/") {
                depth -= 1;
                self.pos += 2;
                if depth == 0 {
                    return Ok(());
                }
            } else if self.peek(0).is_some() {
                self.pos += 1;
            } else {
                return Err(Refused::Unterminated("comment"));
            }
        }
    }

    /// The rest of a quoted string or identifier after its opening quote: a doubled quote
    /// stands for itself; with `backslash`, `\` escapes the next character (E'' strings).
    fn quoted(&mut self, quote: char, backslash: bool) -> Result<String, Refused> {
        let what = if quote == '"' {
            "quoted identifier"
        } else {
            "string"
        };
        let mut out = String::new();
        loop {
            match self.peek(0) {
                None => return Err(Refused::Unterminated(what)),
                Some('\\') if backslash => {
                    let (decoded, used) = decode_backslash(&self.chars[self.pos + 1..]);
                    if used == 0 {
                        return Err(Refused::Unterminated(what));
                    }
                    out.push_str(&decoded);
                    self.pos += 1 + used;
                }
                Some(c) if c == quote => {
                    if self.peek(1) == Some(quote) {
                        out.push(quote);
                        self.pos += 2;
                    } else {
                        self.pos += 1;
                        return Ok(out);
                    }
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// `$` at the start of a token: a parameter (`$1`), or a dollar-quoted string
    /// (`$$...$$`, `$tag$...$tag$`, the tag an identifier without `$`).
    fn dollar(&mut self) -> Result<Token, Refused> {
        if self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
            while self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
            return Ok(Token::Other);
        }
        let mut end = self.pos + 1;
        if self.chars.get(end).copied().is_some_and(is_ident_start) {
            while self
                .chars
                .get(end)
                .copied()
                .is_some_and(|c| is_ident_cont(c) && c != '$')
            {
                end += 1;
            }
        }
        if self.chars.get(end) != Some(&'$') {
            // A lone `$`: PostgreSQL rejects it; nothing is hidden behind it.
            self.pos += 1;
            return Ok(Token::Other);
        }
        let delimiter: Vec<char> = self.chars[self.pos..=end].to_vec();
        let body_start = end + 1;
        let mut k = body_start;
        while k + delimiter.len() <= self.chars.len() {
            if self.chars[k..k + delimiter.len()] == delimiter[..] {
                let body: String = self.chars[body_start..k].iter().collect();
                self.pos = k + delimiter.len();
                return Ok(Token::Str(body));
            }
            k += 1;
        }
        Err(Refused::Unterminated("dollar-quoted string"))
    }
}

/// One backslash escape of an E'' string (after the backslash): the text it stands for and
/// how many characters it used (0: the input ended).
fn decode_backslash(rest: &[char]) -> (String, usize) {
    let Some(&c) = rest.first() else {
        return (String::new(), 0);
    };
    let hex_run = |max: usize| {
        rest[1..]
            .iter()
            .take(max)
            .take_while(|d| d.is_ascii_hexdigit())
            .count()
    };
    let code = |digits: &[char], radix: u32| {
        let s: String = digits.iter().collect();
        u32::from_str_radix(&s, radix)
            .ok()
            .and_then(char::from_u32)
            .map(String::from)
            .unwrap_or_default()
    };
    match c {
        'b' => ("\u{8}".into(), 1),
        'f' => ("\u{c}".into(), 1),
        'n' => ("\n".into(), 1),
        'r' => ("\r".into(), 1),
        't' => ("\t".into(), 1),
        '0'..='7' => {
            let n = rest
                .iter()
                .take(3)
                .take_while(|d| matches!(**d, '0'..='7'))
                .count();
            (code(&rest[..n], 8), n)
        }
        'x' if hex_run(2) > 0 => {
            let n = hex_run(2);
            (code(&rest[1..=n], 16), 1 + n)
        }
        'u' if hex_run(4) == 4 => (code(&rest[1..5], 16), 5),
        'U' if hex_run(8) == 8 => (code(&rest[1..9], 16), 9),
        other => (other.to_string(), 1),
    }
}

/// Markers the lexer puts in front of a `U&` token's raw text until `attach_uescape`
/// decodes it (private-use characters that cannot come from the lexer otherwise).
const UNICODE_STR: char = '\u{F8F0}';
const UNICODE_IDENT: char = '\u{F8F1}';

/// Decodes `U&'...'` and `U&"..."` tokens with their escape character: `\` unless a
/// `UESCAPE 'c'` clause follows. A token that cannot be decoded keeps its raw text, which is
/// the text PostgreSQL would refuse anyway.
fn attach_uescape(tokens: &mut [Token]) {
    for k in 0..tokens.len() {
        let Token::Quoted(raw) = &tokens[k] else {
            continue;
        };
        let mut chars = raw.chars();
        let kind = chars.next();
        if kind != Some(UNICODE_STR) && kind != Some(UNICODE_IDENT) {
            continue;
        }
        let raw: Vec<char> = chars.collect();
        let escape = match (tokens.get(k + 1), tokens.get(k + 2)) {
            (Some(Token::Word(w)), Some(Token::Str(e))) if w == "uescape" => {
                e.chars().next().unwrap_or('\\')
            }
            _ => '\\',
        };
        let decoded = decode_unicode(&raw, escape).unwrap_or_else(|| raw.iter().collect());
        tokens[k] = if kind == Some(UNICODE_STR) {
            Token::Str(decoded)
        } else {
            Token::Quoted(decoded)
        };
    }
}

/// `U&` escapes: `<e><e>`, `<e>XXXX`, `<e>+XXXXXX`, with UTF-16 surrogate pairs.
fn decode_unicode(raw: &[char], escape: char) -> Option<String> {
    let mut out = String::new();
    let mut k = 0;
    let mut high: Option<u32> = None;
    while k < raw.len() {
        if raw[k] != escape {
            if high.is_some() {
                return None;
            }
            out.push(raw[k]);
            k += 1;
            continue;
        }
        if raw.get(k + 1) == Some(&escape) {
            out.push(escape);
            k += 2;
            continue;
        }
        let (digits, used) = if raw.get(k + 1) == Some(&'+') {
            (raw.get(k + 2..k + 8)?, 8)
        } else {
            (raw.get(k + 1..k + 5)?, 5)
        };
        let s: String = digits.iter().collect();
        let cp = u32::from_str_radix(&s, 16).ok()?;
        match (high.take(), cp) {
            (None, 0xD800..=0xDBFF) => high = Some(cp),
            (Some(h), 0xDC00..=0xDFFF) => out.push(char::from_u32(
                0x10000 + ((h - 0xD800) << 10) + (cp - 0xDC00),
            )?),
            (Some(_), _) => return None,
            (None, cp) => out.push(char::from_u32(cp)?),
        }
        k += used;
    }
    high.is_none().then_some(out)
}

// ---------------------------------------------------------------------------------------
// The allowlist.

fn refuse(command: impl Into<String>, why: &'static str) -> Refused {
    Refused::Command {
        command: command.into(),
        why,
    }
}

const TRANSACTION_CONTROL: &str = "transaction control belongs to the coordinator group; send \
     only the statements of the transaction (SAVEPOINT, RELEASE and ROLLBACK TO SAVEPOINT are \
     fine)";
const TRANSACTION_CHARACTERISTICS: &str = "the agent opens the branch's transaction and \
     writes its commit proof in it: it cannot be made read-only, and its isolation level is \
     fixed before the first statement runs";
const SESSION_STATE: &str = "it changes the session of a pooled connection, which outlives the \
     branch; use SET LOCAL for settings of this transaction";

/// The statement's leading command must be one a branch may run.
fn command(tokens: &[Token]) -> Result<(), Refused> {
    let parens = tokens.iter().take_while(|t| **t == Token::LParen).count();
    let Some(first) = tokens.get(parens) else {
        return Err(Refused::Syntax("end of input".into()));
    };
    let Some(word) = first.word() else {
        return Err(Refused::Syntax(first.to_string()));
    };
    let rest = &tokens[parens + 1..];
    if parens > 0 {
        return match word {
            "select" | "values" | "with" | "table" => Ok(()),
            _ => Err(refuse(
                format!("({}", word.to_ascii_uppercase()),
                "only a query (SELECT, VALUES, WITH, TABLE) may start with a parenthesis",
            )),
        };
    }
    let upper = word.to_ascii_uppercase();
    match word {
        "select" | "insert" | "update" | "delete" | "merge" | "with" | "values" | "table"
        | "lock" | "show" | "savepoint" | "release" | "truncate" | "comment" => Ok(()),
        "explain" => explain(rest),
        "rollback" => rollback(rest),
        "set" => set(rest),
        "create" | "alter" | "drop" => ddl(&upper, rest),
        "begin" | "start" | "commit" | "end" | "abort" => Err(refuse(upper, TRANSACTION_CONTROL)),
        "prepare" => Err(match rest.first().and_then(Token::word) {
            Some("transaction") => refuse("PREPARE TRANSACTION", TRANSACTION_CONTROL),
            _ => refuse(
                upper,
                "prepared statements are the agent's own (its connection pool caches them); \
                 send the statement itself with parameters",
            ),
        }),
        "execute" | "deallocate" => Err(refuse(
            upper,
            "prepared statements are the agent's own (its connection pool caches them); send \
             the statement itself with parameters",
        )),
        "reset" | "discard" => Err(refuse(upper, SESSION_STATE)),
        "listen" | "unlisten" | "notify" => Err(refuse(
            upper,
            "notifications belong to a session, and a branch's connection is shared; use \
             pg_notify() in a query if the transaction must notify",
        )),
        "load" => Err(refuse(
            upper,
            "it loads code into a shared connection's session",
        )),
        "copy" => Err(refuse(
            upper,
            "COPY is not supported through Execute; use INSERT with parameters",
        )),
        "call" | "do" => Err(refuse(
            upper,
            "procedures and DO blocks can end the transaction or act outside it",
        )),
        "declare" | "fetch" | "move" | "close" => Err(refuse(
            upper,
            "cursors are not supported through Execute; run the query itself",
        )),
        "vacuum" | "analyze" | "analyse" | "checkpoint" | "cluster" | "reindex" => Err(refuse(
            upper,
            "maintenance commands belong to the database administrator, not to a transaction",
        )),
        w if COMMAND_KEYWORDS.contains(&w) => Err(refuse(
            upper,
            "it is not among the commands a branch may run (queries, INSERT, UPDATE, DELETE, \
             MERGE, LOCK, SAVEPOINT, SET LOCAL, CREATE/ALTER/DROP, TRUNCATE, COMMENT)",
        )),
        _ => Err(Refused::Syntax(format!("\"{}\"", first_text(first)))),
    }
}

/// The keywords a PostgreSQL statement can start with (gram.y's `stmt`). A leading word
/// outside this list is a syntax error to PostgreSQL, and is reported as one; a command of
/// this list that the allowlist above does not name is refused as not allowed.
const COMMAND_KEYWORDS: &[&str] = &[
    "abort",
    "alter",
    "analyse",
    "analyze",
    "begin",
    "call",
    "checkpoint",
    "close",
    "cluster",
    "comment",
    "commit",
    "copy",
    "create",
    "deallocate",
    "declare",
    "delete",
    "discard",
    "do",
    "drop",
    "end",
    "execute",
    "explain",
    "fetch",
    "grant",
    "import",
    "insert",
    "listen",
    "load",
    "lock",
    "merge",
    "move",
    "notify",
    "prepare",
    "reassign",
    "refresh",
    "reindex",
    "release",
    "reset",
    "revoke",
    "rollback",
    "savepoint",
    "security",
    "select",
    "set",
    "show",
    "start",
    "table",
    "truncate",
    "unlisten",
    "update",
    "vacuum",
    "values",
    "wait",
    "with",
];

/// A token as the client wrote it, for messages (words keep PostgreSQL's folded form).
fn first_text(t: &Token) -> String {
    match t {
        Token::Word(w) => w.to_ascii_uppercase(),
        other => other.to_string(),
    }
}

/// `EXPLAIN [ANALYZE] [VERBOSE] stmt` and `EXPLAIN (options) stmt`: ANALYZE runs the
/// statement, so the statement itself must be one a branch may run, and a plannable one.
fn explain(rest: &[Token]) -> Result<(), Refused> {
    let mut k = 0;
    if rest.first() == Some(&Token::LParen) {
        let mut depth = 0usize;
        for t in rest {
            k += 1;
            match t {
                Token::LParen => depth += 1,
                Token::RParen => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
    } else {
        while matches!(
            rest.get(k).and_then(Token::word),
            Some("analyze" | "analyse" | "verbose")
        ) {
            k += 1;
        }
    }
    let inner = &rest[k.min(rest.len())..];
    let lead = inner
        .iter()
        .find(|t| **t != Token::LParen)
        .and_then(Token::word);
    match lead {
        Some(
            "select" | "insert" | "update" | "delete" | "merge" | "with" | "values" | "table"
            | "create",
        ) => command(inner),
        _ => Err(refuse(
            format!(
                "EXPLAIN {}",
                lead.map(str::to_ascii_uppercase).unwrap_or_default()
            )
            .trim_end()
            .to_string(),
            "EXPLAIN is allowed for queries and INSERT/UPDATE/DELETE/MERGE only",
        )),
    }
}

/// Only `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name`: the plain form ends the
/// transaction.
fn rollback(rest: &[Token]) -> Result<(), Refused> {
    let mut words = rest.iter().map(Token::word);
    let mut next = words.next().flatten();
    if matches!(next, Some("work" | "transaction")) {
        next = words.next().flatten();
    }
    if next == Some("to") {
        return Ok(());
    }
    let command = match rest.first().and_then(Token::word) {
        Some("prepared") => "ROLLBACK PREPARED",
        _ => "ROLLBACK",
    };
    Err(refuse(command, TRANSACTION_CONTROL))
}

/// Settings the agent sets for every branch, or that would break the connection, the
/// identity the branch runs as, or how the guard reads strings.
const FIXED_SETTINGS: &[&str] = &[
    "lock_timeout",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "transaction_timeout",
    "idle_session_timeout",
    "role",
    "session_authorization",
    "client_encoding",
    "standard_conforming_strings",
];

/// `SET LOCAL` (this transaction only) and `SET CONSTRAINTS`; every other SET outlives the
/// branch on its pooled connection.
fn set(rest: &[Token]) -> Result<(), Refused> {
    match rest.first().and_then(Token::word) {
        Some("local") => {}
        Some("constraints") => return Ok(()),
        Some("transaction") => return Err(refuse("SET TRANSACTION", TRANSACTION_CHARACTERISTICS)),
        _ => return Err(refuse("SET", SESSION_STATE)),
    }
    let rest = &rest[1..];
    let name = match rest.first() {
        Some(Token::Word(w)) => match w.as_str() {
            // SET LOCAL SESSION AUTHORIZATION / SESSION CHARACTERISTICS
            "session" => {
                return Err(refuse(
                    "SET LOCAL SESSION",
                    "a branch runs as the agent's database user",
                ))
            }
            "names" => "client_encoding".to_string(),
            "time" => "timezone".to_string(),
            "schema" => "search_path".to_string(),
            "transaction" => {
                return Err(refuse("SET LOCAL TRANSACTION", TRANSACTION_CHARACTERISTICS))
            }
            "xml" => return Ok(()),
            _ => dotted_name(rest),
        },
        Some(Token::Quoted(_)) => dotted_name(rest),
        _ => return Err(refuse("SET LOCAL", "a setting name must follow SET LOCAL")),
    };
    // GUC names are case-insensitive, even quoted ones.
    let lower = name.to_lowercase();
    if FIXED_SETTINGS.contains(&lower.as_str()) {
        return Err(refuse(format!("SET LOCAL {lower}"), FIXED_WHY));
    }
    if lower.starts_with("transaction_") {
        return Err(refuse(
            format!("SET LOCAL {lower}"),
            TRANSACTION_CHARACTERISTICS,
        ));
    }
    Ok(())
}

const FIXED_WHY: &str = "the agent fixes this setting for every branch (timeouts bound how \
     long a branch holds its locks and its connection; the rest would change who the branch \
     runs as or break the connection)";

/// `set_config('<fixed setting>', ..)` does what `SET LOCAL` of it would. Only a literal name
/// is seen here (one built at run time is not); for the timeouts, the effect ends with the
/// branch's connection session being reset anyway.
fn fixed_settings_untouched(tokens: &[Token]) -> Result<(), Refused> {
    for w in tokens.windows(3) {
        if let [Token::Word(f), Token::LParen, Token::Str(name)] = w {
            let name = name.trim().to_lowercase();
            if f == "set_config" && FIXED_SETTINGS.contains(&name.as_str()) {
                return Err(refuse(format!("set_config('{name}', ..)"), FIXED_WHY));
            }
        }
    }
    Ok(())
}

/// `name` or `name.name...` at the start of `tokens`, each part a word or quoted identifier.
fn dotted_name(tokens: &[Token]) -> String {
    let mut name = String::new();
    let mut k = 0;
    while let Some(Token::Word(part) | Token::Quoted(part)) = tokens.get(k) {
        name.push_str(part);
        if tokens.get(k + 1) != Some(&Token::Dot) {
            break;
        }
        name.push('.');
        k += 2;
    }
    name
}

/// Words that may stand between CREATE/ALTER/DROP and the kind of object.
const DDL_MODIFIERS: &[&str] = &[
    "or",
    "replace",
    "temp",
    "temporary",
    "unlogged",
    "global",
    "local",
    "unique",
    "trusted",
    "procedural",
    "default",
    "constraint",
    "recursive",
];

/// Functions a branch may not call by name. They reach beyond the branch (other sessions,
/// including the agent's own: terminating its lock's session would stop it), keep session
/// state past it (session advisory locks, `set_config`: `SET LOCAL` is the way), or run
/// SQL built from a string at run time, which no guard reading the statement can see
/// (`query_to_xml`, `ts_stat`, dblink). Best effort, as any reading of names is: the
/// privileges of the database role are the real fence (README, "The agent's PostgreSQL
/// role").
const DENIED_FUNCTIONS: &[&str] = &[
    "set_config",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "ts_stat",
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "dblink_connect_u",
    "dblink_send_query",
    "dblink_open",
    "pg_reload_conf",
    "pg_read_file",
    "pg_read_binary_file",
    "lo_import",
    "lo_export",
];

fn no_denied_function(tokens: &[Token]) -> Result<(), Refused> {
    for t in tokens {
        if let Token::Word(name) | Token::Quoted(name) = t {
            let name = name.to_lowercase();
            if DENIED_FUNCTIONS.contains(&name.as_str()) {
                return Err(refuse(
                    name,
                    "it reaches beyond the branch (other sessions, session state, or SQL built \
                     at run time)",
                ));
            }
        }
    }
    Ok(())
}

/// Transactional DDL is fine, but not for objects that run code later, in other branches or
/// as another role (functions, triggers, rules, operators, casts...): schema code belongs to
/// migrations, not to a transfer. Objects of the whole cluster (databases, tablespaces,
/// roles) and the server's configuration are not a branch's business either.
fn ddl(verb: &str, rest: &[Token]) -> Result<(), Refused> {
    let mut words = rest
        .iter()
        .map(Token::word)
        .skip_while(|w| w.is_some_and(|w| DDL_MODIFIERS.contains(&w)));
    let object = words.next().flatten();
    let after = words.next().flatten();
    let why = match object {
        Some("database") => "it acts on the whole cluster, outside the branch's transaction",
        Some("tablespace") => "tablespaces belong to the whole cluster",
        Some("system") => "the server's configuration is not a transaction's business",
        Some("role" | "group") => "roles belong to the whole cluster",
        Some("user") if after != Some("mapping") => "roles belong to the whole cluster",
        Some(
            "function" | "procedure" | "trigger" | "rule" | "event" | "aggregate" | "operator"
            | "cast" | "language" | "extension" | "routine" | "transform" | "conversion" | "policy"
            | "publication" | "subscription" | "server",
        ) => "it installs code or access rules that run later, outside this branch",
        Some("owned") => "it acts on every object the agent's role owns",
        _ => return Ok(()),
    };
    let object = object.unwrap_or_default().to_ascii_uppercase();
    Err(refuse(format!("{verb} {object}"), why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sql: &str) -> Refused {
        match check(sql) {
            Ok(()) => panic!("accepted: {sql:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn ordinary_statements_pass() {
        for sql in [
            "SELECT 1",
            "select 1;",
            "SELECT 1;;  ",
            ";SELECT 1",
            "UPDATE accounts SET balance = balance - $1 WHERE id = $2",
            "INSERT INTO transfers (txid, account, delta) VALUES ($1, $2, $3)",
            "INSERT INTO accounts SELECT g, $1 FROM generate_series(1, $2) g",
            "DELETE FROM t WHERE x = 'a;b'",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET x = s.x",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT count(*) FROM d",
            "VALUES (1), (2)",
            "TABLE accounts",
            "(SELECT 1) UNION (SELECT 2)",
            "((VALUES (1)))",
            "  /* why */ -- because\n SELECT 1",
            "LOCK TABLE accounts IN SHARE MODE",
            "SHOW search_path",
            "EXPLAIN SELECT 1",
            "EXPLAIN ANALYZE VERBOSE UPDATE t SET x = 1",
            "EXPLAIN (ANALYZE, BUFFERS) SELECT 1",
            "SAVEPOINT a",
            "RELEASE SAVEPOINT a",
            "RELEASE a",
            "ROLLBACK TO SAVEPOINT a",
            "rollback to a",
            "ROLLBACK WORK TO SAVEPOINT a",
            "ROLLBACK/**/TO a",
            "SET LOCAL search_path = app, public",
            "SET LOCAL work_mem = '64MB'",
            "SET LOCAL TIME ZONE 'UTC'",
            "SET LOCAL app.user_id = '42'",
            "SET LOCAL default_transaction_read_only = on",
            "SET CONSTRAINTS ALL DEFERRED",
            "CREATE TABLE t (id int primary key, note text default 'x;y')",
            "CREATE UNIQUE INDEX database ON t (id)",
            "CREATE TABLE database (id int)",
            "CREATE USER MAPPING FOR CURRENT_USER SERVER s",
            "ALTER TABLE t ADD COLUMN y int",
            "DROP TABLE IF EXISTS t",
            "TRUNCATE t",
            "COMMENT ON TABLE t IS 'it''s a table; really'",
            "SELECT E'it\\'s; fine'",
            "SELECT 'a' -- trailing comment ; COMMIT",
            "SELECT $1::text, $2",
            "SELECT \"weird;name\" FROM t",
            "SELECT 1 /* nested /* comment */ still ; comment */",
            "SELECT x$$y FROM t",
            "SELECT 1 AS commit",
            "SELECT U&'\\0041'",
            "SELECT current_setting('statement_timeout')",
        ] {
            assert_eq!(check(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn code_and_reach_beyond_the_branch_are_refused() {
        for sql in [
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$",
            "CREATE FUNCTION g() RETURNS int LANGUAGE plpgsql AS $body$ BEGIN RETURN 1; END $body$",
            "create procedure p() language sql as 'select 1'",
            "CREATE TRIGGER t AFTER INSERT ON x FOR EACH ROW EXECUTE FUNCTION f()",
            "CREATE OR REPLACE RULE r AS ON INSERT TO x DO INSTEAD NOTHING",
            "CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION f()",
            "CREATE CONSTRAINT TRIGGER t AFTER INSERT ON x FOR EACH ROW EXECUTE FUNCTION f()",
            "ALTER FUNCTION f() OWNER TO someone",
            "DROP OWNED BY CURRENT_USER",
            "CREATE EXTENSION dblink",
            "SELECT set_config('app.user', 'x', true)",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
            "SELECT pg_catalog.pg_advisory_lock(1)",
            "SELECT \"pg_cancel_backend\"(1)",
            "SELECT query_to_xml('DELETE FROM t RETURNING 1', true, false, '')",
            "SELECT * FROM ts_stat('SELECT 1')",
        ] {
            assert!(
                matches!(check(sql), Err(Refused::Command { .. })),
                "{sql}: {:?}",
                check(sql)
            );
        }
        // Transaction-scoped advisory locks end with the branch: fine.
        assert_eq!(check("SELECT pg_advisory_xact_lock(1)"), Ok(()));
    }

    #[test]
    fn transaction_control_is_refused_however_it_is_dressed() {
        for sql in [
            "COMMIT",
            "commit;",
            "  begin",
            "BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "START TRANSACTION",
            "END",
            "ABORT",
            "ROLLBACK",
            "rollback;",
            "ROLLBACK WORK",
            "ROLLBACK AND CHAIN",
            "ROLLBACK PREPARED 'x'",
            "COMMIT PREPARED 'x'",
            "PREPARE TRANSACTION 'x'",
            "/* note */ COMMIT",
            "-- x\nROLLBACK",
            "-- x\rROLLBACK",
            "/**/PREPARE TRANSACTION 'x'",
            "/* a /* b */ c */ COMMIT",
            "/* a /* b */ SELECT 1 */ COMMIT",
            "\tCoMmIt",
            "\x0cCOMMIT",
            "\x0bCOMMIT",
            "(COMMIT)",
            "((ROLLBACK))",
            "EXPLAIN ANALYZE COMMIT",
        ] {
            assert!(
                matches!(refused(sql), Refused::Command { .. }),
                "{sql:?}: {}",
                refused(sql)
            );
        }
    }

    #[test]
    fn more_than_one_statement_is_refused() {
        for sql in [
            "SELECT 1; COMMIT",
            "SELECT 1;COMMIT",
            "SELECT 1; /* */ COMMIT",
            "SELECT 'a'; SELECT 'b'",
            "SELECT 'a''b'; COMMIT",
            "SELECT E'a\\''; COMMIT",
            "SELECT $$x$$; COMMIT",
            "SELECT $a$ $b$ $a$; COMMIT",
            "SELECT \"a\"\"b\"; COMMIT",
            "SELECT 1 /* c */; ROLLBACK",
            "SELECT 1 --x\n; ROLLBACK",
            "UPDATE t SET x = 1 ; PREPARE TRANSACTION 'x'",
        ] {
            assert_eq!(refused(sql), Refused::Multiple, "{sql:?}");
        }
    }

    #[test]
    fn quotes_and_comments_cannot_hide_a_command() {
        // Whatever the guard thinks is inside a quote or comment, PostgreSQL does too.
        for sql in [
            // An E'' string ends at the first unescaped quote.
            "SELECT E'\\\\'; COMMIT",
            // A standard string does not treat a backslash as an escape.
            "SELECT '\\'; COMMIT; --'",
            // A tagged dollar quote is not closed by another tag.
            "SELECT $a$ $b$; $a$; COMMIT",
            // `$1$` is a parameter and a `$`, not a dollar quote.
            "SELECT $1$; COMMIT",
            // `--` inside an operator starts a comment, and the comment ends at the newline.
            "SELECT 1 +--x\n; COMMIT",
            // A block comment's end inside a line comment does not count, and vice versa.
            "SELECT 1 -- */\n; COMMIT",
        ] {
            assert!(check(sql).is_err(), "{sql:?}");
        }
        for (sql, why) in [
            ("SELECT 'unterminated", Refused::Unterminated("string")),
            ("SELECT \"x", Refused::Unterminated("quoted identifier")),
            ("SELECT $$x", Refused::Unterminated("dollar-quoted string")),
            ("SELECT E'x\\", Refused::Unterminated("string")),
            ("/* /* */ COMMIT", Refused::Unterminated("comment")),
            ("SELECT 1\0; COMMIT", Refused::Nul),
        ] {
            assert_eq!(refused(sql), why, "{sql:?}");
        }
    }

    #[test]
    fn unicode_lookalikes_are_not_whitespace() {
        // PostgreSQL reads a non-ASCII space as part of an identifier: these are not
        // COMMIT to it, nor to the guard, and they are refused as unknown commands.
        for sql in [
            "\u{a0}COMMIT",
            "\u{2003}ROLLBACK",
            "\u{feff}COMMIT",
            "\u{3000}PREPARE TRANSACTION 'x'",
            "COMM\u{130}T",
            "\u{ff23}OMMIT",
        ] {
            assert!(matches!(refused(sql), Refused::Syntax(_)), "{sql:?}");
        }
        assert_eq!(refused("   \n\t"), Refused::Empty);
        assert_eq!(refused("-- only a comment"), Refused::Empty);
        assert_eq!(refused("/* x */ ; ;"), Refused::Empty);
    }

    #[test]
    fn session_state_is_refused() {
        for sql in [
            "SET lock_timeout = 0",
            "SET search_path = evil",
            "set session search_path = x",
            "SET SESSION AUTHORIZATION postgres",
            "SET ROLE postgres",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET LOCAL TRANSACTION READ ONLY",
            "SET LOCAL transaction_read_only = on",
            "SET LOCAL \"Transaction_Isolation\" = 'serializable'",
            "SET LOCAL lock_timeout = 0",
            "SET LOCAL LOCK_TIMEOUT TO 0",
            "SET LOCAL \"lock_timeout\" = 0",
            "SET LOCAL \"Statement_Timeout\" = 0",
            "SET LOCAL U&\"lock\\005ftimeout\" = 0",
            "SET LOCAL U&\"lock!005ftimeout\" UESCAPE '!' = 0",
            "SET LOCAL statement_timeout = 0",
            "SET LOCAL idle_in_transaction_session_timeout = 0",
            "SET LOCAL transaction_timeout = 0",
            "SET LOCAL ROLE postgres",
            "SET LOCAL SESSION AUTHORIZATION postgres",
            "SET LOCAL NAMES 'LATIN1'",
            "SET LOCAL client_encoding = 'LATIN1'",
            "SET LOCAL standard_conforming_strings = off",
            "RESET ALL",
            "RESET lock_timeout",
            "DISCARD ALL",
            "LISTEN x",
            "UNLISTEN *",
            "NOTIFY x",
            "LOAD 'evil'",
            "PREPARE s AS SELECT 1",
            "EXECUTE s",
            "DEALLOCATE ALL",
            "COPY t FROM STDIN",
            "CALL p()",
            "DO $$ BEGIN COMMIT; END $$",
            "VACUUM t",
            "CHECKPOINT",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "FETCH c",
            "MOVE c",
            "CLOSE c",
            "GRANT SELECT ON t TO PUBLIC",
            "CREATE DATABASE x",
            "DROP DATABASE IF EXISTS x",
            "ALTER DATABASE x SET lock_timeout = 0",
            "CREATE TABLESPACE x LOCATION '/tmp'",
            "ALTER SYSTEM SET fsync = off",
            "ALTER ROLE CURRENT_USER SET default_transaction_read_only = on",
            "ALTER USER me SET statement_timeout = 1",
            "CREATE ROLE x",
            "DROP USER x",
            "EXPLAIN EXECUTE s",
            "EXPLAIN ANALYZE DECLARE c CURSOR FOR SELECT 1",
            "ANALYZE t",
            "SELECT set_config('statement_timeout', '0', false)",
            "SELECT pg_catalog.set_config( 'Lock_Timeout' , '0', true)",
            "SELECT set_config(U&'role', 'postgres', false)",
            "REFRESH MATERIALIZED VIEW v",
        ] {
            assert!(
                matches!(refused(sql), Refused::Command { .. }),
                "{sql:?}: {}",
                refused(sql)
            );
        }
    }

    #[test]
    fn what_is_not_a_command_is_a_syntax_error() {
        for sql in [
            "UPDAT accounts SET",
            "\"select\" 1",
            "'SELECT'",
            "$1",
            "(",
            "42",
        ] {
            let e = refused(sql);
            assert!(matches!(e, Refused::Syntax(_)), "{sql:?}: {e}");
            assert!(e.to_string().contains("syntax error"), "{e}");
        }
        assert!(refused("UPDAT accounts SET")
            .to_string()
            .contains("\"UPDAT\""));
    }

    #[test]
    fn the_agents_namespace_is_off_limits() {
        for sql in [
            "SET LOCAL paxos_commit.branch = 'x'",
            "SET LOCAL \"paxos_commit\".branch = 'x'",
            "SET LOCAL \"PAXOS_COMMIT.branch\" = 'x'",
            "SELECT set_config('paxos_commit.branch', 'x', false)",
            "SELECT set_config(E'paxos\\137commit.branch', 'x', false)",
            "SELECT set_config(U&'paxos\\005fcommit.branch', 'x', false)",
            "DELETE FROM paxos_commit.committed",
            "CREATE OR REPLACE FUNCTION Paxos_Commit.assert_branch(text) RETURNS void \
             LANGUAGE sql AS ''",
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN DELETE FROM \
             paxos_commit.committed; END $$",
            "SELECT * FROM U&\"paxos\\005fcommit\".committed",
            "SET LOCAL search_path = 'paxos_commit'",
        ] {
            assert_eq!(refused(sql), Refused::Reserved, "{sql:?}");
        }
        // In a comment it is harmless.
        assert_eq!(check("SELECT 1 -- paxos_commit"), Ok(()));
    }

    #[test]
    fn refusals_name_the_command_and_the_reason() {
        let e = refused("/* x */ commit").to_string();
        assert!(e.contains("COMMIT is not allowed"), "{e}");
        assert!(e.contains("coordinator"), "{e}");
        let e = refused("SET search_path = x").to_string();
        assert!(e.contains("SET LOCAL"), "{e}");
        let e = refused("SET LOCAL Lock_Timeout = 0").to_string();
        assert!(e.contains("SET LOCAL lock_timeout"), "{e}");
        let e = refused("PREPARE TRANSACTION 'x'").to_string();
        assert!(e.contains("PREPARE TRANSACTION"), "{e}");
    }

    #[test]
    fn escapes_decode() {
        assert_eq!(
            decode_unicode(&"a\\0041\\+01F600\\\\".chars().collect::<Vec<_>>(), '\\'),
            Some("aA\u{1F600}\\".into())
        );
        assert_eq!(
            decode_unicode(&"\\D83D\\DE00".chars().collect::<Vec<_>>(), '\\'),
            Some("\u{1F600}".into())
        );
        assert_eq!(
            decode_unicode(&"\\D83Dx".chars().collect::<Vec<_>>(), '\\'),
            None
        );
        let lexed = lex("E'\\x41\\101\\u0041\\n'").unwrap();
        assert_eq!(lexed, vec![Token::Str("AAA\n".into())]);
    }
}
