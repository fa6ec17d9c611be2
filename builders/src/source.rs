//! Sources of builds: a git checkout of one exact commit ([`fetch_git`]), an
//! uploaded context archive unpacked safely ([`fetch_context`],
//! [`unpack_context`]), and the other direction, packing a context directory
//! into a tar that honours `.dockerignore` ([`pack_context`], also used by the
//! CLI to upload a local context).
//!
//! Everything here works inside one directory given by the caller and never
//! writes outside it: archive entries with absolute paths or `..`, or that
//! would land beyond a symlink, are refused.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use dockyard_oci::build::JobSource;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::client::ManagerClient;
use crate::engine::LogSink;
use crate::{Error, Result};

// ---------------------------------------------------------------- git

/// Removes the password of `user:password@` in a URL, for messages.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}:***@{}", &rest[at + 1..]);
        }
    }
    url.to_string()
}

/// Clones `source` (a [`JobSource::Git`]) into the empty or missing directory
/// `dest` and checks out its commit (detached). Returns the full id of the
/// commit checked out.
pub async fn fetch_git(
    source: &JobSource,
    dest: &Path,
    logs: &LogSink,
    cancel: &CancellationToken,
) -> Result<String> {
    let JobSource::Git {
        url,
        commit,
        git_ref,
        username,
        password,
        ssh_key,
    } = source
    else {
        return Err(Error::Source("not a git source".into()));
    };
    let job = GitJob {
        url: url.clone(),
        commit: commit.trim().to_string(),
        git_ref: git_ref.clone().filter(|r| !r.trim().is_empty()),
        creds: GitCreds {
            username: username.clone(),
            password: password.clone(),
            ssh_key: ssh_key.clone(),
        },
    };
    let dest = dest.to_path_buf();
    let logs = logs.clone();
    let cancel2 = cancel.clone();
    let task = tokio::task::spawn_blocking(move || checkout(&job, &dest, &logs, &cancel2));
    tokio::select! {
        r = task => r.map_err(|e| Error::Source(format!("git task failed: {e}")))?,
        // The blocking thread notices the token at its next progress report.
        _ = cancel.cancelled() => Err(Error::Cancelled),
    }
}

struct GitJob {
    url: String,
    commit: String,
    git_ref: Option<String>,
    creds: GitCreds,
}

#[derive(Clone)]
struct GitCreds {
    username: Option<String>,
    password: Option<String>,
    ssh_key: Option<String>,
}

fn fetch_options<'a>(creds: &'a GitCreds, cancel: &'a CancellationToken) -> git2::FetchOptions<'a> {
    let mut callbacks = git2::RemoteCallbacks::new();
    let mut attempts = 0;
    callbacks.credentials(move |_url, user_from_url, allowed| {
        // libgit2 asks again after a refusal; do not loop forever.
        attempts += 1;
        if attempts > 3 {
            return Err(git2::Error::from_str(
                "authentication failed: the credentials were refused",
            ));
        }
        if allowed.contains(git2::CredentialType::SSH_KEY)
            && let Some(key) = &creds.ssh_key
        {
            let user = user_from_url.or(creds.username.as_deref()).unwrap_or("git");
            return git2::Cred::ssh_key_from_memory(user, None, key, None);
        }
        if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT)
            && let Some(password) = &creds.password
        {
            let user = creds
                .username
                .as_deref()
                .or(user_from_url)
                .unwrap_or("x-access-token");
            return git2::Cred::userpass_plaintext(user, password);
        }
        if allowed.contains(git2::CredentialType::USERNAME) {
            return git2::Cred::username(
                user_from_url.or(creds.username.as_deref()).unwrap_or("git"),
            );
        }
        Err(git2::Error::from_str(
            "the repository needs credentials and the job has none that fit",
        ))
    });
    callbacks.transfer_progress(|_| !cancel.is_cancelled());
    callbacks.sideband_progress(|_| !cancel.is_cancelled());
    let mut proxy = git2::ProxyOptions::new();
    proxy.auto();
    let mut opts = git2::FetchOptions::new();
    opts.remote_callbacks(callbacks);
    opts.proxy_options(proxy);
    opts.download_tags(git2::AutotagOption::None);
    opts
}

fn git_error(job: &GitJob, cancel: &CancellationToken, what: &str, e: git2::Error) -> Error {
    if cancel.is_cancelled() {
        return Error::Cancelled;
    }
    // libgit2 messages may quote the URL; never show a password in it.
    let msg = e.message().replace(&job.url, &redact_url(&job.url));
    Error::Source(format!("{what} {}: {msg}", redact_url(&job.url)))
}

