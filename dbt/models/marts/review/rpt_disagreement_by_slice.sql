-- Per model version, how far the AI is from the human labels, overall and per slice (phase,
-- capture hour and month in the basis of fct_disagreements, region, source). A slice is kept
-- only with at least var review_min_slice_size rows; 'all' is kept whenever the version has one.
-- Hours and months are two digits ('hour=06', 'month=01'), as in the evaluation's slices.

with

disagreements as (
    select * from {{ ref('fct_disagreements') }}
),

-- one row per (disagreement, slice it belongs to)
sliced as (
    select
        disagreements.model_version,
        slices.slice_dimension,
        slices.slice_value,
        disagreements.error,
        disagreements.abs_error,
        disagreements.ai_rating,
        disagreements.label_value
    from disagreements
    cross join lateral (
        values
        ('all', 'all'),
        ('phase', disagreements.phase),
        ('hour', lpad(disagreements.hour_of_day::text, 2, '0')),
        ('month', lpad(disagreements.month::text, 2, '0')),
        ('region', disagreements.region),
        ('source', disagreements.source)
    ) as slices (slice_dimension, slice_value)
),

aggregated as (
    select
        model_version,
        slice_dimension,
        slice_value,
        case
            when slice_dimension = 'all' then 'all'
            else slice_dimension || '=' || slice_value
        end as slice,
        count(*) as n,
        avg(abs_error) as mae,
        avg(error) as bias,
        avg(case when abs_error > 1.0 then 1.0 else 0.0 end)::double precision
            as share_abs_error_gt_1,
        avg(ai_rating) as mean_predicted,
        avg(label_value) as mean_human
    from sliced
    -- a row without the slice's value (no region, say) belongs to no slice of that dimension
    where slice_value is not null and slice_value != ''
    group by model_version, slice_dimension, slice_value
)

select
    model_version,
    slice,
    slice_dimension,
    slice_value,
    n,
    mae,
    bias,
    share_abs_error_gt_1,
    mean_predicted,
    mean_human
from aggregated
where slice_dimension = 'all' or n >= {{ var('review_min_slice_size') | int }}
