"""The demo world: webcams, sunrise/sunset snapshots, people's ratings and rendered images.

Everything is a pure function of the seed and the ``demo`` config section: the same seed gives
the same rows and the same JPEG bytes (fixed quality and chroma subsampling; rendering runs on
per-snapshot random streams, so it does not matter which process renders which image).

What drives quality
-------------------
Each snapshot has a hidden true quality ``q`` in [0, 5], computed from what its picture shows:

- **sky colour** (the strongest cue): a warm, saturated gradient (deep indigo at the top, pink
  in the middle, orange at the horizon) scores high; a pale, flat blue-grey sky scores low.
  Its strength is the day's *vividness* times the *golden-hour factor* (peaking with the
  sun about 1.5 degrees above the horizon and fading over about 5 degrees either side:
  earlier frames are dark, later ones bland), damped by haze and overcast.
- **lit clouds**: a broken cloud layer (about half the sky) whose undersides are lit
  orange/pink scores high; the same clouds unlit are dark grey and score nothing. A clear sky
  shows no clouds to light up.
- **sun**: a visible sun disc near the horizon adds a little (it needs a clear horizon).
- **overcast** (a flat grey blanket) and **haze** (a pale veil, thickest near the horizon) push
  quality down; so does **darkness** (frames taken well before sunrise or after sunset).

The formula (``quality()``) is ``5 * clip(0.10 + 0.80 * colour + 0.65 * lit_clouds + 0.12 * sun
- 0.12 * dullness, 0, 1)``. About 15-20% of snapshots have q >= 4 (about a fifth of the rated
ones have a mean rating >= 4), and q spans the whole range. The weather is correlated:
a region shares part of each day's weather, each webcam adds its own day-level weather, sunrise
and sunset of the same day differ a little more, and frames taken minutes apart at the same
webcam (several per webcam-day-phase) are nearly identical -- so grouping by webcam-day
matters when splitting data. Each webcam has fixed scenery (a dark land ridge or a sea with
the sky's reflection, its own horizon height and sun bearing) that says nothing about quality.

Webcams sit in five regions (north_america, europe, asia_pacific, south_america, oceania) and
three sources (windy, youtube, skyline); ``captured_at`` is the webcam's actual sunrise or
sunset time (computed from latitude, longitude and date, in UTC) plus or minus up to about 40
minutes.

People: ``demo.raters`` users, each with a bias ~ N(0, rater_bias_sd) and their own noise
(uniform in rater_noise_min..max); a rating is ``clip(round(q + bias + noise), 0, 5)``.
Some users rate far more than others. About 30% of snapshots have no rating and about 25%
exactly one; the rest have 2 to 8. ``calculated_rating`` is the mean and ``rating_count`` the
number of distinct (snapshot, user) ratings (NULL and 0 when nobody rated).

Faults, at the rates in the ``demo`` config (each snapshot gets at most one): a dead URL (a
``file://`` path that does not exist), a truncated JPEG, an HTML error page saved as ``.jpg``,
a NULL URL, an empty-string URL; one webcam whose images are all missing; and one duplicated
rating row (an exact copy of an existing rating under a new id, which dbt must dedupe).
Image URLs are ``file://`` paths ``<data_dir>/demo-images/camNNN/<snapshot_id>.jpg`` (JPEG,
``demo.image_width`` x ``demo.image_height``, 640x360 by default), which only the demo config
allows the cache to read. The hidden truth per snapshot (q and the scene latents above) is
written to ``<data_dir>/demo-truth.parquet`` for analysis; no job reads it.
"""

from __future__ import annotations

import datetime as dt
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jobs.artifacts import atomic_write_bytes

REGIONS = ("north_america", "europe", "asia_pacific", "south_america", "oceania")
SOURCES = ("windy", "youtube", "skyline")
PHASES = ("sunrise", "sunset")
FAULT_KINDS = (
    "dead_url",
    "truncated_jpeg",
    "html_as_jpg",
    "null_url",
    "empty_url",
    "webcam_images_missing",
    "duplicate_rating",
)
START_DATE = dt.date(2025, 11, 3)

