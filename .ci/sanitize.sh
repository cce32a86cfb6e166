#!/usr/bin/env bash
# AddressSanitizer check of the compiled core: builds pymaml._C from CMakeLists.txt with
# -fsanitize=address into a private build folder, puts it into a copy of the Python package and
# runs the held plan's safety and thread tests against it, with libasan preloaded into the
# (uninstrumented) Python. Fails on a failing test and on any AddressSanitizer report.
#
# Needs the active Python to have torch and the test requirements (as .ci/run's virtual
# environment has), gcc with libasan, and installs the build tools (pybind11, cmake, ninja) into
# that environment. Usage: bash .ci/sanitize.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
python="$(command -v python)"

libasan="$(gcc -print-file-name=libasan.so)"
if [[ "$libasan" != /* || ! -e "$libasan" ]]; then
  echo "sanitize: gcc has no libasan.so; installing gcc's runtime development package" >&2
  apt-get update -qq && apt-get install -y -qq "libgcc-$(gcc -dumpversion | cut -d. -f1)-dev" >/dev/null
  libasan="$(gcc -print-file-name=libasan.so)"
fi
"$python" -m pip install -q pybind11 cmake ninja

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The package and the tests, copied so that the instrumented build is the pymaml._C imported.
cp -r "$root/pymaml" "$work/pymaml"
rm -f "$work"/pymaml/_C*.so "$work/pymaml/kernels"
cp -r "$root/kernels" "$work/pymaml/kernels"
cp -r "$root/tests" "$work/tests"

flags="-fsanitize=address -fno-omit-frame-pointer -g"
# -O1, as AddressSanitizer recommends; it also compiles the per-ISA kernels much faster than -O3.
PYMAML_CUDA=0 cmake -S "$root" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  "-DCMAKE_CXX_FLAGS=$flags" "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG" "-DCMAKE_MODULE_LINKER_FLAGS=-fsanitize=address" \
  "-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$work/pymaml" "-DPython_EXECUTABLE=$python" \
  "-Dpybind11_DIR=$("$python" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$work/build" --parallel "$(nproc)"

mkdir "$work/reports"
export LD_PRELOAD="$libasan"
# Python and torch leak by design at exit; a mismatch report in uninstrumented code is not ours.
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:log_path=$work/reports/asan:halt_on_error=1"
export PYMAML_REQUIRE_EXTENSION=1 OMP_NUM_THREADS=1
cd "$work"
"$python" - <<'EOF'
import pymaml
from pymaml._extension import extension
assert extension() is not None and "-fsanitize=address" in pymaml.build_info()["flags"], pymaml.build_info()
print("sanitize: testing", extension().__file__)
EOF
status=0
"$python" -m pytest -q -p no:cacheprovider tests/test_plan_safety.py tests/test_threads.py "$@" || status=$?
unset LD_PRELOAD
if compgen -G "$work/reports/asan*" >/dev/null; then
  cat "$work"/reports/asan* >&2
  echo "sanitize: AddressSanitizer reported errors" >&2
  exit 1
fi
if [[ $status -ne 0 ]]; then
  echo "sanitize: tests failed under AddressSanitizer (exit $status)" >&2
  exit "$status"
fi
echo "sanitize: no AddressSanitizer reports"
