"""Config: typed, safe YAML, env overrides, clear exit-2 errors before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import BASELINE, DEMO

from jobs.config import Config, load_config
from jobs.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_baseline_loads_and_hash_is_stable():
    a = load_config(BASELINE, env={})
    b = load_config(BASELINE, env={})
    assert isinstance(a, Config)
    assert a.config_hash == b.config_hash
    assert len(a.config_hash) == 64


def test_hash_ignores_machine_local_values_but_not_run_values():
    base = load_config(BASELINE, env={})
    moved = load_config(
        BASELINE, env={"DATABASE_URL": "postgresql://u:p@h/db", "AIR_ARTIFACTS_DIR": "/x"}
    )
    assert moved.database.url == "postgresql://u:p@h/db"
    assert str(moved.paths.artifacts_dir) == "/x"
    assert moved.config_hash == base.config_hash
    changed = load_config(BASELINE, env={"AIR__TRAIN__EPOCHS": "3"})
    assert changed.train.epochs == 3
    assert changed.config_hash != base.config_hash


def test_demo_extends_baseline():
    demo = load_config(DEMO, env={})
    assert demo.cache.allow_file_urls is True
    assert "file" in demo.dataset.allowed_url_schemes
    base = load_config(BASELINE, env={})
    assert base.cache.allow_file_urls is False
    assert "file" not in base.dataset.allowed_url_schemes
    # untouched keys come from the baseline
    assert demo.dataset.split_seed == base.dataset.split_seed


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  epoch: 3\n", "train.epoch: unknown key"),
        ("bogus: 1\n", "bogus: unknown key"),
        ("train:\n  epochs: many\n", "train.epochs"),
        ("dataset:\n  split_ratios: {train: 0.5, val: 0.1, test: 0.1}\n", "sum to 1.0"),
        (
            "train:\n  epochs: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
            "python/object/apply",
        ),
        ("database:\n  app_schema: 'public; drop table webcams'\n", "database.app_schema"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), env={})
    assert needle in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", env={})


def test_env_override_unknown_key_and_bad_shape():
    with pytest.raises(ConfigError, match="train.epochz: unknown key"):
        load_config(BASELINE, env={"AIR__TRAIN__EPOCHZ": "3"})
    with pytest.raises(ConfigError, match="unknown config section 'nosuch'"):
        load_config(BASELINE, env={"AIR__NOSUCH__X": "3"})
    with pytest.raises(ConfigError, match="AIR__<SECTION>__<KEY>"):
        load_config(BASELINE, env={"AIR__TRAIN": "3"})


def test_extends_loop_is_refused(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml", env={})


def test_resolved_yaml_redacts_database_url():
    c = load_config(BASELINE, env={"DATABASE_URL": "postgresql://u:secret@h/db"})
    assert "secret" not in c.to_yaml()


@pytest.mark.parametrize(
    ("var", "raw", "needle"),
    [
        ("AIR__CACHE__ALLOW_FILE_URLS", "1", "cache.allow_file_urls"),
        ("AIR__CACHE__ALLOW_FILE_URLS", '"yes"', "cache.allow_file_urls"),
        ("AIR__TRAIN__EPOCHS", "true", "train.epochs"),
        ("AIR__TRAIN__EPOCHS", '"3"', "train.epochs"),
        ("AIR__TRAIN__LR", "true", "train.lr"),
        ("AIR__CACHE__FILE_ROOT", "2024-01-01", "cache.file_root: a date"),
    ],
)
def test_wrong_types_are_errors_not_coerced(var, raw, needle):
    """A security flag given as 1 or 'yes', a count given as true: named, never coerced."""
    with pytest.raises(ConfigError) as exc:
        load_config(BASELINE, env={var: raw})
    assert needle in str(exc.value)


def test_strict_types_still_accept_what_the_configs_use():
    c = load_config(
        DEMO,
        env={
            "AIR__DATASET__GOOD_THRESHOLD": "4",  # an int where a float is expected
            "AIR__CACHE__ALLOWED_PRIVATE_HOSTS": '["127.0.0.1:8080"]',  # list -> tuple
            "AIR__TRAIN__WEIGHTS_PATH": "/models/w.pt",  # str -> Path
        },
    )
    assert c.dataset.good_threshold == 4.0 and isinstance(c.dataset.good_threshold, float)
    assert c.cache.allowed_private_hosts == ("127.0.0.1:8080",)
    assert c.train.weights_path == Path("/models/w.pt")
    assert c.dataset.allowed_url_schemes == ("https", "http", "file")


def test_exponent_floats_read_as_numbers_like_yaml_1_2(tmp_path):
    # PyYAML (YAML 1.1) would keep "1e-3" a string, which strict validation then refuses.
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-3\n  weight_decay: 5E-5\n"), env={})
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 5e-5
    assert load_config(BASELINE, env={"AIR__TRAIN__LR": "2e-4"}).train.lr == 2e-4
    with pytest.raises(ConfigError, match="python/object"):
        load_config(write(tmp_path, "train:\n  lr: !!python/object:os.system {}\n"), env={})


def test_train_hash_covers_what_changes_the_result_only():
    base = load_config(BASELINE, env={})
    assert load_config(BASELINE, env={"AIR__TRAIN__THREADS": "1"}).train_hash == base.train_hash
    assert load_config(BASELINE, env={"AIR__CACHE__CONCURRENCY": "8"}).train_hash == base.train_hash
    assert load_config(BASELINE, env={"AIR__TRAIN__SEED": "9"}).train_hash != base.train_hash
    assert (
        load_config(BASELINE, env={"AIR__DATASET__SPLIT_SEED": "9"}).train_hash != base.train_hash
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  lr: .inf\n", "train.lr"),
        ("cache:\n  backoff_base_s: .inf\n", "cache.backoff_base_s"),  # ge=0 alone lets inf by
        ("cache:\n  total_timeout_s: .inf\n", "cache.total_timeout_s"),
        ("cache:\n  retry_after_cap_s: .nan\n", "cache.retry_after_cap_s"),
        ("train:\n  weight_decay: -.inf\n", "train.weight_decay"),
        ("train:\n  lr: 1e999\n", "train.lr"),  # overflows to inf when read
        ("demo:\n  rater_bias_sd: .NaN\n", "demo.rater_bias_sd"),
    ],
)
def test_non_finite_numbers_in_yaml_are_refused_naming_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), env={})
    assert needle in str(exc.value)
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("raw", [".inf", "-.inf", ".nan", "inf", "nan", "Infinity", "1e999"])
def test_non_finite_numbers_in_env_overrides_are_refused_naming_the_key(raw):
    for var, key in (
        ("AIR__CACHE__BACKOFF_MAX_S", "cache.backoff_max_s"),
        ("AIR__DATABASE__STATEMENT_TIMEOUT_S", "database.statement_timeout_s"),
        ("AIR__EVALUATE__CI_LEVEL", "evaluate.ci_level"),
    ):
        with pytest.raises(ConfigError) as exc:
            load_config(BASELINE, env={var: raw})
        assert key in str(exc.value), raw


def test_non_finite_number_through_the_cli_exits_2_naming_the_key(tmp_path):
    import json
    import os
    import subprocess

    from conftest import AIRATINGS

    env = {
        **os.environ,
        "AIR__TRAIN__LR": ".inf",
        "AIR_DATA_DIR": str(tmp_path / "data"),
        "AIR_ARTIFACTS_DIR": str(tmp_path / "art"),
    }
    env.pop("DATABASE_URL", None)
    r = subprocess.run(
        [AIRATINGS, "migrate", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 2
    assert "train.lr: Input should be a finite number" in json.loads(r.stdout)["error"]
    assert not (tmp_path / "data").exists()


def test_malformed_override_names_are_refused_naming_the_variable():
    for var in ("AIR__TRAIN__EPOCHS__X", "AIR__TRAIN____EPOCHS", "AIR____EPOCHS", "AIR__"):
        with pytest.raises(ConfigError, match=f"{var}: expected AIR__<SECTION>__<KEY>"):
            load_config(BASELINE, env={var: "3"})
    with pytest.raises(ConfigError, match="AIR__SOURCE__X: unknown config section 'source'"):
        load_config(BASELINE, env={"AIR__SOURCE__X": "1"})
    with pytest.raises(ConfigError, match="AIR__TRAIN__EPOCHS: not a valid YAML value"):
        load_config(BASELINE, env={"AIR__TRAIN__EPOCHS": "[3"})


def test_override_names_are_case_insensitive_after_the_prefix_and_empty_is_null():
    c = load_config(BASELINE, env={"AIR__Train__Epochs": "5", "AIR__TRAIN__THREADS": ""})
    assert c.train.epochs == 5
    assert c.train.threads is None
    assert load_config(BASELINE, env={"AIR__TRAIN__THREADS": "3"}).train.threads == 3


# ---- AIR_CONFIG: the config file of a container started without arguments ---------------


def test_air_config_names_the_file_when_no_path_is_given(tmp_path):
    p = write(tmp_path, "extends: " + str(BASELINE) + "\ntrain:\n  epochs: 7\n")
    c = load_config(env={"AIR_CONFIG": str(p)})
    assert c.train.epochs == 7
    assert c.source == str(p)
    # an explicit path wins over AIR_CONFIG
    assert load_config(BASELINE, env={"AIR_CONFIG": str(p)}).train.epochs != 7


def test_air_config_unset_or_empty_means_the_baseline(monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)  # the default is relative to the working directory
    base = load_config(BASELINE, env={})
    for env in ({}, {"AIR_CONFIG": ""}):
        c = load_config(env=env)
        assert c.source == "configs/v2_baseline.yaml"
        assert c.config_hash == base.config_hash


def test_air_config_naming_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(env={"AIR_CONFIG": str(tmp_path / "nope.yaml")})
    assert str(exc.value) == f"config file not found: {tmp_path / 'nope.yaml'} (from AIR_CONFIG)"
    assert exc.value.exit_code == 2


def _cli(tmp_path: Path, *args: str, **env_vars: str):
    import os
    import subprocess

    from conftest import AIRATINGS

    env = {
        **os.environ,
        "AIR_DATA_DIR": str(tmp_path / "data"),
        "AIR_ARTIFACTS_DIR": str(tmp_path / "art"),
        **env_vars,
    }
    env.pop("DATABASE_URL", None)
    return subprocess.run([AIRATINGS, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_reads_air_config_and_config_option_wins(tmp_path):
    """Told apart by which file's bad key is named: no database needed, nothing written."""
    import json

    from_env = write(tmp_path, "train:\n  from_env: 1\n", "env.yaml")
    from_opt = write(tmp_path, "train:\n  from_option: 1\n", "opt.yaml")
    r = _cli(tmp_path, "migrate", "--json", AIR_CONFIG=str(from_env))
    assert r.returncode == 2
    assert "train.from_env: unknown key" in json.loads(r.stdout)["error"]
    r = _cli(tmp_path, "migrate", "--config", str(from_opt), "--json", AIR_CONFIG=str(from_env))
    assert r.returncode == 2
    error = json.loads(r.stdout)["error"]
    assert "train.from_option: unknown key" in error and "from_env" not in error
    assert not (tmp_path / "data").exists() and not (tmp_path / "art").exists()


def test_cli_air_config_naming_a_missing_file_exits_2_naming_air_config(tmp_path):
    import json

    missing = tmp_path / "nope.yaml"
    r = _cli(tmp_path, "migrate", "--json", AIR_CONFIG=str(missing))
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"] == f"config file not found: {missing} (from AIR_CONFIG)"
    assert "AIR_CONFIG" in r.stderr
    assert not (tmp_path / "data").exists()


def test_cli_help_shows_where_the_config_comes_from(tmp_path):
    r = _cli(tmp_path, "train", "--help")
    assert r.returncode == 0
    assert "[default: $AIR_CONFIG, else configs/v2_baseline.yaml]" in " ".join(r.stdout.split())
