#!/usr/bin/env bash
# Idempotent set-up shared by scripts/test.sh and scripts/serve.sh; fast the second time.
#   1. .venv with the package installed editable (re-installed only when pyproject.toml
#      changes: its sha256 is kept in a stamp file inside .venv);
#   2. build tools, installed with apt-get only when llama-server must be built and a
#      tool is missing (apt-get update only then too);
#   3. llama-server (built once, cached by version) and the embedded demo model.
# --quiet: print only errors and the progress of real work (a build, a download).
set -euo pipefail
cd "$(dirname "$0")/.."

quiet=0
if [[ "${1:-}" == "--quiet" ]]; then quiet=1; fi
say() { if [[ $quiet == 0 ]]; then echo "setup: $*" >&2; fi; }

apt_install() {
    # Install the given Debian packages; needs root, so say what to run otherwise.
    if [[ $(id -u) != 0 ]]; then
        echo "setup: missing packages; run: sudo apt-get install -y $*" >&2
        exit 1
    fi
    say "installing $* with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "$@" >&2
}

if [[ ! -x .venv/bin/python ]]; then
    # Debian's python3 has no ensurepip without python3-venv, and venv needs it.
    if ! python3 -c 'import ensurepip' 2>/dev/null; then apt_install python3-venv; fi
    say "creating .venv"
    python3 -m venv .venv
fi

stamp=.venv/.albatross-pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    say "installing albatross[test] into .venv"
    if [[ $quiet == 1 ]]; then
        .venv/bin/python -m pip install -q -e '.[test]' >/dev/null
    else
        .venv/bin/python -m pip install -q -e '.[test]'
    fi
    echo "$want" > "$stamp"
fi

binary_cached() {
    .venv/bin/python -c 'import sys
from albatross.config import LlamaServerConfig
from albatross.engines.llama_build import cached_binary_path
sys.exit(0 if cached_binary_path(LlamaServerConfig()).is_file() else 1)'
}
if ! binary_cached; then
    missing=()
    for pair in cmake:cmake ninja:ninja-build g++:g++ patch:patch; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    if (( ${#missing[@]} )); then apt_install "${missing[@]}"; fi
fi

bin=$(.venv/bin/python -m albatross.engines.llama_build)
say "llama-server: $bin"
model=$(.venv/bin/python -m albatross.engines.embedded_model)
say "demo model: $model"

# 4. eBPF programs of connection migration (zero-window hold, guard): clang, llvm and
#    libbpf-dev when missing (apt, root only; otherwise say what to run), then compile
#    them once per source version into the cache (prints the object paths).
if ! command -v clang >/dev/null 2>&1 || [[ ! -f /usr/include/bpf/bpf_helpers.h ]]; then
    if [[ $(id -u) == 0 ]]; then
        apt_install clang llvm libbpf-dev
    else
        echo "setup: connection migration needs clang and libbpf-dev; run:" \
            "sudo apt-get install -y --no-install-recommends clang llvm libbpf-dev" >&2
    fi
fi
if command -v clang >/dev/null 2>&1; then
    for obj in $(.venv/bin/python -m albatross.netmove.build); do say "bpf: $obj"; done
fi

# CRIU 4.1.1 for warm restarts (checkpoint/restore), in a private root under the cache;
# idempotent and fast once installed. Running criu needs root, so others are told how.
if [[ $(id -u) == 0 ]]; then
    criu=$(.venv/bin/python -m albatross.checkpoint.install)
    say "criu: $criu"
else
    say "criu: skipped (needs root); to enable warm restarts run as root: .venv/bin/python -m albatross.checkpoint.install"
fi

# vLLM for CPU in a venv of its own under the cache (3.4 GB, about 1.5 min once; a
# stamp makes later runs instant). The gateway launches it as a process; the vLLM
# contract tests are skipped without it. ALBATROSS_SKIP_VLLM=1 skips this step.
if [[ "${ALBATROSS_SKIP_VLLM:-0}" != 1 ]]; then
    vllm_python=$(.venv/bin/python -m albatross.engines.vllm_install)
    say "vllm: $vllm_python"
fi
