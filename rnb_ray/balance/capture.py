"""Per-domain gradient sums fused into the ordinary backward pass (torch only: no Ray, no IO).

For a linear layer s = aWᵀ the weight gradient of a set of tokens is ΔᵀH (Δ: the tokens' output
gradients, delivered by the ordinary backward; H: their inputs). Autograd forms it once for the whole
batch. While a ``DomainGradCapture`` is active, each captured layer's forward runs through
``_FusedLinear``, whose backward computes the same weight gradient as one GEMM per domain over that
domain's token rows, Δ_dᵀH_d, adds each to the domain's running sum, and returns Σ_d Δ_dᵀH_d as the
weight gradient. The GEMM work is exactly the ordinary weight gradient's (the rows are partitioned, not
repeated): per-domain gradients with no extra pass and no extra GEMM — only the m additions into the
per-domain accumulators. They are this worker's own (DDP all-reduces ``param.grad`` afterwards).

Rows are grouped by their example's domain: examples do not interact (causal LM, no batch statistics), so
every output-gradient row of an example belongs to that example's loss, padded/ignored positions included
(their Δ rows are zero). When the batch's examples are ordered by domain (``train`` sorts each batch) the
groups are contiguous slices and nothing is copied; otherwise the rows are gathered once per layer.

Rows of the sums: by default one per domain (row d: domain d). With ``slots=S`` (the trainer passes its
examples per round, ``batch_size × update_every``) a domain gets the next free row the first time a round
sees it (``slot``: domain → row, -1 if unseen), so the sums take S × D, not m × D — at 1,000 domains and a
10-step round of 4 examples, 40 rows instead of 1,000 — and a round's rows are contiguous (``reset`` zeroes
one block; the round's reduction forms G from them in place). More domains than S in a round grow the rows.

Weight tying: the function returns only this layer's contribution, and autograd adds the other uses of a
shared weight (e.g. GPT-2's input embedding) into ``.grad`` as usual; the captured sums hold the head's
contribution only. Biases are not captured (their gradient is computed and returned as usual).

Loss convention (``lm.per_example_loss``): batch loss = mean over examples of the example's mean token
loss. The output gradient then carries a factor 1/B, so ``begin(..., scale=B)`` turns the captured sums
into sums of per-example gradients; dividing by the example counts gives domain-mean gradients ḡ_d.

With ``sketch_dim > 0`` each layer's per-domain gradient is stored as its sketch (``balance.sketch``),
formed in the same backward in addition to the ordinary weight gradient (which is then one GEMM, not split
by domain): ``sketch_kind="rowhash"`` (default) hashes the layer's output rows into b = ``sketch_dim`` buckets,
(Δ_d Cᵀ)ᵀH_d, b·in numbers per layer and domain (a layer with out ≤ b is kept exact); ``"gaussian"`` stores
(Δ_d R₁)ᵀ(H_d R₂), k₁·k₂ ≤ sketch_dim numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rnb_ray.balance.sketch import (
    SKETCH_KINDS,
    LayerSketch,
    RowHash,
    hash_rows,
    make_layer_sketch,
    make_row_hash,
    row_hash_flops,
    sketch_flops,
)


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2's Conv1D: y = x W + b with W of shape (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2


def is_capturable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def _head(model: nn.Module) -> tuple[str, nn.Module]:
    model = _unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        linears = [(n, m) for n, m in model.named_modules() if is_capturable(m)]
        if not linears:
            raise ValueError("the model has no linear layer to capture")
        return linears[-1]
    for name, mod in model.named_modules():
        if mod is head:
            return name, mod
    raise ValueError("output head not found among the model's modules")


def _last_block(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear layers of the last transformer block (the last entry of the longest ModuleList)."""
    model = _unwrap(model)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError("the model has no block list (nn.ModuleList) to take the last block from")
    name, blocks = max(lists, key=lambda nm: len(nm[1]))
    last = len(blocks) - 1
    out = [(f"{name}.{last}.{n}", m) for n, m in blocks[last].named_modules() if is_capturable(m)]
    if not out:
        raise ValueError(f"the last block {name}.{last} has no linear layer")
    return out


