"""Rebuild a Hugging Face tokenizer from the vocabulary stored in a GGUF file.

llama.cpp keeps a gpt2-style byte-level BPE tokenizer as metadata: `tokenizer.ggml.tokens`
(already in byte-level form, "Ġthe"), `tokenizer.ggml.merges` ("Ġ t"), `tokenizer.ggml.token_type`
and a pre-tokenizer *name* (`tokenizer.ggml.pre`) that llama.cpp maps to a list of split
regexes (llama-vocab.cpp). We rebuild the same pipeline with the `tokenizers` library:

    Split(regex_1, isolated) ... Split(regex_n, isolated) -> ByteLevel -> BPE -> ByteLevel decoder

and write `tokenizer.json` plus a `tokenizer_config.json` that carries the special tokens and
the chat template, which is what `mlx_lm.load` (through `AutoTokenizer`) reads.

SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`) are refused with a clear error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import DataError

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL = 3
_USER_DEFINED = 4

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class PreTokenizer:
    """llama.cpp's split regexes for one `tokenizer.ggml.pre` family (llama-vocab.cpp)."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_FAMILIES: dict[tuple[str, ...], PreTokenizer] = {
    ("default",): _DEFAULT,
    ("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais"): PreTokenizer((_GPT2,)),
    ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"): PreTokenizer(
        (r"\p{N}", _GPT2)
    ),
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"): PreTokenizer(
        (_LLAMA3,), ignore_merges=True, add_bos=True
    ),
    ("qwen2", "stablelm2", "deepseek-r1-qwen"): PreTokenizer((_QWEN2,)),
}
PRE_TOKENIZERS: dict[str, PreTokenizer] = {n: p for names, p in _FAMILIES.items() for n in names}


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids named by the GGUF metadata (None when the file names none)."""

    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    extra_eos: tuple[int, ...]  # end-of-turn / end-of-message tokens that also stop generation

    @property
    def eos_ids(self) -> list[int]:
        ids = [] if self.eos is None else [self.eos]
        return ids + [i for i in self.extra_eos if i not in ids]


# Metadata values are plain Python (gguf.GGUFReader's ReaderField.contents(): int, float, bool,
# str, list); numpy/mlx scalars, as other readers give them, are unwrapped too.
def _scalar(md: dict[str, Any], key: str) -> Any:
    value = md.get(key)
    return value.item() if hasattr(value, "item") else value


def _as_list(md: dict[str, Any], key: str) -> list[Any] | None:
    value = md.get(key)
    value = value.tolist() if hasattr(value, "tolist") else value
    return value if value is None or isinstance(value, list) else [value]


def special_tokens(path: Path, md: dict[str, Any], n_tokens: int) -> SpecialTokens:
    """Read the bos/eos/unk/pad (and end-of-turn) ids, checking each names a real token."""

    def token_id(key: str) -> int | None:
        value = _scalar(md, f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not isinstance(value, int) or not 0 <= value < n_tokens:
            raise DataError(
                f"{path}: tokenizer.ggml.{key} must be a token id below {n_tokens}, got {value!r}"
            )
        return value

    extra = tuple(i for k in ("eot_token_id", "eom_token_id") if (i := token_id(k)) is not None)
    return SpecialTokens(
        bos=token_id("bos_token_id"),
        eos=token_id("eos_token_id"),
        unk=token_id("unknown_token_id"),
        pad=token_id("padding_token_id"),
        extra_eos=extra,
    )


def _vocabulary(path: Path, md: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    model = md.get("tokenizer.ggml.model")
    if model == "llama":
        raise DataError(
            f"{path}: tokenizer.ggml.model is 'llama' (SentencePiece); only BPE ('gpt2') "
            "tokenizers are supported"
        )
    if model != "gpt2":
        raise DataError(f"{path}: expected tokenizer.ggml.model 'gpt2' (BPE), got {model!r}")
    tokens = md.get("tokenizer.ggml.tokens")
    merges = md.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens:
        raise DataError(f"{path}: expected a list of strings in tokenizer.ggml.tokens")
    if not isinstance(merges, list):
        raise DataError(f"{path}: expected a list of strings in tokenizer.ggml.merges")
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2:
            raise DataError(f"{path}: tokenizer.ggml.merges[{i}] is not 'left right': {merge!r}")
        pairs.append((parts[0], parts[1]))
    return tokens, pairs


def _pre_tokenizer(path: Path, md: dict[str, Any]) -> PreTokenizer:
    # llama.cpp treats a missing name as "default" (old converters did not write one).
    name = md.get("tokenizer.ggml.pre", "default")
    if name not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise DataError(
            f"{path}: tokenizer.ggml.pre {name!r} is not supported (supported: {known})"
        )
    return PRE_TOKENIZERS[name]


def build_tokenizer(path: Path, md: dict[str, Any]) -> tuple[Any, SpecialTokens]:
    """The `tokenizers.Tokenizer` described by the metadata, and its special token ids."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    tokens, merges = _vocabulary(path, md)
    pre = _pre_tokenizer(path, md)
    specials = special_tokens(path, md, len(tokens))
    types = _as_list(md, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise DataError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries, "
            f"expected one per token ({len(tokens)})"
        )

    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    try:
        bpe = models.BPE(
            vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre.ignore_merges
        )
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for an unknown merge token
        raise DataError(
            f"{path}: the BPE vocabulary and merges do not fit together ({e})"
        ) from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()

    add_bos = _scalar(md, "tokenizer.ggml.add_bos_token")
    add_bos = pre.add_bos if add_bos is None else bool(add_bos)
    add_eos = bool(_scalar(md, "tokenizer.ggml.add_eos_token"))
    bos = [specials.bos] if add_bos and specials.bos is not None else []
    eos = [specials.eos] if add_eos and specials.eos is not None else []
    if bos or eos:
        b, e = [tokens[i] for i in bos], [tokens[i] for i in eos]
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*b, "$A", *e]),
            pair=" ".join([*b, "$A", *e, *b, "$B", *e]),
            special_tokens=[(tokens[i], i) for i in dict.fromkeys(bos + eos)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|im_start|>, ...) must never be split by BPE; llama.cpp matches
    # user-defined tokens in raw text too, but decodes them as ordinary text.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )
    return tok, specials


def write_tokenizer(path: Path, md: dict[str, Any], out_dir: Path) -> SpecialTokens:
    """Write tokenizer.json and tokenizer_config.json (special tokens, chat template)."""
    tok, specials = build_tokenizer(path, md)
    tok.save(str(out_dir / "tokenizer.json"))
    tokens = md["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(specials, name)
        if token_id is not None:
            config[f"{name}_token"] = tokens[token_id]
    if isinstance(template := md.get("tokenizer.chat_template"), str):
        config["chat_template"] = template
    if isinstance(context := _scalar(md, "llama.context_length"), int):
        config["model_max_length"] = context
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return specials
