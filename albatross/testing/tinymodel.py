"""Tiny random-weight Llama models in GGUF, made by the tests themselves in well under 1 s.

Contract of :func:`make_tiny_model`:

- the same arguments give a byte-identical file (weights come from ``seed``, the
  tokenizer is trained deterministically on a built-in corpus);
- the vocabulary is an ASCII-only byte-level BPE (``tokenizer.ggml.model = "gpt2"``,
  pre-tokenizer ``gpt-2``), about 512 tokens, and the model's vocab size is exactly the
  tokenizer's size. ASCII only because llama-server's stream holds back (and, unpatched,
  drops) tokens whose bytes are not valid UTF-8 on their own;
- ids 0, 1, 2 are ``<|endoftext|>``, ``<|im_start|>`` (bos), ``<|im_end|>`` (eos, end of
  generation), and the chat template is ChatML, so ``/apply-template`` and
  ``/v1/chat/completions`` work;
- weights are f32, so greedy decoding is reproducible across engines;
- the output rows of the special tokens are zero: their logit is always exactly 0 while
  the largest of ~500 random logits is positive, so greedy streams never end early and
  run to ``max_tokens``.

:func:`make_tiny_hf_model` writes the same weights as a Hugging Face directory (for
vLLM). Only ``numpy``, ``tokenizers`` and ``gguf`` are needed (no torch, no transformers).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 1, 2

# ChatML, as SmolLM2-Instruct uses it (minus its default system message).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The albatross glides for hours over the southern ocean without a single beat of its wings.
It rides the wind that rises from the waves, turning, climbing, falling and turning again.
Sailors once believed that the bird carried the souls of those lost at sea, and so they
would not harm it. A ship that kept an albatross in its wake was thought to be lucky.
Every morning the old captain checked the weather, the charts, the ropes and the sails.
He wrote in his book: wind from the west at twenty knots, sea state four, visibility good.
The crew ate bread and cheese, drank strong tea, and told stories about distant harbours.
Some of them had travelled to cold islands where penguins stood in long quiet rows.
Others remembered warm ports with markets full of fruit, spices, cloth and bright lamps.
When the storm came, the waves grew higher than the mast, and water poured across the deck.
Nobody slept that night. They pumped, they tied things down, they waited for the dawn.
In the grey light they saw the albatross again, still gliding, as if nothing had happened.
A server answers many requests at once. Each request is a stream of small pieces of text.
If the machine that runs the model is taken away, the stream should continue elsewhere.
The gateway remembers which tokens were already sent, so nothing is repeated or lost.
Numbers help to check the work: 1, 2, 3, 10, 42, 100, 2024, 3.14, and 0.5 percent.
Questions, answers, lists; quotes "like this" and (brackets) and [more] and {braces}.
Simple words like cat, dog, sun, moon, tree, river, stone, house, road, and light.
Longer words like information, communication, understanding, continuation, and migration.
She said: "Please keep the stream alive!" He replied: "I will, as long as I can."
"""


