-- Training samples with their split. The split is a pure function of (split seed, group key)
-- and the ratios (macros/split.sql); the default group (webcam, UTC capture day) keeps
-- near-identical frames out of two splits.

with

samples as (
    select * from {{ ref('fct_training_samples') }}
),

grouped as (
    select
        *,
        {{ split_group_key('webcam_id', 'snapshot_id', 'captured_at') }} as split_group
    from samples
),

bucketed as (
    select
        *,
        {{ split_bucket('split_group') }} as split_bucket
    from grouped
)

select
    snapshot_id,
    firebase_url,
    label_source,
    label_value,
    {{ split_for_bucket('split_bucket') }} as split,
    phase,
    captured_at,
    rating_count,
    is_good,
    webcam_id,
    region,
    source,
    rating_std,
    rating_hist,
    split_group,
    split_bucket,
    rating_ids,
    relabel_id,
    label_formula_version
from bucketed
