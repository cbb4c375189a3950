"""ZO-Act: zeroth-order training in a one-shot activation subspace (arXiv 2607.01125).

Only the paper's abstract is public. What it states: for each linear layer, compute once at
initialisation, on a calibration batch, a small basis U (d_in x r) of the layer's input activations
(SVD); freeze W0 and train only a coefficient matrix C (d_out x r, zero at the start), so that
W = W0 + C U^T, with two-point ZO on C. Why it works: the gradient of a linear layer,
sum_t delta_t x_t^T, lies in the span of its inputs x_t, so most of it lies in their top singular
directions, and a perturbation confined there wastes no query on directions the gradient lacks.

Choices the abstract leaves open (each a constructor parameter of :class:`ZOActSampler`):

- ``rank`` (default 8): columns of U per layer. MeZO's LoRA rank, so ZO-Act trains about as many
  numbers as LoRA on every projection would.
- ``calibration_examples`` (default 64): training examples run once to find U (four batches of 16).
- Basis = top-r eigenvectors of the uncentred Gram matrix H^T H of the inputs, summed over all
  calibration batches (= top-r right singular vectors of the stacked activations H, without ever
  holding H). Uncentred, because the gradient lies in the span of the raw inputs, mean included.
  Rank above the number of calibration tokens leaves the extra columns arbitrary (but orthonormal).
  Memory while calibrating: d_in^2 float32 per distinct layer input (q, k and v share one), e.g.
  0.4 GB for SmolLM2-135M; the eigendecomposition runs in float64, one matrix at a time.
- ``skip_padding`` (default True): padding positions are left out of H. Their outputs are masked
  out of attention, so they never reach the loss or its gradient; counting them would let the pad
  token's activation take basis directions. The mask is read from the keyword ``attention_mask``
  of the backbone's forward; when it cannot be matched to a layer's input, all positions count.
- Which layers: every ``nn.Linear`` (and GPT-2's ``Conv1D``) with a trainable weight, except the
  LM head, which the scorer never runs as a layer (it reads the label rows only).
- ``train_other`` (default False): every other parameter (embeddings, norms, head, and the wrapped
  layers' biases) is frozen, so only the C's train, as the abstract describes. True leaves the
  non-wrapped parameters trainable; the sampler gives them plain Gaussian noise.
- Optimizer: the engine's ZO-SGD on C with Gaussian noise; the wrapped W0 is never read for its
  values by the sampler, so a quantised or otherwise frozen W0 works in principle: the wrapper only
  calls ``base(x)`` and adds (x U) C^T.

The basis is saved in checkpoints (:meth:`checkpoint_tensors`) under the buffer names of the
wrappers, so :meth:`restore_model` rebuilds the same wrappers before the weights are loaded.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from metazo.blocks import Block
from metazo.errors import MetazoError
from metazo.samplers.base import Sampler, as_bool

BASIS_NAME = "activation_basis"
COEFFICIENTS_NAME = "coefficients"


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_out, d_in) of a linear layer (nn.Linear, or GPT-2's transposed Conv1D), else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return weight.shape[0], weight.shape[1]
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # stores (in, out)
        return weight.shape[1], weight.shape[0]
    return None


class ActSubspaceLinear(nn.Module):
    """A frozen linear layer plus a trainable update confined to an activation subspace:
    forward(x) = base(x) + (x U) C^T, i.e. W = W0 + C U^T, with U (d_in x r) a buffer and
    C (d_out x r) the only parameter, zero at the start so the layer is unchanged."""

    def __init__(self, base: nn.Module, basis: torch.Tensor):
        super().__init__()
        dims = _linear_dims(base)
        if dims is None:
            raise MetazoError(f"ZO-Act can only wrap linear layers, not {type(base).__name__}")
        d_out, d_in = dims
        if basis.dim() != 2 or basis.shape[0] != d_in:
            raise MetazoError(f"activation basis of shape {tuple(basis.shape)} does not fit a layer with {d_in} inputs")
        for param in base.parameters():
            param.requires_grad_(False)
        self.base = base
        # Contiguous, whatever layout the eigendecomposition left: a reloaded basis is contiguous, and
        # the same values in another layout would change the matmul's summation order by an ulp.
        self.register_buffer(BASIS_NAME, basis.detach().clone(memory_format=torch.contiguous_format))
        self.coefficients = nn.Parameter(torch.zeros(d_out, basis.shape[1], dtype=basis.dtype, device=basis.device))

    @property
    def rank(self) -> int:
        return self.coefficients.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        basis = getattr(self, BASIS_NAME)
        # F.linear reads C as an argument, so the engine's PerturbedView sees and perturbs it.
        return self.base(x) + F.linear(x.to(basis.dtype) @ basis, self.coefficients).to(x.dtype)


class _GramAccumulator:
    """Sums H^T H of each watched layer's inputs over calibration batches.

    Layers that read the very same input tensor (q, k and v; gate and up) share one matrix, which
    saves both the memory (d_in^2 float32 per distinct input) and the matmul.
    """

    def __init__(self, skip_padding: bool):
        self.skip_padding = skip_padding
        self.gram: dict[str, torch.Tensor] = {}  # by the name of the first layer reading the input
        self.shares_with: dict[str, str] = {}    # layer name -> name that owns its matrix
        self.attention_mask: torch.Tensor | None = None
        self.previous_input: torch.Tensor | None = None
        self.previous_owner: str | None = None

    def remember_mask(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def hook_for(self, name: str):
        def accumulate(module, inputs, output) -> None:
            x = inputs[0]
            if self.previous_input is x:
                self.shares_with[name] = self.previous_owner
                return
            self.previous_input, self.previous_owner = x, name
            x = x.detach()
            mask = self.attention_mask
            if self.skip_padding and mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(torch.bool)]
            h = x.reshape(-1, x.shape[-1]).float()
            if name not in self.gram:
                self.gram[name] = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float32, device=h.device)
            self.gram[name].addmm_(h.T, h)

        return accumulate

    def release(self) -> None:
        self.previous_input = None
        self.attention_mask = None


def top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` eigenvectors of a symmetric PSD matrix with the largest eigenvalues (columns),
    each signed so its largest entry is positive (eigh's sign is arbitrary)."""
    _, vectors = torch.linalg.eigh(gram.double())  # ascending eigenvalues
    top = vectors[:, -rank:].flip(-1)
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    return top * torch.where(signs == 0, torch.ones_like(signs), signs)


