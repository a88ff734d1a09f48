"""AOT report: compile every kernel in every launch config for sm_80 and sm_90, offline, and read the cubin.

    python -m phi3fast.kernels.report [--json] [--arch sm_80 --arch sm_90] [--match REGEX] [--jobs N]

Rows: kernel, config, arch, regs, spill_bytes, shared_bytes, tensor_cores, error. No GPU is needed: triton.compile
targets a GPUTarget, and the cuobjdump bundled with Triton reads the cubin:
- regs and spill_bytes from `cuobjdump -res-usage` (spill_bytes = STACK + LOCAL: ptxas places spilled registers
  in the local-memory stack frame, and none of our kernels uses local arrays, so any local memory is a spill);
- shared_bytes = the dynamic shared memory Triton allocates (pipelining buffers) + static shared;
- tensor_cores: HMMA (sm_80) or HGMMA/HMMA (sm_90) instructions in `cuobjdump -sass`.
The specs come from `aot_specs()` of every module in phi3fast.kernels. Exits 1 if any row has an error or spills.
Kernels must be compiled for real, so the report re-executes itself with TRITON_INTERPRET=0 if it is set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHES = {"sm_80": 80, "sm_90": 90}
COLUMNS = ("kernel", "config", "arch", "regs", "spill_bytes", "shared_bytes", "tensor_cores", "error")


@dataclass(frozen=True)
class Row:
    kernel: str
    config: str
    arch: str
    regs: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    tensor_cores: bool | None
    error: str


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path}: Triton's bundled cuobjdump is missing")
    return str(path)


def collect_specs() -> list:
    """aot_specs() of every phi3fast.kernels module that defines it (other engineers' kernels included)."""
    import phi3fast.kernels as pkg

    specs = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name in ("report", "_aot", "backend", "nf4_reference"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(module, "aot_specs"):
            specs.extend(module.aot_specs())
    return specs


def compile_spec(spec, arch: str, workdir: Path) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        signature = dict(spec.signature)
        for name in spec.constexprs:
            signature[name] = "constexpr"
        attrs = {(spec.kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
        src = ASTSource(fn=spec.kernel, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", ARCHES[arch], 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        cubin = workdir / f"{os.getpid()}_{spec.name}_{arch}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = _cuobjdump()
        usage = subprocess.run(
            [tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
        mma = r"\bHGMMA\b|\bHMMA\b" if arch == "sm_90" else r"\bHMMA\b"
        return Row(
            spec.name,
            spec.config,
            arch,
            res.get("REG"),
            res.get("STACK", 0) + res.get("LOCAL", 0),
            compiled.metadata.shared + res.get("SHARED", 0),
            re.search(mma, sass) is not None,
            "",
        )
    except Exception as exc:  # a row per failure: the report shows every config, broken ones included
        return Row(spec.name, spec.config, arch, None, None, None, None, f"{type(exc).__name__}: {exc}"[:300])


_SPECS: list = []  # filled before the worker processes fork, so they inherit the JITFunctions (not picklable)


def _compile_one(job: tuple[int, str, str]) -> Row:
    index, arch, workdir = job
    return compile_spec(_SPECS[index], arch, Path(workdir))


def run(arches: list[str], jobs: int = 0, match: str | None = None, progress: bool = True) -> list[Row]:
    """Compile every spec (or those whose "kernel config" matches the regex) for every arch, in `jobs` worker
    processes (0 = one per core). Rows keep the spec order."""
    _SPECS[:] = [s for s in collect_specs() if match is None or re.search(match, f"{s.name} {s.config}")]
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = [(i, arch, tmp) for i in range(len(_SPECS)) for arch in arches]
        ctx = multiprocessing.get_context("fork")  # compile only, no CUDA context, so fork is safe
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            rows = []
            for row in pool.map(_compile_one, work):
                rows.append(row)
                if progress:
                    elapsed = time.perf_counter() - t0
                    print(f"\r[{len(rows)}/{len(work)}] {row.kernel} {elapsed:.0f}s", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return rows


def format_table(rows: list[Row]) -> str:
    cells = [[("" if v is None else str(v)) for v in asdict(r).values()] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phi3fast.kernels.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHES), help="default: sm_80 and sm_90")
    parser.add_argument("--jobs", type=int, default=0, help="compile processes (default: one per core)")
    parser.add_argument(
        "--match", help="only specs whose 'kernel config' matches this regex, e.g. 'bf16,dq=1'"
    )
    args = parser.parse_args(argv)
    rows = run(args.arch or sorted(ARCHES), jobs=args.jobs, match=args.match, progress=not args.json)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        print(format_table(rows))
    bad = [r for r in rows if r.error or r.spill_bytes]
    if bad and not args.json:
        print(f"{len(bad)} of {len(rows)} rows failed or spill", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Kernels were decorated as interpreted functions at import; compile needs the real JIT: start over.
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        sys.exit(
            subprocess.run(
                [sys.executable, "-m", "phi3fast.kernels.report", *sys.argv[1:]], env=env
            ).returncode
        )
    sys.exit(main())
