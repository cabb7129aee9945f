"""Hub access shared by every layer: the token, where a model name points, and its tokenizer.

The token is read from the environment (or passed explicitly) and never logged or saved. transformers is imported
only when a tokenizer is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from foundation.embedded_model import EMBEDDED_MODEL, embedded_model_dir
from foundation.errors import UserInputError

TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGINGFACE_TOKEN")


def resolve_token(explicit: str | None = None) -> str | None:
    """The explicit token, else `HF_TOKEN`, else `HUGGINGFACE_TOKEN`. Never logged or saved."""
    if explicit:
        return explicit
    for name in TOKEN_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def resolve_model_source(model_name: str) -> str:
    """Map the embedded alias to its converted folder; pass hub names and local folders through."""
    if model_name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if model_name.startswith("embedded:"):
        raise UserInputError(f"Unknown embedded model '{model_name}'; the embedded model is '{EMBEDDED_MODEL}'.")
    return model_name


def hub_error(model_name: str, error: Exception) -> UserInputError:
    """The one sentence for a model (or tokenizer) that could not be loaded: gated, offline, or unknown."""
    text = str(error)
    if Path(model_name).expanduser().exists():
        return UserInputError(f"Could not load the model folder '{model_name}': {text.splitlines()[0]}")
    if "gated" in text.lower() or "401" in text or "403" in text:
        return UserInputError(
            f"The model '{model_name}' is gated: accept its licence on huggingface.co and pass a token with "
            "--model.huggingface_token, HF_TOKEN or HUGGINGFACE_TOKEN."
        )
    if "connect" in text.lower() or "offline" in text.lower() or "resolve" in text.lower():
        return UserInputError(
            f"Could not reach the Hugging Face hub to download '{model_name}'; check the network, or use a local "
            f"folder or the offline model '{EMBEDDED_MODEL}'."
        )
    return UserInputError(
        f"Unknown model '{model_name}': it is neither a local folder nor a hub model id; check the name "
        f"(e.g. meta-llama/Llama-3.2-1B) or use '{EMBEDDED_MODEL}'."
    )


def load_tokenizer(model_name: str, token: str | None = None):
    """The tokenizer for a model, with a pad token (pads are never attended: right padding, causal attention)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, token=resolve_token(token), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise hub_error(model_name, error) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
