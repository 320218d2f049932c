#!/usr/bin/env bash
# Build fedlora_fast._native with AddressSanitizer + UBSan into a temp dir and run the native tests against it:
# tests/test_native.py and the native cases of tests/test_ffa_linear.py. Any sanitizer report fails the run
# (-fno-sanitize-recover=all, halt_on_error). The installed package is left untouched.
#   usage: .ci/sanitize.sh            (PYTHON=/path/to/python to pick the interpreter; needs g++/clang, cmake)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the project's venv (what .ci/run creates) unless PYTHON says otherwise
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
fi
CXX_BIN="${CXX:-g++}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/fedlora_sanitize.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# build tools: pip install -e . builds in an isolated env, so pybind11/cmake may be missing from the venv;
# then fetch them into the temp dir (not into the venv)
if ! "$PYTHON" -c 'import pybind11' 2>/dev/null || ! command -v cmake > /dev/null; then
  "$PYTHON" -m pip install -q --target "$TMP/tools" "pybind11>=2.12" "cmake>=3.18"
  export PYTHONPATH="$TMP/tools${PYTHONPATH:+:$PYTHONPATH}"
  command -v cmake > /dev/null || export PATH="$TMP/tools/bin:$PATH"
fi

# a private copy of the package (no built .so) that the tests import instead of the installed one
mkdir -p "$TMP/src"
cp -R "$REPO/fedlora_fast" "$REPO/tests" "$REPO/pyproject.toml" "$TMP/src/"
cp -R "$REPO/kernels" "$TMP/src/fedlora_fast/kernels"
find "$TMP/src" \( -name '__pycache__' -o -name '*.so' \) -prune -exec rm -rf {} +

PYBIND11_DIR="$("$PYTHON" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
cmake -S "$REPO" -B "$TMP/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX_BIN" \
  -DFEDLORA_FAST_SANITIZE=address,undefined -DFEDLORA_FAST_OUTPUT_DIR="$TMP/src/fedlora_fast" \
  -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$(command -v "$PYTHON")" > "$TMP/cmake.log" \
  || { cat "$TMP/cmake.log"; exit 1; }
cmake --build "$TMP/build" -j "$(nproc)"

# Python itself is not instrumented: the ASan runtime must be loaded first, and libstdc++ with it so that
# ASan can intercept __cxa_throw (else its CHECK fails on the first C++ exception)
ASAN_LIB="$("$CXX_BIN" -print-file-name=libasan.so)"
STDCXX_LIB="$("$CXX_BIN" -print-file-name=libstdc++.so)"
export LD_PRELOAD="$ASAN_LIB:$STDCXX_LIB${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="log_path=$TMP/sanitizer:detect_leaks=0:halt_on_error=1:exitcode=86:strict_string_checks=1"
export UBSAN_OPTIONS="log_path=$TMP/sanitizer:print_stacktrace=1:halt_on_error=1:exitcode=87"
unset FEDLORA_FAST_BACKEND

unset PYTHONPATH  # the tests must import the copy below, nothing else
cd "$TMP/src"  # sys.path[0]: the copy with the sanitized module, ahead of any installed fedlora_fast
"$PYTHON" - <<'PY'
import fedlora_fast._native as n
info = n.build_info()
assert "address" in info.get("sanitizers", ""), f"not the sanitized build: {n.__file__} {info}"
print("sanitized module:", n.__file__, info["sanitizers"])
PY
# pytest captures fd 2, so sanitizer reports go to files; print them if there are any
status=0
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_native.py tests/test_ffa_linear.py -k native "$@" || status=$?
if compgen -G "$TMP/sanitizer*" > /dev/null; then
  echo "=== sanitizer reports ===" >&2
  cat "$TMP"/sanitizer* >&2
  [ "$status" -ne 0 ] || status=1
fi
exit "$status"
