-- The reviewed label that counts per snapshot: the latest one that no later review superseded.

with

relabels as (
    select * from {{ ref('stg_airatings__manual_relabels') }}
),

latest as (
    select distinct on (snapshot_id)
        snapshot_id,
        relabel_id,
        label_value,
        reviewer,
        reviewed_at
    from relabels
    where superseded_at is null
    order by snapshot_id asc, reviewed_at desc, relabel_id desc
)

select * from latest
