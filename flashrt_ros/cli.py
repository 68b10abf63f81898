"""The `flashrt-ros` command: run | demo | bench | doctor | node.

`run` validates everything it is given (model, checkpoint directory, params YAML,
--set overrides) before any ROS machinery starts, so a typo costs one line on stderr
and exit code 2, not a traceback from deep inside a node.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

from flashrt_ros.params import (BOOL, EXECUTOR_ENV, EXECUTORS, POLICY_NODE_NAME,
                                POLICY_PARAMETERS_BY_NAME, SUPPORTED_POLICY_MODELS, Param,
                                ParameterValueError, executor_kind, validate_overrides)

PROG = "flashrt-ros"
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1

# rclpy declares use_sim_time on every node; a params file may set it.
USE_SIM_TIME = Param("use_sim_time", BOOL, False, "Use /clock instead of the system clock.")
RUN_PARAMETERS = {**POLICY_PARAMETERS_BY_NAME, USE_SIM_TIME.name: USE_SIM_TIME}


class UsageError(Exception):
    """Bad input on the command line or in a file it names (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump) and exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see '{self.prog} --help')", EXIT_BAD_INPUT)


def fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


# --- params files ------------------------------------------------------------------

def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """ROS nests parameter names in YAML (`a: {b: 1}` is parameter `a.b`)."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _section_applies(key: str, node_name: str) -> bool:
    """Whether a top-level key of a ROS params file addresses `node_name`
    (`/**`, `node`, `/node`, `/ns/node`, `/**/node`)."""
    return key == "/**" or key.lstrip("/") == node_name or key.endswith("/" + node_name)


def load_params_file(path: str | os.PathLike, node_name: str = POLICY_NODE_NAME) -> dict[str, Any]:
    """Parameter values for `node_name` from a ROS params YAML
    (`<node or /**>: {ros__parameters: {...}}`), wildcard sections first, so the
    node's own section wins. Raises UsageError naming the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read params file {path}: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"params file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(document, dict):
        raise UsageError(f"params file {path} must map node names to "
                         "{ros__parameters: {...}}")
    sections = [key for key in document if _section_applies(str(key), node_name)]
    if not sections:
        found = ", ".join(str(k) for k in document) or "nothing"
        raise UsageError(f"params file {path} has no section for node '{node_name}' "
                         f"(found: {found})")
    values: dict[str, Any] = {}
    for key in sorted(sections, key=lambda k: str(k) != "/**"):
        section = document[key]
        if not isinstance(section, dict) or not isinstance(section.get("ros__parameters"), dict):
            raise UsageError(f"params file {path}: section '{key}' must contain "
                             "'ros__parameters:' with a mapping of parameters")
        values.update(_flatten(section["ros__parameters"]))
    return values


def parse_set_option(text: str) -> tuple[str, Any]:
    """`name=value` with the value read as YAML (as `ros2 param set` does)."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise UsageError(f"--set expects name=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        raise UsageError(f"--set {name}: cannot parse value {raw!r}") from None
    return name.strip(), value


# --- subcommands -------------------------------------------------------------------

def _import(module: str, what: str):
    """Import a module a subcommand delegates to, or fail with one line."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and module.startswith(missing):
            fail(f"{what} is not available in this build ({module} is missing)", EXIT_FAILURE)
        fail(f"{what} cannot start: {exc}", EXIT_FAILURE)


def resolve_run(args: argparse.Namespace) -> tuple[str, Path, dict[str, Any]]:
    """Validate `run`'s inputs; return (model, checkpoint, other parameter values)."""
    if args.model not in SUPPORTED_POLICY_MODELS:
        raise UsageError(f"unsupported model '{args.model}' "
                         f"(supported: {', '.join(SUPPORTED_POLICY_MODELS)})")
    values: dict[str, Any] = {}
    if args.params:
        values.update(load_params_file(args.params))
    for item in args.set:
        name, value = parse_set_option(item)
        values[name] = value
    try:
        values = validate_overrides(values, RUN_PARAMETERS)
    except ParameterValueError as exc:
        raise UsageError(str(exc)) from None
    file_model = values.pop("model", args.model)
    if file_model != args.model:
        raise UsageError(f"the params say model '{file_model}' but the command says "
                         f"'{args.model}'")
    checkpoint = args.checkpoint or values.get("checkpoint")
    values.pop("checkpoint", None)
    if not checkpoint:
        raise UsageError("no checkpoint: pass --checkpoint PATH (or set 'checkpoint' "
                         "in the params file)")
    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.exists():
        raise UsageError(f"checkpoint directory {checkpoint} does not exist")
    if not checkpoint.is_dir():
        raise UsageError(f"checkpoint {checkpoint} is not a directory")
    return args.model, checkpoint.resolve(), values


def use_executor(args: argparse.Namespace) -> None:
    """--executor: for this process and what it starts (the demo's robot process)."""
    if args.executor:
        os.environ[EXECUTOR_ENV] = args.executor


