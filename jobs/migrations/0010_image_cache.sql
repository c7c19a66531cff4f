-- The image cache's URL index (jobs/cache.py): which content (sha256) a URL gave when it was
-- cached. Files live content-addressed under <artifacts>/images/; this table only lets a
-- re-run (or another shard, or the next run) skip URLs already cached with zero requests.
-- Keyed by sha256(url) so arbitrarily long URLs fit a btree; failures are not recorded here
-- (they are retried by the next run and reported per run in failures.parquet).

create table image_cache (
    url_key text primary key,
    url text not null,
    sha256 text not null,
    ext text not null,
    bytes bigint not null,
    width integer not null,
    height integer not null,
    cached_at timestamptz not null default now(),
    constraint image_cache_url_key_shape check (url_key ~ '^[0-9a-f]{64}$'),
    constraint image_cache_sha256_shape check (sha256 ~ '^[0-9a-f]{64}$'),
    constraint image_cache_ext_check check (ext in ('jpg', 'png', 'webp', 'gif'))
);

create index image_cache_sha256_idx on image_cache (sha256);

comment on table image_cache is
'URL -> content hash of cached images; files under <artifacts>/images/original/<aa>/<sha256>.<ext>.';
