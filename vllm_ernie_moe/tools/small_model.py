"""A small ERNIE-4.5-MoE trained here: the real architecture (dense first layer, routed and shared
experts, a correction bias kept by ERNIE's loss-free balancing, an MTP head) at ~2M parameters,
on the English text of Python's ``pydoc_data`` topics, in minutes on 2 CPU cores.

``python -m vllm_ernie_moe.tools.small_model`` trains it (seeded, ~10 minutes) into
:data:`SMALL_MODEL_DIR`, the copy shipped with the package (bf16, ~4.5 MB): next-token loss plus
the MTP head's loss on the token after next, by Baidu's reference forward
(``vllm_ernie_moe/mtp.py``). A tiny model: it writes Python-documentation-like English, nothing
more. The dialog example's default model; ``benchmarks/bench_small_model.py`` measures MTP
acceptance and W8A8 perplexity on it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vllm_ernie_moe.tools.random_checkpoint import build_tokenizer

CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    moe_num_experts=8,
    moe_k=2,
    moe_intermediate_size=128,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    moe_layer_end_index=3,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)
SMALL_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "small-ernie"
NOTICE = (
    "a ~2M-parameter ERNIE-4.5-MoE trained in minutes on Python's pydoc topics "
    "(vllm_ernie_moe.tools.small_model): expect documentation-like English, not answers"
)
VOCAB_SIZE = 2048
SEQUENCE = 128
MTP_LOSS_WEIGHT = 0.3
BIAS_STEP = 1e-3  # loss-free balancing: bias moves toward under-used experts
HELD_OUT_EVERY = 10  # every 10th pydoc topic is held out


def corpus() -> tuple[str, str]:
    """(training text, held-out text): pydoc's topics, sorted, every 10th held out."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [topics[n] for i, n in enumerate(names) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [topics[n] for i, n in enumerate(names) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return "\n\n".join(train), "\n\n".join(held)


class MTPHead(nn.Module):
    """Baidu's MTP layer for training; shares the model's embedding, final norm and lm_head."""

    def __init__(self, config) -> None:
        from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import (
            Ernie4_5_MoeDecoderLayer,
            Ernie4_5_MoeRMSNorm,
        )

        super().__init__()
        hidden = config.hidden_size
        self.emb_norm = Ernie4_5_MoeRMSNorm(hidden, config.rms_norm_eps)
        self.hidden_norm = Ernie4_5_MoeRMSNorm(hidden, config.rms_norm_eps)
        self.linear_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = Ernie4_5_MoeDecoderLayer(config, layer_idx=0)  # layer 0: dense MLP

    def forward(self, model, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for token ``p + 2`` from the normed hidden state at ``p`` and token ``p + 1``."""
        x = torch.cat(
            [self.emb_norm(model.model.embed_tokens(ids[:, 1:])), self.hidden_norm(hidden[:, :-1])],
            dim=-1,
        )
        x = self.linear_proj(x)
        positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        causal = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
        x = self.block(
            x,
            attention_mask=causal,
            position_ids=positions,
            position_embeddings=model.model.rotary_emb(x, positions),
        )
        return model.lm_head(model.model.norm(x))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The head under its -PT checkpoint names."""
        names = {
            "emb_norm.weight": "model.mtp_emb_norm.0.weight",
            "hidden_norm.weight": "model.mtp_hidden_norm.0.weight",
            "linear_proj.weight": "model.mtp_linear_proj.0.weight",
        }
        tensors = {}
        for name, tensor in self.state_dict().items():
            if name.startswith("block."):
                tensors[f"model.mtp_block.0.{name.removeprefix('block.')}"] = tensor
            else:
                tensors[names[name]] = tensor
        return tensors


def _balance(model, selections: list[torch.Tensor]) -> None:
    """ERNIE's loss-free balancing: raise the bias of experts chosen less than average."""
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    for gate, selected in zip(gates, selections, strict=True):
        load = torch.bincount(selected.flatten(), minlength=gate.num_experts).float()
        bias = gate.moe_statics.e_score_correction_bias
        bias += BIAS_STEP * torch.sign(load.mean() - load)


def train(out_dir: Path, steps: int = 800, batch: int = 16, seed: int = 0) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_text, _ = corpus()
    tokenizer = build_tokenizer(out_dir, vocab_size=VOCAB_SIZE, texts=[train_text])
    data = torch.tensor(tokenizer(train_text, add_special_tokens=False).input_ids)
    config = Ernie4_5_MoeConfig(
        vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0, **CONFIG
    )
    config._attn_implementation = "sdpa"
    model = Ernie4_5_MoeForCausalLM(config)
    head = MTPHead(config)
    selections: list[torch.Tensor] = []
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda m, i, out: selections.append(out[2]))
    parameters = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    for step in range(steps):
        starts = torch.randint(0, len(data) - SEQUENCE - 1, (batch,), generator=generator)
        ids = torch.stack([data[s : s + SEQUENCE] for s in starts])
        selections.clear()
        hidden = model.model(ids).last_hidden_state
        loss = F.cross_entropy(model.lm_head(hidden[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        mtp_logits = head(model, ids, hidden)
        mtp_loss = F.cross_entropy(mtp_logits[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
        optimizer.zero_grad()
        (loss + MTP_LOSS_WEIGHT * mtp_loss).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            _balance(model, selections)
        if step % 100 == 0 or step == steps - 1:
            print(
                f"step {step}: loss {loss.item():.3f}, mtp {mtp_loss.item():.3f}, "
                f"{time.monotonic() - started:.0f} s",
                flush=True,
            )
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    weights = out_dir / "model.safetensors"
    tensors = load_file(str(weights)) | head.to(torch.bfloat16).checkpoint_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), {"format": "pt"})
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved["num_nextn_predict_layers"] = 1
    saved["_notice"] = NOTICE
    config_path.write_text(json.dumps(saved, indent=2))
    (out_dir / "README.md").write_text(
        f"# small-ernie\n\n{NOTICE}.\n\nMade by `python -m vllm_ernie_moe.tools.small_model "
        f"--steps {steps} --seed {seed}`.\n"
    )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SMALL_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(train(args.out, args.steps, seed=args.seed))


if __name__ == "__main__":
    main()
