"""The HTTP layer: `prefixserve.app.create_app` includes one `APIRouter` per resource from `routes/`.

- `errors`: the one error boundary (every error -> `{"error": {"type", "message"}}` with `exc.status`)
- `state`: the per-app `State` and the dependencies routes get it and the tenant through
- `generation`: admission, streaming and collection shared by /generate and /v1/completions
- `routes/`: ops (/health, /ready, /metrics), generate, prefixes (uploads, idempotency), jobs, openai
"""
