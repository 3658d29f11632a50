"""Runs every benchmark against mlx-lm and rewrites the README's results table.

    python -m bench.run_all            # sizes for this 2-core CPU machine
    python -m bench.run_all --full     # the sizes the issues name (for a GPU / Apple Silicon run)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from bench import engine_speed, memory, model_speed, server_speed
from bench.common import backend, describe

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench-table -->", "<!-- /bench-table -->"

TARGETS = {
    "decode_b1": ("≥ 1.0×", lambda r: r >= 1.0),
    "prefill_2048": ("≥ 2×", lambda r: r >= 2.0),
    "prefill_8192": ("≥ 2×", lambda r: r >= 2.0),
    "streams_16": ("≥ 1.5×", lambda r: r >= 1.5),
    "http_streams_16": ("≥ 1.5×", lambda r: r >= 1.5),
}


def fmt(r: dict) -> str:
    a, b = describe(r)
    target, ok = TARGETS.get(r["bench"], ("", None))
    note = f"{target} {'met' if ok(r['ratio']) else 'not met'}" if ok else ""
    if "ours_vs_cold" in r:
        note = f"{r['ours_vs_cold']:.2f}× of our cold (target ≤ 0.2×)"
    return f"| {r['model']} | {r['bench']} | {a} | {b} | {r['ratio']:.2f}× | {note} |"


def table(results: list[dict], header: str) -> str:
    lines = [header, "", "| model | benchmark | deltaserve | mlx-lm | ratio (higher = deltaserve better) | target |",
             "|---|---|---|---|---|---|"]
    lines += [fmt(r) for r in results]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--models", default="tiny,wide")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)
    results = []
    for m in args.models.split(","):
        if args.full:
            results += model_speed.main(["--model", m])
            results += engine_speed.main(["--model", m])
        else:
            results += model_speed.main(["--model", m, "--decode", "64", "--prefill", "512,2048", "--repeats", "1"])
            results += engine_speed.main(["--model", m, "--streams", "1,4,16", "--tokens", "32",
                                          "--ttft-prompt", "1024"])
        results += memory.main(["--model", m, "--tokens", "1024,4096"])
    results += server_speed.main(["--model", "tiny", "--streams", "1,4,16" if not args.full else "1,4,16,32"])
    stamp = time.strftime("%Y-%m-%d")
    header = (f"Measured {stamp} on {backend()}, {platform.processor() or platform.machine()}, "
              f"{'full' if args.full else 'CPU-sized'} run (`python -m bench.run_all{' --full' if args.full else ''}`).")
    md = table(results, header)
    out = REPO / "bench" / "results.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in results))
    print(md)
    if not args.no_readme:
        readme = (REPO / "README.md").read_text()
        if BEGIN in readme and END in readme:
            head, rest = readme.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            (REPO / "README.md").write_text(f"{head}{BEGIN}\n{md}\n{END}{tail}")


if __name__ == "__main__":
    main()
