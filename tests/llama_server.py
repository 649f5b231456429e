"""A llama-server binary for the remote-expert tests, built from the very llama.cpp that the installed
llama-cpp-python vendors, so the local and the remote expert run the same kernels and equal greedy tokens are a
fair demand.

    python tests/llama_server.py        # build (once per machine and llama-cpp-python version) and print its path

The source comes from pip (``pip download llama-cpp-python==<installed> --no-binary :all:``, the sdist pip's cache
already holds from the install); only the ``llama-server`` target is compiled (about 6 min on 2 cores), into
``$COLM_CACHE_DIR/llama-server/<version>/`` under a file lock, so parallel test processes build it once.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
              "-DGGML_BUILD_TESTS=OFF", "-DGGML_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if platform.machine() == "x86_64":      # as requirements.txt builds llama-cpp-python: no AMX kernels (SIGILL on a VM)
    CMAKE_ARGS += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]


def cache_dir() -> Path:
    from colm.cache import cache_root
    # "-noamx": a binary built before the flag (AMX kernels in) is not reused
    return cache_root() / "llama-server" / (importlib.metadata.version("llama-cpp-python") + "-noamx")


def binary() -> Path | None:
    """The built binary, or None when it is not built yet."""
    exe = cache_dir() / "llama-server"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def build(log=print) -> Path:
    """Build llama-server once (under a lock) and return its path; raises RuntimeError with the reason."""
    from filelock import FileLock
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".build.lock")):
        if binary():
            return binary()
        for tool in ("cmake", "c++"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"building llama-server needs {tool} on PATH")
        version = importlib.metadata.version("llama-cpp-python")
        with tempfile.TemporaryDirectory(prefix="colm-llama-server-") as tmp:
            tmp = Path(tmp)
            log(f"llama-server: fetching the llama-cpp-python {version} sdist")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "--no-build-isolation", f"llama-cpp-python=={version}", "-d", str(tmp)],
                           check=False, capture_output=True)
            sdists = list(tmp.glob("llama_cpp_python-*.tar.gz"))
            if not sdists:   # pip may refuse to prepare metadata without the build backend: fetch the file alone
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                                f"llama-cpp-python=={version}", "-d", str(tmp)], check=True, capture_output=True)
                sdists = list(tmp.glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdists[0]) as t:
                t.extractall(tmp / "src", filter="data")
            src = next((tmp / "src").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
            build_dir = tmp / "build"
            log("llama-server: configuring")
            subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_ARGS], check=True,
                           capture_output=True)
            log("llama-server: compiling (a few minutes)")
            jobs = str(max(1, len(os.sched_getaffinity(0))))
            subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", jobs],
                           check=True, capture_output=True)
            exe = build_dir / "bin" / "llama-server"
            shutil.copy2(exe, out / "llama-server.tmp")
            os.replace(out / "llama-server.tmp", out / "llama-server")
    return binary()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(build(log=lambda m: print(m, file=sys.stderr)))
