CREATE TABLE IF NOT EXISTS stevedore_outbox (
    seq          BIGSERIAL   PRIMARY KEY,
    id           UUID        NOT NULL UNIQUE,
    topic        TEXT        NOT NULL,
    msg_key      TEXT        NOT NULL,
    payload      BYTEA       NOT NULL,
    headers      TEXT        NOT NULL DEFAULT '{}',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at TIMESTAMPTZ,
    dead_at      TIMESTAMPTZ,
    attempts     INTEGER     NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX IF NOT EXISTS stevedore_outbox_pending ON stevedore_outbox (seq) WHERE delivered_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS stevedore_outbox_delivered ON stevedore_outbox (delivered_at) WHERE delivered_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS stevedore_processed (
    consumer     TEXT        NOT NULL,
    message_id   UUID        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
