"""Unit tests for ``retrain.config`` and the ``retrain config check`` command.

Each bad configuration lives in ``configs/<case>.yaml`` and is checked twice: through
:func:`load_settings` (the exact dotted key and a fragment of the reason in
``ConfigError.problems``) and through the CLI (exit code 2, the key and reason on stderr).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner, Result

from retrain import cli
from retrain.cli import app
from retrain.config import ConfigError, Settings, load_settings

pytestmark = pytest.mark.unit

HERE = Path(__file__).parent
CONFIGS = HERE / "configs"
SHIPPED = HERE.parents[1] / "retrain.yaml"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_SPACE = re.compile(r"\s+")


def compact(text: str) -> str:
    """``text`` without ANSI codes or any whitespace.

    rich wraps (and folds long words) at the console width, which under CliRunner is not a
    terminal's; comparing without whitespace makes assertions independent of where it broke.
    """
    return _SPACE.sub("", _ANSI.sub("", text))


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run ``retrain *args`` in-process, without any RETRAIN_CONFIG from the caller's shell.

    COLUMNS widens typer's help, whose console is made per call (not the command's own).
    """
    base: dict[str, str | None] = {"RETRAIN_CONFIG": None, "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env={**base, **(env or {})})


def problems_of(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.path == path
    return info.value.problems


# case (= file name in configs/), dotted key, fragment of the reason
BAD_CONFIGS: list[tuple[str, str, str]] = [
    ("unknown_top_level_key", "colour", "unknown key"),
    ("unknown_nested_key", "models.rainfall.gate.treshold", "unknown key"),
    ("string_for_number", "delivery.max_delivery_attempts", "valid integer (got str '5')"),
    ("list_for_mapping", "buckets", "valid dictionary or instance of Buckets (got list"),
    ("bad_cron", "models.rainfall.schedule.cron", "'0 25 * * *' is not a valid 5-field cron"),
    ("six_field_cron", "models.rainfall.schedule.cron", "not a valid 5-field cron expression"),
    ("negative_training_window", "models.rainfall.training_window.rows", "greater than 0"),
    ("missing_label", "models.rainfall.label", "required key is missing"),
    ("invalid_yaml", "line 10, column 18", "not valid YAML: mapping values are not allowed"),
    ("not_a_mapping", "(top level)", "expected a mapping"),
    ("empty_file", "(top level)", "expected a mapping"),
    ("unknown_estimator", "models.rainfall.estimator.name", "unknown estimator 'XGBClassifier'"),
    ("unknown_metric", "models.rainfall.gate.thresholds.f1", "unknown key; expected 'roc_auc'"),
    ("min_backoff_above_max", "delivery", "min_backoff_seconds (30.0) must not exceed"),
    ("non_loopback_host", "local.host", "'0.0.0.0' is not a loopback address"),
    ("duplicate_ports", "local.ports", "port 8085 is given to both pubsub and gcs"),
    ("overlapping_prefixes", "models", "'rainfall/recent/') overlaps that of 'rainfall'"),
    ("too_few_delivery_attempts", "delivery.max_delivery_attempts", "greater than or equal to 5"),
    ("bad_bucket_name", "buckets.data", "'Retrain_Data!' is not a valid bucket name"),
    ("label_is_order_column", "models.rainfall", "label and order_column are both 'day'"),
    ("kfp_without_host", "(top level)", "backend kfp needs gcp.kfp.host"),
    ("bad_service_account", "gcp.pipeline_service_account", "is not a service account email"),
    ("canary_of_100_percent", "gcp.endpoint.canary_percent", "less than or equal to 99"),
    ("bad_job_label", "gcp.labels", "label Team='ml': keys start with a lowercase letter"),
    ("registry_bucket_is_data_bucket", "buckets",
     "registry: 'retrain-data' is also the data or artifacts bucket"),
    ("default_registry_name_too_long", "buckets",
     "the default 'retrain-artifacts-of-the-rainfall-model-in-production-eu1-registry' is "
     "not a valid bucket name; name the registry bucket"),
    ("bad_database", "database", "'Retrain_Ledger' is not a valid Firestore database id"),
    ("sweep_seconds_too_short", "sweep_seconds", "greater than or equal to 5"),
]  # fmt: skip

SEVERAL_PROBLEMS: dict[str, str] = {
    "colour": "unknown key",
    "buckets.data": "not a valid bucket name",
    "delivery.max_delivery_attempts": "valid integer",
    "models.rainfall.label": "required key is missing",
    "models.rainfall.training_window.rows": "greater than 0",
    "models.rainfall.estimator.name": "unknown estimator",
}

bad_config = pytest.mark.parametrize(
    ("case", "key", "reason"), BAD_CONFIGS, ids=[case for case, _, _ in BAD_CONFIGS]
)


def test_every_fixture_is_a_case() -> None:
    on_disk = {path.stem for path in CONFIGS.glob("*.yaml")}
    listed = {case for case, _, _ in BAD_CONFIGS} | {"several_problems"}
    assert on_disk == listed


# --- load_settings ---------------------------------------------------------------------------


def test_shipped_config_loads() -> None:
    settings = load_settings(SHIPPED)
    assert list(settings.models) == ["rainfall"]
    rainfall = settings.models["rainfall"]
    assert rainfall.data_prefix == "rainfall/"
    assert (rainfall.label, rainfall.order_column) == ("rain", "day")
    assert settings.buckets.data == "retrain-data"
    assert settings.buckets.models == "retrain-registry"
    assert (settings.database, settings.sweep_seconds) == ("retrain", 600)
    assert settings.local.ports.firestore == 8086
    assert settings.local.state_dir == (SHIPPED.parent / ".retrain").resolve()


@bad_config
def test_bad_config_names_key_and_reason(case: str, key: str, reason: str) -> None:
    problems = problems_of(CONFIGS / f"{case}.yaml")
    assert len(problems) == 1, problems
    [(got_key, got_reason)] = problems
    assert got_key == key
    assert reason in got_reason


def test_missing_file(tmp_path: Path) -> None:
    problems = problems_of(tmp_path / "absent.yaml")
    assert problems == [("(file)", "cannot read: No such file or directory")]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    [(key, reason)] = problems_of(tmp_path)
    assert key == "(file)"
    assert reason.startswith("cannot read:")


def test_several_problems_are_all_reported() -> None:
    problems = problems_of(CONFIGS / "several_problems.yaml")
    assert len(problems) == len(SEVERAL_PROBLEMS), problems
    reasons = dict(problems)
    assert set(reasons) == set(SEVERAL_PROBLEMS)
    for key, fragment in SEVERAL_PROBLEMS.items():
        assert fragment in reasons[key], (key, reasons[key])


def test_config_error_message_lists_every_problem() -> None:
    path = CONFIGS / "several_problems.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {len(SEVERAL_PROBLEMS)} problem(s)\n")
    for key in SEVERAL_PROBLEMS:
        assert f"\n  {key}: " in message


# --- state_dir -------------------------------------------------------------------------------


RAINFALL: dict[str, object] = {"data_prefix": "rainfall/", "label": "rain", "order_column": "day"}


def minimal_config(**overrides: object) -> dict[str, object]:
    config: dict[str, object] = {
        "project": "retrain-local",
        "buckets": {"data": "retrain-data", "artifacts": "retrain-artifacts"},
        "models": {"rainfall": RAINFALL},
    }
    config.update(overrides)
    return config


def write_config(path: Path, config: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("local", "expected"),
    [
        pytest.param({}, "conf/.retrain", id="default"),
        pytest.param({"state_dir": "state"}, "conf/state", id="relative"),
        pytest.param({"state_dir": "../shared/state"}, "shared/state", id="parent"),
    ],
)
def test_state_dir_is_relative_to_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local: dict[str, str], expected: str
) -> None:
    path = write_config(tmp_path / "conf" / "retrain.yaml", minimal_config(local=local))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    state_dir = load_settings(path).local.state_dir
    assert state_dir.is_absolute()
    assert state_dir == (tmp_path / expected).resolve()


