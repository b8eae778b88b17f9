"""Unpickling weights files without running pickled code.

Weights pickles (Detectron2 model zoo, Caffe2/Detectron1) hold only plain containers and numpy arrays;
:class:`RestrictedUnpickler` resolves exactly those globals and refuses every other one before anything
is called.
"""
from __future__ import annotations

import codecs
import pickle
from typing import Any, Dict, Tuple

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list (it was not called)."""


def _numpy_attr(*paths: str):
    for path in paths:
        module_name, _, attr = path.rpartition(".")
        try:
            module = __import__(module_name, fromlist=[attr])
            return getattr(module, attr)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(obj, encoding="latin1", *rest):
    """``_codecs.encode`` as Python 3 writes bytes into protocol-2 pickles; only latin-1 is allowed."""
    if encoding not in ("latin1", "latin-1") or rest:
        raise UnsafePickleError(f"pickle asked for _codecs.encode with encoding {encoding!r}; only latin1 is allowed")
    return codecs.encode(obj, "latin1")


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    reconstruct = _numpy_attr("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
    scalar = _numpy_attr("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    frombuffer = _numpy_attr("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")
    import collections

    table = {("collections", "OrderedDict"): collections.OrderedDict,
             ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = reconstruct
        table[(mod, "scalar")] = scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(mod, "_frombuffer")] = frombuffer
    return {k: v for k, v in table.items() if v is not None}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only an allow-list of globals: ``collections.OrderedDict`` and
    numpy's ``ndarray``/``dtype``/``_reconstruct``/``scalar``/``_frombuffer`` (plus latin-1
    ``_codecs.encode`` used by protocol-2 bytes). Any other global raises :class:`UnsafePickleError`
    naming it, before anything is called."""

    _ALLOWED = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load pickle: it references the global '{module}.{name}', which is not a plain "
                "container or numpy array type (weights pickles need nothing else)") from None


def restricted_pickle_load(fileobj) -> Any:
    """Unpickle with :class:`RestrictedUnpickler` (latin-1 for Python 2 pickles, as Detectron2 does)."""
    return RestrictedUnpickler(fileobj, encoding="latin1").load()
