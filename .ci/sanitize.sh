#!/usr/bin/env bash
# ThreadSanitizer check of the per-task math on thread groups: builds the torch-free thread-group
# harness (csrc/tools/group_harness.cpp, tests/test_group_harness.py) with -fsanitize=thread and
# runs its short list (--quick); fails on a mismatch and on any ThreadSanitizer report, and checks
# that ThreadSanitizer does report the harness's unsynchronized self-test.
#
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
libtsan="$(gcc -print-file-name=libtsan.so)"
if [[ "$libasan" != /* || ! -e "$libasan" || "$libtsan" != /* || ! -e "$libtsan" ]]; then
  echo "sanitize: gcc has no libasan.so or libtsan.so; installing gcc's runtime development package" >&2
  apt-get update -qq && apt-get install -y -qq "libgcc-$(gcc -dumpversion | cut -d. -f1)-dev" >/dev/null
  libasan="$(gcc -print-file-name=libasan.so)"
fi
"$python" -m pip install -q pybind11 cmake ninja

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "sanitize: ThreadSanitizer build of the thread-group harness"
mkdir "$work/tsan"
g++ -std=c++20 -O1 -g -fsanitize=thread -fno-omit-frame-pointer -fno-math-errno -fno-trapping-math -pthread \
  -I "$root/csrc" "$root/csrc/tools/group_harness.cpp" -o "$work/tsan/group_harness"
tsan_status=0
TSAN_OPTIONS="halt_on_error=1:exitcode=66:log_path=$work/tsan/report" "$work/tsan/group_harness" --quick \
  >"$work/tsan/stdout" || tsan_status=$?
tail -n 1 "$work/tsan/stdout"
if compgen -G "$work/tsan/report*" >/dev/null; then
  cat "$work"/tsan/report* >&2
  echo "sanitize: ThreadSanitizer reported races in the thread-group harness" >&2
  exit 1
fi
if [[ $tsan_status -ne 0 ]]; then
  grep FAIL "$work/tsan/stdout" >&2 || true
  echo "sanitize: the thread-group harness failed under ThreadSanitizer (exit $tsan_status)" >&2
  exit "$tsan_status"
fi
# The self-test: free threads without barriers must be reported (exit code 66).
tsan_status=0
TSAN_OPTIONS="halt_on_error=1:exitcode=66:log_path=$work/tsan/selftest" "$work/tsan/group_harness" \
  --schedule unsynchronized >/dev/null || tsan_status=$?
if [[ $tsan_status -ne 66 ]] || ! grep -q "ThreadSanitizer: data race" "$work"/tsan/selftest*; then
  echo "sanitize: ThreadSanitizer did not report the harness's unsynchronized self-test (exit $tsan_status)" >&2
  exit 1
fi
echo "sanitize: no ThreadSanitizer reports in the thread-group harness"
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
