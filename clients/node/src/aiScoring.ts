/**
 * The app's scorer for an ai-ratings model: one registered model folder
 * (`artifacts/models/<version>/`: `model.onnx` + `model_card.json`) in, per image
 * `{ rawScore, aiRating, modelVersion }` out, and the capture gate on aiRating.
 *
 * It mirrors the Python side's contract (docs/contracts.md, "ONNX graph, calibration and model
 * card"):
 *
 * - the card's `sha256` is checked against the bytes of `model.onnx`, and the session is built
 *   from exactly those bytes (a file swapped after the check is never loaded);
 * - decoding is `jobs.images.load_image`'s: the format sniffed from the magic bytes first
 *   (JPEG, PNG, WEBP, GIF only), the pixel cap on the header's size before any pixel is
 *   decoded, a truncated file is an error (never grey-filled), the first frame of an
 *   animation, EXIF orientation applied, the embedded ICC profile ignored (Pillow ignores it),
 *   transparency composited on white, any colour mode to 3-channel uint8 RGB;
 * - the full frame goes to the graph as uint8 NHWC `[1, H, W, 3]`: the graph resizes, never the
 *   client;
 * - `aiRating` = the card's calibration knots applied to `rawScore` exactly as `numpy.interp`
 *   does (piecewise linear, clipped to the end values), and the gate is
 *   `aiRating >= threshold` (the card's `threshold_policy.threshold`, or the `threshold`
 *   option: the app's AI_CAPTURE_THRESHOLD).
 *
 * Bad bytes reject with {@link ImageRejected}, whose `reason` is one of Python's
 * `jobs.images.REASONS`; a NaN or infinite model output rejects with {@link NonFiniteScore};
 * a model folder that does not verify rejects `createScorer` with {@link ModelRejected}.
 *
 * One self-contained file (imports: node built-ins, onnxruntime-node, sharp), so the app can
 * copy it to `app/api/cron/update-windy/lib/aiScoring.ts`.
 */

import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { endianness } from 'node:os';
import path from 'node:path';

import * as ort from 'onnxruntime-node';
import sharp, { type Metadata, type OutputInfo } from 'sharp';

/** The formats `jobs.images.ACCEPTED_FORMATS` accepts, by their magic bytes. */
export const ACCEPTED_FORMATS = ['JPEG', 'PNG', 'WEBP', 'GIF'] as const;
export type ImageFormat = (typeof ACCEPTED_FORMATS)[number];

/** `cache.max_pixels`'s default in jobs/config.py: the pixel cap when the card names none. */
export const DEFAULT_MAX_PIXELS = 40_000_000;
/** Pillow's own `Image.MAX_IMAGE_PIXELS`: `jobs.images.pixel_cap` never goes above it. */
export const PILLOW_MAX_IMAGE_PIXELS = 89_478_485;
/** The card format this scorer reads (`jobs.register.CARD_FORMAT`). */
export const CARD_FORMAT = 1;
/** Transparent pixels are composited on this (`jobs.images.BACKGROUND_RGB`). */
export const BACKGROUND_RGB = { r: 255, g: 255, b: 255 } as const;

/** Why an image was refused: the same words as Python's `jobs.images.REASONS`. */
export type ImageRejectReason =
  | 'not_an_image'
  | 'unsupported_format'
  | 'truncated'
  | 'decompression_bomb'
  | 'corrupt';

/** The bytes are not an acceptable picture; `reason` says why (message: `reason: detail`). */
export class ImageRejected extends Error {
  readonly reason: ImageRejectReason;
  readonly detail: string;

  constructor(reason: ImageRejectReason, detail = '') {
    super(detail ? `${reason}: ${detail}` : reason);
    this.name = 'ImageRejected';
    this.reason = reason;
    this.detail = detail;
  }
}

/** The model gave NaN or an infinity for this image: no aiRating, the image fails. */
export class NonFiniteScore extends Error {
  readonly reason = 'non_finite_score';
  readonly rawScore: number;

  constructor(rawScore: number, modelVersion: string) {
    super(`non_finite_score: model ${modelVersion} returned raw_score ${rawScore}`);
    this.name = 'NonFiniteScore';
    this.rawScore = rawScore;
  }
}

