-- The index of migration 2 tempted the planner into using it for the dequeue (a range scan on
-- scheduled_at followed by a sort of every due job) instead of the dequeue index: throughput
-- fell tenfold under a backlog. The next due time is now found through the dequeue index.
DROP INDEX IF EXISTS stevedore_jobs_due;
