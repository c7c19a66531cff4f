-- People's ratings per snapshot: count, mean, sample std, a 0..5 histogram and the ids of the
-- rating rows behind them (provenance: which ratings made a label).
-- The app has been seen to write a rating row twice: one rating per (snapshot, user) is kept,
-- the latest one.

with

ratings as (
    select * from {{ ref('stg_app__webcam_snapshot_ratings') }}
),

deduplicated as (
    select distinct on (snapshot_id, user_id)
        rating_id,
        snapshot_id,
        user_id,
        rating
    from ratings
    where rating is not null
    order by snapshot_id asc, user_id asc, rated_at desc, rating_id desc
),

aggregated as (
    select
        snapshot_id,
        count(*)::integer as rating_count,
        avg(rating)::double precision as rating_mean,
        stddev_samp(rating)::double precision as rating_std,
        array[
            count(*) filter (where rating = 0),
            count(*) filter (where rating = 1),
            count(*) filter (where rating = 2),
            count(*) filter (where rating = 3),
            count(*) filter (where rating = 4),
            count(*) filter (where rating = 5)
        ]::integer[] as rating_hist,
        array_agg(rating_id order by rating_id)::bigint[] as rating_ids
    from deduplicated
    group by snapshot_id
)

select * from aggregated
