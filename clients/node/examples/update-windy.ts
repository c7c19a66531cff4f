/**
 * A minimal cron in the shape of the app's `app/api/cron/update-windy` (the seed's step 10):
 * read new snapshots from Postgres, fetch each image, score it with `aiScoring.ts`, write the
 * inference row and the webcam's AI fields, apply the capture gate.
 *
 * The database side is the one `airatings score` uses (jobs/grants.py, created by
 * `airatings migrate`): rows go into `snapshot_ai_inferences` with
 * `on conflict (snapshot_id, model_version) do nothing` (a re-run writes nothing new, and
 * racing the Python scorer is harmless), failures into `<ml>.score_failures` (permanent ones
 * are not retried), and the webcam fields through `<ml>.refresh_webcam_ai(webcam_ids,
 * version, snapshot_ids)`: its newest scored snapshot's aiRating, never over a newer model's
 * value. It runs
 * under a login holding `airatings_score` (least privilege) and needs nothing else.
 *
 *   DATABASE_URL=postgresql://scorer@db/app AI_MODEL_DIR=artifacts/models/<version> \
 *     node dist/examples/update-windy.js
 *
 * Environment: DATABASE_URL, AI_MODEL_DIR (the registered folder, or AI_MODEL_PATH: its
 * model.onnx), AI_CAPTURE_THRESHOLD (default: the card's), APP_SCHEMA (public),
 * AIRATINGS_SCHEMA (airatings), SINCE_HOURS (24; BACKFILL=1: every rated snapshot),
 * ALLOW_FILE_URLS=1 (the demo's file:// images), BATCH_SIZE (32). Prints a JSON summary.
 */

import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import pg from 'pg';

import { createScorer, ImageRejected, NonFiniteScore, type Scorer } from '../src/aiScoring.js';

export interface CronOptions {
  databaseUrl: string;
  modelDir: string;
  threshold?: number;
  appSchema?: string;
  mlSchema?: string;
  sinceHours?: number;
  backfill?: boolean;
  batchSize?: number;
  allowFileUrls?: boolean;
  fetchTimeoutMs?: number;
  maxBytes?: number;
  threads?: number;
}

export interface CronSummary {
  modelVersion: string;
  threshold: number;
  scored: number;
  skipped: number;
  failed: number;
  failedByReason: Record<string, number>;
  captured: number[];
  webcamsUpdated: number;
}

interface Snapshot {
  id: number;
  webcamId: number;
  url: string | null;
  cursor: string;
}

class FetchFailed extends Error {
  constructor(
    readonly reason: string,
    message: string,
    readonly transient: boolean,
  ) {
    super(message);
  }
}

/** The image's bytes: http(s) with a timeout and a size cap; file:// only when allowed. */
async function fetchImage(url: string, opts: Required<Pick<CronOptions, 'fetchTimeoutMs' | 'maxBytes' | 'allowFileUrls'>>): Promise<Uint8Array> {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new FetchFailed('invalid_url', `not a URL: ${url.slice(0, 200)}`, false);
  }
  if (parsed.protocol === 'file:') {
    if (!opts.allowFileUrls) throw new FetchFailed('blocked_url', 'file:// URLs are not allowed', false);
    try {
      const data = await readFile(fileURLToPath(parsed));
      if (data.byteLength > opts.maxBytes) throw new FetchFailed('too_large', `${data.byteLength} bytes`, false);
      return data;
    } catch (err) {
      if (err instanceof FetchFailed) throw err;
      throw new FetchFailed('file_not_found', (err as Error).message, false);
    }
  }
  if (parsed.protocol !== 'https:' && parsed.protocol !== 'http:') {
    throw new FetchFailed('blocked_url', `scheme ${parsed.protocol}`, false);
  }
  let res: Response;
  try {
    res = await fetch(parsed, { signal: AbortSignal.timeout(opts.fetchTimeoutMs), redirect: 'follow' });
  } catch (err) {
    const name = (err as Error).name;
    const reason = name === 'TimeoutError' ? 'timeout' : 'connection_error';
    throw new FetchFailed(reason, (err as Error).message, true);
  }
  if (!res.ok) {
    const transient = res.status === 429 || res.status >= 500;
    throw new FetchFailed(`http_${res.status}`, res.statusText, transient);
  }
  const declared = Number(res.headers.get('content-length') ?? '0');
  if (declared > opts.maxBytes) throw new FetchFailed('too_large', `Content-Length ${declared}`, false);
  let body: Uint8Array;
  try {
    body = new Uint8Array(await res.arrayBuffer());
  } catch (err) {
    // a timeout or a reset while the body streams: worth another try next run
    const name = (err as Error).name;
    throw new FetchFailed(name === 'TimeoutError' ? 'timeout' : 'connection_error', (err as Error).message, true);
  }
  if (body.byteLength > opts.maxBytes) throw new FetchFailed('too_large', `${body.byteLength} bytes`, false);
  return body;
}

