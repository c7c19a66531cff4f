with

source as (
    select * from {{ source('app', 'webcam_snapshot_ratings') }}
),

renamed as (
    select
        id::bigint as rating_id,
        snapshot_id::bigint as snapshot_id,
        user_id::text as user_id,
        rating::integer as rating,
        created_at::timestamptz as rated_at
    from source
)

select * from renamed
