"""The prepared device check: everything this project can only learn on an NVIDIA GPU, in one short run.

    bench/gpu_check.sh [--out bench/results/gpu-check.json] [--only STEP,...] [--budget-s 480]

Steps, each a subprocess with its own time limit, run in this order (all fit in about 8 minutes of an
H100; the budget stops starting steps that would not fit):

- `env`: torch, CUDA, the device, Triton (no subprocess);
- `cuda_tests`: the test modules whose tests need CUDA (graph capture, step staging) and
  tests/test_triton_kernels.py, where every Triton kernel and the engine's Triton paths run natively;
- `aot`: tests/test_triton_aot.py (the sm_80 / sm_90 compile checks, on the machine's own Triton);
- `engine`: `bench/engine.py --device cuda --quick` (its figures: tok/s, share of the matmul roofline,
  speed-up over HF generate);
- `serve`: a GPU quick of `bench/serve.py` (HTTP tok/s against the engine's).

One JSON object is written to `--out` and printed as the last line: per step its exit status, seconds,
pytest's counts or the benchmark's own last-line JSON, and the tail of its output when it failed. Exit
status 0 when every step that ran passed, 1 when one failed, 2 when there is no CUDA device (the JSON
still says so). It installs nothing (bench/gpu_check.sh installs only this package, without
dependencies: the machine's torch and Triton are used as they are).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = ["tests/test_graphs.py", "tests/test_step_io.py", "tests/test_triton_kernels.py"]
# name -> (seconds allowed, the command after `python`)
STEPS: dict[str, tuple[int, list[str]]] = {
    "cuda_tests": (200, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]),
    "aot": (60, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_aot.py"]),
    "engine": (150, ["bench/engine.py", "--device", "cuda", "--quick"]),
    "serve": (150, ["bench/serve.py", "--device", "cuda", "--quick", "--sweep", "100", "--rounds", "1"]),
}


@dataclass
class StepResult:
    name: str
    status: str  # "passed", "failed", "timed out", "skipped: <why>"
    seconds: float = 0.0
    returncode: int | None = None
    figures: dict = field(default_factory=dict)  # the benchmark's last-line JSON, or pytest's counts
    tail: str = ""  # the output's end, when the step did not pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu-check.json")
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of: {', '.join(STEPS)}")
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no step that would end past this")
    args = ap.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(args.only) - set(STEPS))
    if unknown:
        ap.error(f"--only: unknown steps {unknown}; expected some of {list(STEPS)}")
    if args.budget_s <= 0:
        ap.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")
    return args


def environment() -> dict:
    """What this machine runs: torch, CUDA, the device, Triton."""
    import torch

    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if env["cuda"]:
        props = torch.cuda.get_device_properties(0)
        env |= {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "cuda_runtime": torch.version.cuda,
        }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def last_json(text: str) -> dict:
    """The last line of `text` that is a JSON object ({} when none is)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(found, dict):
                return found
    return {}


def junit_counts(path: Path) -> dict[str, int]:
    """pytest's --junitxml report -> {"tests", "failures", "errors", "skipped", "passed"}."""
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def run_step(name: str, args: list[str], timeout: float, workdir: Path) -> StepResult:
    """Run `python args...` from the repository root within `timeout` seconds."""
    cmd = [sys.executable, *args]
    report = workdir / f"{name}.xml"
    if "pytest" in args:
        cmd.append(f"--junitxml={report}")
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        return StepResult(name, "timed out", round(time.monotonic() - t0, 1), None, {}, out[-3000:])
    seconds = round(time.monotonic() - t0, 1)
    output = done.stdout + done.stderr
    figures = junit_counts(report) if report.exists() else last_json(done.stdout)
    status = "passed" if done.returncode == 0 else "failed"
    return StepResult(
        name, status, seconds, done.returncode, figures, "" if status == "passed" else output[-3000:]
    )


def check(args: argparse.Namespace, workdir: Path) -> dict:
    """Every chosen step, within the budget -> the report."""
    env = environment()
    results: list[StepResult] = []
    started = time.monotonic()
    for name in args.only:
        limit, cmd = STEPS[name]
        left = args.budget_s - (time.monotonic() - started)
        if not env["cuda"]:
            results.append(StepResult(name, "skipped: no CUDA device"))
        elif left < limit:
            results.append(
                StepResult(name, f"skipped: {left:.0f} s of the budget left, the step may take {limit}")
            )
        else:
            results.append(run_step(name, cmd, limit, workdir))
    ran = [r for r in results if not r.status.startswith("skipped")]
    return {
        "env": env,
        "steps": {r.name: asdict(r) for r in results},
        "passed": bool(ran) and all(r.status == "passed" for r in ran),  # every step that ran
        "skipped": [r.name for r in results if r not in ran],
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as d:
        report = check(args, Path(d))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, step in report["steps"].items():
        print(f"{name:12s} {step['status']:40s} {step['seconds']:7.1f} s")
    print(json.dumps(report))
    if not report["env"]["cuda"]:
        return 2
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
