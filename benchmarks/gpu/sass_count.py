"""Static cost of the pass kernels, without a GPU: registers, spills, and the SASS instructions
of the row loop per input element, from nvcc (sm_90) and cuobjdump.

    python benchmarks/gpu/sass_count.py                 # the pass instances that matter
    python benchmarks/gpu/sass_count.py "sinkhorn_ot::cuda::labels_kernel<float, 16, 1, 4>"

Why it matters: on an H200 the fused pass is issue-bound (benchmarks/gpu/NOTES.md): 132 SMs x
128 FP32 lanes x ~1.98 GHz = 3.3e13 thread-instructions/s, so at ImageNet scale (3.84e9
entries) every instruction per entry costs ~0.115 ms a pass; one read of the input is 3.39 ms.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))

NS = "sinkhorn_ot::cuda::"
# (name, input entries per thread per trip of the row loop)
DEFAULT = [
    (NS + "fused_pass_pipe_kernel<float, 16, 1, 4, 192, 2, true, false>", 16),
    (NS + "fused_pass_pipe_kernel<float, 16, 1, 4, 192, 2, true, true>", 16),
    (NS + "fused_pass_pipe_kernel<float, 16, 1, 4, 192, 2, false, false>", 16),
    (NS + "fused_pass_pipe_kernel<float, 8, 1, 4, 384, 2, true, false>", 8),
    (NS + "fused_pass_pipe_kernel<" + NS + "bf16_t, 16, 1, 4, 192, 2, true, false>", 16),
    (NS + "fused_pass_kernel<float, 8, 2, 4, 0, true, false>", 16),
    (NS + "fused_pass_kernel<float, 8, 2, 4, 0, true, true>", 16),
    (NS + "labels_kernel<float, 16, 1, 4>", 16),
]


def cuobjdump():
    found = shutil.which("cuobjdump") or shutil.which("cuobjdump", path=os.path.dirname(
        os.path.realpath(shutil.which("nvcc") or "/")))
    if found:
        return found
    hits = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "triton",
                                  "backends", "nvidia", "bin", "cuobjdump"))
    if not hits:
        sys.exit("cuobjdump not found (CUDA toolkit, or the copy bundled with triton)")
    return hits[0]


def hottest_loop(sass):
    """Instruction mix of the longest backward-branch loop of one function."""
    ins = [(int(a, 16), op.strip()) for a, op in
           re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    where = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (a, op) in enumerate(ins):
        m = re.search(r"BRA.*?0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in where:
            lo = where[int(m.group(1), 16)]
            if best is None or i - lo > best[1] - best[0]:
                best = (lo, i)
    if best is None:
        return 0, collections.Counter()
    body = ins[best[0]:best[1] + 1]
    mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", op).split()[0].split(".")[0]
                              for _, op in body)
    return len(body), mix


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="kernel instances (default: the passes)")
    ap.add_argument("--per", type=int, default=16, help="entries per loop trip for NAMES")
    args = ap.parse_args()
    from sinkhorn_ot import _cuda

    todo = [(n, args.per) for n in args.names] or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        cu = os.path.join(tmp, "k.cu")
        with open(cu, "w") as fh:
            fh.write(_cuda.kernel_source() + "\n" + "\n".join(
                f"auto* sk_ptr{i} = &{n};" for i, (n, _) in enumerate(todo)))
        cubin = os.path.join(tmp, "k.cubin")
        r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "-o", cubin, cu,
                            "-Xptxas", "-v"], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        info = {}
        for m in re.finditer(r"Compiling entry function '(\w+)'(.*?)Used (\d+) registers",
                             r.stderr, re.S):
            spill = re.search(r"(\d+) bytes spill stores", m.group(2))
            info[m.group(1)] = (int(m.group(3)), int(spill.group(1)) if spill else 0)
        sass = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True,
                              text=True).stdout
    funcs = {f.split("\n", 1)[0].strip(): f for f in re.split(r"\n\s*Function : ", sass)[1:]}
    names = subprocess.run(["c++filt"], input="\n".join(funcs), capture_output=True,
                           text=True).stdout.split("\n")
    by_name = {d.split("(")[0].replace("void ", "", 1): m for m, d in zip(funcs, names)}
    print(f"{'kernel instance':70s} regs spill  loop  per entry  MUFU/entry")
    for name, per in todo:
        mangled = by_name.get(name, "")
        n, mix = hottest_loop(funcs.get(mangled, ""))
        reg, spill = info.get(mangled, (0, 0))
        short = name.replace(NS, "")
        print(f"{short:70s} {reg:4d} {spill:5d} {n:5d} {n / per:10.1f} {mix['MUFU'] / per:11.2f}")


if __name__ == "__main__":
    main()