def test_state_dir_relative_path_to_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path / "conf" / "retrain.yaml", minimal_config(local={"state_dir": "s"}))
    monkeypatch.chdir(tmp_path)
    settings = load_settings(Path("conf/retrain.yaml"))
    assert settings.local.state_dir == (tmp_path / "conf" / "s").resolve()


def test_absolute_state_dir_is_kept(tmp_path: Path) -> None:
    absolute = tmp_path / "somewhere" / "state"
    config = minimal_config(local={"state_dir": str(absolute)})
    path = write_config(tmp_path / "retrain.yaml", config)
    assert load_settings(path).local.state_dir == absolute


# --- the registry bucket, the database and the sweep -----------------------------------------


def test_the_registry_bucket_defaults_to_one_of_its_own() -> None:
    settings = Settings.model_validate(minimal_config())
    assert settings.buckets.registry is None
    assert settings.buckets.models == "retrain-artifacts-registry"
    assert settings.database == "retrain"
    named = minimal_config(buckets={"data": "retrain-data", "artifacts": "retrain-artifacts",
                                    "registry": "models-only"})  # fmt: skip
    assert Settings.model_validate(named).buckets.models == "models-only"


@pytest.mark.parametrize("database", ["(default)", "ledger", "a-1-b"])
def test_valid_database_ids(database: str) -> None:
    assert Settings.model_validate(minimal_config(database=database)).database == database


