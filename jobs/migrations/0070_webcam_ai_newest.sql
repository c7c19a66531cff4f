-- Each webcam's newest scored snapshot per model version: what refresh_webcam_ai
-- (jobs/grants.py) sets webcams.ai_rating from. It kept recomputing that from all of the
-- webcam's inference rows on every batch (56.9 ms a call at 100k snapshots, BENCHMARKS.md
-- "Scale"); with this row it compares the batch's rows with the newest one so far.
-- Written only by refresh_webcam_ai, under the webcam row's lock. No foreign keys: the app's
-- tables live in another schema (database.app_schema) and may not exist yet. A row whose
-- snapshot or inference row is gone or changed is recomputed from the history by the function.

create table webcam_ai_newest (
    webcam_id bigint not null,
    model_version text not null,
    snapshot_id bigint not null,
    captured_at timestamptz not null,
    ai_rating double precision not null,
    primary key (webcam_id, model_version)
);

comment on table webcam_ai_newest is
'Per webcam and model version, its newest scored snapshot (captured_at, id) and that row''s '
'aiRating; kept by refresh_webcam_ai.';
