with

source as (
    select * from {{ source('app', 'snapshot_ai_inferences') }}
),

renamed as (
    select
        id::bigint as inference_id,
        snapshot_id::bigint as snapshot_id,
        webcam_id::bigint as webcam_id,
        model_version::text as model_version,
        raw_score::double precision as raw_score,
        ai_rating::double precision as ai_rating,
        gate_passed::boolean as is_gate_passed,
        created_at::timestamptz as inferred_at
    from source
)

select * from renamed
