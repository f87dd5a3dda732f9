"""Fixtures for LLaDA-MoE, LLaDA2.0/2.1, SDAR and Fast-dLLM v2, made by each family's reference code.

This script is not part of the package and its output is the only thing the tests use: for each
family, a tiny checkpoint folder in the family's real layout (its config.json keys, its tensor names,
a word-level tokenizer with its special tokens), with random weights drawn here, and
`reference.json` / `reference.safetensors` holding what the reference code computed on it: logits
of a few inputs, and for the block-diffusion decoders the tokens they generate and the number of
model calls they make. unmask's tests load the folders through the checkpoint loader and compare.

Each family's folder holds `checkpoint/` (the tiny checkpoint) beside `reference.json` and
`reference.safetensors`. The reference code is public and is read from git at run time, into a temporary folder that is
deleted at exit; none of it is copied into this repository:

- LLaDA-MoE, LLaDA2.0, LLaDA2.1: https://github.com/ZHZisZZ/dllm at ca176752
  (dllm/pipelines/llada/models/*_lladamoe.py, dllm/pipelines/llada2/models/*, dllm/pipelines/llada21/models/*;
  the LLaDA2 decoders are the `generate` methods of those modeling files, the checkpoints' own code).
- SDAR: https://github.com/JetAstra/SDAR at c2041a8 (training/model/SDAR-4B-Chat/{modeling,configuration}_sdar.py;
  the decoder is `block_diffusion_generate` of evaluation/opencompass/opencompass/models/huggingface_bd3.py,
  the authors' evaluation path: argmax via top_k=1, confidence from the unfiltered softmax).
- Fast-dLLM v2: the checkpoint's modeling.py / configuration.py as vendored at
  https://github.com/Satgoy152/DualDiffusion 189fa7a (FastDLLM-inferencing/Fast_dLLM_v2_7B/); the decoder
  is that file's `generate`.

The reference files are written for transformers 4.x; under 5.x a few names moved, so small shims
are installed before they are imported (each says what it restores). Run with the repositories
fetched locally (git directories, bare or not):

    python tools/reference_fixtures.py --dllm DLLM_GIT --sdar SDAR_GIT --fastdllm-v2 DUALDIFFUSION_GIT \\
        --out tests/fixtures/reference
"""

from __future__ import annotations

import argparse
import ast
import atexit
import importlib
import importlib.machinery
import json
import shutil
import subprocess
import sys
import tempfile
import types
import typing
from pathlib import Path

import torch
import torch.nn.functional as F

EOS_SCALE = 2.5
REVISIONS = {"dllm": "ca176752", "sdar": "c2041a8", "fastdllm_v2": "189fa7a"}
WORK = Path(tempfile.mkdtemp(prefix="unmask_reference_"))
atexit.register(shutil.rmtree, WORK, True)


# ---------------------------------------------------------------------------------------------
# getting the reference code into a temporary package


def extract(git_dir: str, rev: str, files: dict[str, str], package: str) -> Path:
    """`git show rev:path` for each of `files` (destination name -> repository path) into WORK/package."""
    folder = WORK / package
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").touch()
    for dest, src in files.items():
        text = subprocess.run(["git", "-C", git_dir, "show", f"{rev}:{src}"], check=True, capture_output=True,
                              text=True).stdout
        (folder / dest).write_text(text)
    if str(WORK) not in sys.path:
        sys.path.insert(0, str(WORK))
    return folder


def functions_of(source: str, names: list[str]) -> str:
    """The top-level functions `names` of a module's source (the rest of that module imports an
    evaluation framework the functions do not need)."""
    tree = ast.parse(source)
    keep = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    return "\n\n".join(ast.get_source_segment(source, node) for node in keep)


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers' find_spec checks need one
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


