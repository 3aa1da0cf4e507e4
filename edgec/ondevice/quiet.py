"""Keep a runtime's native log lines ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.") off
the terminal: C++ writes them to file descriptor 2, past ``sys.stderr``. Shown with ``--debug``
(``EDGEC_DEBUG=1``), and replayed when the block fails."""

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def native_stderr_quiet():
    if os.environ.get("EDGEC_DEBUG") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreter): nothing to silence
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            _restore(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                sys.stderr.write(text[-4000:] + "\n")
            raise
        _restore(saved)


def _restore(saved):
    os.dup2(saved, 2)
    os.close(saved)
