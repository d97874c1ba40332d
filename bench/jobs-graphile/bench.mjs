// graphile-worker peer of the `jobs` benchmark. Prints one JSON object on stdout.
// Env: DATABASE_URL, MODE (burn | latency), SETTINGS (default | batched), JOBS, CONCURRENCY.
import { run, makeWorkerUtils } from "graphile-worker";
import { performance } from "node:perf_hooks";

const url = process.env.DATABASE_URL;
const mode = process.env.MODE ?? "burn";
const settings = process.env.SETTINGS ?? "default";
const jobs = Number(process.env.JOBS ?? 100000);
const concurrency = Number(process.env.CONCURRENCY ?? 16);

// "batched": graphile-worker's own recommendation for throughput (local queue of
// concurrency + 1, completion and failure batching).
const batched = settings === "batched"
  ? { localQueue: { size: concurrency + 1 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 }
  : {};
const preset = { worker: { connectionString: url, concurrentJobs: concurrency, maxPoolSize: concurrency + 2, ...batched } };

const utils = await makeWorkerUtils({ connectionString: url });
await utils.migrate();

const { Logger } = await import("graphile-worker");
const logger = new Logger(() => (level, message) => { if (level === "error") console.error(message); });

if (mode === "burn") {
  let t = performance.now();
  await utils.withPgClient((client) =>
    client.query(
      `select graphile_worker.add_jobs(array(
         select json_populate_record(null::graphile_worker.job_spec,
                json_build_object('identifier', 'noop', 'payload', json_build_object('n', i)))
         from generate_series(1, $1) i))`,
      [jobs],
    ),
  );
  const enqueueSeconds = (performance.now() - t) / 1000;
  let done = 0;
  let finish;
  const allDone = new Promise((resolve) => (finish = resolve));
  t = performance.now();
  const runner = await run({
    preset,
    concurrency,
    noHandleSignals: true,
    logger,
    taskList: { noop: async () => { done += 1; if (done === jobs) finish(); } },
  });
  await allDone;
  const workSeconds = (performance.now() - t) / 1000;
  await runner.stop();
  console.log(JSON.stringify({ jobs, enqueue_per_s: jobs / enqueueSeconds, jobs_per_s: jobs / workSeconds }));
} else {
  let started;
  const runner = await run({
    preset,
    concurrency,
    noHandleSignals: true,
    logger,
    taskList: { lat: async () => { started(performance.now()); } },
  });
  await new Promise((r) => setTimeout(r, 500));
  const lat = [];
  for (let i = 0; i < jobs; i++) {
    const startedAt = new Promise((resolve) => (started = resolve));
    const t0 = performance.now();
    await utils.addJob("lat", { i });
    lat.push((await startedAt) - t0);
  }
  await runner.stop();
  lat.sort((a, b) => a - b);
  const pick = (q) => lat[Math.min(lat.length - 1, Math.floor(q * lat.length))];
  console.log(JSON.stringify({ jobs, latency_p50_ms: pick(0.5), latency_p99_ms: pick(0.99), latency_max_ms: lat[lat.length - 1] }));
}
await utils.release();