def install_shims() -> None:
    """What the 4.x-era reference files need from transformers 5.x and from packages absent here."""
    import transformers
    import transformers.utils as tu
    import transformers.utils.import_utils as iu
    from transformers import modeling_rope_utils as mru
    from transformers.cache_utils import Cache

    transformers.logging.set_verbosity_error()
    if not hasattr(iu, "is_torch_fx_available"):  # removed in 5.x; LLaDA2.0 imports it
        iu.is_torch_fx_available = lambda: False
    if not hasattr(tu, "LossKwargs"):  # removed in 5.x; SDAR imports it
        class LossKwargs(typing.TypedDict, total=False):
            num_items_in_batch: typing.Optional[torch.Tensor]
        tu.LossKwargs = LossKwargs
    if "default" not in mru.ROPE_INIT_FUNCTIONS:  # 5.x dropped the plain rope; 4.x's rule, partial rotary included
        def default_rope(config, device=None, seq_len=None, **_):
            params = getattr(config, "rope_parameters", None) or {}
            base = getattr(config, "rope_theta", None) or params.get("rope_theta", 10000.0)
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            factor = getattr(config, "partial_rotary_factor", None) or params.get("partial_rotary_factor", 1.0)
            dim = int(head_dim * factor)
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim)), 1.0
        mru.ROPE_INIT_FUNCTIONS["default"] = default_rope
    if not hasattr(Cache, "__getitem__"):  # 5.x removed cache[layer]
        Cache.__getitem__ = lambda self, i: (self.layers[i].keys, self.layers[i].values)
    tu.auto_docstring = lambda obj=None, **kw: obj if obj is not None else (lambda o: o)
    # SDAR imports flash-attn's RMSNorm kernel at the top (fp32 math, weight in fp32, one cast) and
    # einops; its training-only loss module imports triton
    def rms_norm_fn(x, weight, bias=None, residual=None, eps=1e-6, **_):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    def rearrange(t, pattern):
        if pattern == "b h l d -> b l (h d)":
            t = t.transpose(1, 2)
        elif pattern != "b l h d -> b l (h d)":
            raise NotImplementedError(pattern)
        return t.reshape(t.shape[0], t.shape[1], -1)

    _stub("flash_attn", flash_attn_func=flash_attn_func, flash_attn_varlen_func=None)
    for name in ("flash_attn.ops", "flash_attn.ops.triton", "flash_attn.bert_padding"):
        _stub(name, index_first_axis=None, pad_input=None, unpad_input=None)
    _stub("flash_attn.ops.triton.layer_norm", rms_norm_fn=rms_norm_fn)
    if importlib.util.find_spec("einops") is None:
        _stub("einops", rearrange=rearrange, repeat=None)  # Fast-dLLM v2 imports repeat, never calls it


def dict_tied(cls, embed: str) -> None:
    """5.x wants `_tied_weights_keys` as a dict; the reference classes give a list."""
    if isinstance(getattr(cls, "_tied_weights_keys", None), (list, tuple)):
        cls._tied_weights_keys = {"lm_head.weight": embed}


# ---------------------------------------------------------------------------------------------
# tiny checkpoints


