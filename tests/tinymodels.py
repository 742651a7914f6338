"""Tiny real ONNX models and tokenizers that the tests build themselves (onnx + numpy + tokenizers only).

Weights are random (fixed seed): the models are for plumbing, but every output position depends on
the other tokens through ``attention_mask`` (and ``position_ids`` for the decoder), so pooling or
padding mistakes change the vectors. ``reference_embed`` is the independent, unpadded yardstick, and
``write_golden`` stores its vectors as a model's golden vectors for the daemon's load self-test.
``build_attention_encoder`` is a real one-layer multi-head self-attention encoder: its activations grow
with batch x heads x length^2, as a real BERT's do, for the memory tests. ``build_bert_source`` is a real
2-layer transformers BERT saved as sentence-transformers loads it: a source for ``akidb-embed convert``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MAX_POSITIONS = 512
ENCODER_PAD = "[PAD]"
DECODER_EOS = "<|endoftext|>"
# Opset 17 / IR 8 load on every onnxruntime the project supports (>= 1.18, incl. Jetson wheels).
_OPSET = 17
_IR_VERSION = 8

_CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A search engine finds documents that answer a question; retrieval ranks passages by relevance.
What is the capital of France? Paris is the capital and the largest city of France.
How do I cook rice? Rinse the rice, add water, boil it, then let it rest for ten minutes.
Machine learning models turn text into vectors so that similar sentences are close together.
The weather today is cold and rainy, but tomorrow it will be sunny with a light wind.
Our team builds small devices that run neural networks on the edge without a network connection.
Children play football in the park after school while their parents talk about work and money.
Numbers like 0 1 2 3 4 5 6 7 8 9 and 2024 appear in dates, prices, phone numbers and addresses.
Can you help me find a cheap hotel near the train station with free breakfast and parking?
"""


def build_encoder_tokenizer() -> Tokenizer:
    """A BERT-style WordPiece tokenizer over the corpus's words: [CLS] text [SEP], right [PAD]."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    lines = (normalizer.normalize_str(line) for line in _CORPUS.splitlines())
    words = {word for line in lines for word, _ in pre_tokenizer.pre_tokenize_str(line)}
    # A hand-built vocabulary (the WordPiece trainer breaks ties at random) keeps tokenizer.json byte-stable;
    # single characters and their ## continuations spell out unseen words instead of giving [UNK].
    chars = [chr(c) for c in range(33, 127)]
    specials = [ENCODER_PAD, "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = [*specials, *chars, *("##" + c for c in chars), *sorted(words)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    # Exported encoder tokenizers often ship with padding enabled and Qwen3's without: the daemon meets both.
    tok.enable_padding(direction="right", pad_id=vocab[ENCODER_PAD], pad_token=ENCODER_PAD)
    return tok


def build_decoder_tokenizer() -> Tokenizer:
    """A Qwen3-style byte-level BPE tokenizer that appends <|endoftext|> (also the pad token); no padding preset."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The byte alphabet means any text tokenizes without an unknown token.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=[DECODER_EOS], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {DECODER_EOS}", pair=f"$A {DECODER_EOS} $B:1 {DECODER_EOS}:1",
        special_tokens=[(DECODER_EOS, tok.token_to_id(DECODER_EOS))],
    )
    return tok


def _int64_input(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])


def _save_model(out_dir: Path, nodes: list, inputs: list, inits: list, hidden: int, name: str) -> None:
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    graph = helper.make_graph(nodes, name, inputs, [output], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="akidb-tests")
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(out_dir / MODEL_FILE))


def _weights(rng: np.random.Generator, vocab: int, hidden: int) -> dict[str, np.ndarray]:
    # Small embeddings and a 1/sqrt(hidden) projection keep Tanh out of saturation: input changes stay visible.
    return {
        "word_emb": rng.normal(0.0, 0.5, (vocab, hidden)).astype(np.float32),
        "pos_emb": rng.normal(0.0, 0.25, (MAX_POSITIONS, hidden)).astype(np.float32),
        "proj": (rng.normal(0.0, 1.0, (hidden, hidden)) / np.sqrt(hidden)).astype(np.float32),
        "bias": rng.normal(0.0, 0.1, (hidden,)).astype(np.float32),
    }


