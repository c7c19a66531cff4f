-- Every snapshot with the label it would get now and where that label comes from: the latest
-- non-superseded reviewed label if any, else the app's calculated rating (else the mean of the
-- distinct-person ratings). A view: `airatings provenance` reads it to tell which labels of an
-- old run have changed since. One row per app snapshot row (duplicates stay: the mart gates them).

with

snapshots as (
    select * from {{ ref('stg_app__webcam_snapshots') }}
),

ratings as (
    select * from {{ ref('int_ratings_aggregated_to_snapshots') }}
),

relabels as (
    select * from {{ ref('int_manual_relabels_filtered_to_latest') }}
),

resolved as (
    select
        snapshots.snapshot_id,
        snapshots.webcam_id,
        snapshots.firebase_url,
        snapshots.phase,
        snapshots.captured_at,
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
        -- the ratings behind a label: none for a reviewed label (relabel_id says which review)
        case
            when relabels.snapshot_id is not null then array[]::bigint[]
            else coalesce(ratings.rating_ids, array[]::bigint[])
        end as rating_ids,
        relabels.relabel_id,
        {{ label_formula_version() }}::smallint as label_formula_version
    from snapshots
    left join ratings on snapshots.snapshot_id = ratings.snapshot_id
    left join relabels on snapshots.snapshot_id = relabels.snapshot_id
)

select * from resolved
