//! Identity: users, organizations, teams, robots, opaque tokens, and the
//! question every request asks: what may this principal do to this
//! repository?
//!
//! Secrets: passwords are stored as argon2id PHC strings. Robot, personal and
//! refresh tokens are 256-bit random secrets; for those a slow hash adds no
//! protection (they cannot be guessed), so the SHA-256 of the secret is kept
//! and compared in constant time, which keeps every registry login fast.
//! Tokens look like `dyr_<id>_<secret>` (`dyr` robot, `dyp` personal, `dyf`
//! refresh), so secret scanners can recognise leaked ones and the id finds
//! the row without scanning.
//!
//! This module is the data layer only: no HTTP.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::RngCore;
use serde::Serialize;
use sha2::Digest as _;
use sqlx::Row;
use subtle::ConstantTimeEq;

use crate::{Db, now_millis};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid {0}")]
    Invalid(String),
    #[error("password hashing: {0}")]
    Hash(String),
}

pub type Result<T, E = IdentityError> = std::result::Result<T, E>;

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    User {
        id: i64,
        name: String,
        superuser: bool,
    },
    /// A robot, named `<namespace>+<name>`.
    Robot {
        id: i64,
        name: String,
        namespace_id: i64,
    },
}

impl Principal {
    /// The name recorded in tokens and the audit log.
    pub fn name(&self) -> &str {
        match self {
            Principal::Anonymous => "",
            Principal::User { name, .. } | Principal::Robot { name, .. } => name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::User { .. } => "user",
            Principal::Robot { .. } => "robot",
        }
    }
}

/// A permission level on a repository, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Registry actions this role grants: `pull`, then `push`, then `delete`.
    pub fn actions(self) -> &'static [&'static str] {
        match self {
            Role::Read => &["pull"],
            Role::Write => &["pull", "push"],
            Role::Admin => &["pull", "push", "delete", "*"],
        }
    }
}

/// Kinds of opaque token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Robot,
    Personal,
    Refresh,
}

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            TokenKind::Robot => "dyr",
            TokenKind::Personal => "dyp",
            TokenKind::Refresh => "dyf",
        }
    }
    fn column(self) -> &'static str {
        match self {
            TokenKind::Robot => "robot",
            TokenKind::Personal => "personal",
            TokenKind::Refresh => "refresh",
        }
    }
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| IdentityError::Hash(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| IdentityError::Hash(e.to_string()))
}

/// Checks a password against its stored hash (constant time inside argon2).
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

fn secret_hash(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bytes = vec![0u8; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % 32] as char)
        .collect()
}

fn random_secret() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Splits `dyr_<id>_<secret>` into kind, id and secret.
fn parse_token(token: &str) -> Option<(TokenKind, &str, &str)> {
    let (prefix, rest) = token.split_once('_')?;
    let kind = match prefix {
        "dyr" => TokenKind::Robot,
        "dyp" => TokenKind::Personal,
        "dyf" => TokenKind::Refresh,
        _ => return None,
    };
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && secret.len() == 43).then_some((kind, id, secret))
}

/// A new opaque token for another crate's credential kind (e.g. executor
/// node tokens, `dyn_`): the public id, the token to show once, and the hash
/// to store.
pub fn mint_opaque(prefix: &str) -> (String, String, String) {
    let id = random_id(16);
    let secret = random_secret();
    let hash = secret_hash(&secret);
    (id.clone(), format!("{prefix}_{id}_{secret}"), hash)
}

/// Splits `<prefix>_<id>_<secret>` into id and secret.
pub fn split_opaque<'a>(token: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = token.strip_prefix(prefix)?.strip_prefix('_')?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && secret.len() == 43).then_some((id, secret))
}

/// Whether `secret` matches a hash from [`mint_opaque`] (constant time).
pub fn secret_matches(stored_hash: &str, secret: &str) -> bool {
    stored_hash
        .as_bytes()
        .ct_eq(secret_hash(secret).as_bytes())
        .into()
}

/// Whether a secret has the shape of one of our opaque tokens.
pub fn looks_like_token(secret: &str) -> bool {
    ["dyr_", "dyp_", "dyf_"]
        .iter()
        .any(|p| secret.starts_with(p))
}