def cmd_run(args: argparse.Namespace) -> int:
    use_executor(args)
    model, checkpoint, values = resolve_run(args)
    if args.check:
        print(f"{PROG}: {model} on {checkpoint}: {len(values)} parameter(s) OK")
        return 0
    launcher = _import("flashrt_ros.launcher", "the policy runner")
    return launcher.run_policy(model, str(checkpoint), values)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.duration <= 0:
        raise UsageError(f"--duration must be > 0, got {args.duration}")
    if args.model not in SUPPORTED_POLICY_MODELS:
        raise UsageError(f"unsupported model '{args.model}' "
                         f"(supported: {', '.join(SUPPORTED_POLICY_MODELS)})")
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise UsageError(f"checkpoint directory not found: {args.checkpoint}")
    for name in ("rate", "robot_rate"):
        if not 0 < getattr(args, name) <= 1000:
            raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1000], got {getattr(args, name)}")
    use_executor(args)
    demo = _import("flashrt_ros.demo", "the demo")
    return demo.main(duration=args.duration, model=args.model, checkpoint=args.checkpoint, rate_hz=args.rate,
                     device=args.device, precision=args.precision, robot_rate_hz=args.robot_rate,
                     json_path=args.json, robot=args.robot, host_probe=not args.no_host_probe)


def cmd_bench(argv: list[str]) -> int:
    bench = _import("flashrt_core.bench", "the benchmark")
    return bench.main(argv)


NODE_USAGE = f"""usage: {PROG} node [-h] [--ros-args ...]

Spin one unconfigured policy node until SIGINT / SIGTERM (what the launch files run);
launch or a lifecycle manager drives its transitions. Everything after --ros-args goes to
ROS: remaps (-r __node:=NAME), parameters (-p NAME:=VALUE, --params-file FILE). The
parameters are listed in README.md and config/<model>.yaml."""


def cmd_node(argv: list[str]) -> int:
    own = argv[:argv.index("--ros-args")] if "--ros-args" in argv else argv
    if "-h" in own or "--help" in own:
        print(NODE_USAGE)
        return 0
    policy_node = _import("flashrt_ros.policy_node", "the policy node")
    return policy_node.main(argv)


# Subcommands whose arguments all belong to what they start (the benchmark's own
# options; the node's --ros-args ...): passed on untouched, argparse never sees them.
PASSTHROUGH_COMMANDS = {"bench": cmd_bench, "node": cmd_node}


def _version_of(*distributions: str) -> str | None:
    from importlib import metadata
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _doctor_torch() -> list[tuple[str, str]]:
    try:
        import torch
    except ImportError as exc:
        return [("torch", f"not importable ({exc})"), ("gpu", "unknown (no torch)")]
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    lines = [("torch", f"{torch.__version__} ({build})")]
    if not torch.cuda.is_available():
        return lines + [("gpu", "no CUDA device")]
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        lines.append((f"gpu {index}", f"{torch.cuda.get_device_name(index)}, "
                                      f"compute capability {major}.{minor}"))
    return lines


def _doctor_kernels() -> str:
    if os.environ.get("FLASHRT_DISABLE_KERNELS") == "1":
        return "disabled (FLASHRT_DISABLE_KERNELS=1): PyTorch twins"
    try:
        from flashrt_core import kernels
    except ImportError:
        try:
            module = importlib.import_module("flashrt_core._kernels")
        except ImportError as exc:
            return f"not built ({exc}): PyTorch twins"
        return f"built ({module.__file__})"
    if kernels.available():
        archs = ", ".join(f"sm_{a}" for a in kernels.compiled_archs())
        return f"built ({archs})"
    return f"not available: {kernels.unavailable_reason()}; PyTorch twins"


def _doctor_ros() -> list[tuple[str, str]]:
    distro = os.environ.get("ROS_DISTRO", "unknown (ROS_DISTRO not set)")
    try:
        import rclpy
        from rclpy.utilities import get_rmw_implementation_identifier
    except ImportError as exc:
        return [("ros distro", distro), ("rclpy", f"not importable ({exc})"),
                ("rmw", "unknown")]
    version = _version_of("rclpy", "ros-jazzy-rclpy") or "version unknown"
    try:
        rmw = get_rmw_implementation_identifier()
    except Exception as exc:  # the RMW library itself failed to load
        rmw = f"failed to load ({exc})"
    try:
        from rclpy.experimental import EventsExecutor  # noqa: F401 - availability only
        events = "events available (--executor events)"
    except ImportError:
        events = "events not in this rclpy (7.1.4+)"
    try:
        chosen = executor_kind()
    except ValueError as exc:
        chosen = f"invalid ({exc})"
    return [("ros distro", distro),
            ("rclpy", f"{version} ({Path(rclpy.__file__).parent})"),
            ("rmw", rmw),
            ("executor", f"{chosen} (${EXECUTOR_ENV}); {events}")]


def doctor_report() -> list[tuple[str, str]]:
    """(label, value) lines describing this machine for bug reports."""
    lines = [("python", f"{platform.python_version()} ({sys.executable})")]
    lines += _doctor_torch()
    lines.append(("cuda kernels", _doctor_kernels()))
    lines += _doctor_ros()
    return lines


