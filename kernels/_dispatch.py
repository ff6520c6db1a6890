"""Input validation and path selection shared by the kernel wrappers.

Every public entry point either runs its Triton kernel or falls back to the pure-torch reference (CPU tensors,
shapes the kernel does not cover, or `DSAFORGE_KERNELS=reference`). `last_path(name)` says which ran and why, so
tests and the benchmark can assert that the fused path was actually taken.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

_PATHS: dict[str, tuple[str, str]] = {}


class KernelInputError(ValueError):
    """A kernel wrapper was called with inputs that violate its contract (shape, dtype, layout)."""


def record(name: str, path: str, why: str = "") -> None:
    _PATHS[name] = (path, why)


def last_path(name: str) -> tuple[str, str]:
    """(path, reason) of the latest call of kernel `name`: path is "triton" or "reference"."""
    if name not in _PATHS:
        raise KeyError(f"kernel {name!r} has not run yet; ran so far: {sorted(_PATHS)}")
    return _PATHS[name]


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> tuple[bool, str]:
    """Whether the Triton path can run on these tensors, and if not, why."""
    if os.environ.get("DSAFORGE_KERNELS", "") == "reference":
        return False, "DSAFORGE_KERNELS=reference"
    if not triton_available():
        return False, "triton is not installed"
    on_cuda = all(t.is_cuda for t in tensors)
    if not on_cuda and not (interpret() and os.environ.get("DSAFORGE_KERNELS", "") == "interpret"):
        return False, "CPU tensors (TRITON_INTERPRET=1 with DSAFORGE_KERNELS=interpret runs Triton's interpreter)"
    return True, "cuda" if on_cuda else "interpreter"


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise KernelInputError(msg)


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None,
                 contiguous_last: bool = True) -> None:
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        check(t.dtype in dtypes, f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if contiguous_last:
        check(t.stride(-1) == 1, f"{name} must be contiguous in its last dim (stride {t.stride()}); call .contiguous()")


def index_checks() -> bool:
    """Whether wrappers validate index values (DSAFORGE_CHECK_INDICES=1; the tests turn it on). Off by default: it
    reads the whole index tensor back, a device synchronisation per call (skipped while a CUDA graph is captured)."""
    return os.environ.get("DSAFORGE_CHECK_INDICES", "0") == "1"


def check_indices(name: str, indices: torch.Tensor, n_keys: int) -> None:
    """With index_checks() on: every entry is -1 (an empty slot) or a key in [0, n_keys). The kernels gather rows
    at these positions without bounds checks, so an entry past the end reads another sequence's memory."""
    if not index_checks() or indices.numel() == 0:
        return
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return   # reading values back would invalidate a CUDA-graph capture; the eager warm-up calls checked them
    lo, hi = int(indices.min()), int(indices.max())
    check(lo >= -1 and hi < n_keys,
          f"{name} holds {hi if hi >= n_keys else lo}, outside [-1, {n_keys}) (-1 marks an empty slot; "
          f"{n_keys} keys)")


def check_same_device(**tensors: torch.Tensor) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    check(len(set(devs.values())) <= 1, f"tensors on different devices: {devs}")


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def patch_interpreter() -> None:
    """Triton 3.6's interpreter converts loop bounds with int(ndarray of shape (1,)), which NumPy >= 2.4 rejects;
    make scalar tensors index through .item() instead. Only touches the interpreter (TRITON_INTERPRET=1)."""
    if not interpret() or not triton_available():
        return
    from triton.runtime import interpreter as it
    if getattr(it, "_dsaforge_patched", False):
        return
    original = it._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    it._patch_lang_tensor = patched
    it._dsaforge_patched = True


patch_interpreter()


_POISON = {"on": False}


class poison_outputs:
    """Within this context the wrappers fill every output buffer with NaN (floats) or -7 (ints) before the kernel
    runs, so a check can tell an element the kernel never wrote from one it computed."""

    def __enter__(self):
        self._prev = _POISON["on"]
        _POISON["on"] = True
        return self

    def __exit__(self, *exc):
        _POISON["on"] = self._prev


@contextmanager
def env_var(name: str, value: str | None):
    """Set (value str) or unset (None) an environment variable inside a `with` block, restored after it: the
    kernels' DSAFORGE_* switches are read at each call."""
    prev = os.environ.get(name)
    _set_env(name, value)
    try:
        yield
    finally:
        _set_env(name, prev)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def empty(*shape, device, dtype) -> torch.Tensor:
    """torch.empty for kernel outputs, poisoned inside `poison_outputs`."""
    t = torch.empty(*shape, device=device, dtype=dtype)
    if _POISON["on"]:
        t.fill_(float("nan") if dtype.is_floating_point else -7)
    return t

