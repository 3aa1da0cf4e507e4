"""Keep native libraries' log lines (TensorFlow/absl, TFLite, XNNPACK) off the terminal.

Those libraries write to file descriptor 2 from C++, past Python's ``sys.stderr``, so logging
settings cannot reach them. While a conversion runs, fd 2 goes to a temporary file; what was written
is shown only with ``--debug`` (``EDGEC_DEBUG=1``) or when the block fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

from .errors import EdgecError


def debug_enabled() -> bool:
    return os.environ.get("EDGEC_DEBUG") == "1"


@contextmanager
def native_logs_captured() -> Iterator[None]:
    if debug_enabled():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except EdgecError:
            raise  # a message of our own says what went wrong
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                sink.seek(0)
                text = sink.read().decode(errors="replace").strip()
                if text:
                    print(text[-4000:], file=sys.stderr)
