-- The event log: every change others react to, written in the same
-- transaction as the change. Consumers (webhooks, base-image rebuilds, ...)
-- read it in id order from their own position. Timestamps are Unix ms.

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    namespace TEXT,
    repository TEXT,
    tag TEXT,
    digest TEXT,
    actor TEXT,
    -- JSON object with the event's details
    data TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL
);
CREATE INDEX events_created ON events (created_at);
CREATE INDEX events_repository ON events (repository, id);

-- One row per consumer: how far it has read, and which process holds it
-- (only the lease holder consumes, so one replica handles a given event).
CREATE TABLE event_consumers (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL DEFAULT 0,
    owner TEXT,
    lease_expires BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL
);
