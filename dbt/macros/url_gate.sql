{#-
  The URL gate: why a snapshot's image URL cannot be fetched, or null when it can.
  Allowed schemes come from the config (dataset.allowed_url_schemes); each is checked to be a
  bare word before it is written into SQL as a literal.
-#}

{% macro allowed_url_schemes_sql() -%}
    {%- set schemes = var('allowed_url_schemes') -%}
    {%- if schemes is string -%}{%- set schemes = [schemes] -%}{%- endif -%}
    {%- for s in schemes -%}
        {%- if not modules.re.fullmatch('[a-z][a-z0-9+.-]{0,15}', s) -%}
            {{ exceptions.raise_compiler_error("var allowed_url_schemes has an invalid scheme: " ~ s) }}
        {%- endif -%}
    {%- endfor -%}
    ({%- for s in schemes -%}'{{ s }}'{%- if not loop.last -%}, {% endif -%}{%- endfor -%})
{%- endmacro %}

{% macro url_failure_reason(url) -%}
    case
        when {{ url }} is null or btrim({{ url }}) = '' then 'missing_url'
        when lower(substring({{ url }} from '^([A-Za-z][A-Za-z0-9+.-]*):'))
            not in {{ allowed_url_schemes_sql() }}
            or substring({{ url }} from '^([A-Za-z][A-Za-z0-9+.-]*):') is null
            then 'url_scheme_not_allowed'
        when {{ url }} !~* '^https?://[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?(/[^[:space:]]*)?$'
            and {{ url }} !~* '^file:///[^[:space:]]+$'
            then 'url_malformed'
    end
{%- endmacro %}
