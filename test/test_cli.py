"""The installed `flashrt-ros` command, run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from policy_harness import action_names, joint_names, tiny_checkpoint, tiny_spec  # noqa: F401

from flashrt_ros import cli
from flashrt_ros.params import SUPPORTED_POLICY_MODELS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
# One params file per policy model, named after it.
POLICY_CONFIGS = [CONFIG_DIR / f"{model}.yaml" for model in SUPPORTED_POLICY_MODELS]


def flashrt_ros(command: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([command, *map(str, args)], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def checkpoint_dir(tmp_path) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    return path


def params_file(tmp_path, body: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("flashrt_policy:\n  ros__parameters:\n" +
                    "".join(f"    {line}\n" for line in body.splitlines()))
    return path


def run_with_params(body: str, model: str = "pi05"):
    """Arguments of `run MODEL --checkpoint DIR --params FILE` with `body` as the params."""
    return lambda d, t: ["run", model, "--checkpoint", d, "--params", params_file(t, body)]


BAD_INPUTS = {
    "unsupported model": (lambda d, t: ["run", "groot_n99", "--checkpoint", d],
                          "unsupported model 'groot_n99'"),
    "missing checkpoint": (lambda d, t: ["run", "pi05", "--checkpoint", d / "absent"],
                           "does not exist"),
    "checkpoint is a file": (lambda d, t: ["run", "pi05", "--checkpoint", t / "f.txt"],
                             "is not a directory"),
    "no checkpoint": (lambda d, t: ["run", "pi05"], "no checkpoint"),
    "unknown key in params": (run_with_params("rate_hz: 20.0\nrate: 10.0"),
                              "unknown parameter 'rate'"),
    "wrong type in params": (run_with_params("camera_topics: cam/image_raw"),
                             "parameter 'camera_topics' must be a list of strings"),
    "out of range in params": (run_with_params("rate_hz: 0.0"),
                               "parameter 'rate_hz' must be >="),
    "unreadable YAML": (run_with_params("joint_names: [a, b"), "not valid YAML"),
    "params file missing": (
        lambda d, t: ["run", "pi05", "--checkpoint", d, "--params", t / "none.yaml"],
        "cannot read params file"),
    "params model differs": (run_with_params("model: pi05", model="pi0"),
                             "model 'pi05' but the command says 'pi0'"),
    "--set without '='": (lambda d, t: ["run", "pi05", "--checkpoint", d, "--set", "rate_hz"],
                          "--set expects name=value"),
    "--set wrong type": (
        lambda d, t: ["run", "pi05", "--checkpoint", d, "--set", "num_steps=many"],
        "parameter 'num_steps' must be an integer"),
    "unknown subcommand": (lambda d, t: ["fly"], "invalid choice: 'fly'"),
    "demo duration": (lambda d, t: ["demo", "--duration", "0"], "--duration must be > 0"),
    "unknown executor": (lambda d, t: ["demo", "--executor", "multi-threaded"],
                         "invalid choice: 'multi-threaded'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, flashrt_ros_command, checkpoint_dir, tmp_path):
    (tmp_path / "f.txt").write_text("not a checkpoint")
    make_args, expected = BAD_INPUTS[case]
    result = flashrt_ros(flashrt_ros_command, *make_args(checkpoint_dir, tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flashrt-ros: error: ")
    assert expected in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("path", POLICY_CONFIGS, ids=lambda p: p.name)
def test_run_check_accepts_shipped_config(path, flashrt_ros_command, checkpoint_dir):
    result = flashrt_ros(flashrt_ros_command, "run", path.stem, "--checkpoint", checkpoint_dir,
                         "--params", path, "--set", "rate_hz=15", "--check")
    assert result.returncode == 0, result.stderr
    assert f"{path.stem} on {checkpoint_dir}" in result.stdout


def test_set_wins_over_params_file(checkpoint_dir, tmp_path):
    args = cli.build_parser().parse_args(
        ["run", "pi05", "--checkpoint", str(checkpoint_dir),
         "--params", str(params_file(tmp_path, "rate_hz: 5.0\nprompt: from file")),
         "--set", "rate_hz=40", "--set", "use_sim_time=true"])
    model, checkpoint, values = cli.resolve_run(args)
    assert (model, checkpoint) == ("pi05", checkpoint_dir.resolve())
    assert values == {"rate_hz": 40.0, "prompt": "from file", "use_sim_time": True}


@pytest.mark.ros
def test_an_unknown_executor_in_the_environment_is_refused(monkeypatch):
    from flashrt_ros import launcher

    monkeypatch.setenv("FLASHRT_EXECUTOR", "multi-threaded")
    with pytest.raises(ValueError, match="'multi-threaded': expected one of single-threaded, events"):
        launcher.Spinner([])


@pytest.mark.ros
def test_events_executor_without_rclpy_support_is_a_clear_error(monkeypatch):
    import sys

    from flashrt_ros import launcher

    monkeypatch.setitem(sys.modules, "rclpy.experimental", None)  # as on rclpy < 7.1.4
    with pytest.raises(RuntimeError, match="this rclpy has no EventsExecutor"):
        launcher.make_executor("events")


def test_missing_delegate_module_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli._import("flashrt_ros.no_such_module", "the thing")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flashrt-ros: error: the thing is not available in this build "
                   "(flashrt_ros.no_such_module is missing)"]


def test_doctor_prints_every_section(flashrt_ros_command):
    result = flashrt_ros(flashrt_ros_command, "doctor")
    assert result.returncode == 0, result.stderr
    labels = {line.split(":", 1)[0] for line in result.stdout.splitlines()}
    assert {"python", "torch", "cuda kernels", "ros distro", "rclpy", "rmw", "executor"} <= labels
    executor = next(line for line in result.stdout.splitlines() if line.startswith("executor:"))
    assert executor.split()[1] == (os.environ.get("FLASHRT_EXECUTOR") or "single-threaded"), executor
    assert "gpu" in labels or any(label.startswith("gpu ") for label in labels)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in result.stdout
    if "gpu:" in result.stdout:
        assert "no CUDA device" in result.stdout
    else:
        assert "compute capability" in result.stdout


def test_doctor_probes_host_pauses_on_request(flashrt_ros_command):
    result = flashrt_ros(flashrt_ros_command, "doctor", "--host-pauses", "0.5")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("host pauses:"))
    assert re.search(r"host pauses: +\d+ wake-ups over 5 ms late in 0.5 s \(longest [\d.]+ ms\); "
                     r"lateness p99 [\d.]+ ms", line), line
    assert "host pauses:" not in flashrt_ros(flashrt_ros_command, "doctor").stdout
    bad = flashrt_ros(flashrt_ros_command, "doctor", "--host-pauses", "-1")
    assert bad.returncode == 2 and "--host-pauses must be >= 0" in bad.stderr


def test_doctor_reports_an_invalid_executor_instead_of_failing(flashrt_ros_command):
    result = subprocess.run([flashrt_ros_command, "doctor"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "FLASHRT_EXECUTOR": "multi-threaded"})
    assert result.returncode == 0, result.stderr
    assert "executor:      invalid (FLASHRT_EXECUTOR='multi-threaded'" in result.stdout


def test_help_lists_the_subcommands(flashrt_ros_command):
    result = flashrt_ros(flashrt_ros_command, "--help")
    assert result.returncode == 0
    for name in ("run", "demo", "bench", "doctor"):
        assert name in result.stdout


def test_node_help_describes_the_node_and_starts_none(flashrt_ros_command):
    result = flashrt_ros(flashrt_ros_command, "node", "--help")
    assert result.returncode == 0
    assert "--ros-args" in result.stdout and "unconfigured policy node" in result.stdout


@pytest.mark.ros
def test_node_subcommand_passes_ros_args_to_the_node(flashrt_ros_command, rclpy_context):
    """What launch files run: `flashrt-ros node --ros-args ...` spins a policy node
    named by the remap until SIGINT."""
    import rclpy

    process = subprocess.Popen([flashrt_ros_command, "node", "--ros-args",
                                "-r", "__node:=cli_probe", "-r", "__ns:=/cli_test"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    observer = rclpy.create_node("cli_observer", context=rclpy_context)
    try:
        deadline = time.monotonic() + 30.0
        seen = False
        while not seen and time.monotonic() < deadline and process.poll() is None:
            seen = ("cli_probe", "/cli_test") in observer.get_node_names_and_namespaces()
            time.sleep(0.2)
    finally:
        observer.destroy_node()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert seen, f"the node never appeared in the ROS graph; its output:\n{output}"
    assert process.returncode == 0, output


class OutputWatcher:
    """Collects a process's output lines in a thread; wait(text) until one contains it."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait(self, text: str, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: any(text in line for line in self.lines),
                                          timeout=timeout)

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


