"""Checkpoint I/O: atomic writes, ``weights_only`` loads, the original tools' wrappers.

Accepted layouts: a bare state_dict; ``{"state_dict": ...}`` (nested at most twice, as RNP's
``.tar``); keys prefixed ``module.`` (DataParallel). Mask/perturbation parameters missing from a
plain checkpoint keep their initial values.
"""
from __future__ import annotations

import os
import re
import tempfile

import numpy as np
import torch

from .errors import OptionError, UserError

MASK_SUFFIXES = ("neuron_mask", "neuron_noise", "neuron_noise_bias")
_OPTION_NAME = re.compile(r"[a-z][a-z0-9_]*")


def argument_error(argument: str, detail: str) -> UserError:
    """The error about the file an ``argument`` names. An option name (snake_case: ``checkpoint``, ``mask_file``)
    gives an :class:`OptionError` (``--checkpoint: detail``; the script or grid layer names it as the user wrote
    it); any other label (a flag ``--backdoor_model_path``, a positional ``MODEL``, ``--option remove``) is kept
    as written: ``label: detail``."""
    if _OPTION_NAME.fullmatch(argument):
        return OptionError(argument, detail)
    return UserError(f"{argument}: {detail}")


def _atomic_write(path: str, mode: str, write) -> None:
    """Write through ``write(file)`` to a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """``torch.save`` atomically: an interrupted run never leaves a truncated checkpoint."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def resolve_checkpoint_path(path: str, argument: str) -> str:
    """``last_model.th`` and ``model_last.th`` (the original's name) stand for each other."""
    if os.path.isfile(path):
        return path
    folder, name = os.path.split(path)
    twins = {"last_model.th": "model_last.th", "model_last.th": "last_model.th"}
    if name in twins and os.path.isfile(os.path.join(folder, twins[name])):
        return os.path.join(folder, twins[name])
    raise argument_error(argument, f"checkpoint {path} does not exist")


def _numpy_safe_globals() -> list:
    """What unpickling plain numpy arrays needs (the original ANP tool stores trigger info as numpy)."""
    multiarray = getattr(np, "_core", np.core).multiarray
    dtypes = [type(np.dtype(t)) for t in (np.uint8, np.int64, np.int32, np.float32, np.float64, np.bool_)]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def safe_load(path: str, argument: str):
    """``torch.load(weights_only=True)``; numpy arrays are allowed, nothing else beyond tensors."""
    path = resolve_checkpoint_path(path, argument)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file (pickle, zip, struct, I/O errors) is the user's input
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise argument_error(argument, f"cannot read {path} as a weights-only torch file ({first_line[:160]})") \
            from None


def extract_state_dict(obj, argument: str) -> dict:
    for _ in range(3):
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise argument_error(argument, "the file holds no state_dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_state_dict_into(model: torch.nn.Module, state_dict: dict, description: str, argument: str) -> None:
    """Load into ``model``; a key or shape mismatch is a one-line :class:`UserError` (:func:`argument_error`)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith(MASK_SUFFIXES)]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                   if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''}")
        if wrong_shape:
            parts.append(f"shape mismatch {', '.join(wrong_shape[:2])}{' …' if len(wrong_shape) > 2 else ''}")
        raise argument_error(argument, f"checkpoint does not fit {description} ({'; '.join(parts)}); "
                                       f"check --arch, --width and --dataset")
    model.load_state_dict(state_dict, strict=False)


def load_model_checkpoint(model: torch.nn.Module, path: str, description: str, argument: str = "checkpoint") -> dict:
    """Read ``path`` and load it into ``model``; returns the raw object (for its metadata). ``argument``: the
    option that gave ``path`` (or a label: :func:`argument_error`)."""
    obj = safe_load(path, argument)
    load_state_dict_into(model, extract_state_dict(obj, argument), description, argument)
    return obj if isinstance(obj, dict) else {}


def plain_state_dict(model: torch.nn.Module) -> dict:
    """The state_dict without mask/perturbation parameters, on the CPU (the original tools' layout)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIXES)}