fn checkout(
    job: &GitJob,
    dest: &Path,
    logs: &LogSink,
    cancel: &CancellationToken,
) -> Result<String> {
    let commit = job.commit.to_ascii_lowercase();
    // No commit but a ref (a manual "rebuild this branch"): the ref's tip.
    let by_ref = commit.is_empty() && job.git_ref.is_some();
    if !by_ref && (commit.len() < 4 || !commit.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(Error::Source(format!(
            "{:?} is not a commit id",
            job.commit
        )));
    }
    let full = commit.len() == 40 || commit.len() == 64;
    let repo = git2::Repository::init(dest)
        .map_err(|e| git_error(job, cancel, "cannot create a repository for", e))?;
    let url = redact_url(&job.url);
    logs.line(format!(
        "Fetching {url}{}",
        job.git_ref
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    ));

    let ref_name = job.git_ref.as_deref().unwrap_or("").trim().to_string();
    let find = |repo: &git2::Repository| -> Option<git2::Oid> {
        if by_ref {
            let short = ref_name.trim_start_matches("refs/");
            return [
                "refs/dockyard/ref".to_string(),
                format!("refs/dockyard/{short}"),
                format!("refs/dockyard/heads/{short}"),
                format!("refs/dockyard/tags/{short}"),
            ]
            .iter()
            .find_map(|r| {
                repo.revparse_single(r)
                    .ok()?
                    .peel_to_commit()
                    .ok()
                    .map(|c| c.id())
            });
        }
        let obj = repo.revparse_single(&commit).ok()?;
        obj.peel_to_commit().ok().map(|c| c.id())
    };
    let fetch = |refspecs: &[String]| -> Result<()> {
        let mut remote = repo
            .remote_anonymous(&job.url)
            .map_err(|e| git_error(job, cancel, "bad repository URL", e))?;
        let mut opts = fetch_options(&job.creds, cancel);
        remote
            .fetch(refspecs, Some(&mut opts), None)
            .map_err(|e| git_error(job, cancel, "cannot fetch from", e))
    };

    let mut attempts: Vec<Vec<String>> = Vec::new();
    if let Some(r) = &job.git_ref {
        let r = r.trim();
        if r.starts_with("refs/") {
            attempts.push(vec![format!("+{r}:refs/dockyard/ref")]);
        } else {
            attempts.push(vec![
                format!("+refs/heads/{r}:refs/dockyard/heads/{r}"),
                format!("+refs/tags/{r}:refs/dockyard/tags/{r}"),
            ]);
        }
    }
    if full {
        // Servers that allow fetching any reachable commit (GitHub, GitLab,
        // git with uploadpack.allowReachableSHA1InWant) send just that.
        attempts.push(vec![format!("+{commit}:refs/dockyard/commit")]);
    }
    attempts.push(vec![
        "+refs/heads/*:refs/dockyard/heads/*".to_string(),
        "+refs/tags/*:refs/dockyard/tags/*".to_string(),
    ]);

    let mut oid = None;
    let mut last_error = None;
    let mut fetched = false;
    for refspecs in &attempts {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        match fetch(refspecs) {
            Ok(()) => fetched = true,
            Err(Error::Cancelled) => return Err(Error::Cancelled),
            Err(e) => {
                tracing::debug!(error = %e, "fetch attempt failed");
                last_error = Some(e);
                continue;
            }
        }
        oid = find(&repo);
        if oid.is_some() {
            break;
        }
    }
    let Some(oid) = oid else {
        return Err(match last_error {
            // No fetch worked: the repository is unreachable or refused us.
            Some(e) if !fetched => e,
            _ => Error::Source(format!("commit {} not found in {url}", job.commit)),
        });
    };

    let object = repo
        .find_object(oid, None)
        .map_err(|e| git_error(job, cancel, "cannot read the commit from", e))?;
    let mut co = git2::build::CheckoutBuilder::new();
    co.force();
    repo.checkout_tree(&object, Some(&mut co))
        .map_err(|e| git_error(job, cancel, "cannot check out the commit of", e))?;
    repo.set_head_detached(oid)
        .map_err(|e| git_error(job, cancel, "cannot check out the commit of", e))?;
    update_submodules(&repo, job, logs, cancel, 0)?;
    logs.line(format!("Checked out {oid}"));
    Ok(oid.to_string())
}

