from jobs import db


def test_migrated_db_has_runs_table(cfg):
    with db.connect(cfg) as conn:
        assert conn.execute("select to_regclass('airatings.model_training_runs')").fetchone()[0]