/// Parses an `Authorization: Basic …` header value into user and secret.
pub fn parse_basic(value: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// Names of users, organizations, teams and robots: lowercase letters,
/// digits, `-` and `_`, starting with a letter or digit, 2 to 64 characters;
/// also a valid repository path component.
pub fn valid_name(name: &str) -> bool {
    (2..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.ends_with(['-', '_'])
        && !name.contains("__")
}

/// The outcome of a login attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    Ok(Principal),
    /// Wrong name or secret (recorded against the limits).
    Failed,
    /// Too many recent failures for the account or the address.
    Limited(std::time::Duration),
}

/// Identity data access.
#[derive(Clone)]
pub struct Identity {
    pub db: Db,
    /// Failed-login limits, shared by every clone.
    limiter: std::sync::Arc<crate::ratelimit::LoginLimiter>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

fn flag(v: i64) -> bool {
    v != 0
}

impl Identity {
    pub fn new(db: Db) -> Identity {
        Identity {
            db,
            limiter: std::sync::Arc::new(crate::ratelimit::LoginLimiter::new()),
        }
    }

    /// [`Identity::authenticate`] under the failed-login limits for the
    /// account and the client `address`; failures are audited.
    pub async fn login_limited(
        &self,
        username: &str,
        secret: &str,
        address: &str,
        via: &str,
    ) -> Result<Login> {
        if let Err(wait) = self.limiter.check(username, address) {
            return Ok(Login::Limited(wait));
        }
        match self.authenticate(username, secret).await? {
            Some(p) => Ok(Login::Ok(p)),
            None => {
                self.limiter.failed(username, address);
                self.audit(
                    &Principal::Anonymous,
                    "login",
                    username,
                    address,
                    false,
                    Some(via),
                )
                .await?;
                Ok(Login::Failed)
            }
        }
    }

    async fn create_namespace(tx: &mut sqlx::AnyConnection, name: &str, kind: &str) -> Result<i64> {
        if !valid_name(name) {
            return Err(IdentityError::Invalid(format!("name {name:?}")));
        }
        let exists = sqlx::query("SELECT 1 FROM namespaces WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(IdentityError::Exists(format!("namespace {name}")));
        }
        sqlx::query("INSERT INTO namespaces (name, kind, created_at) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(kind)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT id FROM namespaces WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Creates a user (and its namespace). Returns the user id.
    pub async fn create_user(
        &self,
        username: &str,
        password: Option<&str>,
        superuser: bool,
    ) -> Result<i64> {
        let hash = password.map(hash_password).transpose()?;
        let mut tx = self.db.write.begin().await?;
        let ns = Self::create_namespace(&mut tx, username, "user").await?;
        sqlx::query(
            "INSERT INTO users (namespace_id, username, password_hash, superuser, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(ns)
        .bind(username)
        .bind(hash)
        .bind(i64::from(superuser))
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query("SELECT id FROM users WHERE username = $1")
            .bind(username)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row.try_get(0)?)
    }

    /// Sets a user's password.
    pub async fn set_password(&self, username: &str, password: &str) -> Result<()> {
        let hash = hash_password(password)?;
        let n = sqlx::query("UPDATE users SET password_hash = $1 WHERE username = $2")
            .bind(hash)
            .bind(username)
            .execute(&self.db.write)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(IdentityError::NotFound(format!("user {username}")));
        }
        Ok(())
    }

    /// The user with this name and password, if both are right and the
    /// account is enabled.
    pub async fn login(&self, username: &str, password: &str) -> Result<Option<Principal>> {
        let row = sqlx::query(
            "SELECT id, password_hash, superuser, disabled FROM users WHERE username = $1",
        )
        .bind(username)
        .fetch_optional(&self.db.read)
        .await?;
        let Some(row) = row else {
            // Spend the same time as a real check, so that response times do
            // not reveal which usernames exist.
            let _ = verify_password(dummy_hash(), password);
            return Ok(None);
        };
        let hash: Option<String> = row.try_get(1)?;
        let ok = hash.is_some_and(|h| verify_password(&h, password));
        if !ok || flag(row.try_get(3)?) {
            return Ok(None);
        }
        Ok(Some(Principal::User {
            id: row.try_get(0)?,
            name: username.to_string(),
            superuser: flag(row.try_get(2)?),
        }))
    }

    /// Checks basic-auth credentials: a password, or a robot or personal
    /// token given as the password (refresh tokens are not passwords).
    pub async fn authenticate(&self, username: &str, secret: &str) -> Result<Option<Principal>> {
        if ["dyr_", "dyp_", "dyf_"]
            .iter()
            .any(|p| secret.starts_with(p))
        {
            return Ok(
                match self.authenticate_token(secret, Some(username)).await? {
                    Some((p, TokenKind::Robot | TokenKind::Personal)) => Some(p),
                    _ => None,
                },
            );
        }
        self.login(username, secret).await
    }

    /// The enabled user or robot with this name (a token's `sub`), without
    /// authentication.
    pub async fn principal_by_name(&self, name: &str) -> Result<Option<Principal>> {
        if name.is_empty() {
            return Ok(Some(Principal::Anonymous));
        }
        if let Some((ns, robot)) = name.split_once('+') {
            let row = sqlx::query(
                "SELECT r.id, r.namespace_id FROM robots r JOIN namespaces n ON n.id = r.namespace_id \
                 WHERE n.name = $1 AND r.name = $2",
            )
            .bind(ns)
            .bind(robot)
            .fetch_optional(&self.db.read)
            .await?;
            return Ok(row
                .map(|r| -> sqlx::Result<Principal> {
                    Ok(Principal::Robot {
                        id: r.try_get(0)?,
                        name: name.to_string(),
                        namespace_id: r.try_get(1)?,
                    })
                })
                .transpose()?);
        }
        let row = sqlx::query("SELECT id, superuser, disabled FROM users WHERE username = $1")
            .bind(name)
            .fetch_optional(&self.db.read)
            .await?;
        let Some(row) = row else { return Ok(None) };
        if flag(row.try_get(2)?) {
            return Ok(None);
        }
        Ok(Some(Principal::User {
            id: row.try_get(0)?,
            name: name.to_string(),
            superuser: flag(row.try_get(1)?),
        }))
    }

    /// Creates an organization owned by `owner`. Returns its namespace id.
    pub async fn create_org(&self, name: &str, owner: i64) -> Result<i64> {
        let mut tx = self.db.write.begin().await?;
        let ns = Self::create_namespace(&mut tx, name, "org").await?;
        sqlx::query(
            "INSERT INTO org_members (namespace_id, user_id, role) VALUES ($1, $2, 'owner')",
        )
        .bind(ns)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ns)
    }

    /// The namespace's id and kind.
    pub async fn namespace(&self, name: &str) -> Result<Option<(i64, String)>> {
        let row = sqlx::query("SELECT id, kind FROM namespaces WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db.read)
            .await?;
        Ok(row
            .map(|r| -> sqlx::Result<_> { Ok((r.try_get(0)?, r.try_get(1)?)) })
            .transpose()?)
    }

    /// Adds or updates an organization member.
    pub async fn set_org_member(&self, org_ns: i64, user_id: i64, role: &str) -> Result<()> {
        if !["member", "admin", "owner"].contains(&role) {
            return Err(IdentityError::Invalid(format!(
                "organization role {role:?}"
            )));
        }
        sqlx::query(
            "INSERT INTO org_members (namespace_id, user_id, role) VALUES ($1, $2, $3) \
             ON CONFLICT (namespace_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(org_ns)
        .bind(user_id)
        .bind(role)
        .execute(&self.db.write)
        .await?;
        Ok(())
    }

    /// Creates a robot in a namespace; returns (robot id, `ns+name`).
    pub async fn create_robot(&self, namespace: &str, name: &str) -> Result<(i64, String)> {
        if !valid_name(name) {
            return Err(IdentityError::Invalid(format!("robot name {name:?}")));
        }
        let (ns, _) = self
            .namespace(namespace)
            .await?
            .ok_or_else(|| IdentityError::NotFound(format!("namespace {namespace}")))?;
        let mut tx = self.db.write.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM robots WHERE namespace_id = $1 AND name = $2")
            .bind(ns)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(IdentityError::Exists(format!("robot {namespace}+{name}")));
        }
        sqlx::query("INSERT INTO robots (namespace_id, name, created_at) VALUES ($1, $2, $3)")
            .bind(ns)
            .bind(name)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT id FROM robots WHERE namespace_id = $1 AND name = $2")
            .bind(ns)
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((row.try_get(0)?, format!("{namespace}+{name}")))
    }

    /// Issues an opaque token for a user (personal, refresh) or a robot.
    /// The returned string is shown once; only its hash is stored.
    pub async fn create_token(
        &self,
        kind: TokenKind,
        user_id: Option<i64>,
        robot_id: Option<i64>,
        name: &str,
        expires_at: Option<i64>,
    ) -> Result<(String, String)> {
        let id = random_id(16);
        let secret = random_secret();
        sqlx::query(
            "INSERT INTO tokens (id, kind, user_id, robot_id, name, secret_hash, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id)
        .bind(kind.column())
        .bind(user_id)
        .bind(robot_id)
        .bind(name)
        .bind(secret_hash(&secret))
        .bind(now_millis())
        .bind(expires_at)
        .execute(&self.db.write)
        .await?;
        Ok((id.clone(), format!("{}_{id}_{secret}", kind.prefix())))
    }

    /// Revokes a token by id; false if unknown or already revoked.
    pub async fn revoke_token(&self, id: &str) -> Result<bool> {
        let n =
            sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_millis())
                .bind(id)
                .execute(&self.db.write)
                .await?
                .rows_affected();
        Ok(n == 1)
    }

    /// The principal an opaque token stands for, if it is valid: known,
    /// matching, not revoked, not expired, owner enabled. Records the use.
    /// `username`, when given (basic auth), must name the token's owner.
    pub async fn authenticate_token(
        &self,
        token: &str,
        username: Option<&str>,
    ) -> Result<Option<(Principal, TokenKind)>> {
        let Some((kind, id, secret)) = parse_token(token) else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT t.kind, t.secret_hash, t.expires_at, t.revoked_at, \
                    u.id, u.username, u.superuser, u.disabled, \
                    r.id, r.name, r.namespace_id, n.name \
             FROM tokens t \
             LEFT JOIN users u ON u.id = t.user_id \
             LEFT JOIN robots r ON r.id = t.robot_id \
             LEFT JOIN namespaces n ON n.id = r.namespace_id \
             WHERE t.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db.read)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let stored: String = row.try_get(1)?;
        let matches: bool = stored
            .as_bytes()
            .ct_eq(secret_hash(secret).as_bytes())
            .into();
        let kind_col: String = row.try_get(0)?;
        if !matches || kind_col != kind.column() {
            return Ok(None);
        }
        let expires: Option<i64> = row.try_get(2)?;
        let revoked: Option<i64> = row.try_get(3)?;
        let now = now_millis();
        if revoked.is_some() || expires.is_some_and(|e| e <= now) {
            return Ok(None);
        }
        let principal = if let Some(uid) = row.try_get::<Option<i64>, _>(4)? {
            if flag(row.try_get(7)?) {
                return Ok(None);
            }
            Principal::User {
                id: uid,
                name: row.try_get(5)?,
                superuser: flag(row.try_get(6)?),
            }
        } else if let Some(rid) = row.try_get::<Option<i64>, _>(8)? {
            let name: String = row.try_get(9)?;
            let ns: String = row.try_get(11)?;
            Principal::Robot {
                id: rid,
                name: format!("{ns}+{name}"),
                namespace_id: row.try_get(10)?,
            }
        } else {
            return Ok(None);
        };
        if let Some(u) = username
            && u != principal.name()
        {
            return Ok(None);
        }
        sqlx::query("UPDATE tokens SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&self.db.write)
            .await?;
        Ok(Some((principal, kind)))
    }

    /// Grants `role` on a repository to a user, team or robot.
    pub async fn grant(
        &self,
        repository_id: i64,
        subject_kind: &str,
        subject_id: i64,
        role: Role,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO repository_permissions (repository_id, subject_kind, subject_id, role) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (repository_id, subject_kind, subject_id) DO UPDATE SET role = excluded.role",
        )
        .bind(repository_id)
        .bind(subject_kind)
        .bind(subject_id)
        .bind(role.as_str())
        .execute(&self.db.write)
        .await?;
        Ok(())
    }

    /// `who`'s role on a namespace itself: `Admin` for its user, an owner or
    /// admin of its organization, or a superuser; `Read` for other members
    /// of the organization; else `None`.
    pub async fn namespace_role(&self, who: &Principal, ns_name: &str) -> Result<Option<Role>> {
        let Principal::User { id, superuser, .. } = who else {
            return Ok(None);
        };
        if *superuser {
            return Ok(Some(Role::Admin));
        }
        let Some((ns_id, kind)) = self.namespace(ns_name).await? else {
            return Ok(None);
        };
        if kind == "user" {
            let own = sqlx::query("SELECT 1 FROM users WHERE id = $1 AND namespace_id = $2")
                .bind(id)
                .bind(ns_id)
                .fetch_optional(&self.db.read)
                .await?;
            return Ok(own.map(|_| Role::Admin));
        }
        let row =
            sqlx::query("SELECT role FROM org_members WHERE namespace_id = $1 AND user_id = $2")
                .bind(ns_id)
                .bind(id)
                .fetch_optional(&self.db.read)
                .await?;
        Ok(match row {
            Some(r) => match r.try_get::<String, _>(0)?.as_str() {
                "admin" | "owner" => Some(Role::Admin),
                _ => Some(Role::Read),
            },
            None => None,
        })
    }

    /// Whether a push to a missing repository of this namespace creates it
    /// (namespaces that do not exist, e.g. `library`, only superusers push to).
    async fn creates_on_push(&self, ns_name: &str) -> Result<bool> {
        let row = sqlx::query("SELECT create_on_push FROM namespaces WHERE name = $1")
            .bind(ns_name)
            .fetch_optional(&self.db.read)
            .await?;
        Ok(row
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()?
            .is_none_or(flag))
    }

    /// Turns creation on first push on or off for a namespace.
    pub async fn set_create_on_push(&self, ns_name: &str, on: bool) -> Result<()> {
        let n = sqlx::query("UPDATE namespaces SET create_on_push = $1 WHERE name = $2")
            .bind(i64::from(on))
            .bind(ns_name)
            .execute(&self.db.write)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(IdentityError::NotFound(format!("namespace {ns_name}")));
        }
        Ok(())
    }

    /// What `who` may do to repository `repo` (`namespace/rest`), or `None`.
    /// For a repository that does not exist yet, the answer is whether `who`
    /// may create it by pushing (write on the namespace).
    pub async fn repository_role(&self, who: &Principal, repo: &str) -> Result<Option<Role>> {
        if let Principal::User {
            superuser: true, ..
        } = who
        {
            return Ok(Some(Role::Admin));
        }
        let ns_name = repo.split('/').next().unwrap_or(repo);
        let repo_row = sqlx::query("SELECT id, visibility FROM repositories WHERE name = $1")
            .bind(repo)
            .fetch_optional(&self.db.read)
            .await?;
        let public = match &repo_row {
            Some(r) => r.try_get::<String, _>(1)? == "public",
            None => false,
        };
        let mut best: Option<Role> = public.then_some(Role::Read);
        let mut raise = |r: Role| {
            if best.is_none_or(|b| r > b) {
                best = Some(r);
            }
        };
        if self.namespace_role(who, ns_name).await? == Some(Role::Admin)
            && (repo_row.is_some() || self.creates_on_push(ns_name).await?)
        {
            raise(Role::Admin);
        }
        match who {
            Principal::Anonymous => {}
            Principal::User { id, .. } => {
                if let Some(r) = &repo_row {
                    let grants = self
                        .grants(
                            "SELECT role FROM repository_permissions WHERE repository_id = $1 AND \
                             ((subject_kind = 'user' AND subject_id = $2) OR \
                              (subject_kind = 'team' AND subject_id IN (SELECT team_id FROM team_members WHERE user_id = $2)))",
                            r.try_get(0)?,
                            *id,
                        )
                        .await?;
                    grants.into_iter().for_each(&mut raise);
                }
            }
            Principal::Robot { id, .. } => {
                if let Some(r) = &repo_row {
                    let grants = self
                        .grants(
                            "SELECT role FROM repository_permissions WHERE repository_id = $1 \
                             AND subject_kind = 'robot' AND subject_id = $2",
                            r.try_get(0)?,
                            *id,
                        )
                        .await?;
                    grants.into_iter().for_each(&mut raise);
                }
            }
        }
        Ok(best)
    }

    /// The roles a grants query (`$1` repository id, `$2` subject id) finds.
    async fn grants(
        &self,
        sql: &'static str,
        repository_id: i64,
        subject_id: i64,
    ) -> Result<Vec<Role>> {
        let rows = sqlx::query(sql)
            .bind(repository_id)
            .bind(subject_id)
            .fetch_all(&self.db.read)
            .await?;
        let mut roles = Vec::new();
        for row in rows {
            if let Some(role) = Role::parse(&row.try_get::<String, _>(0)?) {
                roles.push(role);
            }
        }
        Ok(roles)
    }

    /// Creates a team in an organization; returns its id.
    pub async fn create_team(&self, org_ns: i64, name: &str) -> Result<i64> {
        if !valid_name(name) {
            return Err(IdentityError::Invalid(format!("team name {name:?}")));
        }
        let n = sqlx::query(
            "INSERT INTO teams (namespace_id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (namespace_id, name) DO NOTHING",
        )
        .bind(org_ns)
        .bind(name)
        .bind(now_millis())
        .execute(&self.db.write)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(IdentityError::Exists(format!("team {name}")));
        }
        self.team(org_ns, name)
            .await?
            .ok_or_else(|| IdentityError::NotFound(format!("team {name}")))
    }

    /// A team's id by organization and name.
    pub async fn team(&self, org_ns: i64, name: &str) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT id FROM teams WHERE namespace_id = $1 AND name = $2")
            .bind(org_ns)
            .bind(name)
            .fetch_optional(&self.db.read)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Adds a user to a team.
    pub async fn add_team_member(&self, team_id: i64, user_id: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO team_members (team_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(team_id)
        .bind(user_id)
        .execute(&self.db.write)
        .await?;
        Ok(())
    }

    /// Robots of a namespace: (full name, created_at).
    pub async fn robots(&self, ns_name: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT r.name, r.created_at FROM robots r JOIN namespaces n ON n.id = r.namespace_id \
             WHERE n.name = $1 ORDER BY r.name",
        )
        .bind(ns_name)
        .fetch_all(&self.db.read)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    format!("{ns_name}+{}", r.try_get::<String, _>(0)?),
                    r.try_get(1)?,
                ))
            })
            .collect()
    }

    /// Deletes a robot with its tokens and permissions.
    pub async fn delete_robot(&self, robot_id: i64) -> Result<()> {
        let mut tx = self.db.write.begin().await?;
        for q in [
            "DELETE FROM tokens WHERE robot_id = $1",
            "DELETE FROM repository_permissions WHERE subject_kind = 'robot' AND subject_id = $1",
            "DELETE FROM robots WHERE id = $1",
        ] {
            sqlx::query(q).bind(robot_id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes a grant; false if there was none.
    pub async fn revoke_grant(
        &self,
        repository_id: i64,
        subject_kind: &str,
        subject_id: i64,
    ) -> Result<bool> {
        let n = sqlx::query(
            "DELETE FROM repository_permissions WHERE repository_id = $1 AND subject_kind = $2 AND subject_id = $3",
        )
        .bind(repository_id)
        .bind(subject_kind)
        .bind(subject_id)
        .execute(&self.db.write)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// All users: (name, superuser, created_at), by name.
    pub async fn users(&self) -> Result<Vec<(String, bool, i64)>> {
        let rows =
            sqlx::query("SELECT username, superuser, created_at FROM users ORDER BY username")
                .fetch_all(&self.db.read)
                .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, flag(r.try_get(1)?), r.try_get(2)?)))
            .collect()
    }

    /// A repository's API view.
    pub async fn repository(&self, name: &str) -> Result<Option<RepositoryInfo>> {
        let row = sqlx::query(
            "SELECT id, name, visibility, description, created_at FROM repositories WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.db.read)
        .await?;
        Ok(row.map(repository_info).transpose()?)
    }

    /// Repositories `who` may read, by name after `after`, at most `n`.
    pub async fn visible_repositories(
        &self,
        who: &Principal,
        namespace: Option<&str>,
        after: &str,
        n: usize,
    ) -> Result<Vec<RepositoryInfo>> {
        let mut out = Vec::new();
        let mut cursor = after.to_string();
        loop {
            let rows = sqlx::query(
                "SELECT id, name, visibility, description, created_at FROM repositories \
                 WHERE name > $1 AND ($2 = '' OR name LIKE $3) ORDER BY name LIMIT 200",
            )
            .bind(&cursor)
            .bind(namespace.unwrap_or(""))
            .bind(format!("{}/%", namespace.unwrap_or("")))
            .fetch_all(&self.db.read)
            .await?;
            let done = rows.len() < 200;
            for row in rows {
                let info = repository_info(row)?;
                cursor = info.name.clone();
                // LIKE treats '_' as a wildcard; check the prefix exactly.
                let in_namespace = namespace.is_none_or(|ns| {
                    info.name
                        .strip_prefix(ns)
                        .is_some_and(|r| r.starts_with('/'))
                });
                if in_namespace && self.repository_role(who, &info.name).await?.is_some() {
                    out.push(info);
                    if out.len() == n {
                        return Ok(out);
                    }
                }
            }
            if done {
                return Ok(out);
            }
        }
    }

    /// Creates an empty repository.
    pub async fn create_repository(
        &self,
        name: &str,
        visibility: &str,
        description: &str,
        actor: &str,
    ) -> Result<RepositoryInfo> {
        let ns = name.split('/').next().unwrap_or(name);
        let ns_id = self.namespace(ns).await?.map(|(id, _)| id);
        let mut tx = self.db.write.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO repositories (name, created_at, namespace_id, visibility, description) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now_millis())
        .bind(ns_id)
        .bind(visibility)
        .bind(description)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(IdentityError::Exists(format!("repository {name}")));
        }
        let e = crate::events::NewEvent::new(crate::events::kinds::REPOSITORY_CREATED, name)
            .actor(Some(actor));
        crate::events::append(&mut tx, self.db.backend, &[e]).await?;
        tx.commit().await?;
        crate::events::wake();
        self.repository(name)
            .await?
            .ok_or_else(|| IdentityError::NotFound(format!("repository {name}")))
    }

    /// Changes visibility and/or description.
    pub async fn update_repository(
        &self,
        name: &str,
        visibility: Option<&str>,
        description: Option<&str>,
    ) -> Result<()> {
        let n = sqlx::query(
            "UPDATE repositories SET visibility = COALESCE($1, visibility), description = COALESCE($2, description) WHERE name = $3",
        )
        .bind(visibility)
        .bind(description)
        .bind(name)
        .execute(&self.db.write)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(IdentityError::NotFound(format!("repository {name}")));
        }
        Ok(())
    }

    /// Deletes a repository with its manifests, tags, blob links, upload
    /// sessions and permissions (the bytes are reclaimed by GC).
    pub async fn delete_repository(&self, name: &str, actor: &str) -> Result<bool> {
        let mut tx = self.db.write.begin().await?;
        let Some(row) = sqlx::query("SELECT id FROM repositories WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(false);
        };
        let id: i64 = row.try_get(0)?;
        for table in [
            "DELETE FROM tags WHERE repository_id = $1",
            "DELETE FROM manifest_blobs WHERE repository_id = $1",
            "DELETE FROM manifest_children WHERE repository_id = $1",
            "DELETE FROM manifests WHERE repository_id = $1",
            "DELETE FROM repository_blobs WHERE repository_id = $1",
            "DELETE FROM uploads WHERE repository_id = $1",
            "DELETE FROM repository_permissions WHERE repository_id = $1",
            "DELETE FROM repositories WHERE id = $1",
        ] {
            sqlx::query(table).bind(id).execute(&mut *tx).await?;
        }
        let e = crate::events::NewEvent::new(crate::events::kinds::REPOSITORY_DELETED, name)
            .actor(Some(actor));
        crate::events::append(&mut tx, self.db.backend, &[e]).await?;
        tx.commit().await?;
        crate::events::wake();
        Ok(true)
    }

    /// A user's personal tokens (never the secrets).
    pub async fn personal_tokens(&self, user_id: i64) -> Result<Vec<TokenInfo>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, expires_at, last_used_at, revoked_at FROM tokens \
             WHERE user_id = $1 AND kind = 'personal' ORDER BY created_at",
        )
        .bind(user_id)
        .fetch_all(&self.db.read)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(TokenInfo {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    created_at: r.try_get(2)?,
                    expires_at: r.try_get(3)?,
                    last_used_at: r.try_get(4)?,
                    revoked_at: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// Who owns a token: its user id, or its robot's `namespace+name`.
    pub async fn token_owner(&self, id: &str) -> Result<Option<(Option<i64>, Option<String>)>> {
        let row = sqlx::query(
            "SELECT t.user_id, n.name, r.name FROM tokens t \
             LEFT JOIN robots r ON r.id = t.robot_id LEFT JOIN namespaces n ON n.id = r.namespace_id \
             WHERE t.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db.read)
        .await?;
        Ok(row
            .map(|r| -> sqlx::Result<_> {
                let robot = match (
                    r.try_get::<Option<String>, _>(1)?,
                    r.try_get::<Option<String>, _>(2)?,
                ) {
                    (Some(ns), Some(name)) => Some(format!("{ns}+{name}")),
                    _ => None,
                };
                Ok((r.try_get(0)?, robot))
            })
            .transpose()?)
    }

    /// The audit log, newest first, filtered.
    pub async fn audit_entries(
        &self,
        actor: Option<&str>,
        action: Option<&str>,
        before_id: Option<i64>,
        n: i64,
    ) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, actor, actor_kind, action, target, address, success, detail FROM audit_log \
             WHERE ($1 = '' OR actor = $1) AND ($2 = '' OR action = $2) AND id < $3 ORDER BY id DESC LIMIT $4",
        )
        .bind(actor.unwrap_or(""))
        .bind(action.unwrap_or(""))
        .bind(before_id.unwrap_or(i64::MAX))
        .bind(n)
        .fetch_all(&self.db.read)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    actor: r.try_get(2)?,
                    actor_kind: r.try_get(3)?,
                    action: r.try_get(4)?,
                    target: r.try_get(5)?,
                    address: r.try_get(6)?,
                    success: flag(r.try_get(7)?),
                    detail: r.try_get(8)?,
                })
            })
            .collect()
    }

    /// Records a security-relevant action.
    pub async fn audit(
        &self,
        who: &Principal,
        action: &str,
        target: &str,
        address: &str,
        success: bool,
        detail: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, actor_kind, action, target, address, success, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(now_millis())
        .bind(who.name())
        .bind(who.kind())
        .bind(action)
        .bind(target)
        .bind(address)
        .bind(i64::from(success))
        .bind(detail)
        .execute(&self.db.write)
        .await?;
        Ok(())
    }
}

