-- When a queue has no due job, workers look up when the next one is due: this index answers
-- that without scanning every scheduled job of the queue.
CREATE INDEX stevedore_jobs_due ON stevedore_jobs (queue, scheduled_at) WHERE state = 'available';
