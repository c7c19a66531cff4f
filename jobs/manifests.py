"""The manifest contract, in one place: the columns the export writes and the columns the cache
adds to the active manifests that training and evaluation read (docs/architecture.md, "export", "cache")."""

from __future__ import annotations

import pyarrow as pa

# manifest_{full,train,val,test}.parquet under artifacts/datasets/<dataset hash>/, sorted by
# snapshot_id. rating_std is null below 2 ratings; rating_hist counts the ratings 0..5.
MANIFEST_SCHEMA = pa.schema(
    [
        ("snapshot_id", pa.int64()),
        ("firebase_url", pa.string()),
        ("label_source", pa.string()),
        ("label_value", pa.float64()),
        ("split", pa.string()),
        ("phase", pa.string()),
        ("captured_at", pa.timestamp("us", tz="UTC")),
        ("rating_count", pa.int32()),
        ("is_good", pa.bool_()),
        ("webcam_id", pa.int64()),
        ("region", pa.string()),
        ("source", pa.string()),
        ("rating_std", pa.float64()),
        ("rating_hist", pa.list_(pa.int32())),
    ]
)

# runs/<model_version>/active/manifest_{train,val,test}.parquet: the rows whose image cached
# fine, plus where the image is (paths relative to the artifacts dir).
ACTIVE_SCHEMA = pa.schema(
    [
        *MANIFEST_SCHEMA,
        ("image_sha256", pa.string()),
        ("image_path", pa.string()),
        ("train_image_path", pa.string()),
    ]
)
