"""The `fast` export layout: a widened layer as dense blocks, at (or near) the original's bytes and speed.

Structures it runs, read from the conversion's metadata and checked against the masks:
- incoming `grouped:G` (`shared` = G=1): neurons in G groups, each group one input partition, so child c of a
  group reads one input subset: G·α gathers and dense MatMuls, the original incoming bytes;
  any other split: the widened incoming matrix as one dense MatMul (α× the rows);
- outgoing `tied`: the children of a parent share one outgoing column: their activations are summed, then the
  original outgoing matrix (its bytes, no copies);
  `grouped`: output r reads child r mod α: α dense MatMuls, each on one child of every parent;
  `copy`: the widened outgoing matrix as it is.
Layers are torch modules (exported with torch.onnx like every Hugging Face model), so one implementation serves
MLP chains of any depth, BERT-style FFNs and gated (Llama-style) FFNs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fpewiden.errors import FpewidenError
from fpewiden.fpe.splits import neuron_groups


@dataclass
class Structure:
    """How one pair is laid out. `blocks[g][c]`: input indices child c of group g reads (None: dense incoming)."""

    alpha: int
    outgoing: str
    groups: torch.Tensor | None = None  # group of each parent neuron
    blocks: list[list[torch.Tensor]] | None = None


def find_structure(masks_in: list[torch.Tensor], w_out: torch.Tensor, alpha: int, outgoing: str, groups: int | None):
    """The pair's structure, verified on the tensors: incoming masks (h·α × d, parent-major), the outgoing
    matrix (o × h·α). Raises a one-line reason when the tensors do not have the structure the metadata names."""
    rows, d = masks_in[0].shape
    if rows % alpha:
        raise FpewidenError(f"the fast layout needs {rows} widened neurons to be a multiple of α={alpha}")
    h = rows // alpha
    used = masks_in[0].clone()
    for m in masks_in[1:]:
        used |= m
    st = Structure(alpha, outgoing)
    if groups is not None:
        group_of = neuron_groups(h, groups)
        per_child = used.view(h, alpha, d)
        st.groups, st.blocks = group_of, []
        for g in range(int(group_of.max()) + 1 if h else 0):
            reads = per_child[group_of == g].any(0)  # (α, d): inputs each child of the group reads
            if bool((reads.sum(0) > 1).any()):
                j = int(torch.nonzero(reads.sum(0) > 1)[0])
                raise FpewidenError(
                    f"not a grouped structure: input {j} feeds two children of neuron group {g}; the fast layout "
                    "needs a conversion with --split shared or grouped:G"
                )
            free = torch.nonzero(~reads.any(0)).flatten()
            sets = [torch.nonzero(reads[c]).flatten() for c in range(alpha)]
            sets[0] = torch.cat([sets[0], free]).sort().values  # inputs no child reads: any child, zero weights
            st.blocks.append(sets)
    if outgoing == "tied":
        copies = w_out.view(w_out.shape[0], h, alpha)
        if not bool((copies == copies[:, :, :1]).all()):
            raise FpewidenError("not a tied structure: a parent's children have different outgoing weights")
    return st


class Children(nn.Module):
    """x (…, inputs, in the column order `x_order` of the stored matrices) -> the children's activations: a list
    of blocks (grouped incoming) or one (…, h·α) tensor, and `emitted`, the widened row each output column is."""

    def __init__(self, st, w_in, b_in, act, gated=False, x_order=None):
        super().__init__()
        rows, d = w_in[0].shape
        a = st.alpha
        self.act, self.gated, self.n_in = act, gated, len(w_in)
        pos = torch.arange(d)
        if x_order is not None:  # inputs arrive permuted: gather by position
            pos = torch.empty(d, dtype=torch.long)
            pos[x_order] = torch.arange(d)
        self.w, self.b, self.n_blocks, order = nn.ParameterList(), nn.ParameterList(), 0, []
        if st.blocks is not None:
            for g, sets in enumerate(st.blocks):
                parents = torch.nonzero(st.groups == g).flatten()
                for c, inputs in enumerate(sets):
                    kid_rows = parents * a + c
                    self.register_buffer(f"gather{self.n_blocks}", pos[inputs].clone())
                    for k in range(self.n_in):
                        self.w.append(_param(w_in[k][kid_rows][:, inputs].T))
                        self.b.append(_param(b_in[k][kid_rows] if b_in[k] is not None else torch.zeros(len(kid_rows))))
                    order.append(kid_rows)
                    self.n_blocks += 1
            self.emitted = torch.cat(order)
        else:
            for k in range(self.n_in):
                w = w_in[k] if x_order is None else w_in[k][:, x_order]
                self.w.append(_param(w.T))
                self.b.append(_param(b_in[k] if b_in[k] is not None else torch.zeros(rows)))
            self.emitted = torch.arange(rows)
        self.grouped = st.blocks is not None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        def child(part: torch.Tensor, i: int) -> torch.Tensor:
            pre = [torch.matmul(part, self.w[i * self.n_in + k]) + self.b[i * self.n_in + k] for k in range(self.n_in)]
            return self.act(pre[0]) * pre[1] if self.gated else self.act(pre[0])

        if not self.grouped:
            return [child(x, 0)]
        return [child(x.index_select(-1, getattr(self, f"gather{i}")), i) for i in range(self.n_blocks)]


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().to(torch.float32).contiguous(), requires_grad=False)


class Outgoing(nn.Module):
    """The children's activations -> the pair's output, by the outgoing structure (tied, grouped or copy)."""

    def __init__(self, st: Structure, emitted: torch.Tensor, n_groups: int, w_out, b_out):
        super().__init__()
        a = st.alpha
        o, wide = w_out.shape
        h = wide // a
        self.alpha, self.outgoing, self.n_groups = a, st.outgoing, n_groups
        if st.outgoing == "tied":
            self.w_out = _param(w_out.view(o, h, a)[:, :, 0].T)  # one column per parent, the original bytes
        elif st.outgoing == "grouped":  # output r reads child r mod α
            pos = torch.empty(wide, dtype=torch.long)
            pos[emitted] = torch.arange(wide)
            self.w_c, rows = nn.ParameterList(), []
            for c in range(a):
                r, cols = torch.arange(c, o, a), torch.arange(h) * a + c
                rows.append(r)
                self.register_buffer(f"cols{c}", pos[cols].clone())
                self.w_c.append(_param(w_out[r][:, cols].T))
            inverse = torch.empty(o, dtype=torch.long)
            inverse[torch.cat(rows)] = torch.arange(o)
            self.register_buffer("out_perm", inverse)
        else:
            self.w_out = _param(w_out[:, emitted].T)
        self.b_out = _param(b_out) if b_out is not None else None

    def forward(self, kids: list[torch.Tensor]) -> torch.Tensor:
        a = self.alpha
        if self.outgoing == "tied":
            if len(kids) > 1:  # blocks come as (group, child): add a group's children, groups in neuron order
                s = torch.cat([sum(kids[g * a + c] for c in range(a)) for g in range(self.n_groups)], dim=-1)
            else:
                s = kids[0].reshape(*kids[0].shape[:-1], -1, a).sum(-1)
            y = torch.matmul(s, self.w_out)
        elif self.outgoing == "grouped":
            k = torch.cat(kids, dim=-1)
            parts = [torch.matmul(k.index_select(-1, getattr(self, f"cols{c}")), w) for c, w in enumerate(self.w_c)]
            y = torch.cat(parts, dim=-1).index_select(-1, self.out_perm)
        else:
            y = torch.matmul(torch.cat(kids, dim=-1), self.w_out)
        return y + self.b_out if self.b_out is not None else y


class FastPair(nn.Module):
    """A converted FFN in its fast form: x (…, d) -> y (…, o). For Hugging Face models."""

    def __init__(self, st: Structure, w_in, b_in, w_out, b_out, act, gated=False):
        super().__init__()
        self.children_ = Children(st, w_in, b_in, act, gated)
        n_groups = len(st.blocks) if st.blocks is not None else 1
        self.out = Outgoing(st, self.children_.emitted, n_groups, w_out, b_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.children_(x))


class FastMLP(nn.Module):
    """An MLP chain with every converted pair in its fast form; other layers dense. Between layers the
    activations travel in the order the blocks emit them; the next matrix's columns are permuted to match, so
    nothing is reordered at run time."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor | None]], structures: dict[int, Structure], act):
        super().__init__()
        self.act = act
        self.stages = nn.ModuleList()
        self.kinds: list[str] = []
        order = None  # column order of the next layer's input
        i = 0
        while i < len(layers):
            w, b = layers[i]
            st = structures.get(i)
            if st is not None:
                kids = Children(st, [w], [b], act, x_order=order)
                last = i + 1 == len(layers) - 1
                if st.outgoing in ("tied", "grouped") and not last:
                    raise FpewidenError("the fast layout ties or groups outgoing weights of the last hidden layer only")
                if last:
                    w_out, b_out = layers[i + 1]
                    n_groups = len(st.blocks) if st.blocks is not None else 1
                    self.stages.append(nn.ModuleList([kids, Outgoing(st, kids.emitted, n_groups, w_out, b_out)]))
                    self.kinds.append("pair")
                    return
                self.stages.append(kids)
                self.kinds.append("children")
                order = kids.emitted
                i += 1
                continue
            w_used = w if order is None else w[:, order]
            self.stages.append(nn.ModuleList([_Linear(w_used, b)]))
            self.kinds.append("dense" if i + 1 < len(layers) else "last")
            order = None
            i += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage, kind in zip(self.stages, self.kinds, strict=True):
            if kind == "pair":
                x = stage[1](stage[0](x))
            elif kind == "children":
                x = torch.cat(stage(x), dim=-1)
            elif kind == "dense":
                x = self.act(stage[0](x))
            else:
                x = stage[0](x)
        return x


