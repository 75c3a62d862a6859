"""Cut any ``nn.Module`` into an edge *head* and a cloud *tail* at a named point.

A point is legal when exactly one tensor is live across the cut: no skip connection crosses it, so
``tail(head(x))`` computes exactly what ``model(x)`` computes. Points are found on the model's
``torch.fx`` graph; models that do not trace fall back to child order when they are ``nn.Sequential``.

Points are named by module path where the cut is a module's output (``conv1``, ``layer2.1``,
``features.7``). A cut that is not the output of a module called once is named by its enclosing module
and its operation (``layer1.0.add``, ``flatten``).

Two points joined by ``..`` (``relu..layer3.1``) make a *U-shaped* split: the edge runs the head up to the
first, the cloud only the part between the two (:attr:`SplitModel.cloud`), and the edge the rest, so the
cloud never holds the classifier nor sees a prediction (InfoScissors' setting, where model completion, the
cloud's label leakage, is a threat).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import operator
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .._random import seeded
from ..errors import ConfigError, SplitError
from .registry import get_model_info
from .zoo import Normalize

#: Joins a U-shaped split's two cuts, ``"relu..layer3.1"``: ``..`` never occurs in a point's name.
U_SEPARATOR = ".."


@dataclass(frozen=True)
class SplitPoint:
    """A legal cut: its name, other names it answers to, and the feature shape (C, H, W) if known."""

    name: str
    aliases: tuple[str, ...] = ()
    feature_shape: tuple[int, ...] | None = None


class SplitModel(nn.Module):
    """A model cut in two: ``head`` runs on the edge device, ``tail`` in the cloud.

    ``forward(x)`` returns ``tail(head(x))``; a defense, when any, is applied between the two by the
    :class:`~splitshield.Trainer` and the runtime, never inside this module. In a U-shaped split the tail is
    a :class:`UShapedTail`: the cloud runs its ``cloud`` part only, the edge its ``edge`` part.

    Parameters
    ----------
    head, tail:
        The two halves. They share parameters with the model they were cut from.
    point:
        Name of the cut (``first..second`` for a U-shaped split).
    input_shape:
        Shape of one input image (C, H, W); images are float in [0, 1].
    model_spec:
        Arguments of :func:`~splitshield.models.build_model` that rebuild the uncut model, if known.
    """

    def __init__(self, head: nn.Module, tail: nn.Module, point: str, input_shape: tuple[int, ...] | None = None,
                 model_spec: dict | None = None):
        super().__init__()
        self.head = head
        self.tail = tail
        self.point = point
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.model_spec = model_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(x))

    @property
    def cloud(self) -> nn.Module:
        """What the cloud runs on the features: the tail, or a U-shaped split's middle part only."""
        return self.tail.cloud if isinstance(self.tail, UShapedTail) else self.tail

    @property
    def u_shaped(self) -> bool:
        """Whether the edge runs the end of the model too (the cloud returns features, not predictions)."""
        return isinstance(self.tail, UShapedTail)

    @torch.no_grad()
    def feature_shape(self, input_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Shape of one feature z = head(x), without the batch dimension."""
        shape = input_shape or self.input_shape
        if shape is None:
            raise SplitError("feature_shape needs input_shape: pass it, or give it to split(..., input_shape=)")
        was_training = self.head.training
        self.head.eval()
        param = next(self.head.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        z = self.head(torch.zeros(1, *shape, device=device))
        self.head.train(was_training)
        return tuple(z.shape[1:])

    def extra_repr(self) -> str:
        return f"point={self.point!r}, input_shape={self.input_shape}"


class UShapedTail(nn.Module):
    """The tail of a U-shaped split: ``cloud`` (features -> the features the cloud returns) runs in the cloud,
    ``edge`` (those -> logits) back on the device; ``forward(z)`` is ``edge(cloud(z))``."""

    def __init__(self, cloud: nn.Module, edge: nn.Module):
        super().__init__()
        self.cloud, self.edge = cloud, edge

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.edge(self.cloud(z))


# --------------------------------------------------------------------------------------------------
# torch.fx route


class _Tracer(fx.Tracer):
    """Keeps input normalisation and the given mode-dependent modules whole (as leaves of the graph)."""

    def __init__(self, leaves: frozenset[str] = frozenset()):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A cut inside ``(x - mean) / std`` is never useful.
        return (isinstance(m, Normalize) or module_qualified_name in self.leaves
                or super().is_leaf_module(m, module_qualified_name))


# torch.fx patches nn.Module.__call__ process-wide while it traces: two threads must not trace at once.
_TRACE_LOCK = threading.Lock()

# Auxiliary classifiers that a model's own forward runs in train mode only (GoogLeNet, Inception v3).
_AUX_HEADS = ("aux1", "aux2", "AuxLogits")


@contextlib.contextmanager
def _without_aux_heads(model: nn.Module, warn: bool = True) -> Iterator[None]:
    """Trace the main classifier only: an auxiliary head would be a second output crossing every cut.

    The heads exist to help training from scratch; a split model trains on its main logits, so they are
    switched off while tracing (and stay out of the cut model) and restored on ``model`` afterwards.
    """
    if not getattr(model, "aux_logits", False):
        yield
        return
    saved = {name: getattr(model, name) for name in _AUX_HEADS if hasattr(model, name)}
    if warn:
        warnings.warn(f"{type(model).__name__}: auxiliary classifiers switched off in the cut model "
                      "(it trains on the main logits); build it with aux_logits=False to silence this", stacklevel=4)
    model.aux_logits = False
    for name in saved:
        setattr(model, name, None)
    try:
        yield
    finally:
        model.aux_logits = True
        for name, head in saved.items():
            setattr(model, name, head)


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag (a model may mix them, e.g. frozen batch norm)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _trace_once(model: nn.Module, leaves: frozenset[str]) -> tuple[fx.Tracer, fx.Graph] | None:
    try:
        tracer = _Tracer(leaves)
        return tracer, tracer.trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means "use the fallback"
        return None


def _signature(node: fx.Node) -> str:
    return f"{node.op} {node.target} {node.args} {node.kwargs}"  # nodes in args print as their names


def _mode_dependent_scopes(train: fx.Graph, evaluation: fx.Graph) -> set[str]:
    """Modules whose traced code differs between train and eval mode ("" when it is the root's own code).

    Tracing runs Python, so every ``if self.training`` and every ``training=self.training`` argument
    is frozen into the graph as a constant. The deepest module containing both sides of a difference is
    the one whose forward read the flag.
    """
    a, b = list(train.nodes), list(evaluation.nodes)
    if len(a) == len(b):  # the same code path with other constants: each differing pair on its own
        return {_deepest_common_scope([p, q]) for p, q in zip(a, b, strict=True) if _signature(p) != _signature(q)}
    start = sum(1 for _ in itertools.takewhile(lambda pq: _signature(pq[0]) == _signature(pq[1]),
                                               zip(a, b, strict=False)))
    if start < min(len(a), len(b)) and (a[start].op, a[start].target) == (b[start].op, b[start].target):
        return {_deepest_common_scope([a[start], b[start]])}  # a constant first; the caller traces again
    # Another code path: the nodes between the common start and the common end of the two graphs. Nodes after
    # the divergence are renamed, so the end is matched by operation only.
    end = sum(1 for _ in itertools.takewhile(lambda pq: (pq[0].op, pq[0].target) == (pq[1].op, pq[1].target),
                                             zip(reversed(a[start:]), reversed(b[start:]), strict=False)))
    return {_deepest_common_scope(a[start:len(a) - end] + b[start:len(b) - end])}


def _deepest_common_scope(nodes: list[fx.Node]) -> str:
    """The innermost module path enclosing every node of ``nodes`` ("" for the root)."""
    stacks = [[s.split("@")[0] for s in _scopes(n)] for n in nodes]
    shared = itertools.takewhile(lambda level: len(set(level)) == 1, zip(*stacks, strict=False))
    common = [level[0] for level in shared]
    return common[-1] if common else ""


def _trace(model: nn.Module) -> fx.GraphModule | None:
    """Trace ``model`` so that its graph is the same in train and eval mode.

    Modules that read ``self.training`` (dropout, stochastic depth, batch norm, custom blocks) are kept
    whole, so the cut model follows ``.train()`` / ``.eval()`` exactly as the original does. Found by
    tracing both modes and comparing, not by a list of known classes, so custom modules are covered too.
    Returns ``None`` when the model does not trace.
    """
    leaves: frozenset[str] = frozenset()
    with _TRACE_LOCK, _without_aux_heads(model), _modes_kept(model):
        while True:
            traced = []
            for training in (True, False):
                model.train(training)
                traced.append(_trace_once(model, leaves))
            if traced[0] is None or traced[1] is None:
                return None
            (_, train_graph), (tracer, eval_graph) = traced
            scopes = _mode_dependent_scopes(train_graph, eval_graph)
            if not scopes:
                return fx.GraphModule(tracer.root, eval_graph, type(model).__name__)
            if "" in scopes or scopes <= leaves:
                raise SplitError(
                    f"{type(model).__name__}.forward itself behaves differently in train and eval mode "
                    "(it reads self.training): move that code into a submodule so a cut can keep it whole"
                )
            leaves = leaves | scopes


def _scopes(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.keys())


def _legal_indices(nodes: list[fx.Node]) -> list[int]:
    """Indices i such that node i is the only value computed at or before i and used after i."""
    index = {n: i for i, n in enumerate(nodes)}
    live_delta = [0] * (len(nodes) + 1)
    last_use: list[int] = []
    for i, n in enumerate(nodes):
        last = max((index[u] for u in n.users), default=i)
        last_use.append(last)
        # get_attr values (parameters, constants) can be re-read by the tail: they never cross a cut.
        if n.op != "get_attr" and last > i:
            live_delta[i] += 1
            live_delta[last] -= 1
    legal, live = [], 0
    for i, n in enumerate(nodes):
        live += live_delta[i]
        if n.op in ("call_module", "call_function", "call_method") and live == 1 and last_use[i] > i:
            legal.append(i)
    return legal


def _point_names(nodes: list[fx.Node], legal: list[int], leaves: set[str]) -> dict[int, tuple[str, ...]]:
    """Module-path names for each legal node: canonical first, then aliases."""
    last_in_scope: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for scope in _scopes(n):
            last_in_scope[scope] = i
    names: dict[int, tuple[str, ...]] = {}
    used: set[str] = set()
    for i in legal:
        n = nodes[i]
        # Modules whose output this node is, innermost first; "name@k" keys are repeat calls.
        outputs = [s for s in reversed(_scopes(n)) if last_in_scope[s] == i and "@" not in s]
        if outputs:
            # Prefer the innermost block (`layer2.1`, `features.18`) over the leaf inside it (`features.18.2`).
            blocks = [s for s in outputs if s not in leaves]
            candidates = ([blocks[0]] if blocks else []) + [s for s in outputs if not blocks or s != blocks[0]]
        else:
            scope = next((s.split("@")[0] for s in reversed(_scopes(n))), "")
            op = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.name)
            op = op.rsplit(".", 1)[-1]
            base = f"{scope}.{op}" if scope else op
            candidate, k = base, 1
            while candidate in used:
                candidate, k = f"{base}@{k}", k + 1
            candidates = [candidate]
            if n.name != candidate:
                candidates.append(n.name)  # fx's own node name, e.g. "add_1", also accepted
        used.update(candidates)
        names[i] = tuple(candidates)
    return names


def _fx_points(gm: fx.GraphModule) -> tuple[list[fx.Node], dict[int, tuple[str, ...]]]:
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    nodes.append(output)
    legal = _legal_indices(nodes)
    leaves = {name for name, m in gm.named_modules() if name and not any(True for _ in m.children())}
    return nodes, _point_names(nodes, legal, leaves)


def _fx_segment(gm: fx.GraphModule, nodes: list[fx.Node], start: int, stop: int, name: str) -> nn.Module:
    """The graph from the value of legal cut ``start`` (the model's inputs when -1) to that of ``stop`` (the last
    node: the model's output)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {} if start < 0 else {nodes[start]: graph.placeholder("z")}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:  # only get_attr nodes reach here between legal cuts
            env[a] = graph.node_copy(a, lookup)
        return env[a]

    for n in nodes[start + 1 : stop + 1]:
        env[n] = graph.node_copy(n, lookup)
    if nodes[stop].op != "output":
        graph.output(env[nodes[stop]])
    return fx.GraphModule(gm, graph, name)


# --------------------------------------------------------------------------------------------------
# nn.Sequential route (models that do not trace)


def _sequential_points(model: nn.Sequential) -> list[str]:
    return [name for name, _ in model.named_children()]


# --------------------------------------------------------------------------------------------------
# public API


def _points(model: nn.Module) -> tuple[list[SplitPoint], object]:
    gm = _trace(model)
    if gm is not None:
        nodes, names = _fx_points(gm)
        points = [SplitPoint(names[i][0], names[i][1:]) for i in sorted(names)]
        return points, (gm, nodes, names)
    if isinstance(model, nn.Sequential):
        return [SplitPoint(n) for n in _sequential_points(model)], None
    raise SplitError(
        f"{type(model).__name__} does not trace with torch.fx and is not an nn.Sequential: "
        "wrap its layers in an nn.Sequential, or make its forward traceable (no data-dependent control flow)"
    )


def split_points(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[SplitPoint]:
    """List the legal cut points of ``model`` in execution order.

    Parameters
    ----------
    model:
        Any ``nn.Module``.
    input_shape:
        Shape of one input (C, H, W). When given, each point carries its feature shape, and a shape the
        model cannot take is a :class:`SplitError` naming the shape the model expects.
    """
    return ModelCuts(model, input_shape).points


def _checked_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    try:
        shape = tuple(operator.index(v) for v in input_shape)  # numpy integers too, not 28.0
    except TypeError:
        shape = ()
    if not shape or min(shape) < 1:
        raise SplitError(f"input_shape must be positive integers (C, H, W), got {input_shape!r}")
    return shape


def _feature_shapes(model: nn.Module, traced: object, input_shape: tuple[int, ...]) -> dict[str, tuple | None]:
    """Run one zero image through ``model`` in eval mode and record the shape of every point's value."""
    x = torch.zeros(1, *input_shape, device=_device_of(model))
    shapes: dict[str, tuple | None] = {}
    try:
        with _modes_kept(model), torch.no_grad():
            model.eval()
            if traced is not None:
                gm, nodes, names = traced
                values: dict[str, torch.Tensor] = {}

                class _Recorder(fx.Interpreter):
                    def run_node(self, n: fx.Node):  # noqa: D102
                        out = super().run_node(n)
                        values[n.name] = out
                        return out

                _Recorder(gm).run(x)
                for i, nm in names.items():
                    v = values.get(nodes[i].name)
                    shapes[nm[0]] = tuple(v.shape[1:]) if isinstance(v, torch.Tensor) else None
            else:
                for name, child in model.named_children():
                    x = child(x)
                    shapes[name] = tuple(x.shape[1:])
    except Exception as exc:  # noqa: BLE001 - any failure here means the shape does not fit
        raise SplitError(_shape_mismatch(model, input_shape, exc)) from None
    return shapes


def _shape_mismatch(model: nn.Module, input_shape: tuple[int, ...], exc: Exception) -> str:
    spec = getattr(model, "model_spec", None) or {}
    torch_says = "torch says: " + (str(exc).strip().splitlines() or [""])[0]
    built = ""
    if spec.get("input_shape"):
        try:
            takes = f", takes {get_model_info(spec.get('name', '')).sizes}"
        except ConfigError:  # a model the registry does not know
            takes = ""
        built = f"built for {tuple(spec['input_shape'])}{takes}; "
    return (f"input_shape {input_shape} does not fit {spec.get('name', type(model).__name__)} ({built}{torch_says}); "
            "pass the shape of your images, or build the model for them (build_model(..., input_shape=))")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def split(model: nn.Module, at: str, input_shape: tuple[int, ...] | None = None) -> SplitModel:
    """Cut ``model`` after the point named ``at``.

    The halves share parameters and submodules with ``model`` (no copy), so training the returned
    :class:`SplitModel` trains ``model``. ``tail(head(x))`` equals ``model(x)`` exactly, in train mode
    (same RNG state) and in eval mode alike: modules that behave differently in the two modes stay whole,
    so ``.train()`` / ``.eval()`` on the split model act as on the original.

    Parameters
    ----------
    model:
        Any ``nn.Module`` that traces with ``torch.fx``, or an ``nn.Sequential``.
    at:
        A name from :func:`split_points`; or two, in the model's order, joined by ``..`` for a U-shaped split
        (``"relu..layer3.1"``: the cloud runs the model between the two cuts, the edge the rest).
    input_shape:
        Shape of one input image (C, H, W). Checked against the model up front.

    Raises
    ------
    SplitError
        When ``at`` is not a legal point (the message lists the legal names), a U-shaped split's points are
        out of order, or ``input_shape`` does not fit the model (the message names the shape the model takes,
        where known).
    """
    return ModelCuts(model, input_shape).split(at)


class ModelCuts:
    """One trace of ``model``, cut as often as needed: :meth:`split` at any point, :meth:`chain` through many.

    Tracing (twice, to find the modules that depend on the mode) costs more than cutting; a caller that cuts
    a model at many points (the advisor, at every one) traces it once here. ``input_shape`` is checked
    against the model once, as in :func:`split`, and gives :attr:`points` their feature shapes.

    Attributes
    ----------
    points:
        The legal cuts in execution order, as :func:`split_points` lists them.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...] | None = None):
        self.model = model
        self.points, self._traced = _points(model)
        self.input_shape = None if input_shape is None else _checked_shape(input_shape)
        if self.input_shape is not None:
            shapes = _feature_shapes(model, self._traced, self.input_shape)
            self.points = [SplitPoint(p.name, p.aliases, shapes[p.name]) for p in self.points]

    def _index(self, at: str) -> int:
        index = next((i for i, p in enumerate(self.points) if at == p.name or at in p.aliases), None)
        if index is None:
            legal = ", ".join(p.name for p in self.points)
            raise SplitError(f"no split point {at!r} in {type(self.model).__name__}; legal points: {legal}")
        return index

    def _part(self, start: int, stop: int, name: str) -> nn.Module:
        """The model from the cut at ``points[start]`` (the inputs when -1) to the cut at ``points[stop]`` (the
        output when ``len(points)``)."""
        if self._traced is None:  # nn.Sequential: point i is child i
            return nn.Sequential(OrderedDict(list(self.model.named_children())[start + 1 : stop + 1]))
        gm, nodes, names = self._traced
        order = sorted(names)  # points[i] is the cut after nodes[order[i]]
        ends = [-1, *order, len(nodes) - 1]  # the output node is the last node
        return _fx_segment(gm, nodes, ends[start + 1], ends[stop + 1], name)

    def split(self, at: str) -> SplitModel:
        """The model cut after the point ``at``, or U-shaped at ``first..second`` (see :func:`split`)."""
        first, u_shaped, second = at.partition(U_SEPARATOR)
        cut, end = self._index(first), len(self.points)
        tail, point = self._part(cut, end, "Tail"), self.points[cut].name
        if u_shaped:
            back = self._index(second)
            if back <= cut:
                raise SplitError(f"U-shaped split {at!r}: the cloud's part runs from {first!r} to {second!r}, so "
                                 f"{second!r} must come after {first!r} in the model; name a later point")
            tail = UShapedTail(self._part(cut, back, "Cloud"), self._part(back, end, "EdgeTail"))
            point = f"{point}{U_SEPARATOR}{self.points[back].name}"
        return SplitModel(self._part(-1, cut, "Head"), tail, point, self.input_shape,
                          getattr(self.model, "model_spec", None))

    def chain(self, at: Sequence[str]) -> list[nn.Module]:
        """Modules that carry features from one cut to the next, for walking many cuts with one forward pass.

        ``at`` names cuts in the model's order; module ``k`` maps the features at ``at[k - 1]`` (the input images
        for ``k = 0``) to the features at ``at[k]``, so applying modules 0 to ``k`` in turn computes exactly what
        the head at ``at[k]`` computes. They share parameters with the model (no copy). Raises
        :class:`SplitError` for an unknown name or names out of order.
        """
        indices: list[int] = []
        for name in at:
            cut = self._index(name)
            if indices and cut == indices[-1]:
                raise SplitError(f"chain: {name!r} is named twice in a row; name each point once")
            if indices and cut < indices[-1]:
                raise SplitError(f"chain needs the points in the model's order: {name!r} comes before "
                                 f"{self.points[indices[-1]].name!r}")
            indices.append(cut)
        if not indices:
            return []
        return [self._part(a, b, "Segment") for a, b in zip([-1, *indices[:-1]], indices, strict=True)]


@torch.no_grad()
def check_split(model: nn.Module, target: SplitModel, x: torch.Tensor, seed: int = 0) -> dict[str, bool]:
    """Whether ``target`` computes exactly what ``model`` computes, in eval mode and in train mode.

    Train mode draws dropout / stochastic-depth masks: both sides run from the same RNG seed. The check
    runs on a deep copy of the two (batch norm statistics and modes of the originals are untouched).

    Parameters
    ----------
    model, target:
        The uncut model and a cut of it (sharing its modules, as :func:`split` returns).
    x:
        A batch of inputs, float [N, C, H, W].

    Returns
    -------
    dict
        ``{"eval": bool, "train": bool}``: ``torch.equal`` of the outputs in each mode.
    """
    model, target = copy.deepcopy((model, target))  # one deepcopy keeps the shared modules shared
    result = {}
    # The cut has no auxiliary heads (see split): the model is compared without them too, so that they draw
    # no dropout masks of their own.
    with _without_aux_heads(model, warn=False):
        for mode in ("eval", "train"):
            outputs = []
            for net in (model, target):
                net.train(mode == "train")
                with seeded(seed):
                    outputs.append(net(x))
            result[mode] = torch.equal(*outputs)
    return result


def fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter re-initialised: the architecture, not the weights.

    A submodule's own initialisation (``reset_parameters``, or ``_reset_parameters`` as in
    ``nn.MultiheadAttention``) is used where it has one; parameters held by modules without one (a ViT's
    position embedding, a Swin block's relative position bias, a ConvNeXt layer scale) are drawn from
    N(0, 0.02²), so no value of ``module``'s weights survives in the copy.
    """
    clone = copy.deepcopy(module)
    for m in clone.modules():
        reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
        if callable(reset):
            reset()
            continue
        with torch.no_grad():
            for p in m.parameters(recurse=False):
                nn.init.normal_(p, std=0.02)
    return clone
