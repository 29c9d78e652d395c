"""The gene on a loaded model through the low-rank path: ``x -> W x + alpha * B (A x)``.

Forward hooks on the gene's linear and embedding modules add the scaled low-rank product to each
output, so layer selection and recalibration can try coefficients (and take gradients in them)
without ever materializing a full weight. The gene's modules are named as the checkpoint stores
them and found in the loaded model through ``architecture.ModuleNames``. Fused MoE experts (3-D
parameters, not linear layers) and other weights used outside a linear layer (an MoE router) are
the exception: during their module's forward the parameter is replaced by
``W + sum alpha * B @ A`` over the gene's experts in it (one weight-sized temporary per such
module). ``GenePatch`` is a context manager; leaving it removes every hook and restores every
parameter.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from safegene_fast.architecture import ModuleNames
from safegene_fast.eval.generate import ModelError, check_factors_fit, model_name
from safegene_fast.gene import SafetyGene


def check_fits(model: torch.nn.Module, gene: SafetyGene, layers: list[int] | None = None,
               unlayered: bool = False) -> None:
    """The gene's factors for ``layers`` (default: all its layers; with ``unlayered`` also its
    modules outside any layer, such as embeddings) fit ``model``: the gene has those layers, and
    the model has each of their modules with the factors' shape."""
    source = str(gene.folder) if gene.folder is not None else "the gene"
    layers = gene.layers if layers is None else layers
    absent = sorted(set(layers) - set(gene.layers))
    if absent:
        raise ModelError(f"{source}: layer {absent[0]} is not one of the gene's layers "
                         f"({', '.join(map(str, gene.layers))}).")
    names, params, shapes = ModuleNames.of_model(model), dict(model.named_parameters()), {}
    for name, m in gene.modules.items():
        if not (m.layer in layers or (unlayered and m.layer is None)):
            continue
        expert = names.expert(name)
        if expert is None:
            shapes[names.loaded(name)] = (m.B.shape[0], m.A.shape[1])
        elif expert.index >= expert.count or expert.shape != (m.B.shape[0], m.A.shape[1]):
            raise ModelError(f"{source}: the gene's factors for expert module {name!r} make a "
                             f"[{m.B.shape[0]}, {m.A.shape[1]}] weight, but {model_name(model)} has "
                             f"{expert.count} experts of {list(expert.shape)} in {expert.parameter!r}; the gene "
                             f"must come from this model's family.")
    check_factors_fit(model, shapes, source, "gene")


class GenePatch:
    """``with GenePatch(model, gene, layers) as patch: patch.set(alphas); model(...)``.

    One coefficient per layer in ``layers`` (default: every layer of the gene), or one per module
    with ``per_module`` (then the gene's modules outside any layer, such as embeddings or a vision
    tower's, are patched too). ``patch.alpha`` is a tensor that may require grad; modules of
    layers outside ``layers`` get nothing.
    """

    def __init__(self, model: torch.nn.Module, gene: SafetyGene, layers: list[int] | None = None,
                 per_module: bool = False):
        named = dict(model.named_modules())
        self.layers = list(gene.layers if layers is None else layers)
        check_fits(model, gene, self.layers, unlayered=per_module)
        self.modules = [name for name, m in gene.modules.items()
                        if m.layer in self.layers or (per_module and m.layer is None)]
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

    def _embedding_hook(self, index: int, B: torch.Tensor, A: torch.Tensor):
        """Rows of ``B @ A`` for the looked-up ids (times the module's own scale, as Gemma's has)."""
        def hook(module, inputs, output):
            scale = getattr(module, "embed_scale", 1.0)
            delta = torch.nn.functional.embedding(inputs[0], B.to(output.dtype)) @ A.to(output.dtype)
            return output + self.alpha[index].to(output.dtype) * delta * scale
        return hook

    def _swap_hooks(self, module: torch.nn.Module, param: str, terms: list):
        """Hooks that shadow ``module.<param>`` by ``W + sum alpha * B @ A`` (each term at its
        ``where`` index into W: an expert's rows, or all of W) for the module's forward: an
        instance attribute of that name is found before the module's parameters."""
        def pre(mod, args):
            weight = mod._parameters[param].clone()
            for index, B, A, where in terms:
                weight[where] += (self.alpha[index].to(torch.float32) * (B.float() @ A.float())).to(weight.dtype)
            mod.__dict__[param] = weight
            self._shadowed.append((mod, param))

        def post(mod, args, output):
            self._unshadow()
        return module.register_forward_pre_hook(pre), module.register_forward_hook(post)

    def _unshadow(self) -> None:
        while self._shadowed:
            mod, param = self._shadowed.pop()
            mod.__dict__.pop(param, None)

    def __enter__(self) -> GenePatch:
        names, swaps = ModuleNames.of_model(self._model), {}
        self._shadowed = []
        for name in self.modules:
            m = self._gene.modules[name]
            index = self.keys.index(name if self._per_module else str(m.layer))
            expert = names.expert(name)
            if expert is not None:
                owner, param = expert.parameter.rsplit(".", 1)
                rows = slice(expert.part * expert.shape[0], (expert.part + 1) * expert.shape[0])
                swaps.setdefault((owner, param), []).append((index, m.B, m.A, (expert.index, rows)))
                continue
            loaded = names.loaded(name)
            module = self._named[loaded]
            if isinstance(module, torch.nn.Linear):
                self._handles.append(module.register_forward_hook(self._hook(index, m.B, m.A)))
            elif isinstance(module, torch.nn.Embedding):
                self._handles.append(module.register_forward_hook(self._embedding_hook(index, m.B, m.A)))
                head = self._model.get_output_embeddings() if module is self._model.get_input_embeddings() else None
                if head is not None and head.weight is module.weight:  # tied: the LM head is this weight too
                    self._handles.append(head.register_forward_hook(self._hook(index, m.B, m.A)))
            else:
                swaps.setdefault((loaded, "weight"), []).append((index, m.B, m.A, slice(None)))
        for (owner, param), terms in swaps.items():
            self._handles.extend(self._swap_hooks(self._named[owner], param, terms))
        return self

    def __exit__(self, *exc) -> None:
        self._unshadow()  # a forward that raised leaves its module's parameter shadowed
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
