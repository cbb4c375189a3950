"""Loss and accuracy of a causal LM on label-word tasks, computed like inference.

The model runs its backbone only (no LM head over the sequence): the head is applied to the last
real position of each prompt, and only to the rows of the label words, so a step never builds
full-vocabulary logits at every position. Loss = cross-entropy over the label words' logits
(MeZO / LM-BFF prompt-based fine-tuning); accuracy = argmax over the same logits.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metazo.errors import MetazoError
from metazo.tasks import Example

PADDING_SIDES = ("left", "right")


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 on real tokens
    labels: torch.Tensor          # (B,) index into the label words
    choice_mask: torch.Tensor     # (B, K) bool, False where an example has fewer choices

    def __len__(self) -> int:
        return self.labels.numel()

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(*(t[start:stop] for t in (self.input_ids, self.attention_mask, self.labels, self.choice_mask)))


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The module producing final hidden states, and the LM head applied to them."""
    head = model.get_output_embeddings()
    backbone = getattr(model, "base_model", None)
    if head is None or backbone is None or backbone is model:
        raise MetazoError(f"{type(model).__name__} is not a causal language model with an LM head")
    return backbone, head


class Scorer:
    """Scores batches of :class:`Example` through the label words' logits at the last position."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        label_token_ids: Sequence[int],
        *,
        max_length: int = 256,
        padding_side: str = "left",
        micro_batch_size: int | None = None,
    ):
        if padding_side not in PADDING_SIDES:
            raise MetazoError(f"padding side must be 'left' or 'right', got '{padding_side}'")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise MetazoError(f"micro-batch size must be >= 1, got {micro_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.backbone, self.head = backbone_and_head(model)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.max_length = max_length
        self.padding_side = padding_side
        self.micro_batch_size = micro_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.label_ids = torch.tensor(list(label_token_ids), dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, examples: Sequence[Example]) -> Batch:
        """Tokenise, keep the END of over-long prompts (the label word follows it), pad."""
        if not examples:
            raise MetazoError("cannot score an empty batch")
        ids = self.tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
        ids = [seq[-self.max_length:] for seq in ids]
        width = max(len(seq) for seq in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            where = slice(width - len(seq), width) if self.padding_side == "left" else slice(0, len(seq))
            input_ids[row, where] = torch.tensor(seq, dtype=torch.long)
            mask[row, where] = 1
        n_words = self.label_ids.numel()
        choices = torch.tensor([e.num_choices or n_words for e in examples])
        choice_mask = torch.arange(n_words)[None, :] < choices[:, None]
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        device = self.device
        return Batch(input_ids.to(device), mask.to(device), labels.to(device), choice_mask.to(device))

    def label_logits(self, batch: Batch, per_example_head: bool = False) -> torch.Tensor:
        """(B, K) logits of the label words at each prompt's last real token (float32, or float64 for a
        float64 model). ``per_example_head`` gathers the head's label rows once per example, so every
        operation that reads the head also reads the batch (what the engine's PairedView needs)."""
        mask = batch.attention_mask
        # Position ids count real tokens only, so left padding does not shift positions.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(
            input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        width = mask.shape[1]
        last = width - 1 - mask.flip(-1).argmax(-1)  # index of the last 1 in each row
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        # F.embedding (not indexing) so a PerturbedView perturbs only these rows of the head.
        label_ids = self.label_ids.to(final.device)
        if per_example_head:
            rows = F.embedding(label_ids.expand(final.shape[0], -1), self.head.weight)  # (B, K, H)
            logits = torch.bmm(rows, final.unsqueeze(-1)).squeeze(-1)
        else:
            weight = F.embedding(label_ids, self.head.weight)
            logits = F.linear(final, weight)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if getattr(self.head, "bias", None) is not None:
            logits = logits + self.head.bias[label_ids].to(logits.dtype)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.masked_fill(~batch.choice_mask, -math.inf)

    def _chunks(self, batch: Batch):
        size = self.micro_batch_size or len(batch)
        for start in range(0, len(batch), size):
            yield batch.slice(start, min(start + size, len(batch)))

    def _fitting(self, batch: Batch, score):
        """``score(batch)``, retried with half the micro-batch after an out-of-memory error: gradient
        accumulation keeps the effective batch, and the smaller size is kept for later batches."""
        while True:
            try:
                return score(batch)
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not isinstance(error, torch.OutOfMemoryError) and not _is_out_of_memory(error):
                    raise
                current = min(self.micro_batch_size or len(batch), len(batch))
                if current <= 1:
                    raise MetazoError("out of memory with a micro-batch of 1; use a smaller model, --max-length "
                                      "or --dtype bfloat16") from None
                del error  # frees the failed pass's tensors before the retry
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.micro_batch_size = current // 2
                warnings.warn(f"out of memory scoring a micro-batch of {current}; continuing with micro-batch "
                              f"{self.micro_batch_size} (the batch of {len(batch)} is accumulated)", stacklevel=3)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the batch, accumulated over micro-batches."""
        return self.loss_sum(batch) / len(batch)

    def loss_sum(self, batch: Batch) -> torch.Tensor:
        """Summed cross-entropy over the batch (data parallel adds the ranks' sums, then divides)."""
        def score(batch: Batch) -> torch.Tensor:
            total = torch.zeros((), device=batch.labels.device)
            for part in self._chunks(batch):
                total = total + F.cross_entropy(self.label_logits(part), part.labels, reduction="sum")
            return total

        return self._fitting(batch, score)

    def _loss_and_correct(self, batch: Batch) -> tuple[float, int]:
        loss_sum, correct = 0.0, 0
        for part in self._chunks(batch):
            logits = self.label_logits(part)
            loss_sum += float(F.cross_entropy(logits, part.labels, reduction="sum"))
            correct += int((logits.argmax(-1) == part.labels).sum())
        return loss_sum, correct

    def paired_loss(self, batch: Batch) -> torch.Tensor:
        """(2,) the mean cross-entropy of ``batch`` scored twice in one forward over [batch || batch]: under
        the engine's PairedView the first copy sees theta + eps u and the second theta - eps u."""
        if getattr(self.head, "bias", None) is not None:
            raise MetazoError("paired scoring does not support an LM head with a bias: score the signs in two passes")

        def score(batch: Batch) -> torch.Tensor:
            total = torch.zeros(2, device=batch.labels.device)
            for part in self._chunks(batch):
                double = Batch(*(torch.cat([t, t]) for t in (part.input_ids, part.attention_mask, part.labels, part.choice_mask)))
                losses = F.cross_entropy(self.label_logits(double, per_example_head=True), double.labels, reduction="none")
                total = total + losses.view(2, -1).sum(-1)
            return total / len(batch)

        return self._fitting(batch, score)

    @torch.inference_mode()
    def evaluate(self, examples: Sequence[Example], batch_size: int = 32) -> dict[str, float]:
        """Mean loss and accuracy over ``examples``."""
        if not examples:
            raise MetazoError("no examples to evaluate")
        loss_sum, correct = 0.0, 0
        for start in range(0, len(examples), batch_size):
            loss, right = self._fitting(self.encode(examples[start:start + batch_size]), self._loss_and_correct)
            loss_sum, correct = loss_sum + loss, correct + right
        return {"loss": loss_sum / len(examples), "accuracy": correct / len(examples)}


def _is_out_of_memory(error: RuntimeError) -> bool:
    """A CPU allocation failure (CUDA's is a torch.OutOfMemoryError)."""
    text = str(error)
    return "out of memory" in text or "can't allocate memory" in text
