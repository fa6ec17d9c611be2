-- Outbound webhooks: subscriptions, one delivery per subscription and
-- event (body rendered once, at fan-out, so a retry or a redelivery sends
-- the same bytes), and every attempt of a delivery. Timestamps are Unix
-- milliseconds; JSON columns are TEXT.

CREATE TABLE webhook_subscriptions (
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL CHECK (scope IN ('repository', 'namespace', 'global')),
    -- scope = 'repository': the repository; NULL otherwise
    repository TEXT,
    -- scope = 'repository' or 'namespace': its namespace; NULL for global
    namespace TEXT,
    url TEXT NOT NULL,
    format TEXT NOT NULL CHECK (format IN ('dockyard', 'cloudevents', 'distribution')),
    -- JSON array of event types; empty = every type
    event_types TEXT NOT NULL DEFAULT '[]',
    repository_glob TEXT,
    tag_regex TEXT,
    -- HMAC key; needed in clear to sign, shown once at creation
    secret TEXT NOT NULL,
    enabled BIGINT NOT NULL DEFAULT 1,
    -- only events with a larger id are delivered (the log's end at creation)
    from_event_id BIGINT NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX webhook_subscriptions_namespace ON webhook_subscriptions (namespace);

CREATE TABLE webhook_deliveries (
    -- queue order: a subscription's deliveries are attempted in seq order
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    subscription_id TEXT NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    event_id BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    -- pending | delivered | dead
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    -- a replica attempting it holds it until then (expired = free again)
    claimed_until BIGINT,
    claimed_by TEXT,
    content_type TEXT NOT NULL,
    body TEXT NOT NULL,
    redelivery_of TEXT,
    created_at BIGINT NOT NULL,
    delivered_at BIGINT,
    last_status BIGINT,
    last_error TEXT
);
-- The head of each subscription's queue: its smallest pending seq.
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (subscription_id, seq)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_subscription ON webhook_deliveries (subscription_id, seq);

CREATE TABLE webhook_attempts (
    delivery_id TEXT NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    -- JSON object of the request headers sent
    request_headers TEXT NOT NULL,
    response_status BIGINT,
    -- at most 4 KiB
    response_body TEXT,
    error TEXT,
    PRIMARY KEY (delivery_id, attempt)
);
