"""Build the extension ahead of time, or compile-check the CUDA code without a GPU.

    python -m dsu_ops build        build (CUDA too when torch sees a GPU and nvcc), print where
    python -m dsu_ops check-cuda   nvcc-compile pack_cuda.cu for sm_80 and sm_90 and the torch
                                   glue against torch's headers (compile only; no GPU needed)

Exit status 1 when the build or a check fails.
"""

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsu_ops import build


def build_now() -> int:
    with_cuda = build.wants_cuda()
    start = time.perf_counter()
    try:
        directory = build.compile_extension(with_cuda)
    except Exception as error:  # noqa: BLE001 - report any build failure as such
        print(f"build failed: {error}", file=sys.stderr)
        return 1
    kind = "CPU + CUDA" if with_cuda else "CPU"
    print(f"{build.NAME} ({kind}) ready in {time.perf_counter() - start:.1f} s: {directory}")
    return 0


def check_cuda() -> int:
    with tempfile.TemporaryDirectory(prefix="speech-llama-cuda-check-") as out_dir:
        for command in build.check_cuda_commands(Path(out_dir)):
            print("$", shlex.join(command), flush=True)
            if subprocess.run(command).returncode != 0:
                return 1
    print(f"CUDA compile check passed ({', '.join('sm_' + a for a in build.CUDA_ARCHS)})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dsu_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "check-cuda"])
    args = parser.parse_args()
    return build_now() if args.command == "build" else check_cuda()


if __name__ == "__main__":
    sys.exit(main())