# (place, latitude, longitude, IANA time zone, scenery): scenery is "sea" or "land".
PLACES: dict[str, tuple[tuple[str, float, float, str, str], ...]] = {
    "north_america": (
        ("San Diego", 32.72, -117.16, "America/Los_Angeles", "sea"),
        ("Sedona", 34.87, -111.76, "America/Phoenix", "land"),
        ("Key West", 24.56, -81.78, "America/New_York", "sea"),
        ("Vancouver", 49.28, -123.12, "America/Vancouver", "land"),
        ("Cape Cod", 41.67, -70.30, "America/New_York", "sea"),
    ),
    "europe": (
        ("Lisbon", 38.72, -9.14, "Europe/Lisbon", "sea"),
        ("Santorini", 36.39, 25.46, "Europe/Athens", "sea"),
        ("Dolomites", 46.41, 11.84, "Europe/Rome", "land"),
        ("Bergen", 60.39, 5.32, "Europe/Oslo", "land"),
        ("Brighton", 50.82, -0.14, "Europe/London", "sea"),
    ),
    "asia_pacific": (
        ("Bali", -8.41, 115.19, "Asia/Makassar", "sea"),
        ("Okinawa", 26.21, 127.68, "Asia/Tokyo", "sea"),
        ("Mount Fuji", 35.36, 138.73, "Asia/Tokyo", "land"),
        ("Phuket", 7.88, 98.39, "Asia/Bangkok", "sea"),
    ),
    "south_america": (
        ("Rio de Janeiro", -22.91, -43.17, "America/Sao_Paulo", "sea"),
        ("Valparaiso", -33.05, -71.62, "America/Santiago", "sea"),
        ("Atacama", -22.91, -68.20, "America/Santiago", "land"),
        ("Montevideo", -34.90, -56.16, "America/Montevideo", "sea"),
    ),
    "oceania": (
        ("Sydney", -33.87, 151.21, "Australia/Sydney", "sea"),
        ("Perth", -31.95, 115.86, "Australia/Perth", "sea"),
        ("Queenstown", -45.03, 168.66, "Pacific/Auckland", "land"),
        ("Uluru", -25.34, 131.04, "Australia/Darwin", "land"),
    ),
}
# How each region's air tends to look (shifts of the haze and vividness latents).
REGION_CLIMATE = {
    "north_america": (0.0, 0.1),
    "europe": (0.1, -0.1),
    "asia_pacific": (0.35, 0.0),
    "south_america": (-0.1, 0.1),
    "oceania": (-0.2, 0.15),
}
# Share of snapshots with 0, 1, 2, ... 8 ratings.
RATING_COUNT_P = (0.30, 0.25, 0.13, 0.10, 0.07, 0.05, 0.04, 0.03, 0.03)

HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>404 Not Found</title></head>\n"
    b"<body><h1>Not Found</h1><p>The requested snapshot was not found on this server.</p>"
    b"</body></html>\n"
)


@dataclass
class World:
    """The simulated rows (column lists in DB order) and the image jobs for the renderer."""

    webcams: list[tuple]
    snapshots: list[tuple]
    ratings: list[tuple]
    # One per snapshot that has a file on disk: the render parameters (see render_jpeg).
    images: list[dict[str, Any]]
    truth: dict[str, np.ndarray]
    faults: dict[str, int]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


WEBCAM_COLUMNS = (
    "id",
    "name",
    "region",
    "source",
    "latitude",
    "longitude",
    "timezone",
    "created_at",
)
SNAPSHOT_COLUMNS = (
    "id",
    "webcam_id",
    "firebase_url",
    "phase",
    "captured_at",
    "calculated_rating",
    "rating_count",
    "created_at",
)
RATING_COLUMNS = ("id", "snapshot_id", "user_id", "rating", "created_at")


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def sun_event_utc(lat: float, lon: float, day: dt.date, phase: str) -> dt.datetime:
    """Approximate sunrise/sunset time in UTC (NOAA-style declination, no refraction)."""
    n = day.timetuple().tm_yday
    decl = math.radians(-23.44) * math.cos(2 * math.pi / 365 * (n + 10))
    x = -math.tan(math.radians(lat)) * math.tan(decl)
    omega = math.degrees(math.acos(max(-1.0, min(1.0, x))))  # hour angle at sunrise, degrees
    noon_utc_h = 12.0 - lon / 15.0
    hours = noon_utc_h - omega / 15.0 if phase == "sunrise" else noon_utc_h + omega / 15.0
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC) + dt.timedelta(hours=hours)


