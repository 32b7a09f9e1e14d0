"""Tiny Hugging Face models built offline from configurations (random initialisation, float64,
eval mode), their token and image data, and the single-tensor twins the float64 oracle of
:mod:`fastinfluence.reference` takes (:class:`problems.Packed`). Import only after
``pytest.importorskip("transformers")``."""

from __future__ import annotations

import torch
from problems import Packed
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

VOCABULARY, LENGTH, CLASSES = 20, 5, 3


class Logits(nn.Module):
    """``model(*args, **kwargs).logits``: a Hugging Face model as the oracle's tensor map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.model(*args, **kwargs).logits


def logits(output) -> torch.Tensor:
    """The ``output=`` selector of every test here."""
    return output.logits


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCABULARY, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=12, max_position_embeddings=8,
                        type_vocab_size=1, num_labels=CLASSES, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).double().eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
                       num_labels=CLASSES, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config).double().eval()


def gpt2(tied: bool = False) -> nn.Module:
    """GPT-2 (``Conv1D`` layers); untied by default, so that ``lm_head`` is a layer of its own
    (tied, it shares ``transformer.wte.weight``)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCABULARY, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                        n_inner=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double().eval()


def tokens(n: int, seed: int):
    """``({"input_ids", "attention_mask"}, packed)``: every other sequence padded after 3
    tokens; ``packed`` is both as one float64 tensor for :func:`packed_tokens`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCABULARY, (n, LENGTH), generator=generator)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    mask[::2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.cat([ids, mask], 1).double()


def packed_tokens(model: nn.Module) -> Packed:
    """The oracle's twin of a token model: ``X`` = ids then mask, as :func:`tokens` packs."""
    return Packed(Logits(model), lambda X: ((), {"input_ids": X[:, :LENGTH].long(),
                                                 "attention_mask": X[:, LENGTH:].long()}))


def classes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


def images(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=generator, dtype=torch.float64)


def language_labels(inputs: dict) -> torch.Tensor:
    """Hugging Face's causal-LM ``labels``: the ids, ``-100`` at padding."""
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
