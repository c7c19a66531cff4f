-- The model registry (`airatings register`, `airatings models ...`, jobs/registry.py).
-- Runs in the project's schema (search_path set by `airatings migrate`); the functions keep
-- that search_path (`set search_path from current`), so they find these tables whatever the
-- caller's search_path is.
--
-- 1. A registered version is immutable, here and not only in code (RELIABILITY.md 20): once a
--    run's status is 'registered', an update that changes what identifies the model (id,
--    model_version, dataset_hash, config_hash, artifact_sha256, artifact_path), moves the
--    status away from 'registered', or changes params_json['register'] (the registration
--    record) or params_json['onnx'] (the export and its parity results) is refused; so are
--    deleting the row and truncating the table while it holds one. Other steps may still add
--    to the row (a re-run of evaluate records a fresh comparison in params_json['evaluate']).
-- 2. Aliases (`production`) point only at registered versions; every move is a row in
--    model_alias_history, which is append-only.

alter table model_training_runs
add column artifact_path text,
add constraint model_training_runs_registered_check check (
    status <> 'registered'
    or (artifact_sha256 is not null and artifact_path is not null and params_json ? 'register')
);

comment on column model_training_runs.artifact_path is
'The registered model.onnx, relative to the artifact store root (models/<version>/model.onnx).';

create function model_training_runs_refuse_registered_change() returns trigger
language plpgsql
set search_path from current
as $$
begin
    if tg_op = 'DELETE' then
        raise exception 'model version % is registered: its row cannot be deleted', old.model_version
            using errcode = 'restrict_violation',
            hint = 'registered versions are immutable; an alias can be moved instead';
    end if;
    if new.status is distinct from 'registered' then
        raise exception 'model version % is registered: its status cannot become %',
            old.model_version, new.status
            using errcode = 'restrict_violation',
            hint = 'registered versions are immutable';
    end if;
    if new.id is distinct from old.id
        or new.model_version is distinct from old.model_version
        or new.dataset_hash is distinct from old.dataset_hash
        or new.config_hash is distinct from old.config_hash
        or new.artifact_sha256 is distinct from old.artifact_sha256
        or new.artifact_path is distinct from old.artifact_path
        or (new.params_json -> 'register') is distinct from (old.params_json -> 'register')
        or (new.params_json -> 'onnx') is distinct from (old.params_json -> 'onnx') then
        raise exception 'model version % is registered: its identity, artifact and registration record are immutable',
            old.model_version
            using errcode = 'restrict_violation',
            hint = 'register a new version instead';
    end if;
    return new;
end;
$$;

create trigger model_training_runs_registered_immutable
before update or delete on model_training_runs
for each row
when (old.status = 'registered')
execute function model_training_runs_refuse_registered_change();

create function model_training_runs_refuse_truncate() returns trigger
language plpgsql
set search_path from current
as $$
begin
    if exists (select 1 from model_training_runs where status = 'registered') then
        raise exception 'model_training_runs holds registered versions: it cannot be truncated'
            using errcode = 'restrict_violation';
    end if;
    return null;
end;
$$;

create trigger model_training_runs_no_truncate
before truncate on model_training_runs
for each statement
execute function model_training_runs_refuse_truncate();

create table model_aliases (
    alias text primary key,  -- noqa: RF04
    model_version text not null references model_training_runs (model_version),
    updated_at timestamptz not null default now(),
    updated_by text not null,
    constraint model_aliases_alias_shape check (alias ~ '^[a-z][a-z0-9_]{0,62}$')
);

comment on table model_aliases is
'Named pointers to registered versions (production); moved by compare-and-set, see model_alias_history.';

create function model_aliases_require_registered() returns trigger
language plpgsql
set search_path from current
as $$
begin
    if not exists (
        select 1 from model_training_runs
        where model_version = new.model_version and status = 'registered'
    ) then
        raise exception 'alias % cannot point at %: that version is not registered',
            new.alias, new.model_version
            using errcode = 'check_violation',
            hint = 'run airatings register first';
    end if;
    return new;
end;
$$;

create trigger model_aliases_registered_only
before insert or update on model_aliases
for each row
execute function model_aliases_require_registered();

create table model_alias_history (
    id bigserial primary key,
    alias text not null,  -- noqa: RF04
    action text not null,  -- noqa: RF04
    from_version text references model_training_runs (model_version),
    to_version text not null references model_training_runs (model_version),
    changed_by text not null,
    changed_at timestamptz not null default now(),
    reason text,
    forced boolean not null default false,
    comparison jsonb,
    constraint model_alias_history_action_check check (action in ('promote', 'rollback')),
    constraint model_alias_history_forced_reason check (
        not forced or coalesce(btrim(reason), '') <> ''
    )
);

create index model_alias_history_alias_idx on model_alias_history (alias, id);

comment on table model_alias_history is
'Every move of an alias: who, when, from, to, why, whether forced, the comparison it rested on.';

create function model_alias_history_append_only() returns trigger
language plpgsql
as $$
begin
    raise exception 'model_alias_history is append-only (% refused)', tg_op
        using errcode = 'restrict_violation';
end;
$$;

create trigger model_alias_history_no_change
before update or delete or truncate on model_alias_history
for each statement
execute function model_alias_history_append_only();
