-- shadowproxy schema v1 (SQLite). ts is stored as ISO-8601 UTC text ("2026-11-30T01:22:04.123456+00:00");
-- request_headers and diff as JSON text; agreement as 0/1/NULL.
CREATE TABLE IF NOT EXISTS shadow_log (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id          TEXT NOT NULL,
    ts                  TEXT NOT NULL,
    route               TEXT NOT NULL,
    method              TEXT NOT NULL,
    path                TEXT NOT NULL,
    query               TEXT NOT NULL DEFAULT '',
    request_headers     TEXT NOT NULL DEFAULT '{}',
    request_body        TEXT,
    primary_upstream    TEXT NOT NULL,
    primary_status      INTEGER,
    primary_latency_ms  REAL,
    primary_body        TEXT,
    primary_label       TEXT,
    primary_score       REAL,
    shadow_upstream     TEXT NOT NULL,
    shadow_status       INTEGER,
    shadow_latency_ms   REAL,
    shadow_body         TEXT,
    shadow_label        TEXT,
    shadow_score        REAL,
    shadow_error        TEXT,
    agreement           INTEGER,
    diff                TEXT NOT NULL DEFAULT '[]',
    instance            TEXT NOT NULL,
    config_sha          TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS shadow_log_request_shadow_uq ON shadow_log (request_id, shadow_upstream);
CREATE INDEX IF NOT EXISTS shadow_log_route_shadow_ts_idx ON shadow_log (route, shadow_upstream, ts);
CREATE INDEX IF NOT EXISTS shadow_log_ts_idx ON shadow_log (ts);

CREATE TABLE IF NOT EXISTS shadow_promotions (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    ts                TEXT NOT NULL,
    route             TEXT NOT NULL,
    previous_primary  TEXT NOT NULL,
    new_primary       TEXT NOT NULL,
    config_sha        TEXT NOT NULL,
    instance          TEXT NOT NULL
);