/// A repository as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepositoryInfo {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub visibility: String,
    pub description: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

fn repository_info(r: sqlx::any::AnyRow) -> sqlx::Result<RepositoryInfo> {
    Ok(RepositoryInfo {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        visibility: r.try_get(2)?,
        description: r.try_get(3)?,
        created_at: r.try_get(4)?,
    })
}

/// A token as listed (without its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    /// Unix milliseconds.
    pub at: i64,
    pub actor: String,
    pub actor_kind: String,
    pub action: String,
    pub target: String,
    pub address: String,
    pub success: bool,
    pub detail: Option<String>,
}

/// A fixed argon2id hash to verify against when a user does not exist.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password("dockyard-timing-equaliser").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db() -> (tempfile::TempDir, Identity) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = Db::connect(&url, 4).await.unwrap();
        (dir, Identity::new(db))
    }

    async fn repo(id: &Identity, name: &str, visibility: &str) -> i64 {
        sqlx::query("INSERT INTO repositories (name, created_at, visibility) VALUES ($1, 0, $2)")
            .bind(name)
            .bind(visibility)
            .execute(&id.db.write)
            .await
            .unwrap();
        sqlx::query("SELECT id FROM repositories WHERE name = $1")
            .bind(name)
            .fetch_one(&id.db.read)
            .await
            .unwrap()
            .try_get(0)
            .unwrap()
    }

    #[test]
    fn passwords_and_names() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "s3creT"));
        assert!(!verify_password("garbage", "s3cret"));
        assert!(valid_name("alice") && valid_name("acme-corp") && valid_name("a1"));
        assert!(
            !valid_name("A")
                && !valid_name("a")
                && !valid_name("a+b")
                && !valid_name("-a")
                && !valid_name("a/b")
        );
    }

    #[tokio::test]
    async fn users_tokens_and_roles() {
        let (_d, id) = db().await;
        let alice = id
            .create_user("alice", Some("pw-alice"), false)
            .await
            .unwrap();
        let bob = id.create_user("bob", Some("pw-bob"), false).await.unwrap();
        assert!(matches!(
            id.create_user("alice", None, false).await,
            Err(IdentityError::Exists(_))
        ));
        assert!(id.login("alice", "pw-alice").await.unwrap().is_some());
        assert!(id.login("alice", "wrong").await.unwrap().is_none());
        assert!(id.login("nobody", "pw").await.unwrap().is_none());

        let acme = id.create_org("acme", alice).await.unwrap();
        let _ = acme;
        let app = repo(&id, "acme/app", "private").await;
        let public = repo(&id, "acme/site", "public").await;
        let _ = public;
        let alice_p = id.login("alice", "pw-alice").await.unwrap().unwrap();
        let bob_p = id.login("bob", "pw-bob").await.unwrap().unwrap();
        assert_eq!(
            id.repository_role(&alice_p, "acme/app").await.unwrap(),
            Some(Role::Admin)
        );
        assert_eq!(id.repository_role(&bob_p, "acme/app").await.unwrap(), None);
        assert_eq!(
            id.repository_role(&bob_p, "acme/site").await.unwrap(),
            Some(Role::Read)
        );
        assert_eq!(
            id.repository_role(&Principal::Anonymous, "acme/site")
                .await
                .unwrap(),
            Some(Role::Read)
        );
        assert_eq!(
            id.repository_role(&Principal::Anonymous, "acme/app")
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            id.repository_role(&bob_p, "bob/new").await.unwrap(),
            Some(Role::Admin),
            "own namespace"
        );
        id.grant(app, "user", bob, Role::Write).await.unwrap();
        assert_eq!(
            id.repository_role(&bob_p, "acme/app").await.unwrap(),
            Some(Role::Write)
        );

        // Robots and their tokens.
        let (robot, full) = id.create_robot("acme", "ci").await.unwrap();
        assert_eq!(full, "acme+ci");
        let (tid, token) = id
            .create_token(TokenKind::Robot, None, Some(robot), "ci", None)
            .await
            .unwrap();
        assert!(token.starts_with("dyr_"));
        let (p, _) = id
            .authenticate_token(&token, Some("acme+ci"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.name(), "acme+ci");
        assert!(
            id.authenticate_token(&token, Some("bob"))
                .await
                .unwrap()
                .is_none(),
            "wrong username"
        );
        assert_eq!(id.repository_role(&p, "acme/app").await.unwrap(), None);
        id.grant(app, "robot", robot, Role::Read).await.unwrap();
        assert_eq!(
            id.repository_role(&p, "acme/app").await.unwrap(),
            Some(Role::Read)
        );
        // Tampered, revoked and expired tokens are refused.
        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(
            id.authenticate_token(&forged, None)
                .await
                .unwrap()
                .is_none()
        );
        assert!(id.revoke_token(&tid).await.unwrap());
        assert!(id.authenticate_token(&token, None).await.unwrap().is_none());
        let (_, expired) = id
            .create_token(
                TokenKind::Personal,
                Some(bob),
                None,
                "old",
                Some(now_millis() - 1),
            )
            .await
            .unwrap();
        assert!(
            id.authenticate_token(&expired, None)
                .await
                .unwrap()
                .is_none()
        );
        let (_, pat) = id
            .create_token(TokenKind::Personal, Some(bob), None, "laptop", None)
            .await
            .unwrap();
        assert_eq!(
            id.authenticate_token(&pat, None).await.unwrap().unwrap().0,
            bob_p
        );
        let used: Option<i64> =
            sqlx::query("SELECT last_used_at FROM tokens WHERE name = 'laptop'")
                .fetch_one(&id.db.read)
                .await
                .unwrap()
                .try_get(0)
                .unwrap();
        assert!(used.is_some());

        id.audit(&bob_p, "login", "", "127.0.0.1", true, None)
            .await
            .unwrap();
    }
}
