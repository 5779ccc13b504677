"""`prefixserve` command line."""

from __future__ import annotations

import argparse
import sys

from .tiny import TinyModelConfig, write_tiny_model


def _tiny_model(args: argparse.Namespace) -> int:
    cfg = TinyModelConfig(
        vocab_size=args.vocab_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        n_positions=args.n_positions,
        seed=args.seed,
    )
    path = write_tiny_model(args.directory, cfg)
    print(f"wrote a tiny GPT-2 checkpoint to {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve
    from .settings import ServerSettings

    given = {
        "model": args.model,
        "host": args.host,
        "port": args.port,
        "api_workers": args.api_workers,
        "ray_address": args.ray_address,
        "ray_replicas": args.replicas,
    }
    settings = ServerSettings.from_env(**{k: v for k, v in given.items() if v})
    if args.ray:
        try:
            from .scale.ray_serve import serve_ray
        except ImportError as exc:
            raise SystemExit(f"--ray needs the [ray] extra (pip install 'prefixserve[ray]'): {exc}") from None
        serve_ray(settings)
    else:
        serve(settings)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .serve import run_worker
    from .settings import ServerSettings

    run_worker(ServerSettings.from_env(**({"model": args.model} if args.model else {})))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser(
        "tiny-model", help="write a small offline GPT-2 checkpoint (random weights, BPE tokenizer)"
    )
    tiny.add_argument("directory")
    d = TinyModelConfig()
    tiny.add_argument("--vocab-size", type=int, default=d.vocab_size)
    tiny.add_argument("--n-layer", type=int, default=d.n_layer)
    tiny.add_argument("--n-head", type=int, default=d.n_head)
    tiny.add_argument("--n-embd", type=int, default=d.n_embd)
    tiny.add_argument("--n-positions", type=int, default=d.n_positions)
    tiny.add_argument("--seed", type=int, default=d.seed)
    tiny.set_defaults(func=_tiny_model)
    serve = sub.add_parser("serve", help="start the HTTP server (settings from PREFIXSERVE_* variables)")
    serve.add_argument("--model", default=None, help="hub id, directory, or 'tiny' (offline tiny model)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument(
        "--api-workers",
        type=int,
        default=None,
        help="API processes on one engine process (default 1; more needs PREFIXSERVE_REDIS_URL)",
    )
    serve.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Serve: N engine replicas routed by prefix affinity (needs PREFIXSERVE_REDIS_URL"
        " and a shared PREFIXSERVE_STORE_URL; the [ray] extra)",
    )
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto': the local one)")
    serve.add_argument("--replicas", type=int, default=None, help="engine replicas on Ray (default 2)")
    serve.set_defaults(func=_serve)
    worker = sub.add_parser("worker", help="run a training worker on the Redis job queue")
    worker.add_argument("--model", default=None, help="the same model the servers run")
    worker.set_defaults(func=_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
