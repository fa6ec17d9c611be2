//! The client side of `dockyard login` and `dockyard build`: finds the
//! server and credentials (`dockyard login` file, or `DOCKYARD_URL`,
//! `DOCKYARD_USERNAME`, `DOCKYARD_PASSWORD`), uploads a local context with a
//! progress bar, then follows the build's Server-Sent Events and prints its
//! logs live, like `az acr build`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio_util::io::ReaderStream;

/// Errors of the command-line client, worded for people.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{0}")]
    Server(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where the server is and who we are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub url: String,
    pub username: String,
    pub password: String,
}

fn credentials_file() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("dockyard").join("credentials.json")
}

impl Credentials {
    /// From the environment, else the file `dockyard login` wrote.
    pub fn find() -> Result<Credentials, CliError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let saved: Option<Credentials> = std::fs::read(credentials_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let url = env("DOCKYARD_URL").or_else(|| saved.as_ref().map(|s| s.url.clone()));
        let Some(url) = url else {
            return Err(CliError::Usage(
                "no server: run `dockyard login URL` or set DOCKYARD_URL".into(),
            ));
        };
        let url = url.trim_end_matches('/').to_string();
        let same_server = saved.as_ref().is_some_and(|s| s.url == url);
        let username = env("DOCKYARD_USERNAME").or_else(|| {
            saved
                .as_ref()
                .filter(|_| same_server)
                .map(|s| s.username.clone())
        });
        let password = env("DOCKYARD_PASSWORD").or_else(|| {
            saved
                .as_ref()
                .filter(|_| same_server)
                .map(|s| s.password.clone())
        });
        match (username, password) {
            (Some(username), Some(password)) => Ok(Credentials {
                url,
                username,
                password,
            }),
            _ => Err(CliError::Usage(format!(
                "no credentials for {url}: run `dockyard login {url}` or set DOCKYARD_USERNAME and DOCKYARD_PASSWORD"
            ))),
        }
    }

    /// Checks the credentials against the server and saves them (mode 0600).
    pub async fn login(self) -> Result<PathBuf, CliError> {
        let client = http_client()?;
        let r = client
            .get(format!("{}/api/v1/user", self.url))
            .basic_auth(&self.username, Some(&self.password))
            .send()
            .await
            .map_err(|source| CliError::Unreachable {
                url: self.url.clone(),
                source,
            })?;
        if !r.status().is_success() {
            return Err(server_error(r).await);
        }
        let path = credentials_file();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&path)?;
        f.write_all(&serde_json::to_vec_pretty(&self).expect("serializable"))?;
        Ok(path)
    }
}

