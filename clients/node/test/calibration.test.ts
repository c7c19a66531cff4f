/**
 * applyCalibration is numpy.interp: the fixture's grid (below the first knot, above the last,
 * on and between every knot) gives Python's values to the last bit; plus the end cases.
 */

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { applyCalibration } from '../src/aiScoring.js';
import { needsFixture, theFixture } from './fixture.js';

describe('applyCalibration', () => {
  test('piecewise linear between the knots, clipped outside them', () => {
    const knots = { x: [0, 1, 3], y: [0.5, 1.5, 4.5] };
    assert.equal(applyCalibration(knots, -10), 0.5);
    assert.equal(applyCalibration(knots, 0), 0.5);
    assert.equal(applyCalibration(knots, 0.5), 1.0);
    assert.equal(applyCalibration(knots, 1), 1.5);
    assert.equal(applyCalibration(knots, 2), 3.0);
    assert.equal(applyCalibration(knots, 3), 4.5);
    assert.equal(applyCalibration(knots, 1e9), 4.5);
    assert.ok(Number.isNaN(applyCalibration(knots, Number.NaN)));
    assert.equal(applyCalibration(knots, Number.POSITIVE_INFINITY), 4.5);
    assert.equal(applyCalibration(knots, Number.NEGATIVE_INFINITY), 0.5);
  });

  test('one knot is a constant; no knots or unequal lengths throw', () => {
    assert.equal(applyCalibration({ x: [2], y: [3] }, -1), 3);
    assert.equal(applyCalibration({ x: [2], y: [3] }, 7), 3);
    assert.throws(() => applyCalibration({ x: [], y: [] }, 1), RangeError);
    assert.throws(() => applyCalibration({ x: [0, 1], y: [0] }, 1), RangeError);
  });

  test("equals numpy.interp (jobs.calibration.apply) on the fixture's grid", needsFixture(), () => {
    const { knots, raw, ai_rating: expected } = theFixture().ref.calibration_grid;
    assert.ok(raw.length > knots.x.length * 2, 'the grid covers every knot and the spaces between');
    assert.ok(raw.some((r) => r < knots.x[0]!) && raw.some((r) => r > knots.x.at(-1)!));
    raw.forEach((r, i) => {
      assert.equal(applyCalibration(knots, r), expected[i], `raw ${r}`);
    });
  });
});
