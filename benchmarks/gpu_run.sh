#!/usr/bin/env bash
# One GPU run, all figures (benchmarks/README.md, "GPU run"): the wheels it needs, then benchmarks/gpu_run.py.
#
#   bash benchmarks/gpu_run.sh --prepare        # HERE, with the package registry: wheels into .whl/ (about 41 MB)
#   bash benchmarks/gpu_run.sh --out DIR        # THERE, on the GPU machine (no registry): install .whl/*.whl into a
#                                               # private folder, check the imports, run gpu_run.py (about 8 minutes)
#   bash benchmarks/gpu_run.sh --dry-run --out DIR   # anywhere: the same on the CPU at tiny sizes
#
# The GPU machine brings CUDA torch, Triton, transformers, numpy, scipy, Pillow, huggingface_hub; it lacks diffusers,
# POT and this project. --prepare downloads the versions installed in this environment (the ones tested here) for
# the GPU machine's Python (GPU_PYTHON, default 3.12; x86-64 manylinux), safetensors too, and builds this project's
# wheel from the working tree. Variables: PYTHON (default .venv/bin/python if present, else python3), GPU_RUN_WHEELS
# (default .whl at the repository root), GPU_RUN_SITE (where the wheels are installed, default .gpu-run-site at the repository root).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${GPU_RUN_WHEELS:-$ROOT/.whl}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

if [ "${1:-}" = "--prepare" ]; then
  version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
    --implementation cp "${platforms[@]}" -d "$WHEELS" \
    "diffusers==$(version diffusers)" "POT==$(version POT)" "safetensors==$(version safetensors)"
  "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$ROOT"
  ls -l "$WHEELS"
  du -ch "$WHEELS"/*.whl | tail -1
  echo "Carry $WHEELS to the GPU machine (the device tool: carry [\".whl\"]) and run there: bash benchmarks/gpu_run.sh --out \"\$OUT\""
  exit 0
fi

SITE=${GPU_RUN_SITE:-$ROOT/.gpu-run-site}
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  echo "installing ${#wheels[@]} wheels from $WHEELS into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS: using the packages this Python already has"
fi
"$PYTHON" - <<'EOF'
import importlib.util, sys  # find, not import: fast; a module that is there but broken fails in its section
modules = ("torch", "triton", "numpy", "scipy", "PIL", "transformers", "diffusers", "ot", "safetensors", "concept_express")
missing = [m for m in modules if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_run: cannot find {', '.join(missing)}. Build the wheels with 'bash benchmarks/gpu_run.sh --prepare' "
             "where the package registry is reachable, and bring the .whl folder along.")
EOF
exec "$PYTHON" "$ROOT/benchmarks/gpu_run.py" "$@"