fn update_submodules(
    repo: &git2::Repository,
    job: &GitJob,
    logs: &LogSink,
    cancel: &CancellationToken,
    depth: usize,
) -> Result<()> {
    if depth > 8 {
        return Err(Error::Source("submodules nested too deep".into()));
    }
    let subs = repo
        .submodules()
        .map_err(|e| git_error(job, cancel, "cannot read the submodules of", e))?;
    for mut sm in subs {
        let name = sm.name().unwrap_or("?").to_string();
        logs.line(format!("Updating submodule {name}"));
        let mut opts = git2::SubmoduleUpdateOptions::new();
        opts.fetch(fetch_options(&job.creds, cancel));
        sm.update(true, Some(&mut opts)).map_err(|e| {
            if cancel.is_cancelled() {
                Error::Cancelled
            } else {
                Error::Source(format!("submodule {name}: {}", e.message()))
            }
        })?;
        let sub = sm
            .open()
            .map_err(|e| Error::Source(format!("submodule {name}: {}", e.message())))?;
        update_submodules(&sub, job, logs, cancel, depth + 1)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- context archives

/// What was unpacked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

/// Downloads the job's uploaded context from the manager into a file next to
/// `dest` and unpacks it into `dest`.
pub async fn fetch_context(
    client: &ManagerClient,
    executor_id: &str,
    job_id: &str,
    dest: &Path,
    logs: &LogSink,
    cancel: &CancellationToken,
) -> Result<UnpackStats> {
    let archive = dest.with_extension("archive");
    let download = async {
        let response = client
            .context(executor_id, job_id)
            .await
            .map_err(|e| match e {
                crate::client::ClientError::NotFound(_) => {
                    Error::Source("the manager has no build context for this job".into())
                }
                e => Error::Manager(e),
            })?;
        let mut file = tokio::fs::File::create(&archive)
            .await
            .map_err(|e| Error::io(format!("creating {}", archive.display()), e))?;
        let mut body = response.bytes_stream();
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                Error::Manager(crate::client::ClientError::Unreachable(format!(
                    "downloading the context: {e}"
                )))
            })?;
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| Error::io("writing the context archive", e))?;
        }
        file.flush()
            .await
            .map_err(|e| Error::io("writing the context archive", e))?;
        Ok::<u64, Error>(size)
    };
    let size = tokio::select! {
        r = download => r?,
        _ = cancel.cancelled() => return Err(Error::Cancelled),
    };
    logs.line(format!("Downloaded the build context ({size} bytes)"));
    let dest = dest.to_path_buf();
    let archive2 = archive.clone();
    let stats = tokio::task::spawn_blocking(move || {
        let file = fs::File::open(&archive2)
            .map_err(|e| Error::io(format!("opening {}", archive2.display()), e))?;
        unpack_context(file, &dest)
    })
    .await
    .map_err(|e| Error::Source(format!("unpack task failed: {e}")))?;
    let _ = tokio::fs::remove_file(&archive).await;
    let stats = stats?;
    logs.line(format!(
        "Unpacked {} files, {} directories ({} bytes)",
        stats.files, stats.dirs, stats.bytes
    ));
    Ok(stats)
}

/// Unpacks a `.tar` or `.tar.gz` (told apart by the gzip magic bytes) into
/// `dest`, refusing entries that would land outside it. Devices and FIFOs are
/// skipped; ownership is not restored.
pub fn unpack_context(reader: impl Read, dest: &Path) -> Result<UnpackStats> {
    fs::create_dir_all(dest).map_err(|e| Error::io(format!("creating {}", dest.display()), e))?;
    let mut reader = BufReader::new(reader);
    let head = reader
        .fill_buf()
        .map_err(|e| Error::io("reading the context archive", e))?;
    let gzip = head.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let bad = |what: String| Error::Source(format!("unsafe context archive: {what}"));
    let mut stats = UnpackStats::default();
    let entries = archive
        .entries()
        .map_err(|e| Error::Source(format!("bad context archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::Source(format!("bad context archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| Error::Source(format!("bad context archive: {e}")))?
            .into_owned();
        if !is_safe_relative(&path) {
            return Err(bad(format!("entry {:?} escapes the directory", path)));
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                stats.files += 1;
                stats.bytes += entry.size();
            }
            tar::EntryType::Directory => stats.dirs += 1,
            tar::EntryType::Symlink => stats.symlinks += 1,
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| Error::Source(format!("bad context archive: {e}")))?
                    .ok_or_else(|| bad(format!("hard link {path:?} without target")))?;
                if !is_safe_relative(&target) {
                    return Err(bad(format!("hard link {path:?} points outside")));
                }
                stats.files += 1;
            }
            _ => continue,
        }
        if path.as_os_str().is_empty() || path == Path::new(".") {
            continue;
        }
        let unpacked = entry
            .unpack_in(dest)
            .map_err(|e| bad(format!("{}: {e}", path.display())))?;
        if !unpacked {
            return Err(bad(format!("entry {:?} escapes the directory", path)));
        }
    }
    Ok(stats)
}

