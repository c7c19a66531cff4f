{#-
  Split assignment: a pure function of (split seed, group key) and the ratios, so a snapshot's
  split never changes when other snapshots or ratings are added or removed.
  bucket = first 8 hex digits of md5('<seed>:<group>') as an unsigned 32-bit integer / 2^32,
  in [0, 1); train below split_train, val below split_train + split_val, test above.
-#}

{% macro split_group_key(webcam_id, snapshot_id, captured_at) -%}
    {%- set key = var('group_key') -%}
    {%- if key == 'webcam_day' -%}
        ('webcam:' || {{ webcam_id }}::text || ':'
        || to_char({{ captured_at }} at time zone 'UTC', 'YYYY-MM-DD'))
    {%- elif key == 'webcam' -%}
        ('webcam:' || {{ webcam_id }}::text)
    {%- elif key == 'snapshot' -%}
        ('snapshot:' || {{ snapshot_id }}::text)
    {%- else -%}
        {{ exceptions.raise_compiler_error(
            "var group_key must be webcam_day, webcam or snapshot, got " ~ key
        ) }}null
    {%- endif -%}
{%- endmacro %}

{% macro split_bucket(group_expr) -%}
    (('x' || left(md5('{{ var("split_seed") | int }}:' || {{ group_expr }}), 8))::bit(32)::bigint
    / 4294967296.0)
{%- endmacro %}

{% macro split_for_bucket(bucket_expr) -%}
    {%- set train = var('split_train') | float -%}
    {%- set val = var('split_val') | float -%}
    case
        when {{ bucket_expr }} < {{ train }} then 'train'
        when {{ bucket_expr }} < {{ train + val }} then 'val'
        else 'test'
    end
{%- endmacro %}
