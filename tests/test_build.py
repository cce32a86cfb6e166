"""The build: the extension is present where it must be, and a pure-Python wheel can be built."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pymaml

ROOT = Path(__file__).resolve().parents[1]


def _copy_checkout(destination: Path) -> Path:
    """A copy of the checkout without its build outputs, so that pip builds there and not in the checkout."""
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.so", "runs", "__pycache__", ".pytest_cache", ".hypothesis"))
    return destination


@pytest.mark.skipif(os.environ.get("PYMAML_REQUIRE_EXTENSION") != "1",
                    reason="set PYMAML_REQUIRE_EXTENSION=1 where the compiled extension must be present (CI sets it)")
def test_extension_is_built():
    info = pymaml.build_info()
    assert info["extension"], info.get("reason")
    assert info["build_type"] == "Release"
    assert "-march=native" not in info["flags"]


def test_wheel_without_extension(tmp_path):
    """PYMAML_NO_EXTENSION=1 builds a pure-Python wheel that still ships pymaml.kernels."""
    source = _copy_checkout(tmp_path / "source")
    env = {**os.environ, "PYMAML_NO_EXTENSION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("pymaml-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pymaml/kernels/__init__.py" in names and "pymaml/algorithms/maml.py" in names
    assert {f"pymaml/data/splits/{name}.json" for name in ("miniimagenet", "cifarfs", "fc100")} <= set(names)
    assert not [name for name in names if name.endswith((".so", ".pyd"))]


@pytest.mark.skipif(os.environ.get("PYMAML_WHEEL_TEST") != "1",
                    reason="slow (compiles the extension twice); set PYMAML_WHEEL_TEST=1 (CI does)")
def test_second_install_in_the_same_checkout_builds(tmp_path):
    """`pip install .` twice in one checkout, the second after a C++ source changed, builds both times: each
    build runs in pip's own temporary build environment, whose CMake and Ninja are gone by the next build,
    so nothing a build leaves in the checkout may point into it."""
    source = _copy_checkout(tmp_path / "source")
    env = {**os.environ, "PYMAML_CUDA": "0"}
    env.pop("PYMAML_NO_EXTENSION", None)
    for attempt, target in enumerate((tmp_path / "first", tmp_path / "second")):
        if attempt:
            (source / "csrc" / "bindings.cpp").touch()
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(source)],
            capture_output=True, text=True, env=env, cwd=tmp_path,
        )
        assert result.returncode == 0, f"build {attempt + 1} failed:\n" + result.stdout[-4000:] + result.stderr[-4000:]
    (library,) = (tmp_path / "second" / "pymaml").glob("_C*.so")
    # Load the second build's extension by its path, in an isolated interpreter (no site-packages, so no
    # editable install of the checkout can stand in for it); the extension itself needs no torch.
    load = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('_C', sys.argv[1]); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "print(dict(module.build_info())['build_type'])")
    result = subprocess.run([sys.executable, "-I", "-c", load, str(library)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Release"


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(candidate) if candidate.exists() else None


def test_cuda_archs_are_compiled_in():
    """The extension's embedded cubins are the archs asked for (PYMAML_CUDA_ARCHS, default 80;90),
    and the newest also ships PTX."""
    info = pymaml.build_info()
    if os.environ.get("PYMAML_REQUIRE_CUDA_BUILD") == "1":
        assert info["extension"] and info["cuda_archs"], "CI builds with nvcc, so CUDA archs must be compiled in"
    if not info["extension"] or not info["cuda_archs"]:
        pytest.skip("built without CUDA (no nvcc on PATH, or PYMAML_CUDA=0)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (install the CUDA toolkit's, or triton, which ships one)")
    library = pymaml._extension.extension().__file__
    elf = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", library], capture_output=True, text=True, check=True).stdout
    cubins = sorted({line.rsplit(".sm_", 1)[1].split(".")[0] for line in elf.splitlines() if ".sm_" in line})
    assert cubins == sorted(info["cuda_archs"], key=int)
    newest = max(info["cuda_archs"], key=int)
    assert f"sm_{newest}.ptx" in ptx
    if os.environ.get("PYMAML_REQUIRE_CUDA_BUILD") == "1" and not os.environ.get("PYMAML_CUDA_ARCHS"):
        assert cubins == ["80", "90"]


@pytest.mark.skipif(os.environ.get("PYMAML_WHEEL_TEST") != "1",
                    reason="slow (builds a wheel and a fresh venv); set PYMAML_WHEEL_TEST=1 (CI does)")
def test_wheel_installs_into_a_fresh_venv_next_to_torch(tmp_path):
    """`pip wheel .` builds a wheel that installs into a fresh virtual environment beside torch and runs
    the sinusoid meta-step with the fused kernel. The wheel is built without the CUDA launcher: what
    this checks (the wheel's files, its install beside torch, the fused kernel loading there) does
    not depend on it, and the wheel that pip built for this environment's own install is the one
    whose embedded CUDA archs test_cuda_archs_are_compiled_in checks. A third nvcc build of the
    launcher would add several minutes to CI and check nothing more."""
    source = _copy_checkout(tmp_path / "source")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(dist)],
                   check=True, capture_output=True, cwd=tmp_path, env={**os.environ, "PYMAML_CUDA": "0"})
    (wheel,) = dist.glob("pymaml-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("pymaml/_C") and n.endswith(".so")]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    torch_version = __import__("torch").__version__.split("+")[0]
    subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}", str(wheel)], check=True,
                   capture_output=True, cwd=tmp_path)
    script = """
import torch, pymaml
info = pymaml.build_info()
assert info["extension"], info
batch = pymaml.data.Sinusoid(0).sample(25, 10).tasks
model = pymaml.models.sinusoid_mlp()
fused = pymaml.MAML(model, backend="cpp")(*batch).loss
(fused_grad,) = torch.autograd.grad(fused, [model[0].weight])
plain = pymaml.MAML(model, backend="func")(*batch).loss
(plain_grad,) = torch.autograd.grad(plain, [model[0].weight])
assert ((fused_grad - plain_grad).norm() / plain_grad.norm()).item() < 1e-5
assert info["cuda_archs"] == [], info
print("ok")
"""
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
