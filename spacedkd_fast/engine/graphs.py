"""Captured training steps (``cuda_graphs``): warm-up, capture per input signature, replay.

A :class:`StepGraphs` owns, per *signature* (a role, the inputs' shapes / dtypes / strides /
devices, and whatever host-side state changes the kernels, e.g. the teacher's train/eval mode in a
replay), static input buffers and one captured step. The first ``backend.warmup`` calls of a new
signature run the eager step (real training steps: on CUDA on a side stream, as torch asks before a
capture); the next call captures the step on copies of its inputs and replays it; later calls copy
their inputs into those buffers and replay. The step's outputs are static too: the caller consumes
them (clones a loss for a deferred check, adds it to the statistics) before the next replay
overwrites them. A shape change (the last partial batch) is a new signature: a second graph.
What a step holds and what stays on the host around it: :mod:`.graphed_steps`.

Two backends behind one interface (``warmup``, ``device_type``, ``warmup_context``, ``capture``):

- :class:`CudaGraphBackend`: ``torch.cuda.CUDAGraph`` captured under ``torch.cuda.graph`` with a
  private memory pool per graph (graphs replayed on the two overlap lanes never share memory), and
  replayed on the *current* stream, so that the lanes of :mod:`.overlap` order it like eager work.
- :class:`RecordingBackend`: the CPU test double. Its capture runs the step once under a dispatch
  mode that records every aten op with its tensors; a replay runs those ops again on the same
  tensors, copying fresh results into the recorded outputs. That is a CUDA graph's contract:
  static memory, no Python at replay (host state changed inside the step changes only once, an
  input not routed through a static buffer stays stale), so a wrong capture gives wrong numbers
  in a CPU test. It refuses host reads inside the step (``.item()``, ``.tolist()``, ``bool(t)``,
  ``nonzero`` ...: what breaks a real capture) with :class:`HostSyncInGraphError`. Not seen on
  CPU: host reads inside a C++ kernel (below the dispatcher) and CUDA-only capture rules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
# aten ops that read a device value on the host, or whose output shape depends on the data
_SYNC_OPS = frozenset({aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal,
                       aten.nonzero, aten.masked_select, aten._unique2, aten.unique_consecutive})
_SYNC_METHODS = frozenset({Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__float__,
                           Tensor.__int__, Tensor.__index__, Tensor.numpy})


class HostSyncInGraphError(RuntimeError):
    """A captured step read a device value on the host: a CUDA graph cannot capture that."""


def _sync_error(what: str) -> HostSyncInGraphError:
    return HostSyncInGraphError(
        f"{what} reads a device value on the host inside a captured step, which a CUDA graph "
        "cannot capture: move the read out of the step, or use cuda_graphs=False")


class _NoHostReads(TorchFunctionMode):
    """Tensor methods that copy a value to the host (``tolist`` is not an aten op) raise."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_METHODS:
            raise _sync_error(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class _Recorder(TorchDispatchMode):
    """Runs and records every aten op (with its argument and output tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _SYNC_OPS:
            raise _sync_error(f"aten.{func.overloadpacket.__name__}")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class _RecordedGraph:
    """The ops of one captured step. The capture already ran them (a CUDA graph's capture runs
    nothing and its first replay does the work), so the first ``replay()`` is that work, done."""

    def __init__(self, ops: list[tuple[Any, tuple, dict, Any]]) -> None:
        self.ops = ops
        self._done_by_capture = True

    def replay(self) -> None:
        if self._done_by_capture:
            self._done_by_capture = False
            return
        with torch.no_grad(), _NoHostReads():
            for func, args, kwargs, out in self.ops:
                fresh = func(*args, **kwargs)
                for old, new in zip(tree_leaves(out), tree_leaves(fresh)):
                    # in-place ops and views already wrote / alias the recorded memory
                    if isinstance(old, Tensor) and new is not old and (
                            old.untyped_storage().data_ptr()
                            != new.untyped_storage().data_ptr()):
                        old.copy_(new)


class RecordingBackend:
    """CPU stand-in for :class:`CudaGraphBackend` (the tests inject it: ``cuda_graphs=
    RecordingBackend()``). ``warmup``: eager calls per signature before the capture."""

    device_type = "cpu"

    def __init__(self, warmup: int = 1) -> None:
        if int(warmup) != warmup or warmup < 1:
            raise ValueError(f"warmup must be a positive integer, got {warmup!r}")
        self.warmup = int(warmup)

    def warmup_context(self, role: str, device: torch.device):
        return contextlib.nullcontext()

    def capture(self, fn: Callable[[], Any], device: torch.device) -> tuple[_RecordedGraph, Any]:
        recorder = _Recorder()
        with _NoHostReads(), recorder:
            out = fn()
        return _RecordedGraph(recorder.ops), out


class CudaGraphBackend:
    """torch.cuda graphs. ``warmup``: eager calls per signature before the capture (lazy state:
    optimizer buffers, cuDNN algorithm choice, the autograd's gradient layout)."""

    device_type = "cuda"

    def __init__(self, warmup: int = 2) -> None:
        if int(warmup) != warmup or warmup < 1:
            raise ValueError(f"warmup must be a positive integer, got {warmup!r}")
        self.warmup = int(warmup)
        self._side: dict[tuple[str, torch.device], torch.cuda.Stream] = {}

    @contextlib.contextmanager
    def warmup_context(self, role: str, device: torch.device) -> Iterator[None]:
        """Eager warm-up on a side stream (one per role, so the lanes stay independent), ordered
        after the current stream's work and before its next work."""
        current = torch.cuda.current_stream(device)
        side = self._side.get((role, device))
        if side is None:
            side = self._side[(role, device)] = torch.cuda.Stream(device=device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                yield
        finally:
            current.wait_stream(side)

    def capture(self, fn: Callable[[], Any], device: torch.device) -> tuple[Any, Any]:
        """A private memory pool per graph. ``thread_local``: only this thread's unsafe CUDA
        calls break the capture; in torch's default (``global``) any thread's do, and a
        capture happens mid-epoch while the data prefetch thread pins and copies the next batch
        (``pin_memory`` queries events: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED there, raised by
        the next batch fetch, and an invalidated capture here). Work of other threads on other
        streams is not captured either way; the autograd thread's backward kernels on the
        capture stream are."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
        return graph, out


def make_backend(cuda_graphs: Any):
    """``False`` / ``None``: no graphs (``None`` returned); ``True``: :class:`CudaGraphBackend`;
    an object with ``capture`` and ``warmup``: that backend (tests)."""
    if cuda_graphs is None or cuda_graphs is False:
        return None
    if cuda_graphs is True:
        return CudaGraphBackend()
    if callable(getattr(cuda_graphs, "capture", None)) and hasattr(cuda_graphs, "warmup"):
        return cuda_graphs
    raise ValueError(f"cuda_graphs must be True, False or a graph backend, got {cuda_graphs!r}")


def signature(role: str, tensors: tuple[Tensor, ...], *host: Any) -> tuple:
    """The key of a captured step: what its kernels depend on."""
    return (role, *((tuple(t.shape), t.dtype, t.stride(), t.device) for t in tensors), *host)


def _static_like(t: Tensor) -> Tensor:
    """A copy of ``t`` with ``t``'s strides: the layout the warm-up ran on and the signature
    names. ``clone()`` keeps the strides of a dense tensor (channels_last included) but makes a
    non-dense one contiguous; the captured kernels would then differ from the warm-up's (on
    CUDA, with cudnn.benchmark, an algorithm search inside the capture). A tensor with a zero
    stride (expanded) still gets a clone (writing into overlapping memory is refused)."""
    t = t.detach()
    c = t.clone()
    if c.stride() == t.stride() or 0 in t.stride():
        return c
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device).copy_(t)


@dataclass
class _Entry:
    warm: int = 0
    graph: Any = None
    inputs: tuple[Tensor, ...] = ()
    outputs: Any = None


class StepGraphs:
    """Warm-up counts, static buffers and captured steps per signature; counters ``warmups``,
    ``captures`` and ``replays`` (a capture's own run counts as a replay)."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.entries: dict[tuple, _Entry] = {}
        self.warmups = self.captures = self.replays = 0

    def ready(self, sig: tuple) -> bool:
        """Whether ``sig`` is warmed up (the next call captures or replays)."""
        e = self.entries.get(sig)
        return e is not None and (e.graph is not None or e.warm >= self.backend.warmup)

    @contextlib.contextmanager
    def warm_up(self, sig: tuple, role: str, device: torch.device) -> Iterator[None]:
        """Context for one eager call of ``sig`` before its capture."""
        e = self.entries.setdefault(sig, _Entry())
        with self.backend.warmup_context(role, device):
            yield
        e.warm += 1
        self.warmups += 1

    def replay(self, sig: tuple, device: torch.device, inputs: tuple[Tensor, ...],
               body: Callable[..., Any]) -> Any:
        """Run ``body(*static_inputs)`` as a captured step on ``inputs``: captured at the first
        call, replayed at every call. Returns the static outputs."""
        e = self.entries[sig]
        if e.graph is None:
            e.inputs = tuple(_static_like(t) for t in inputs)  # made outside the capture
            e.graph, e.outputs = self.backend.capture(lambda: body(*e.inputs), device)
            self.captures += 1
        else:
            for static, t in zip(e.inputs, inputs):
                static.copy_(t)
        e.graph.replay()
        self.replays += 1
        return e.outputs
