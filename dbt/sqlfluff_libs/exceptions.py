"""Stand-in for dbt's `exceptions` Jinja object so that sqlfluff's jinja templater can render
the macros offline (sqlfluff only; dbt provides the real one). sqlfluff's dummy `var()` returns
placeholder values, so the stand-in renders nothing instead of raising."""


def raise_compiler_error(msg):
    return ""