/// A relative path without `..`, root or prefix components.
fn is_safe_relative(p: &Path) -> bool {
    p.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// `root/rel`, refusing a `rel` that is absolute, climbs out with `..` or
/// leaves `root` through a symlink. `rel` may be empty (`root` itself).
pub fn resolve_inside(root: &Path, rel: &str) -> Result<PathBuf> {
    let rel_path = Path::new(rel);
    if !is_safe_relative(rel_path) {
        return Err(Error::Source(format!(
            "{rel:?} must be a relative path inside the source"
        )));
    }
    let joined = root.join(rel_path);
    let root_c = root
        .canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", root.display()), e))?;
    let joined_c = joined
        .canonicalize()
        .map_err(|_| Error::Source(format!("{rel:?} does not exist in the source")))?;
    if !joined_c.starts_with(&root_c) {
        return Err(Error::Source(format!("{rel:?} points outside the source")));
    }
    Ok(joined_c)
}

// ---------------------------------------------------------------- .dockerignore

/// The rules of a `.dockerignore` file, with Docker's semantics: Go
/// `filepath.Match` patterns plus `**`, matched against paths relative to the
/// context root (a pattern also matches everything under a directory it
/// matches), the last matching rule wins, `!` re-includes.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    text: String,
    exclusion: bool,
    tokens: Vec<Tok>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Lit(char),
    /// `*`: any run of non-separators.
    Star,
    /// `?`: one non-separator.
    Quest,
    /// `[...]`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `**/`: zero or more whole directories.
    AnyDirs,
    /// A final `**` (or `**` not followed by `/`): anything.
    AnyAll,
}

/// Go's `filepath.Clean` on a slash path.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

fn compile(pattern: &str) -> std::result::Result<Vec<Tok>, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '*' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                    if i >= chars.len() {
                        toks.push(Tok::AnyAll);
                    } else {
                        toks.push(Tok::AnyDirs);
                    }
                } else {
                    toks.push(Tok::AnyAll);
                }
                continue;
            }
            '*' => toks.push(Tok::Star),
            '?' => toks.push(Tok::Quest),
            '\\' => {
                i += 1;
                let n = *chars
                    .get(i)
                    .ok_or_else(|| format!("pattern {pattern:?} ends with an escape"))?;
                toks.push(Tok::Lit(n));
            }
            '[' => {
                i += 1;
                let negated = matches!(chars.get(i), Some('^') | Some('!'));
                if negated {
                    i += 1;
                }
                let mut ranges = Vec::new();
                let mut closed = false;
                while i < chars.len() {
                    let mut lo = chars[i];
                    if lo == ']' && !ranges.is_empty() {
                        closed = true;
                        break;
                    }
                    if lo == '\\' {
                        i += 1;
                        lo = *chars
                            .get(i)
                            .ok_or_else(|| format!("bad character class in {pattern:?}"))?;
                    }
                    let mut hi = lo;
                    if chars.get(i + 1) == Some(&'-') && chars.get(i + 2).is_some_and(|c| *c != ']')
                    {
                        i += 2;
                        hi = chars[i];
                        if hi == '\\' {
                            i += 1;
                            hi = *chars
                                .get(i)
                                .ok_or_else(|| format!("bad character class in {pattern:?}"))?;
                        }
                        if hi < lo {
                            return Err(format!("bad range in {pattern:?}"));
                        }
                    }
                    ranges.push((lo, hi));
                    i += 1;
                }
                if !closed {
                    return Err(format!("unterminated character class in {pattern:?}"));
                }
                toks.push(Tok::Class { negated, ranges });
            }
            c => toks.push(Tok::Lit(c)),
        }
        i += 1;
    }
    Ok(toks)
}

/// Whether `toks` match all of `text`: a dynamic programme over (token,
/// position), linear in the product of their lengths.
fn matches(toks: &[Tok], text: &[char]) -> bool {
    let n = text.len();
    // next[j]: whether toks[i+1..] match text[j..].
    let mut next = vec![false; n + 1];
    next[n] = true;
    let mut cur = vec![false; n + 1];
    for tok in toks.iter().rev() {
        match tok {
            Tok::AnyDirs => {
                // Either nothing, or anything up to and including a '/'.
                let mut acc = false;
                for j in (0..=n).rev() {
                    if j < n && text[j] == '/' && next[j + 1] {
                        acc = true;
                    }
                    cur[j] = next[j] || acc;
                }
            }
            Tok::AnyAll => {
                let mut acc = false;
                for j in (0..=n).rev() {
                    acc = acc || next[j];
                    cur[j] = acc;
                }
            }
            Tok::Star => {
                cur[n] = next[n];
                for j in (0..n).rev() {
                    cur[j] = next[j] || (text[j] != '/' && cur[j + 1]);
                }
            }
            single => {
                cur[n] = false;
                for j in 0..n {
                    let c = text[j];
                    let ok = match single {
                        Tok::Lit(l) => c == *l,
                        Tok::Quest => c != '/',
                        Tok::Class { negated, ranges } => {
                            c != '/'
                                && (ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negated)
                        }
                        _ => false,
                    };
                    cur[j] = ok && next[j + 1];
                }
            }
        }
        std::mem::swap(&mut cur, &mut next);
    }
    next[0]
}

