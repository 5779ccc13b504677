"""The prepared device check's CPU side (bench/gpu_check.py): its arguments, how it runs and reads each
step, and the JSON it writes where there is no GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402


def test_arguments_name_what_is_wrong(capsys):
    args = gpu_check.parse_args(["--only", "aot,engine", "--budget-s", "100"])
    assert args.only == ["aot", "engine"] and args.budget_s == 100
    assert gpu_check.parse_args([]).only == list(gpu_check.STEPS)
    for bad, expected in (
        (["--only", "aot,gpu"], "unknown steps ['gpu']; expected some of ['cuda_tests'"),
        (["--budget-s", "0"], "expected a positive number of seconds, got 0.0"),
    ):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
        assert expected in capsys.readouterr().err


def test_a_step_reports_its_benchmark_json_its_pytest_counts_or_its_timeout(tmp_path):
    bench = tmp_path / "bench.py"
    bench.write_text('print("table"); print(\'{"tok_s": 12.5}\'); print("done")\n')
    got = gpu_check.run_step("engine", [str(bench)], 60, tmp_path)
    assert (got.status, got.returncode, got.figures, got.tail) == ("passed", 0, {"tok_s": 12.5}, "")
    tests = tmp_path / "test_demo.py"
    tests.write_text(
        "import pytest\ndef test_a(): pass\ndef test_b(): assert 0\n@pytest.mark.skip\ndef test_c(): pass\n"
    )
    got = gpu_check.run_step(
        "cuda_tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)], 60, tmp_path
    )
    assert got.status == "failed" and got.figures == {
        "tests": 3,
        "failures": 1,
        "errors": 0,
        "skipped": 1,
        "passed": 1,
    }
    assert "test_b" in got.tail
    slow = tmp_path / "slow.py"
    slow.write_text("import time\nprint('started', flush=True)\ntime.sleep(30)\n")
    got = gpu_check.run_step("serve", [str(slow)], 2, tmp_path)
    assert got.status == "timed out" and got.returncode is None


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the report where there is no GPU")
def test_without_a_gpu_it_writes_a_report_that_says_so(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    report = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report  # the last line is the same JSON
    assert report["env"]["cuda"] is False and report["env"]["torch"]
    assert report["passed"] is False and report["skipped"] == list(gpu_check.STEPS)
    assert {s["status"] for s in report["steps"].values()} == {"skipped: no CUDA device"}
