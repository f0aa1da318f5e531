"""A restricted unpickler for PaddleClas ``.pdparams``: numpy arrays and plain containers only.

A ``.pdparams`` file is a plain Python pickle of ``{name: numpy.ndarray}`` (plus a
``{str: str}`` name table). Unpickling runs whatever callables the file names, so
``pickle.load`` on a downloaded file is remote code execution. A pickle can only reach
a callable through ``find_class`` (the ``GLOBAL`` / ``STACK_GLOBAL`` opcodes; ``REDUCE``,
``BUILD``, ``NEWOBJ`` and ``INST`` act on what it returned) or through
``persistent_load``. This unpickler therefore answers:

* dicts, lists, tuples, strings, bytes and numbers: built by opcodes that call nothing,
  so they need no permission;
* ``collections.OrderedDict``: state dicts are often ordered dicts;
* ``numpy.ndarray``, ``numpy.dtype`` and ``numpy.core.multiarray._reconstruct`` /
  ``scalar``, ``numpy.core.numeric._frombuffer`` (protocol-5 buffers): what numpy's own
  ``__reduce__`` emits for arrays and scalars. numpy 2 renamed ``numpy.core`` to
  ``numpy._core`` and pickles carry either name, so both are allowed and mapped to
  whichever the installed numpy has;
* ``numpy.dtypes.*DType``: numpy >= 1.25 may name dtype classes directly;
* ``_codecs.encode``, only as ``encode(str, 'latin1')``: protocol 2 stores bytes that
  way (numpy's raw array data among them). Any other encoding is refused.

Every other global, and every persistent id, raises ``RefusedGlobal`` before anything is
called: nothing from a refused file is executed.
"""
from __future__ import annotations

import importlib
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["ArrayUnpickler", "RefusedGlobal", "load_arrays"]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 out-of-band buffers
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global (or persistent id) outside the allowlist; the message names it."""


def _numpy_core(module: str) -> str:
    # numpy 2 moved numpy.core to numpy._core; pickles name either.
    new = int(np.__version__.split(".")[0]) >= 2
    if new and module.startswith("numpy.core"):
        return "numpy._core" + module[len("numpy.core"):]
    if not new and module.startswith("numpy._core"):
        return "numpy.core" + module[len("numpy._core"):]
    return module


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); allow only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _ALLOWED:
            return getattr(importlib.import_module(_numpy_core(module)), name)
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            return getattr(importlib.import_module(module), name)
        raise RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal(f"persistent id {pid!r}")


def load_arrays(file: IO[bytes]) -> Any:
    """Unpickle ``file`` with ``ArrayUnpickler``.

    Raises:
        RefusedGlobal: the pickle needs something outside the allowlist.
    """
    # latin1: numpy arrays pickled by Python 2 carry their bytes as str.
    return ArrayUnpickler(file, encoding="latin1").load()
