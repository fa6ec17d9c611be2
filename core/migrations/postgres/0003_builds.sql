-- Builds: triggers (inbound webhooks), build definitions, builds, one job
-- per platform, their logs, the base images each job used, executor node
-- tokens and registered executors. Timestamps are Unix milliseconds; JSON
-- columns are TEXT.

CREATE TABLE build_triggers (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('github', 'gitlab', 'generic')),
    -- HMAC key (GitHub, generic) or token (GitLab); needed in clear to verify.
    secret TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE trigger_deliveries (
    id TEXT PRIMARY KEY,
    trigger_id TEXT NOT NULL REFERENCES build_triggers (id) ON DELETE CASCADE,
    received_at BIGINT NOT NULL,
    address TEXT NOT NULL DEFAULT '',
    event TEXT NOT NULL DEFAULT '',
    git_ref TEXT,
    commit_sha TEXT,
    -- accepted | rejected | ignored
    outcome TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    builds TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX trigger_deliveries_trigger ON trigger_deliveries (trigger_id, received_at);

CREATE TABLE build_definitions (
    id TEXT PRIMARY KEY,
    repository TEXT NOT NULL,
    name TEXT NOT NULL,
    trigger_id TEXT REFERENCES build_triggers (id) ON DELETE SET NULL,
    git_url TEXT,
    git_username TEXT,
    git_password TEXT,
    git_ssh_key TEXT,
    dockerfile TEXT NOT NULL,
    context_dir TEXT NOT NULL,
    build_args TEXT NOT NULL,
    target TEXT,
    platforms TEXT NOT NULL,
    tag_templates TEXT NOT NULL,
    ref_filter TEXT,
    auto_rebuild BIGINT NOT NULL DEFAULT 1,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (repository, name)
);
CREATE INDEX build_definitions_trigger ON build_definitions (trigger_id);

CREATE TABLE builds (
    id TEXT PRIMARY KEY,
    repository TEXT NOT NULL,
    definition_id TEXT REFERENCES build_definitions (id) ON DELETE SET NULL,
    -- webhook | manual | upload | base_image
    trigger_kind TEXT NOT NULL,
    trigger_detail TEXT NOT NULL DEFAULT '',
    -- JSON of the job source (git url + commit, or the uploaded context)
    source TEXT NOT NULL,
    git_ref TEXT,
    commit_sha TEXT,
    dockerfile TEXT NOT NULL,
    context_dir TEXT NOT NULL,
    build_args TEXT NOT NULL,
    target TEXT,
    platforms TEXT NOT NULL,
    tags TEXT NOT NULL,
    -- queued | running | complete | failed | cancelled | internal_error
    status TEXT NOT NULL,
    error TEXT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    timeout_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    manifest_digest TEXT,
    media_type TEXT
);
CREATE INDEX builds_repository ON builds (repository, created_at);
CREATE INDEX builds_status ON builds (status);

CREATE TABLE build_jobs (
    id TEXT PRIMARY KEY,
    build_id TEXT NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    platform TEXT NOT NULL,
    phase TEXT NOT NULL,
    attempt BIGINT NOT NULL DEFAULT 0,
    executor_id TEXT,
    lease_expires BIGINT,
    queued_at BIGINT NOT NULL,
    -- when an executor took it (last attempt)
    started_at BIGINT,
    -- the executor's first report after taking it
    reported_at BIGINT,
    -- when the engine started building (phase building)
    building_at BIGINT,
    finished_at BIGINT,
    manifest_digest TEXT,
    config_digest TEXT,
    error TEXT,
    log_key TEXT
);
CREATE INDEX build_jobs_build ON build_jobs (build_id);
CREATE INDEX build_jobs_phase ON build_jobs (phase, queued_at);

CREATE TABLE build_log_chunks (
    job_id TEXT NOT NULL REFERENCES build_jobs (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- The base images each successful job resolved: what base-image rebuilds use.
CREATE TABLE build_base_images (
    job_id TEXT NOT NULL REFERENCES build_jobs (id) ON DELETE CASCADE,
    build_id TEXT NOT NULL,
    reference TEXT NOT NULL,
    digest TEXT
);
CREATE INDEX build_base_images_reference ON build_base_images (reference);
CREATE INDEX build_base_images_build ON build_base_images (build_id);

CREATE TABLE executor_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);

CREATE TABLE executors (
    id TEXT PRIMARY KEY,
    token_id TEXT NOT NULL REFERENCES executor_tokens (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    platforms TEXT NOT NULL,
    capacity BIGINT NOT NULL,
    engine TEXT NOT NULL,
    version TEXT NOT NULL,
    registered_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