def randomise(model, std: float, head_scale: float, seed: int, mask_id: int, eos_scale: float = 1.0,
              eos_id: int | None = None) -> None:
    """Random weights: norms 1 + 0.1 N(0, 1), the rest N(0, std); the output head scaled so that
    predictions are peaked enough for thresholds to fire. Buffers such as expert biases too. The
    head's row of the mask token is zero (its logit 0, far below the top of the peaked others), as a
    trained model puts next to no mass on it: unmask never predicts the mask token, and the
    references, which keep its logit, would otherwise sometimes commit it on random weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                              if n.endswith("expert_bias")]:
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
        model.lm_head.weight.mul_(head_scale)
        model.lm_head.weight[mask_id] = 0.0
        if eos_id is not None:  # a likelier end of answer, so that the fixtures meet the stop rules
            model.lm_head.weight[eos_id] *= eos_scale


def save_checkpoint(model, config_dict: dict, tokenizer, folder: Path, block: int = 32) -> None:
    """The reference model's own state dict (its tensor names) and config keys, and the tokenizer;
    `unmask_defaults` gives the tiny model short default lengths (its context is 256)."""
    config_dict = {**config_dict, "unmask_defaults": {"gen_length": 4 * block, "block_length": block}}
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "inv_freq" not in k}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, default=str) + "\n")
    tokenizer.save(folder)


def block_mask(length: int, block: int, additive_dtype=None) -> torch.Tensor:
    """(1, length, length) block-causal mask, blocks anchored at position 0: 1 where allowed, or an
    additive 0 / -inf mask in `additive_dtype`."""
    blocks = torch.arange(length) // block
    allowed = (blocks[None, :] <= blocks[:, None]).float()[None]
    if additive_dtype is None:
        return allowed
    return torch.log(allowed).to(additive_dtype)


class Counter:
    """Counts a model's forward calls (the reference decoders keep no count)."""

    def __init__(self, model):
        self.model, self.calls, self.original = model, 0, model.forward

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls > 2000:
                raise RuntimeError("more than 2000 model calls: the decoder is looping")
            return self.original(*args, **kwargs)

        self.model.forward = counted
        return self

    def __exit__(self, *exc):
        del self.model.forward
        return False


def float32_masks(cls) -> None:
    """LLaDA2's `generate` builds its additive mask in bfloat16; SDPA wants it in the queries' dtype
    (float32 here), so the mask is cast on the way in (its values are 0 and -inf either way)."""
    original = cls.forward

    def forward(self, *args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        return original(self, *args, attention_mask=attention_mask, **kwargs)

    cls.forward = forward


def prompts_of(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.prompt_ids(t, chat=False) for t in texts]


# ---------------------------------------------------------------------------------------------
# the families


def lladamoe(args, out: Path) -> dict:
    from unmask.testing import family_tokenizer

    extract(args.dllm, REVISIONS["dllm"], {"configuration_lladamoe.py": "dllm/pipelines/llada/models/configuration_lladamoe.py",
                                           "modeling_lladamoe.py": "dllm/pipelines/llada/models/modeling_lladamoe.py"},
            "ref_lladamoe")
    from ref_lladamoe.configuration_lladamoe import LLaDAMoEConfig
    from ref_lladamoe.modeling_lladamoe import LLaDAMoEModelLM

    dict_tied(LLaDAMoEModelLM, "model.embed_tokens.weight")
    tok = family_tokenizer("lladamoe")
    vocab = len(tok.hf) + 8
    keys = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                dense_intermediate_size=64, expert_intermediate_size=16, shared_expert_intermediate_size=16,
                num_experts=8, num_experts_per_tok=2, moe_layer_freq=[0, 1, 1], qk_layernorm=True, rope_theta=50000.0,
                partial_rotary_factor=0.5, max_position_embeddings=256, rms_norm_eps=1e-5,
                moe_router_enable_expert_bias=True, moe_router_score_function="softmax", norm_topk_prob=False,
                attention_bias=False, clip_qkv=None, tie_word_embeddings=False,
                pad_token_id=tok.hf.eos_token_id, eos_token_id=tok.hf.eos_token_id)
    cfg = LLaDAMoEConfig(**keys)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(cfg).eval()
    randomise(model, std=0.2, head_scale=4.0, seed=1, mask_id=tok.hf.mask_token_id)
    inputs = prompts_of(tok, ["tom has 5 apples and ann has 3 pens . how many ?", "hello world"])
    logits = {}
    with torch.no_grad():
        for i, ids in enumerate(inputs):
            logits[f"logits_{i}"] = model(torch.tensor([ids])).logits[0].float()
    config = {**keys, "model_type": "lladamoe", "architectures": ["LLaDAMoEModelLM"],
              "mask_token_id": tok.hf.mask_token_id, "hidden_act": "silu", "rope_scaling": None}
    save_checkpoint(model, config, tok, out, block=8)
    return {"family": "lladamoe", "inputs": inputs, "logits": logits}


