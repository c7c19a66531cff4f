-- No group (by default a webcam-day) may sit in two splits: near-identical frames would leak
-- from train into test. Returns the offending groups.

select
    split_group,
    count(distinct split) as split_count
from {{ ref('fct_dataset_splits') }}
group by split_group
having count(distinct split) > 1