class ZOActSampler(Sampler):
    """Gaussian two-point ZO on activation-subspace coefficients C (see the module docstring).

    ``ZOActSampler(rank=8, calibration_examples=64, train_other=False, skip_padding=True)``
    """

    name = "zo-act"
    requires_mode = "full"

    def __init__(self, rank: int = 8, calibration_examples: int = 64, train_other: bool = False,
                 skip_padding: bool = True):
        if not isinstance(rank, int) or rank < 1:
            raise MetazoError(f"ZO-Act rank must be an integer >= 1, got {rank!r}")
        if not isinstance(calibration_examples, int) or calibration_examples < 1:
            raise MetazoError(f"ZO-Act needs at least 1 calibration example, got {calibration_examples}")
        self.rank = int(rank)
        self.calibration_examples = int(calibration_examples)
        self.train_other = as_bool(train_other, "train_other")
        self.skip_padding = as_bool(skip_padding, "skip_padding")

    def __repr__(self) -> str:
        return (f"ZOActSampler(rank={self.rank}, calibration_examples={self.calibration_examples}, "
                f"train_other={self.train_other}, skip_padding={self.skip_padding})")

    # -- reparametrisation ---------------------------------------------------------------------

    @staticmethod
    def wrappable_layers(model: nn.Module) -> dict[str, nn.Module]:
        """Linear layers with a trainable weight, by name, without the LM head."""
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        layers = {}
        for name, module in model.named_modules():
            if module is head or isinstance(module, ActSubspaceLinear) or _linear_dims(module) is None:
                continue
            if module.weight.requires_grad:
                layers[name] = module
        return layers

    def prepare_model(self, model: nn.Module, calibrate: Callable[[int], object]) -> None:
        """Find each layer's activation basis on ``calibrate(calibration_examples)``, then wrap it."""
        layers = self.wrappable_layers(model)
        if not layers:
            raise MetazoError("ZO-Act found no trainable linear layers to wrap in this model")
        too_narrow = [(name, _linear_dims(m)[1]) for name, m in layers.items() if _linear_dims(m)[1] < self.rank]
        if too_narrow:
            name, d_in = too_narrow[0]
            raise MetazoError(f"ZO-Act rank {self.rank} is larger than the {d_in} inputs of layer '{name}'; lower the rank")
        accumulator = self.calibrate_layers(model, layers, calibrate)
        bases: dict[str, torch.Tensor] = {}
        by_owner: dict[str, torch.Tensor] = {}
        for name, module in layers.items():
            owner = accumulator.shares_with.get(name, name)
            if owner not in by_owner:
                if owner not in accumulator.gram:
                    raise MetazoError(f"the calibration forward never ran layer '{name}'; ZO-Act cannot find its basis")
                by_owner[owner] = top_eigenvectors(accumulator.gram.pop(owner), self.rank)
            dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float32
            bases[name] = by_owner[owner].to(dtype)
        self._wrap(model, bases, self.train_other)

    def calibrate_layers(self, model: nn.Module, layers: dict[str, nn.Module],
                         calibrate: Callable[[int], object]) -> _GramAccumulator:
        """H^T H of each layer's inputs over the calibration examples."""
        accumulator = _GramAccumulator(self.skip_padding)
        # The mask comes from the backbone's call (the scorer runs the backbone, not the LM wrapper).
        backbone = getattr(model, "base_model", None) or model
        handles = [backbone.register_forward_pre_hook(accumulator.remember_mask, with_kwargs=True)]
        handles += [module.register_forward_hook(accumulator.hook_for(name)) for name, module in layers.items()]
        try:
            with torch.no_grad():
                calibrate(self.calibration_examples)
        finally:
            for handle in handles:
                handle.remove()
            accumulator.release()
        return accumulator

    @staticmethod
    def _wrap(model: nn.Module, bases: dict[str, torch.Tensor], train_other: bool) -> None:
        if not train_other:
            for param in model.parameters():
                param.requires_grad_(False)
        for name, basis in bases.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
            setattr(parent, child, ActSubspaceLinear(base, basis.to(base.weight.device)))

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: buffer for name, buffer in model.named_buffers() if name.endswith(f".{BASIS_NAME}")}

    @classmethod
    def restore_model(cls, model: nn.Module, tensors: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
        """Wrap the layers named by the checkpoint's bases with those bases (weights load after)."""
        suffix = f".{BASIS_NAME}"
        bases = {name[: -len(suffix)]: tensor for name, tensor in tensors.items() if name.endswith(suffix)}
        if not bases:
            raise MetazoError("the checkpoint holds no ZO-Act activation bases; it was not trained with sampler 'zo-act'")
        for name in bases:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise MetazoError(f"the checkpoint's ZO-Act layer '{name}' is not in this model") from None
            if _linear_dims(module) is None:
                raise MetazoError(f"the checkpoint's ZO-Act layer '{name}' is not a linear layer in this model")
        cls._wrap(model, bases, as_bool(options.get("train_other", False), "train_other"))

    # -- noise ---------------------------------------------------------------------------------

    def noise(self, block: Block, rows: slice, generator: torch.Generator) -> torch.Tensor:
        shape = () if len(block.shape) == 0 else (rows.stop - rows.start, *block.shape[1:])
        return torch.randn(shape, generator=generator, device=block.param.device)
