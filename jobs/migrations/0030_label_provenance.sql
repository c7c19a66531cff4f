-- Provenance per label row: which app ratings made the label, which reviewed label (if any),
-- the label formula's version, and whether training used the row (set by the cache step in
-- the transaction that publishes the active manifests; null until then).
-- Runs in the project's schema (search_path set by `airatings migrate`).

alter table model_training_snapshot_labels
add column rating_ids bigint[] not null default '{}',
add column relabel_id bigint,
add column label_formula_version smallint not null default 1,
add column used_in_training boolean,
add column exclusion_reason text,
add constraint model_training_snapshot_labels_exclusion_check check (
    (used_in_training is null and exclusion_reason is null)
    or (used_in_training and exclusion_reason is null)
    or (not used_in_training and exclusion_reason is not null)
);

comment on column model_training_snapshot_labels.rating_ids is
'Ids of the app''s webcam_snapshot_ratings rows behind label_value (one per person, after dedupe).';
comment on column model_training_snapshot_labels.relabel_id is
'manual_relabels.id of the reviewed label when label_source = manual_review.';
comment on column model_training_snapshot_labels.used_in_training is
'True: in the active manifests training read; false: excluded (see exclusion_reason); null: not cached yet.';

-- Exactly the rows training used, one per (run, snapshot).
create view model_training_labels_used as
select
    labels.id,
    labels.training_run_id,
    runs.model_version,
    labels.snapshot_id,
    labels.split,
    labels.label_source,
    labels.label_value,
    labels.rating_ids,
    labels.relabel_id,
    labels.label_formula_version,
    labels.included_at
from model_training_snapshot_labels as labels
inner join model_training_runs as runs on labels.training_run_id = runs.id
where labels.used_in_training;

comment on view model_training_labels_used is
'The label rows each training run used: equal to its active manifests.';