def _tensors(arrays: dict[str, np.ndarray]) -> list[TensorProto]:
    return [numpy_helper.from_array(array, name) for name, array in arrays.items()]


# Constants the mask nodes and the count guard (no division by zero on all-pad prefixes) use.
_MASK_CONSTS = {"axis_2": np.array([2], np.int64), "one_f": np.array(1.0, np.float32)}


def _mask_nodes() -> list:
    """attention_mask -> float [batch, seq, 1] named mask3."""
    return [
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis_2"], ["mask3"]),
    ]


def _context_nodes(total: str, count: str) -> list:
    """context = total / sqrt(max(count, 1))."""
    # Dividing by sqrt(count), not count, keeps the context as strong as one token for long texts.
    return [
        helper.make_node("Max", [count, "one_f"], ["count_safe"]),
        helper.make_node("Sqrt", ["count_safe"], ["count_root"]),
        helper.make_node("Div", [total, "count_root"], ["context"]),
    ]


def _output_nodes(mixed: str) -> list:
    """last_hidden_state = tanh(mixed @ proj + bias)."""
    return [
        helper.make_node("MatMul", [mixed, "proj"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["last_hidden_state"]),
    ]


def build_encoder(out_dir: Path, *, hidden: int = 32, seed: int = 0, with_token_type_ids: bool = True) -> None:
    """Write a BERT-like encoder (bidirectional masked-context mixing) and its tokenizer into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_encoder_tokenizer()
    rng = np.random.default_rng(seed)
    w = _weights(rng, tok.get_vocab_size(), hidden)
    consts = {"axis_1": np.array([1], np.int64), "zero": np.array(0, np.int64), "one": np.array(1, np.int64)}
    inits = _tensors({**w, **_MASK_CONSTS, **consts})
    inputs = [_int64_input("input_ids"), _int64_input("attention_mask")]
    nodes = _mask_nodes() + [
        helper.make_node("Gather", ["word_emb", "input_ids"], ["tok"]),
        # Positions come from the sequence index, as in BERT: right padding is safe, left is not.
        helper.make_node("Shape", ["input_ids"], ["seq_1d"], start=1, end=2),
        helper.make_node("Squeeze", ["seq_1d"], ["seq_len"]),
        helper.make_node("Range", ["zero", "seq_len", "one"], ["positions"]),
        helper.make_node("Gather", ["pos_emb", "positions"], ["pos"]),
        helper.make_node("Add", ["tok", "pos"], ["x"]),
        # The masked sum of the whole sequence, added to every position: wrong masks change every output.
        helper.make_node("Mul", ["x", "mask3"], ["x_masked"]),
        helper.make_node("ReduceSum", ["x_masked", "axis_1"], ["x_sum"], keepdims=1),
        helper.make_node("ReduceSum", ["mask3", "axis_1"], ["count"], keepdims=1),
        *_context_nodes("x_sum", "count"),
        helper.make_node("Add", ["x", "context"], ["mixed"]),
    ]
    if with_token_type_ids:
        inputs.append(_int64_input("token_type_ids"))
        inits += _tensors({"type_emb": rng.normal(0.0, 0.3, (2, hidden)).astype(np.float32)})
        nodes += [
            helper.make_node("Gather", ["type_emb", "token_type_ids"], ["typ"]),
            helper.make_node("Add", ["mixed", "typ"], ["mixed_typ"]),
        ]
    nodes += _output_nodes("mixed_typ" if with_token_type_ids else "mixed")
    _save_model(out_dir, nodes, inputs, inits, hidden, "tiny_encoder")
    tok.save(str(out_dir / TOKENIZER_FILE))


def build_decoder(out_dir: Path, *, hidden: int = 48, seed: int = 0) -> None:
    """Write a Qwen3-like decoder (causal masked-context mixing + position_ids) and its tokenizer into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_decoder_tokenizer()
    w = _weights(np.random.default_rng(seed), tok.get_vocab_size(), hidden)
    inits = _tensors({**w, **_MASK_CONSTS, "seq_axis": np.array(1, np.int64)})
    inputs = [_int64_input("input_ids"), _int64_input("attention_mask"), _int64_input("position_ids")]
    nodes = _mask_nodes() + [
        helper.make_node("Gather", ["word_emb", "input_ids"], ["tok"]),
        helper.make_node("Mul", ["tok", "mask3"], ["tok_masked"]),
        # Running sum over the real tokens so far: the last real token sees the whole text.
        helper.make_node("CumSum", ["tok_masked", "seq_axis"], ["tok_cum"]),
        helper.make_node("CumSum", ["mask3", "seq_axis"], ["count"]),
        *_context_nodes("tok_cum", "count"),
        helper.make_node("Gather", ["pos_emb", "position_ids"], ["pos"]),
        # The own-token term is masked, so a pad after the text differs from the real last token.
        helper.make_node("Add", ["context", "tok_masked"], ["mixed0"]),
        helper.make_node("Add", ["mixed0", "pos"], ["mixed"]),
        *_output_nodes("mixed"),
    ]
    _save_model(out_dir, nodes, inputs, inits, hidden, "tiny_decoder")
    tok.save(str(out_dir / TOKENIZER_FILE))


def build_bert_source(folder: Path, damage: Callable[[Any], None] | None = None) -> Path:
    """A sentence-transformers-style folder (plain HF BERT, mean pooling) of a 2-layer BERT with the encoder
    tokenizer, ``damage`` applied to its weights first; needs torch and transformers (imported here only)."""
    import torch
    import transformers

    tokenizer = build_encoder_tokenizer()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                     initializer_range=0.2)  # BERT's 0.02 makes every text nearly the same vector
    model = transformers.BertModel(config)
    if damage is not None:
        with torch.no_grad():
            damage(model)
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=128, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    return folder


