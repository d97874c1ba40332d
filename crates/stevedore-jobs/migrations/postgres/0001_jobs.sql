-- Durable jobs. States: available (waiting for its scheduled time or a worker), running (leased by
-- lease_owner until lease_expires_at), completed, dead (failed its last attempt or could not run),
-- cancelled.
CREATE TABLE stevedore_jobs (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             TEXT NOT NULL,
    queue            TEXT NOT NULL,
    payload          JSONB NOT NULL,
    state            TEXT NOT NULL DEFAULT 'available'
                     CHECK (state IN ('available', 'running', 'completed', 'dead', 'cancelled')),
    priority         SMALLINT NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts > 0),
    timeout_ms       BIGINT,
    unique_key       TEXT,
    scheduled_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempted_at     TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    lease_owner      TEXT,
    lease_expires_at TIMESTAMPTZ,
    -- One object per failed attempt: {"attempt": n, "at": epoch ms, "error": "..."}.
    errors           JSONB NOT NULL DEFAULT '[]'
);

-- The dequeue path: available jobs of one queue in priority, time, id order.
CREATE INDEX stevedore_jobs_fetch ON stevedore_jobs (queue, priority, scheduled_at, id)
    WHERE state = 'available';
-- The rescuer: running jobs by lease expiry.
CREATE INDEX stevedore_jobs_lease ON stevedore_jobs (lease_expires_at) WHERE state = 'running';
-- Retention and listing of finished jobs.
CREATE INDEX stevedore_jobs_finished ON stevedore_jobs (state, finished_at)
    WHERE state IN ('completed', 'dead', 'cancelled');
-- A unique key holds for as long as a job with it is stored (until retention deletes it).
CREATE UNIQUE INDEX stevedore_jobs_unique ON stevedore_jobs (unique_key) WHERE unique_key IS NOT NULL;

CREATE TABLE stevedore_queues (
    name   TEXT PRIMARY KEY,
    paused BOOLEAN NOT NULL DEFAULT false
);

-- Leader election for periodic jobs: one row per election, held by `owner` until `expires_at`.
CREATE TABLE stevedore_leaders (
    name       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

-- Durable schedule state: the last tick enqueued for each periodic job.
CREATE TABLE stevedore_periodic (
    name      TEXT PRIMARY KEY,
    last_tick TIMESTAMPTZ NOT NULL
);

-- Wake idle workers: one notification per queue per inserting statement, delivered at commit.
CREATE FUNCTION stevedore_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('stevedore_jobs', d.queue) FROM (SELECT DISTINCT queue FROM new_jobs) AS d;
    RETURN NULL;
END
$$;

CREATE TRIGGER stevedore_jobs_notify AFTER INSERT ON stevedore_jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION stevedore_jobs_notify();
