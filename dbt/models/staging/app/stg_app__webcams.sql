with

source as (
    select * from {{ source('app', 'webcams') }}
),

renamed as (
    select
        id::bigint as webcam_id,
        name::text as webcam_name,
        region::text as region,
        source::text as source,
        timezone::text as timezone,
        ai_rating::double precision as ai_rating,
        ai_model_version::text as ai_model_version
    from source
)

select * from renamed
