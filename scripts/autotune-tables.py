"""Summarise the per-operation tables inductor prints while it autotunes (max_autotune_gemm).

    python scripts/autotune-tables.py LOG

Each table names an operation and its shapes, then every choice it timed ("mm 0.0123 ms 100.0% ...",
"triton_mm_7 0.0101 ms ..."), then a line with the seconds spent precompiling and benchmarking. For
each table: the library kernel's time (cuBLAS: the choice without "triton" in its name), the best
choice's, and the seconds it cost; then the totals. Set TORCHINDUCTOR_AUTOTUNE_NUM_CHOICES_DISPLAYED=all
so the library kernel is always in the table.
"""

import re
import sys

HEAD = re.compile(r"^AUTOTUNE (\w+)\((.*)\)$")
CHOICE = re.compile(r"^\s+(\S+) ([0-9.]+) ms")
COST = re.compile(r"AUTOTUNE benchmarking takes ([0-9.]+) seconds and ([0-9.]+) seconds precompiling")


def tables(lines):
    table = None
    for line in lines:
        head = HEAD.match(line)
        if head:
            table = {"op": head.group(1), "shapes": head.group(2), "choices": {}, "bench_s": 0.0, "precompile_s": 0.0}
            continue
        if table is None:
            continue
        choice = CHOICE.match(line)
        if choice:
            table["choices"][choice.group(1)] = float(choice.group(2))
            continue
        cost = COST.search(line)
        if cost:
            table["bench_s"], table["precompile_s"] = float(cost.group(1)), float(cost.group(2))
            yield table
            table = None


def main(path):
    with open(path, errors="replace") as f:
        found = list(tables(f))
    library_total = best_total = seconds = 0.0
    for t in found:
        library = [ms for name, ms in t["choices"].items() if "triton" not in name and ms > 0]
        timed = [ms for ms in t["choices"].values() if ms > 0]
        if not library or not timed:
            continue
        lib, best = min(library), min(timed)
        winner = min(t["choices"], key=lambda name: t["choices"][name] if t["choices"][name] > 0 else float("inf"))
        library_total += lib
        best_total += best
        seconds += t["bench_s"] + t["precompile_s"]
        print(f"{t['op']}({t['shapes'][:60]}): library {lib:.4f} ms, best {best:.4f} ms ({winner}), "
              f"{len(t['choices'])} choices, {t['precompile_s'] + t['bench_s']:.1f} s")
    print(f"{len(found)} tables; library kernels {library_total:.4f} ms, best choices {best_total:.4f} ms "
          f"({(1 - best_total / library_total) * 100 if library_total else 0:.1f}% less); {seconds:.0f} s autotuning")


if __name__ == "__main__":
    main(sys.argv[1])
