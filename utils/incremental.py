"""Logits of fixed image sets for a model that changes a little between calls (a pruning sweep).

A pruning sweep evaluates the same test sets after every threshold, and each row only zeroes a few
BatchNorm weights. :class:`IncrementalPredictor` traces the model once (``torch.fx``), folds every
BatchNorm that directly follows a convolution into it (eval mode: a convolution with a bias), and keeps
the activations of every image set at *cuts* of the graph: places where a single tensor carries
everything the rest of the network needs (ResNet: between blocks; VGG: between layers). At each call it
compares the model's parameters and buffers with those of the previous call, refolds what changed and
recomputes every image set only from the latest kept cut before the first changed layer; when nothing
changed it returns the previous logits. Earlier cuts hold the largest activations: the cuts are kept
from the last one backwards while they fit in ``cache_bytes``.

The logits equal :func:`utils.evaluation.predict_plain`'s up to float rounding (folding multiplies the
BatchNorm scale into the weights before the convolution instead of after it); the tests check a whole
sweep's rows against the plain evaluation to 1e-4. A model ``torch.fx`` cannot trace raises
:class:`NotTraceable`; callers then evaluate plainly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from .device import eval_batch_size

CPU_CACHE_BYTES = 2 << 30  # kept activations on the CPU (the process's RSS)
CUDA_CACHE_FRACTION = 0.25  # of the free GPU memory


class NotTraceable(Exception):
    pass


def default_cache_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_CACHE_FRACTION)
    return CPU_CACHE_BYTES


@dataclass
class _Step:
    node: fx.Node
    run: Callable  # (args, kwargs) -> value
    sources: tuple[str, ...]  # qualified names of the model's tensors this step reads
    fold: tuple[str, str] | None = None  # (conv, batchnorm) module names folded into this step


@dataclass
class _SetState:
    images: torch.Tensor
    logits: torch.Tensor | None = None
    cache: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # cut position -> one tensor per chunk


def _module_tensors(module: nn.Module, prefix: str) -> tuple[str, ...]:
    named = list(module.named_parameters(prefix=prefix)) + list(module.named_buffers(prefix=prefix))
    return tuple(name for name, t in named if t is not None and t.is_floating_point())


def _foldable(node: fx.Node, modules: dict) -> bool:
    """``node`` is a BatchNorm (also one with neuron masks) whose only input is a Conv2d used by nothing else."""
    if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
        return False
    bn = modules[node.target]
    if not (bn.track_running_stats and bn.affine and len(node.args) == 1 and not node.kwargs):
        return False
    conv = node.args[0]
    return (isinstance(conv, fx.Node) and conv.op == "call_module" and isinstance(modules[conv.target], nn.Conv2d)
            and len(conv.users) == 1 and modules[conv.target].padding_mode == "zeros")


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (eval mode). A BatchNorm with neuron masks
    (:mod:`models.masked_batchnorm`) folds its masked (and perturbed) affine parameters."""
    gamma, beta = bn.effective_affine() if hasattr(bn, "effective_affine") else (bn.weight, bn.bias)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    bias = beta - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    return _channels_last(weight), bias


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


