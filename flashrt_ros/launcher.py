"""Run policy nodes in one process with real rclpy, no ROS tooling needed.

`run_policy` is what `flashrt-ros run` calls: it starts the node, drives it
configure -> activate, spins until SIGINT/SIGTERM, then deactivate (publishing the
hold) -> cleanup -> shutdown. `serve` is the entry point launch files use: the node
spins unconfigured and launch (or a lifecycle manager) drives the transitions; on a
signal it is brought down the same way.

Signals are handled here, not by rclpy: rclpy's default handler shuts the context
down at once, and a node whose context is gone cannot publish its hold.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from flashrt_ros.params import EXECUTOR_ENV, EXECUTORS, POLICY_NODE_NAME, executor_kind


def make_executor(kind: str, context=None):
    if kind == "events":
        try:
            from rclpy.experimental import EventsExecutor
        except ImportError as error:  # rclpy before 7.1.4 (Jazzy's backport)
            raise RuntimeError(f"{EXECUTOR_ENV}=events: this rclpy has no EventsExecutor ({error}); "
                               f"use {EXECUTORS[0]}") from None
        return EventsExecutor(context=context)
    return SingleThreadedExecutor(context=context)


class Spinner:
    """Spins each node on its own executor (executor_kind()), in its own thread.

    Not rclpy's MultiThreadedExecutor: in Jazzy (rclpy 7.1) its spin thread re-yields
    callbacks that are submitted but not yet started, busy-looping with the GIL held;
    with camera rates of callbacks on a 2-core machine that starved inference (the
    policy node at 20 Hz published 0.2-5 chunks/s, against 20.0 with this). The policy
    node keeps its callbacks short (inference runs on its engine thread), so one thread
    per node is enough, and a node blocked in a long transition (configure loading a
    checkpoint) does not stall the others.

    Stopping: the spin threads leave their loops first, then the executors shut down.
    (Executor.shutdown() from another thread while spin() runs can destroy the
    executor's guard condition under the spinning thread's wait set in rclpy 7.1.)
    """

    WAKE_S = 0.1  # a spin loop notices a stop request within this

    def __init__(self, nodes, context=None):
        self._context = context
        self._kind = executor_kind()
        self._running = False
        self._stopping = threading.Event()
        self._spinning: list[tuple[object, threading.Thread]] = []
        for node in nodes:
            self.add_node(node)

    def add_node(self, node) -> None:
        executor = make_executor(self._kind, self._context)
        executor.add_node(node)
        thread = threading.Thread(target=self._spin, args=(executor,), name=f"spin-{node.get_name()}",
                                  daemon=True)
        self._spinning.append((executor, thread))
        if self._running:
            thread.start()

    def _spin(self, executor) -> None:
        while not self._stopping.is_set() and executor.context.ok():
            executor.spin_once(timeout_sec=self.WAKE_S)

    def __enter__(self) -> "Spinner":
        self._running = True
        for _, thread in self._spinning:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        for _, thread in self._spinning:
            thread.join(timeout=10.0)
        for executor, _ in self._spinning:
            executor.shutdown()


def lifecycle_state(node) -> str:
    """'unconfigured', 'inactive', 'active' or 'finalized'. (rclpy has no public
    getter besides the node's own get_state service.)"""
    return node._state_machine.current_state[1]


def bring_up(node) -> bool:
    """configure then activate; False (node left unconfigured) if configure fails."""
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        return False
    return node.trigger_activate() == TransitionCallbackReturn.SUCCESS


def bring_down(node) -> None:
    """From any state to finalized: deactivate (hold), cleanup, shutdown."""
    state = lifecycle_state(node)
    if state == "active":
        node.trigger_deactivate()
    if lifecycle_state(node) == "inactive":
        node.trigger_cleanup()
    if lifecycle_state(node) != "finalized":
        node.trigger_shutdown()


class StopRequest:
    """Set by SIGINT / SIGTERM: a plain flag, no lock. A Python signal handler runs on the
    main thread between bytecodes, possibly while that thread holds a threading.Event's
    internal lock inside Event.wait(): setting the Event there would deadlock the process
    (Ctrl-C and SIGTERM then hang it)."""

    def __init__(self):
        self._requested = False

    def set(self) -> None:
        self._requested = True

    def is_set(self) -> bool:
        return self._requested


def wait_for(stop: StopRequest, until=lambda: False, timeout: float | None = None) -> None:
    """Block until `stop` is set, `until()` is true or `timeout` seconds passed, polling
    (short sleeps keep the main thread responsive to signals)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not stop.is_set() and not until():
        if deadline is not None and time.monotonic() >= deadline:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def ros_process(args: list[str] | None = None) -> Iterator[StopRequest]:
    """rclpy initialised with our own SIGINT/SIGTERM handling; yields the stop request the
    signals set. On exit the context is shut down and the old handlers restored."""
    stop = StopRequest()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        rclpy.try_shutdown()


def packaged_parameters(model: str) -> dict:
    """Values of the installed config/<model>.yaml (what the launch file uses by
    default), or {} where the package is not installed with its share directory."""
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    from flashrt_ros.cli import load_params_file

    try:
        path = Path(get_package_share_directory("flashrt_ros")) / "config" / f"{model}.yaml"
    except PackageNotFoundError:
        return {}
    return load_params_file(path) if path.is_file() else {}


def parameter_overrides(values: dict) -> list[Parameter]:
    """rclpy Parameters of {name: value}. An empty list is left out: rclpy would type
    it as a byte array, and every list parameter reads an unset value as its default."""
    return [Parameter(name, value=value) for name, value in values.items()
            if not (isinstance(value, list) and not value)]


def run_policy(model: str, checkpoint: str, overrides: dict | None = None) -> int:
    """One process: the policy node brought up, spun until SIGINT/SIGTERM, brought
    down cleanly. Parameters: the packaged config/<model>.yaml (as the launch file),
    then `overrides` (values already validated against flashrt_ros.params), then the
    model and checkpoint. Returns the exit code (1 when configure fails)."""
    from flashrt_ros.policy_node import PolicyNode

    values = {**packaged_parameters(model), **(overrides or {}),
              "model": model, "checkpoint": str(checkpoint)}
    with ros_process() as stop:
        node = PolicyNode(POLICY_NODE_NAME, parameter_overrides=parameter_overrides(values))
        try:
            with Spinner([node]):
                if not bring_up(node):
                    node.get_logger().error("not started: configure failed (see above)")
                    return 1
                wait_for(stop)
                node.get_logger().info("stopping...")
                bring_down(node)
        finally:
            node.destroy_node()
    return 0


def serve(args: list[str] | None = None) -> int:
    """Spin an unconfigured policy node (ROS arguments from `args`, e.g. launch's
    --ros-args) until SIGINT/SIGTERM, then bring it down from whatever state it is in."""
    from flashrt_ros.policy_node import PolicyNode

    with ros_process(args) as stop:
        node = PolicyNode(POLICY_NODE_NAME)
        try:
            with Spinner([node]):
                wait_for(stop, until=lambda: lifecycle_state(node) == "finalized")
                bring_down(node)
        finally:
            node.destroy_node()
    return 0

