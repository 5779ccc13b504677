"""Against a running docker-compose deployment: SIGKILL the worker mid-job, restart it, and check the
job still succeeds (reclaimed after PREFIXSERVE_JOB_RECLAIM_S) with exactly one prefix.

    python scripts/compose_kill_worker.py -f docker-compose.yml --api-key KEY [--container main_worker_1]

Run it with the same environment as `docker-compose up` (the restart re-reads the compose file).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from prefixserve_client import Client


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-f", "--compose-file", default="docker-compose.yml")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--container", default=None, help="the worker container (default: found via compose ps)")
    args = ap.parse_args()
    compose = ["docker-compose", "-f", args.compose_file]
    container = (
        args.container
        or subprocess.run(
            [*compose, "ps", "-q", "worker"], check=True, capture_output=True, text=True
        ).stdout.split()[0]
    )
    client = Client(args.base_url, args.api_key)
    examples = [{"input": f"name : {i} | food : x", "output": f"{i} serves x."} for i in range(200)]
    job = client.prefixes.train(
        examples, name=f"kill-check-{int(time.time())}", epochs=40, prefix_len=4, hidden=16, batch_size=4
    )
    while job.refresh().status != "running" or job.state.step < 20:
        time.sleep(0.1)
    print(f"job {job.id} running: step {job.state.step}/{job.state.total_steps}")
    subprocess.run(["docker", "kill", container], check=True, capture_output=True)
    print(f"worker {container[:12]} killed (SIGKILL); job is {job.refresh().status}")
    subprocess.run([*compose, "up", "-d", "worker"], check=True, capture_output=True)
    print("worker restarted")
    prefix = job.wait(poll_s=1, timeout=900)
    same = [p.id for p in client.prefixes.list() if p.name == job.state.name]
    print(f"job {job.state.status} after {job.state.attempts} attempts; prefixes from it: {same}")
    ok = job.state.status == "succeeded" and job.state.attempts == 2 and same == [prefix.id]
    print("kill check passed" if ok else "kill check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
