"""Peak process memory of CPU training steps against the planner's count, fp32 and bf16.

    .venv/bin/python benchmarks/cpu_memory.py RUN_FOLD_DIR [RUN_FOLD_DIR ...]

For each trained run folder (its plan.json holds the configuration that was trained) and each
precision this CPU runs (fp32; bf16 where it is native), a fresh process builds the network,
makes 3 training steps at the planned batch and reports its peak resident memory (VmHWM)
minus its resident memory before the network existed: what training adds to the process.
The planner's ``estimated_memory_gb`` on CPU counts training tensors in fp32
(``estimate_training_memory_gb(configuration, "fp32", "cpu")``); the process adds the
allocator's caching and oneDNN's workspace. Prints one table.
"""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import sys
import torch
import torch.nn.functional as F
sys.path.insert(0, {here!r})
from memory_model import build
from autoplan.nets import autocast
from autoplan.runs import RunSpec

def resident(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

configuration = RunSpec.load({plan!r}).configuration
torch.set_num_threads(2)
before = resident("VmRSS:")
net = build(configuration).train()
optimizer = torch.optim.AdamW(net.parameters(), 1e-4)
x = torch.randn(configuration.batch_size, configuration.n_input_channels, *configuration.patch_size)
for _ in range(3):              # from the second step on, the optimiser state exists
    with autocast("cpu", {precision!r}):
        outputs = net(x)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        loss = sum(F.cross_entropy(out.float(), torch.zeros((out.shape[0], *out.shape[2:]), dtype=torch.long))
                   for out in outputs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
print((resident("VmHWM:") - before) / 1e9)
"""


def measure_gb(plan: Path, precision: str) -> float:
    code = CHILD.format(here=str(HERE), plan=str(plan), precision=precision)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trained run folders (…/fold_0)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from common import markdown_table

    from autoplan.nets import cpu_has_native_bf16
    from autoplan.planning import estimate_training_memory_gb
    from autoplan.runs import RunSpec

    precisions = ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
    rows = []
    for run in args.runs:
        configuration = RunSpec.load(run / "plan.json").configuration
        counted = estimate_training_memory_gb(configuration, "fp32", "cpu")
        peaks = [measure_gb(run / "plan.json", precision) for precision in precisions]
        rows.append([f"{run.parent.parent.parent.name} {configuration.name}",
                     "x".join(map(str, configuration.patch_size)), configuration.batch_size,
                     f"{counted:.2f}", *(f"{peak:.2f} ({peak / counted:.1f}x)" for peak in peaks)])
    header = ["run", "input", "batch", "counted GB (fp32)", *(f"peak added GB, {p}" for p in precisions)]
    print("CPU training memory: the planner's count vs the process's peak (2 threads, 3 steps)\n")
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
