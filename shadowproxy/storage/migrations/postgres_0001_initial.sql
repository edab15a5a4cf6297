-- shadowproxy schema v1 (PostgreSQL). Applied by `shadowproxy db migrate` under an advisory lock.
CREATE TABLE IF NOT EXISTS shadow_log (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id          text NOT NULL,
    ts                  timestamptz NOT NULL,
    route               text NOT NULL,
    method              text NOT NULL,
    path                text NOT NULL,
    query               text NOT NULL DEFAULT '',
    request_headers     jsonb NOT NULL DEFAULT '{}'::jsonb,
    request_body        text,
    primary_upstream    text NOT NULL,
    primary_status      integer,
    primary_latency_ms  double precision,
    primary_body        text,
    primary_label       text,
    primary_score       double precision,
    shadow_upstream     text NOT NULL,
    shadow_status       integer,
    shadow_latency_ms   double precision,
    shadow_body         text,
    shadow_label        text,
    shadow_score        double precision,
    shadow_error        text,
    agreement           boolean,
    diff                jsonb NOT NULL DEFAULT '[]'::jsonb,
    instance            text NOT NULL,
    config_sha          text NOT NULL
);
-- Idempotent inserts: a batch retried after a lost COMMIT acknowledgement adds nothing.
CREATE UNIQUE INDEX IF NOT EXISTS shadow_log_request_shadow_uq ON shadow_log (request_id, shadow_upstream);
CREATE INDEX IF NOT EXISTS shadow_log_route_shadow_ts_idx ON shadow_log (route, shadow_upstream, ts);
CREATE INDEX IF NOT EXISTS shadow_log_ts_idx ON shadow_log (ts);

CREATE TABLE IF NOT EXISTS shadow_promotions (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts                timestamptz NOT NULL DEFAULT now(),
    route             text NOT NULL,
    previous_primary  text NOT NULL,
    new_primary       text NOT NULL,
    config_sha        text NOT NULL,
    instance          text NOT NULL
);
