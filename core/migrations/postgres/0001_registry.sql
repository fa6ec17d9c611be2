-- Registry metadata. Timestamps are Unix milliseconds.
-- Names sort bytewise ("C") so pagination matches SQLite and the spec.

CREATE TABLE repositories (
    id BIGSERIAL PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

-- One row per stored blob, whatever the number of repositories using it.
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Which repositories may serve a blob (uploaded or mounted there).
CREATE TABLE repository_blobs (
    repository_id BIGINT NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest TEXT NOT NULL REFERENCES blobs (digest),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (repository_id, digest)
);
CREATE INDEX repository_blobs_digest ON repository_blobs (digest);

CREATE TABLE manifests (
    repository_id BIGINT NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    artifact_type TEXT,
    subject TEXT,
    size BIGINT NOT NULL,
    body BYTEA NOT NULL,
    annotations TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (repository_id, digest)
);
CREATE INDEX manifests_subject ON manifests (repository_id, subject);

-- Blobs a manifest references (config and layers): the GC's mark set.
CREATE TABLE manifest_blobs (
    repository_id BIGINT NOT NULL,
    manifest_digest TEXT NOT NULL,
    blob_digest TEXT NOT NULL REFERENCES blobs (digest),
    PRIMARY KEY (repository_id, manifest_digest, blob_digest),
    FOREIGN KEY (repository_id, manifest_digest) REFERENCES manifests (repository_id, digest) ON DELETE CASCADE
);
CREATE INDEX manifest_blobs_blob ON manifest_blobs (blob_digest);

-- Child manifests of an index.
CREATE TABLE manifest_children (
    repository_id BIGINT NOT NULL,
    parent_digest TEXT NOT NULL,
    child_digest TEXT NOT NULL,
    PRIMARY KEY (repository_id, parent_digest, child_digest),
    FOREIGN KEY (repository_id, parent_digest) REFERENCES manifests (repository_id, digest) ON DELETE CASCADE
);

CREATE TABLE tags (
    repository_id BIGINT NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    digest TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (repository_id, name),
    FOREIGN KEY (repository_id, digest) REFERENCES manifests (repository_id, digest) ON DELETE CASCADE
);

-- Upload sessions. Their bytes live in the object store under
-- dockyard/uploads/<id>/; this row makes them resumable after a restart.
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    repository_id BIGINT NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    size BIGINT NOT NULL,
    parts BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