class _Linear(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        super().__init__()
        self.w = _param(w.T)
        self.b = _param(b) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.w)
        return y + self.b if self.b is not None else y


def split_groups(split: str | None) -> int | None:
    """G of a `grouped:G` (or `shared`, G=1) split; None for splits without a group structure."""
    if split == "shared":
        return 1
    if split and split.startswith("grouped:") and split[8:].isdigit():
        return int(split[8:])
    return None


def fast_layout_refusal(meta) -> str | None:
    """Why the fast layout cannot run a checkpoint, from its metadata alone (None: it may; the tensors are checked
    when the layout is built). Export asks this before loading anything."""
    if meta.alpha is None:
        return "the fast layout is for FPE conversions (this checkpoint has no fpewiden metadata); use --layout dense"
    if meta.alpha == 1:
        return (
            "the fast layout runs the structures of a widened model; this checkpoint is pruned (α=1), whose zeros no "
            "dense block can skip: use --layout dense, or --layout sparse for a smaller file"
        )
    if split_groups(meta.split) is None and (meta.outgoing or "copy") == "copy":
        return (
            "the fast layout needs a structure to exploit: a conversion with --split shared or grouped:G, or "
            "--outgoing tied or grouped (this one split each neuron on its own and copied outgoing weights); "
            "use --layout dense"
        )
    return None


def structures(loaded) -> dict[str, Structure]:
    """Each converted pair's structure (by pair name), from the metadata, verified on the tensors."""
    from fpewiden.arch import find_pairs

    meta = loaded.ck.meta
    refusal = fast_layout_refusal(meta)
    if refusal is not None:
        raise FpewidenError(refusal)
    groups = split_groups(meta.split)
    outgoing = meta.outgoing or "copy"
    converted = {p["name"] for p in meta.pairs or []}
    t = loaded.tensors()
    out = {}
    for p in find_pairs(loaded.ck):
        if p.name not in converted:
            continue
        flip = (lambda x: x.T) if p.transposed else (lambda x: x)
        masks = [flip(loaded.masks.get(w, t[w] != 0)) for w in p.in_weights]
        out[p.name] = find_structure(masks, flip(t[p.out_weight]), meta.alpha, outgoing, groups)
    return out
