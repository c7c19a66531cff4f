-- Every snapshot with its label, metadata and one boolean per quality gate. drop_reason is the
-- first gate it fails (null when it passes them all). The label and its provenance come from
-- int_labels_resolved_to_snapshots; a reviewed label needs no minimum rating count.

with

labels as (
    select * from {{ ref('int_labels_resolved_to_snapshots') }}
),

webcams as (
    select * from {{ ref('stg_app__webcams') }}
),

labelled as (
    select
        labels.*,
        webcams.region,
        webcams.source,
        row_number() over (
            partition by labels.snapshot_id order by labels.captured_at
        ) as snapshot_occurrence,
        case
            when nullif(btrim(labels.firebase_url), '') is null then 1
            else row_number() over (
                partition by nullif(btrim(labels.firebase_url), '')
                order by labels.snapshot_id, labels.captured_at
            )
        end as url_occurrence
    from labels
    left join webcams on labels.webcam_id = webcams.webcam_id
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
        rating_ids,
        relabel_id,
        label_formula_version,
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
