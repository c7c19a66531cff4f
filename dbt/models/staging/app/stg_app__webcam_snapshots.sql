with

source as (
    select * from {{ source('app', 'webcam_snapshots') }}
),

renamed as (
    select
        id::bigint as snapshot_id,
        webcam_id::bigint as webcam_id,
        firebase_url::text as firebase_url,
        phase::text as phase,
        captured_at::timestamptz as captured_at,
        calculated_rating::double precision as calculated_rating,
        rating_count::integer as app_rating_count
    from source
)

select * from renamed
