-- Per model version, its latest inference for each snapshot that has a human label, beside that
-- label: the signed error, the slicing metadata and the capture hour in the webcam's own time
-- zone. The label is fct_label_candidates' (what the export would use) and must pass the label
-- gates (enough ratings or a reviewed label, within 0..5, not a duplicate); the URL gates do
-- not apply: the scorer has already read the image.

with

inferences as (
    select * from {{ ref('stg_app__snapshot_ai_inferences') }}
),

candidates as (
    select * from {{ ref('fct_label_candidates') }}
),

webcams as (
    select * from {{ ref('stg_app__webcams') }}
),

-- The zone names this server knows: a webcam's zone is used only when it is one of them, so
-- a misspelt name falls back to UTC instead of failing `at time zone`.
known_timezones as (
    select name as timezone_name from pg_timezone_names
),

latest_inferences as (
    select distinct on (snapshot_id, model_version) *
    from inferences
    order by snapshot_id asc, model_version asc, inferred_at desc, inference_id desc
),

labelled_snapshots as (
    select *
    from candidates
    where
        label_value is not null
        and has_enough_ratings
        and is_label_in_range
        and not is_duplicate
),

webcam_timezones as (
    select
        webcams.webcam_id,
        known_timezones.timezone_name
    from webcams
    inner join known_timezones
        on lower(btrim(webcams.timezone)) = lower(known_timezones.timezone_name)
),

joined as (
    select
        latest_inferences.model_version,
        labelled_snapshots.snapshot_id,
        labelled_snapshots.webcam_id,
        latest_inferences.inference_id,
        latest_inferences.raw_score,
        latest_inferences.ai_rating,
        latest_inferences.is_gate_passed as gate_passed,
        labelled_snapshots.label_value,
        labelled_snapshots.label_source,
        labelled_snapshots.rating_count,
        labelled_snapshots.is_good as human_good,
        labelled_snapshots.is_trainable,
        labelled_snapshots.phase,
        labelled_snapshots.captured_at,
        labelled_snapshots.region,
        labelled_snapshots.source,
        webcam_timezones.timezone_name,
        latest_inferences.inferred_at as inference_created_at,
        latest_inferences.ai_rating - labelled_snapshots.label_value as error,
        labelled_snapshots.captured_at at time zone coalesce(
            webcam_timezones.timezone_name, 'UTC'
        ) as captured_at_local
    from latest_inferences
    inner join labelled_snapshots on latest_inferences.snapshot_id = labelled_snapshots.snapshot_id
    left join webcam_timezones on labelled_snapshots.webcam_id = webcam_timezones.webcam_id
),

derived as (
    select
        *,
        abs(error) as abs_error,
        extract(hour from captured_at_local)::integer as hour_of_day,
        case when timezone_name is null then 'utc' else 'local' end as hour_basis,
        extract(hour from captured_at at time zone 'UTC')::integer as hour_utc,
        extract(month from captured_at_local)::integer as month  -- noqa: RF04
    from joined
)

select
    model_version,
    snapshot_id,
    webcam_id,
    inference_id,
    raw_score,
    ai_rating,
    gate_passed,
    label_value,
    label_source,
    rating_count,
    error,
    abs_error,
    human_good,
    is_trainable,
    phase,
    captured_at,
    hour_of_day,
    hour_basis,
    hour_utc,
    month,
    timezone_name,
    region,
    source,
    inference_created_at
from derived
