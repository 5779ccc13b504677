"""One `APIRouter` per resource; none imports another's private names."""

from . import admin, generate, jobs, openai, ops, prefixes, tokenize, usage

ROUTERS = (
    ops.router,
    generate.router,
    prefixes.router,
    jobs.router,
    openai.router,
    tokenize.router,
    usage.router,
    admin.router,
)
