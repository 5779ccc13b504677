"""`python -m prefixserve.engine ADDRESS`: the engine core process (process.py)."""

from .process import main

main()