def _ascii_alphabet() -> list[str]:
    """Byte-level symbols of printable ASCII plus tab, newline and carriage return.

    Byte-level BPE maps each byte to a printable stand-in (space -> ``Ġ``, newline ->
    ``Ċ``); listing only ASCII bytes keeps every token pure ASCII.
    """
    table = pre_tokenizers.ByteLevel.alphabet()  # all 256 stand-ins, in no useful order
    # Rebuild GPT-2's byte -> symbol table to pick the ASCII ones.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    assert set(mapping.values()) == set(table)
    return [mapping[b] for b in (9, 10, 13, *range(32, 127))]


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Train the ASCII byte-level BPE on the built-in corpus (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=_ascii_alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def _vocab_and_merges(tok: Tokenizer) -> tuple[list[str], list[str]]:
    spec: dict[str, Any] = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = [""] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    # Newer `tokenizers` write merges as pairs, older ones as "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, merges


_F32 = np.ndarray[Any, np.dtype[np.float32]]


def _weights(
    seed: int, n_vocab: int, hidden: int, layers: int, kv_dim: int, ffn: int, std: float,
    tokens: list[str],
) -> dict[str, _F32]:  # fmt: skip
    """The random weights, in GGUF names and layout, in a fixed draw order (so a seed
    always gives the same model, whichever format it is written in)."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> _F32:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    ones = np.ones(hidden, dtype=np.float32)
    t: dict[str, _F32] = {"token_embd.weight": rand(n_vocab, hidden)}
    for i in range(layers):
        p = f"blk.{i}"
        t[f"{p}.attn_norm.weight"] = ones
        t[f"{p}.attn_q.weight"] = rand(hidden, hidden)
        t[f"{p}.attn_k.weight"] = rand(kv_dim, hidden)
        t[f"{p}.attn_v.weight"] = rand(kv_dim, hidden)
        t[f"{p}.attn_output.weight"] = rand(hidden, hidden)
        t[f"{p}.ffn_norm.weight"] = ones
        t[f"{p}.ffn_gate.weight"] = rand(ffn, hidden)
        t[f"{p}.ffn_up.weight"] = rand(ffn, hidden)
        t[f"{p}.ffn_down.weight"] = rand(hidden, ffn)
    t["output_norm.weight"] = ones
    out = rand(n_vocab, hidden)
    # Zero rows give special tokens a logit of exactly 0, below the maximum of the
    # other random logits: greedy never emits them, so streams run to max_tokens.
    out[[tokens.index(x) for x in SPECIAL_TOKENS]] = 0.0
    t["output.weight"] = out
    return t


def make_tiny_model(
    directory: Path,
    *,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 256,
    vocab_size: int = 512,
    context: int = 4096,
    weight_std: float = 0.3,
    name: str = "tiny",
) -> Path:
    """Write ``<directory>/<name>-s<seed>.gguf`` and return its path.

    ``hidden // heads`` must be at least 32 (vLLM's CPU attention rejects smaller
    heads) and ``heads`` a multiple of ``kv_heads``. The file is written under a
    temporary name and renamed, so a concurrent reader never sees half a model.
    """
    head_dim = hidden // heads
    if hidden % heads or head_dim < 32:
        raise ValueError(f"hidden={hidden}, heads={heads}: head_dim must be an integer >= 32")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")

    tokens, merges = _vocab_and_merges(train_tokenizer(vocab_size))
    n_vocab = len(tokens)
    tensors = _weights(seed, n_vocab, hidden, layers, kv_heads * head_dim, ffn, weight_std, tokens)

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-s{seed}.gguf"
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"{name}-s{seed}")
    w.add_vocab_size(n_vocab)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, the same as HF ByteLevel's
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for tname, arr in tensors.items():
        w.add_tensor(tname, arr)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def _unpermute(w: _F32, n_head: int) -> _F32:
    """Undo llama.cpp's Q/K row permutation (its HF converter applies it; GGUF rotates
    pairs of adjacent dimensions, HF the two halves of each head)."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _write_safetensors(path: Path, tensors: dict[str, _F32]) -> None:
    """The safetensors format by hand (a JSON header, then raw little-endian data)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())


def make_tiny_hf_model(
    directory: Path,
    *,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 256,
    vocab_size: int = 512,
    context: int = 4096,
    weight_std: float = 0.3,
    name: str = "tiny",
) -> Path:
    """Write the same model as :func:`make_tiny_model` as a Hugging Face directory
    ``<directory>/<name>-s<seed>-hf`` (config, safetensors, tokenizer) for vLLM.

    No torch or transformers needed. Written into a temporary directory and renamed.
    """
    head_dim = hidden // heads
    if hidden % heads or head_dim < 32 or heads % kv_heads:
        raise ValueError(
            f"hidden={hidden}, heads={heads}, kv_heads={kv_heads}: see make_tiny_model"
        )
    tok = train_tokenizer(vocab_size)
    tokens, _ = _vocab_and_merges(tok)
    n_vocab = len(tokens)
    g = _weights(seed, n_vocab, hidden, layers, kv_heads * head_dim, ffn, weight_std, tokens)
    t: dict[str, _F32] = {"model.embed_tokens.weight": g["token_embd.weight"]}
    for i in range(layers):
        b, m = f"blk.{i}", f"model.layers.{i}"
        t[f"{m}.input_layernorm.weight"] = g[f"{b}.attn_norm.weight"]
        t[f"{m}.self_attn.q_proj.weight"] = _unpermute(g[f"{b}.attn_q.weight"], heads)
        t[f"{m}.self_attn.k_proj.weight"] = _unpermute(g[f"{b}.attn_k.weight"], kv_heads)
        t[f"{m}.self_attn.v_proj.weight"] = g[f"{b}.attn_v.weight"]
        t[f"{m}.self_attn.o_proj.weight"] = g[f"{b}.attn_output.weight"]
        t[f"{m}.post_attention_layernorm.weight"] = g[f"{b}.ffn_norm.weight"]
        t[f"{m}.mlp.gate_proj.weight"] = g[f"{b}.ffn_gate.weight"]
        t[f"{m}.mlp.up_proj.weight"] = g[f"{b}.ffn_up.weight"]
        t[f"{m}.mlp.down_proj.weight"] = g[f"{b}.ffn_down.weight"]
    t["model.norm.weight"] = g["output_norm.weight"]
    t["lm_head.weight"] = g["output.weight"]

    final = directory / f"{name}-s{seed}-hf"
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    _write_safetensors(tmp / "model.safetensors", t)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": n_vocab,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "tokenizer.json").write_text(tok.to_str())
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "unk_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[EOS_ID],
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": context,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
    )
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return final


if __name__ == "__main__":
    import sys

    print(make_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