def host_pause_line(seconds: float) -> str:
    """doctor --host-pauses: the host-pause probe (flashrt_ros/host_pauses.py) for
    `seconds` in this process: whether the host stops processes for longer than a
    control period's slack."""
    from flashrt_ros.host_pauses import THRESHOLD_S, probe

    result = probe(seconds)
    line = (f"{len(result.pauses)} wake-ups over {THRESHOLD_S * 1e3:g} ms late in {seconds:g} s "
            f"(longest {result.longest_s * 1e3:.1f} ms); lateness p99 {result.late_p99_s * 1e3:.2f} ms")
    extras = [f"{name} {value:.2f}%" for name, value in (("steal", result.steal_percent),
                                                          ("CPU pressure", result.cpu_pressure_percent))
              if value is not None]
    return line + ("; " + ", ".join(extras) if extras else "")


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.host_pauses < 0:
        raise UsageError(f"--host-pauses must be >= 0, got {args.host_pauses}")
    for label, value in doctor_report():
        print(f"{label + ':':<15}{value}", flush=True)
    if args.host_pauses:
        print(f"{'host pauses:':<15}{host_pause_line(args.host_pauses)}")
    return 0


EXECUTOR_HELP = (f"rclpy executor spinning the node: {EXECUTORS[0]} (default) or events "
                 f"(rclpy.experimental.EventsExecutor, less executor CPU per callback); "
                 f"launch files read ${EXECUTOR_ENV}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Realtime VLA policies as ROS 2 nodes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    run = sub.add_parser(
        "run", help="start a policy node in this process and drive it to active",
        description="Start the policy node in this process (no ROS tooling needed), "
                    "configure and activate it, run until Ctrl-C.")
    run.add_argument("model", help=f"policy model ({', '.join(SUPPORTED_POLICY_MODELS)})")
    run.add_argument("--checkpoint", metavar="PATH", help="checkpoint directory")
    run.add_argument("--params", metavar="YAML",
                     help=f"ROS params file (section '{POLICY_NODE_NAME}' or '/**', "
                          "key ros__parameters)")
    run.add_argument("--set", metavar="NAME=VALUE", action="append", default=[],
                     help="override one parameter (repeatable); wins over --params")
    run.add_argument("--check", action="store_true",
                     help="only validate the arguments and params file, then exit")
    run.add_argument("--executor", choices=EXECUTORS, help=EXECUTOR_HELP)
    run.set_defaults(handler=cmd_run)

    demo = sub.add_parser(
        "demo", help="the policy node on the built-in demo checkpoint with a synthetic robot",
        description="Run the policy node on the demo checkpoint, fed by a synthetic "
                    "camera + joint-state publisher; print action chunks and a summary.")
    demo.add_argument("--duration", type=float, default=10.0, metavar="S",
                      help="seconds to run (default 10; Ctrl-C ends it early)")
    demo.add_argument("--model", default="pi05",
                      help=f"policy model ({', '.join(SUPPORTED_POLICY_MODELS)}; default pi05)")
    demo.add_argument("--checkpoint", metavar="PATH",
                      help="run on this checkpoint instead of the tiny demo one")
    demo.add_argument("--rate", type=float, default=20.0, metavar="HZ", help="policy rate (default 20)")
    demo.add_argument("--robot-rate", type=float, default=30.0, metavar="HZ",
                      help="synthetic camera and joint-state rate (default 30)")
    demo.add_argument("--device", default="auto", help="engine device (default auto)")
    demo.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp8"])
    demo.add_argument("--robot", default="auto", choices=["auto", "own-process", "same-process"],
                      help="where the synthetic robot and chunk consumer run: a process of "
                           "their own (as a real robot; the default when the engine runs on "
                           "CUDA) or the node's process (the default on the CPU)")
    demo.add_argument("--json", metavar="FILE", help="also write the summary's numbers here")
    demo.add_argument("--executor", choices=EXECUTORS, help=EXECUTOR_HELP)
    demo.add_argument("--no-host-probe", action="store_true",
                      help="do not run the host-pause probe process beside the node (it tells "
                           "which skipped ticks came while the host paused its processes)")
    demo.set_defaults(handler=cmd_demo)

    sub.add_parser("bench", help="engine benchmarks (all arguments go to the benchmark)")
    sub.add_parser("node", help="spin one unconfigured policy node (what launch files run; "
                                "arguments go to the node, e.g. --ros-args ...)")

    doctor = sub.add_parser("doctor", help="print GPU, CUDA extension, torch and ROS versions")
    doctor.add_argument("--host-pauses", type=float, default=0.0, metavar="S",
                        help="also probe this host for S seconds: how often, and how long, it "
                             "pauses a process that wakes every millisecond (default 0: off)")
    doctor.set_defaults(handler=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in PASSTHROUGH_COMMANDS:
            return PASSTHROUGH_COMMANDS[argv[0]](argv[1:])
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UsageError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
