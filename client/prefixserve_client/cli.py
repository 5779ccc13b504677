"""`prefixserve-client`: the SDK at a terminal.

    prefixserve-client generate --prefix pfx-... "name : Aromi" --stream [--adapter pfx-lora...]
    prefixserve-client evaluate pfx-... held_out.jsonl --metrics bleu,rouge_l,loss
    prefixserve-client score --prefix pfx-... "name : Aromi" "Aromi is a pub." --top 3
    prefixserve-client prefixes list | upload PATH | from-text TEXT | get ID | delete ID
    prefixserve-client train data.jsonl --epochs 5           # shows progress, prints the prefix
    prefixserve-client job JOB_ID [--wait | --cancel] [--plot loss.png]   # --plot: the [plot] extra
    prefixserve-client jobs                                   # your jobs, newest first, with loss sparklines
    prefixserve-client usage [--days N]                       # your usage per day, stored prefixes, limits

    prefixserve-client admin tenants list | get NAME
    prefixserve-client admin tenants create NAME [--weight W] [--disabled] [--limit NAME=VALUE ...]
    prefixserve-client admin tenants update NAME [--weight W] [--status active|disabled]
                                                 [--limit NAME=VALUE ...] [--reset-limit NAME ...]
    prefixserve-client admin keys issue TENANT [--name LABEL] | list TENANT | revoke TENANT KEY_ID
    prefixserve-client admin usage [--days N] [--tenant T]    # every tenant's usage per day

Server and key from --base-url / --api-key or PREFIXSERVE_BASE_URL / PREFIXSERVE_API_KEY. The admin
commands use the server's admin key: --admin-key or PREFIXSERVE_ADMIN_KEY (else the API key). Limits:
requests_per_minute, tokens_per_minute, max_concurrent, max_stored_prefixes, max_stored_bytes,
max_active_jobs (0: unlimited; --reset-limit: back to the server's default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from ._client import Client, JobFailed
from ._errors import PrefixServeError
from ._models import ApiKey, JobState, Prefix, Tenant, UsageDay
from ._plot import plot_losses, sparkline

ENV_ADMIN_KEY = "PREFIXSERVE_ADMIN_KEY"
USAGE_COLUMNS = {  # heading: UsageDay field
    "REQUESTS": "requests",
    "PROMPT": "prompt_tokens",
    "PREFIX": "prefix_tokens",
    "GENERATED": "generated_tokens",
    "TRAINED": "training_example_epochs",
    "EVALUATED": "evaluation_examples",
    "STORED_BYTES": "stored_bytes",
}
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


def _usage_table(days: list[UsageDay], totals: UsageDay | None = None) -> None:
    """One row per tenant and day (a "total" day for `totals`); each count right-aligned under its heading."""
    widths = {head: max(len(head), 9) for head in USAGE_COLUMNS}
    print(f"{'DAY':<10} {'TENANT':<20} " + " ".join(f"{h:>{w}}" for h, w in widths.items()))
    for d in [*days, *([totals] if totals is not None else [])]:
        counts = " ".join(f"{getattr(d, f):>{widths[h]}}" for h, f in USAGE_COLUMNS.items())
        print(f"{d.day:<10} {d.tenant:<20} {counts}")


def _limits_text(limits: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(limits.items())) or "-"


def _usage(client: Client, a: argparse.Namespace) -> None:
    report = client.usage(a.days)
    _usage_table(report.days, report.totals)
    print(f"stored now: {report.stored.prefixes} prefixes, {report.stored.bytes} bytes")
    print(f"limits (0: unlimited): {_limits_text(report.limits)}")


# ---- admin ----------------------------------------------------------------------------------------
def _limit(text: str) -> tuple[str, int]:
    """`--limit name=value` (argparse type)."""
    name, sep, value = text.partition("=")
    if not (sep and name.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected a whole number, got {value!r}") from None


def _limits(a: argparse.Namespace) -> dict[str, int | None] | None:
    """The limits to send: those set by --limit, and those of --reset-limit as None (the default)."""
    limits = {**dict(a.limit or []), **dict.fromkeys(getattr(a, "reset_limit", None) or [])}
    return limits or None


def _print_tenants(tenants: list[Tenant]) -> None:
    print(f"{'NAME':<20} {'STATUS':<8} {'WEIGHT':>7} {'SOURCE':<8} {'KEYS':>4} {'CONFIG':>6}  LIMITS")
    for t in tenants:
        print(
            f"{t.name:<20} {t.status:<8} {t.weight:>7g} {t.source:<8} {t.keys:>4} {t.config_keys:>6}  "
            f"{_limits_text(t.limits)}"
        )


def _print_keys(keys: list[ApiKey]) -> None:
    print(f"{'KEY_ID':<20} {'NAME':<24} CREATED")
    for k in keys:
        print(f"{k.key_id:<20} {k.name[:24]:<24} {k.created_at}")


def _admin_tenants(client: Client, a: argparse.Namespace) -> None:
    tenants = client.admin.tenants
    if a.action == "list":
        _print_tenants(tenants.list())
    elif a.action == "get":
        _print_json(tenants.get(a.name))
    elif a.action == "create":
        status = "disabled" if a.disabled else "active"
        _print_json(tenants.create(a.name, weight=a.weight, status=status, limits=_limits(a)))
    elif a.action == "update":
        _print_json(tenants.update(a.name, status=a.status, weight=a.weight, limits=_limits(a)))


def _admin_keys(client: Client, a: argparse.Namespace) -> None:
    keys = client.admin.keys
    if a.action == "issue":
        issued = keys.issue(a.tenant, a.name)
        print(issued.key)  # alone on stdout, for KEY=$(prefixserve-client admin keys issue ...)
        print(f"key {issued.key_id} of tenant {issued.tenant!r}: it will not be shown again", file=sys.stderr)
    elif a.action == "list":
        _print_keys(keys.list(a.tenant))
    elif a.action == "revoke":
        keys.revoke(a.tenant, a.key_id)
        print(f"revoked {a.key_id}")


def _admin_usage(client: Client, a: argparse.Namespace) -> None:
    _usage_table(client.admin.usage(a.days, a.tenant))


def _add_admin(sub: argparse._SubParsersAction) -> None:
    ad = sub.add_parser("admin", help="tenants, their API keys and every tenant's usage (the admin key)")
    ad.add_argument(  # SUPPRESS: not given here, the top-level --admin-key stands
        "--admin-key", default=argparse.SUPPRESS, help="the server's admin key (or PREFIXSERVE_ADMIN_KEY)"
    )
    groups = ad.add_subparsers(dest="admin_command", required=True)

    group = groups.add_parser("tenants", help="list / get / create / update tenants")
    group.set_defaults(func=_admin_tenants)
    tenants = group.add_subparsers(dest="action", required=True)
    tenants.add_parser("list", help="every tenant, with its weight, keys and limits")
    tenants.add_parser("get").add_argument("name")
    limit = {"type": _limit, "action": "extend", "nargs": "+", "metavar": "NAME=VALUE", "default": None}
    create = tenants.add_parser("create")
    create.add_argument("name")
    create.add_argument("--weight", type=float, default=1.0, help="its share of the engine (default 1)")
    create.add_argument("--disabled", action="store_true", help="create it disabled")
    create.add_argument("--limit", **limit)
    update = tenants.add_parser("update")
    update.add_argument("name")
    update.add_argument("--weight", type=float, default=None)
    update.add_argument("--status", choices=["active", "disabled"], default=None)
    update.add_argument("--limit", **limit)
    update.add_argument(
        "--reset-limit", action="extend", nargs="+", metavar="NAME", default=None, help="back to the default"
    )

    group = groups.add_parser("keys", help="issue / list / revoke a tenant's API keys")
    group.set_defaults(func=_admin_keys)
    keys = group.add_subparsers(dest="action", required=True)
    issue = keys.add_parser("issue", help="print a new key (shown only this once)")
    issue.add_argument("tenant")
    issue.add_argument("--name", default="", help="a label for the key")
    keys.add_parser("list", help="the tenant's issued keys (not the keys themselves)").add_argument("tenant")
    revoke = keys.add_parser("revoke")
    revoke.add_argument("tenant")
    revoke.add_argument("key_id")

    usage = groups.add_parser("usage", help="every tenant's usage per day, newest first")
    usage.add_argument("--days", type=int, default=7)
    usage.add_argument("--tenant", default=None)
    usage.set_defaults(func=_admin_usage)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="prefixserve-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--admin-key", default=None, help="for the admin commands (or PREFIXSERVE_ADMIN_KEY)")
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

    u = sub.add_parser("usage", help="your usage per day, what you store now and your limits")
    u.add_argument("--days", type=int, default=7)
    u.set_defaults(func=_usage)
    _add_admin(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prefixes" and args.action != "list" and not args.target:
        print(f"prefixes {args.action} needs a target", file=sys.stderr)
        return 2
    key = args.api_key
    if args.command == "admin":
        key = args.admin_key or os.environ.get(ENV_ADMIN_KEY) or args.api_key  # (None: PREFIXSERVE_API_KEY)
    try:
        with Client(args.base_url, key) as client:
            args.func(client, args)
    except PrefixServeError as exc:
        print(f"error ({type(exc).__name__}, {exc.status or 'no response'}): {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
