"""Entry points: the `timemae` CLI and `python -m launch.<job>` drivers (parse, build, run)."""