/** The model folder does not verify (card, file name, sha256, interface); nothing is loaded. */
export class ModelRejected extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ModelRejected';
  }
}

/** Calibration knots as the card stores them (`jobs.calibration`): x strictly increasing. */
export interface CalibrationKnots {
  x: readonly number[];
  y: readonly number[];
  method?: string;
}

export interface ScoreResult {
  rawScore: number;
  aiRating: number;
  modelVersion: string;
}

export interface DecodedImage {
  /** uint8 RGB, row-major HWC, `height * width * 3` bytes */
  data: Uint8Array;
  width: number;
  height: number;
  format: ImageFormat;
}

export interface ScorerOptions {
  /** The registered model's folder: `model_card.json` and the file its `file` names. */
  modelDir: string;
  /** onnxruntime intra-op threads (default: onnxruntime's, the machine's cores). */
  threads?: number | undefined;
  /** Capture-gate threshold overriding the card's (the app's AI_CAPTURE_THRESHOLD). */
  threshold?: number | undefined;
  /** Pixel cap overriding the card's `preprocessing.max_pixels` / the default 40,000,000. */
  maxPixels?: number | undefined;
  /** Accepted formats (default: JPEG, PNG, WEBP, GIF; the card's `preprocessing.formats`). */
  formats?: readonly ImageFormat[] | undefined;
}

export interface Scorer {
  readonly modelVersion: string;
  readonly threshold: number;
  readonly maxPixels: number;
  /** Decode, validate and score one image's bytes. */
  score(imageBytes: Buffer | Uint8Array): Promise<ScoreResult>;
  /** Score an already decoded uint8 RGB HWC picture (what `score` does after decoding). */
  scorePixels(rgb: Uint8Array, height: number, width: number): Promise<ScoreResult>;
  /** The capture gate: `aiRating >= threshold`. */
  gatePassed(aiRating: number): boolean;
  close(): Promise<void>;
}

// ---- calibration ------------------------------------------------------------------------------

/**
 * aiRating of one raw score: `numpy.interp(raw, x, y)`, operation for operation (the same
 * interval search, slope and formula, so the result is the same double): piecewise linear
 * between the knots, the first/last y outside them. NaN in, NaN out.
 */
export function applyCalibration(knots: CalibrationKnots, raw: number): number {
  const { x, y } = knots;
  const n = x.length;
  if (n === 0 || n !== y.length) {
    throw new RangeError('calibration knots need as many x as y, at least one');
  }
  if (Number.isNaN(raw)) return Number.NaN;
  if (n === 1) return y[0]!;
  if (raw < x[0]!) return y[0]!;
  if (raw > x[n - 1]!) return y[n - 1]!;
  if (raw === x[n - 1]) return y[n - 1]!;
  // the j with x[j] <= raw < x[j + 1]
  let lo = 0;
  let hi = n - 1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (raw >= x[mid]!) lo = mid;
    else hi = mid;
  }
  const j = lo;
  const xj = x[j]!;
  const yj = y[j]!;
  if (raw === xj) return yj;
  const slope = (y[j + 1]! - yj) / (x[j + 1]! - xj);
  let out = slope * (raw - xj) + yj;
  if (Number.isNaN(out)) {
    out = slope * (raw - x[j + 1]!) + y[j + 1]!;
    if (Number.isNaN(out) && yj === y[j + 1]) out = yj;
  }
  return out;
}

function checkedKnots(raw: unknown, where: string): CalibrationKnots {
  const k = raw as { x?: unknown; y?: unknown; method?: unknown } | null;
  const numbers = (v: unknown): v is number[] =>
    Array.isArray(v) && v.every((e) => typeof e === 'number' && Number.isFinite(e));
  if (!k || !numbers(k.x) || !numbers(k.y) || k.x.length === 0 || k.x.length !== k.y.length) {
    throw new ModelRejected(`${where}: calibration needs finite x and y of the same length, at least one`);
  }
  for (let i = 1; i < k.x.length; i++) {
    if (!(k.x[i]! > k.x[i - 1]!)) {
      throw new ModelRejected(`${where}: calibration x is not strictly increasing at knot ${i}`);
    }
  }
  const out: CalibrationKnots = { x: k.x, y: k.y };
  if (typeof k.method === 'string') out.method = k.method;
  return out;
}

