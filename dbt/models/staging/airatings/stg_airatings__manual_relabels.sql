with

source as (
    select * from {{ source('airatings', 'manual_relabels') }}
),

renamed as (
    select
        id::bigint as relabel_id,
        snapshot_id::bigint as snapshot_id,
        label_value::double precision as label_value,
        reviewer::text as reviewer,
        reason::text as reason,
        created_at::timestamptz as reviewed_at,
        superseded_at::timestamptz as superseded_at
    from source
)

select * from renamed