class _LeafTracer(fx.Tracer):
    """Every module without children is one call (custom BatchNorms with masks run as they are)."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return next(m.children(), None) is None or super().is_leaf_module(m, qualified_name)


class IncrementalPredictor:
    """Logits of the named uint8 image sets (N×H×W×C on the model's device) under ``model``.

    ``transform`` normalises a uint8 batch (as :class:`data.BatchTransform`'s ``normalize``). Call
    :meth:`logits` after every change of the model's weights (a change is any difference in a floating-point
    parameter or buffer); the model itself is never modified. ``remember`` False: one call only (no copy of
    the weights is kept to compare with).
    """

    def __init__(self, model: nn.Module, image_sets: dict[str, torch.Tensor], transform: Callable,
                 batch_size: int | None = None, autocast=None, cache_bytes: int | None = None, remember: bool = True):
        self.model = model
        self.transform = transform
        self.autocast = autocast
        device = next(iter(image_sets.values())).device if image_sets else torch.device("cpu")
        self.batch_size = batch_size or eval_batch_size(device)
        self.cache_bytes = default_cache_bytes(device) if cache_bytes is None else cache_bytes
        self.sets = {name: _SetState(images) for name, images in image_sets.items()}
        self.remember = remember
        try:
            graph = _LeafTracer().trace(model)
        except Exception as err:  # noqa: BLE001 -- any tracing failure means: evaluate plainly
            raise NotTraceable(f"{type(model).__name__}: {err}") from err
        self._build(graph)
        self.tensors = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())
                        if t.is_floating_point()}
        self.snapshot: dict[str, torch.Tensor] = {}
        self.cached_cuts: set[int] | None = None  # chosen on the first call, from the activations' sizes
        self.recomputed_from: list[int] = []  # per call: the step recomputation started at (-1: nothing changed)

    # -- the program --------------------------------------------------------------------------------------------
    def _build(self, graph: fx.Graph) -> None:
        modules = dict(self.model.named_modules())
        nodes = list(graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1 or nodes[-1].op != "output":
            raise NotTraceable("expected one input and one output")
        folded_bn = {n for n in nodes if _foldable(n, modules)}
        folded_conv = {n.args[0]: n for n in folded_bn}
        alias: dict[fx.Node, fx.Node] = {bn: bn.args[0] for bn in folded_bn}  # a folded BN's value is its conv's
        self.folds: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        steps: list[_Step] = []
        for node in nodes[1:]:
            if node in folded_bn:
                continue
            if node.op == "call_module":
                module = modules[node.target]
                if node in folded_conv:
                    bn = folded_conv[node].target
                    key = (node.target, bn)
                    sources = _module_tensors(module, node.target) + _module_tensors(modules[bn], bn)
                    steps.append(_Step(node, self._folded_conv(module, key), sources, key))
                    continue
                steps.append(_Step(node, self._call(module), _module_tensors(module, node.target)))
            elif node.op == "call_function":
                steps.append(_Step(node, self._call(node.target), ()))
            elif node.op == "call_method":
                steps.append(_Step(node, self._method(node.target), ()))
            elif node.op == "get_attr":
                steps.append(_Step(node, self._attr(node.target), (node.target,)))
            elif node.op == "output":
                steps.append(_Step(node, lambda args, kwargs: args[0], ()))
            else:
                raise NotTraceable(f"unsupported node {node.op}")
        self.input = placeholders[0]
        self.steps = steps
        self.alias = alias
        # Which values each step reads, with folded BatchNorms read through their convolution.
        self.reads = [[self._resolve(a) for a in step.node.all_input_nodes] for step in steps]
        last_use: dict[fx.Node, int] = {}
        for i, reads in enumerate(self.reads):
            for node in reads:
                last_use[node] = i
        self.last_use = last_use
        # Cut p: steps < p are done and exactly one value computed before p is read at or after p.
        # Only the latest cut before each step that reads the model's tensors is worth keeping: a change of the
        # model starts there.
        cuts: dict[int, fx.Node] = {}
        for p in range(1, len(steps)):
            live = [n for n in [self.input] + [s.node for s in steps[:p]] if last_use.get(n, -1) >= p]
            if len(live) == 1 and live[0] is not self.input:
                cuts[p] = live[0]
        useful = {max((p for p in cuts if p <= i), default=0) for i, step in enumerate(steps) if step.sources}
        self.cuts = {p: node for p, node in cuts.items() if p in useful}
        self.first_step_of = {}  # tensor name -> first step reading it
        for i, step in enumerate(steps):
            for name in step.sources:
                self.first_step_of.setdefault(name, i)

    def _resolve(self, node: fx.Node) -> fx.Node:
        return self.alias.get(node, node)

    def _call(self, fn):
        return lambda args, kwargs: fn(*args, **kwargs)

    @staticmethod
    def _method(name: str):
        return lambda args, kwargs: getattr(args[0], name)(*args[1:], **kwargs)

    def _attr(self, target: str):
        owner, _, attr = target.rpartition(".")
        module = self.model.get_submodule(owner) if owner else self.model
        return lambda args, kwargs: getattr(module, attr)

    def _folded_conv(self, conv: nn.Conv2d, key: tuple[str, str]):
        def run(args, kwargs):
            weight, bias = self.folds[key]
            return conv._conv_forward(args[0], weight, bias)
        return run

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _changed(self) -> set[str]:
        return {name for name, t in self.tensors.items()
                if name not in self.snapshot or not torch.equal(t, self.snapshot[name])}

    def _cut_sizes(self) -> dict[int, int]:
        """Bytes per image of the value crossing every cut (one image through the network)."""
        any_set = next(iter(self.sets.values()))
        env = {self.input: _channels_last(self.transform(any_set.images[:1]))}
        sizes = {}
        with self._autocast():
            for i, step in enumerate(self.steps):
                if i in self.cuts:
                    value = env[self.cuts[i]]
                    sizes[i] = value.numel() * value.element_size()
                self._step(env, i)
        return sizes

    def _choose_cuts(self) -> set[int]:
        """The cuts kept: from the last one backwards while every set's activations fit the budget."""
        images = sum(len(s.images) for s in self.sets.values())
        chosen, total = set(), 0
        sizes = self._cut_sizes() if images and self.cache_bytes > 0 else {}
        for p in sorted(sizes, reverse=True):
            total += sizes[p] * images
            if total > self.cache_bytes:
                break
            chosen.add(p)
        return chosen

    def _autocast(self):
        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    def _step(self, env: dict, i: int) -> None:
        step = self.steps[i]
        args = fx.node.map_arg(step.node.args, lambda n: env[self._resolve(n)])
        kwargs = fx.node.map_arg(step.node.kwargs, lambda n: env[self._resolve(n)])
        env[step.node] = step.run(args, kwargs)
        for node in self.reads[i]:
            if self.last_use[node] == i:
                env.pop(node, None)

    @torch.inference_mode()
    def logits(self) -> dict[str, torch.Tensor]:
        """Float32 logits of every image set under the model's current weights."""
        changed = self._changed()
        first_call = self.cached_cuts is None
        if not first_call and not self.remember:
            raise RuntimeError("IncrementalPredictor(remember=False) answers one call")
        if not changed and not first_call:
            self.recomputed_from.append(-1)
            return {name: s.logits for name, s in self.sets.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            for step in self.steps:
                if step.fold and (first_call or changed.intersection(step.sources)):
                    self.folds[step.fold] = _fold(self.model.get_submodule(step.fold[0]),
                                                  self.model.get_submodule(step.fold[1]))
            if first_call:
                self.cached_cuts = self._choose_cuts()
            first = 0 if first_call else min((self.first_step_of.get(n, len(self.steps) - 1) for n in changed))
            start = max((p for p in self.cached_cuts if p <= first), default=0)
            with self._autocast():
                for state in self.sets.values():
                    self._run(state, start)
        finally:
            self.model.train(was_training)
        if self.remember:
            for name in changed:
                self.snapshot[name] = self.tensors[name].detach().clone()
        self.recomputed_from.append(start)
        return {name: s.logits for name, s in self.sets.items()}

    def _run(self, state: _SetState, start: int) -> None:
        """Steps ``start`` … end for every chunk of ``state``'s images, keeping the chosen cuts' values."""
        outputs = []
        for c, begin in enumerate(range(0, len(state.images), self.batch_size)):
            if start == 0:
                env = {self.input: _channels_last(self.transform(state.images[begin:begin + self.batch_size]))}
            else:
                env = {self.cuts[start]: state.cache[start][c]}
            for i in range(start, len(self.steps)):
                if i in self.cached_cuts and i > start:
                    chunks = state.cache.setdefault(i, [])
                    value = env[self.cuts[i]]
                    if c < len(chunks):
                        chunks[c] = value
                    else:
                        chunks.append(value)
                self._step(env, i)
            outputs.append(env[self.steps[-1].node].float())
        state.logits = torch.cat(outputs) if outputs else torch.empty(0, device=state.images.device)


def predict_folded(model: nn.Module, images: torch.Tensor, transform: Callable, batch_size: int | None = None,
                   autocast=None) -> torch.Tensor:
    """Float32 logits of ``images`` with the BatchNorms folded, in channels_last (raises
    :class:`NotTraceable`)."""
    predictor = IncrementalPredictor(model, {"images": images}, transform, batch_size, autocast, cache_bytes=0,
                                     remember=False)
    return predictor.logits()["images"]