// ---- decoding ---------------------------------------------------------------------------------

/** The format from the first bytes (`jobs.images.sniff_format`), or null if none we know. */
export function sniffFormat(head: Uint8Array): ImageFormat | null {
  const ascii = (from: number, to: number) => Buffer.from(head.subarray(from, to)).toString('latin1');
  if (head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) return 'JPEG';
  if (ascii(0, 8) === '\x89PNG\r\n\x1a\n') return 'PNG';
  if (ascii(0, 6) === 'GIF87a' || ascii(0, 6) === 'GIF89a') return 'GIF';
  if (ascii(0, 4) === 'RIFF' && ascii(8, 12) === 'WEBP') return 'WEBP';
  return null;
}

const SHARP_FORMAT: Record<ImageFormat, string> = {
  JPEG: 'jpeg',
  PNG: 'png',
  WEBP: 'webp',
  GIF: 'gif',
};

/** The pixel limit `decodeImage` applies: ours, never above Pillow's (`jobs.images.pixel_cap`). */
export function pixelCap(maxPixels: number): number {
  return Math.min(maxPixels, PILLOW_MAX_IMAGE_PIXELS);
}

function pngHasEnd(bytes: Uint8Array): boolean {
  // the IEND chunk: length 0, type, CRC, at the very end (trailing bytes after it are allowed)
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).includes('IEND', 8, 'latin1');
}

/**
 * A libvips error in Python's words. Pillow says "truncated" when the data runs out; it cannot
 * identify (not_an_image) a JPEG or PNG whose header does not parse, nor a WEBP whose first
 * chunk is not VP8/VP8L/VP8X; anything else that fails is corrupt.
 */
function reasonOf(err: unknown, fmt: ImageFormat, bytes: Uint8Array): ImageRejected {
  const text = err instanceof Error ? err.message : String(err);
  const lower = text.toLowerCase();
  const detail = text.split('\n')[0]!.trim();
  if (/premature end|unexpected end|truncated|end of file|not enough data/.test(lower)) {
    return new ImageRejected('truncated', detail);
  }
  if (fmt === 'PNG' && !pngHasEnd(bytes)) return new ImageRejected('truncated', detail || 'no IEND chunk');
  if (lower.includes('pixel limit')) return new ImageRejected('decompression_bomb', detail);
  if (lower.includes('corrupt header')) {
    if (fmt === 'JPEG' || fmt === 'PNG') return new ImageRejected('not_an_image', detail);
    if (fmt === 'WEBP') {
      const chunk = Buffer.from(bytes.subarray(12, 16)).toString('latin1');
      if (!['VP8 ', 'VP8L', 'VP8X'].includes(chunk)) return new ImageRejected('not_an_image', detail);
    }
  }
  return new ImageRejected('corrupt', detail);
}

/**
 * Decode, validate and normalise one untrusted image (`jobs.images.load_image`) -> uint8 RGB
 * HWC. Rejects with {@link ImageRejected}.
 */
