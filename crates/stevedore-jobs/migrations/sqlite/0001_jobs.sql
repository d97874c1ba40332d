-- Durable jobs. Times are milliseconds since the Unix epoch. States: available, running,
-- completed, dead, cancelled (see the PostgreSQL migration).
CREATE TABLE stevedore_jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT NOT NULL,
    queue            TEXT NOT NULL,
    payload          TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'available'
                     CHECK (state IN ('available', 'running', 'completed', 'dead', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts > 0),
    timeout_ms       INTEGER,
    unique_key       TEXT,
    scheduled_at     INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    attempted_at     INTEGER,
    finished_at      INTEGER,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    errors           TEXT NOT NULL DEFAULT '[]'
);

CREATE INDEX stevedore_jobs_fetch ON stevedore_jobs (queue, priority, scheduled_at, id)
    WHERE state = 'available';
CREATE INDEX stevedore_jobs_lease ON stevedore_jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX stevedore_jobs_finished ON stevedore_jobs (state, finished_at)
    WHERE state IN ('completed', 'dead', 'cancelled');
CREATE UNIQUE INDEX stevedore_jobs_unique ON stevedore_jobs (unique_key) WHERE unique_key IS NOT NULL;

CREATE TABLE stevedore_queues (
    name   TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE stevedore_leaders (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE TABLE stevedore_periodic (
    name      TEXT PRIMARY KEY,
    last_tick INTEGER NOT NULL
);