def layer_shapes(modules: dict[str, nn.Module]) -> list[tuple[int, int]]:
    """(out_features, in_features) of each captured layer (Conv1D stores its weight transposed)."""
    out = []
    for mod in modules.values():
        w = mod.weight
        out.append((w.shape[1], w.shape[0]) if _is_conv1d(mod) else (w.shape[0], w.shape[1]))
    return out


def find_capture_modules(model: nn.Module, spec: str) -> dict[str, nn.Module]:
    """Resolve ``capture`` (head | last_block | head+last_block | comma-separated module names)."""
    model_ = _unwrap(model)
    chosen: list[tuple[str, nn.Module]] = []
    for part in (s.strip() for s in spec.replace("+", ",").split(",")):
        if not part:
            continue
        if part == "head":
            chosen.append(_head(model_))
        elif part == "last_block":
            chosen.extend(_last_block(model_))
        else:
            try:
                mod = model_.get_submodule(part)
            except AttributeError as e:
                raise ValueError(f"capture module {part!r} not found in the model") from e
            if not is_capturable(mod):
                raise ValueError(f"capture module {part!r} is a {type(mod).__name__}, not a linear layer")
            chosen.append((part, mod))
    out: dict[str, nn.Module] = {}
    for name, mod in chosen:
        out.setdefault(name, mod)
    if not out:
        raise ValueError(f"capture spec {spec!r} selects no layer")
    return out


@dataclass
class _Layer:
    name: str
    module: nn.Module
    out_features: int
    in_features: int
    transposed: bool  # Conv1D: the parameter is stored (in, out)
    offset: int
    size: int
    sketch: LayerSketch | RowHash | None


@dataclass(frozen=True)
class _Batch:
    """One ``begin()``: how the rows (B·T) of every captured layer's input group into domains."""

    rows: int  # B·T: the rows every captured layer sees
    scale: float
    target: str  # "train" | "eval"
    row_perm: torch.Tensor | None  # gathers the rows into domain order (None: already contiguous)
    segments: list[tuple[int, int, int]]  # (row of the sums or -1 for eval, start, end) over the (permuted) rows
    pos: torch.Tensor | None  # sketch only: positions carrying gradient, ordered by domain
    pos_segments: list[tuple[int, int, int]]  # sketch only: (row of the sums, start, end) over pos
    pos_all: bool = False  # sketch only: pos is every row in order (no gather needed)


class _FusedLinear(torch.autograd.Function):
    """y = x Wᵀ + b (or x W + b for Conv1D) whose backward splits the weight gradient by domain."""

    @staticmethod
    def forward(ctx, x, weight, bias, cap, layer, batch):  # noqa: ANN001 — autograd.Function signature
        if layer.transposed:
            x2 = x.reshape(-1, x.shape[-1])
            y2 = torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
            y = y2.view(*x.shape[:-1], weight.shape[1])
        else:
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.cap, ctx.layer, ctx.batch = cap, layer, batch
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        x, weight = ctx.saved_tensors
        layer: _Layer = ctx.layer
        dt = grad_out.dtype  # the forward's compute dtype (bf16 under autocast)
        g2 = grad_out.reshape(-1, layer.out_features)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = weight.to(dt)
            grad_x = (g2 @ w.T if layer.transposed else g2 @ w).view(x.shape).to(x.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, layer.in_features).to(dt)
            grad_w = ctx.cap._weight_grad(layer, ctx.batch, g2, x2).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