impl DockerIgnore {
    /// Reads a `.dockerignore` file's text.
    pub fn parse(text: &str) -> std::result::Result<DockerIgnore, String> {
        let mut out = DockerIgnore::default();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            out.add(line)?;
        }
        Ok(out)
    }

    /// Adds one rule (`pattern` or `!pattern`).
    pub fn add(&mut self, rule: &str) -> std::result::Result<(), String> {
        let (exclusion, pattern) = match rule.strip_prefix('!') {
            Some(p) => (true, p.trim()),
            None => (false, rule),
        };
        if exclusion && pattern.is_empty() {
            return Err("illegal exclusion pattern: \"!\"".into());
        }
        let mut text = clean(pattern);
        if text.len() > 1 && text.starts_with('/') {
            text.remove(0);
        }
        let tokens = compile(&text)?;
        self.patterns.push(Pattern {
            text,
            exclusion,
            tokens,
        });
        Ok(())
    }

    /// Whether the context path `rel` (slash-separated, relative to the
    /// root) is left out.
    pub fn is_excluded(&self, rel: &str) -> bool {
        let chars: Vec<char> = rel.chars().collect();
        // The parents of the path, as prefixes ending before each '/'.
        let parents: Vec<usize> = chars
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == '/')
            .map(|(i, _)| i)
            .collect();
        let mut excluded = false;
        for p in &self.patterns {
            // Only a rule that can change the answer needs evaluating.
            if p.exclusion != excluded {
                continue;
            }
            let hit = matches(&p.tokens, &chars)
                || parents.iter().any(|&end| matches(&p.tokens, &chars[..end]));
            if hit {
                excluded = !p.exclusion;
            }
        }
        excluded
    }

    /// Whether an excluded directory must still be walked because an
    /// exception may re-include something in it (Docker's rule: an exception
    /// whose text starts with the directory's path).
    fn must_walk(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.patterns
            .iter()
            .any(|p| p.exclusion && format!("{}/", p.text).starts_with(&prefix))
    }
}

// ---------------------------------------------------------------- packing

/// What [`pack_context`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Regular files.
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Bytes written to the output (compressed when gzip).
    pub archive_bytes: u64,
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the build context in `dir` as a `.tar.gz` to `out`, leaving out
/// what `.dockerignore` (or `<dockerfile>.dockerignore` next to the
/// Dockerfile, which takes precedence) excludes. The Dockerfile (`dockerfile`,
/// relative to `dir`) and `.dockerignore` are always included. Symlinks are
/// stored as symlinks; owners are 0; sockets and devices are skipped.
pub fn pack_context(dir: &Path, dockerfile: &str, out: impl Write) -> Result<PackStats> {
    pack_context_tar(dir, dockerfile, out, true)
}

/// [`pack_context`], as a plain tar when `gzip` is false.
pub fn pack_context_tar(
    dir: &Path,
    dockerfile: &str,
    out: impl Write,
    gzip: bool,
) -> Result<PackStats> {
    let dockerfile_path = resolve_inside(dir, dockerfile)
        .map_err(|_| Error::Dockerfile(format!("{dockerfile} not found in the context")))?;
    if !dockerfile_path.is_file() {
        return Err(Error::Dockerfile(format!("{dockerfile} is not a file")));
    }
    let dockerfile_rel = clean(&dockerfile.replace('\\', "/"));
    let ignore_text = [
        dir.join(format!("{dockerfile_rel}.dockerignore")),
        dir.join(".dockerignore"),
    ]
    .iter()
    .find_map(|p| fs::read_to_string(p).ok())
    .unwrap_or_default();
    let mut ignore = DockerIgnore::parse(&ignore_text)
        .map_err(|e| Error::Source(format!(".dockerignore: {e}")))?;
    // What the daemon needs anyway (the docker CLI does the same).
    let _ = ignore.add(&format!("!{dockerfile_rel}"));
    let _ = ignore.add("!.dockerignore");

    let mut stats = PackStats::default();
    let mut counter = CountingWriter {
        inner: out,
        count: 0,
    };
    {
        let sink: Box<dyn Write + '_> = if gzip {
            Box::new(flate2::write::GzEncoder::new(
                &mut counter,
                flate2::Compression::fast(),
            ))
        } else {
            Box::new(&mut counter)
        };
        let mut builder = tar::Builder::new(sink);
        builder.mode(tar::HeaderMode::Complete);
        builder.follow_symlinks(false);
        walk(dir, "", &ignore, &mut builder, &mut stats)?;
        let mut sink = builder
            .into_inner()
            .map_err(|e| Error::io("writing the context archive", e))?;
        sink.flush()
            .map_err(|e| Error::io("writing the context archive", e))?;
        // Dropping a GzEncoder writes its trailer; do it explicitly to see errors.
        drop(sink);
    }
    counter
        .flush()
        .map_err(|e| Error::io("writing the context archive", e))?;
    stats.archive_bytes = counter.count;
    Ok(stats)
}

