/**
 * The Node scorer against Python on the same model and images (the fixture of
 * tests/node_fixture.py):
 *
 * 1. the tensor Python decoded, fed to Node's onnxruntime: raw_score within 1e-5 of Python's;
 * 2. the image files through each side's own decoding (sharp here, Pillow there): the decoded
 *    size equal, |delta aiRating| <= 0.05 on every image, and the same capture-gate decision on
 *    every image whose Python aiRating is farther from the threshold than the largest delta
 *    measured (the images inside that band are reported, not judged).
 */

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { createScorer, decodeImage, type Scorer } from '../src/aiScoring.js';
import { needsFixture, theFixture } from './fixture.js';

export const TOLERANCE_RAW = 1e-5;
export const TOLERANCE_AI_RATING = 0.05;

describe('Node scorer vs Python', needsFixture(), () => {
  let scorer: Scorer;

  before(async () => {
    scorer = await createScorer({ modelDir: theFixture().modelDir });
  });
  after(async () => {
    await scorer?.close();
  });

  test('the card is read: version, threshold, pixel cap', () => {
    const { ref } = theFixture();
    assert.equal(scorer.modelVersion, ref.model_version);
    assert.equal(scorer.threshold, ref.threshold);
    assert.equal(scorer.maxPixels, ref.max_pixels);
  });

  test(`same tensor: raw_score within ${TOLERANCE_RAW} of Python's onnxruntime`, async (t) => {
    const fx = theFixture();
    let worst = 0;
    for (const img of fx.ref.images) {
      const [h, w, c] = img.shape;
      const pixels = new Uint8Array(fx.bytes(img.tensor));
      assert.equal(pixels.length, h * w * c, `${img.name}: tensor size`);
      const got = await scorer.scorePixels(pixels, h, w);
      const delta = Math.abs(got.rawScore - img.raw_score);
      worst = Math.max(worst, delta);
      assert.ok(
        delta <= TOLERANCE_RAW,
        `${img.name}: raw ${got.rawScore} in Node, ${img.raw_score} in Python (|delta| ${delta})`,
      );
      assert.equal(got.modelVersion, fx.ref.model_version);
    }
    t.diagnostic(`same tensor: max |delta raw_score| ${worst.toExponential(2)} on ${fx.ref.images.length} images`);
    console.log(`air-node: tensor_max_abs_delta_raw=${worst} images=${fx.ref.images.length}`);
  });

  test(`own decoding: |delta aiRating| <= ${TOLERANCE_AI_RATING}, gate decisions identical outside the band`, async (t) => {
    const fx = theFixture();
    const rows: { name: string; delta: number; node: number; python: number; pixelMax: number; pixelMean: number }[] = [];
    for (const img of fx.ref.images) {
      const bytes = fx.bytes(img.file);
      const decoded = await decodeImage(bytes, { maxPixels: fx.ref.max_pixels });
      assert.deepEqual(
        [decoded.height, decoded.width, 3],
        img.shape,
        `${img.name}: sharp decoded ${decoded.height}x${decoded.width}, Pillow ${img.shape.join('x')}`,
      );
      const python = fx.bytes(img.tensor);
      let pixelMax = 0;
      let pixelSum = 0;
      for (let i = 0; i < python.length; i++) {
        const d = Math.abs(decoded.data[i]! - python[i]!);
        pixelSum += d;
        if (d > pixelMax) pixelMax = d;
      }
      const got = await scorer.score(bytes);
      rows.push({
        name: img.name,
        delta: Math.abs(got.aiRating - img.ai_rating),
        node: got.aiRating,
        python: img.ai_rating,
        pixelMax,
        pixelMean: pixelSum / python.length,
      });
    }
    const maxDelta = Math.max(...rows.map((r) => r.delta));
    for (const r of rows) {
      t.diagnostic(
        `${r.name}: aiRating node ${r.node.toFixed(4)} python ${r.python.toFixed(4)} ` +
          `|delta| ${r.delta.toExponential(2)}; pixels max |delta| ${r.pixelMax}, mean ${r.pixelMean.toFixed(4)}`,
      );
    }
    const inBand: string[] = [];
    for (const r of rows) {
      assert.ok(
        r.delta <= TOLERANCE_AI_RATING,
        `${r.name}: aiRating ${r.node} in Node, ${r.python} in Python (|delta| ${r.delta})`,
      );
      const margin = Math.abs(r.python - fx.ref.threshold);
      if (margin <= maxDelta) {
        inBand.push(`${r.name} (python ${r.python}, node ${r.node}, margin ${margin})`);
        continue;
      }
      assert.equal(
        scorer.gatePassed(r.node),
        r.python >= fx.ref.threshold,
        `${r.name}: gate differs (node aiRating ${r.node}, python ${r.python}, threshold ${fx.ref.threshold})`,
      );
    }
    const summary =
      `decode_max_abs_delta_ai_rating=${maxDelta} images=${rows.length} ` +
      `pixel_max_abs_delta=${Math.max(...rows.map((r) => r.pixelMax))} ` +
      `in_band=${inBand.length}${inBand.length ? ': ' + inBand.join('; ') : ''}`;
    t.diagnostic(summary);
    console.log(`air-node: ${summary}`);
  });
});
