"""The llama.cpp engine on a build with the AMX kernels compiled in (an older wheel pip's cache kept): decode speed
with the engine's guard (no extra buffer types), against requirements.txt's build.  One process per build:

    pip wheel llama-cpp-python==0.3.36 --no-deps --no-cache-dir -w /tmp/amxwheel \
        --config-settings=cmake.args="<requirements.txt's x86-64 cmake.args without the two -DCMAKE_*_FLAGS>"
    pip install --no-deps --target /tmp/amxlib /tmp/amxwheel/*.whl
    PYTHONPATH=/tmp/amxlib python bench/amx_guard.py; python bench/amx_guard.py               # alternate, twice

64 greedy one-token steps after an 80-token prompt, base then expert, 2 threads.
"""
import time
import warnings

import llama_cpp as L

from colm import cache
from colm.engines.llamacpp import LlamaCppEngine

STEPS = 64

if __name__ == "__main__":
    warnings.simplefilter("ignore")     # the guard's own warning
    build = "AMX build (guarded)" if b"AMX_INT8 = 1" in L.llama_print_system_info() else "requirements.txt build"
    for role, source in (("base", cache.DEFAULT_BASE), ("expert", cache.DEFAULT_EXPERT)):
        eng = LlamaCppEngine(cache.ensure_default_gguf(source), 151936, 2, role=role, n_ctx=512, n_seq=1)
        rows = eng.open(1)
        tok = int(eng.feed(rows, [[100, 101, 102, 103] * 20], keep=1).logits[0][-1].argmax())
        t = time.perf_counter()
        for _ in range(STEPS):
            tok = int(eng.feed(rows, [[tok]], keep=1).logits[0][-1].argmax())
        print(f"{build}: {role} {STEPS / (time.perf_counter() - t):.1f} tokens/s", flush=True)
        eng.close(rows)
