"""The parameter table (flashrt_ros.params) and ROS params files (flashrt_ros.cli)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashrt_ros.cli import UsageError, load_params_file
from flashrt_ros.params import (POLICY_NODE_NAME, POLICY_PARAMETERS, ParameterValueError,
                                check_value, validate_overrides)


def test_good_values_are_accepted_and_coerced():
    values = validate_overrides({
        "rate_hz": 30,                      # int for a float parameter -> 30.0
        "num_steps": 5,
        "noise_seed": -1,
        "precision": "fp8",
        "camera_topics": ["cam/base/image_raw", "cam/wrist/image_raw/compressed"],
        "joint_limits_lower": [-1, -2.5],
        "publish_trajectory": False,
        "prompt": "",
    })
    assert values["rate_hz"] == 30.0 and isinstance(values["rate_hz"], float)
    assert values["joint_limits_lower"] == [-1.0, -2.5]
    assert all(isinstance(v, float) for v in values["joint_limits_lower"])
    assert values["camera_topics"][1].endswith("/compressed")
    assert values["publish_trajectory"] is False


def test_every_default_is_a_valid_value():
    for param in POLICY_PARAMETERS:
        assert check_value(param, param.default) == param.default, param.name
        assert param.description.strip(), f"{param.name} has no description"


def test_unknown_parameter_is_named():
    with pytest.raises(ParameterValueError, match=r"unknown parameter 'rate'"):
        validate_overrides({"rate": 10.0})


@pytest.mark.parametrize("name, value", [
    ("rate_hz", "fast"),
    ("rate_hz", True),                 # a bool is not a number here
    ("num_steps", 2.5),
    ("num_steps", True),
    ("publish_trajectory", "yes"),
    ("camera_topics", "camera/image_raw"),
    ("joint_names", ["a", 3]),
    ("joint_limits_lower", ["low"]),
    ("prompt", 42),
])
def test_wrong_type_is_rejected_naming_the_parameter(name, value):
    with pytest.raises(ParameterValueError, match=f"parameter '{name}' must be"):
        validate_overrides({name: value})


@pytest.mark.parametrize("name, value, bound", [
    ("rate_hz", 0.0, ">="),
    ("rate_hz", 5000.0, "<="),
    ("num_steps", -1, ">="),
    ("noise_seed", -2, ">="),
    ("max_observation_age", -0.1, ">="),
    ("action_dt", 0.0, ">="),
    ("precision", "int4", "one of"),
    ("model", "groot", "one of"),
])
def test_out_of_range_is_rejected_naming_the_parameter(name, value, bound):
    with pytest.raises(ParameterValueError, match=f"parameter '{name}' must be {bound}"):
        validate_overrides({name: value})


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_params_file_merges_wildcard_then_node_section(tmp_path):
    path = write(tmp_path, f"""
/**:
  ros__parameters:
    use_sim_time: true
    rate_hz: 10.0
/robot/{POLICY_NODE_NAME}:
  ros__parameters:
    rate_hz: 30.0
other_node:
  ros__parameters:
    rate_hz: 99.0
""")
    assert load_params_file(path) == {"use_sim_time": True, "rate_hz": 30.0}


def test_params_file_nested_names_are_dotted(tmp_path):
    path = write(tmp_path, f"{POLICY_NODE_NAME}:\n  ros__parameters:\n    a:\n      b: 1\n")
    assert load_params_file(path) == {"a.b": 1}
    with pytest.raises(ParameterValueError, match="unknown parameter 'a.b'"):
        validate_overrides(load_params_file(path))


@pytest.mark.parametrize("text, message", [
    ("rate_hz: [1\n", "not valid YAML"),
    ("- 1\n- 2\n", "must map node names"),
    ("some_camera_driver:\n  ros__parameters: {fps: 30}\n", "no section for node"),
    (f"{POLICY_NODE_NAME}:\n  rate_hz: 10.0\n", "must contain 'ros__parameters:'"),
])
def test_malformed_params_file_says_what_is_wrong(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        load_params_file(write(tmp_path, text))


def test_missing_params_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read params file"):
        load_params_file(tmp_path / "absent.yaml")


def _readme_parameter_rows() -> list[tuple[str, str, bool]]:
    """(name, default cell, read-only) per parameter of README.md's parameter table; a row
    naming several parameters gives one entry each."""
    lines = (Path(__file__).parent.parent / "README.md").read_text().splitlines()
    start = lines.index("| parameter | default | read-only | what |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        names, default, read_only = (cell.strip() for cell in line.strip("|").split("|")[:3])
        for name in names.split(","):
            rows.append((name.strip().strip("`"), default.strip("`"), read_only == "yes"))
    return rows


def _readme_default(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def test_readme_parameter_table_matches_the_declarations():
    """README.md lists every parameter once, in declaration order, with its default and
    whether it is read-only: the table cannot drift from flashrt_ros/params.py."""
    expected = [(p.name, _readme_default(p.default), p.read_only) for p in POLICY_PARAMETERS]
    assert _readme_parameter_rows() == expected
