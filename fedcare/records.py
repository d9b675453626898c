"""Trainable state <-> Flower ArrayRecord, the one place that knows the encoding."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict=OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in state.items()))


def from_array_record(record: ArrayRecord) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, arr.numpy()) for k, arr in record.items())