@pytest.mark.parametrize(("seconds", "ok"), [(4, False), (5, True), (3600, True), (3601, False)])
def test_sweep_seconds_range(tmp_path: Path, seconds: int, ok: bool) -> None:
    path = write_config(tmp_path / "retrain.yaml", minimal_config(sweep_seconds=seconds))
    if ok:
        assert load_settings(path).sweep_seconds == seconds
    else:
        [(key, _)] = problems_of(path)
        assert key == "sweep_seconds"


def test_run_prefix_is_under_the_artifacts_bucket() -> None:
    settings = Settings.model_validate(minimal_config())
    assert settings.run_prefix("rainfall", "r-1") == "gs://retrain-artifacts/runs/rainfall/r-1"


# --- Settings.model_for_object ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models() -> Settings:
    return Settings.model_validate(
        minimal_config(
            models={
                "rainfall": RAINFALL,
                "churn": {"data_prefix": "crm/churn/", "label": "churned", "order_column": "ts"},
            }
        )
    )


@pytest.mark.parametrize(
    ("bucket", "name", "model"),
    [
        ("retrain-data", "rainfall/2024-06-01.csv", "rainfall"),
        ("retrain-data", "rainfall/nested/deeper/part-0.csv", "rainfall"),
        ("retrain-data", "crm/churn/batch-7.csv", "churn"),
        ("retrain-artifacts", "rainfall/2024-06-01.csv", None),
        ("other-bucket", "crm/churn/batch-7.csv", None),
        ("retrain-data", "sales/2024-06-01.csv", None),
        ("retrain-data", "crm/other/batch-7.csv", None),
        ("retrain-data", "rainfall-extra/2024-06-01.csv", None),
        ("retrain-data", "rainfall", None),
        ("retrain-data", "nested/rainfall/x.csv", None),
    ],
)
def test_model_for_object(two_models: Settings, bucket: str, name: str, model: str | None) -> None:
    assert two_models.model_for_object(bucket, name) == model