export async function updateWindy(options: CronOptions): Promise<CronSummary> {
  const opts = {
    appSchema: 'public',
    mlSchema: 'airatings',
    sinceHours: 24,
    backfill: false,
    batchSize: 32,
    allowFileUrls: false,
    fetchTimeoutMs: 30_000,
    maxBytes: 25_000_000,
    ...options,
  };
  const scorerOptions: Parameters<typeof createScorer>[0] = { modelDir: opts.modelDir };
  if (opts.threshold !== undefined) scorerOptions.threshold = opts.threshold;
  if (opts.threads !== undefined) scorerOptions.threads = opts.threads;
  const scorer: Scorer = await createScorer(scorerOptions);
  const client = new pg.Client({ connectionString: opts.databaseUrl });
  await client.connect();
  const a = client.escapeIdentifier(opts.appSchema);
  const m = client.escapeIdentifier(opts.mlSchema);
  const version = scorer.modelVersion;
  const summary: CronSummary = {
    modelVersion: version,
    threshold: scorer.threshold,
    scored: 0,
    skipped: 0,
    failed: 0,
    failedByReason: {},
    captured: [],
    webcamsUpdated: 0,
  };
  // the window: every rated snapshot (backfill), or those captured in the last sinceHours ($2)
  const rated = opts.backfill
    ? `exists (select 1 from ${a}.webcam_snapshot_ratings r where r.snapshot_id = s.id)`
    : 'true';
  const window = `${rated} and ($2::float8 is null or s.captured_at >= now() - make_interval(secs => $2::float8 * 3600))`;
  try {
    // the keyset cursor keeps captured_at as PostgreSQL's text: a JS Date would drop its
    // microseconds and skip rows captured within the same millisecond
    let after: [string, number] | null = null;
    for (;;) {
      // newest first, keyset-paged; what this version scored already or failed for good is skipped
      const params: unknown[] = [version, opts.backfill ? null : opts.sinceHours, opts.batchSize];
      let keyset = '';
      if (after) {
        params.push(after[0], after[1]);
        keyset = 'and (s.captured_at, s.id) < ($4::timestamptz, $5)';
      }
      const page = await client.query<{ id: string; webcam_id: string; firebase_url: string | null; cursor: string }>(
        `select s.id, s.webcam_id, s.firebase_url, s.captured_at::text as cursor
           from ${a}.webcam_snapshots s
          where ${window}
            and not exists (select 1 from ${a}.snapshot_ai_inferences i
                             where i.snapshot_id = s.id and i.model_version = $1)
            and not exists (select 1 from ${m}.score_failures f
                             where f.snapshot_id = s.id and f.model_version = $1 and not f.transient)
            ${keyset}
          order by s.captured_at desc, s.id desc
          limit $3`,
        params,
      );
      if (page.rows.length === 0) break;
      const snaps: Snapshot[] = page.rows.map((r) => ({
        id: Number(r.id),
        webcamId: Number(r.webcam_id),
        url: r.firebase_url,
        cursor: r.cursor,
      }));
      const last = snaps[snaps.length - 1]!;
      after = [last.cursor, last.id];

      const scored: { snap: Snapshot; raw: number; ai: number; gate: boolean }[] = [];
      const failed: { snap: Snapshot; reason: string; detail: string; transient: boolean }[] = [];
      for (const snap of snaps) {
        try {
          if (!snap.url || snap.url.trim() === '') {
            throw new FetchFailed('missing_url', 'the snapshot has no image URL', false);
          }
          const bytes = await fetchImage(snap.url, opts);
          const result = await scorer.score(bytes);
          scored.push({ snap, raw: result.rawScore, ai: result.aiRating, gate: scorer.gatePassed(result.aiRating) });
        } catch (err) {
          if (err instanceof FetchFailed) {
            failed.push({ snap, reason: err.reason, detail: err.message.slice(0, 500), transient: err.transient });
          } else if (err instanceof ImageRejected) {
            failed.push({ snap, reason: err.reason, detail: err.message.slice(0, 500), transient: false });
          } else if (err instanceof NonFiniteScore) {
            failed.push({ snap, reason: 'non_finite_output', detail: err.message.slice(0, 500), transient: false });
          } else {
            throw err;
          }
        }
      }

      // one transaction per batch: rows, failures, the webcams' fields
      await client.query('begin');
      try {
        let inserted = 0;
        if (scored.length) {
          const res = await client.query(
            `insert into ${a}.snapshot_ai_inferences
               (snapshot_id, webcam_id, model_version, raw_score, ai_rating, gate_passed)
             select * from unnest($1::bigint[], $2::bigint[], $3::text[], $4::float8[], $5::float8[], $6::bool[])
             on conflict (snapshot_id, model_version) do nothing returning snapshot_id`,
            [
              scored.map((s) => s.snap.id),
              scored.map((s) => s.snap.webcamId),
              scored.map(() => version),
              scored.map((s) => s.raw),
              scored.map((s) => s.ai),
              scored.map((s) => s.gate),
            ],
          );
          inserted = res.rowCount ?? 0;
          await client.query(
            `delete from ${m}.score_failures where model_version = $1 and snapshot_id = any($2::bigint[])`,
            [version, scored.map((s) => s.snap.id)],
          );
        }
        if (failed.length) {
          await client.query(
            `insert into ${m}.score_failures (snapshot_id, model_version, reason, detail, transient)
             select * from unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bool[])
             on conflict (snapshot_id, model_version) do update set
               reason = excluded.reason, detail = excluded.detail, transient = excluded.transient,
               attempts = score_failures.attempts + 1, last_failed_at = now()`,
            [
              failed.map((f) => f.snap.id),
              failed.map(() => version),
              failed.map((f) => f.reason),
              failed.map((f) => f.detail),
              failed.map((f) => f.transient),
            ],
          );
        }
        const webcams = [...new Set(scored.map((s) => s.snap.webcamId))].sort((x, y) => x - y);
        if (webcams.length) {
          const res = await client.query<{ n: number }>(
            // with the batch's snapshots: folds them into each webcam's newest so far (the
            // cost of the batch, not of the webcams' history)
            `select ${m}.refresh_webcam_ai($1::bigint[], $2, $3::bigint[]) as n`,
            [webcams, version, scored.map((s) => s.snap.id)],
          );
          summary.webcamsUpdated += Number(res.rows[0]?.n ?? 0);
        }
        await client.query('commit');
        summary.scored += inserted;
        summary.skipped += scored.length - inserted;
      } catch (err) {
        await client.query('rollback');
        throw err;
      }
      // the capture gate: the app keeps (captures) the snapshots that pass it
      for (const s of scored) if (s.gate) summary.captured.push(s.snap.id);
      for (const f of failed) {
        summary.failed += 1;
        summary.failedByReason[f.reason] = (summary.failedByReason[f.reason] ?? 0) + 1;
      }
    }
  } finally {
    await client.end();
    await scorer.close();
  }
  return summary;
}

