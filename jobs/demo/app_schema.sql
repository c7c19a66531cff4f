-- A mirror of the app's tables, for the demo and the tests only. In production these belong
-- to the app and `airatings migrate` never creates them (docs/architecture.md "The app's tables").
-- Runs with search_path set to database.app_schema. Idempotent (if not exists).

create table if not exists webcams (
    id                bigserial primary key,
    name              text not null,
    region            text,
    source            text,
    latitude          double precision,
    longitude         double precision,
    timezone          text,
    ai_rating         double precision,
    ai_model_version  text,
    created_at        timestamptz not null default now()
);

create table if not exists webcam_snapshots (
    id                 bigserial primary key,
    webcam_id          bigint not null references webcams (id),
    firebase_url       text,
    phase              text,
    captured_at        timestamptz not null,
    calculated_rating  double precision,
    rating_count       integer not null default 0,
    created_at         timestamptz not null default now()
);

create index if not exists webcam_snapshots_webcam_idx on webcam_snapshots (webcam_id);

create table if not exists webcam_snapshot_ratings (
    id           bigserial primary key,
    snapshot_id  bigint not null references webcam_snapshots (id),
    user_id      text not null,
    rating       integer not null,
    created_at   timestamptz not null default now()
);

create index if not exists webcam_snapshot_ratings_snapshot_idx on webcam_snapshot_ratings (snapshot_id);

create table if not exists snapshot_ai_inferences (
    id             bigserial primary key,
    snapshot_id    bigint not null references webcam_snapshots (id),
    webcam_id      bigint not null references webcams (id),
    model_version  text not null,
    raw_score      double precision not null,
    ai_rating      double precision not null,
    gate_passed    boolean not null,
    created_at     timestamptz not null default now()
);
