-- The review loop (`airatings review report|import|history`, jobs/review.py).
-- Runs in the project's schema (search_path set by `airatings migrate`).
--
-- 1. model_evaluations gets a cycle: evaluate's test-split rows have cycle '' (as before);
--    a review cycle's rows (split 'production_loop') are kept per cycle, so each night's
--    numbers stay as they were computed and `review history` can plot them.
-- 2. review_cycles: one per (cycle, model version): the frozen disagreement rows and slice
--    report it was computed from (Parquet, sha256), its review set's sha256 and its page.
-- 3. review_items: the review set, with why each snapshot was chosen.
-- 4. review_imports: each imported review CSV once (by sha256), with its accounting.

alter table model_evaluations add column cycle text not null default '';

alter table model_evaluations drop constraint model_evaluations_key;

alter table model_evaluations
add constraint model_evaluations_key unique (model_version, split, slice, metric, cycle);

create table review_cycles (
    cycle text not null,  -- noqa: RF04
    model_version text not null references model_training_runs (model_version),
    data_path text not null,
    data_sha256 text not null,
    slices_sha256 text not null,
    items_sha256 text not null,
    page_path text,
    page_sha256 text,
    params_json jsonb not null default '{}'::jsonb,
    created_at timestamptz not null default now(),
    primary key (cycle, model_version),
    constraint review_cycles_cycle_shape check (cycle ~ '^[0-9A-Za-z][0-9A-Za-z_.-]{0,63}$')
);

comment on table review_cycles is
'One review cycle per model version: the frozen data it used (sha256) and its review set.';

create table review_items (
    cycle text not null,  -- noqa: RF04
    model_version text not null,
    snapshot_id bigint not null,
    reason text not null,  -- noqa: RF04
    item_rank integer not null,
    ai_rating double precision not null,
    label_value double precision not null,
    abs_error double precision not null,
    primary key (cycle, model_version, snapshot_id),
    foreign key (cycle, model_version) references review_cycles (cycle, model_version),
    constraint review_items_reason_check check (
        reason in ('top_disagreement', 'boundary_sample', 'holdout')
    )
);

create index review_items_snapshot_idx on review_items (snapshot_id);

comment on table review_items is
'The review set of a cycle: top disagreements, a seeded boundary-band sample and a holdout.';

create table review_imports (
    id bigserial primary key,
    file_sha256 text not null unique,
    file_name text not null,
    rows_imported integer not null,
    accounting jsonb not null,
    imported_by text not null,
    imported_at timestamptz not null default now()
);

comment on table review_imports is
'Each review CSV imported once (by content), with its yield and label-error accounting.';

alter table manual_relabels add column review_import_id bigint references review_imports (id);
