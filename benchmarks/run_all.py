"""Run every benchmark and collect their tables into benchmarks/RESULTS.md.

    python benchmarks/run_all.py --quick     # under 30 minutes on 2 cores (budgets 3 / 5+5 / 5 min)
    python benchmarks/run_all.py             # full budgets: JSRT 10, hippocampus 20 (+20 for nnU-Net),
                                             # HAM10000 30 min; about 2 hours

The nnU-Net side needs nnunetv2 in its own environment (never our dependency):
``python3 -m venv /tmp/nnunet_env && /tmp/nnunet_env/bin/pip install torch==2.13.0 nnunetv2``
(`benchmarks/fingerprint.py` creates it when missing); pass ``--nnunet-python``.
"""

import argparse
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
FULL_BUDGET_NOTES = HERE / "full_budget_runs.md"


def table_lines(lines: list) -> list:
    """A script's Markdown table rows, each table with the caption line printed above it."""
    kept, after_table = [], False
    for index, line in enumerate(lines):
        if line.startswith("|"):
            if not kept or not kept[-1].startswith("|"):
                caption = next((c for c in reversed(lines[:index]) if c.strip()), "")
                kept += ["", caption, ""] if caption and not caption.startswith("$") else [""]
            kept.append(line)
            after_table = True
        elif after_table and line.strip():      # a summary printed right under the table
            kept += [""] * kept[-1].startswith("|") + [line]
        else:
            after_table = False
    return kept


def run(script, *args):
    command = [sys.executable, str(HERE / script), *map(str, args)]
    print("$", " ".join(command[1:]), flush=True)
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    table = "\n".join(table_lines(result.stdout.splitlines()))
    if result.returncode != 0:
        table += f"\n\n(failed with exit code {result.returncode}: {result.stderr.strip().splitlines()[-1:]})"
    return table or "```\n" + result.stdout.strip() + "\n```", seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--nnunet-python", default="/tmp/nnunet_env/bin/python")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    nnunet = ["--nnunet-python", args.nnunet_python] if Path(args.nnunet_python).exists() else []
    started = time.monotonic()
    # hippocampus accuracy comes from the nnU-Net comparison (same budget for both sides)
    sections = [
        ("Fingerprint: autoplan vs nnUNetv2_extract_fingerprint (hippocampus)",
         "fingerprint.py", ["--repeats", "1" if args.quick else "3", *nnunet]),
        ("Memory model: estimate vs the real networks", "memory_model.py", []),
        ("Loading vs training throughput (default augmentation)", "loader.py",
         ["--batches", "10" if args.quick else "30"]),
        ("autoplan vs nnU-Net v2 on hippocampus: preprocessing, plans, training at a fixed budget, "
         "prediction, peak memory", "versus_nnunet.py",
         ["--budget", "5" if args.quick else "20", "--cases", "3" if args.quick else "10", *nnunet]),
        ("Accuracy on JSRT and HAM10000, fold 0, CPU time budget", "accuracy.py",
         ["--only", "TaskXRay,TaskDerm", *(["--quick"] if args.quick else [])]),
    ]
    if not args.quick:
        sections.insert(3, ("Prediction speed (untrained planned networks, both datasets)", "predict.py",
                            ["--cases", "20", *nnunet]))
    lines = ["# autoplan benchmark results\n",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
             f"{__import__('os').cpu_count()} cores, mode {'quick' if args.quick else 'full'}.\n"]
    for title, script, script_args in sections:
        table, seconds = run(script, *script_args)
        lines += [f"## {title}\n", f"`python benchmarks/{script} {' '.join(map(str, script_args))}` "
                  f"({seconds / 60:.1f} min)\n", table, ""]
    lines.append(f"Total: {(time.monotonic() - started) / 60:.1f} min.\n")
    if FULL_BUDGET_NOTES.is_file():     # the longer runs, made one script at a time
        lines += ["---\n", FULL_BUDGET_NOTES.read_text()]
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
