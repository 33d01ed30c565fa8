"""ERNIE-4.5's multi-token-prediction (MTP) head as vLLM's speculative drafter, following Baidu's
reference (FastDeploy ``ernie4_5_mtp.py``), registered in place of vLLM's ``ErnieMTP``.

For the token ``x`` after position ``p`` and the main model's hidden state ``h_p`` (after its final
norm, as the main model hands it to vLLM)::

    h = mtp_linear_proj(concat(mtp_emb_norm(embed(x)), mtp_hidden_norm(h_p)))
    h = model.norm(mtp_block(h, position p))        # the main model's final norm, shared
    draft = argmax(lm_head(h))                      # the main model's lm_head, shared

``mtp_block`` is an ERNIE decoder layer with a dense MLP and ERNIE's interleaved rotary. vLLM's own
class differs in three places (``docs/upstream/ernie-mtp.md``): a ``LlamaDecoderLayer`` (NeoX
rotary), no final norm, and the embedding at position 0 set to zero; the reference does none.

The head is never quantized: msModelSlim and the offline tool keep it in floating point.
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.sequence import IntermediateTensors
from vllm.transformers_utils.config import set_default_rope_theta

from vllm_ernie_moe.layout import MTP_PARTS
from vllm_ernie_moe.model import ROPE_THETA_DEFAULT, ErnieDecoderLayer, ErnieModel, lookup_only

logger = init_logger(f"vllm.{__name__}")  # under "vllm.": vLLM's log handler shows it

#: Main-model tensors the drafter uses besides its own.
SHARED_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


class MTPHeadError(ValueError):
    """The checkpoint cannot serve ERNIE MTP speculative decoding."""


def mtp_layer_count(hf_config, checkpoint: str) -> int:
    """``num_nextn_predict_layers``; :class:`MTPHeadError` when config.json declares no head."""
    declared = getattr(hf_config, "num_nextn_predict_layers", None)
    layers = declared or 0
    if layers < 1:
        said = "declares no" if declared is None else f"has {declared}"
        raise MTPHeadError(
            f"{checkpoint}: config.json {said} num_nextn_predict_layers; ERNIE MTP "
            "speculative decoding needs the MTP head of a -PT checkpoint "
            "(num_nextn_predict_layers: 1). Drop --speculative-config, or use a checkpoint "
            "that kept its MTP head."
        )
    return layers


class ErnieMTPLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        hidden = config.hidden_size
        self.mtp_emb_norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.mtp_hidden_norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.mtp_linear_proj = ReplicatedLinear(
            2 * hidden, hidden, bias=False, prefix=f"{prefix}.mtp_linear_proj"
        )
        self.mtp_block = ErnieDecoderLayer(
            config,
            use_moe=False,
            cache_config=vllm_config.cache_config,
            quant_config=None,
            prefix=f"{prefix}.mtp_block",
        )

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and residual, before the shared final norm adds them."""
        joined = torch.cat(
            [self.mtp_emb_norm(inputs_embeds), self.mtp_hidden_norm(hidden_states)], dim=-1
        )
        projected, _ = self.mtp_linear_proj(joined)
        return self.mtp_block(positions, projected, None)


class ErnieMTPModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        set_default_rope_theta(config, default_theta=ROPE_THETA_DEFAULT)
        self.num_mtp_layers = mtp_layer_count(config, vllm_config.model_config.model)
        # After the main model's layers: vLLM binds KV caches by the layer index in the name.
        self.first_layer = config.num_hidden_layers
        self.layers = nn.ModuleDict(
            {
                str(index): ErnieMTPLayer(vllm_config, f"{prefix}.layers.{index}")
                for index in range(self.first_layer, self.first_layer + self.num_mtp_layers)
            }
        )
        # vLLM's proposer replaces it by the main model's embedding, after this one's processing.
        self.embed_tokens = lookup_only(
            VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        spec_step_idx: int = 0,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        # One MTP layer serves every speculative step (ERNIE ships one).
        layer = self.layers[str(self.first_layer + spec_step_idx % self.num_mtp_layers)]
        output, residual = layer(inputs_embeds, positions, hidden_states)
        normed, _ = self.norm(output, residual)
        return normed


class ErnieMTP(nn.Module):
    """vLLM's MTP drafter interface: ``forward(input_ids, positions, hidden_states)`` and
    ``compute_logits``; vLLM's proposer shares the main model's embedding and lm_head."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.checkpoint_dir = vllm_config.model_config.model
        self.model = ErnieMTPModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        first = self.model.first_layer
        self.hf_to_vllm_mapper = WeightsMapper(
            orig_to_new_substr={
                f"model.{part}.{i}.": f"model.layers.{first + i}.{part}."
                for part in MTP_PARTS
                for i in range(self.model.num_mtp_layers)
            },
            orig_to_new_stacked=ErnieModel.hf_to_vllm_mapper.orig_to_new_stacked,
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        spec_step_idx: int = 0,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, hidden_states, inputs_embeds, spec_step_idx)

    def compute_logits(self, hidden_states: torch.Tensor, spec_step_idx: int = 0) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = AutoWeightsLoader(self).load_weights(
            self._mtp_tensors(weights), mapper=self.hf_to_vllm_mapper
        )
        missing = sorted(
            name
            for name, _ in self.named_parameters()
            if name not in loaded and not name.startswith(("lm_head.", "model.embed_tokens."))
        )
        if missing:
            raise MTPHeadError(
                f"{self.checkpoint_dir}: the checkpoint lacks the MTP head tensors for "
                f"{missing[:4]}{' ...' if len(missing) > 4 else ''} (model.mtp_emb_norm.0.*, "
                "model.mtp_hidden_norm.0.*, model.mtp_linear_proj.0.weight, model.mtp_block.0.*). "
                "Conversions through transformers, msModelSlim or llama.cpp drop them: serve the "
                "original -PT checkpoint, or quantize it with vllm-ernie-moe-quantize, which keeps "
                "the head."
            )
        return loaded

    def _mtp_tensors(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """The MTP head's tensors and the shared ones; ``mtp_linear_proj`` in [H, 2H] (a public
        report has 300B-A47B's stored as [2H, H])."""
        hidden = self.config.hidden_size
        for name, tensor in weights:
            if name in SHARED_TENSORS or any(f"model.{part}." in name for part in MTP_PARTS):
                if "mtp_linear_proj" in name and tuple(tensor.shape) == (2 * hidden, hidden):
                    logger.info("%s is stored [2H, H]: transposed to [H, 2H].", name)
                    tensor = tensor.t()
                yield name, tensor
