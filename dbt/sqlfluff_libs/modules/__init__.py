"""Stand-in for dbt's `modules` Jinja object (sqlfluff only)."""

import re  # noqa: F401