def llada2(args, out: Path) -> dict:
    from unmask.testing import family_tokenizer

    base = "dllm/pipelines/llada2/models/"
    base21 = "dllm/pipelines/llada21/models/"
    extract(args.dllm, REVISIONS["dllm"], {"configuration_llada2_moe.py": base + "configuration_llada2_moe.py",
                                           "modeling_llada2_moe.py": base + "modeling_llada2_moe.py"}, "ref_llada2")
    extract(args.dllm, REVISIONS["dllm"], {"configuration_llada21_moe.py": base21 + "configuration_llada21_moe.py",
                                           "modeling_llada21_moe.py": base21 + "modeling_llada21_moe.py"}, "ref_llada21")
    from ref_llada2.configuration_llada2_moe import LLaDA2MoeConfig
    from ref_llada2.modeling_llada2_moe import LLaDA2MoeModelLM
    from ref_llada21.configuration_llada21_moe import LLaDA2MoeConfig as LLaDA21MoeConfig
    from ref_llada21.modeling_llada21_moe import LLaDA2MoeModelLM as LLaDA21MoeModelLM

    for cls in (LLaDA2MoeModelLM, LLaDA21MoeModelLM):
        dict_tied(cls, "model.word_embeddings.weight")
        float32_masks(cls)
    tok = family_tokenizer("llada2")
    eos, mask = tok.hf.eos_token_id, tok.hf.mask_token_id
    vocab = len(tok.hf) + 8
    keys = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, use_qkv_bias=False, use_qk_norm=True, use_bias=False,
                rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=256, rope_theta=600000.0,
                rope_scaling=None, pad_token_id=eos, eos_token_id=eos, num_experts=8, num_shared_experts=1,
                num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, moe_intermediate_size=16,
                first_k_dense_replace=1, partial_rotary_factor=0.5, use_cache=False)
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**keys)).eval()
    randomise(model, std=0.2, head_scale=12.0, seed=2, mask_id=mask, eos_scale=EOS_SCALE, eos_id=eos)
    model21 = LLaDA21MoeModelLM(LLaDA21MoeConfig(**keys)).eval()
    model21.load_state_dict(model.state_dict())
    block = 8
    inputs = prompts_of(tok, ["tom has 5 apples", "what is 3 plus 4 ?", "tom has 5 apples and ann has 3 pens . how"])
    record = {"family": "llada2", "inputs": inputs, "logits": {}, "block": block, "decodes": []}
    with torch.no_grad():
        full = inputs[2] + [mask] * (3 * block - len(inputs[2]))  # 3 blocks, the last ones masked
        mask4d = block_mask(len(full), block, torch.float32)[:, None]
        record["logits"]["logits_0"] = model(torch.tensor([full]), attention_mask=mask4d,
                                             position_ids=torch.arange(len(full))[None]).logits[0].float()
        record["logit_inputs"] = [full]
        for ids in inputs:
            for name, net, kwargs in (("llada2", model, dict(steps=block, threshold=0.95)),
                                      ("llada21", model21, dict(threshold=0.95, editing_threshold=0.9,
                                                                max_post_steps=16))):
                with Counter(net) as counter:
                    got = net.generate(torch.tensor([ids]), block_length=block, gen_length=16, eos_id=eos, mask_id=mask,
                                       temperature=0.0, **kwargs)
                record["decodes"].append({"decoder": name, "prompt": ids, "gen_length": 16, "block_length": block,
                                          "settings": kwargs, "tokens": got[0].tolist(), "nfe": counter.calls})
    config = {**keys, "model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"], "mask_token_id": mask,
              "hidden_act": "silu"}
    save_checkpoint(model, config, tok, out, block=block)
    return record


