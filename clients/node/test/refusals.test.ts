/**
 * What the scorer refuses: a model whose bytes are not the card's, a card whose `file` leaves
 * the folder, bad image bytes (with Python's reason for each), a NaN model output.
 */

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import {
  createScorer,
  decodeImage,
  ImageRejected,
  ModelRejected,
  NonFiniteScore,
  type ImageFormat,
  type Scorer,
} from '../src/aiScoring.js';
import { needsFixture, theFixture } from './fixture.js';

function copyModel(src: string, dst: string): void {
  mkdirSync(dst, { recursive: true });
  for (const name of ['model.onnx', 'model_card.json']) copyFileSync(path.join(src, name), path.join(dst, name));
}

describe('refusals', needsFixture(), () => {
  let tmp: string;
  let scorer: Scorer;

  before(async () => {
    tmp = mkdtempSync(path.join(tmpdir(), 'air-node-'));
    scorer = await createScorer({ modelDir: theFixture().modelDir });
  });
  after(async () => {
    await scorer?.close();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  test('a model.onnx with one byte flipped is refused, naming the file and both hashes', async () => {
    const dir = path.join(tmp, 'tampered');
    copyModel(theFixture().modelDir, dir);
    const file = path.join(dir, 'model.onnx');
    const bytes = readFileSync(file);
    const expected = createHash('sha256').update(bytes).digest('hex');
    const at = Math.floor(bytes.length / 2);
    bytes[at] = bytes[at]! ^ 0x01;
    writeFileSync(file, bytes);
    const actual = createHash('sha256').update(bytes).digest('hex');
    await assert.rejects(createScorer({ modelDir: dir }), (err: unknown) => {
      assert.ok(err instanceof ModelRejected, String(err));
      assert.ok(err.message.includes(file), err.message);
      assert.ok(err.message.includes(expected) && err.message.includes(actual), err.message);
      return true;
    });
    // the untouched copy still loads
    const good = path.join(tmp, 'good');
    copyModel(theFixture().modelDir, good);
    await (await createScorer({ modelDir: good })).close();
  });

  for (const file of ['../model.onnx', '/etc/passwd', 'sub/model.onnx', '..', '', 42]) {
    test(`a card whose file is ${JSON.stringify(file)} is refused`, async () => {
      const dir = path.join(tmp, `card-${Buffer.from(String(file)).toString('hex')}`);
      copyModel(theFixture().modelDir, dir);
      const cardPath = path.join(dir, 'model_card.json');
      const card = JSON.parse(readFileSync(cardPath, 'utf8')) as Record<string, unknown>;
      card.file = file;
      writeFileSync(cardPath, JSON.stringify(card));
      await assert.rejects(createScorer({ modelDir: dir }), (err: unknown) => {
        assert.ok(err instanceof ModelRejected, String(err));
        assert.match(err.message, /plain file name/);
        return true;
      });
    });
  }

  test('a card of another card_format is refused', async () => {
    const dir = path.join(tmp, 'format2');
    copyModel(theFixture().modelDir, dir);
    const cardPath = path.join(dir, 'model_card.json');
    const card = JSON.parse(readFileSync(cardPath, 'utf8')) as Record<string, unknown>;
    card.card_format = 2;
    writeFileSync(cardPath, JSON.stringify(card));
    await assert.rejects(createScorer({ modelDir: dir }), /card_format 2/);
  });

  test("bad bytes are rejected with Python's reason", async (t) => {
    const fx = theFixture();
    assert.ok(fx.ref.rejects.length >= 9, 'the fixture has its bad files');
    for (const bad of fx.ref.rejects) {
      const bytes = fx.bytes(bad.file);
      const options = { maxPixels: bad.max_pixels, formats: bad.formats as ImageFormat[] };
      await assert.rejects(decodeImage(bytes, options), (err: unknown) => {
        assert.ok(err instanceof ImageRejected, `${bad.name}: ${String(err)}`);
        assert.equal(err.reason, bad.reason, `${bad.name}: ${err.message}`);
        assert.ok(err.message.startsWith(bad.reason), err.message);
        t.diagnostic(`${bad.name}: ${err.message}`);
        return true;
      });
    }
  });

  for (const name of ['truncated.jpg', 'random.bin', 'text.txt']) {
    test(`score() rejects ${name}`, async () => {
      const bad = theFixture().ref.rejects.find((r) => r.name === name);
      assert.ok(bad, `${name} is in the fixture`);
      await assert.rejects(scorer.score(theFixture().bytes(bad.file)), (err: unknown) => {
        assert.ok(err instanceof ImageRejected, String(err));
        assert.equal(err.reason, bad.reason);
        return true;
      });
    });
  }

  test('an image over the pixel cap is refused before it is decoded', async () => {
    const fx = theFixture();
    const img = fx.ref.images[0]!;
    const [h, w] = img.shape;
    const capped = await createScorer({ modelDir: fx.modelDir, maxPixels: h * w - 1 });
    try {
      await assert.rejects(capped.score(fx.bytes(img.file)), (err: unknown) => {
        assert.ok(err instanceof ImageRejected && err.reason === 'decompression_bomb', String(err));
        return true;
      });
      // exactly at the cap is allowed (Python: w * h > cap is refused)
      const atCap = await createScorer({ modelDir: fx.modelDir, maxPixels: h * w });
      try {
        assert.ok(Number.isFinite((await atCap.score(fx.bytes(img.file))).aiRating));
      } finally {
        await atCap.close();
      }
    } finally {
      await capped.close();
    }
  });

  test('a NaN model output is rejected, not rated', async () => {
    const fx = theFixture();
    const nan = await createScorer({ modelDir: fx.nanModelDir });
    try {
      await assert.rejects(nan.score(fx.bytes(fx.ref.images[0]!.file)), (err: unknown) => {
        assert.ok(err instanceof NonFiniteScore, String(err));
        assert.equal(err.reason, 'non_finite_score');
        assert.ok(Number.isNaN(err.rawScore));
        return true;
      });
    } finally {
      await nan.close();
    }
  });

  test('the threshold option overrides the card', async () => {
    const fx = theFixture();
    const s = await createScorer({ modelDir: fx.modelDir, threshold: 2.5 });
    try {
      assert.equal(s.threshold, 2.5);
      assert.equal(s.gatePassed(2.5), true);
      assert.equal(s.gatePassed(2.4999), false);
    } finally {
      await s.close();
    }
    assert.equal(scorer.gatePassed(fx.ref.threshold), true);
    assert.equal(scorer.gatePassed(fx.ref.threshold - 1e-9), false);
    await assert.rejects(createScorer({ modelDir: fx.modelDir, threshold: Number.NaN }), ModelRejected);
  });

  test('a closed scorer refuses to score', async () => {
    const fx = theFixture();
    const s = await createScorer({ modelDir: fx.modelDir });
    await s.close();
    await assert.rejects(s.score(fx.bytes(fx.ref.images[0]!.file)), /closed/);
  });
});