fn walk(
    root: &Path,
    rel: &str,
    ignore: &DockerIgnore,
    builder: &mut tar::Builder<Box<dyn Write + '_>>,
    stats: &mut PackStats,
) -> Result<()> {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(&dir)
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
        .collect::<io::Result<_>>()
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let child_rel = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let excluded = ignore.is_excluded(&child_rel);
        let ft = meta.file_type();
        if excluded && !(ft.is_dir() && ignore.must_walk(&child_rel)) {
            continue;
        }
        let io_err = |e| Error::io(format!("adding {} to the context", path.display()), e);
        if ft.is_dir() {
            if !excluded {
                let mut h = header_for(&meta, tar::EntryType::Directory);
                builder
                    .append_data(&mut h, format!("{child_rel}/"), io::empty())
                    .map_err(io_err)?;
                stats.dirs += 1;
            }
            walk(root, &child_rel, ignore, builder, stats)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(io_err)?;
            let mut h = header_for(&meta, tar::EntryType::Symlink);
            builder
                .append_link(&mut h, &child_rel, &target)
                .map_err(io_err)?;
            stats.symlinks += 1;
        } else if ft.is_file() {
            let mut h = header_for(&meta, tar::EntryType::Regular);
            h.set_size(meta.len());
            let file = fs::File::open(&path).map_err(io_err)?;
            // A file that changes size while we read it would corrupt the
            // archive; `take` keeps the header honest.
            builder
                .append_data(&mut h, &child_rel, file.take(meta.len()))
                .map_err(io_err)?;
            stats.files += 1;
            stats.bytes += meta.len();
        }
    }
    Ok(())
}

