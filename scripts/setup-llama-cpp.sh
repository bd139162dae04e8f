#!/usr/bin/env bash
# llama.cpp for `tune-launch export --format gguf` (launcher/export/gguf.py), into the venv $1.
# PyPI has only llama-cpp-python's source: build it once, narrowly (the CPU library llama-cpp-
# python loads; no multimodal mtmd library, examples, tests, tools, server or OpenMP), and keep
# llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/) from that same source in
# $VENV/share/llama.cpp. A no-op when both are there. Usage: scripts/setup-llama-cpp.sh VENV
set -euo pipefail
VENV=${1:?usage: $0 VENV}
WANT=0.3.36  # = constraints.txt llama_cpp_python
share="$VENV/share/llama.cpp"
# (pip show fails when it is not installed: on a fresh machine, so `|| true`)
have=$("$VENV/bin/pip" show llama-cpp-python 2>/dev/null | sed -n 's/^Version: //p' || true)
if [[ "$have" == "$WANT" && -f "$share/convert_hf_to_gguf.py" ]]; then
  exit 0
fi
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$VENV/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$WANT" -d "$src"
sdist="$src/llama_cpp_python-$WANT.tar.gz"
top="llama_cpp_python-$WANT/vendor/llama.cpp"
tar -xzf "$sdist" -C "$src" "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
rm -rf "$share" && mkdir -p "$share"
cp -r "$src/$top/"{convert_hf_to_gguf.py,conversion,gguf-py,LICENSE} "$share/"
if [[ "$have" != "$WANT" ]]; then
  started=$(date +%s)
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_BUILD_APP=OFF -DGGML_BLAS=OFF -DLLAMA_OPENSSL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VENV/bin/pip" install -q --no-deps "$sdist"
  echo "llama-cpp-python $WANT built in $(($(date +%s) - started)) s"
fi
