-- Identity and access: namespaces (users and organizations), teams, robots,
-- tokens, repository permissions and the audit log. Booleans are BIGINT 0/1
-- so one query text serves SQLite and PostgreSQL.

CREATE TABLE namespaces (
    id BIGSERIAL PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('user', 'org')),
    -- Whether a push to a missing repository creates it.
    create_on_push BIGINT NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL
);

CREATE TABLE users (
    id BIGSERIAL PRIMARY KEY,
    namespace_id BIGINT NOT NULL UNIQUE REFERENCES namespaces (id) ON DELETE CASCADE,
    username TEXT COLLATE "C" NOT NULL UNIQUE,
    -- argon2id PHC string.
    password_hash TEXT,
    email TEXT,
    superuser BIGINT NOT NULL DEFAULT 0,
    disabled BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE org_members (
    namespace_id BIGINT NOT NULL REFERENCES namespaces (id) ON DELETE CASCADE,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('member', 'admin', 'owner')),
    PRIMARY KEY (namespace_id, user_id)
);

CREATE TABLE teams (
    id BIGSERIAL PRIMARY KEY,
    namespace_id BIGINT NOT NULL REFERENCES namespaces (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    UNIQUE (namespace_id, name)
);

CREATE TABLE team_members (
    team_id BIGINT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    PRIMARY KEY (team_id, user_id)
);

-- Robot accounts, named <namespace>+<name>.
CREATE TABLE robots (
    id BIGSERIAL PRIMARY KEY,
    namespace_id BIGINT NOT NULL REFERENCES namespaces (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    UNIQUE (namespace_id, name)
);

-- Opaque secrets: robot tokens, personal access tokens, refresh tokens.
-- The public id is part of the token; only a hash of the secret is kept.
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('robot', 'personal', 'refresh')),
    user_id BIGINT REFERENCES users (id) ON DELETE CASCADE,
    robot_id BIGINT REFERENCES robots (id) ON DELETE CASCADE,
    name TEXT NOT NULL DEFAULT '',
    secret_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX tokens_user ON tokens (user_id);
CREATE INDEX tokens_robot ON tokens (robot_id);

ALTER TABLE repositories ADD COLUMN namespace_id BIGINT REFERENCES namespaces (id);
ALTER TABLE repositories ADD COLUMN visibility TEXT NOT NULL DEFAULT 'private';
ALTER TABLE repositories ADD COLUMN description TEXT NOT NULL DEFAULT '';

CREATE TABLE repository_permissions (
    repository_id BIGINT NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    subject_kind TEXT NOT NULL CHECK (subject_kind IN ('user', 'team', 'robot')),
    subject_id BIGINT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('read', 'write', 'admin')),
    PRIMARY KEY (repository_id, subject_kind, subject_id)
);
CREATE INDEX repository_permissions_subject ON repository_permissions (subject_kind, subject_id);

CREATE TABLE audit_log (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    actor_kind TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT '',
    success BIGINT NOT NULL DEFAULT 1,
    detail TEXT
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_actor ON audit_log (actor, at);
