-- Scoring (`airatings score`, jobs/score.py) and least privilege for every job.
-- Runs in the project's schema (search_path set by `airatings migrate`).
--
-- 1. Four roles, NOLOGIN: an operator grants them to the login users the jobs run as
--    (`grant airatings_score to scorer_user`). Role names are cluster-wide, so creating them
--    is idempotent; without CREATEROLE the migration warns and goes on (an operator creates
--    them, then re-runs `airatings migrate`, which grants whatever roles exist).
--      airatings_export  reads the app's tables, builds dbt's views, writes the project's rows
--      airatings_train   reads the app's tables, writes the project's rows (cache ... register)
--      airatings_score   reads snapshots and the registry; inserts inference rows; may update
--                        only webcams.ai_rating and webcams.ai_model_version; records failures
--      airatings_review  reads everything; writes relabels
--    The grants are made by `airatings migrate` after the migrations, every time
--    (jobs/grants.py): the app's tables live in another schema, named in the config, and
--    tables that later migrations add need their grants too.
-- 2. score_failures: a snapshot the scorer could not score with a model version, and why
--    (a bad image, a dead URL, a non-finite output). Permanent reasons are not retried by the
--    next run for that version; transient ones (timeouts, 5xx) are.

do $$
declare
    r text;
begin
    foreach r in array array['airatings_export', 'airatings_train', 'airatings_score', 'airatings_review'] loop
        if not exists (select 1 from pg_roles where rolname = r) then
            begin
                execute format('create role %I nologin', r);
            exception when insufficient_privilege then
                raise warning 'role % was not created (this user lacks CREATEROLE): create it, then re-run airatings migrate', r;
            end;
        end if;
    end loop;
end;
$$;

create table score_failures (
    snapshot_id bigint not null,
    model_version text not null,
    reason text not null,  -- noqa: RF04
    detail text,
    transient boolean not null,  -- noqa: RF04
    attempts integer not null default 1,
    first_failed_at timestamptz not null default now(),
    last_failed_at timestamptz not null default now(),
    primary key (snapshot_id, model_version)
);

comment on table score_failures is
'Snapshots airatings score could not score with a version, and why; permanent reasons are not retried.';