fn http_client() -> Result<reqwest::Client, CliError> {
    reqwest::Client::builder()
        .user_agent(concat!("dockyard/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| CliError::Server(format!("HTTP client: {e}")))
}

async fn server_error(r: reqwest::Response) -> CliError {
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    let message = body["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
    CliError::Server(format!("server answered {}: {message}", status.as_u16()))
}

/// What `dockyard build` was asked to do.
#[derive(Debug, Clone)]
pub struct BuildCommand {
    pub context: PathBuf,
    /// Dockerfile path relative to the context.
    pub dockerfile: String,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub platforms: Vec<String>,
    /// `repository:tag`, all in one repository.
    pub tags: Vec<String>,
    /// Do not draw progress bars (not a terminal, or asked).
    pub quiet: bool,
}

/// How a followed build ended.
#[derive(Debug, Clone, Deserialize)]
pub struct BuildOutcome {
    pub build_id: String,
    pub status: String,
    pub error: Option<String>,
    pub manifest_digest: Option<String>,
}

fn split_repo_tags(tags: &[String]) -> Result<(String, Vec<String>), CliError> {
    let mut repo: Option<String> = None;
    let mut out = Vec::new();
    for t in tags {
        // The tag is after the last ':' that follows the last '/'.
        let slash = t.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (r, tag) = match t[slash..].rfind(':') {
            Some(i) => (&t[..slash + i], &t[slash + i + 1..]),
            None => (t.as_str(), "latest"),
        };
        // A registry host in front (`localhost:5000/team/app`) is the
        // server's own: drop it.
        let r = match r.split_once('/') {
            Some((host, rest))
                if (host.contains('.') || host.contains(':') || host == "localhost")
                    && rest.contains('/') =>
            {
                rest
            }
            _ => r,
        };
        if !r.contains('/') {
            return Err(CliError::Usage(format!(
                "-t {t}: name the repository as namespace/name[:tag]"
            )));
        }
        match &repo {
            Some(existing) if existing != r => {
                return Err(CliError::Usage(
                    "every -t must name the same repository".into(),
                ));
            }
            _ => repo = Some(r.to_string()),
        }
        if !out.iter().any(|x| x == tag) {
            out.push(tag.to_string());
        }
    }
    let repo = repo.ok_or_else(|| CliError::Usage("give the image name with -t".into()))?;
    Ok((repo, out))
}

/// Packs and uploads the context, then follows the build to its end.
pub async fn build(creds: &Credentials, cmd: &BuildCommand) -> Result<BuildOutcome, CliError> {
    let (repo, tags) = split_repo_tags(&cmd.tags)?;
    if !cmd.context.is_dir() {
        return Err(CliError::Usage(format!(
            "{} is not a directory",
            cmd.context.display()
        )));
    }
    let dockerfile_path = cmd.context.join(&cmd.dockerfile);
    if !dockerfile_path.is_file() {
        return Err(CliError::Usage(format!(
            "no Dockerfile at {}",
            dockerfile_path.display()
        )));
    }
    // Pack (respecting .dockerignore) into a temporary file.
    let spinner = bar(cmd.quiet, None, "packing context");
    let archive = tempfile::NamedTempFile::new()?;
    let (context, dockerfile) = (cmd.context.clone(), cmd.dockerfile.clone());
    let file = archive.reopen()?;
    let stats = tokio::task::spawn_blocking(move || {
        crate::source::pack_context(&context, &dockerfile, std::io::BufWriter::new(file))
    })
    .await
    .map_err(|e| CliError::Server(format!("packing: {e}")))?
    .map_err(|e| CliError::Usage(format!("packing the context: {e}")))?;
    spinner.finish_and_clear();
    let size = archive.as_file().metadata()?.len();
    eprintln!(
        "context: {} files, {} compressed",
        stats.files,
        human_bytes(size)
    );

    // Upload with a progress bar.
    let client = http_client()?;
    let mut url = reqwest::Url::parse(&format!(
        "{}/api/v1/repositories/{repo}/builds/context",
        creds.url
    ))
    .map_err(|e| CliError::Usage(format!("server URL: {e}")))?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("dockerfile", &cmd.dockerfile);
        q.append_pair("platforms", &cmd.platforms.join(","));
        q.append_pair("tags", &tags.join(","));
        if let Some(t) = &cmd.target {
            q.append_pair("target", t);
        }
        if !cmd.build_args.is_empty() {
            q.append_pair(
                "build_args",
                &serde_json::to_string(&cmd.build_args).expect("serializable"),
            );
        }
    }
    let progress = bar(cmd.quiet, Some(size), "uploading");
    let p = progress.clone();
    let reader = tokio::fs::File::open(archive.path()).await?;
    let body = ReaderStream::with_capacity(reader, 256 * 1024).inspect(move |c| {
        if let Ok(c) = c {
            p.inc(c.len() as u64);
        }
    });
    let r = client
        .post(url)
        .basic_auth(&creds.username, Some(&creds.password))
        .header("content-type", "application/gzip")
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .map_err(|source| CliError::Unreachable {
            url: creds.url.clone(),
            source,
        })?;
    progress.finish_and_clear();
    if !r.status().is_success() {
        return Err(server_error(r).await);
    }
    let created: serde_json::Value = r
        .json()
        .await
        .map_err(|e| CliError::Server(format!("unexpected answer: {e}")))?;
    let id = created["id"].as_str().unwrap_or_default().to_string();
    eprintln!(
        "build {id} queued for {repo} ({})",
        cmd.platforms.join(", ")
    );
    follow(creds, &id).await
}

/// Prints a build's logs live until it ends.
pub async fn follow(creds: &Credentials, id: &str) -> Result<BuildOutcome, CliError> {
    let client = http_client()?;
    let r = client
        .get(format!("{}/api/v1/builds/{id}/logs?follow=true", creds.url))
        .basic_auth(&creds.username, Some(&creds.password))
        .header("accept", "text/event-stream")
        .send()
        .await
        .map_err(|source| CliError::Unreachable {
            url: creds.url.clone(),
            source,
        })?;
    if !r.status().is_success() {
        return Err(server_error(r).await);
    }
    let mut events = r.bytes_stream().eventsource();
    let mut platforms = std::collections::BTreeSet::new();
    let mut stdout = std::io::stdout();
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|e| CliError::Server(format!("log stream: {e}")))?;
        let data: serde_json::Value = serde_json::from_str(&ev.data).unwrap_or_default();
        let platform = data["platform"].as_str().unwrap_or("").to_string();
        if !platform.is_empty() {
            platforms.insert(platform.clone());
        }
        match ev.event.as_str() {
            "log" => {
                let text = data["text"].as_str().unwrap_or("");
                for line in text.lines() {
                    if platforms.len() > 1 {
                        writeln!(stdout, "[{platform}] {line}")?;
                    } else {
                        writeln!(stdout, "{line}")?;
                    }
                }
                stdout.flush()?;
            }
            "phase" => {
                eprintln!("==> {platform}: {}", data["phase"].as_str().unwrap_or(""));
            }
            "end" => {
                return Ok(BuildOutcome {
                    build_id: id.to_string(),
                    status: data["status"].as_str().unwrap_or("").to_string(),
                    error: data["error"].as_str().map(str::to_string),
                    manifest_digest: data["manifest_digest"].as_str().map(str::to_string),
                });
            }
            _ => {}
        }
    }
    Err(CliError::Server(
        "the log stream ended before the build did".into(),
    ))
}

fn bar(quiet: bool, len: Option<u64>, msg: &'static str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    match len {
        Some(n) => {
            let b = ProgressBar::new(n);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b.set_message(msg);
            b
        }
        None => {
            let b = ProgressBar::new_spinner();
            b.set_message(msg);
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        }
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_and_tags() {
        let (r, t) = split_repo_tags(&["team/app:1".into(), "team/app:latest".into()]).unwrap();
        assert_eq!(r, "team/app");
        assert_eq!(t, ["1", "latest"]);
        let (r, t) = split_repo_tags(&["localhost:5000/team/app".into()]).unwrap();
        assert_eq!((r.as_str(), t[0].as_str()), ("team/app", "latest"));
        assert!(split_repo_tags(&["app:1".into()]).is_err());
        assert!(split_repo_tags(&["a/b:1".into(), "a/c:1".into()]).is_err());
        assert!(split_repo_tags(&[]).is_err());
    }
}
