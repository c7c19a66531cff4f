{#-
  The version of the label formula in int_labels_resolved_to_snapshots, recorded on every
  label row a training run uses. Bump it whenever that SQL changes what a label means (not for
  a refactor that gives the same values), so old and new labels are never compared as equals.
  1: the latest non-superseded reviewed label, else the app's calculated_rating, else the mean
     of the distinct-person ratings (the latest rating per person).
-#}

{% macro label_formula_version() -%}
    1
{%- endmacro %}
