"""Build the compiled core sinkhorn_ot._core (C++/OpenMP, pybind11).

OpenMP is detected by compiling a tiny test program; without it the core builds serial.
No -march=native: the hot loops are compiled for AVX2 and baseline x86-64 and chosen at run
time (csrc/cpu/sinkhorn_cpu.cpp), so one wheel runs on any x86-64 CPU.
"""
import os
import sys
import tempfile

import shutil

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

# CUDA kernel sources shipped inside the package (sinkhorn_ot/cuda/), compiled at run time by
# NVRTC through CuPy: the wheel needs no CUDA toolkit.  The checkout keeps them in csrc/.
_CUDA_SOURCES = ["csrc/cuda/sinkhorn_cuda.cu", "csrc/cuda/kernel_args.cuh",
                 "csrc/common/sinkhorn_math.h"]


class BuildPy(build_py):
    """Copy the CUDA sources into the built package (wheel); editable installs read csrc/."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "sinkhorn_ot", "cuda")
        os.makedirs(dest, exist_ok=True)
        here = os.path.dirname(os.path.abspath(__file__))
        for src in _CUDA_SOURCES:
            shutil.copy2(os.path.join(here, src), dest)


def _openmp_flags(compiler):
    """Return (compile_args, link_args) enabling OpenMP, or ([], []) if it does not build."""
    if sys.platform == "win32":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    ldflags = os.environ.get("LDFLAGS", "").split() if sys.platform != "win32" else []
    src = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    for cflags, lflags in candidates:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "omp_test.cpp")
            with open(path, "w") as fh:
                fh.write(src)
            try:
                objs = compiler.compile([path], output_dir=tmp, extra_postargs=cflags)
                # The extension's link line carries $LDFLAGS (e.g. -L of Homebrew's libomp);
                # an executable's does not, so the test passes them itself.
                compiler.link_executable(objs, os.path.join(tmp, "omp_test"),
                                         extra_postargs=lflags + ldflags)
            except Exception:  # noqa: BLE001 - any failure means "no OpenMP here"
                continue
        return cflags, lflags
    return [], []


class BuildExt(build_ext):
    def build_extensions(self):
        cflags, lflags = _openmp_flags(self.compiler)
        if not cflags:
            print("sinkhorn-ot: OpenMP not found, building the serial core", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args += cflags
            ext.extra_link_args += lflags
        super().build_extensions()


# No -ffast-math: the kernels rely on inf and on the order of their sums.  These let the
# compiler vectorise (no errno from log/exp, no FP traps in if-converted selects) and fuse
# a * b + c into one FMA instruction where the target has it.
opt = ["/O2"] if sys.platform == "win32" else [
    "-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]

setup(
    ext_modules=[
        Pybind11Extension(
            "sinkhorn_ot._core",
            ["csrc/bindings.cpp", "csrc/batched_bindings.cpp", "csrc/cpu/sinkhorn_cpu.cpp",
             "csrc/cpu/batched.cpp"],
            include_dirs=["csrc"],
            depends=["csrc/common/sinkhorn_math.h", "csrc/cpu/sinkhorn_cpu.h",
                     "csrc/cpu/sinkhorn_cpu_kernels.h", "csrc/cpu/simd.h",
                     "csrc/cpu/batched.h", "csrc/cpu/batched_kernels.h",
                     "csrc/cpu/runtime.h"],
            cxx_std=17,
            extra_compile_args=opt,
        )
    ],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
