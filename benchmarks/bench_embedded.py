"""Time the embedded model's first use (GGUF → KerasHub preset conversion) and later loads.

Each phase runs in a fresh Python subprocess, as a user's first and second command would:

1. conversion: an empty, temporary ``GEMMA_CSE_CACHE``; ``load_causal_lm()`` assembles the
   GGUF from its PyPI package, converts it to a preset and loads that preset;
2. later load: the same cache again; ``load_causal_lm()`` only loads the finished preset.

Printed per phase: the time until the model is usable (from the subprocess's start; the goal
applies to it), the whole process's wall and CPU time, the child's own split (imports, GGUF
assembly, conversion, ``from_preset``), and the child's peak RSS from the kernel's rusage
for that child (``os.wait4``; ``resource.getrusage(RUSAGE_CHILDREN)`` would report the
maximum over all children so far). Goals on a 2-core CPU machine: conversion ≤ 30 s, later
loads ≤ 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from gemma_cse import models  # first: it selects the JAX backend
import keras_hub  # noqa: F401  (the import cost is part of every load)
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
t1 = time.perf_counter()
gguf = models.embedded_gguf()
t2 = time.perf_counter()
preset = models.resolve_preset(models.EMBEDDED)
t3 = time.perf_counter()
model = models.load_causal_lm()
t4 = time.perf_counter()
print("BENCH " + json.dumps({"import": t1 - t0, "assemble_gguf": t2 - t1,
      "convert": t3 - t2, "from_preset": t4 - t3, "ready_at": time.time(),
      "params": model.count_params()}), flush=True)
"""

GOALS = {"conversion": 30.0, "later load": 10.0}


def run_child(cache: str) -> dict:
    """Run CHILD with ``cache`` as GEMMA_CSE_CACHE; its timings, wall time and peak RSS."""
    env = {**os.environ, "GEMMA_CSE_CACHE": cache}
    start, start_epoch = time.perf_counter(), time.time()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True
    )
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode:
        sys.exit(f"benchmark child failed with exit code {child.returncode}:\n{out}")
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    result = json.loads(line.removeprefix("BENCH "))
    result["wall"] = wall
    result["ready"] = result.pop("ready_at") - start_epoch  # model usable; exit not counted
    result["cpu"] = usage.ru_utime + usage.ru_stime
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=1, help="later loads to time (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary cache")
    args = parser.parse_args(argv)

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())  # other work skews every figure
    cache = tempfile.mkdtemp(prefix="gemma_cse_bench_")
    phases = [("conversion", run_child(cache))]
    phases += [("later load", run_child(cache)) for _ in range(args.loads)]
    print(f"cache: {cache}{'' if args.keep else ' (removed)'}; cpus: {os.cpu_count()}")
    print(f"load average before: {load}")
    for name, r in phases:
        goal = GOALS[name]
        verdict = "ok" if r["ready"] <= goal else "OVER GOAL"
        print(
            f"{name:>10}: ready after {r['ready']:5.1f} s (goal ≤ {goal:.0f} s: {verdict}); "
            f"process {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, "
            f"peak RSS {r['peak_rss_mib']:,.0f} MiB\n"
            f"{'':>12}import {r['import']:.1f} s, assemble GGUF {r['assemble_gguf']:.1f} s, "
            f"convert {r['convert']:.1f} s, from_preset {r['from_preset']:.1f} s"
        )
    if not args.keep:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
