"""How every entry point reports a mistake a user can fix: one line on stderr, exit status 2.

Config, data, store, pretraining and evaluation errors all carry a message that names the
thing and the fix; a deep library traceback would only hide it. Set ``TIMEMAE_TRACEBACK=1``
to get the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types whose message is meant for the user (imported lazily: no torch)."""
    from data_pipeline.errors import DataError
    from data_pipeline.typedconfig import ConfigError
    from timemae_dist.eval.errors import EvalError
    from timemae_dist.mkl_avx512 import MklAvx512Error
    from timemae_dist.train.errors import PretrainError

    return (ConfigError, DataError, PretrainError, EvalError, MklAvx512Error, FileNotFoundError)


def run_reporting_user_errors(run: Callable[[], int]) -> int:
    """``run()``; a user error becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        return run()
    except user_error_types() as e:
        if os.environ.get("TIMEMAE_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
