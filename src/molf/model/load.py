"""Load the model and tokenizer of a run: a hub id, a local directory, or a tiny model from a config."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from molf.model.tiny import build_tiny_model, is_tiny_name

# The vendored Qwen2.5 tokenizer, used by tiny-* models (which share its vocabulary size).
_VENDORED_TOKENIZER = Path("assets") / "tokenizer" / "qwen2.5"


def vendored_tokenizer_dir() -> Path:
    """Path of the repository's Qwen2.5 tokenizer, searched above this file and the working directory.

    Returns:
        The directory holding ``tokenizer.json``.

    Raises:
        FileNotFoundError: the package is installed outside its repository and no copy is found.
    """
    starts = [Path(__file__).resolve(), Path.cwd().resolve()]
    for start in starts:
        for parent in [start, *start.parents]:
            candidate = parent / _VENDORED_TOKENIZER
            if (candidate / "tokenizer.json").is_file():
                return candidate
    raise FileNotFoundError(
        f"the vendored tokenizer {_VENDORED_TOKENIZER} was not found above {starts[0]} or {starts[1]}; "
        "run from the repository or pass --tokenizer_name_or_path"
    )


def check_model_paths(model_name_or_path: Optional[str], tokenizer_name_or_path: Optional[str] = None) -> None:
    """``check_local_reference`` for ``--model_name_or_path`` and ``--tokenizer_name_or_path``."""
    check_local_reference("model_name_or_path", model_name_or_path)
    check_local_reference("tokenizer_name_or_path", tokenizer_name_or_path)


def check_local_reference(flag: str, value: Optional[str]) -> None:
    """Fail early when a model or tokenizer reference is a local path and nothing is there; hub ids and
    ``tiny-*`` names are left to the loaders. A reference is a local path when it starts with ``/``,
    ``./``, ``../`` or ``~``, has more than one ``/`` (a hub id is ``name`` or ``org/name``), or its first
    part is a directory here (``ckpts/run`` with a ``ckpts`` directory).

    Raises:
        FileNotFoundError: names ``--flag`` and the missing path.
    """
    if value is not None and is_local_reference(value) and not Path(value).expanduser().exists():
        raise FileNotFoundError(f"--{flag} {value} does not exist; pass an existing directory or a hub id")


def is_local_reference(value: str) -> bool:
    """Whether a model or tokenizer reference names a local path rather than a hub id (see above)."""
    if value.startswith(("/", "./", "../", "~")) or value.count("/") > 1:
        return True
    return "/" in value and Path(value.split("/")[0]).is_dir()


def load_tokenizer(model_name_or_path: str, tokenizer_name_or_path: Optional[str] = None):
    """Load the tokenizer of a run and make sure it can pad.

    Args:
        model_name_or_path: the run's model (its tokenizer is used unless overridden).
        tokenizer_name_or_path: an explicit tokenizer (hub id or directory).

    Returns:
        A ``PreTrainedTokenizerBase`` with a pad token (eos when the tokenizer has none).
    """
    from transformers import AutoTokenizer

    source = tokenizer_name_or_path
    if source is None:
        source = str(vendored_tokenizer_dir()) if is_tiny_name(model_name_or_path) else model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               seed: int = 0):
    """Load a causal LM for training.

    Args:
        model_name_or_path: hub id, local directory, or ``tiny-<family>[:key=value,...]``.
        dtype: parameter dtype (fp32 for fp32 / bf16-mixed training, bf16 for pure bf16).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        seed: initialisation seed of tiny models (pretrained weights ignore it).

    Returns:
        The model, in train mode, with ``use_cache`` off (the KV cache is useless when training).

    Raises:
        ValueError: ``flash_attention_2`` requested without the ``flash_attn`` package.
    """
    if attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation flash_attention_2 needs flash-attn: pip install flash-attn, "
                             "or use --attn_implementation sdpa")
    if is_tiny_name(model_name_or_path):
        model = build_tiny_model(model_name_or_path, seed=seed, dtype=dtype)
        if model.config._attn_implementation != "eager":
            model.config._attn_implementation = attn_implementation
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    model.config.use_cache = False
    model.train()
    return model
