"""The gene on a loaded model through the low-rank path: ``x -> W x + alpha * B (A x)``.

Forward hooks on the gene's modules add the scaled low-rank product to each output, so layer
selection and recalibration can try coefficients (and take gradients in them) without ever
materializing a full weight. ``GenePatch`` is a context manager; leaving it removes the hooks.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from safegene_fast.eval.generate import ModelError, check_factors_fit
from safegene_fast.gene import SafetyGene


def check_fits(model: torch.nn.Module, gene: SafetyGene, layers: list[int] | None = None) -> None:
    """The gene's factors for ``layers`` (default: all its layers) fit ``model``: the gene has
    those layers, and the model has each of their modules with the factors' shape."""
    source = str(gene.folder) if gene.folder is not None else "the gene"
    layers = gene.layers if layers is None else layers
    absent = sorted(set(layers) - set(gene.layers))
    if absent:
        raise ModelError(f"{source}: layer {absent[0]} is not one of the gene's layers "
                         f"({', '.join(map(str, gene.layers))}).")
    check_factors_fit(model, {name: (m.B.shape[0], m.A.shape[1]) for name, m in gene.modules.items()
                              if m.layer in layers}, source, "gene")


class GenePatch:
    """``with GenePatch(model, gene, layers) as patch: patch.set(alphas); model(...)``.

    One coefficient per layer in ``layers`` (default: every layer of the gene), or one per module
    with ``per_module``. ``patch.alpha`` is a tensor that may require grad; modules of
    layers outside ``layers`` get nothing.
    """

    def __init__(self, model: torch.nn.Module, gene: SafetyGene, layers: list[int] | None = None,
                 per_module: bool = False):
        named = dict(model.named_modules())
        self.layers = list(gene.layers if layers is None else layers)
        check_fits(model, gene, self.layers)
        self.modules = [name for name, m in gene.modules.items() if m.layer in self.layers]
        self.keys = self.modules if per_module else [str(layer) for layer in self.layers]
        self.alpha = torch.zeros(len(self.keys), dtype=torch.float64)
        self._model, self._gene, self._named, self._per_module = model, gene, named, per_module
        self._handles = []

    def set(self, alphas: dict[str, float] | torch.Tensor | float) -> None:
        """Coefficients by key (layer index as a string, or module name), a tensor in ``keys``
        order (kept as is, so gradients flow), or one number for all."""
        if isinstance(alphas, torch.Tensor):
            self.alpha = alphas
        elif isinstance(alphas, dict):  # float64: cast once to the activations' dtype in the hook
            self.alpha = torch.tensor([float(alphas.get(k, 0.0)) for k in self.keys], dtype=torch.float64)
        else:
            self.alpha = torch.full((len(self.keys),), float(alphas), dtype=torch.float64)

    def coefficients(self) -> dict[str, float]:
        return {k: float(a) for k, a in zip(self.keys, self.alpha.detach())}

    def _hook(self, index: int, B: torch.Tensor, A: torch.Tensor):
        def hook(module, inputs, output):
            x = inputs[0]
            return output + self.alpha[index].to(output.dtype) * ((x @ A.T.to(x.dtype)) @ B.T.to(x.dtype))
        return hook

    def __enter__(self) -> GenePatch:
        for name in self.modules:
            m = self._gene.modules[name]
            index = self.keys.index(name if self._per_module else str(m.layer))
            self._handles.append(self._named[name].register_forward_hook(self._hook(index, m.B, m.A)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextmanager
def frozen(model: torch.nn.Module):
    """The model's parameters stop requiring grad inside (so a backward pass computes gradients
    in the patch coefficients only, not in every weight) and are restored on the way out."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)
