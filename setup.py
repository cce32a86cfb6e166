"""Build pymaml: setuptools drives CMake, which builds the torch-free pybind11 extension `pymaml._C`.

Environment:
  PYMAML_NO_EXTENSION=1   build a pure-Python package (the torch twins of every op are used).
  PYMAML_BUILD_TYPE       CMake build type (default Release).
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("PYMAML_BUILD_TYPE", "Release")
        configure = [
            "cmake",
            str(ROOT),
            "-G",
            "Ninja",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        subprocess.run(configure, cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", build_type], cwd=build_temp, check=True)


ext_modules = [] if _env_flag("PYMAML_NO_EXTENSION") else [CMakeExtension("pymaml._C")]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    # The Triton kernels live in kernels/ and ship as pymaml.kernels (a top-level package named
    # `kernels` already exists on PyPI); pymaml/kernels links to it so that editable installs,
    # which import from the source tree, find it too.
    package_dir={"pymaml.kernels": "kernels"},
    packages=find_packages(include=["pymaml", "pymaml.*"]) + ["pymaml.kernels"],
)
