-- Training runs and the exact human labels each one used (provenance, DESIGN.md).
-- Runs in the project's schema (search_path set by `airatings migrate`).
--
-- snapshot_id has no foreign key to the app's webcam_snapshots: that table belongs to the
-- app (and does not exist when `migrate` runs before the app's schema in tests/demo); a
-- provenance row must also survive the app deleting a snapshot.

create table model_training_runs (
    id bigserial primary key,
    model_version text not null unique,
    status text not null default 'exported',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    trained_at timestamptz,
    dataset_hash text,
    config_hash text not null,
    artifact_sha256 text,
    failure_reason text,
    params_json jsonb not null default '{}'::jsonb,
    notes text,
    constraint model_training_runs_status_check check (status in (
        'exported', 'cached', 'trained', 'evaluated', 'onnx_exported', 'registered', 'failed'
    )),
    constraint model_training_runs_version_shape check (model_version ~ '^[a-z][a-z0-9_]{2,80}$')
);

comment on table model_training_runs is
'One row per training run; model_version is assigned at export and never reused.';
comment on column model_training_runs.params_json is
'Provenance: dataset path and hash, export params, dbt vars, config hash, library versions.';

create table model_training_snapshot_labels (
    id bigserial primary key,
    training_run_id bigint not null references model_training_runs (id) on delete cascade,
    snapshot_id bigint not null,
    label_source text not null,
    label_value double precision not null,
    split text not null,
    included_at timestamptz not null default now(),
    constraint model_training_snapshot_labels_run_snapshot_key unique (training_run_id, snapshot_id),
    constraint model_training_snapshot_labels_split_check check (split in ('train', 'val', 'test')),
    constraint model_training_snapshot_labels_value_check check (label_value >= 0 and label_value <= 5)
);

create index model_training_snapshot_labels_snapshot_idx on model_training_snapshot_labels (snapshot_id);

comment on table model_training_snapshot_labels is
'Every (run, snapshot, label) a training run used: equal to its manifest rows.';
