"""Shared helpers for the benchmark scripts: where the real data is, importing it once, tables."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
WORK = Path(os.environ.get("AUTOPLAN_BENCH_DIR", ROOT / "benchmarks" / "work"))

IMPORTS = {
    "TaskXRay": ["--images", SHARED / "jsrt_lungs/images", "--masks", SHARED / "jsrt_lungs/masks",
                 "--label-map", "150=right_lung,200=left_lung,250=heart"],
    "TaskDerm": ["--images", SHARED / "ham10000/images", "--labels", SHARED / "ham10000/HAM10000_metadata.csv",
                 "--id-column", "image_id", "--label-column", "dx", "--group-column", "lesion_id"],
    "TaskHippocampus": ["--images", SHARED / "hippocampus/imagesTr", "--masks", SHARED / "hippocampus/labelsTr",
                        "--label-map", "1=anterior,2=posterior"],
}


def folders_args(work=WORK):
    return ["--raw", str(work / "raw"), "--preprocessed", str(work / "preprocessed"),
            "--results", str(work / "results")]


def autoplan(*args, check=True) -> float:
    """Run the CLI in a subprocess (as a user would); returns wall seconds."""
    started = time.monotonic()
    command = [sys.executable, "-m", "autoplan", *map(str, args)]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=check)
    return time.monotonic() - started


def ensure_imported(name, work=WORK):
    if not SHARED.is_dir():
        sys.exit(f"real datasets not found at {SHARED}: see ../shared/datasets/README.md")
    if not (work / "raw" / name / "dataset.json").is_file():
        autoplan("import", name, *IMPORTS[name], "--raw", work / "raw")


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits=3):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def measured_run(command, env=None, cwd=None) -> dict:
    """Run a command; wall seconds, peak resident memory (MB) of its largest process, output.

    ``os.wait4`` reports the maximum RSS over the process and every descendant it waited
    for: the largest single process, not the sum of parallel workers.
    """
    started = time.monotonic()
    process = subprocess.Popen([str(c) for c in command], env=env, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.monotonic() - started, "peak_mb": usage.ru_maxrss / 1024,
            "returncode": process.returncode, "output": output}