def start_run(command: str, *args) -> tuple[subprocess.Popen, OutputWatcher]:
    process = subprocess.Popen([command, "run", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    return process, OutputWatcher(process)


@pytest.mark.ros
@pytest.mark.parametrize("executor", [[], ["--executor", "events"]], ids=["default", "events"])
def test_run_brings_the_node_to_active_and_down_on_sigint(
        flashrt_ros_command, tiny_checkpoint, joint_names, action_names, tmp_path, executor):
    params = params_file(tmp_path, f"device: cpu\njoint_names: {joint_names}\n"
                                   f"action_names: {action_names}")
    process, output = start_run(flashrt_ros_command, "pi05", "--checkpoint", tiny_checkpoint,
                                "--params", params, "--set", "rate_hz=5", *executor)
    try:
        active = output.wait("active: inference at 5 Hz", timeout=120)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    log = output.text()
    assert active, log
    assert process.returncode == 0, log
    assert "cleaned up" in log and "Traceback" not in log


@pytest.mark.ros
def test_run_on_a_directory_that_is_no_checkpoint_fails_cleanly(flashrt_ros_command,
                                                                checkpoint_dir):
    process, output = start_run(flashrt_ros_command, "pi05", "--checkpoint", checkpoint_dir,
                                "--set", "device=cpu")
    process.wait(timeout=120)
    log = output.text()
    assert process.returncode == 1, log
    assert "configure failed" in log and "Traceback" not in log
