-- Reviewed labels that override the app's calculated rating (filled by the review job).
-- Precedence (dbt int_manual_relabels_filtered_to_latest + fct_label_candidates): the latest
-- non-superseded row per snapshot wins over calculated_rating, label_source = 'manual_review'.

create table manual_relabels (
    id bigserial primary key,
    snapshot_id bigint not null,
    label_value double precision not null,
    reviewer text not null,
    reason text,
    created_at timestamptz not null default now(),
    superseded_at timestamptz,
    constraint manual_relabels_value_check check (label_value >= 0 and label_value <= 5)
);

create index manual_relabels_snapshot_idx on manual_relabels (snapshot_id, created_at desc)
where superseded_at is null;

comment on table manual_relabels is
'Reviewed labels; the latest non-superseded one per snapshot wins over calculated_rating.';

-- Model versions are never reused, even by an export that rolled back: a version is reserved
-- here (committed on its own) before the run row is written.
create table model_version_reservations (
    model_version text primary key,
    reserved_at timestamptz not null default now()
);
