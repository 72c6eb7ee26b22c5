"""Checking a user's ``--device`` before anything loads: one line saying what this torch can use instead."""

from __future__ import annotations

from knowlens.errors import KnowlensError


def available_devices() -> list[str]:
    """The devices this torch build can run on here: ``cpu``, then ``cuda:N`` / ``mps`` where present."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def check_device(device: str) -> str:
    """Return ``device`` if torch can use it here, else raise KnowlensError naming what is available."""
    import torch

    available = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise KnowlensError(f"unknown device {device!r}; available here: {', '.join(available)}") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA support" if torch.version.cuda is None else "finds no CUDA GPU"
            raise KnowlensError(f"device {device!r}: this torch ({torch.__version__}) {build}; available here: {', '.join(available)}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KnowlensError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA GPUs; available here: {', '.join(available)}")
        return device
    if device in available:
        return device
    raise KnowlensError(f"device {device!r} is not available to this torch ({torch.__version__}); available here: {', '.join(available)}")
