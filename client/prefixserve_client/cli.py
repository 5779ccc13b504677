"""`prefixserve-client`: the SDK at a terminal.

    prefixserve-client generate --prefix pfx-... "name : Aromi" --stream [--adapter pfx-lora...]
    prefixserve-client evaluate pfx-... held_out.jsonl --metrics bleu,rouge_l,loss
    prefixserve-client score --prefix pfx-... "name : Aromi" "Aromi is a pub." --top 3
    prefixserve-client prefixes list | upload PATH | from-text TEXT | get ID | delete ID
    prefixserve-client train data.jsonl --epochs 5           # shows progress, prints the prefix
    prefixserve-client job JOB_ID [--wait | --cancel] [--plot loss.png]   # --plot: the [plot] extra
    prefixserve-client jobs                                   # your jobs, newest first, with loss sparklines

Server and key from --base-url / --api-key or PREFIXSERVE_BASE_URL / PREFIXSERVE_API_KEY.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ._client import Client, JobFailed
from ._errors import PrefixServeError
from ._models import JobState, Prefix
from ._plot import plot_losses, sparkline

HYPER = {
    "prefix_len": int,
    "hidden": int,
    "epochs": int,
    "batch_size": int,
    "learning_rate": float,
    "warmup_steps": int,
    "weight_decay": float,
    "max_length": int,
    "val_fraction": float,
    "seed": int,
}


def _print_json(obj) -> None:
    print(json.dumps(obj.model_dump() if hasattr(obj, "model_dump") else obj, indent=2))


def _print_prefixes(prefixes: list[Prefix]) -> None:
    print(f"{'ID':<24} {'NAME':<20} {'OWNER':<12} {'VISIBILITY':<10} {'SOURCE':<7} {'P':>4}")
    for p in prefixes:
        name, owner = p.name[:20], p.owner[:12]
        print(f"{p.id:<24} {name:<20} {owner:<12} {p.visibility:<10} {p.source:<7} {p.prefix_len:>4}")


def _generate(client: Client, a: argparse.Namespace) -> None:
    params = {
        k: v
        for k, v in {
            "max_new_tokens": a.max_new_tokens,
            "temperature": a.temperature,
            "top_p": a.top_p,
            "top_k": a.top_k,
            "seed": a.seed,
            "stop": a.stop,
            "logprobs": a.logprobs,
            "adapter_id": a.adapter,
        }.items()
        if v is not None
    }
    if a.stream:
        for piece in client.stream(a.prefix, a.input, **params):
            print(piece, end="", flush=True)
        print()
    else:
        result = client.generate(a.prefix, a.input, **params)
        print(result.text)
        for t in result.logprobs or []:
            print(f"{t.logprob:10.4f}  {t.token!r}", file=sys.stderr)
        print(f"[{result.finish_reason}; {result.usage.completion_tokens} tokens]", file=sys.stderr)


def _evaluate(client: Client, a: argparse.Namespace) -> None:
    metrics = a.metrics.split(",") if a.metrics else None
    job = client.prefixes.evaluate(a.prefix, a.data, metrics=metrics, max_new_tokens=a.max_new_tokens)
    print(f"evaluation job {job.id} queued", file=sys.stderr)
    job.wait(progress=True)
    _print_json(job.state.evaluation)


def _score(client: Client, a: argparse.Namespace) -> None:
    result = client.score(a.prefix, a.input, a.continuation, top_logprobs=a.top)
    for t in result.tokens:
        alternatives = "  ".join(f"{alt.token!r} {alt.logprob:.3f}" for alt in t.top)
        print(f"{t.logprob:10.4f}  {t.token!r}" + (f"   [{alternatives}]" if alternatives else ""))
    print(f"total logprob {result.total_logprob:.4f} over {len(result.tokens)} tokens")


def _prefixes(client: Client, a: argparse.Namespace) -> None:
    visibility = "public" if getattr(a, "public", False) else "private"
    if a.action == "list":
        _print_prefixes(client.prefixes.list())
    elif a.action == "upload":
        _print_json(client.prefixes.upload(a.target, a.name, visibility))
    elif a.action == "from-text":
        _print_json(client.prefixes.from_text(a.target, a.name, visibility))
    elif a.action == "get":
        _print_json(client.prefixes.get(a.target))
    elif a.action == "delete":
        client.prefixes.delete(a.target)
        print(f"deleted {a.target}")


def _train(client: Client, a: argparse.Namespace) -> None:
    hyper = {k: getattr(a, k) for k in HYPER if getattr(a, k) is not None}
    job = client.prefixes.train(a.file, a.name, "public" if a.public else "private", **hyper)
    print(f"job {job.id} queued", file=sys.stderr)
    if a.no_wait:
        print(job.id)
        return
    _print_json(job.wait(progress=True, poll_s=a.poll))


def _job(client: Client, a: argparse.Namespace) -> None:
    job = client.jobs.get(a.job_id)
    if a.cancel:
        job.cancel(wait=True)  # prints the job once it has stopped: "cancelled" (or how it ended)
    elif a.wait:
        with contextlib.suppress(JobFailed):  # a failed or cancelled job is still shown (and plotted)
            job.wait(progress=True, poll_s=a.poll)
    if a.plot:
        print(f"loss curve written to {plot_losses(job.state, a.plot)}", file=sys.stderr)
    _print_json(job.state)


def _print_jobs(jobs: list[JobState]) -> None:
    print(f"{'ID':<22} {'STATUS':<10} {'STEP':>11} {'LOSS':>8}  {'CURVE':<20} NAME")
    for j in jobs:
        loss = f"{j.loss:.4f}" if j.loss is not None else "-"
        step = f"{j.step}/{j.total_steps}"
        print(f"{j.id:<22} {j.status:<10} {step:>11} {loss:>8}  {sparkline(j.losses, 20):<20} {j.name[:30]}")


def _jobs(client: Client, a: argparse.Namespace) -> None:
    _print_jobs(client.jobs.list(a.limit))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="prefixserve-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--api-key", default=None)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (with --stream: token by token)")
    g.add_argument("input")
    g.add_argument("--prefix", default=None, help="prefix id of any kind (none: the bare model)")
    g.add_argument("--adapter", default=None, help="a LoRA or bottleneck adapter id beside --prefix")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("--logprobs", type=int, default=None, help="print each token's logprob (k alternatives)")
    g.add_argument("--stream", action="store_true")
    g.set_defaults(func=_generate)

    s = sub.add_parser(
        "score", help="the log-probability of a continuation after an input (nothing generated)"
    )
    s.add_argument("input")
    s.add_argument("continuation")
    s.add_argument("--prefix", default=None, help="prefix id (none: the bare model)")
    s.add_argument("--top", type=int, default=0, help="also show the k most likely tokens at each place")
    s.set_defaults(func=_score)

    p = sub.add_parser("prefixes", help="list / upload / from-text / get / delete prefixes")
    p.add_argument("action", choices=["list", "upload", "from-text", "get", "delete"])
    p.add_argument("target", nargs="?", help="a path (upload), a text (from-text) or an id (get, delete)")
    p.add_argument("--name", default="")
    p.add_argument("--public", action="store_true")
    p.set_defaults(func=_prefixes)

    t = sub.add_parser("train", help="train a prefix from a JSONL file of {input, output} and watch it")
    t.add_argument("file")
    t.add_argument("--name", default="")
    t.add_argument("--public", action="store_true")
    t.add_argument("--no-wait", action="store_true", help="print the job id and return")
    t.add_argument("--poll", type=float, default=1.0)
    for name, kind in HYPER.items():
        t.add_argument("--" + name.replace("_", "-"), type=kind, default=None, dest=name)
    t.set_defaults(func=_train)

    j = sub.add_parser("job", help="show a training job")
    j.add_argument("job_id")
    j.add_argument("--wait", action="store_true")
    j.add_argument("--cancel", action="store_true")
    j.add_argument("--poll", type=float, default=1.0)
    j.add_argument("--plot", default=None, metavar="PATH", help="write the loss curve to an image (PNG, SVG)")
    j.set_defaults(func=_job)

    js = sub.add_parser("jobs", help="your jobs, newest first, with their loss curves as sparklines")
    js.add_argument("--limit", type=int, default=20)
    js.set_defaults(func=_jobs)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prefixes" and args.action != "list" and not args.target:
        print(f"prefixes {args.action} needs a target", file=sys.stderr)
        return 2
    try:
        with Client(args.base_url, args.api_key) as client:
            args.func(client, args)
    except PrefixServeError as exc:
        print(f"error ({type(exc).__name__}, {exc.status or 'no response'}): {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
