"""CPU counting for thread pools: affinity capped by a cgroup quota (v2 and v1 layouts)."""

from __future__ import annotations

import os

import pytest

from jobs import resources

AFFINITY = len(os.sched_getaffinity(0))


def v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def v1(tmp_path, quota, period):
    d = tmp_path / "cpu"
    d.mkdir()
    (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


@pytest.mark.parametrize(
    "text,limit", [("150000 100000\n", 1.5), ("max 100000\n", None), ("garbage\n", None)]
)
def test_cgroup_v2_quota(tmp_path, text, limit):
    assert resources.cgroup_cpu_limit(v2(tmp_path, text)) == limit


@pytest.mark.parametrize("quota,period,limit", [(50000, 100000, 0.5), (-1, 100000, None)])
def test_cgroup_v1_quota(tmp_path, quota, period, limit):
    assert resources.cgroup_cpu_limit(v1(tmp_path, quota, period)) == limit


def test_quota_caps_the_affinity_mask_rounded_down_never_below_one(tmp_path):
    # A pod limited to 1.5 CPUs on a bigger node: 1 thread, not every core of the node.
    assert resources.available_cpus(v2(tmp_path, "150000 100000")) == 1
    (tmp_path / "cpu.max").write_text("20000 100000")
    assert resources.available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(AFFINITY + 8) * 100000} 100000")
    assert resources.available_cpus(tmp_path) == AFFINITY  # a quota above the mask: the mask


def test_no_cgroup_files_means_the_affinity_mask(tmp_path):
    assert resources.cgroup_cpu_limit(tmp_path) is None
    assert resources.available_cpus(tmp_path) == AFFINITY


def test_training_threads_follow_the_quota(tmp_path, monkeypatch, make_cfg):
    from jobs.train import engine

    monkeypatch.setattr(resources, "CGROUP_ROOT", v2(tmp_path, "100000 100000"))
    assert engine.default_threads(make_cfg()) == 1
    assert engine.default_threads(make_cfg(train__threads=3)) == 3
