"""Checkpoints in Hugging Face layout: find, read, build the right network, write.

A checkpoint is a folder with `config.json`, `*.safetensors` (sharded with
`model.safetensors.index.json` where large) and `tokenizer.json` / `tokenizer_config.json`.
Weights load from safetensors only. The architecture is read from `config.json`
(`model_type` / `architectures`): LLaDA and Dream load into our native networks, anything else goes
through the generic `transformers` adapter (remote code only with `trust_remote_code`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from unmask.errors import UnmaskError
from unmask.models.base import DecodeDefaults, DiffusionLM
from unmask.models.tokenizer import Tokenizer

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_NAMES = ("builtin",)
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class Architecture:
    """How to turn a config.json into a native network."""

    name: str
    config_from_dict: Callable[[dict, str], Any]
    network: Callable[[Any], nn.Module]
    shifted: bool
    matches: Callable[[dict], bool]
    special_ids: Callable[[Any, dict, Tokenizer], dict]
    block_diffusion: Any = None  # a BlockDiffusion for block-diffusion families, or a function (cfg, raw) -> one or None
    defaults: Callable[[Any, dict], dict] | None = None  # the family's decode defaults (gen/block length)
    strategy: Callable[[Any, dict], str] | None = None  # the family's own decoder (None: low_confidence)


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


def builtin_path(name: str = "builtin") -> Path:
    """Folder of a built-in model: `builtin` is `builtin/default`, `builtin:NAME` is `builtin/NAME`."""
    variant = name.split(":", 1)[1] if name.startswith("builtin:") else "default"
    return BUILTIN_DIR / variant


def resolve_checkpoint(spec: str | None) -> Path:
    """A local folder for `spec`: None/'builtin' is the shipped model; else a path or a hub id."""
    if spec is None or spec == "builtin" or spec.startswith("builtin:"):
        path = builtin_path(spec or "builtin")
        if not (path / "config.json").exists():
            shipped = [p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").exists()] if BUILTIN_DIR.is_dir() else []
            names = ", ".join(sorted("builtin" if v == "default" else f"builtin:{v}" for v in shipped)) or "none"
            raise UnmaskError(
                f"the built-in model {spec or 'builtin'} is missing from {path} (shipped: {names}); reinstall "
                "unmask or train one with `unmask train sft --out <dir>` and pass --model <dir>"
            )
        return path
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UnmaskError(f"--model {spec} is a file; pass the checkpoint folder that holds config.json")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _from_hub(spec)
    raise UnmaskError(f"no checkpoint folder at {spec}; pass a folder with config.json and *.safetensors, or a hub id")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise UnmaskError(f"{repo_id} looks like a hub id but huggingface_hub is not installed") from None
    patterns = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise UnmaskError(
            f"could not fetch {repo_id} from the hub ({type(exc).__name__}); download it elsewhere and pass its local folder"
        ) from None


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise UnmaskError(f"checkpoint {path} has no config.json; pass the folder of a Hugging Face layout checkpoint")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UnmaskError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}); restore the original file") from None
    if not isinstance(raw, dict):
        raise UnmaskError(f"{file} must hold a JSON object")
    return raw


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, following the shard index when there is one."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UnmaskError(f"{index} is malformed: it needs a 'weight_map' object; restore the original file") from None
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UnmaskError(f"checkpoint {path} is incomplete: shard(s) {', '.join(missing)} named in {INDEX_FILE} are missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise UnmaskError(f"checkpoint {path} has only pickle weights (.bin/.pt); unmask loads safetensors only: convert them first")
        raise UnmaskError(f"checkpoint {path} has no *.safetensors weights")
    return files


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UnmaskError(f"{file} is not a readable safetensors file ({exc}); re-download or re-save it") from None
    return state


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UnmaskError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnmaskError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UnmaskError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return DTYPES[dtype]


def find_architecture(raw: dict) -> Architecture | None:
    _ensure_registered()
    for arch in ARCHITECTURES.values():
        if arch.matches(raw):
            return arch
    return None


def _ensure_registered() -> None:
    # importing the modules registers their architectures (the more specific ones first: a
    # LLaDA-MoE or LLaDA2 checkpoint also names "llada" in its architectures)
    from unmask.models import fastdllm_v2, llada2, lladamoe, sdar  # noqa: F401
    from unmask.models import dream, llada_arch  # noqa: F401


def load_model(
    spec: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> DiffusionLM:
    """Load a checkpoint (folder, hub id, or None for the built-in model) behind `DiffusionLM`."""
    path = resolve_checkpoint(spec)
    raw = read_config(path)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    arch = find_architecture(raw)
    if arch is None:
        from unmask.models.hf import load_generic

        return load_generic(path, raw, dev, dt, trust_remote_code=trust_remote_code)
    cfg = arch.config_from_dict(raw, str(path / "config.json"))
    with torch.device("meta"):
        network = arch.network(cfg)
    state = read_state_dict(path)
    expected = dict(network.state_dict())
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UnmaskError(f"checkpoint {path} lacks tensor(s) {shown} that a {arch.name} model of this config needs")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:  # weights the network would silently ignore mean it is not the network they were trained in
        shown = ", ".join(unexpected[:3]) + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else "")
        raise UnmaskError(
            f"checkpoint {path} has tensor(s) {shown} that the native {arch.name} network of this config has no place for; "
            "it does not implement the layer they belong to, so it refuses rather than ignore them"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UnmaskError(
                f"tensor {name} in {path} has shape {tuple(state[name].shape)} but config.json implies {tuple(tensor.shape)}"
            )
    state = {k: v.to(dtype=dt) if v.is_floating_point() else v for k, v in state.items()}
    network.load_state_dict(state, assign=True, strict=True)
    network.to(dev).eval()
    tokenizer = Tokenizer.from_dir(path, trust_remote_code=trust_remote_code)
    ids = arch.special_ids(cfg, raw, tokenizer)
    family = arch.defaults(cfg, raw) if arch.defaults is not None else {}
    defaults = DecodeDefaults(**{**family, **raw.get("unmask_defaults", {})})
    return DiffusionLM(
        network=network,
        tokenizer=tokenizer,
        name=raw.get("unmask_name") or (spec if spec else "builtin"),
        shifted=arch.shifted,
        defaults=defaults,
        supports_cache=True,
        path=str(path),
        kind=arch.name,
        block_diffusion=arch.block_diffusion(cfg, raw) if callable(arch.block_diffusion) else arch.block_diffusion,
        default_strategy=arch.strategy(cfg, raw) if arch.strategy is not None else "low_confidence",
        **ids,
    )


def save_checkpoint(model: DiffusionLM, out: str | Path, max_shard_bytes: int | None = None, extra_config: dict | None = None) -> Path:
    """Write `model` as an HF-layout checkpoint (sharded with an index if `max_shard_bytes` is set)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.network.config.to_dict()
    cfg["unmask_defaults"] = {"gen_length": model.defaults.gen_length, "block_length": model.defaults.block_length}
    if model.defaults.serve_strategy:
        cfg["unmask_defaults"]["serve_strategy"] = model.defaults.serve_strategy
    if extra_config:
        cfg.update(extra_config)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.network.state_dict().items()}
    for old in list(out.glob("*.safetensors")) + [out / INDEX_FILE]:
        old.unlink(missing_ok=True)
    if not max_shard_bytes:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    model.tokenizer.save(out)
    return out
