"""Launch the Pi0.5 policy node.

    ros2 launch flashrt_ros pi05.launch.py checkpoint:=/path/to/pi05

Arguments (ros2 launch flashrt_ros pi05.launch.py --show-args): checkpoint, autostart
(default true: configure + activate), params_file (default config/pi05.yaml), namespace,
node_name, device, precision, rate_hz, prompt, use_sim_time, log_level.
"""

from flashrt_ros.policy_launch import generate_policy_launch_description


def generate_launch_description():
    return generate_policy_launch_description("pi05")