class DomainGradCapture:
    """Accumulates per-domain gradient sums (or sketches) of selected linear layers over a round.

    Usage per step: ``begin(domains, token_mask, scale)`` → forward → backward → ``end()``. Several
    micro-batches may be in flight (each forward keeps the grouping of the ``begin`` before it). At the end
    of a round ``take()`` returns (sums (m, D) float32, counts (m,)) and resets. ``begin(..., target=
    "eval")`` routes a batch's whole gradient into one separate accumulator (the evaluation gradient).
    Weights only (biases are not captured). Exact sums are laid out like the parameters
    (``weight.grad.reshape(-1)`` for each layer, concatenated in ``names`` order).

    While it exists, each captured module's ``forward`` is replaced by a wrapper that, between ``begin``
    and ``end`` and with gradients enabled, runs ``_FusedLinear``; otherwise it calls the original forward.
    ``remove()`` restores the modules. ``seconds``/``flops`` count only the work capture adds to the
    ordinary backward (grouping, gathers, accumulation; for sketches also the projections);
    ``flops_grouped`` counts the per-domain GEMMs that replace autograd's own weight-gradient GEMM.
    """

    def __init__(self, modules: dict[str, nn.Module], num_domains: int, *, sketch_dim: int = 0,
                 seed: int = 0, device: torch.device | str = "cpu", sketch_kind: str = "rowhash",
                 exact_rows: dict[str, torch.Tensor] | None = None, slots: int | None = None):
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be >= 1 (rows of the sums a round may fill), got {slots}")
        if sketch_kind not in SKETCH_KINDS:
            raise ValueError(f"unknown sketch kind {sketch_kind!r}: choose from {', '.join(SKETCH_KINDS)}")
        self.num_domains = num_domains
        self.sketch_kind = sketch_kind
        self.device = torch.device(device)
        self.layers: list[_Layer] = []
        offset = 0
        for i, (name, mod) in enumerate(modules.items()):
            if not is_capturable(mod):
                raise ValueError(f"{name} is a {type(mod).__name__}, not a linear layer")
            if getattr(mod, "_rnb_capture", None) is not None:
                raise ValueError(f"{name} is already captured by another DomainGradCapture (call its remove())")
            w = mod.weight
            transposed = _is_conv1d(mod)
            out_f, in_f = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
            sk: LayerSketch | RowHash | None = None
            if sketch_dim > 0 and sketch_kind == "rowhash" and sketch_dim < out_f:
                sk = make_row_hash(out_f, in_f, sketch_dim, seed=seed * 1_000_003 + i,
                                   exact_rows=(exact_rows or {}).get(name)).to(self.device)
                size = sk.dim
            elif sketch_dim > 0 and sketch_kind == "gaussian":
                sk = make_layer_sketch(out_f, in_f, sketch_dim, seed=seed * 1_000_003 + i).to(self.device)
                size = sk.dim
            else:
                size = out_f * in_f
            self.layers.append(_Layer(name, mod, out_f, in_f, transposed, offset, size, sk))
            offset += size
        self.dim = offset
        # Row of the sums each domain adds into: fixed (row d) without ``slots``, else assigned on first sight
        # in a round (-1: not seen this round).
        self.slotted = slots is not None
        self.slot = torch.arange(num_domains) if not self.slotted else torch.full((num_domains,), -1)
        self.used = 0  # rows assigned this round (slotted)
        rows = num_domains if slots is None else min(int(slots), num_domains)
        self.sums = torch.zeros(rows, self.dim, dtype=torch.float32, device=self.device)
        self.counts = torch.zeros(num_domains, dtype=torch.int64)
        self.eval_sum = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        self.eval_count = 0
        self.seconds = 0.0  # time capture adds to the step
        self.flops = 0  # floating-point operations capture adds
        self.flops_grouped = 0  # per-domain weight-gradient GEMMs (replacing autograd's, not extra)
        self._batch: _Batch | None = None
        self._patched: list[tuple[nn.Module, object]] = []
        for layer in self.layers:
            self._patch(layer)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def sketched_columns(self) -> torch.Tensor:
        """(dim,) bool: the stored numbers that are sketched (estimated) rather than exact sums: a Gaussian
        sketch's, a row hash's hashed buckets (not its exact rows), none of an exact layer's."""
        parts = []
        for layer in self.layers:
            sk = layer.sketch
            if sk is None:
                parts.append(torch.zeros(layer.size, dtype=torch.bool))
            elif isinstance(sk, RowHash):
                mask = torch.ones(sk.buckets, sk.in_features, dtype=torch.bool)
                mask[:sk.exact] = False
                parts.append(mask.reshape(-1))
            else:
                parts.append(torch.ones(layer.size, dtype=torch.bool))
        return torch.cat(parts)

    def effective_dims(self) -> list[float]:
        """Per sketched layer, the k of the error estimate (``gram.expected_sketch_error``)."""
        out = []
        for layer in self.layers:
            sk = layer.sketch
            if isinstance(sk, RowHash):
                out.append(float(sk.hashed))
            elif sk is not None:
                k1, k2 = sk.r_out.shape[1], sk.r_in.shape[1]
                out.append(1.0 / (1.0 / k1 + 1.0 / k2 + 1.0 / (k1 * k2)))
        return out

    def _patch(self, layer: _Layer) -> None:
        mod = layer.module
        original = mod.forward  # bound method (or an instance override, kept for restore)
        previous = mod.__dict__.get("forward")

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            batch = self._batch
            if batch is None or args or kwargs or not torch.is_grad_enabled() or not mod.weight.requires_grad:
                return original(x, *args, **kwargs)
            return _FusedLinear.apply(x, mod.weight, mod.bias, self, layer, batch)

        mod.forward = forward
        mod._rnb_capture = self
        self._patched.append((mod, previous))

    def remove(self) -> None:
        """Give the modules their own forward back (idempotent)."""
        for mod, previous in self._patched:
            if previous is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = previous
            mod.__dict__.pop("_rnb_capture", None)
        self._patched = []
        self._batch = None

    # ------------------------------------------------------------------ per step
    def begin(self, domains: torch.Tensor, token_mask: torch.Tensor, scale: float, target: str = "train") -> None:
        """Announce the next forward's examples: their domains (B,), which token positions carry gradient
        (B, T; used by sketches) and the factor that makes output gradients per-example (B for a mean over
        examples). Ordering the batch's examples by domain makes the exact grouping copy-free."""
        t0 = time.perf_counter()
        doms = torch.as_tensor(domains).detach().cpu().long().reshape(-1)
        mask = torch.as_tensor(token_mask).detach().bool()
        if mask.dim() != 2 or mask.shape[0] != doms.numel():
            raise ValueError(f"token_mask must be (B, T) with B = {doms.numel()} domains, got {tuple(mask.shape)}")
        if target not in ("train", "eval"):
            raise ValueError(f"unknown capture target {target!r}")
        B, T = mask.shape
        if target == "train" and B and (int(doms.min()) < 0 or int(doms.max()) >= self.num_domains):
            raise ValueError(f"domain ids must lie in [0, {self.num_domains}), got {doms.unique().tolist()}")
        row_perm = None
        if target == "eval":
            segments = [(-1, 0, B * T)]
            self.eval_count += B
            ex_order, ex_doms = torch.arange(B), torch.zeros(B, dtype=torch.long)
        else:
            runs, run_len = torch.unique_consecutive(doms, return_counts=True)
            if runs.numel() == torch.unique(doms).numel():  # every domain's examples are contiguous
                ends = (torch.cumsum(run_len, 0) * T).tolist()
                segments = list(zip(runs.tolist(), [0, *ends[:-1]], ends, strict=True))
                ex_order = torch.arange(B)
            else:
                ex_order = torch.argsort(doms, stable=True)
                d_sorted, n_ex = torch.unique_consecutive(doms[ex_order], return_counts=True)
                ends = (torch.cumsum(n_ex, 0) * T).tolist()
                segments = list(zip(d_sorted.tolist(), [0, *ends[:-1]], ends, strict=True))
                row_perm = (ex_order[:, None] * T + torch.arange(T)[None, :]).reshape(-1).to(self.device)
            ex_doms = doms
            self.counts += torch.bincount(doms, minlength=self.num_domains)[: self.num_domains]
            if self.slotted:
                self._assign_slots(doms)
                segments = [(int(self.slot[d]), s, e) for d, s, e in segments]
        pos, pos_segments = None, []
        if any(layer.sketch is not None for layer in self.layers):
            # Token positions carrying gradient, grouped by domain (example order, then position).
            keep = mask.cpu()[ex_order]
            rows = (ex_order[:, None] * T + torch.arange(T)[None, :])[keep]
            tok_dom = ex_doms[ex_order][:, None].expand(B, T)[keep]
            d_u, n_tok = torch.unique_consecutive(tok_dom, return_counts=True)
            ends = torch.cumsum(n_tok, 0).tolist()
            pos_segments = list(zip(self.slot[d_u].tolist() if target == "train" else [-1] * len(ends),
                                    [0, *ends[:-1]], ends, strict=True))
            pos = rows.to(self.device)
            pos_all = bool(keep.all()) and bool((ex_order == torch.arange(B)).all())
        else:
            pos_all = False
        self._batch = _Batch(B * T, float(scale), target, row_perm, segments, pos, pos_segments, pos_all)
        self.seconds += time.perf_counter() - t0

    def end(self) -> None:
        self._batch = None

    def _assign_slots(self, doms: torch.Tensor) -> None:
        """Give the batch's domains not yet seen this round the next free rows (growing the sums if needed)."""
        new = [d for d in torch.unique(doms).tolist() if int(self.slot[d]) < 0]
        if not new:
            return
        need = self.used + len(new)
        if need > self.sums.shape[0]:  # more domains in this round than announced: grow (rare, costs a copy)
            rows = min(self.num_domains, max(need, 2 * self.sums.shape[0]))
            grown = torch.zeros(rows, self.dim, dtype=self.sums.dtype, device=self.device)
            grown[: self.used] = self.sums[: self.used]
            self.sums = grown
        self.slot[torch.tensor(new)] = torch.arange(self.used, need)
        self.used = need

    def domain_sums(self) -> torch.Tensor:
        """(m, D) this round's sums by domain (a copy when slotted; the buffer itself otherwise)."""
        if not self.slotted:
            return self.sums
        out = torch.zeros(self.num_domains, self.dim, dtype=self.sums.dtype, device=self.device)
        seen = torch.nonzero(self.slot >= 0).reshape(-1)
        if seen.numel():
            out[seen] = self.sums[self.slot[seen].to(self.device)]
        return out

    def _weight_grad(self, layer: _Layer, batch: _Batch, g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The layer's weight gradient (parameter layout), adding its per-domain parts on the way."""
        if g2.shape[0] != batch.rows:
            raise ValueError(f"capture layer {layer.name} saw {g2.shape[0]} rows, but begin() announced "
                             f"{batch.rows} (B·T); capture needs every captured layer applied to the whole batch")
        out_f, in_f = layer.out_features, layer.in_features
        sl = slice(layer.offset, layer.offset + layer.size)
        if layer.sketch is not None:
            return self._sketch_weight_grad(layer, batch, g2, x2, sl)
        t_extra = 0.0
        t0 = time.perf_counter()
        if batch.row_perm is not None:
            g2, x2 = g2.index_select(0, batch.row_perm), x2.index_select(0, batch.row_perm)
        t_extra += time.perf_counter() - t0
        total: torch.Tensor | None = None
        shape = (in_f, out_f) if layer.transposed else (out_f, in_f)
        for d, s, e in batch.segments:
            if e == s:
                continue
            v = x2[s:e].T @ g2[s:e] if layer.transposed else g2[s:e].T @ x2[s:e]
            self.flops_grouped += 2 * (e - s) * out_f * in_f
            t0 = time.perf_counter()
            acc = self.eval_sum[sl] if d < 0 else self.sums[d, sl]
            acc.view(shape).add_(v, alpha=batch.scale)  # scale and add: 2 flops an element
            if total is None:
                total = v
                self.flops += 2 * out_f * in_f
            else:
                total.add_(v)
                self.flops += 3 * out_f * in_f
            t_extra += time.perf_counter() - t0
        if total is None:  # an empty batch
            total = torch.zeros(shape, dtype=g2.dtype, device=g2.device)
        self.seconds += t_extra
        return total

    def _sketch_weight_grad(self, layer: _Layer, batch: _Batch, g2: torch.Tensor, x2: torch.Tensor,
                            sl: slice) -> torch.Tensor:
        grad = x2.T @ g2 if layer.transposed else g2.T @ x2  # the ordinary weight gradient
        t0 = time.perf_counter()
        with torch.no_grad():
            pos, sk = batch.pos, layer.sketch
            assert pos is not None and sk is not None
            if isinstance(sk, RowHash):
                # Hash every row once (one pass over Δ), then keep the positions carrying gradient (small).
                DR = hash_rows(g2.float(), sk)
                HR = x2.float()
                if not batch.pos_all:
                    DR, HR = DR.index_select(0, pos), HR.index_select(0, pos)
                self.flops += row_hash_flops(int(pos.numel()), layer.out_features, sk, hashed_rows=g2.shape[0])
            else:
                D, H = g2.index_select(0, pos).float(), x2.index_select(0, pos).float()
                DR, HR = D @ sk.r_out, H @ sk.r_in  # project every token once
                self.flops += sketch_flops(int(pos.numel()), layer.out_features, layer.in_features, sk)
            shape = (DR.shape[1], HR.shape[1])
            for d, s, e in batch.pos_segments:
                if e == s:
                    continue
                acc = self.eval_sum[sl] if d < 0 else self.sums[d, sl]
                acc2 = acc.view(shape)  # the GEMM adds straight into the sum (out= aliasing the input: in place)
                torch.addmm(acc2, DR[s:e].T, HR[s:e], alpha=batch.scale, out=acc2)
        self.seconds += time.perf_counter() - t0
        return grad

    # ------------------------------------------------------------------ per round
    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(per-domain gradient sums (m, D) float32, example counts (m,)) since the last take; resets."""
        sums = self.domain_sums().cpu().numpy().copy()
        counts = self.counts.numpy().copy()
        self.sums.zero_()
        self.counts.zero_()
        self._free_slots()
        return sums, counts

    def _free_slots(self) -> None:
        if self.slotted:
            self.slot.fill_(-1)
            self.used = 0

    def reset(self) -> None:
        """Start the next round (after the round's reduction has read ``sums``/``eval_sum`` in place). Only the
        rows of the domains this worker saw hold numbers: zeroing just those keeps a round's cost in the
        domains it touched, not in m (at 64 domains the whole (m, D) buffer is 200 MB)."""
        touched = torch.nonzero(self.counts).reshape(-1)
        if self.slotted:  # the round's rows are the first ``used``: one block
            self.sums[: self.used].zero_()
            self._free_slots()
        elif 2 * touched.numel() < self.num_domains:
            for r in touched.tolist():  # row by row: half index_fill_'s time on the CPU
                self.sums[r].zero_()
        else:
            self.sums.zero_()
        self.counts.zero_()
        self.eval_sum.zero_()
        self.eval_count = 0

    def take_eval(self) -> tuple[np.ndarray, int]:
        out, n = self.eval_sum.cpu().numpy().copy(), self.eval_count
        self.eval_sum.zero_()
        self.eval_count = 0
        return out, n