# --- retrain config check --------------------------------------------------------------------


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give the CLI's consoles a fixed wide width.

    They are made at import, so COLUMNS in ``invoke(env=...)`` comes too late; in a narrow
    terminal rich shortens table cells with an ellipsis, which no whitespace folding undoes.
    """
    monkeypatch.setattr(cli, "out", Console(width=200, highlight=False))
    monkeypatch.setattr(cli, "err", Console(stderr=True, width=200, highlight=False))


@pytest.mark.usefixtures("wide_console")
def test_cli_shipped_config_passes() -> None:
    result = invoke("config", "check", str(SHIPPED))
    assert result.exit_code == 0, result.output
    text = compact(result.stdout)
    assert compact(f"OK {SHIPPED}") in text
    assert "modelrainfall" in text
    assert "gs://retrain-data/rainfall/" in text
    assert result.stderr == ""


@bad_config
def test_cli_bad_config_exits_2_naming_key(case: str, key: str, reason: str) -> None:
    path = CONFIGS / f"{case}.yaml"
    result = invoke("config", "check", str(path))
    assert result.exit_code == 2, result.output
    errors = compact(result.stderr)
    assert compact(f"{path}: 1 problem(s)") in errors
    assert compact(key) in errors
    assert compact(reason) in errors
    assert result.stdout == ""


def test_cli_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    result = invoke("config", "check", str(path))
    assert result.exit_code == 2, result.output
    assert compact("(file): cannot read: No such file or directory") in compact(result.stderr)


def test_cli_several_problems_are_all_reported() -> None:
    result = invoke("config", "check", str(CONFIGS / "several_problems.yaml"))
    assert result.exit_code == 2, result.output
    errors = compact(result.stderr)
    assert compact(f"{len(SEVERAL_PROBLEMS)} problem(s)") in errors
    for key, fragment in SEVERAL_PROBLEMS.items():
        assert compact(f"{key}: ") in errors
        assert compact(fragment) in errors


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("option", id="--config"),
        pytest.param("env", id="RETRAIN_CONFIG"),
        pytest.param("cwd", id="default-file"),
    ],
)
def test_cli_finds_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    bad = CONFIGS / "unknown_top_level_key.yaml"
    if how == "option":
        result = invoke("config", "check", "--config", str(bad))
    elif how == "env":
        result = invoke("config", "check", env={"RETRAIN_CONFIG": str(bad)})
    else:
        (tmp_path / "retrain.yaml").write_bytes(bad.read_bytes())
        monkeypatch.chdir(tmp_path)
        result = invoke("config", "check")
    assert result.exit_code == 2, result.output
    assert compact("colour: unknown key") in compact(result.stderr)


def test_cli_argument_wins_over_config_option() -> None:
    result = invoke(
        "config", "check", str(SHIPPED), "--config", str(CONFIGS / "bad_bucket_name.yaml")
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["--help"], ["Event-driven retraining", "config"], id="retrain"),
        pytest.param(["config", "--help"], ["validate retrain.yaml", "check"], id="config"),
        pytest.param(
            ["config", "check", "--help"],
            ["Validate a config file", "--config", "RETRAIN_CONFIG"],
            id="config-check",
        ),
    ],
)
def test_cli_help(args: list[str], expected: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    text = compact(result.output)
    assert "Usage:" in text
    for fragment in expected:
        assert compact(fragment) in text


# --- bugs found in review, fixed; these keep them fixed ------------------------------------


def test_cli_prints_keys_verbatim() -> None:
    result = invoke("config", "check", str(CONFIGS / "unknown_metric.yaml"))
    assert "models.rainfall.gate.thresholds.f1:unknownkey" in compact(result.stderr)


def test_cli_survives_markup_in_values(tmp_path: Path) -> None:
    config = minimal_config(buckets={"data": "data[/]", "artifacts": "retrain-artifacts"})
    path = write_config(tmp_path / "retrain.yaml", config)
    result = invoke("config", "check", str(path))
    assert result.exit_code == 2, result.output
    assert "'data[/]' is not a valid bucket name" in result.stderr


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "retrain.yaml"
    path.write_bytes(b"project: retrain-local\nregion: \xff\xfe\n")
    [(key, reason)] = problems_of(path)
    assert key == "(file)"
    assert "UTF-8" in reason


def test_unknown_timezone_is_rejected(tmp_path: Path) -> None:
    schedule = {"cron": "0 3 * * *", "timezone": "Mars/Olympus_Mons"}
    config = minimal_config(models={"rainfall": {**RAINFALL, "schedule": schedule}})
    [(key, _)] = problems_of(write_config(tmp_path / "retrain.yaml", config))
    assert key == "models.rainfall.schedule.timezone"


def test_key_given_twice_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "retrain.yaml"
    path.write_text("project: retrain-local\nproject: other-project\n", encoding="utf-8")
    [(key, reason)] = problems_of(path)
    assert key == "line 2, column 1"
    assert "key 'project' is given twice" in reason
