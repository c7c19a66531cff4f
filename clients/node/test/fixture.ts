/**
 * The fixture Python writes (tests/node_fixture.py `write_fixture`): the folder named by
 * AIR_NODE_FIXTURE. Unset: the fixture tests skip, saying so; unset while CI is set: they fail.
 */

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';

export interface FixtureImage {
  name: string;
  file: string;
  format: string;
  tensor: string;
  shape: [number, number, number];
  raw_score: number;
  ai_rating: number;
  gate: boolean;
  margin: number;
}

export interface FixtureReject {
  name: string;
  file: string;
  max_pixels: number;
  formats: string[];
  reason: string;
}

export interface Reference {
  fixture_format: number;
  model_version: string;
  model_dir: string;
  nan_model_dir: string;
  threshold: number;
  max_pixels: number;
  images: FixtureImage[];
  rejects: FixtureReject[];
  calibration_grid: { knots: { x: number[]; y: number[] }; raw: number[]; ai_rating: number[] };
  python: Record<string, string>;
}

export interface Fixture {
  root: string;
  ref: Reference;
  modelDir: string;
  nanModelDir: string;
  bytes(file: string): Buffer;
}

const ENV = 'AIR_NODE_FIXTURE';

/** The fixture, or the reason the fixture tests skip (throws under CI with no fixture). */
export function loadFixture(): Fixture | string {
  const dir = process.env[ENV];
  if (!dir) {
    if (process.env.CI) {
      throw new Error(
        `${ENV} is not set and CI is: the Node scorer's parity tests must run in CI ` +
          '(tests/test_node_scorer.py writes the fixture and sets it)',
      );
    }
    return `${ENV} is not set: run 'python scripts/node_fixture.py' for the command that sets it`;
  }
  const root = path.resolve(dir);
  const ref = JSON.parse(readFileSync(path.join(root, 'reference.json'), 'utf8')) as Reference;
  assert.equal(ref.fixture_format, 1, `${root}: fixture_format ${ref.fixture_format}, expected 1`);
  return {
    root,
    ref,
    modelDir: path.join(root, ref.model_dir),
    nanModelDir: path.join(root, ref.nan_model_dir),
    bytes: (file: string) => readFileSync(path.join(root, file)),
  };
}

let cached: Fixture | string | Error | undefined;

function fixture(): Fixture | string | Error {
  if (cached === undefined) {
    try {
      cached = loadFixture();
    } catch (err) {
      cached = err instanceof Error ? err : new Error(String(err));
    }
  }
  return cached;
}

/** node:test options: skip with the reason when there is no fixture (never under CI). */
export function needsFixture(): { skip: string | false } {
  const f = fixture();
  return { skip: typeof f === 'string' ? f : false };
}

/** The fixture; throws (the test fails) when it is missing under CI or unreadable. */
export function theFixture(): Fixture {
  const f = fixture();
  if (typeof f === 'string') throw new Error(f);
  if (f instanceof Error) throw f;
  return f;
}
