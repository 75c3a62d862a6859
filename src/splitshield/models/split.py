"""Cut any ``nn.Module`` into an edge *head* and a cloud *tail* at a named point.

A point is legal when exactly one tensor is live across the cut: no skip connection crosses it, so
``tail(head(x))`` computes exactly what ``model(x)`` computes. Points are found on the model's
``torch.fx`` graph; models that do not trace fall back to child order when they are ``nn.Sequential``.

Points are named by module path where the cut is a module's output (``conv1``, ``layer2.1``,
``features.7``). A cut that is not the output of a module called once is named by its enclosing module
and its operation (``layer1.0.add``, ``flatten``).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..errors import SplitError
from .zoo import Normalize


@dataclass(frozen=True)
class SplitPoint:
    """A legal cut: its name, other names it answers to, and the feature shape (C, H, W) if known."""

    name: str
    aliases: tuple[str, ...] = ()
    feature_shape: tuple[int, ...] | None = None


class SplitModel(nn.Module):
    """A model cut in two: ``head`` runs on the edge device, ``tail`` in the cloud.

    ``forward(x)`` returns ``tail(head(x))``; a defense, when any, is applied between the two by the
    :class:`~splitshield.Trainer` and the runtime, never inside this module.

    Parameters
    ----------
    head, tail:
        The two halves. They share parameters with the model they were cut from.
    point:
        Name of the cut.
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


# --------------------------------------------------------------------------------------------------
# torch.fx route


class _Tracer(fx.Tracer):
    """Keeps input normalisation whole: a cut inside ``(x - mean) / std`` is never useful."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, module_qualified_name)


# torch.fx patches nn.Module.__call__ process-wide while it traces: two threads must not trace at once.
_TRACE_LOCK = threading.Lock()


def _trace(model: nn.Module) -> fx.GraphModule | None:
    try:
        with _TRACE_LOCK:
            tracer = _Tracer()
            graph = tracer.trace(model)
            return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception:  # noqa: BLE001 - any tracing failure means "use the fallback"
        return None


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


def _fx_cut(gm: fx.GraphModule, nodes: list[fx.Node], cut: int) -> tuple[nn.Module, nn.Module]:
    head_graph, tail_graph = fx.Graph(), fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[: cut + 1]:
        env[n] = head_graph.node_copy(n, lambda a: env[a])
    head_graph.output(env[nodes[cut]])

    tail_env: dict[fx.Node, fx.Node] = {nodes[cut]: tail_graph.placeholder("z")}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in tail_env:  # only get_attr nodes reach here on a legal cut
            tail_env[a] = tail_graph.node_copy(a, lookup)
        return tail_env[a]

    for n in nodes[cut + 1 :]:
        tail_env[n] = tail_graph.node_copy(n, lookup)
    head, tail = fx.GraphModule(gm, head_graph, "Head"), fx.GraphModule(gm, tail_graph, "Tail")
    return head, tail


# --------------------------------------------------------------------------------------------------
# nn.Sequential route (models that do not trace)


def _sequential_points(model: nn.Sequential) -> list[str]:
    return [name for name, _ in model.named_children()]


def _sequential_cut(model: nn.Sequential, at: str) -> tuple[nn.Module, nn.Module]:
    children = list(model.named_children())
    cut = next(i for i, (name, _) in enumerate(children) if name == at)
    head = nn.Sequential(OrderedDict(children[: cut + 1]))
    tail = nn.Sequential(OrderedDict(children[cut + 1 :]))
    return head, tail


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
        Shape of one input (C, H, W). When given, each point carries its feature shape.
    """
    points, _ = _points(model)
    if input_shape is None:
        return points
    shapes = _feature_shapes(model, points, tuple(input_shape))
    return [SplitPoint(p.name, p.aliases, shapes[p.name]) for p in points]


def _feature_shapes(model: nn.Module, points: list[SplitPoint], input_shape: tuple[int, ...]) -> dict[str, tuple]:
    gm = _trace(model)
    x = torch.zeros(1, *input_shape, device=_device_of(model))
    shapes: dict[str, tuple] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if gm is not None:
                values: dict[str, torch.Tensor] = {}

                class _Recorder(fx.Interpreter):
                    def run_node(self, n: fx.Node):  # noqa: D102
                        out = super().run_node(n)
                        values[n.name] = out
                        return out

                _Recorder(gm).run(x)
                nodes, names = _fx_points(gm)
                for i, nm in names.items():
                    v = values.get(nodes[i].name)
                    shapes[nm[0]] = tuple(v.shape[1:]) if isinstance(v, torch.Tensor) else None
            else:
                for name, child in model.named_children():
                    x = child(x)
                    shapes[name] = tuple(x.shape[1:])
    except Exception as exc:  # noqa: BLE001
        raise SplitError(f"input_shape {input_shape} does not fit {type(model).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    return shapes


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def split(model: nn.Module, at: str, input_shape: tuple[int, ...] | None = None) -> SplitModel:
    """Cut ``model`` after the point named ``at``.

    The halves share parameters with ``model`` (no copy), so training the returned
    :class:`SplitModel` trains ``model``. ``tail(head(x))`` equals ``model(x)`` exactly.

    Raises
    ------
    SplitError
        When ``at`` is not a legal point; the message lists the legal names.
    """
    points, traced = _points(model)
    spec = getattr(model, "model_spec", None)
    if traced is not None:
        gm, nodes, names = traced
        cut = next((i for i, nm in names.items() if at in nm), None)
        if cut is not None:
            head, tail = _fx_cut(gm, nodes, cut)
            return SplitModel(head, tail, names[cut][0], input_shape, spec)
    elif at in {p.name for p in points}:
        head, tail = _sequential_cut(model, at)  # type: ignore[arg-type]
        return SplitModel(head, tail, at, input_shape, spec)
    legal = ", ".join(p.name for p in points)
    raise SplitError(f"no split point {at!r} in {type(model).__name__}; legal points: {legal}")


def fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter re-initialised: the architecture, not the weights."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return clone