def sdar(args, out: Path) -> dict:
    from unmask.testing import family_tokenizer

    base = "training/model/SDAR-4B-Chat/"
    folder = extract(args.sdar, REVISIONS["sdar"], {"configuration_sdar.py": base + "configuration_sdar.py",
                                                    "modeling_sdar.py": base + "modeling_sdar.py"}, "ref_sdar")
    _stub("ref_sdar.fused_linear_diffusion_cross_entropy", FusedLinearDiffusionCrossEntropyLoss=None)  # training only
    source = subprocess.run(["git", "-C", args.sdar, "show",
                             f"{REVISIONS['sdar']}:evaluation/opencompass/opencompass/models/huggingface_bd3.py"],
                            check=True, capture_output=True, text=True).stdout
    header = ("import numpy as np\nimport torch\nfrom torch.nn import functional as F\n"
              "from transformers.cache_utils import DynamicCache\n")
    (folder / "decoder.py").write_text(header + functions_of(source, [
        "add_gumbel_noise", "top_k_logits", "top_p_logits", "sample_with_temperature_topk_topp",
        "get_num_transfer_tokens", "block_diffusion_generate"]))
    from ref_sdar.configuration_sdar import SDARConfig
    from ref_sdar.decoder import block_diffusion_generate
    from ref_sdar.modeling_sdar import SDARForCausalLM

    dict_tied(SDARForCausalLM, "model.embed_tokens.weight")
    tok = family_tokenizer("sdar")
    eos, mask, im_end = tok.hf.eos_token_id, tok.hf.mask_token_id, tok.token_id("<|im_end|>")
    vocab = len(tok.hf) + 8
    block = 4
    keys = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=256,
                tie_word_embeddings=False, attention_bias=False, sliding_window=None, use_sliding_window=False,
                max_window_layers=2, block_size=block, mask_token_id=mask, bos_token_id=eos, eos_token_id=eos,
                pad_token_id=None, fuse_cross_entropy=True)
    torch.manual_seed(0)
    model = SDARForCausalLM(SDARConfig(**keys)).eval()
    randomise(model, std=0.2, head_scale=8.0, seed=3, mask_id=mask)
    inputs = prompts_of(tok, ["tom has 5", "what is 3 plus 4 ?", "hello world , tom"])
    record = {"family": "sdar", "inputs": inputs, "logits": {}, "block": block, "decodes": []}
    with torch.no_grad():
        full = inputs[1] + [mask] * (4 * block - len(inputs[1]))
        record["logits"]["logits_0"] = model(torch.tensor([full]), attention_mask=block_mask(len(full), block),
                                             position_ids=torch.arange(len(full))[None]).logits[0].float()
        record["logit_inputs"] = [full]
        for ids in inputs:
            for threshold in (0.85, 1.0):
                with Counter(model) as counter:
                    got = block_diffusion_generate(model, tok.hf, {"input_ids": torch.tensor([ids]),
                                                                   "attention_mask": None}, mask_id=mask, gen_length=12,
                                                   block_length=block, denoising_steps=block, temperature=1.0, top_k=1,
                                                   top_p=1.0, remasking="low_confidence", threshold=threshold,
                                                   stopping_criteria_idx=[im_end, eos])
                record["decodes"].append({"decoder": "sdar", "prompt": ids, "gen_length": 12, "block_length": block,
                                          "settings": {"threshold": threshold}, "tokens": got[0, len(ids):].tolist(),
                                          "nfe": counter.calls})
    config = {**keys, "model_type": "sdar", "architectures": ["SDARForCausalLM"], "hidden_act": "silu",
              "rope_scaling": None}
    config.pop("fuse_cross_entropy")
    save_checkpoint(model, config, tok, out, block=block)
    return record


