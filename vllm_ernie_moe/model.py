"""ERNIE-4.5 MoE (21B-A3B, 300B-A47B) for vLLM, built from stock vLLM layers.

Layers keep their stock class names (``QKVParallelLinear``, ``RMSNorm``, ``FusedMoE`` via
``FusedMoEFactory``, ...) so that platform plugins such as vllm-ascend swap in their kernels.
Routing follows ERNIE: the fp32 softmax plus ``e_score_correction_bias`` chooses the experts, the
unbiased softmax weights them (renormalised). The bias is handed to FusedMoE, whose router does
exactly that on every backend once ``vllm_ernie_moe.patches`` has fixed vLLM's CPU router.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice

import torch
from torch import nn
from transformers import PretrainedConfig
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig, get_current_vllm_config
from vllm.distributed import get_ep_group, get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers import fused_moe
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    UnquantizedEmbeddingMethod,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.interfaces import MixtureOfExperts, SupportsLoRA, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    WeightsMapper,
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors
from vllm.transformers_utils.config import set_default_rope_theta

from vllm_ernie_moe import layout
from vllm_ernie_moe.checkpoint import CheckpointValidator
from vllm_ernie_moe.patches.patch_cpu_warmup_size import warmup_collectives
from vllm_ernie_moe.quant import repack_cache
from vllm_ernie_moe.quant.msmodelslim import checkpoint_rules
from vllm_ernie_moe.rank_agreement import (
    CheckpointDigest,
    place_of_this_rank,
    require_same_model_on_every_rank,
    speculative_method,
)

logger = init_logger(f"vllm.{__name__}")  # under "vllm.": vLLM's log handler shows it

ROPE_THETA_DEFAULT = 500000


class ErnieMLP(nn.Module):
    """SwiGLU MLP: dense layers and the shared experts (one MLP of width shared * moe_inter)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        use_bias: bool,
        quant_config: QuantizationConfig | None,
        reduce_results: bool = True,
        prefix: str = "",
    ) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"ERNIE-4.5 uses silu; config.json gives hidden_act={hidden_act!r}")
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size,
            [intermediate_size] * 2,
            bias=use_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            intermediate_size,
            hidden_size,
            bias=use_bias,
            quant_config=quant_config,
            reduce_results=reduce_results,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