export async function decodeImage(
  imageBytes: Buffer | Uint8Array,
  options: { maxPixels?: number | undefined; formats?: readonly ImageFormat[] | undefined } = {},
): Promise<DecodedImage> {
  const formats = options.formats ?? ACCEPTED_FORMATS;
  const cap = pixelCap(options.maxPixels ?? DEFAULT_MAX_PIXELS);
  const bytes = imageBytes instanceof Uint8Array ? imageBytes : new Uint8Array(imageBytes);
  const fmt = sniffFormat(bytes.subarray(0, 16));
  if (fmt === null) throw new ImageRejected('not_an_image', 'no known image signature');
  if (!formats.includes(fmt)) throw new ImageRejected('unsupported_format', `${fmt} is not accepted`);
  const input = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  // failOn 'error': truncation and real decode errors fail, as in Pillow; libjpeg's "corrupt
  // data" warnings do not (Pillow decodes those images too). pages 1: the first frame.
  const common = { failOn: 'error', ignoreIcc: true, pages: 1, page: 0 } as const;

  let meta: Metadata;
  try {
    meta = await sharp(input, { ...common, limitInputPixels: false }).metadata();
  } catch (err) {
    throw reasonOf(err, fmt, bytes);
  }
  if (meta.format !== SHARP_FORMAT[fmt]) {
    throw new ImageRejected('corrupt', `${fmt} signature but decoded as ${String(meta.format)}`);
  }
  const width = meta.width;
  const height = meta.pageHeight ?? meta.height;
  if (!(width >= 1 && height >= 1)) throw new ImageRejected('corrupt', `size ${width}x${height}`);
  if (width * height > cap) {
    throw new ImageRejected('decompression_bomb', `${width}x${height} is over ${cap} pixels`);
  }

  // Pillow's own arithmetic where it is not a colour transform, so the pictures are the same
  // bytes: CMYK (Pillow's cmyk2rgb, no ICC transform), 16-bit greyscale (to_rgb scales I;16
  // with rounding; libvips shifts) and transparency (to_rgb pastes on white with Pillow's
  // integer blend; libvips' flatten rounds otherwise, off by 1 on blended pixels). The rest:
  // libvips' conversion to 8-bit sRGB, which gives Pillow's bytes.
  const mode: 'cmyk' | 'grey16' | 'alpha' | 'rgb' =
    meta.space === 'cmyk'
      ? 'cmyk'
      : meta.space === 'grey16' && !meta.hasAlpha
        ? 'grey16'
        : meta.hasAlpha
          ? 'alpha'
          : 'rgb';
  const channels = { cmyk: 4, grey16: 1, alpha: 4, rgb: 3 }[mode];
  let out: { data: Buffer; info: OutputInfo };
  try {
    const image = sharp(input, { ...common, limitInputPixels: cap, autoOrient: true });
    const raw =
      mode === 'cmyk'
        ? image.pipelineColourspace('cmyk').toColourspace('cmyk').raw({ depth: 'uchar' })
        : mode === 'grey16'
          ? image.toColourspace('grey16').raw({ depth: 'ushort' })
          : mode === 'alpha'
            ? image.toColourspace('srgb').ensureAlpha().raw({ depth: 'uchar' })
            : image.toColourspace('srgb').removeAlpha().raw({ depth: 'uchar' });
    out = await raw.toBuffer({ resolveWithObject: true });
  } catch (err) {
    throw reasonOf(err, fmt, bytes);
  }
  const { info } = out;
  const pixels = info.width * info.height;
  const bytesPerPixel = channels * (mode === 'grey16' ? 2 : 1);
  if (info.channels !== channels || out.data.length !== pixels * bytesPerPixel) {
    throw new ImageRejected(
      'corrupt',
      `decoded to ${info.width}x${info.height}x${info.channels} (${out.data.length} bytes), ` +
        `expected ${channels} channels (${mode})`,
    );
  }
  const data =
    mode === 'cmyk'
      ? cmykToRgb(out.data, pixels)
      : mode === 'grey16'
        ? grey16ToRgb(out.data, pixels)
        : mode === 'alpha'
          ? onWhite(out.data, pixels)
          : new Uint8Array(out.data.buffer, out.data.byteOffset, out.data.length);
  return { data, width: info.width, height: info.height, format: fmt };
}

/** RGBA composited on BACKGROUND_RGB as Pillow's `paste(rgba, mask=rgba)` computes it:
 * `(v * a + bg * (255 - a)) / 255` with its DIV255 rounding (equal on every v, a). */
function onWhite(rgba: Uint8Array, pixels: number): Uint8Array {
  const rgb = new Uint8Array(pixels * 3);
  const bg = [BACKGROUND_RGB.r, BACKGROUND_RGB.g, BACKGROUND_RGB.b] as const;
  for (let i = 0; i < pixels; i++) {
    const a = rgba[i * 4 + 3]!;
    for (let c = 0; c < 3; c++) {
      const t = rgba[i * 4 + c]! * a + bg[c]! * (255 - a) + 128;
      rgb[i * 3 + c] = (t + (t >> 8)) >> 8;
    }
  }
  return rgb;
}

/** Pillow's CMYK -> RGB (Convert.c cmyk2rgb): `(255 - k) - c * (255 - k) / 255`, rounded its way. */
function cmykToRgb(cmyk: Uint8Array, pixels: number): Uint8Array {
  const rgb = new Uint8Array(pixels * 3);
  const muldiv255 = (a: number, b: number) => {
    const t = a * b + 128;
    return ((t >> 8) + t) >> 8;
  };
  for (let i = 0; i < pixels; i++) {
    const nk = 255 - cmyk[i * 4 + 3]!;
    for (let c = 0; c < 3; c++) rgb[i * 3 + c] = Math.max(0, nk - muldiv255(cmyk[i * 4 + c]!, nk));
  }
  return rgb;
}

/** `jobs.images._wide_grey_to_l` for I;16 (v / 65535 * 255 + 0.5, truncated), then grey -> RGB. */
function grey16ToRgb(raw: Buffer, pixels: number): Uint8Array {
  const rgb = new Uint8Array(pixels * 3);
  const read = endianness() === 'LE' ? raw.readUInt16LE.bind(raw) : raw.readUInt16BE.bind(raw); // sharp: native order
  for (let i = 0; i < pixels; i++) {
    const v = Math.trunc(Math.min(255, Math.max(0, (read(i * 2) / 65535) * 255 + 0.5)));
    rgb[i * 3] = v;
    rgb[i * 3 + 1] = v;
    rgb[i * 3 + 2] = v;
  }
  return rgb;
}

// ---- the model --------------------------------------------------------------------------------

interface IoSpec {
  name?: unknown;
  dtype?: unknown;
  shape?: unknown;
}

interface Card {
  card_format?: unknown;
  model_version?: unknown;
  file?: unknown;
  sha256?: unknown;
  inputs?: IoSpec[] | null;
  outputs?: IoSpec[] | null;
  calibration?: unknown;
  threshold_policy?: { threshold?: unknown } | null;
  preprocessing?: { max_pixels?: unknown; formats?: unknown } | null;
}

function plainFileName(file: unknown, modelDir: string): string {
  if (
    typeof file !== 'string' ||
    file === '' ||
    file === '.' ||
    file === '..' ||
    file.includes('/') ||
    file.includes('\\') ||
    file.includes('\0') ||
    path.basename(file) !== file
  ) {
    throw new ModelRejected(
      `${path.join(modelDir, 'model_card.json')}: "file" must be a plain file name inside ` +
        `${modelDir}, got ${JSON.stringify(file)}`,
    );
  }
  return file;
}

function ioName(
  spec: IoSpec[] | null | undefined,
  names: readonly string[],
  dtype: string,
  what: string,
  cardPath: string,
): string {
  const first = Array.isArray(spec) ? spec[0] : undefined;
  if (first === undefined) {
    // no spec in the card: the graph's own (first) name
    if (names.length === 0) throw new ModelRejected(`${cardPath}: the graph has no ${what}`);
    return names[0]!;
  }
  if (typeof first.name !== 'string' || !names.includes(first.name)) {
    throw new ModelRejected(
      `${cardPath}: ${what} ${JSON.stringify(first.name)} is not in the graph (${names.join(', ')})`,
    );
  }
  if (first.dtype !== dtype) {
    throw new ModelRejected(`${cardPath}: ${what} ${first.name} is ${String(first.dtype)}, expected ${dtype}`);
  }
  return first.name;
}

/**
 * Load and verify a registered model folder; one onnxruntime session (CPU) for every image.
 * Rejects with {@link ModelRejected} when the card or the file does not verify.
 */
export async function createScorer(options: ScorerOptions): Promise<Scorer> {
  const modelDir = path.resolve(options.modelDir);
  const cardPath = path.join(modelDir, 'model_card.json');
  let card: Card;
  try {
    card = JSON.parse(await readFile(cardPath, 'utf8')) as Card;
  } catch (err) {
    throw new ModelRejected(`${cardPath} cannot be read: ${(err as Error).message}`);
  }
  if (card === null || typeof card !== 'object') throw new ModelRejected(`${cardPath} is not a JSON object`);
  if (card.card_format !== CARD_FORMAT) {
    throw new ModelRejected(
      `${cardPath}: card_format ${String(card.card_format)}, this scorer reads ${CARD_FORMAT}`,
    );
  }
  const modelVersion = card.model_version;
  if (typeof modelVersion !== 'string' || modelVersion === '') {
    throw new ModelRejected(`${cardPath}: no model_version`);
  }
  const file = plainFileName(card.file, modelDir);
  const modelPath = path.join(modelDir, file);
  const expected = typeof card.sha256 === 'string' ? card.sha256.toLowerCase() : '';
  if (!/^[0-9a-f]{64}$/.test(expected)) throw new ModelRejected(`${cardPath}: no sha256 for ${file}`);
  const knots = checkedKnots(card.calibration, cardPath);

  const threshold = options.threshold ?? card.threshold_policy?.threshold;
  if (typeof threshold !== 'number' || !Number.isFinite(threshold)) {
    throw new ModelRejected(
      `capture threshold ${String(threshold)} is not a finite number ` +
        `(option threshold, else ${cardPath} threshold_policy.threshold)`,
    );
  }
  const cardMax = card.preprocessing?.max_pixels;
  const maxPixels = options.maxPixels ?? (typeof cardMax === 'number' ? cardMax : DEFAULT_MAX_PIXELS);
  if (!Number.isInteger(maxPixels) || maxPixels < 1) {
    throw new ModelRejected(`pixel cap ${maxPixels} is not a positive integer`);
  }
  const cardFormats = card.preprocessing?.formats;
  const formats: readonly ImageFormat[] =
    options.formats ??
    (Array.isArray(cardFormats)
      ? ACCEPTED_FORMATS.filter((f) => (cardFormats as unknown[]).includes(f))
      : ACCEPTED_FORMATS);

  let bytes: Buffer;
  try {
    bytes = await readFile(modelPath);
  } catch (err) {
    throw new ModelRejected(`${modelPath} cannot be read: ${(err as Error).message}`);
  }
  const actual = createHash('sha256').update(bytes).digest('hex');
  if (actual !== expected) {
    throw new ModelRejected(
      `${modelPath}: sha256 ${actual} does not match the model card's ${expected}; ` +
        `refusing to load ${modelVersion}`,
    );
  }

  const sessionOptions: ort.InferenceSession.SessionOptions = {
    executionProviders: ['cpu'],
    graphOptimizationLevel: 'all',
    interOpNumThreads: 1,
    logSeverityLevel: 3,
  };
  if (options.threads !== undefined) sessionOptions.intraOpNumThreads = options.threads;
  // built from the bytes that were hashed
  const session = await ort.InferenceSession.create(bytes, sessionOptions);
  let inputName: string;
  let outputName: string;
  try {
    inputName = ioName(card.inputs, session.inputNames, 'uint8', 'input', cardPath);
    outputName = ioName(card.outputs, session.outputNames, 'float32', 'output', cardPath);
  } catch (err) {
    await session.release();
    throw err;
  }
  let closed = false;

  async function scorePixels(rgb: Uint8Array, height: number, width: number): Promise<ScoreResult> {
    if (closed) throw new Error(`the scorer for ${modelVersion} is closed`);
    if (rgb.length !== height * width * 3) {
      throw new RangeError(`${rgb.length} bytes is not ${height}x${width}x3`);
    }
    const tensor = new ort.Tensor('uint8', rgb, [1, height, width, 3]);
    const result = await session.run({ [inputName]: tensor }, [outputName]);
    const out = result[outputName];
    if (out === undefined || out.data.length !== 1) {
      throw new Error(`model ${modelVersion} returned no single ${outputName}`);
    }
    const rawScore = Number((out.data as Float32Array)[0]);
    if (!Number.isFinite(rawScore)) throw new NonFiniteScore(rawScore, modelVersion as string);
    return { rawScore, aiRating: applyCalibration(knots, rawScore), modelVersion: modelVersion as string };
  }

  return {
    modelVersion,
    threshold,
    maxPixels,
    async score(imageBytes: Buffer | Uint8Array): Promise<ScoreResult> {
      const img = await decodeImage(imageBytes, { maxPixels, formats });
      return scorePixels(img.data, img.height, img.width);
    },
    scorePixels,
    gatePassed(aiRating: number): boolean {
      return aiRating >= threshold;
    },
    async close(): Promise<void> {
      if (!closed) {
        closed = true;
        await session.release();
      }
    },
  };
}