function envNumber(name: string): number | undefined {
  const raw = process.env[name];
  if (raw === undefined || raw.trim() === '') return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new Error(`${name}=${JSON.stringify(raw)} is not a number`);
  return value;
}

async function main(): Promise<void> {
  const databaseUrl = process.env.DATABASE_URL;
  const modelDir = process.env.AI_MODEL_DIR ?? (process.env.AI_MODEL_PATH ? path.dirname(process.env.AI_MODEL_PATH) : undefined);
  if (!databaseUrl || !modelDir) {
    throw new Error('set DATABASE_URL and AI_MODEL_DIR (the registered model folder) or AI_MODEL_PATH');
  }
  const options: CronOptions = {
    databaseUrl,
    modelDir,
    backfill: process.env.BACKFILL === '1',
    allowFileUrls: process.env.ALLOW_FILE_URLS === '1',
  };
  const threshold = envNumber('AI_CAPTURE_THRESHOLD');
  if (threshold !== undefined) options.threshold = threshold;
  const since = envNumber('SINCE_HOURS');
  if (since !== undefined) options.sinceHours = since;
  const batch = envNumber('BATCH_SIZE');
  if (batch !== undefined) options.batchSize = batch;
  if (process.env.APP_SCHEMA) options.appSchema = process.env.APP_SCHEMA;
  if (process.env.AIRATINGS_SCHEMA) options.mlSchema = process.env.AIRATINGS_SCHEMA;
  const summary = await updateWindy(options);
  process.stdout.write(`${JSON.stringify(summary)}\n`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err: unknown) => {
    process.stderr.write(`error: ${(err as Error).message}\n`);
    process.exitCode = 2;
  });
}
