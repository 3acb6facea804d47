"""Run every benchmark and collect their tables into benchmarks/RESULTS.md.

    python benchmarks/run_all.py --quick     # under 30 minutes on 2 cores
    python benchmarks/run_all.py             # full budgets (JSRT 10, hippocampus 20, HAM10000 30 min)

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


def run(script, *args):
    command = [sys.executable, str(HERE / script), *map(str, args)]
    print("$", " ".join(command[1:]), flush=True)
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    table = "\n".join(line for line in result.stdout.splitlines() if line.startswith("|") or line.startswith("Axis"))
    if result.returncode != 0:
        table += f"\n\n(failed with exit code {result.returncode}: {result.stderr.strip().splitlines()[-1:]})"
    return table or result.stdout[-2000:], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--nnunet-python", default="/tmp/nnunet_env/bin/python")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    nnunet = ["--nnunet-python", args.nnunet_python] if Path(args.nnunet_python).exists() else []
    sections = [
        ("Fingerprint: autoplan vs nnUNetv2_extract_fingerprint (hippocampus, 220 cases)",
         "fingerprint.py", ["--repeats", "1" if args.quick else "3", *nnunet]),
        ("Memory model: estimate vs the real networks", "memory_model.py", []),
        ("Loading vs training throughput (default augmentation)", "loader.py",
         ["--batches", "10" if args.quick else "30"]),
        ("Prediction speed", "predict.py", ["--cases", "5" if args.quick else "20", *nnunet]),
        ("Accuracy, fold 0, CPU time budget", "accuracy.py", ["--quick"] if args.quick else []),
    ]
    lines = [f"# autoplan benchmark results\n",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
             f"{__import__('os').cpu_count()} cores, mode {'quick' if args.quick else 'full'}.\n"]
    for title, script, script_args in sections:
        table, seconds = run(script, *script_args)
        lines += [f"## {title}\n", f"`python benchmarks/{script} {' '.join(map(str, script_args))}` "
                  f"({seconds / 60:.1f} min)\n", table, ""]
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
