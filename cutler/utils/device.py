"""Device selection with a clear error when CUDA is requested but absent."""
from __future__ import annotations

import torch


class DeviceUnavailableError(RuntimeError):
    pass


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cpu"``; ``"cuda"``/``"cuda:N"`` (checked); ``"mps"``.

    Raises:
        DeviceUnavailableError: the requested accelerator is not present, with what is available.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device '{spec}' requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}); use device=cpu or run where a GPU is visible"
            )
        index = device.index if device.index is not None else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device '{spec}' requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailableError(f"device '{spec}' requested but MPS is not available")
    return device
