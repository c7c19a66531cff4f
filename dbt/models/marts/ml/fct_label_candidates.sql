-- Every snapshot with its label, metadata and one boolean per quality gate. drop_reason is the
-- first gate it fails (null when it passes them all). A reviewed label (label_source =
-- 'manual_review') wins over the app's calculated rating and needs no minimum rating count.

with

snapshots as (
    select * from {{ ref('stg_app__webcam_snapshots') }}
),

webcams as (
    select * from {{ ref('stg_app__webcams') }}
),

ratings as (
    select * from {{ ref('int_ratings_aggregated_to_snapshots') }}
),

relabels as (
    select * from {{ ref('int_manual_relabels_filtered_to_latest') }}
),

labelled as (
    select
        snapshots.snapshot_id,
        snapshots.webcam_id,
        snapshots.firebase_url,
        snapshots.phase,
        snapshots.captured_at,
        webcams.region,
        webcams.source,
        snapshots.calculated_rating,
        snapshots.app_rating_count,
        ratings.rating_mean,
        ratings.rating_std,
        coalesce(ratings.rating_count, 0) as rating_count,
        coalesce(ratings.rating_hist, array[0, 0, 0, 0, 0, 0]::integer[]) as rating_hist,
        case
            when relabels.snapshot_id is not null then 'manual_review'
            else 'calculated_rating'
        end as label_source,
        case
            when relabels.snapshot_id is not null then relabels.label_value
            else coalesce(snapshots.calculated_rating, ratings.rating_mean)
        end as label_value,
        row_number() over (
            partition by snapshots.snapshot_id order by snapshots.captured_at
        ) as snapshot_occurrence,
        case
            when nullif(btrim(snapshots.firebase_url), '') is null then 1
            else row_number() over (
                partition by nullif(btrim(snapshots.firebase_url), '')
                order by snapshots.snapshot_id, snapshots.captured_at
            )
        end as url_occurrence
    from snapshots
    left join webcams on snapshots.webcam_id = webcams.webcam_id
    left join ratings on snapshots.snapshot_id = ratings.snapshot_id
    left join relabels on snapshots.snapshot_id = relabels.snapshot_id
),

gated as (
    select
        *,
        {{ url_failure_reason('firebase_url') }} as url_failure,
        (
            rating_count >= {{ var('min_rating_count') | int }}
            or label_source = 'manual_review'
        ) as has_enough_ratings,
        coalesce(label_value between 0 and 5, false) as is_label_in_range,
        (snapshot_occurrence > 1 or url_occurrence > 1) as is_duplicate
    from labelled
),

candidates as (
    select
        snapshot_id,
        webcam_id,
        firebase_url,
        phase,
        captured_at,
        region,
        source,
        rating_count,
        rating_mean,
        rating_std,
        rating_hist,
        calculated_rating,
        app_rating_count,
        label_source,
        label_value,
        coalesce(label_value >= {{ var('good_threshold') | float }}, false) as is_good,
        url_failure is null as has_valid_url,
        url_failure,
        has_enough_ratings,
        is_label_in_range,
        is_duplicate,
        case
            when url_failure is not null then url_failure
            when not has_enough_ratings then 'too_few_ratings'
            when not is_label_in_range then 'label_out_of_range'
            when is_duplicate then 'duplicate_snapshot'
        end as drop_reason
    from gated
)

select
    *,
    drop_reason is null as is_trainable
from candidates
