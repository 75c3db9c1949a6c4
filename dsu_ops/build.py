"""Builds the C++/CUDA extension on first use and loads its ops into `torch.ops.speech_llama`.

The build goes to `$XDG_CACHE_HOME/speech-llama/kernels/<key>` (default `~/.cache/...`), where
the key hashes the sources, the torch version and whether CUDA is in: later runs only load it.
The CUDA sources join when torch sees a GPU and the CUDA toolkit (nvcc) is installed. When the
build fails (no compiler, no ninja), `extension()` logs one warning and returns None, and
`dsu_ops` falls back to the NumPy reference.
"""

import functools
import hashlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCES = Path(__file__).resolve().parent.parent / "kernels"  # the C++ and CUDA sources
CPU_SOURCES = ["pack.cpp", "interleave.cpp", "first_fit.cpp"]
CUDA_SOURCES = ["pack_cuda.cpp", "pack_cuda.cu"]
NAME = "speech_llama_kernels"
CUDA_ARCHS = ("80", "90")  # A100, H100: the compile-only check's targets
CFLAGS = ["-O3", "-ffp-contract=off"]  # no fused multiply-adds: the interleaving draws must equal NumPy's
CUDA_CFLAGS = ["-O3"]
# Link the shared C++ runtime torch itself uses. Where a toolchain lacks the libstdc++.so link (a
# slim image), g++ silently links libstdc++.a instead, and that second copy's uninitialised
# iostreams crash the first error message that formats a number (seen on a CUDA image).
LDFLAGS = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extension:
    directory: Path
    with_cuda: bool


def wants_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


def build_directory(with_cuda: bool) -> Path:
    digest = hashlib.sha256(f"{torch.__version__} cuda={with_cuda} {CFLAGS} {CUDA_CFLAGS} {LDFLAGS}".encode())
    for path in sorted(SOURCES.glob("*")):
        if path.suffix not in (".cpp", ".cu", ".h"):  # not a stray folder or cache left by an older layout
            continue
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "speech-llama" / "kernels"
    return root / digest.hexdigest()[:16]


def _put_venv_ninja_on_path() -> None:
    # torch runs `ninja` from PATH; a virtualenv's own ninja is there only when it is activated.
    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"


def compile_extension(with_cuda: bool) -> Path:
    """Builds the extension (a no-op when the cache is current) and loads it; returns its directory."""
    from torch.utils import cpp_extension

    _put_venv_ninja_on_path()
    directory = build_directory(with_cuda)
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(SOURCES / name) for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])]
    cpp_extension.load(
        name=NAME,
        sources=sources,
        build_directory=str(directory),
        # Copies: torch appends to these lists, and changed flags on a second load in one process
        # would make it build and load a second copy of the ops, which torch refuses.
        extra_cflags=list(CFLAGS),
        extra_cuda_cflags=list(CUDA_CFLAGS),
        extra_ldflags=list(LDFLAGS),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )
    return directory


@functools.cache
def extension() -> Extension | None:
    """The loaded extension, or None (with one warning per process) when it cannot be built."""
    with_cuda = wants_cuda()
    try:
        directory = compile_extension(with_cuda)
    except Exception as error:  # noqa: BLE001 - a build fails in many ways; any of them means "fall back"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("dsu_ops: cannot build the C++ extension (%s); using the NumPy reference implementation", reason)
        return None
    if torch.cuda.is_available() and not with_cuda:
        log.warning("dsu_ops: built without CUDA (no nvcc found); CUDA batches are assembled on the CPU")
    return Extension(directory, with_cuda)


def check_cuda_commands(out_dir: Path) -> list[list[str]]:
    """Compile-only checks of the CUDA code, runnable without a GPU: the kernels with nvcc for
    every arch in CUDA_ARCHS, and the torch glue against torch's headers."""
    from torch.utils.cpp_extension import include_paths

    gencode = [flag for arch in CUDA_ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    device_code, glue_code = str(SOURCES / "pack_cuda.cu"), str(SOURCES / "pack_cuda.cpp")
    kernels = ["nvcc", "-std=c++17", "-O3", *gencode, "-c", device_code, "-o", str(out_dir / "pack_cuda.o")]
    includes = [flag for path in include_paths() for flag in ("-isystem", path)]
    if not any((Path(path) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for path in include_paths()):
        # torch's CPU wheels ship c10's CUDA headers without this generated one.
        stub = out_dir / "stub" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes += ["-isystem", str(out_dir / "stub")]
    glue = ["nvcc", "-std=c++20", *includes, "-c", glue_code, "-o", str(out_dir / "pack_cuda_glue.o")]
    return [kernels, glue]
