"""One `APIRouter` per resource; none imports another's private names."""

from . import generate, jobs, openai, ops, prefixes, tokenize

ROUTERS = (ops.router, generate.router, prefixes.router, jobs.router, openai.router, tokenize.router)
