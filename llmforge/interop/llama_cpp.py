"""Loading real llama.cpp in-process, for parity tests and benches: the CPU library that the
`llama-cpp-cffi` wheel ships (scripts/setup.sh installs it when PyPI has it), driven through its
C API with cffi.

That library was built with GCC 14, whose libstdc++ has two symbols that Debian 12's lacks; a
3-line C shim, built with `cc` where there is one, supplies them.
"""
from __future__ import annotations

from pathlib import Path

SHIM_C = ("#include <stdlib.h>\nvoid __cxa_call_terminate(void *e) { (void)e; abort(); }\n"
          "void _ZSt21ios_base_library_initv(void) {}\n")


def load_library(shim_dir) -> tuple:
    """(ffi, lib) of llama.cpp's C API with logging silenced and the backend initialised;
    RuntimeError with a one-line reason (and the fix) where it is not installed or does not load.
    `shim_dir` is a scratch folder for the libstdc++ shim."""
    import ctypes
    import importlib.util
    import shutil
    import subprocess
    import sysconfig

    lib = next(Path(sysconfig.get_paths()["purelib"], "llama").glob("_llama_cpp_cpu.*.so"), None)
    if lib is None:
        raise RuntimeError("llama.cpp is not installed (pip install --no-deps llama-cpp-cffi; see scripts/setup.sh)")
    if shutil.which("cc"):
        shim_dir = Path(shim_dir)
        (shim_dir / "shim.c").write_text(SHIM_C)
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim_dir / "libcxxshim.so"), str(shim_dir / "shim.c")],
                       check=True)
        ctypes.CDLL(str(shim_dir / "libcxxshim.so"), mode=ctypes.RTLD_GLOBAL)
    spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", lib)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise RuntimeError(f"llama.cpp's library does not load here: {e}") from e
    ffi, c = module.ffi, module.lib
    quiet = ffi.callback("void(enum ggml_log_level, char *, void *)", lambda *a: None)
    c.llama_log_set(quiet, ffi.NULL)
    c.llama_backend_init()
    _KEEP_ALIVE.append(quiet)   # the callback must outlive every call into the library
    return ffi, c


_KEEP_ALIVE: list = []
