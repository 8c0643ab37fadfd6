"""Instruction counts of the outer-product kernel's store loops, read from its SASS: the
numbers bench/NOTES.md reasons with, reproducible without a GPU.

    python bench/sass.py [--arch sm_90] [--rev GIT_REV]

Compiles csrc/outer_cuda.cu (of the working tree, or of GIT_REV) for one architecture with the
flags the extension's build uses, and prints per kernel instantiation its registers and spills
(ptxas -v) and, for each loop that issues the kernel's wide global stores (STG.E.128; STG.E.64
for the fast path with 8-byte stores), the loop's instructions per store and what they are.
Needs nvcc and cuobjdump (CUDA's, or the copy triton ships); a machine without them gets a
clear error.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[1]
# The extension's nvcc flags (setup.py via torch's cpp_extension), less the -gencode list.
NVCC_FLAGS = [
    "-O3",
    "-std=c++20",
    "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-DINDIVGRAD_WITH_CUDA",
    "-DTORCH_API_INCLUDE_EXTENSION_H",
    "-DTORCH_EXTENSION_NAME=_C",
]
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def find_tool(name):
    """name on PATH, else the copy triton ships with torch; None when neither exists."""
    found = shutil.which(name)
    if found is None:
        triton = Path(torch.utils.cpp_extension.__file__).parents[2] / "triton" / "backends" / "nvidia" / "bin" / name
        found = str(triton) if triton.exists() else None
    return found


def tool(name):
    found = find_tool(name)
    if found is None:
        sys.exit(f"bench/sass.py: {name} not found on PATH (nor triton's copy); install the CUDA toolkit")
    return found


def source_dir(rev, tmp):
    if rev is None:
        return ROOT / "csrc"
    out = Path(tmp) / "csrc"
    out.mkdir()
    names = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "csrc/"], check=True, capture_output=True, text=True
    ).stdout.split()
    for name in names:
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True, capture_output=True)
        (out / Path(name).name).write_bytes(blob.stdout)
    return out


def compile_cubin(src, arch, tmp, source="outer_cuda.cu"):
    cubin = Path(tmp) / f"{Path(source).stem}.cubin"
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths(device_type="cuda")]
    cmd = [
        tool("nvcc"),
        "-cubin",
        f"-arch={arch}",
        "-Xptxas",
        "-v",
        *NVCC_FLAGS,
        *includes,
        str(src / source),
        "-o",
        str(cubin),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"nvcc failed:\n{proc.stderr[-3000:]}")
    return cubin, proc.stderr


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return dict(zip(names, out))


# The kernel's path from its third template argument: the store width (0: the run path), or
# in versions before 8-byte stores, whether it is the (16-byte) fast path.
PATHS = {"0": "run", "false": "run", "16": "fast16", "true": "fast16", "8": "fast8"}


def short(name):
    """outer_kernel<float, float, 16, false>(...) -> outer_kernel<float, fast16, plain>"""
    m = re.search(r"(\w+)<([^,]+), [^,]+, (true|false|\d+), (true|false)>", name)
    if not m:  # a kernel of another shape (earlier versions: one template argument)
        m = re.search(r"(\w+)<([^<>]+)>\(", name)
        return f"{m.group(1)}<{m.group(2).replace('c10::', '')}>" if m else name
    stores = "streaming" if m.group(4) == "true" else "plain"
    return f"{m.group(1)}<{m.group(2).replace('c10::', '')}, {PATHS[m.group(3)]}, {stores}>"


def store_suffix(kernel):
    """The opcode suffix of a kernel's wide stores: 8-byte (.64) for fast8, else 16-byte (.128)."""
    return ".64" if ", fast8," in kernel else ".128"


def registers(ptxas_log):
    """Mangled function name -> (registers, spill bytes stored)."""
    regs, current = {}, None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and current:
            regs.setdefault(current, [0, 0])[1] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            regs.setdefault(current, [0, 0])[0] = int(m.group(1))
    return regs


def functions(sass):
    """Mangled function name -> [(address, opcode, operands)]."""
    funcs, current = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s+Function : (\w+)", line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        m = INSTR.search(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return funcs


def store_loops(instrs, suffix=".128"):
    """Innermost loops (a backward BRA) with stores of this width: [(length, stores, opcode counts)]."""
    loops = []
    for i, (addr, op, operands) in enumerate(instrs):
        target = re.search(r"0x([0-9a-f]+)", operands)
        if op != "BRA" or not target or int(target.group(1), 16) > addr:
            continue
        start = int(target.group(1), 16)
        body = [ins for ins in instrs[: i + 1] if ins[0] >= start]
        stores = sum(ins[1].startswith("STG.E") and ins[1].endswith(suffix) for ins in body)
        if stores:
            loops.append((len(body), stores, Counter(ins[1].split(".")[0] for ins in body)))
    # innermost: drop a loop that contains a shorter one with the same stores
    loops.sort(key=lambda loop: loop[0])
    return [loop for k, loop in enumerate(loops) if all(loop[1] > inner[1] for inner in loops[:k])]


def analyse(rev=None, arch="sm_90"):
    """[(kernel, registers, spill bytes, [(instructions per wide store, opcode counts per store)])]."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin, log = compile_cubin(source_dir(rev, tmp), arch, tmp)
        sass = subprocess.run(
            [tool("cuobjdump"), "-sass", str(cubin)], check=True, capture_output=True, text=True
        ).stdout
    regs, funcs = registers(log), functions(sass)
    names = demangle(list(funcs))
    rows = []
    for mangled in funcs:
        r, spill = regs.get(mangled, [None, None])
        kernel = short(names[mangled])
        loops = [
            (n / s, {k: v / s for k, v in c.most_common()})
            for n, s, c in store_loops(funcs[mangled], store_suffix(kernel))
        ]
        rows.append((kernel, r, spill, loops))
    return sorted(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--rev", help="a git revision whose csrc/ to compile (default: the working tree)")
    parser.add_argument("--opcodes", type=int, default=6, help="most frequent opcodes to list per loop")
    args = parser.parse_args(argv)
    print(f"csrc/outer_cuda.cu at {args.rev or 'working tree'}, {args.arch}")
    print(f"{'kernel':44} {'regs':>4} {'spill':>5}  per wide store (16 bytes; fast8: 8) in each store loop")
    for kernel, r, spill, loops in analyse(args.rev, args.arch):
        desc = (
            "; ".join(
                f"{n:.0f} ({', '.join(f'{k} {v:g}' for k, v in list(ops.items())[: args.opcodes])})" for n, ops in loops
            )
            or "no wide-store loop"
        )
        print(f"{kernel:44} {r if r is not None else '?':>4} {spill if spill is not None else '?':>5}  {desc}")


if __name__ == "__main__":
    main()