def quality(ci: np.ndarray, cs: np.ndarray, sun: np.ndarray, dull: np.ndarray) -> np.ndarray:
    """Hidden true quality 0..5 from the look: colour intensity, lit clouds, sun, dullness."""
    raw = 0.10 + 0.80 * ci + 0.65 * cs + 0.12 * sun - 0.12 * dull
    return np.clip(5.0 * raw, 0.0, 5.0)


def simulate(demo: Any, *, snapshots: int, seed: int, images_dir: Path) -> World:
    """Draw the whole world from ``seed``. ``demo`` is the config's DemoConfig section."""
    rng = np.random.default_rng([seed, 0x5EED])
    n_cams = demo.webcams
    n_days = demo.days
    n = snapshots

    # ---- webcams ------------------------------------------------------------------------
    webcams = []
    cam_region, cam_scenery, cam_latlon = [], [], []
    cam_horizon = rng.uniform(0.58, 0.8, n_cams)
    cam_sun_x = rng.uniform(0.2, 0.8, n_cams)
    cam_ridge = rng.uniform(0, 2 * math.pi, (n_cams, 3))
    cam_ridge_amp = rng.uniform(0.03, 0.12, n_cams)
    created0 = dt.datetime.combine(START_DATE, dt.time(0), tzinfo=dt.UTC) - dt.timedelta(days=60)
    for i in range(n_cams):
        region = REGIONS[i % len(REGIONS)]
        place, lat, lon, tz, scenery = PLACES[region][(i // len(REGIONS)) % len(PLACES[region])]
        lat = round(lat + rng.uniform(-0.2, 0.2), 4)
        lon = round(lon + rng.uniform(-0.2, 0.2), 4)
        source = SOURCES[i % len(SOURCES)]
        webcams.append(
            (
                i + 1,
                f"{place} {source} cam {i // len(REGIONS) + 1}",
                region,
                source,
                lat,
                lon,
                tz,
                created0 + dt.timedelta(hours=7 * i),
            )
        )
        cam_region.append(REGIONS.index(region))
        cam_scenery.append(scenery)
        cam_latlon.append((lat, lon))
    cam_region = np.array(cam_region)
    missing_cams = set(range(n_cams - demo.missing_image_webcams, n_cams))

    # ---- weather: region-day, webcam-day, phase, frame ------------------------------------
    # Four latents: cloud amount, overcast, haze, vividness; plus how lit the clouds are.
    n_lat = 5
    region_day = rng.standard_normal((len(REGIONS), n_days, n_lat))
    cam_day = rng.standard_normal((n_cams, n_days, n_lat))
    cam_day_phase = rng.standard_normal((n_cams, n_days, 2, n_lat))

    # ---- snapshots: webcam, day, phase, minutes from the sun event ---------------------------
    cam = rng.integers(0, n_cams, n)
    day = rng.integers(0, n_days, n)
    phase = rng.integers(0, 2, n)
    minutes = rng.uniform(-30.0, 40.0, n)  # + = the sun higher (after sunrise, before sunset)
    frame_noise = rng.standard_normal((n, n_lat)) * 0.12
    z = (
        0.55 * region_day[cam_region[cam], day]
        + 0.65 * cam_day[cam, day]
        + 0.45 * cam_day_phase[cam, day, phase]
        + frame_noise
    )
    haze_shift = np.array([REGION_CLIMATE[REGIONS[r]][0] for r in cam_region])[cam]
    vivid_shift = np.array([REGION_CLIMATE[REGIONS[r]][1] for r in cam_region])[cam]
    cover = _sigmoid(1.6 * z[:, 0] - 0.1)
    overcast = np.clip(_sigmoid(2.2 * z[:, 1] - 3.0) * 1.3 - 0.05, 0.0, 1.0)
    haze = np.clip(_sigmoid(1.8 * (z[:, 2] + haze_shift) - 2.0) * 1.2 - 0.05, 0.0, 1.0)
    vivid = _sigmoid(1.6 * (z[:, 3] + vivid_shift) + 1.0)
    lit = _sigmoid(1.8 * z[:, 4] + 0.6)

    elevation = minutes * 0.18  # degrees; about 11 degrees an hour near the horizon
    golden = np.exp(-(((elevation - 1.5) / 5.0) ** 2))
    bright = _sigmoid((elevation + 4.5) / 1.3)
    sun_vis = (
        np.clip((elevation + 0.5) / 1.5, 0.0, 1.0)
        * (1 - overcast) ** 2
        * (1 - 0.7 * haze)
        * np.clip(1.3 - cover, 0.0, 1.0)
    )
    broken = np.clip(1.0 - ((cover - 0.5) / 0.42) ** 2, 0.0, 1.0)  # best around half cover
    ci = vivid * (0.3 + 0.7 * golden) * (1 - overcast) * (1 - 0.6 * haze) * bright
    cs = broken * lit * golden * (1 - overcast) * (1 - 0.4 * haze)
    dull = np.clip(overcast + 0.6 * haze + (1 - bright), 0.0, 2.0)
    q = quality(ci, cs, sun_vis, dull)
    warm_hue = rng.uniform(0.0, 1.0, n)  # pink .. orange, says nothing about quality
    render_seed = rng.integers(0, 2**63 - 1, n)

    captured = []
    for i in range(n):
        lat, lon = cam_latlon[cam[i]]
        event = sun_event_utc(
            lat, lon, START_DATE + dt.timedelta(days=int(day[i])), PHASES[phase[i]]
        )
        sign = 1.0 if phase[i] == 0 else -1.0
        t = event + dt.timedelta(seconds=round(sign * minutes[i] * 60.0))
        captured.append(t.replace(microsecond=0))
    upload_s = rng.integers(30, 240, n)

    # ids follow capture time, like the app's (ties broken by webcam, then draw order)
    order = sorted(range(n), key=lambda i: (captured[i], int(cam[i]), i))
    sid = np.empty(n, dtype=np.int64)
    sid[np.array(order)] = np.arange(1, n + 1)

    # ---- faults -----------------------------------------------------------------------------
    kind = np.array([""] * n, dtype=object)
    missing = np.isin(cam, list(missing_cams))
    kind[missing] = "webcam_images_missing"
    pool = rng.permutation(np.flatnonzero(~missing))
    n_corrupt = round(demo.corrupt_rate * n)
    n_truncated = (n_corrupt + 1) // 2
    plan = [
        ("dead_url", round(demo.dead_url_rate * n)),
        ("truncated_jpeg", n_truncated),
        ("html_as_jpg", n_corrupt - n_truncated),
        ("null_url", round(demo.null_url_rate * n)),
        ("empty_url", round(demo.empty_url_rate * n)),
    ]
    if sum(k for _, k in plan) > len(pool):
        raise ValueError("fault rates add up to more snapshots than the world has")
    at = 0
    for name, k in plan:
        kind[pool[at : at + k]] = name
        at += k

    # ---- ratings ----------------------------------------------------------------------------
    bias = rng.normal(0.0, demo.rater_bias_sd, demo.raters)
    noise_sd = rng.uniform(demo.rater_noise_min, demo.rater_noise_max, demo.raters)
    activity = rng.pareto(1.5, demo.raters) + 0.2
    activity /= activity.sum()
    counts = rng.choice(len(RATING_COUNT_P), size=n, p=np.array(RATING_COUNT_P))
    counts = np.minimum(counts, demo.raters)
    user_ids = [f"demo-user-{u + 1:04d}" for u in range(demo.raters)]
    ratings_raw = []  # (created_at, snapshot_id, user_index, rating)
    calc = np.full(n, np.nan)
    for i in range(n):
        k = int(counts[i])
        if k == 0:
            continue
        users = rng.choice(demo.raters, size=k, replace=False, p=activity)
        vals = np.clip(np.rint(q[i] + bias[users] + rng.normal(0.0, noise_sd[users])), 0, 5).astype(
            int
        )
        delays = rng.exponential(6 * 3600.0, k) + 60.0
        calc[i] = float(vals.mean())
        for u, v, d in zip(users, vals, delays, strict=True):
            ratings_raw.append(
                (captured[i] + dt.timedelta(seconds=round(float(d))), int(sid[i]), int(u), int(v))
            )
    ratings_raw.sort(key=lambda r: (r[0], r[1], r[2]))
    ratings = [(j + 1, s, user_ids[u], v, t) for j, (t, s, u, v) in enumerate(ratings_raw)]
    if demo.duplicate_ratings and ratings:
        multi = [r for r in ratings if counts[order[r[1] - 1]] >= 2]
        src = multi if multi else ratings
        picks = rng.choice(len(src), size=min(demo.duplicate_ratings, len(src)), replace=False)
        for p in sorted(int(x) for x in picks):
            ratings.append((len(ratings) + 1, *src[p][1:]))
    n_dup = len(ratings) - len(ratings_raw)

    # ---- rows and image jobs --------------------------------------------------------------
    rows = [None] * n
    images = []
    for i in range(n):
        s = int(sid[i])
        c = int(cam[i])
        path = images_dir / f"cam{c + 1:03d}" / f"{s:07d}.jpg"
        k = kind[i]
        if k == "null_url":
            url = None
        elif k == "empty_url":
            url = ""
        elif k == "dead_url":
            url = path.with_name(f"{s:07d}-gone.jpg").as_uri()
        else:
            url = path.as_uri()
        if k not in ("null_url", "empty_url", "dead_url", "webcam_images_missing"):
            images.append(
                {
                    "snapshot_id": s,
                    "path": str(path),
                    "fault": k,
                    "seed": int(render_seed[i]),
                    "width": demo.image_width,
                    "height": demo.image_height,
                    "jpeg_quality": demo.jpeg_quality,
                    "ci": float(ci[i]),
                    "cs": float(cs[i]),
                    "sun": float(sun_vis[i]),
                    "cover": float(cover[i]),
                    "overcast": float(overcast[i]),
                    "haze": float(haze[i]),
                    "bright": float(bright[i]),
                    "elevation": float(elevation[i]),
                    "warm_hue": float(warm_hue[i]),
                    "horizon": float(cam_horizon[c]),
                    "sun_x": float(cam_sun_x[c] + 0.04 * math.sin(day[i])),
                    "scenery": cam_scenery[c],
                    "ridge": [float(v) for v in cam_ridge[c]],
                    "ridge_amp": float(cam_ridge_amp[c]),
                }
            )
        rating_count = int(counts[i])
        rows[sid[i] - 1] = (
            s,
            c + 1,
            url,
            PHASES[phase[i]],
            captured[i],
            None if rating_count == 0 else float(calc[i]),
            rating_count,
            captured[i] + dt.timedelta(seconds=int(upload_s[i])),
        )
    images.sort(key=lambda d: d["snapshot_id"])

    faults = {name: int(np.sum(kind == name)) for name in FAULT_KINDS if name != "duplicate_rating"}
    faults["duplicate_rating"] = n_dup
    region_of = [webcams[int(c)][2] for c in cam]
    source_of = [webcams[int(c)][3] for c in cam]
    world_counts = {
        "regions": _tally(region_of, REGIONS),
        "sources": _tally(source_of, SOURCES),
        "phases": _tally([PHASES[p] for p in phase], PHASES),
        "rating_counts": {str(k): int(np.sum(counts == k)) for k in range(len(RATING_COUNT_P))},
    }
    idx = np.argsort(sid)
    truth = {
        "snapshot_id": sid[idx],
        "webcam_id": cam[idx].astype(np.int64) + 1,
        "day": day[idx].astype(np.int32),
        "true_quality": q[idx],
        "fault": np.array([k or "none" for k in kind[idx]], dtype=object),
        "colour_intensity": ci[idx],
        "lit_clouds": cs[idx],
        "sun_visible": sun_vis[idx],
        "cloud_cover": cover[idx],
        "overcast": overcast[idx],
        "haze": haze[idx],
        "sun_elevation_deg": elevation[idx],
    }
    return World(webcams, rows, ratings, images, truth, faults, world_counts)


def _tally(values: list[str], keys: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    for v in values:
        out[v] += 1
    return out


# ---- rendering ------------------------------------------------------------------------------


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    return a + (b - a) * t


def _noise(
    rng: np.random.Generator, w: int, h: int, octaves: tuple[tuple[int, int, float], ...]
) -> np.ndarray:
    """Smooth fractal noise (H, W) float32, roughly in 0..1: random grids upsampled bicubic."""
    out = np.zeros((h, w), dtype=np.float32)
    total = 0.0
    for gw, gh, amp in octaves:
        grid = rng.random((gh, gw), dtype=np.float32)
        up = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
        out += amp * np.asarray(up, dtype=np.float32)
        total += amp
    return out / total


def _upsample(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """A float32 map resized bilinearly to (h, w)."""
    if a.shape == (h, w):
        return a
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def render_planes(p: dict[str, Any]) -> list[np.ndarray]:
    """One snapshot's picture as three (H, W) uint8 planes (R, G, B), from its parameters.

    Layers, back to front: the sky gradient (dull pale blue-grey vs vivid indigo-pink-orange,
    blended by colour intensity, greyed by overcast), the sun's glow and disc, clouds (noise
    thresholded to the cover, undersides lit by ``cs``), land or sea, then haze and
    brightness. Vectorised per colour plane (long contiguous rows are what numpy is fast at):
    row-only terms stay (H, 1), the glow is separable and the clouds are worked out at half
    resolution (they are smooth) and upsampled bilinearly.
    """
    w, h = int(p["width"]), int(p["height"])
    rng = np.random.default_rng(p["seed"])
    f32 = np.float32
    hy = p["horizon"]
    hrow = min(h - 1, max(2, round(hy * h)))  # first row below the horizon
    ci, cs, sun, bright = p["ci"], p["cs"], p["sun"], p["bright"]
    ys = (np.arange(h, dtype=f32) + 0.5) / h
    xs = (np.arange(w, dtype=f32) + 0.5) / w
    t = np.clip(ys / hy, 0.0, 1.0)[:, None]  # (H, 1): 0 at the top, 1 at the horizon

    # Sky gradient per row, (H, 3).
    dull_top, dull_hor = np.array([92, 112, 150], f32), np.array([178, 184, 194], f32)
    hor_warm = _lerp(np.array([255, 118, 88], f32), np.array([255, 168, 60], f32), p["warm_hue"])
    viv_top, viv_mid = np.array([38, 34, 102], f32), np.array([206, 78, 126], f32)
    viv = np.where(
        t < 0.6, _lerp(viv_top, viv_mid, t / 0.6), _lerp(viv_mid, hor_warm, (t - 0.6) / 0.4)
    )
    sky_row = _lerp(_lerp(dull_top, dull_hor, t), viv, f32(ci))
    sky_row = _lerp(sky_row, np.array([132, 132, 138], f32), f32(0.85 * p["overcast"])).astype(f32)

    # Clouds at half resolution: fractal noise stretched horizontally, thresholded to the
    # cover, thinning towards the horizon; undersides (where the smooth field falls off
    # downwards) catch the light.
    w2, h2 = max(8, w // 2), max(4, hrow // 2)
    base = _noise(rng, w2, h2, ((4, 8, 1.0), (8, 18, 0.45)))
    n = 0.8 * base + 0.2 * _noise(rng, w2, h2, ((18, 40, 1.0),))
    t2 = (np.arange(h2, dtype=f32) + 0.5) / h2
    n += (0.12 * (0.5 - np.abs(t2 - 0.45)))[:, None].astype(f32)
    thr = f32(np.quantile(n[::2, ::4], min(max(1.0 - p["cover"], 0.0), 1.0)))
    alpha = np.clip((n - thr) * f32(0.92 / 0.035), 0.0, 0.92)
    shift = max(1, h2 // 40)
    below = np.concatenate([base[shift:], np.repeat(base[-1:], shift, axis=0)], axis=0)
    underside = np.clip((base - below) * 20.0 + 0.3, 0.0, 1.0)
    lit = alpha * (f32(min(2.0 * cs, 1.0)) * (0.45 + 0.55 * underside))
    alpha, lit = _upsample(alpha, w, hrow), _upsample(lit, w, hrow)
    clear = 1 - alpha

    # Sun: a separable Gaussian glow and a disc, both behind the clouds.
    aspect = w / h
    sx, sy = p["sun_x"], hy - 0.018 * p["elevation"]
    glow = None
    if sun > 0.01:
        gx = np.exp(-(((xs - sx) * aspect) ** 2) / (2 * 0.12**2)).astype(f32)
        gy = np.exp(-((ys[:hrow] - sy) ** 2) / (2 * 0.12**2)).astype(f32)
        glow = np.outer(gy * f32(0.44 * sun), gx)
        r = 0.035
        y0, y1 = max(0, int((sy - r - 0.01) * h)), min(hrow, int((sy + r + 0.01) * h) + 1)
        x0 = max(0, int((sx - (r + 0.01) / aspect) * w))
        x1 = min(w, int((sx + (r + 0.01) / aspect) * w) + 1)
        if y1 > y0 and x1 > x0:
            d = np.sqrt(((xs[None, x0:x1] - sx) * aspect) ** 2 + (ys[y0:y1, None] - sy) ** 2)
            box = glow[y0:y1, x0:x1]
            np.maximum(box, np.clip((r - d) / 0.006, 0.0, 1.0) * f32(min(1.0, 1.6 * sun)), out=box)
        sky_k = (1 - glow) * clear
        glow *= clear
    else:
        sky_k = clear

    # Below the horizon: a sea (the sky mirrored, rippled) or a dark ridge line.
    sea = p["scenery"] == "sea"
    mirror = np.clip(2 * hrow - 1 - np.arange(hrow, h), 0, hrow - 1)
    if sea:
        ripple = 0.375 + 0.125 * _noise(rng, w, h - hrow, ((8, 40, 1.0),))
        ground = None
    else:
        a1, a2, a3 = p["ridge"]
        ridge = hy - p["ridge_amp"] * (
            0.6
            + 0.25 * np.sin(2.5 * xs + a1)
            + 0.15 * np.sin(7.0 * xs + a2)
            + 0.08 * np.sin(19.0 * xs + a3)
        )
        land = np.array([18, 18, 24], f32) + f32(0.08) * sky_row[hrow - 1]
        top = max(0, int(ridge.min() * h))
        ground = ys[top:hrow, None] >= ridge[None, :]

    # Haze (thicker near the horizon) and brightness: per row, out = x * k + c.
    veil = f32(0.65 * p["haze"]) * (0.45 + 0.55 * t)  # (H, 1)
    gain = f32(0.22 + 0.78 * bright)
    row_k = ((1 - veil) * gain).astype(f32)
    row_c = (veil * gain).astype(f32) * np.array([196, 186, 176], f32)  # (H, 3)

    glow_col = np.array([255, 210, 160], f32)
    dark_cloud = np.array([74, 72, 84], f32) * f32(0.5 + 0.5 * bright)
    lit_cloud = _lerp(np.array([255, 112, 122], f32), np.array([255, 168, 84], f32), p["warm_hue"])
    planes = []
    for c in range(3):
        plane = np.empty((h, w), dtype=f32)
        sky = plane[:hrow]
        np.multiply(sky_k, sky_row[:hrow, c, None], out=sky)
        if glow is not None:
            sky += glow * glow_col[c]
        sky += alpha * dark_cloud[c]
        sky += lit * (lit_cloud[c] - dark_cloud[c])
        if sea:
            np.multiply(sky[mirror], ripple, out=plane[hrow:])
            plane[hrow:] += (6, 12, 22)[c]
        else:
            plane[hrow:] = land[c]
            np.copyto(plane[top:hrow], land[c], where=ground)
        plane *= row_k
        plane += row_c[:, c, None]
        np.clip(plane, 0, 255, out=plane)
        planes.append(plane.astype(np.uint8))
    return planes


def render(p: dict[str, Any]) -> np.ndarray:
    """One snapshot's picture, (H, W, 3) uint8 RGB."""
    return np.stack(render_planes(p), axis=-1)


def encode_jpeg(planes: list[np.ndarray], quality: int) -> bytes:
    """Deterministic JPEG bytes: fixed quality, 4:2:0 subsampling, no optimise pass."""
    img = Image.merge("RGB", [Image.fromarray(pl, mode="L") for pl in planes])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def image_bytes(p: dict[str, Any]) -> bytes:
    """The file a snapshot's URL points at, faults included (truncated JPEG, HTML page)."""
    if p["fault"] == "html_as_jpg":
        return HTML_PAGE
    data = encode_jpeg(render_planes(p), p["jpeg_quality"])
    if p["fault"] == "truncated_jpeg":
        return data[: max(64, int(len(data) * 0.55))]
    return data


def write_images(batch: list[dict[str, Any]]) -> list[tuple[int, int, bool]]:
    """Render and write a batch (runs in a worker process). Only missing or different files
    are written, each atomically. Returns (snapshot_id, bytes, written) per image."""
    out = []
    for p in batch:
        data = image_bytes(p)
        path = Path(p["path"])
        try:
            same = path.stat().st_size == len(data) and path.read_bytes() == data
        except FileNotFoundError:
            same = False
        if not same:
            atomic_write_bytes(path, data)
        out.append((p["snapshot_id"], len(data), not same))
    return out
