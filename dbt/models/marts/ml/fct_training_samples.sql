-- The label candidates that pass every gate, one row per snapshot id.

with

candidates as (
    select * from {{ ref('fct_label_candidates') }}
),

passing as (
    select distinct on (snapshot_id) *
    from candidates
    where is_trainable
    order by snapshot_id asc, captured_at asc
)

select
    snapshot_id,
    webcam_id,
    firebase_url,
    phase,
    captured_at,
    region,
    source,
    rating_count,
    rating_std,
    rating_hist,
    label_source,
    label_value,
    is_good,
    rating_ids,
    relabel_id,
    label_formula_version
from passing
