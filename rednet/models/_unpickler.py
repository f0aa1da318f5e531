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

Memory is bounded too. An array's shape is only a number in the pickle, and numpy
allocates whatever it says: 94 bytes could ask for 512 MiB. But a pickled array carries
its raw data in the file, so the arrays of a genuine file add up to no more bytes than the
file holds. Every way the allowlist offers to make an array (``_reconstruct``, ``BUILD``'s
``__setstate__``, ``_frombuffer``) is charged against that budget before numpy allocates,
and going over it raises ``RefusedArray``. So are object arrays: they are never weights,
and numpy's ``__setstate__`` of a malformed one can crash the interpreter.
"""
from __future__ import annotations

import importlib
import io
import math
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["ArrayUnpickler", "RefusedArray", "RefusedGlobal", "load_arrays"]

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


class RefusedArray(pickle.UnpicklingError):
    """An array the allowlist could build but is not weights: more bytes than the file holds, or objects."""


class _Budget:
    """Bytes the arrays of one pickle may still declare: at most the size of the file."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.used = limit, 0

    def charge(self, shape: Any, dtype: Any) -> None:
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise RefusedArray(f"an array of dtype {dtype} holds Python objects, which weights never are")
        dims = (shape,) if isinstance(shape, int) else shape
        if not isinstance(dims, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in dims):
            raise pickle.UnpicklingError(f"invalid array shape {shape!r}")
        nbytes = math.prod(dims) * dtype.itemsize  # Python ints: no overflow for absurd shapes
        self.used += nbytes
        if self.limit is not None and self.used > self.limit:
            raise RefusedArray(
                f"an array of shape {dims} ({dtype}) declares {nbytes:,} bytes, which makes {self.used:,} with "
                f"the arrays before it, more than the {self.limit:,} bytes the file holds: each array's data is "
                "stored in the file, so it is corrupt or built to exhaust memory"
            )


class _BoundedArray(np.ndarray):
    """What ``numpy.ndarray`` means inside the pickle: its ``__setstate__`` is charged first.

    ``np.asarray`` / ``np.array`` of one is a plain ``ndarray``.
    """

    _budget: _Budget | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> _BoundedArray:
        # numpy's pickles name ndarray only as _reconstruct's first argument, never call it.
        raise pickle.UnpicklingError("the pickle calls numpy.ndarray(...) directly, which numpy's pickles never do")

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, data), or the 4-tuple without version of old numpy.
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        shape, dtype = state[-4], state[-3]
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"malformed numpy array state: dtype {dtype!r}")
        if self._budget is not None:
            self._budget.charge(shape, dtype)
        super().__setstate__(state)


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
    """Rebuilds numpy arrays and plain containers; every other global is refused.

    Args:
        file: the pickle, opened in binary mode.
        max_bytes: how many bytes its arrays may declare in all; None for no bound.
        **kwargs: passed to ``pickle.Unpickler`` (``encoding``, ...).
    """

    def __init__(self, file: IO[bytes], *, max_bytes: int | None = None, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._budget = _Budget(max_bytes)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) == ("numpy", "ndarray"):
            return _BoundedArray
        if name == "_reconstruct" and (module, name) in _ALLOWED:
            return self._reconstruct
        if name == "_frombuffer" and (module, name) in _ALLOWED:
            return self._frombuffer
        if (module, name) in _ALLOWED:
            return getattr(importlib.import_module(_numpy_core(module)), name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            # Only the real module: a prefix match would import any module named numpy.dtypes*.
            return getattr(importlib.import_module(module), name)
        raise RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal(f"persistent id {pid!r}")

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> _BoundedArray:
        # numpy writes _reconstruct(ndarray, (0,), b'b') and puts the real shape in BUILD's state.
        if subtype is not _BoundedArray:
            raise pickle.UnpicklingError(f"numpy _reconstruct of {subtype!r}, expected numpy.ndarray")
        self._budget.charge(shape, dtype)
        arr = importlib.import_module(_numpy_core("numpy.core.multiarray"))._reconstruct(_BoundedArray, shape, dtype)
        arr._budget = self._budget
        return arr

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: str) -> _BoundedArray:
        # Protocol 5: the array's bytes are already in memory, so this allocates nothing new,
        # but the result must not be a plain ndarray whose __setstate__ a BUILD could call.
        self._budget.charge(shape, dtype)
        frombuffer = importlib.import_module(_numpy_core("numpy.core.numeric"))._frombuffer
        arr = frombuffer(buf, dtype, shape, order).view(_BoundedArray)
        arr._budget = self._budget
        return arr


def load_arrays(file: IO[bytes], max_bytes: int | None = None) -> Any:
    """Unpickle ``file`` with ``ArrayUnpickler``.

    Args:
        file: a pickle opened in binary mode.
        max_bytes: how many bytes its arrays may declare in all; None: what is left of
            ``file`` from its current position (unbounded if it cannot seek).

    Raises:
        RefusedGlobal: the pickle needs something outside the allowlist.
        RefusedArray: its arrays declare more bytes than allowed, or hold objects.
    """
    if max_bytes is None:
        try:
            here = file.tell()
            max_bytes = file.seek(0, io.SEEK_END) - here
            file.seek(here)
        except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
            max_bytes = None
    # latin1: numpy arrays pickled by Python 2 carry their bytes as str.
    return ArrayUnpickler(file, max_bytes=max_bytes, encoding="latin1").load()
