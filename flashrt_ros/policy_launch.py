"""The launch description behind launch/pi0.launch.py and launch/pi05.launch.py.

Only launch files import this module (it needs `launch` and `launch_ros`, which a ROS
install has and the PyPI wheels do not). One builder for every policy model so the
launch files differ only in the model name.

Launch arguments: checkpoint, autostart, params_file, namespace, node_name, device,
precision, rate_hz, prompt, use_sim_time, log_level. Empty optional arguments leave
the params file's value alone. The params file's section for the node name (or `/**`)
applies whatever the namespace.

Autostart: Jazzy's launch_ros LifecycleNode has no `autostart` argument, so the
description emits ChangeState(configure) when the node starts and, on the
configuring -> inactive transition, ChangeState(activate). A failed configure
leaves the node unconfigured and alive (launch logs the failed transition).
"""

from __future__ import annotations

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.events import matches_action
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from flashrt_ros.params import POLICY_NODE_NAME

PACKAGE = "flashrt_ros"
EXECUTABLE = "flashrt-ros"   # installed in lib/flashrt_ros; `node` spins one policy node
# Optional launch arguments that override the params file when non-empty: name -> type.
_OVERRIDES = {"device": str, "precision": str, "rate_hz": float, "prompt": str}


def _package_share() -> str:
    from ament_index_python.packages import get_package_share_directory

    return get_package_share_directory(PACKAGE)


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _policy_actions(context, model: str):
    from flashrt_ros.cli import load_params_file

    config = context.launch_configurations
    # The node's section of the params file (`<node_name>:` or `/**:`), read here so it
    # applies in any namespace; launch arguments override it.
    values = load_params_file(config["params_file"], config["node_name"])
    values.update(model=model, checkpoint=config["checkpoint"],
                  use_sim_time=_truthy(config["use_sim_time"]))
    for name, kind in _OVERRIDES.items():
        if config[name] != "":
            values[name] = kind(config[name])
    node = LifecycleNode(
        package=PACKAGE, executable=EXECUTABLE, arguments=["node"],
        name=config["node_name"], namespace=config["namespace"], output="screen",
        parameters=[values],
        ros_arguments=["--log-level", config["log_level"]])
    actions = [node]
    if _truthy(config["autostart"]):
        def change_state(transition_id):
            return EmitEvent(event=ChangeState(
                lifecycle_node_matcher=matches_action(node), transition_id=transition_id))

        actions += [
            RegisterEventHandler(OnStateTransition(
                target_lifecycle_node=node, start_state="configuring", goal_state="inactive",
                entities=[change_state(Transition.TRANSITION_ACTIVATE)])),
            change_state(Transition.TRANSITION_CONFIGURE),
        ]
    return actions


def generate_policy_launch_description(model: str) -> LaunchDescription:
    """Launch description of one `model` policy node (see the module docstring)."""
    default_params = os.path.join(_package_share(), "config", f"{model}.yaml")
    arguments = [
        DeclareLaunchArgument("checkpoint", default_value="",
                              description=f"{model} checkpoint directory"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate the node on start"),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="ros__parameters YAML of the node"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("node_name", default_value=POLICY_NODE_NAME,
                              description="node name (the params file's top-level key)"),
        DeclareLaunchArgument("device", default_value="",
                              description="auto | cpu | cuda | cuda:N (empty: params file)"),
        DeclareLaunchArgument("precision", default_value="",
                              description="auto | fp32 | bf16 | fp8 (empty: params file)"),
        DeclareLaunchArgument("rate_hz", default_value="",
                              description="inference rate [Hz] (empty: params file)"),
        DeclareLaunchArgument("prompt", default_value="",
                              description="task instruction (empty: params file)"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock as the node's time"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="debug | info | warn | error"),
    ]
    return LaunchDescription(arguments + [OpaqueFunction(
        function=lambda context: _policy_actions(context, model))])

