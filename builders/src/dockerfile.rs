//! The base images of a Dockerfile: its `FROM` lines after build-argument
//! expansion, normalised to `registry/repository:tag[@digest]`.
//!
//! This is a reader of just the parts of the Dockerfile grammar that decide
//! which images a build pulls: parser directives (`# escape=`), line
//! continuations, comments, heredocs (so their bodies are not read as
//! instructions), `ARG`s declared before the first `FROM` (overridden by build
//! arguments), `FROM [--platform=...] image [AS name]` and `COPY/ADD
//! --from=image`. It does not validate the rest of the file: the engine does
//! that, and reports its own errors. Pure functions, no I/O.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use dockyard_oci::{Digest, RepoName, Tag};

/// The registry of references without a host.
pub const DOCKER_HUB: &str = "docker.io";

/// A normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    /// `host[:port]`, lowercase; `docker.io` when the reference names none.
    pub registry: String,
    /// The repository on that registry; Docker Hub's official images get
    /// their `library/` prefix.
    pub repository: String,
    /// The tag; `latest` when the reference had neither tag nor digest.
    pub tag: Option<String>,
    /// A pinned digest (`sha256:...`).
    pub digest: Option<String>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct RefError {
    pub reference: String,
    pub reason: String,
}

impl ImageRef {
    /// Parses and normalises a reference the way Docker does
    /// (`ubuntu` → `docker.io/library/ubuntu:latest`).
    pub fn parse(s: &str) -> Result<ImageRef, RefError> {
        let err = |reason: &str| RefError {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(err("empty"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("contains white space"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((name, digest)) => {
                let d: Digest = digest.parse().map_err(|e| err(&format!("{e}")))?;
                (name, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is a ':' after the last '/', so `host:5000/app` has none.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                let tag = &name[i + 1..];
                tag.parse::<Tag>().map_err(|e| err(&e.to_string()))?;
                (&name[..i], Some(tag.to_string()))
            }
            None => (name, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                (first.to_ascii_lowercase(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if !valid_host(&registry) {
            return Err(err("invalid registry host"));
        }
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        repository
            .parse::<RepoName>()
            .map_err(|e| err(&e.to_string()))?;
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (tag, _) => tag,
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Whether this image lives on `registry` (`host:port`, as a job names
    /// its registry).
    pub fn is_on(&self, registry: &str) -> bool {
        let registry = registry.trim_end_matches('/');
        let registry = registry
            .strip_prefix("https://")
            .or_else(|| registry.strip_prefix("http://"))
            .unwrap_or(registry);
        self.registry.eq_ignore_ascii_case(registry)
    }

    /// What to put in `/v2/<repository>/manifests/<reference>`: the digest
    /// when pinned, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

fn valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        // [IPv6]:port
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return false;
        }
        match after.strip_prefix(':') {
            Some(p) => ("x", Some(p)),
            None if after.is_empty() => ("x", None),
            None => return false,
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    let name_ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    name_ok && port_ok
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = RefError;
    fn from_str(s: &str) -> Result<Self, RefError> {
        ImageRef::parse(s)
    }
}

/// Why a Dockerfile could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct DockerfileError {
    /// 1-based line of the instruction.
    pub line: usize,
    pub message: String,
}

/// One `FROM` of a Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The stage's `AS` name, lowercase.
    pub name: Option<String>,
    /// The base as written after expansion (`ubuntu:22.04`, `scratch`, `builder`).
    pub base: String,
    /// `--platform=` after expansion.
    pub platform: Option<String>,
    /// The base image, or `None` for `scratch` and references to earlier stages.
    pub image: Option<ImageRef>,
    /// Other images the stage reads from (`COPY --from=image`).
    pub copy_from: Vec<ImageRef>,
    /// 1-based line of the `FROM`.
    pub line: usize,
}

/// What a Dockerfile pulls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dockerfile {
    pub stages: Vec<Stage>,
    /// Parser directives (`syntax`, `escape`, ...), keys lowercase.
    pub directives: BTreeMap<String, String>,
}

impl Dockerfile {
    /// Reads `text` with the build arguments `build_args`.
    pub fn parse(
        text: &str,
        build_args: &BTreeMap<String, String>,
    ) -> Result<Dockerfile, DockerfileError> {
        parse(text, build_args)
    }

    /// The stages a build of `target` runs: all of them up to and including
    /// the target (the classic builder's order; BuildKit runs a subset of
    /// these), or all without a target.
    pub fn stages_for(&self, target: Option<&str>) -> Result<&[Stage], DockerfileError> {
        let Some(target) = target.filter(|t| !t.is_empty()) else {
            return Ok(&self.stages);
        };
        let t = target.to_ascii_lowercase();
        match self
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(t.as_str()))
        {
            Some(i) => Ok(&self.stages[..=i]),
            None => Err(DockerfileError {
                line: 0,
                message: format!("target stage {target:?} not found"),
            }),
        }
    }

    /// The external base images (`FROM`) of a build of `target`, in order of
    /// appearance, without duplicates.
    pub fn base_images(&self, target: Option<&str>) -> Result<Vec<ImageRef>, DockerfileError> {
        let mut out: Vec<ImageRef> = Vec::new();
        for s in self.stages_for(target)? {
            if let Some(i) = &s.image
                && !out.contains(i)
            {
                out.push(i.clone());
            }
        }
        Ok(out)
    }

    /// Every external image a build of `target` pulls: the bases and the
    /// images of `COPY --from`, without duplicates.
    pub fn pulled_images(&self, target: Option<&str>) -> Result<Vec<ImageRef>, DockerfileError> {
        let mut out = self.base_images(target)?;
        for s in self.stages_for(target)? {
            for i in &s.copy_from {
                if !out.contains(i) {
                    out.push(i.clone());
                }
            }
        }
        Ok(out)
    }
}

/// `text` with the `FROM` lines of `stages` whose base is in `pins`
/// rewritten to `FROM [--platform=…] <registry>/<repository>@<digest> [AS
/// name]`, so that the engine builds from exactly the manifest that was
/// resolved (two jobs of one build, for different platforms, may share a
/// local tag on one engine). A `FROM` continued over several lines is left
/// alone.
pub fn pin_bases(text: &str, stages: &[Stage], pins: &[(ImageRef, String)]) -> String {
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    for st in stages {
        let Some(image) = &st.image else { continue };
        let Some((_, digest)) = pins.iter().find(|(i, _)| i == image) else {
            continue;
        };
        let Some(line) = lines.get_mut(st.line.wrapping_sub(1)) else {
            continue;
        };
        let trimmed = line.trim_end_matches('\r');
        if trimmed.ends_with('\\')
            || !trimmed
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("from")
        {
            continue;
        }
        let mut new = String::from("FROM ");
        if let Some(p) = st.platform.as_ref().filter(|p| !p.is_empty()) {
            new.push_str(&format!("--platform={p} "));
        }
        new.push_str(&format!("{}/{}@{digest}", image.registry, image.repository));
        if let Some(n) = &st.name {
            new.push_str(&format!(" AS {n}"));
        }
        *line = new;
    }
    lines.join("\n")
}

/// The external base images of a Dockerfile for a build of `target` with
/// `build_args`: every `FROM` that is neither `scratch` nor an earlier stage,
/// normalised, deduplicated, in order.
pub fn base_images(
    text: &str,
    build_args: &BTreeMap<String, String>,
    target: Option<&str>,
) -> Result<Vec<ImageRef>, DockerfileError> {
    parse(text, build_args)?.base_images(target)
}

/// A logical line: an instruction with its continuation lines joined.
struct Logical {
    line: usize,
    text: String,
}

fn parse(text: &str, build_args: &BTreeMap<String, String>) -> Result<Dockerfile, DockerfileError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();

    let mut directives = BTreeMap::new();
    let mut i = 0;
    while i < lines.len() {
        match directive(lines[i]) {
            Some((k, v)) if !directives.contains_key(&k) => {
                directives.insert(k, v);
                i += 1;
            }
            _ => break,
        }
    }
    let escape = match directives.get("escape").map(String::as_str) {
        None | Some("\\") => '\\',
        Some("`") => '`',
        Some(other) => {
            return Err(DockerfileError {
                line: i,
                message: format!("invalid escape directive {other:?} (must be ` or \\)"),
            });
        }
    };

    let logical = logical_lines(&lines, i, escape);

    let mut meta: HashMap<String, Option<String>> = HashMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let trimmed = l.text.trim_start();
        let (keyword, rest) = match trimmed.find(char::is_whitespace) {
            Some(p) => (&trimmed[..p], trimmed[p..].trim()),
            None => (trimmed, ""),
        };
        let err = |message: String| DockerfileError {
            line: l.line,
            message,
        };
        match keyword.to_ascii_uppercase().as_str() {
            "ARG" if stages.is_empty() => {
                for word in split_words(rest, escape) {
                    let (name, default) = match word.split_once('=') {
                        Some((n, v)) => (n.to_string(), Some(v.to_string())),
                        None => (word.clone(), None),
                    };
                    if name.is_empty() {
                        return Err(err(format!("ARG {word:?} has no name")));
                    }
                    let default = match default {
                        Some(d) => Some(expand(&d, &meta, escape).map_err(&err)?),
                        None => None,
                    };
                    let value = build_args.get(&name).cloned().or(default);
                    meta.insert(name, value);
                }
            }
            "FROM" => {
                let words = split_words(rest, escape);
                let mut platform = None;
                let mut positional = Vec::new();
                for w in &words {
                    if let Some(flag) = w.strip_prefix("--") {
                        if let Some(p) = flag.strip_prefix("platform=") {
                            platform = Some(expand(p, &meta, escape).map_err(&err)?);
                        }
                    } else {
                        positional.push(w.as_str());
                    }
                }
                let (raw, name) = match positional.as_slice() {
                    [image] => (*image, None),
                    [image, kw, name] if kw.eq_ignore_ascii_case("as") => {
                        (*image, Some(name.to_ascii_lowercase()))
                    }
                    [] => return Err(err("FROM needs an image".to_string())),
                    _ => {
                        return Err(err(format!(
                            "FROM must be `FROM [--platform=...] image [AS name]`, got {rest:?}"
                        )));
                    }
                };
                let base = expand(raw, &meta, escape).map_err(&err)?;
                if base.is_empty() {
                    return Err(err(format!("FROM {raw} expands to an empty image name")));
                }
                let image =
                    if base.eq_ignore_ascii_case("scratch") || refers_to_stage(&base, &stages) {
                        None
                    } else {
                        Some(ImageRef::parse(&base).map_err(|e| err(e.to_string()))?)
                    };
                stages.push(Stage {
                    name,
                    base,
                    platform,
                    image,
                    copy_from: Vec::new(),
                    line: l.line,
                });
            }
            "COPY" | "ADD" if !stages.is_empty() => {
                for w in split_words(rest, escape) {
                    let Some(from) = w.strip_prefix("--from=") else {
                        if !w.starts_with("--") {
                            break;
                        }
                        continue;
                    };
                    // Best effort: a reference that does not parse is left to
                    // the engine to complain about.
                    let Ok(from) = expand(from, &meta, escape) else {
                        continue;
                    };
                    let n = stages.len();
                    let (done, current) = stages.split_at_mut(n - 1);
                    let current = &mut current[0];
                    if from.is_empty()
                        || refers_to_stage(&from, done)
                        || current.name.as_deref() == Some(from.to_ascii_lowercase().as_str())
                    {
                        continue;
                    }
                    if let Ok(i) = ImageRef::parse(&from)
                        && !current.copy_from.contains(&i)
                    {
                        current.copy_from.push(i);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Dockerfile { stages, directives })
}

/// Whether `base` names one of `earlier` by name or index.
fn refers_to_stage(base: &str, earlier: &[Stage]) -> bool {
    let lower = base.to_ascii_lowercase();
    if earlier.iter().any(|s| s.name.as_deref() == Some(&lower)) {
        return true;
    }
    matches!(base.parse::<usize>(), Ok(n) if n < earlier.len())
}

/// A parser directive line: `# key=value`.
fn directive(line: &str) -> Option<(String, String)> {
    let body = line.trim().strip_prefix('#')?;
    let (k, v) = body.split_once('=')?;
    let k = k.trim();
    if k.is_empty()
        || !k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return None;
    }
    Some((k.to_ascii_lowercase(), v.trim().to_string()))
}

/// Joins continuation lines, drops comments and blank lines, and skips
/// heredoc bodies.
fn logical_lines(lines: &[&str], start: usize, escape: char) -> Vec<Logical> {
    let mut out = Vec::new();
    let mut i = start;
    while i < lines.len() {
        let first = lines[i];
        let t = first.trim_start();
        if t.is_empty() || t.starts_with('#') {
            i += 1;
            continue;
        }
        let line_no = i + 1;
        let mut text = String::new();
        let mut cur = first;
        loop {
            let trimmed_end = cur.trim_end();
            if let Some(body) = trimmed_end.strip_suffix(escape) {
                text.push_str(body);
                i += 1;
                // Comment and empty lines inside a continuation are dropped.
                while i < lines.len() {
                    let t = lines[i].trim_start();
                    if t.is_empty() || t.starts_with('#') {
                        i += 1;
                    } else {
                        break;
                    }
                }
                if i >= lines.len() {
                    break;
                }
                cur = lines[i];
            } else {
                text.push_str(cur);
                i += 1;
                break;
            }
        }
        // Heredocs (`RUN <<EOF`): skip their bodies, if every terminator is
        // found; otherwise the `<<` was not a heredoc and nothing is skipped.
        let kw = text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        if matches!(kw.as_str(), "RUN" | "COPY" | "ADD") {
            let mut j = i;
            let mut all_found = true;
            for (word, strip_tabs) in heredoc_markers(&text) {
                let found = lines[j.min(lines.len())..].iter().position(|l| {
                    let l = if strip_tabs {
                        l.trim_start_matches('\t')
                    } else {
                        l
                    };
                    l == word
                });
                match found {
                    Some(p) => j += p + 1,
                    None => {
                        all_found = false;
                        break;
                    }
                }
            }
            if all_found {
                i = j;
            }
        }
        out.push(Logical {
            line: line_no,
            text,
        });
    }
    out
}

/// The heredoc markers of an instruction: `<<EOF`, `<<-EOF`, `<<"EOF"`.
fn heredoc_markers(text: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i + 2 < b.len() {
        if b[i] == b'<' && b[i + 1] == b'<' && (i == 0 || b[i - 1] != b'<') {
            let mut j = i + 2;
            if j < b.len() && b[j] == b'<' {
                // `<<<` is a here-string.
                i = j + 1;
                continue;
            }
            let strip = j < b.len() && b[j] == b'-';
            if strip {
                j += 1;
            }
            let quote = if j < b.len() && (b[j] == b'"' || b[j] == b'\'') {
                j += 1;
                Some(b[j - 1])
            } else {
                None
            };
            let start = j;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            let word_ok = j > start && quote.is_none_or(|q| j < b.len() && b[j] == q);
            if word_ok {
                out.push((text[start..j].to_string(), strip));
            }
            i = j.max(i + 2);
        } else {
            i += 1;
        }
    }
    out
}

/// Splits instruction arguments on white space, keeping quoted parts (and
/// escaped characters) together; quotes and escapes stay in the words, for
/// [`expand`] to process.
fn split_words(s: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                cur.push(c);
                if c == escape && q == '"' {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == q {
                    quote = None;
                }
            }
            None if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            None => {
                cur.push(c);
                if c == escape {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == '"' || c == '\'' {
                    quote = Some(c);
                }
            }
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// Expands `$VAR`, `${VAR}`, `${VAR:-word}`, `${VAR-word}`, `${VAR:+word}`,
/// `${VAR+word}`, `${VAR:?msg}` and `${VAR?msg}` with `vars` (a declared
/// variable without a value is unset), removes quotes (no expansion inside
/// single quotes) and escapes.
fn expand(
    word: &str,
    vars: &HashMap<String, Option<String>>,
    escape: char,
) -> Result<String, String> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let mut in_double = false;
    while i < chars.len() {
        let c = chars[i];
        if c == escape && i + 1 < chars.len() {
            let n = chars[i + 1];
            // Inside double quotes only `$`, `"` and the escape are escaped.
            if in_double && !(n == '$' || n == '"' || n == escape) {
                out.push(c);
            }
            out.push(n);
            i += 2;
        } else if c == '\'' && !in_double {
            let end = chars[i + 1..]
                .iter()
                .position(|&x| x == '\'')
                .ok_or_else(|| format!("unterminated quote in {word:?}"))?;
            out.extend(&chars[i + 1..i + 1 + end]);
            i += end + 2;
        } else if c == '"' {
            in_double = !in_double;
            i += 1;
        } else if c == '$' {
            let (text, used) = expand_var(&chars[i + 1..], vars, escape)?;
            out.push_str(&text);
            i += 1 + used;
        } else {
            out.push(c);
            i += 1;
        }
    }
    if in_double {
        return Err(format!("unterminated quote in {word:?}"));
    }
    Ok(out)
}

/// Expands what follows a `$`; returns the text and how many characters
/// after the `$` were used.
fn expand_var(
    rest: &[char],
    vars: &HashMap<String, Option<String>>,
    escape: char,
) -> Result<(String, usize), String> {
    let is_name_start = |c: char| c.is_ascii_alphabetic() || c == '_';
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let lookup = |name: &str| vars.get(name).cloned().flatten();
    match rest.first() {
        Some(&c) if is_name_start(c) => {
            let n = rest.iter().take_while(|&&c| is_name(c)).count();
            let name: String = rest[..n].iter().collect();
            Ok((lookup(&name).unwrap_or_default(), n))
        }
        Some('{') => {
            // Find the matching `}`, allowing nested `${...}` in the word.
            let mut depth = 0usize;
            let mut end = None;
            let mut k = 1;
            while k < rest.len() {
                match rest[k] {
                    c if c == escape => k += 1,
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = Some(k);
                        break;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
                k += 1;
            }
            let end = end.ok_or("missing '}' in variable substitution")?;
            let inner = &rest[1..end];
            let n = inner.iter().take_while(|&&c| is_name(c)).count();
            if n == 0 || !is_name_start(inner[0]) {
                return Err(format!(
                    "bad substitution ${{{}}}",
                    inner.iter().collect::<String>()
                ));
            }
            let name: String = inner[..n].iter().collect();
            let op: String = inner[n..].iter().collect();
            let value = lookup(&name);
            let set = value.is_some();
            let non_empty = value.as_deref().is_some_and(|v| !v.is_empty());
            let word = |w: &str| expand(w, vars, escape);
            let text = if op.is_empty() {
                value.unwrap_or_default()
            } else if let Some(w) = op.strip_prefix(":-") {
                if non_empty {
                    value.unwrap_or_default()
                } else {
                    word(w)?
                }
            } else if let Some(w) = op.strip_prefix(":+") {
                if non_empty { word(w)? } else { String::new() }
            } else if let Some(w) = op.strip_prefix(":?") {
                if non_empty {
                    value.unwrap_or_default()
                } else {
                    return Err(format!("{name}: {}", word(w)?));
                }
            } else if let Some(w) = op.strip_prefix('-') {
                if set {
                    value.unwrap_or_default()
                } else {
                    word(w)?
                }
            } else if let Some(w) = op.strip_prefix('+') {
                if set { word(w)? } else { String::new() }
            } else if let Some(w) = op.strip_prefix('?') {
                if set {
                    value.unwrap_or_default()
                } else {
                    return Err(format!("{name}: {}", word(w)?));
                }
            } else {
                return Err(format!("unsupported substitution ${{{name}{op}}}"));
            };
            Ok((text, end + 1))
        }
        _ => Ok(("$".to_string(), 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn bases(text: &str, a: &[(&str, &str)]) -> Vec<String> {
        base_images(text, &args(a), None)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn normalises_references() {
        let cases = [
            ("ubuntu", "docker.io/library/ubuntu:latest"),
            ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
            ("team/app", "docker.io/team/app:latest"),
            ("docker.io/ubuntu", "docker.io/library/ubuntu:latest"),
            (
                "index.docker.io/library/ubuntu:1",
                "docker.io/library/ubuntu:1",
            ),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/app:v1", "localhost:5000/app:v1"),
            ("127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app:latest"),
            (
                "Registry.Example.com/a/b/c:t",
                "registry.example.com/a/b/c:t",
            ),
            ("[::1]:5000/app:v2", "[::1]:5000/app:v2"),
            ("example.com:443/app", "example.com:443/app:latest"),
        ];
        for (input, want) in cases {
            assert_eq!(ImageRef::parse(input).unwrap().to_string(), want, "{input}");
        }
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("alpine@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.to_string(), format!("docker.io/library/alpine@{d}"));
        assert_eq!(r.manifest_reference(), d);
        let r = ImageRef::parse(&format!("host:5000/alpine:3@{d}")).unwrap();
        assert_eq!(r.registry, "host:5000");
        assert_eq!(r.tag.as_deref(), Some("3"));
        assert_eq!(r.to_string(), format!("host:5000/alpine:3@{d}"));

        for bad in [
            "",
            "Ubuntu",
            "ubuntu:",
            "ubuntu:bad/tag",
            "a b",
            "alpine@sha256:short",
            "host:port/app",
            "host:5000/",
            "/app",
            "app/",
            "UPPER/app/",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
        assert!(
            ImageRef::parse("127.0.0.1:5000/app")
                .unwrap()
                .is_on("127.0.0.1:5000")
        );
        assert!(ImageRef::parse("Reg.io/app").unwrap().is_on("REG.io"));
        assert!(!ImageRef::parse("app").unwrap().is_on("127.0.0.1:5000"));
    }

    #[test]
    fn single_stage() {
        assert_eq!(
            bases("FROM alpine:3.20\nRUN echo hi\n", &[]),
            ["docker.io/library/alpine:3.20"]
        );
        assert_eq!(
            bases("from --platform=linux/arm64 alpine as Build\n", &[]),
            ["docker.io/library/alpine:latest"]
        );
        assert!(bases("FROM scratch\nCOPY a /\n", &[]).is_empty());
        assert!(bases("FROM SCRATCH\n", &[]).is_empty());
    }

    #[test]
    fn multi_stage_and_stage_references() {
        let df = "\
FROM golang:1.22 AS build
RUN go build
FROM build AS test
FROM BUILD
FROM 0
FROM scratch AS final
COPY --from=build /out /
COPY --from=1 /x /
COPY --from=busybox:musl /bin/sh /sh
FROM localhost:5000/base/runtime:1 AS other
FROM golang:1.22
";
        let parsed = Dockerfile::parse(df, &BTreeMap::new()).unwrap();
        assert_eq!(parsed.stages.len(), 7);
        assert_eq!(parsed.stages[1].image, None);
        assert_eq!(parsed.stages[1].name.as_deref(), Some("test"));
        assert_eq!(parsed.stages[2].image, None);
        assert_eq!(parsed.stages[3].image, None);
        assert_eq!(parsed.stages[5].line, 10);
        assert_eq!(
            parsed
                .base_images(None)
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "docker.io/library/golang:1.22",
                "localhost:5000/base/runtime:1"
            ]
        );
        assert_eq!(
            parsed.stages[4]
                .copy_from
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["docker.io/library/busybox:musl"]
        );
        // A target stops at its stage.
        assert_eq!(parsed.base_images(Some("final")).unwrap().len(), 1);
        assert_eq!(parsed.pulled_images(Some("FINAL")).unwrap().len(), 2);
        assert_eq!(parsed.base_images(Some("other")).unwrap().len(), 2);
        assert!(parsed.base_images(Some("nope")).is_err());
        // A stage name used before it is defined is an image.
        assert_eq!(
            bases("FROM later\nFROM alpine AS later\n", &[]),
            [
                "docker.io/library/later:latest",
                "docker.io/library/alpine:latest"
            ]
        );
        // A numeric index only names earlier stages.
        assert_eq!(bases("FROM 0\n", &[]), ["docker.io/library/0:latest"]);
    }

    #[test]
    fn build_args() {
        let df = "\
ARG REGISTRY=docker.io
ARG BASE=alpine
ARG VERSION
ARG UNUSED=${VERSION:-none} OTHER=\"quoted value\"
FROM ${REGISTRY}/${BASE}:${VERSION:-3.19} AS one
ARG BASE=ignored-after-from
FROM $REGISTRY/$BASE${SUFFIX}
FROM busybox${VERSION:+:v${VERSION}}
";
        assert_eq!(
            bases(df, &[]),
            [
                "docker.io/library/alpine:3.19",
                "docker.io/library/alpine:latest",
                "docker.io/library/busybox:latest"
            ]
        );
        assert_eq!(
            bases(df, &[("VERSION", "3.20"), ("REGISTRY", "reg.local:5000")]),
            [
                "reg.local:5000/alpine:3.20",
                "reg.local:5000/alpine:latest",
                "docker.io/library/busybox:v3.20"
            ]
        );
        // Build args for undeclared ARGs do not apply.
        assert_eq!(
            bases("FROM alpine:${TAG:-1}\n", &[("TAG", "2")]),
            ["docker.io/library/alpine:1"]
        );
        // `-` without colon: only unset takes the default.
        assert_eq!(
            bases("ARG T=\nFROM alpine${T-:d}\n", &[]),
            ["docker.io/library/alpine:latest"]
        );
        assert_eq!(
            bases("ARG T\nFROM alpine${T-:d}${T+x}\n", &[]),
            ["docker.io/library/alpine:d"]
        );
        // Escaped dollar and single quotes are literal (and then invalid).
        assert!(base_images("FROM alpine:\\$X\n", &BTreeMap::new(), None).is_err());
        // Empty after expansion.
        let e = base_images("ARG B\nFROM $B\n", &BTreeMap::new(), None).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("empty"), "{e}");
        assert!(base_images("FROM ${B:?is required}\n", &BTreeMap::new(), None).is_err());
        assert!(base_images("FROM ${B\n", &BTreeMap::new(), None).is_err());
        assert!(base_images("FROM ${B/x/y}\n", &BTreeMap::new(), None).is_err());
    }

    #[test]
    fn continuations_comments_directives() {
        let df = "\
# syntax=docker/dockerfile:1
# escape=\\

# a comment
ARG \\
  V=1
FROM \\
# comment inside a continuation

   alpine:${V} \\
   AS \\
   base
  run echo \\
    FROM ignored
from base
";
        let parsed = Dockerfile::parse(df, &BTreeMap::new()).unwrap();
        assert_eq!(
            parsed.directives.get("syntax").map(String::as_str),
            Some("docker/dockerfile:1")
        );
        assert_eq!(parsed.stages.len(), 2);
        assert_eq!(parsed.stages[0].line, 7);
        assert_eq!(
            parsed.stages[0].image.as_ref().unwrap().to_string(),
            "docker.io/library/alpine:1"
        );
        assert_eq!(parsed.stages[0].name.as_deref(), Some("base"));
        assert_eq!(parsed.stages[1].image, None);

        // The backtick escape (Windows Dockerfiles).
        let df = "# escape=`\nFROM `\n  alpine AS x\nRUN dir c:\\\nFROM busybox\n";
        assert_eq!(
            bases(df, &[]),
            [
                "docker.io/library/alpine:latest",
                "docker.io/library/busybox:latest"
            ]
        );
        // A directive after an instruction is a comment; CRLF line ends.
        let df = "FROM alpine\r\n# escape=`\r\nRUN x \\\r\n  y\r\nFROM busybox\r\n";
        assert_eq!(bases(df, &[]).len(), 2);
        assert!(Dockerfile::parse("# escape=x\nFROM a\n", &BTreeMap::new()).is_err());
    }

    #[test]
    fn heredocs_are_skipped() {
        let df = "\
FROM alpine
RUN <<EOF
FROM not-an-image
EOF
COPY <<-\"A\" /a <<B /b
\tFROM nope
\tA
FROM nope2
B
RUN echo '<<NOTHEREDOC'
FROM busybox
";
        assert_eq!(
            bases(df, &[]),
            [
                "docker.io/library/alpine:latest",
                "docker.io/library/busybox:latest"
            ]
        );
    }

    #[test]
    fn errors_do_not_panic() {
        for df in [
            "FROM",
            "FROM a b",
            "FROM a AS",
            "FROM a AS b c",
            "FROM $",
            "FROM ${",
            "FROM ${}",
            "FROM \"unterminated",
            "FROM 'x",
            "ARG =x\nFROM a",
            "\u{feff}FROM \\",
            "RUN <<",
            "FROM a\nCOPY --from=",
            "FROM a\nCOPY --from=${",
        ] {
            let _ = Dockerfile::parse(df, &BTreeMap::new());
        }
        assert!(
            Dockerfile::parse("", &BTreeMap::new())
                .unwrap()
                .stages
                .is_empty()
        );
    }

    #[test]
    fn pins_bases_to_digests() {
        let text = "ARG B=reg:5000/lib/base:1\nFROM --platform=linux/amd64 ${B} AS build\nRUN x\nFROM build\nFROM reg:5000/lib/base:1\n";
        let args = BTreeMap::new();
        let df = Dockerfile::parse(text, &args).unwrap();
        let base = df.base_images(None).unwrap().remove(0);
        let pinned = pin_bases(text, &df.stages, &[(base, "sha256:abc".into())]);
        let lines: Vec<&str> = pinned.lines().collect();
        assert_eq!(lines[0], "ARG B=reg:5000/lib/base:1");
        assert_eq!(
            lines[1],
            "FROM --platform=linux/amd64 reg:5000/lib/base@sha256:abc AS build"
        );
        assert_eq!(lines[3], "FROM build");
        assert_eq!(lines[4], "FROM reg:5000/lib/base@sha256:abc");
    }
}
