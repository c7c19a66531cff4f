-- Evaluation results per model version, split, slice and metric (`airatings evaluate`).
-- Runs in the project's schema (search_path set by `airatings migrate`).
-- A re-run upserts the same keys; the bootstrap is seeded, so the numbers reproduce.
-- value is NULL with status 'insufficient_data' when too few rows back the metric.

create table model_evaluations (
    id bigserial primary key,
    model_version text not null,
    training_run_id bigint references model_training_runs (id) on delete cascade,
    dataset_hash text,
    split text not null,
    slice text not null,
    metric text not null,
    value double precision,  -- noqa: RF04
    status text not null default 'ok',
    n integer not null,
    ci_low double precision,
    ci_high double precision,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint model_evaluations_key unique (model_version, split, slice, metric),
    constraint model_evaluations_status_check check (
        status in ('ok', 'insufficient_data')
    ),
    constraint model_evaluations_value_check check (
        (status = 'ok' and value is not null)
        or (status = 'insufficient_data' and value is null)
    )
);

create index model_evaluations_run_idx on model_evaluations (training_run_id);

comment on table model_evaluations is
'Metrics of a model version on a split and slice (e.g. all, phase=sunset), with bootstrap CIs.';
