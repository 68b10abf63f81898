"""pip packaging of the engine alone: `pip install .` gives `flashrt_core` (no ROS).

The ROS package (interfaces, nodes, the `flashrt-ros` command) is built by colcon
from CMakeLists.txt / package.xml; colcon ignores this file for an ament_cmake
package.
"""

from setuptools import find_packages, setup

setup(
    name="flashrt-core",
    version="0.1.0",
    description="Realtime VLA policy inference engine (CUDA graphs, fused kernels; "
                "PyTorch fallback on the CPU)",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["flashrt_core", "flashrt_core.*"]),
    install_requires=[
        "numpy>=1.26",
        "torch>=2.4",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "pillow>=10",
    ],
)