def build_attention_encoder(
    out_dir: Path, *, hidden: int = 64, heads: int = 8, max_positions: int = 2048, seed: int = 0
) -> None:
    """Write a one-layer multi-head self-attention encoder (BERT-like, right padding) and its tokenizer."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    head_dim = hidden // heads
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_encoder_tokenizer()
    rng = np.random.default_rng(seed)
    vocab = tok.get_vocab_size()

    def square() -> np.ndarray:
        # 1/sqrt(hidden) keeps Q.K and the output out of saturation, like _weights' proj.
        return (rng.normal(0.0, 1.0, (hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)

    w = {
        "word_emb": rng.normal(0.0, 0.5, (vocab, hidden)).astype(np.float32),
        "pos_emb": rng.normal(0.0, 0.25, (max_positions, hidden)).astype(np.float32),
        "wq": square(), "wk": square(), "wv": square(),
        # proj and bias are the output projection _output_nodes applies.
        "proj": square(),
        "bias": rng.normal(0.0, 0.1, (hidden,)).astype(np.float32),
    }
    consts = {
        "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
        "heads_dims": np.array([heads, head_dim], np.int64), "hidden_dim": np.array([hidden], np.int64),
        "key_axes": np.array([1, 2], np.int64),
        "scale": np.array(np.sqrt(head_dim), np.float32),
        "one_f": np.array(1.0, np.float32), "mask_neg": np.array(1e4, np.float32),
    }
    inits = _tensors({**w, **consts})
    inputs = [_int64_input("input_ids"), _int64_input("attention_mask")]
    nodes = [
        helper.make_node("Gather", ["word_emb", "input_ids"], ["tok"]),
        # Positions from the sequence index, as in BERT: right padding is safe, left is not.
        helper.make_node("Shape", ["input_ids"], ["batch_seq"]),
        helper.make_node("Shape", ["input_ids"], ["seq_1d"], start=1, end=2),
        helper.make_node("Squeeze", ["seq_1d"], ["seq_len"]),
        helper.make_node("Range", ["zero", "seq_len", "one"], ["positions"]),
        helper.make_node("Gather", ["pos_emb", "positions"], ["pos"]),
        helper.make_node("Add", ["tok", "pos"], ["x"]),
        # [batch, seq, heads, head_dim] from the run's own shape, so any batch and length reshape.
        helper.make_node("Concat", ["batch_seq", "heads_dims"], ["split_shape"], axis=0),
        helper.make_node("Concat", ["batch_seq", "hidden_dim"], ["merge_shape"], axis=0),
    ]
    for name in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}_flat"]),
            helper.make_node("Reshape", [f"{name}_flat", "split_shape"], [f"{name}_split"]),
        ]
    nodes += [
        # Q and V as [batch, heads, seq, head_dim]; K straight to [batch, heads, head_dim, seq] for Q @ K^T.
        helper.make_node("Transpose", ["q_split"], ["q_heads"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_split"], ["k_heads_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_split"], ["v_heads"], perm=[0, 2, 1, 3]),
        # The [batch, heads, seq, seq] scores are the point: memory grows with batch x heads x length^2.
        helper.make_node("MatMul", ["q_heads", "k_heads_t"], ["scores_raw"]),
        helper.make_node("Div", ["scores_raw", "scale"], ["scores"]),
        # Mask bias 0 for real keys, -1e4 for padding keys (as HF BERT): pads get exactly zero weight.
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["mask_f", "one_f"], ["mask_off"]),
        helper.make_node("Mul", ["mask_off", "mask_neg"], ["mask_bias2"]),
        helper.make_node("Unsqueeze", ["mask_bias2", "key_axes"], ["mask_bias"]),
        helper.make_node("Add", ["scores", "mask_bias"], ["scores_masked"]),
        helper.make_node("Softmax", ["scores_masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_heads"], ["context_heads"]),
        helper.make_node("Transpose", ["context_heads"], ["context_split"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_split", "merge_shape"], ["context"]),
        # The residual keeps each token's own identity next to what it attended to.
        helper.make_node("Add", ["x", "context"], ["mixed"]),
        *_output_nodes("mixed"),
    ]
    _save_model(out_dir, nodes, inputs, inits, hidden, "tiny_attention_encoder")
    tok.save(str(out_dir / TOKENIZER_FILE))


BGE_FIELDS: Mapping[str, Any] = MappingProxyType({
    "name": "Tiny BGE-like encoder", "family": "bge", "dimension": 32, "max_length": 512,
    "pooling": "cls", "normalize": True, "padding_side": "right",
})
E5_FIELDS: Mapping[str, Any] = MappingProxyType({
    "name": "Tiny E5-like encoder", "family": "e5", "dimension": 32, "max_length": 512,
    "pooling": "mean", "normalize": True, "padding_side": "right",
    "prompts": MappingProxyType({"query": "query: ", "passage": "passage: "}),
})
QWEN3_FIELDS: Mapping[str, Any] = MappingProxyType({
    "name": "Tiny Qwen3-like decoder", "family": "qwen3", "dimension": 48, "max_length": 512,
    "pooling": "last_token", "normalize": True, "padding_side": "left",
    "prompts": MappingProxyType({
        "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
    }),
    "matryoshka_dimensions": (16, 32),
})
ATTENTION_FIELDS: Mapping[str, Any] = MappingProxyType({
    "name": "Tiny attention encoder", "family": "bge", "dimension": 64, "max_length": 2048,
    "pooling": "cls", "normalize": True, "padding_side": "right",
})

# TOML basic strings may not hold raw control characters, quotes or backslashes.
_TOML_ESCAPES = {code: f"\\u{code:04X}" for code in [*range(0x20), 0x7F]} | str.maketrans(
    {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
)


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    return '"' + text.translate(_TOML_ESCAPES) + '"'


def _toml_key(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a manifest")


def write_manifest(
    catalog: Path, model_id: str, model_dir: Path, golden: Path | None = None, min_cosine: float = 0.999,
    **fields: Any,
) -> Path:
    """Write <catalog>/<model_id>.toml pointing at model_dir's files (and a [golden] table for ``golden``); fields
    override, None ones are left out."""
    catalog.mkdir(parents=True, exist_ok=True)
    # Relative paths exercise the manifest's "resolve against its folder" rule.
    data: dict[str, Any] = {
        "id": model_id,
        "model": os.path.relpath(model_dir / MODEL_FILE, catalog),
        "tokenizer": os.path.relpath(model_dir / TOKENIZER_FILE, catalog),
        **fields,
    }
    if golden is not None:
        data["golden"] = {"file": os.path.relpath(golden, catalog), "min_cosine": min_cosine}
    scalars = [
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, Mapping)
    ]
    tables = [
        "\n".join([f"[{_toml_key(k)}]"] + [f"{_toml_key(sk)} = {_toml_value(sv)}" for sk, sv in v.items()])
        for k, v in data.items()
        if isinstance(v, Mapping)
    ]
    path = catalog / f"{model_id}.toml"
    path.write_text("\n\n".join(["\n".join(scalars), *tables]) + "\n", encoding="utf-8")
    return path


def reference_embed(
    model_dir: Path, text: str, pooling: str, normalize: bool = True, max_length: int = 512,
    dimensions: int | None = None,
) -> np.ndarray:
    """Embed one text without padding, with plain numpy pooling: the yardstick for the daemon's batches."""
    tok = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    tok.no_padding()
    tok.enable_truncation(max_length)
    ids = np.array([tok.encode(text).ids], dtype=np.int64)
    session = ort.InferenceSession(str(model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    available = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :],
    }
    feed = {i.name: available[i.name] for i in session.get_inputs()}
    hidden = session.run(None, feed)[0][0].astype(np.float64)
    # No padding, so every position is a real token and pooling needs no mask.
    vector = {"mean": hidden.mean(axis=0), "cls": hidden[0], "last_token": hidden[-1]}[pooling]
    if normalize:
        vector = vector / np.linalg.norm(vector)
    if dimensions is not None:
        vector = vector[:dimensions]
        # Matryoshka: the cut is renormalized only when the model's vectors are normalized at all.
        if normalize:
            vector = vector / np.linalg.norm(vector)
    return vector.astype(np.float32)


# Short to long, several scripts; the last is over the tiny models' max_length so truncation is exercised.
GOLDEN_TEXTS = (
    "hi", "What is the capital of France?", "cheap hotel near the train station",
    "Der Zug nach Berlin fährt um 6:45 Uhr ab.", "¿Dónde está la estación?", "Москва — столица России.",
    "北京是中国的首都。", " ".join(_CORPUS.splitlines() * 3),
)


def write_golden(
    path: Path, model_dir: Path, pooling: str, texts: tuple[str, ...] = GOLDEN_TEXTS, max_length: int = 512
) -> Path:
    """Golden vectors for model_dir at ``path``: reference_embed's vectors and token counts of ``texts``."""
    tok = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    tok.no_padding()
    tok.enable_truncation(max_length)
    vectors = np.stack([reference_embed(model_dir, text, pooling, max_length=max_length) for text in texts])
    tokens = [len(encoding.ids) for encoding in tok.encode_batch(list(texts))]
    np.savez(path, texts=np.array(texts, dtype=np.str_), vectors=vectors, tokens=np.array(tokens, dtype=np.int32))
    return path
