"""Adapters that feed calibration samples to a runtime's quantizer."""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization import CalibrationDataReader


class OnnxCalibrationReader(CalibrationDataReader):
    """Feeds ``samples`` (N, ...) one at a time, as batch-1 float32, under ``input_name``.

    Batch 1 matches how the exported model is called on a device; ``rewind`` starts over for a
    second calibration pass.
    """

    def __init__(self, samples: np.ndarray, input_name: str):
        self._samples = np.ascontiguousarray(samples, dtype=np.float32)
        self._input_name = input_name
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._samples):
            return None
        sample = self._samples[self._next : self._next + 1]
        self._next += 1
        return {self._input_name: sample}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self._samples)
