"""Per-domain gradient sums from the ordinary backward pass (torch only: no Ray, no IO).

The paper's trick for a linear layer s = aWᵀ: the weight gradient of a token is the outer product of the
output gradient ∂ℓ/∂s (delivered by the ordinary backward) and the input a (kept by a forward hook).
Summing those outer products over the tokens of each domain's examples gives Σ_{x∈d} ∂ℓ_x/∂W per
domain — with no extra forward or backward pass, and from this worker's batch only (the hooks see local
activations and output gradients, before DDP all-reduces parameter gradients).

Loss convention (``train.per_example_loss``): batch loss = mean over examples of the example's mean token
loss. The output gradient then carries a factor 1/B, so ``begin(..., scale=B)`` turns the captured sums
into sums of per-example gradients; dividing by the example counts gives domain-mean gradients ḡ_d.

With ``sketch_dim > 0`` each layer's per-domain gradient is stored as its sketch (``balance.sketch``):
(Δ_d R₁)ᵀ(H_d R₂), k₁·k₂ ≤ sketch_dim numbers per layer and domain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rnb_ray.balance.sketch import LayerSketch, make_layer_sketch, sketch_flops


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
    sketch: LayerSketch | None


class DomainGradCapture:
    """Accumulates per-domain gradient sums (or sketches) of selected linear layers over a round.

    Usage per step: ``begin(domains, token_mask, scale)`` → forward → backward → ``end()``. At the end
    of a round ``take()`` returns (sums (m, D) float32, counts (m,)) and resets. ``begin(..., target=
    "eval")`` routes a batch's whole gradient into one separate accumulator (the evaluation gradient).
    Weights only (biases are not captured). Exact sums are laid out like the parameters
    (``weight.grad.reshape(-1)`` for each layer, concatenated in ``names`` order).
    """

    def __init__(self, modules: dict[str, nn.Module], num_domains: int, *, sketch_dim: int = 0,
                 seed: int = 0, device: torch.device | str = "cpu"):
        self.num_domains = num_domains
        self.device = torch.device(device)
        self.layers: list[_Layer] = []
        offset = 0
        for i, (name, mod) in enumerate(modules.items()):
            if not is_capturable(mod):
                raise ValueError(f"{name} is a {type(mod).__name__}, not a linear layer")
            w = mod.weight
            transposed = _is_conv1d(mod)
            out_f, in_f = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
            sk = None
            if sketch_dim > 0:
                sk = make_layer_sketch(out_f, in_f, sketch_dim, seed=seed * 1_000_003 + i).to(self.device)
                size = sk.dim
            else:
                size = out_f * in_f
            self.layers.append(_Layer(name, mod, out_f, in_f, transposed, offset, size, sk))
            offset += size
        self.dim = offset
        self.sums = torch.zeros(num_domains, self.dim, dtype=torch.float32, device=self.device)
        self.counts = torch.zeros(num_domains, dtype=torch.int64)
        self.eval_sum = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        self.eval_count = 0
        self.seconds = 0.0  # time spent forming the per-domain products
        self.flops = 0  # their floating-point operations
        self._batch: tuple | None = None
        self._handles = [layer.module.register_forward_hook(self._make_hook(layer)) for layer in self.layers]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ per step
    def begin(self, domains: torch.Tensor, token_mask: torch.Tensor, scale: float, target: str = "train") -> None:
        """Announce the next forward's examples: their domains (B,), which token positions carry gradient
        (B, T) and the factor that makes output gradients per-example (B for a mean over examples)."""
        t0 = time.perf_counter()
        domains = domains.to(self.device).long()
        mask = token_mask.to(self.device).bool()
        B, T = mask.shape
        pos = mask.reshape(-1).nonzero().squeeze(1)
        if target == "eval":
            segments = [(-1, 0, int(pos.numel()))]
            self.eval_count += B
        elif target == "train":
            tok_dom = domains[pos // T]
            order = torch.argsort(tok_dom, stable=True)
            pos = pos[order]
            doms, n_tok = torch.unique_consecutive(tok_dom[order], return_counts=True)
            ends = torch.cumsum(n_tok, 0).tolist()
            starts = [0] + ends[:-1]
            segments = list(zip(doms.tolist(), starts, ends, strict=True))
            self.counts += torch.bincount(domains.cpu(), minlength=self.num_domains)[: self.num_domains]
        else:
            raise ValueError(f"unknown capture target {target!r}")
        self._batch = (pos, segments, float(scale), target)
        self.seconds += time.perf_counter() - t0

    def end(self) -> None:
        self._batch = None

    def _make_hook(self, layer: _Layer):
        def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self._batch is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return
            if not output.requires_grad:
                return
            h = inputs[0].detach()
            batch = self._batch
            output.register_hook(lambda g: self._accumulate(layer, h, g, batch))

        return forward_hook

    def _accumulate(self, layer: _Layer, h: torch.Tensor, g: torch.Tensor, batch: tuple) -> None:
        t0 = time.perf_counter()
        pos, segments, scale, target = batch
        with torch.no_grad():
            H = h.reshape(-1, layer.in_features)[pos].float()
            D = g.reshape(-1, layer.out_features)[pos].float()
            sl = slice(layer.offset, layer.offset + layer.size)
            if layer.sketch is not None:
                # Project every token once, then the per-domain products are only k1 × k2.
                DR, HR = D @ layer.sketch.r_out, H @ layer.sketch.r_in
                self.flops += sketch_flops(int(pos.numel()), layer.out_features, layer.in_features, layer.sketch)
            for d, s, e in segments:
                if e == s:
                    continue
                if layer.sketch is not None:
                    v = (DR[s:e].T @ HR[s:e]).reshape(-1)
                elif layer.transposed:
                    v = (H[s:e].T @ D[s:e]).reshape(-1)
                else:
                    v = (D[s:e].T @ H[s:e]).reshape(-1)
                if layer.sketch is None:
                    self.flops += 2 * (e - s) * layer.out_features * layer.in_features
                if target == "eval":
                    self.eval_sum[sl] += v * scale
                else:
                    self.sums[d, sl] += v * scale
        self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ per round
    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(per-domain gradient sums (m, D) float32, example counts (m,)) since the last take; resets."""
        sums = self.sums.cpu().numpy().copy()
        counts = self.counts.numpy().copy()
        self.sums.zero_()
        self.counts.zero_()
        return sums, counts

    def take_eval(self) -> tuple[np.ndarray, int]:
        out, n = self.eval_sum.cpu().numpy().copy(), self.eval_count
        self.eval_sum.zero_()
        self.eval_count = 0
        return out, n

