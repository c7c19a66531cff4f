/**
 * Per-image latency of the Node scorer (bench/bench_node_scorer.py runs this beside its Python
 * side and prints the ratios): after a warm-up, `rounds` passes over the images, each timed
 * one image at a time, for score() (decode + inference + calibration), decodeImage() alone
 * and scorePixels() (inference + calibration) alone. Prints one JSON line: ms per image.
 *
 *   node dist/bench/latency.js --model-dir DIR [--threads N] [--rounds R] IMAGE...
 */

import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { createScorer, decodeImage } from '../src/aiScoring.js';

const { values, positionals } = parseArgs({
  options: {
    'model-dir': { type: 'string' },
    threads: { type: 'string' },
    rounds: { type: 'string', default: '3' },
  },
  allowPositionals: true,
});
const modelDir = values['model-dir'];
if (!modelDir || positionals.length === 0) {
  console.error('usage: latency.js --model-dir DIR [--threads N] [--rounds R] IMAGE...');
  process.exit(2);
}
const rounds = Number(values.rounds);
const images = positionals.map((p) => readFileSync(p));
const scorer = await createScorer(
  values.threads ? { modelDir, threads: Number(values.threads) } : { modelDir },
);
const decoded = await Promise.all(images.map((b) => decodeImage(b, { maxPixels: scorer.maxPixels })));

async function timed(work: (i: number) => Promise<unknown>): Promise<number> {
  let total = 0;
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < images.length; i++) {
      const t = performance.now();
      await work(i);
      total += performance.now() - t;
    }
  }
  return total / (rounds * images.length);
}

const score = (i: number) => scorer.score(images[i]!);
const decode = (i: number) => decodeImage(images[i]!, { maxPixels: scorer.maxPixels });
const infer = (i: number) => scorer.scorePixels(decoded[i]!.data, decoded[i]!.height, decoded[i]!.width);
for (const work of [score, decode, infer]) for (let i = 0; i < images.length; i++) await work(i); // warm-up
const out = { score_ms: await timed(score), decode_ms: await timed(decode), infer_ms: await timed(infer) };
await scorer.close();
console.log(JSON.stringify(out));
