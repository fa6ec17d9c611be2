-- Base-image rebuilds: a per-definition schedule for checking base images
-- in other registries, every rebuild decision (pushes of a base within the
-- debounce window share one pending row per definition and base), and what
-- was last seen of each upstream base. Timestamps are Unix milliseconds.

-- A cron expression with seconds; NULL: `builds.base_check_schedule`.
ALTER TABLE build_definitions ADD COLUMN base_check_schedule TEXT;

-- A definition's latest successful build (what its dependencies are read from).
CREATE INDEX builds_definition ON builds (definition_id, status, finished_at);

CREATE TABLE base_rebuilds (
    id TEXT PRIMARY KEY,
    definition_id TEXT NOT NULL REFERENCES build_definitions (id) ON DELETE CASCADE,
    -- The definition's repository (what the listing filters on).
    repository TEXT NOT NULL,
    -- As the build recorded it: `host/repository:tag`.
    base_reference TEXT NOT NULL,
    -- The digest the definition's last successful build used (NULL when
    -- unknown) and the digest the base moved to.
    from_digest TEXT,
    to_digest TEXT NOT NULL,
    -- pending | started | refused | superseded
    state TEXT NOT NULL CHECK (state IN ('pending', 'started', 'refused', 'superseded')),
    due_at BIGINT NOT NULL,
    build_id TEXT,
    message TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- At most one pending rebuild per definition and base: later moves extend it.
CREATE UNIQUE INDEX base_rebuilds_one_pending ON base_rebuilds (definition_id, base_reference)
    WHERE state = 'pending';
CREATE INDEX base_rebuilds_state ON base_rebuilds (state, due_at);
CREATE INDEX base_rebuilds_repository ON base_rebuilds (repository, created_at);

-- Base images in other registries: the digest last seen and when to look again.
CREATE TABLE upstream_bases (
    reference TEXT PRIMARY KEY,
    digest TEXT,
    checked_at BIGINT,
    next_check_at BIGINT NOT NULL,
    last_error TEXT
);