fn header_for(meta: &fs::Metadata, kind: tar::EntryType) -> tar::Header {
    use std::os::unix::fs::MetadataExt;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_mtime(meta.mtime().max(0) as u64);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignore(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text).unwrap()
    }

    #[test]
    fn clean_like_go() {
        for (i, o) in [
            ("a/b/../c", "a/c"),
            ("/a//b/", "/a/b"),
            ("./a", "a"),
            ("", "."),
            ("../a", "../a"),
            ("/../a", "/a"),
            ("a/..", "."),
        ] {
            assert_eq!(clean(i), o, "{i}");
        }
    }

    #[test]
    fn patterns_match_like_docker() {
        let cases: &[(&str, &str, bool)] = &[
            ("*.md", "README.md", true),
            ("*.md", "docs/README.md", false),
            ("*/*.md", "docs/README.md", true),
            ("**/*.md", "README.md", true),
            ("**/*.md", "a/b/c/README.md", true),
            ("**", "anything/at/all", true),
            ("docs/**", "docs/a/b", true),
            ("docs/**", "docsx/a", false),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/xb", false),
            ("node_modules", "node_modules/x/y.js", true),
            ("node_modules", "src/node_modules/x", false),
            ("/build", "build/out", true),
            ("./tmp/", "tmp/a", true),
            ("te?t", "test", true),
            ("te?t", "te/t", false),
            ("[a-c]at", "bat", true),
            ("[^a-c]at", "bat", false),
            ("[!a-c]at", "rat", true),
            ("\\*x", "*x", true),
            ("\\*x", "ax", false),
            ("a/../b", "b", true),
            ("**.go", "x/y/z.go", true),
        ];
        for (pattern, path, want) in cases {
            assert_eq!(
                ignore(pattern).is_excluded(path),
                *want,
                "{pattern} vs {path}"
            );
        }
    }

    #[test]
    fn exceptions_and_order() {
        let di = ignore("# comment\n\n*.md\n!README.md\n  secret/  \n!secret/keep\n");
        assert!(di.is_excluded("CHANGES.md"));
        assert!(!di.is_excluded("README.md"));
        assert!(di.is_excluded("secret/key"));
        assert!(!di.is_excluded("secret/keep"));
        assert!(di.must_walk("secret"));
        assert!(!di.must_walk("other"));
        // Last match wins.
        let di = ignore("!a.txt\n*.txt\n");
        assert!(di.is_excluded("a.txt"));
        // Exclude all but one directory.
        let di = ignore("*\n!src\n");
        assert!(di.is_excluded("target"));
        assert!(!di.is_excluded("src/main.rs"));
        assert!(DockerIgnore::parse("!\n").is_err());
        assert!(DockerIgnore::parse("[abc\n").is_err());
        // Lines starting with '#' are comments, a '#' elsewhere is not.
        assert!(ignore("a#b").is_excluded("a#b"));
    }

    fn write(dir: &Path, rel: &str, content: &str) {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    fn listing(archive: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(archive));
        let mut names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn pack_honours_dockerignore() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "Dockerfile", "FROM scratch\n");
        write(d, ".dockerignore", "*\n!src\n!docs/keep.md\nsrc/**/*.tmp\n");
        write(d, "src/main.rs", "fn main() {}");
        write(d, "src/deep/x.tmp", "tmp");
        write(d, "docs/keep.md", "keep");
        write(d, "docs/drop.md", "drop");
        write(d, "target/big", "big");
        std::os::unix::fs::symlink("/etc/passwd", d.join("src/link")).unwrap();
        let mut out = Vec::new();
        let stats = pack_context(d, "Dockerfile", &mut out).unwrap();
        assert_eq!(
            listing(&out),
            [
                ".dockerignore",
                "Dockerfile",
                "docs/keep.md",
                "src/",
                "src/deep/",
                "src/link",
                "src/main.rs"
            ]
        );
        assert_eq!(stats.files, 4);
        assert_eq!(stats.symlinks, 1);
        assert_eq!(stats.archive_bytes, out.len() as u64);

        // A Dockerfile-specific ignore file wins; the Dockerfile is kept.
        write(d, "build/app.Dockerfile", "FROM scratch\n");
        write(d, "build/app.Dockerfile.dockerignore", "build\ntarget\n");
        let mut out = Vec::new();
        pack_context(d, "build/app.Dockerfile", &mut out).unwrap();
        let names = listing(&out);
        assert!(
            names.contains(&"build/app.Dockerfile".to_string()),
            "{names:?}"
        );
        assert!(!names.contains(&"build/app.Dockerfile.dockerignore".to_string()));
        assert!(!names.iter().any(|n| n.starts_with("target")));
        assert!(names.contains(&"docs/drop.md".to_string()));

        assert!(matches!(
            pack_context(d, "Missing", Vec::new()),
            Err(Error::Dockerfile(_))
        ));
        assert!(pack_context(d, "../Dockerfile", Vec::new()).is_err());
    }

    #[test]
    fn pack_then_unpack_round_trips() {
        let src = tempfile::tempdir().unwrap();
        write(src.path(), "Dockerfile", "FROM scratch\n");
        write(src.path(), "a/b/c.txt", "hello");
        let mut out = Vec::new();
        pack_context(src.path(), "Dockerfile", &mut out).unwrap();
        let dst = tempfile::tempdir().unwrap();
        let stats = unpack_context(&out[..], dst.path()).unwrap();
        assert_eq!(stats.files, 2);
        assert_eq!(
            fs::read_to_string(dst.path().join("a/b/c.txt")).unwrap(),
            "hello"
        );
        // Plain tar too.
        let mut plain = Vec::new();
        pack_context_tar(src.path(), "Dockerfile", &mut plain, false).unwrap();
        let dst = tempfile::tempdir().unwrap();
        unpack_context(&plain[..], dst.path()).unwrap();
        assert!(dst.path().join("Dockerfile").is_file());
    }

    /// A tar with hand-made headers, so unsafe names can be written.
    fn raw_tar(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_old();
            let bytes = h.as_old_mut();
            bytes.name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            if *kind == tar::EntryType::Symlink || *kind == tar::EntryType::Link {
                h.as_old_mut().linkname[..data.len()].copy_from_slice(data.as_bytes());
                h.set_size(0);
            } else {
                h.set_size(data.len() as u64);
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            if *kind != tar::EntryType::Symlink && *kind != tar::EntryType::Link {
                out.extend_from_slice(data.as_bytes());
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn unpack_refuses_escapes() {
        use tar::EntryType as T;
        let cases: Vec<Vec<(&str, T, &str)>> = vec![
            vec![("../evil", T::Regular, "x")],
            vec![("a/../../evil", T::Regular, "x")],
            vec![("/etc/evil", T::Regular, "x")],
            vec![("link", T::Symlink, "/tmp"), ("link/evil", T::Regular, "x")],
            vec![("up", T::Symlink, ".."), ("up/evil", T::Regular, "x")],
            vec![("hard", T::Link, "../../etc/passwd")],
        ];
        for entries in cases {
            let outer = tempfile::tempdir().unwrap();
            let dst = outer.path().join("ctx");
            let r = unpack_context(&raw_tar(&entries)[..], &dst);
            assert!(r.is_err(), "{entries:?} was accepted");
            assert!(!outer.path().join("evil").exists());
            assert!(!Path::new("/tmp/evil").exists());
        }
        // Gzip is detected by its magic bytes.
        let ok = raw_tar(&[("dir/file", T::Regular, "data")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&ok).unwrap();
        let gz = gz.finish().unwrap();
        let dst = tempfile::tempdir().unwrap();
        unpack_context(&gz[..], dst.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dst.path().join("dir/file")).unwrap(),
            "data"
        );
        // Garbage is an error, not a panic.
        assert!(unpack_context(&b"\x1f\x8bnot gzip"[..], dst.path()).is_err());
    }

    #[test]
    fn resolve_inside_refuses_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/", tmp.path().join("root")).unwrap();
        assert!(resolve_inside(tmp.path(), "").is_ok());
        assert!(resolve_inside(tmp.path(), "sub").is_ok());
        assert!(resolve_inside(tmp.path(), "./sub/").is_ok());
        assert!(resolve_inside(tmp.path(), "../").is_err());
        assert!(resolve_inside(tmp.path(), "/etc").is_err());
        assert!(resolve_inside(tmp.path(), "root/etc").is_err());
        assert!(resolve_inside(tmp.path(), "missing").is_err());
    }

    fn repo_with_commits() -> (tempfile::TempDir, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init(dir.path()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let mut ids: Vec<git2::Oid> = Vec::new();
        for n in 0..2 {
            write(dir.path(), "file", &format!("v{n}\n"));
            let mut index = repo.index().unwrap();
            index.add_path(Path::new("file")).unwrap();
            let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
            let parents: Vec<git2::Commit> =
                ids.iter().map(|i| repo.find_commit(*i).unwrap()).collect();
            let parents: Vec<&git2::Commit> = parents.iter().collect();
            let id = repo
                .commit(Some("refs/heads/main"), &sig, &sig, "c", &tree, &parents)
                .unwrap();
            ids.push(id);
        }
        // A commit only reachable from a tag.
        let head = repo.find_commit(ids[1]).unwrap();
        let tree = head.tree().unwrap();
        let tagged = repo
            .commit(None, &sig, &sig, "tagged", &tree, &[&head])
            .unwrap();
        repo.reference("refs/tags/v1", tagged, false, "").unwrap();
        ids.push(tagged);
        (dir, ids.iter().map(ToString::to_string).collect())
    }

    fn git(url: &str, commit: &str, git_ref: Option<&str>) -> JobSource {
        JobSource::Git {
            url: url.to_string(),
            commit: commit.to_string(),
            git_ref: git_ref.map(str::to_string),
            username: Some("user".into()),
            password: Some("s3cret".into()),
            ssh_key: None,
        }
    }

    #[tokio::test]
    async fn git_checkouts() {
        let (repo, ids) = repo_with_commits();
        let url = repo.path().display().to_string();
        let cancel = CancellationToken::new();
        for (commit, git_ref, content) in [
            (ids[0].clone(), Some("main"), "v0\n"),
            (ids[1][..10].to_string(), None, "v1\n"),
            (ids[2].clone(), Some("refs/heads/main"), "v1\n"),
            (ids[0].to_uppercase(), Some("refs/tags/v1"), "v0\n"),
        ] {
            let dest = tempfile::tempdir().unwrap();
            let got = fetch_git(
                &git(&url, &commit, git_ref),
                dest.path(),
                &LogSink::discard(),
                &cancel,
            )
            .await
            .unwrap();
            assert!(ids.contains(&got), "{commit} -> {got}");
            assert_eq!(
                fs::read_to_string(dest.path().join("file")).unwrap(),
                content
            );
        }
        let dest = tempfile::tempdir().unwrap();
        let e = fetch_git(
            &git(&format!("file://{url}"), &"f".repeat(40), Some("main")),
            dest.path(),
            &LogSink::discard(),
            &cancel,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        let e = fetch_git(
            &git("http://user:s3cret@127.0.0.1:9/none.git", &ids[0], None),
            tempfile::tempdir().unwrap().path(),
            &LogSink::discard(),
            &cancel,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Source(_)), "{e:?}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = fetch_git(
            &git(&url, "not-a-commit", None),
            tempfile::tempdir().unwrap().path(),
            &LogSink::discard(),
            &cancel,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("not a commit id"), "{e}");
        cancel.cancel();
        let e = fetch_git(
            &git(&url, &ids[0], None),
            tempfile::tempdir().unwrap().path(),
            &LogSink::discard(),
            &cancel,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Cancelled), "{e:?}");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("https://user:tok@example.com/a.git"),
            "https://user:***@example.com/a.git"
        );
        assert_eq!(
            redact_url("https://example.com/a@b"),
            "https://example.com/a@b"
        );
        assert_eq!(
            redact_url("git@github.com:a/b.git"),
            "git@github.com:a/b.git"
        );
    }
}