def fastdllm_v2(args, out: Path) -> dict:
    from unmask.testing import family_tokenizer

    base = "FastDLLM-inferencing/Fast_dLLM_v2_7B/"
    extract(args.fastdllm_v2, REVISIONS["fastdllm_v2"], {"configuration.py": base + "configuration.py",
                                                         "modeling.py": base + "modeling.py"}, "ref_fdv2")
    from ref_fdv2.configuration import Fast_dLLM_QwenConfig
    from ref_fdv2.modeling import Fast_dLLM_QwenForCausalLM

    dict_tied(Fast_dLLM_QwenForCausalLM, "model.embed_tokens.weight")
    tok = family_tokenizer("fastdllm_v2")
    eos, mask = tok.hf.eos_token_id, tok.hf.mask_token_id
    vocab = len(tok.hf) + 8
    block, sub = 8, 4
    keys = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, bd_size=block, rope_theta=1e6, max_position_embeddings=256,
                pad_token_id=tok.token_id("<|endoftext|>"), eos_token_id=eos, tie_word_embeddings=False,
                rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Fast_dLLM_QwenForCausalLM(Fast_dLLM_QwenConfig(**keys)).eval()
    randomise(model, std=0.3, head_scale=8.0, seed=4, mask_id=mask, eos_scale=EOS_SCALE, eos_id=eos)
    inputs = prompts_of(tok, ["tom has 5 apples", "tom has 5 apples and ann has 3 pens . how", "what is 3 plus 4 ?"])
    record = {"family": "fastdllm_v2", "inputs": inputs, "logits": {}, "block": block, "decodes": []}
    with torch.no_grad():
        full = inputs[1] + [mask] * (3 * block - len(inputs[1]))
        record["logits"]["logits_0"] = model(input_ids=torch.tensor([full]), block_size=block).logits[0].float()
        record["logit_inputs"] = [full]
        for ids in inputs:
            assert len(ids) != block, "the reference skips the prompt when it is exactly one block (unmask prefills it)"
            for threshold in (0.9, 1.0):
                with Counter(model) as counter:
                    got = model.generate(torch.tensor([ids]), max_new_tokens=24, mask_id=mask, block_size=block,
                                         small_block_size=sub, stop_token=eos, threshold=threshold, temperature=0.0)
                record["decodes"].append({"decoder": "fastdllm_v2", "prompt": ids, "max_new_tokens": 24,
                                          "block_length": block, "settings": {"threshold": threshold,
                                                                              "small_block": sub},
                                          "tokens": got[0, len(ids):].tolist(), "nfe": counter.calls})
    config = {**keys, "model_type": "Fast_dLLM_Qwen", "architectures": ["Fast_dLLM_QwenForCausalLM"],
              "mask_token_id": mask, "hidden_act": "silu", "rope_scaling": None}
    save_checkpoint(model, config, tok, out, block=block)
    return record


FAMILIES = {"lladamoe": lladamoe, "llada2": llada2, "sdar": sdar, "fastdllm_v2": fastdllm_v2}
SOURCES = {"lladamoe": "dllm", "llada2": "dllm", "sdar": "sdar", "fastdllm_v2": "fastdllm_v2"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dllm", help="git directory of ZHZisZZ/dllm")
    p.add_argument("--sdar", help="git directory of JetAstra/SDAR")
    p.add_argument("--fastdllm-v2", dest="fastdllm_v2", help="git directory of Satgoy152/DualDiffusion")
    p.add_argument("--family", action="append", choices=list(FAMILIES), help="default: every family")
    p.add_argument("--out", default="tests/fixtures/reference")
    args = p.parse_args(argv)
    install_shims()
    from safetensors.torch import save_file

    for family in args.family or list(FAMILIES):
        if not getattr(args, SOURCES[family]):
            print(f"skipping {family}: pass --{SOURCES[family].replace('_', '-')}", file=sys.stderr)
            continue
        folder = Path(args.out) / family
        if folder.exists():
            shutil.rmtree(folder)
        torch.use_deterministic_algorithms(True)
        record = FAMILIES[family](args, folder / "checkpoint")
        tensors = {k: v.contiguous() for k, v in record.pop("logits").items()}
        save_file(tensors, str(folder / "reference.safetensors"))
        record["source"] = {"repository": SOURCES[family], "revision": REVISIONS[SOURCES[family]],
                            "transformers": __import__("transformers").__version__, "torch": torch.__version__}
        (folder / "reference.json").write_text(json.dumps(record, indent=1) + "\n")
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{family}: {folder} ({size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