class ErnieMoE(nn.Module):
    """Routed experts (FusedMoE) plus optional shared experts, with ERNIE's biased routing."""

    def __init__(
        self,
        config: PretrainedConfig,
        quant_config: QuantizationConfig | None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        num_experts = config.moe_num_experts
        tp_size = get_tensor_model_parallel_world_size()
        if tp_size > num_experts:
            raise ValueError(
                f"tensor_parallel_size={tp_size} exceeds moe_num_experts={num_experts}"
            )
        # The router stays in fp32 and unquantized, whatever the model dtype or quantization: fp32
        # weights, fp32 input (see forward), so fp32 logits. No ``out_dtype``: with it, vLLM 0.27's
        # GateLinear casts the input to the dtype of a weight that its CPU GEMM dispatch has
        # replaced by an empty model-dtype tensor, and feeds bf16 to the fp32 oneDNN kernel (heap
        # corruption). On CUDA its fast router kernels want bf16 weights or inputs, or other
        # shapes; only the opt-in bf16x3 kernel (Blackwell) would apply and is skipped.
        self.gate = GateLinear(
            config.hidden_size,
            num_experts,
            params_dtype=torch.float32,
            prefix=f"{prefix}.gate",
        )
        self.gate.e_score_correction_bias = nn.Parameter(
            torch.zeros(num_experts, dtype=torch.float32), requires_grad=False
        )
        num_shared = getattr(config, "moe_num_shared_experts", 0)
        # Expert-parallel load balancing (EPLB): redundant physical copies of logical experts.
        parallel_config = get_current_vllm_config().parallel_config
        self.enable_eplb = parallel_config.enable_eplb
        self.n_shared_experts = num_shared
        self.n_logical_experts = num_experts
        self.shared_experts = (
            ErnieMLP(
                config.hidden_size,
                config.moe_intermediate_size * num_shared,
                config.hidden_act,
                use_bias=bool(getattr(config, "use_bias", False)),
                quant_config=quant_config,
                reduce_results=False,  # FusedMoE reduces routed + shared output once
                prefix=f"{prefix}.shared_experts",
            )
            if num_shared > 0
            else None
        )
        # Looked up when the layer is built: vllm-ascend replaces the factory at start-up, which
        # may come after this module was imported.
        with _routed_experts_without_lora_on_cpu():
            self.experts = fused_moe.FusedMoEFactory(
                shared_experts=self.shared_experts,
                num_experts=num_experts,
                top_k=config.moe_k,
                hidden_size=config.hidden_size,
                intermediate_size=config.moe_intermediate_size,
                renormalize=True,
                scoring_func="softmax",
                e_score_correction_bias=self.gate.e_score_correction_bias,
                router_logits_dtype=torch.float32,
                enable_eplb=self.enable_eplb,
                num_redundant_experts=parallel_config.eplb_config.num_redundant_experts,
                quant_config=quant_config,
                prefix=f"{prefix}.experts",
            )
        # What was built (vllm-ascend's factory may set its own redundancy).
        self.n_physical_experts = self.experts.routed_experts.global_num_experts
        self.n_redundant_experts = self.n_physical_experts - num_experts
        self.n_local_physical_experts = self.n_physical_experts // get_ep_group().world_size
        # vllm-ascend 0.23's AscendFusedMoE rounds the bias to the model dtype at construction;
        # ERNIE's bias is an fp32 tensor that only picks experts: keep it fp32 (no-op elsewhere).
        self.gate.e_score_correction_bias.data = self.gate.e_score_correction_bias.data.float()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(hidden_states.float())
        return self.experts(hidden_states=hidden_states, router_logits=router_logits)


class ErnieAttention(nn.Module):
    """GQA attention with interleaved (GPT-J style) rotary over the whole head."""

    def __init__(
        self,
        config: PretrainedConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        if total_heads % tp_size or (total_kv_heads % tp_size and tp_size % total_kv_heads):
            raise ValueError(
                f"tensor_parallel_size={tp_size} must divide num_attention_heads={total_heads} "
                f"and divide or be a multiple of num_key_value_heads={total_kv_heads}"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.num_heads = total_heads // tp_size
        # Fewer KV heads than ranks: QKVParallelLinear replicates them.
        self.num_kv_heads = max(1, total_kv_heads // tp_size)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        use_bias = bool(getattr(config, "use_bias", False))
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            total_heads,
            total_kv_heads,
            bias=use_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            total_heads * head_dim,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            head_dim,
            max_position=getattr(config, "max_position_embeddings", 131072),
            rope_parameters=config.rope_parameters,
            is_neox_style=False,
        )
        self.attn = Attention(
            self.num_heads,
            head_dim,
            head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class ErnieDecoderLayer(nn.Module):
    """Attention and an MoE block (``use_moe``) or a dense MLP (also the MTP head's block)."""

    def __init__(
        self,
        config: PretrainedConfig,
        use_moe: bool,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.self_attn = ErnieAttention(
            config, cache_config, quant_config, prefix=f"{prefix}.self_attn"
        )
        self.mlp: ErnieMoE | ErnieMLP
        if use_moe:
            self.mlp = ErnieMoE(config, quant_config, prefix=f"{prefix}.mlp")
        else:
            self.mlp = ErnieMLP(
                config.hidden_size,
                config.intermediate_size,
                config.hidden_act,
                use_bias=bool(getattr(config, "use_bias", False)),
                quant_config=quant_config,
                prefix=f"{prefix}.mlp",
            )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LookupOnlyEmbeddingMethod(UnquantizedEmbeddingMethod):
    """vLLM's embedding without its CPU processing, which packs a second copy of the weight for
    GEMMs (0.53 GB and 0.31 s per start for the 21B) that only a model using the embedding module
    as its head reads. ERNIE's lm_head is a module of its own; tied, it packs its own copy."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass


def lookup_only(embedding: VocabParallelEmbedding) -> VocabParallelEmbedding:
    """``embedding`` on :class:`LookupOnlyEmbeddingMethod` where it has vLLM's plain method on
    CPU; any other method (another platform's, a quantized one) is left as it is."""
    if current_platform.is_cpu() and type(embedding.quant_method) is UnquantizedEmbeddingMethod:
        embedding.quant_method = LookupOnlyEmbeddingMethod()
    return embedding


@support_torch_compile
class ErnieModel(nn.Module):
    # Checkpoint name -> vLLM parameter name (vllm_ernie_moe.layout). Routed experts are loaded
    # by FusedMoE itself.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked=layout.stacked_renames(),
        orig_to_new_substr=layout.CORRECTION_BIAS_RENAME,
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        set_default_rope_theta(config, default_theta=ROPE_THETA_DEFAULT)
        quant_config = vllm_config.quant_config
        self.config = config
        if get_pp_group().is_first_rank:
            self.embed_tokens = lookup_only(
                VocabParallelEmbedding(
                    config.vocab_size,
                    config.hidden_size,
                    quant_config=quant_config,
                    prefix=f"{prefix}.embed_tokens",
                )
            )
        else:
            self.embed_tokens = PPMissingLayer()
        moe_layers = layout.moe_layer_ids(config)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: ErnieDecoderLayer(
                config,
                extract_layer_index(prefix) in moe_layers,
                vllm_config.cache_config,
                quant_config,
                prefix=prefix,
            ),
            prefix=f"{prefix}.layers",
        )
        if get_pp_group().is_last_rank:
            self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.norm = PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = (
                inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            )
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class Ernie4_5_MoeForCausalLM(nn.Module, SupportsPP, SupportsLoRA, MixtureOfExperts):
    """ERNIE-4.5 MoE causal LM; replaces vLLM's built-in class of the same architecture name."""

    packed_modules_mapping = layout.packed_modules_mapping()
    fall_back_to_pt_during_load = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.checkpoint_dir = vllm_config.model_config.model
        # The repack cache may serve layers of a start that reads this directory's safetensors
        # files; not a weight update pushed later, nor a start on dummy or streamed weights.
        self.reads_checkpoint_files = vllm_config.load_config.load_format in ("auto", "safetensors")
        # What every rank must have loaded alike (rank_agreement.py), besides the weights.
        self.rank_place = place_of_this_rank(vllm_config.parallel_config)
        self.loaded_as = {
            "dtype": str(vllm_config.model_config.dtype),
            "quantization": str(vllm_config.model_config.quantization),
            # A drafter's dummy and real runs have collectives of their own.
            "speculative decoding": speculative_method(vllm_config),
        }
        if current_platform.is_cpu():
            # The warm-up's collectives must be alike on every rank (patch_cpu_warmup_size); the
            # class vLLM's runner sees (an adapter subclass under --convert), as its warm-up does.
            self.loaded_as["CPU warm-up"] = warmup_collectives(vllm_config, type(self).__module__)
        self.model = ErnieModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        pp = get_pp_group()
        # A tied head on a last pipeline rank that has no embedding loads its own copy of it.
        self.head_copies_embedding = (
            config.tie_word_embeddings and pp.is_last_rank and not pp.is_first_rank
        )
        if pp.is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings and pp.is_first_rank:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self._init_expert_counts()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def _moe_blocks(self) -> list[ErnieMoE]:
        """The MoE blocks of this pipeline rank."""
        return [
            layer.mlp
            for layer in islice(self.model.layers, self.model.start_layer, self.model.end_layer)
            if isinstance(layer.mlp, ErnieMoE)
        ]

    def _init_expert_counts(self) -> None:
        """vLLM's ``MixtureOfExperts`` interface (EPLB reads it), as its built-in class has it."""
        blocks = self._moe_blocks()
        self.moe_layers = [block.experts for block in blocks]
        self.num_moe_layers = len(blocks)
        self.num_expert_groups = 1
        example = blocks[0] if blocks else None  # no MoE layer on this rank: all counts 0
        self.num_logical_experts = getattr(example, "n_logical_experts", 0)
        self.num_physical_experts = getattr(example, "n_physical_experts", 0)
        self.num_local_physical_experts = getattr(example, "n_local_physical_experts", 0)
        self.num_routed_experts = self.num_logical_experts
        self.num_shared_experts = getattr(example, "n_shared_experts", 0)
        self.num_redundant_experts = getattr(example, "n_redundant_experts", 0)

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """EPLB changed the number of physical experts: update the counts and the expert maps."""
        assert self.num_local_physical_experts == num_local_physical_experts
        self.num_physical_experts = num_physical_experts
        self.num_redundant_experts = num_physical_experts - self.num_logical_experts
        for block in self._moe_blocks():
            block.n_physical_experts = num_physical_experts
            block.n_local_physical_experts = num_local_physical_experts
            block.n_redundant_experts = self.num_redundant_experts
            block.experts.update_expert_map()

    def get_expert_mapping(self) -> list[tuple[str, str, int, str]]:
        """The routed-expert tensor names LoRA adapters may carry (vLLM's LoRA loader reads them).

        None on vLLM's CPU backend, which has no MoE LoRA: vLLM then refuses an adapter with
        routed-expert tensors, naming them, instead of ignoring them.
        """
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            logger.info_once(
                "LoRA on vLLM's CPU backend: the routed experts take no adapter (no CPU MoE LoRA); "
                "adapters holding mlp.experts.* tensors are refused."
            )
            return []
        if not self.moe_layers:
            return []
        return self.moe_layers[0].routed_experts.get_expert_mapping()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from_files = self.checkpoint_dir if self.reads_checkpoint_files else None
        self.reads_checkpoint_files = False  # a later load is a weight update: keyed by content
        served = repack_cache.assign_places(self, from_files)
        not_loaded = tuple(f"{layout.checkpoint_module(module)}." for module in served)
        repack_cache.note_reads(self, from_files, not_loaded, layout.checkpoint_module)
        rules = checkpoint_rules(self.quant_config, self.checkpoint_dir)
        validator = CheckpointValidator(
            self.config, self.checkpoint_dir, rules.description, rules.strict, not_loaded
        )
        digest = CheckpointDigest()
        tensors = validator.check(digest.observe(weights))
        if self.head_copies_embedding:
            tensors = _with_embedding_copied_to_head(tensors)
        with repack_cache.not_reading(not_loaded):  # patches/patch_should_skip_weight.py
            loaded = AutoWeightsLoader(self).load_weights(tensors)
        loaded |= {f"{module}.{name}" for module, names in served.items() for name in names}
        validator.check_complete()
        loaded_as = dict(self.loaded_as, checkpoint=digest.hexdigest())
        require_same_model_on_every_rank(self.rank_place, loaded_as)
        return loaded


@contextmanager
def _routed_experts_without_lora_on_cpu() -> Iterator[None]:
    """Build FusedMoE as without LoRA on vLLM's CPU backend.

    With LoRA on, vLLM's MoE kernel oracle picks its Triton MoE-LoRA kernels on every in-tree
    platform, which CPU lacks (first forward: ``triton.language has no attribute float32``), and
    vLLM's CPU LoRA kernels have no MoE path. The config hook keeps LoRA off the routed experts
    on CPU, so their CPU kernels serve them.
    """
    from vllm.platforms import current_platform

    vllm_config = get_current_vllm_config()
    lora_config = vllm_config.lora_config
    if lora_config is None or not current_platform.is_cpu():
        yield
        return
    vllm_config.lora_config = None
    try:
        yield
    finally:
        vllm_config.lora_config = lora_config


def _with_embedding_copied_to_head(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Also hand ``model.embed_tokens.weight`` to an untied copy of the tied lm_head."""
    for name, tensor in weights:
        yield name, tensor
        if name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor
