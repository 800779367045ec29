# Sourced by examples/quickstart.sh and tools/run_tests.sh: create or reuse .venv.
#
# torch is installed first and pinned (LONGVITA_TORCH, default the CPU build torch==2.13.0):
# letting pip resolve `torch>=2.6` through megatron-core on a machine without torch would
# pull a multi-GB CUDA build. On GPU clusters set LONGVITA_TORCH to your site's wheel.
# The install is redone only when setup.py changes (stamp file inside the venv).

ensure_venv() {
    local root python stamp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    python="${LONGVITA_PYTHON:-python3.11}"
    stamp="$root/.venv/.installed-$(sha256sum "$root/setup.py" | cut -c1-16)"
    if [ ! -x "$root/.venv/bin/python" ]; then
        echo "[venv] creating $root/.venv with $python"
        "$python" -m venv "$root/.venv"
    fi
    if [ ! -f "$stamp" ]; then
        echo "[venv] installing ${LONGVITA_TORCH:-torch==2.13.0} and megatron-longvita[test]"
        "$root/.venv/bin/python" -m pip install --quiet --upgrade pip
        "$root/.venv/bin/python" -m pip install --quiet "${LONGVITA_TORCH:-torch==2.13.0}"
        "$root/.venv/bin/python" -m pip install --quiet -e "$root[test]"
        rm -f "$root"/.venv/.installed-*
        touch "$stamp"
    fi
}
