"""The BLIP text decoder as an incremental step function over rows that join and leave.

Numerically this is `BlipTextLMHeadModel` (eager attention, same operation order), restructured for serving:

- rows live in a `RowCache`: request slot s owns rows [s * width, s * width + n); each row has its own length,
  its keys/values and tokens stored from column 0 (no padding in front), a mask hiding the columns past its
  length; requests join into free slots and leave without moving anyone else;
- cross-attention keys/values are computed once per image into the request's slot, not per beam and not per
  step; the rows of a slot are that image's queries, so one batched matmul attends every row to its image;
- beams are reordered by one gather over the filled columns only, into a second buffer (double buffering);
- a linear layer's weight is stored in the layout its fastest small-batch kernel reads (see `Linear`): a decode
  step's few rows are bound by reading the weights, which `F.linear` on the stored layout does at a fraction of
  the memory's speed (parity tested).

Weights use the names of `BlipTextLMHeadModel.state_dict()`, so an exported checkpoint is the decoder's own
state dict.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


DTYPES = {"float32": torch.float32, "float16": torch.float16}

# Batch invariance: a row's arithmetic must not depend on what else is in flight, so every kernel sees shapes that
# give each row the same reduction order whatever the other rows are (measured on torch's CPU kernels, tested:
# tests/unit/test_batch_invariance.py):
# - attention reads a multiple of _COLUMNS columns: the masked columns past a row's length weigh exactly 0, and
#   whole blocks of 16 zeros (AVX-512's floats per vector) leave the vectorised sums of softmax and of the
#   weighted values bit for bit as they were; any other padding changes their last bits;
# - attention to an image has at least _MIN_QUERIES queries a slot (MKL's batched matmul takes another kernel
#   below 4 rows), and a linear layer at least two rows (oneDNN's takes another kernel for one; see `Linear`).
# - torch multiplies batched matrices with fewer than _MATMUL_SMALL multiply-adds each in a loop of its own, with
#   another order than its matmul kernel's: a decoding row's single query is given enough columns to stay clear
#   of it (BLIP's heads of 64 need no more than 16; a test checkpoint's heads of 16 need 32).
_COLUMNS = 16
_MIN_QUERIES = 4
_MATMUL_SMALL = 400


@dataclass(frozen=True)
class Placement:
    """Where a decoder instance runs and in what arithmetic: its torch device, its dtype, and whether its linear
    layers are int8 (see `Int8Linear`)."""

    device: str
    dtype: torch.dtype
    int8: bool


def placement(instance_kind: str | None, device_id: int | str | None = None, dtype: str | None = None,
              quantization: str | None = None, precision: str | None = None,
              cuda_available: bool | None = None) -> Placement:
    """The placement of a decoder instance from what Triton and the model's config say: the instance's kind and
    device id (`model_instance_kind`, `model_instance_device_id`), and the config's `dtype`, `quantization` and
    `precision` parameters. `cuda_available`: whether torch sees a GPU (asked of torch when None and needed).

    Raises ValueError, with what to do instead, for what cannot run as configured: a GPU instance of an int8
    repository (int8 decoding is the CPU's, and a GPU instance would otherwise decode in another precision than
    the repository says it serves; said first, since it is the repository's fault whatever the machine); a GPU
    instance without CUDA; a dtype other than float32 and float16; float16 on the CPU.
    """
    device = "cpu"
    if instance_kind == "GPU":
        if quantization == "int8" or precision == "int8":
            raise ValueError("this repository's decoder is int8 (quantization: int8), and int8 decoding runs on the "
                             "CPU only; export the checkpoint with --precision fp16 or fp32 to serve it on GPUs, or "
                             "serve this repository with CPU instances")
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            raise ValueError(f"a GPU instance needs a CUDA build of torch and a visible GPU; torch {torch.__version__} "
                             "sees none")
        device = f"cuda:{int(device_id or 0)}"
    name = dtype or "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    if DTYPES[name] is torch.float16 and device == "cpu":
        raise ValueError("dtype float16 runs on GPUs only; a CPU instance decodes in float32 (or int8)")
    return Placement(device, DTYPES[name], quantization == "int8")


def _has_fp32_precision_api() -> bool:
    """torch 2.9 and later: `torch.backends.*.fp32_precision` (the allow_tf32 flags are deprecated there, and
    reading one after the new API set the flags raises); torch 2.7 (NVIDIA's containers) has only the old flags."""
    return hasattr(torch.backends, "fp32_precision")


def exact_float32(device: str | torch.device, dtype: torch.dtype) -> bool:
    """On a CUDA device in float32, switch TF32 off for matmuls and cuDNN, so that float32 is float32: TF32 rounds
    every matmul's inputs to 10 bits of mantissa, and captions would then differ from transformers' float32 ones
    on near-ties. torch's defaults leave cuDNN's TF32 on and cuBLAS's off, but any library loaded into the process
    may turn them on. The settings are the process's (each Triton model instance is a process of its own).
    Returns whether anything was set (nothing for the CPU or float16)."""
    if torch.device(device).type != "cuda" or dtype != torch.float32:
        return False
    if _has_fp32_precision_api():
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    return True


@dataclass(frozen=True)
class DecoderConfig:
    """What the decoder needs from the checkpoint's `text_config`, token ids included."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float
    hidden_act: str
    encoder_hidden_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    @classmethod
    def from_json(cls, path: str | Path) -> DecoderConfig:
        return cls(**json.loads(Path(path).read_text()))

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Linear:
    """y = x @ weight.T + bias, with the weight laid out for the kernel that reads it fastest at a decode step's few
    rows.

    On the CPU in float32: oneDNN's linear on the weight reordered once into its blocked layout (what torch's CPU
    inductor uses for frozen linears); measured for the BLIP-large decoder's step weights at 3 rows, 2 threads: 58 ms
    against 108 ms for `x @ w_t` and 142 ms for `F.linear`, and at 24 rows 104 ms against 197 and 238 (parity
    tested). Elsewhere, and for a layer that sees hundreds of rows at once (`few_rows=False`: the cross-attention
    keys/values of an image's tokens, 17 ms for BLIP-large's 577 tokens a layer against 21 ms packed): `x @ w_t`,
    the weight transposed and contiguous, which small batches also read in order.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, few_rows: bool = True):
        self.b = bias
        self.nbytes = weight.numel() * weight.element_size() + bias.numel() * bias.element_size()
        self.packed = few_rows and _packable(weight)
        # The reorder copies the weight: the stored layout is not kept besides it.
        self.w = torch.ops.mkldnn._reorder_linear_weight(weight, 3) if self.packed else weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            if x.numel() == x.shape[-1]:  # one row: padded to two (see the class's docstring)
                return torch.ops.mkldnn._linear_pointwise(x.expand(*x.shape[:-2], 2, x.shape[-1]), self.w, self.b,
                                                          "none", [], "")[..., :1, :]
            return torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "none", [], "")
        shape = x.shape
        y = torch.addmm(self.b, x.reshape(-1, shape[-1]), self.w)
        return y.view(*shape[:-1], y.shape[-1])

    @property
    def weight(self) -> torch.Tensor:
        """The weight in the stored layout [out_features, in_features] (a copy)."""
        return self.w.to_dense() if self.packed else self.w.t().contiguous()


def _packable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Int8Linear:
    """A linear layer in int8: weights quantised per output channel ahead of time, each row of activations
    quantised with its own scale at run time (symmetric, max |x| -> 127), multiplied in integers, rescaled.

    Per row, not per tensor: with one scale for all the rows of a step (torch's dynamically quantised Linear),
    a request's arithmetic depended on the other requests in the step, and its captions on the traffic. Here
    the integer product is exact whatever kernel or batch computes it, so a row's output depends on that row
    alone. A quarter of the float32 weight bytes to read; measured on BLIP-large's step weights, 2 threads:
    14 ms at 3 rows and 27 ms at 24, against 25 and 50 in float32 (torch's per-tensor Linear: 8 and 21).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        weight = weight.float()
        self.scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        # [in, out] as a transposed view of [out, in]: the layout torch._int_mm reads fastest here.
        self.qweight_t = torch.round(weight / self.scales[:, None]).clamp(-127, 127).to(torch.int8).t()
        self.b = bias.float()
        self.nbytes = weight.numel() + bias.numel() * 4 + self.scales.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        row_scales = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        quantised = torch.round(x / row_scales).to(torch.int8)
        y = torch._int_mm(quantised, self.qweight_t).float() * (row_scales * self.scales) + self.b
        return y.view(*shape[:-1], y.shape[-1])


@dataclass
class _Layer:
    qkv: Linear
    self_out: Linear
    self_ln: tuple[torch.Tensor, torch.Tensor]
    cross_q: Linear
    cross_kv: Linear
    cross_out: Linear
    cross_ln: tuple[torch.Tensor, torch.Tensor]
    ffn_in: Linear
    ffn_out: Linear
    ffn_ln: tuple[torch.Tensor, torch.Tensor]


def _doubled(need: int, have: int) -> int:
    """A capacity that holds `need`: `have` if it does, else at least twice `have` (growth by doubling)."""
    return max(need, 2 * have) if need > have else have


class RowCache:
    """Self-attention keys/values and tokens of every row, plus each slot's cross-attention keys/values.

    kv: [columns, 2 * layers, rows, heads, head], columns outermost so that the filled part of every row,
    kv[:filled], is one contiguous block that a beam reorder gathers in one pass; tokens: [rows, columns]
    (`vocab_size` where empty); lengths: [rows], the columns each row has filled; next_tokens: [rows], the
    token each row feeds at the next step. image_keys: one [slots, heads, head, L] per layer, stored transposed
    (the products read them in the layout they are stored in: BLIP-large's keys of 8 slots 1.42 -> 1.12 ms a layer
    against a transposed view); image_values: one [slots, heads, L, head] per layer. Rows of
    slot s are [s * width, (s + 1) * width). Everything grows by doubling when needed and never shrinks, the
    columns too, up to `max_columns`: sized for the longest sequence among the requests seen, not for the longest
    any request may ask for (BLIP-large, 3 beams of 4 + 20 tokens, at the 128-column limit: 19 MB of keys/values
    per row with the spare buffer; at 24 columns: 3.5 MB).
    """

    def __init__(self, config: DecoderConfig, device, dtype, max_columns: int):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.max_columns = max_columns
        self.columns = 0  # capacity, in columns
        self.width = 1
        self.slots = 0  # capacity, in slots
        layers, heads, size = config.num_hidden_layers, config.num_attention_heads, config.head_size
        self.kv = torch.empty((0, 2 * layers, 0, heads, size), device=device, dtype=dtype)
        self._spare = None
        self.tokens = torch.empty((0, 0), device=device, dtype=torch.long)
        self.lengths = torch.zeros(0, device=device, dtype=torch.long)
        self.next_tokens = torch.zeros(0, device=device, dtype=torch.long)
        self.image_keys: list[torch.Tensor] = []
        self.image_values: list[torch.Tensor] = []
        self.image_tokens = 0

    @property
    def rows(self) -> int:
        return self.slots * self.width

    def ensure(self, slots: int, width: int, image_tokens: int, columns: int) -> None:
        """Room for `slots` slots of `width` rows, images of `image_tokens` tokens and sequences of `columns`
        tokens; rows keep their slot and what they hold."""
        if columns > self.max_columns:
            raise ValueError(f"sequences of {columns} tokens do not fit the cache's {self.max_columns} columns")
        if (slots <= self.slots and width <= self.width and image_tokens <= self.image_tokens
                and columns <= self.columns):
            return
        new_slots = max(_doubled(slots, self.slots), 1)
        new_width = max(width, self.width)
        # A multiple of _COLUMNS, which attention reads (past max_columns when that is not one).
        new_columns = _padded_columns(min(self.max_columns, _doubled(columns, self.columns)), self.config.head_size)
        old_rows = torch.arange(self.rows, device=self.device)
        new_rows = (old_rows // self.width) * new_width + old_rows % self.width
        shape = list(self.kv.shape)
        shape[0], shape[2] = new_columns, new_slots * new_width
        # Zeros, not empty: attention reads columns past a row's length (masked to a weight of exactly 0), and
        # 0 * a NaN left in uninitialised memory would still be NaN.
        kv = torch.zeros(shape, device=self.device, dtype=self.dtype)
        kv[: self.columns, :, new_rows] = self.kv
        tokens = torch.full((shape[2], new_columns), self.config.vocab_size, device=self.device, dtype=torch.long)
        tokens[new_rows, : self.columns] = self.tokens
        lengths = torch.zeros(shape[2], device=self.device, dtype=torch.long)
        lengths[new_rows] = self.lengths
        next_tokens = torch.full((shape[2],), self.config.pad_token_id, device=self.device, dtype=torch.long)
        next_tokens[new_rows] = self.next_tokens
        self.kv, self.tokens, self.lengths, self.next_tokens, self._spare = kv, tokens, lengths, next_tokens, None
        image_tokens = max(image_tokens, self.image_tokens)
        heads, size = self.config.num_attention_heads, self.config.head_size
        for store, transposed in ((self.image_keys, True), (self.image_values, False)):
            for i in range(self.config.num_hidden_layers):
                shape = (new_slots, heads, size, image_tokens) if transposed else (new_slots, heads, image_tokens, size)
                grown = torch.zeros(shape, device=self.device, dtype=self.dtype)
                if i < len(store):
                    grown[tuple(slice(0, n) for n in store[i].shape)] = store[i]  # the old corner, either layout
                    store[i] = grown
                else:
                    store.append(grown)
        self.slots, self.width, self.image_tokens, self.columns = new_slots, new_width, image_tokens, new_columns

    def clear(self, rows: torch.Tensor) -> None:
        """Rows whose request left: empty, so that a request taking their slot sees nothing of the last one's."""
        self.lengths[rows] = 0
        self.tokens[rows] = self.config.vocab_size
        self.next_tokens[rows] = self.config.pad_token_id

    def reorder(self, order: torch.Tensor, columns: int) -> None:
        """Row i of the first len(order) rows becomes old row order[i] (beams), over the filled `columns` only:
        one gather into the spare buffer, which then becomes the cache."""
        if self._spare is None or self._spare.shape != self.kv.shape:
            self._spare = torch.zeros_like(self.kv)  # zeros for the reason given in ensure()
        torch.index_select(self.kv[:columns, :, : len(order)], 2, order, out=self._spare[:columns, :, : len(order)])
        self.kv, self._spare = self._spare, self.kv
        self.tokens[: len(order)] = self.tokens[order]


class BlipTextDecoder:
    """Runs the BLIP text decoder one position at a time for many rows at once."""

    def __init__(self, config: DecoderConfig, weights: dict[str, torch.Tensor], device="cpu", dtype=torch.float32,
                 int8: bool = False):
        """`int8`: linear layers with int8 weights (CPU; see Int8Linear); embeddings and norms stay `dtype`."""
        if int8 and (torch.device(device).type != "cpu" or dtype != torch.float32):
            raise ValueError("int8 linear layers run on the CPU, with float32 activations")
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {config.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
        self._act = _ACTIVATIONS[config.hidden_act]

        def w(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(f"decoder weights lack {name!r}")
            # A copy of its own: tensors loaded from a file may be views of one buffer holding every weight, which
            # keeping any one of them would keep in memory whole.
            return weights[name].to(device=self.device, dtype=dtype, copy=True).contiguous()

        def linear(*prefixes: str, few_rows: bool = True) -> Linear | Int8Linear:
            weight = torch.cat([w(p + ".weight") for p in prefixes])
            bias = torch.cat([w(p + ".bias") for p in prefixes])
            return Int8Linear(weight, bias) if int8 else Linear(weight, bias, few_rows)

        def ln(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
            return w(prefix + ".weight"), w(prefix + ".bias")

        emb = "bert.embeddings."
        self.word_embeddings = w(emb + "word_embeddings.weight")
        self.position_embeddings = w(emb + "position_embeddings.weight")
        self.embedding_ln = ln(emb + "LayerNorm")
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"bert.encoder.layer.{i}."
            s, c = p + "attention.", p + "crossattention."
            self.layers.append(_Layer(
                qkv=linear(s + "self.query", s + "self.key", s + "self.value"),
                self_out=linear(s + "output.dense"),
                self_ln=ln(s + "output.LayerNorm"),
                cross_q=linear(c + "self.query"),
                cross_kv=linear(c + "self.key", c + "self.value", few_rows=False),  # once per image
                cross_out=linear(c + "output.dense"),
                cross_ln=ln(c + "output.LayerNorm"),
                ffn_in=linear(p + "intermediate.dense"),
                ffn_out=linear(p + "output.dense"),
                ffn_ln=ln(p + "output.LayerNorm"),
            ))
        head = "cls.predictions."
        self.head = linear(head + "transform.dense")
        self.head_ln = ln(head + "transform.LayerNorm")
        bias = head + "decoder.bias" if head + "decoder.bias" in weights else head + "bias"
        self.lm = (Int8Linear if int8 else Linear)(w(head + "decoder.weight"), w(bias))

    @classmethod
    def from_directory(cls, directory: str | Path, device="cpu", dtype=torch.float32,
                       int8: bool = False) -> BlipTextDecoder:
        from safetensors.torch import load_file

        directory = Path(directory)
        config = DecoderConfig.from_json(directory / "decoder_config.json")
        return cls(config, load_file(str(directory / "decoder.safetensors")), device=device, dtype=dtype, int8=int8)

    def step_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: every linear layer but the cross-attention key/value
        projections, which run once per image."""
        per_step = [linear for layer in self.layers
                    for linear in (layer.qkv, layer.self_out, layer.cross_q, layer.cross_out, layer.ffn_in,
                                   layer.ffn_out)]
        return sum(linear.nbytes for linear in per_step + [self.head, self.lm])

    def new_cache(self, max_columns: int) -> RowCache:
        return RowCache(self.config, self.device, self.dtype, max_columns)

    # -- building blocks -------------------------------------------------------------------------------------

    def _layer_norm(self, x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), params[0], params[1], self.config.layer_norm_eps)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] -> [B, heads, T, head]"""
        return x.view(x.shape[0], x.shape[1], self.config.num_attention_heads, self.config.head_size).transpose(1, 2)

    @staticmethod
    def _merge_heads(x: torch.Tensor) -> torch.Tensor:
        """[B, heads, T, head] -> [B, T, hidden]"""
        x = x.permute(0, 2, 1, 3).contiguous()
        return x.view(x.shape[0], x.shape[1], -1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                keys_transposed: bool = False) -> torch.Tensor:
        scores = torch.matmul(q, k if keys_transposed else k.transpose(-1, -2)) / math.sqrt(self.config.head_size)
        if mask is not None:
            scores = scores + mask
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    def store_images(self, cache: RowCache, slots: torch.Tensor, image_embeds: torch.Tensor) -> None:
        """Cross-attention keys/values of [N, L, encoder_hidden] image embeddings into `slots`, once per image."""
        image_embeds = image_embeds.to(device=self.device, dtype=self.dtype)
        tokens = image_embeds.shape[1]
        for i, layer in enumerate(self.layers):
            k, v = layer.cross_kv(image_embeds).split(self.config.hidden_size, dim=-1)
            cache.image_keys[i][slots, :, :, :tokens] = self._split_heads(k).transpose(-1, -2)
            cache.image_values[i][slots, :, :tokens] = self._split_heads(v)

    def _cross_attend(self, q: torch.Tensor, cache: RowCache, layer: int, slots: torch.Tensor | None,
                      image_tokens: int) -> torch.Tensor:
        """q [S, heads, Q, head]: the Q queries of each of S slots attend to the slot's image (slots None: the
        first S slots). Fewer than `_MIN_QUERIES` queries a slot are padded (see `_MIN_QUERIES`)."""
        count, queries = q.shape[0], q.shape[2]
        keys, values = cache.image_keys[layer], cache.image_values[layer]
        if slots is None:
            k, v = keys[:count, :, :, :image_tokens], values[:count, :, :image_tokens]
        else:
            k, v = keys[slots, :, :, :image_tokens], values[slots, :, :image_tokens]
        if queries < _MIN_QUERIES:
            q = F.pad(q, (0, 0, 0, _MIN_QUERIES - queries))
        return self._attend(q, k, v, None, keys_transposed=True)[:, :, :queries]

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        last = self._layer_norm(self._act(self.head(last)), self.head_ln)
        return self.lm(last).float()  # selection runs in fp32 whatever the weights' dtype

    # -- the forward pass ------------------------------------------------------------------------------------

    def step(self, cache: RowCache, rows: int, slots: torch.Tensor, prompts: list[list[int]]) -> torch.Tensor:
        """One forward over the weights for everything in flight: each of the first `rows` rows feeds its next
        token at its length (rows without a request compute garbage that nobody reads), and each joining
        request feeds its prompt into the first row of its slot (`slots`, whose images are stored). Returns
        [rows + len(prompts), vocab]: each row's logits, then those of each prompt's last token.

        Decoding rows and prompt tokens share every linear layer (the weights are read once a step); each part
        attends with its own shapes, padded so that no row's arithmetic depends on the others (see `_COLUMNS`).
        """
        d = self.device
        lengths, tokens = cache.lengths[:rows], cache.next_tokens[:rows]
        count = len(prompts)
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=d, dtype=torch.long)
        prompt_tokens = torch.tensor([t for p in prompts for t in p], device=d, dtype=torch.long)
        prompt_positions = torch.cat([torch.arange(len(p), device=d) for p in prompts]) if count else prompt_tokens
        first_rows = slots * cache.width
        token_rows = first_rows.repeat_interleave(prompt_lengths) if count else prompt_tokens
        x = torch.cat([F.embedding(tokens, self.word_embeddings) + F.embedding(lengths, self.position_embeddings),
                       F.embedding(prompt_tokens, self.word_embeddings)
                       + F.embedding(prompt_positions, self.position_embeddings)])
        x = self._layer_norm(x, self.embedding_ln)
        minimum = torch.finfo(self.dtype).min
        heads, size = self.config.num_attention_heads, self.config.head_size

        # Decoding rows: one query each, over its row's columns.
        columns = _padded_columns(int(lengths.max()) + 1, size) if rows else 0
        decode_mask = torch.zeros((rows, columns), device=d, dtype=self.dtype)
        decode_mask.masked_fill_(torch.arange(columns, device=d)[None, :] > lengths[:, None], minimum)
        decode_mask = decode_mask[:, None, None, :]
        row_index = torch.arange(rows, device=d)
        # Prompts: a [count, width] grid of queries (prompt i's tokens at the start of row i), causal over the
        # columns of its slot's first row.
        width = max([_MIN_QUERIES] + [len(p) for p in prompts])
        prompt_columns = _padded_columns(width)
        grid = torch.arange(count, device=d).repeat_interleave(prompt_lengths) * width + prompt_positions
        prompt_mask = torch.full((width, prompt_columns), minimum, device=d, dtype=self.dtype)
        prompt_mask = prompt_mask.triu(1)[None, None].expand(count, 1, width, prompt_columns)

        def to_grid(t: torch.Tensor) -> torch.Tensor:
            """[tokens, hidden] of the prompts -> [count, heads, width, head] (padding positions zero)."""
            out = torch.zeros((count * width, t.shape[-1]), device=d, dtype=t.dtype)
            out[grid] = t
            return out.view(count, width, heads, size).transpose(1, 2)

        def from_grid(t: torch.Tensor) -> torch.Tensor:
            return self._merge_heads(t).reshape(count * width, -1)[grid]

        def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return t[:rows], t[rows:]

        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x).split(self.config.hidden_size, dim=-1)
            (q_rows, q_prompts), (k_rows, k_prompts), (v_rows, v_prompts) = split(q), split(k), split(v)
            context = []
            if rows:
                cache.kv[lengths, 2 * i, row_index] = k_rows.view(rows, heads, size)
                cache.kv[lengths, 2 * i + 1, row_index] = v_rows.view(rows, heads, size)
                keys = cache.kv[:columns, 2 * i, :rows].permute(1, 2, 0, 3)
                values = cache.kv[:columns, 2 * i + 1, :rows].permute(1, 2, 0, 3)
                out = self._attend(q_rows.view(rows, 1, heads, size).transpose(1, 2), keys, values, decode_mask)
                context.append(self._merge_heads(out).view(rows, -1))
            if count:
                cache.kv[prompt_positions, 2 * i, token_rows] = k_prompts.view(-1, heads, size)
                cache.kv[prompt_positions, 2 * i + 1, token_rows] = v_prompts.view(-1, heads, size)
                keys = cache.kv[:prompt_columns, 2 * i, first_rows].permute(1, 2, 0, 3)
                values = cache.kv[:prompt_columns, 2 * i + 1, first_rows].permute(1, 2, 0, 3)
                context.append(from_grid(self._attend(to_grid(q_prompts), keys, values, prompt_mask)))
            x = self._layer_norm(layer.self_out(torch.cat(context)) + x, layer.self_ln)
            q_rows, q_prompts = split(layer.cross_q(x))
            context = []
            if rows:
                grouped = q_rows.view(rows // cache.width, cache.width, heads, size).transpose(1, 2)
                out = self._cross_attend(grouped, cache, i, None, cache.image_tokens)
                context.append(self._merge_heads(out).reshape(rows, -1))
            if count:
                context.append(from_grid(self._cross_attend(to_grid(q_prompts), cache, i, slots, cache.image_tokens)))
            x = self._layer_norm(layer.cross_out(torch.cat(context)) + x, layer.cross_ln)
            hidden = self._act(layer.ffn_in(x))
            x = self._layer_norm(layer.ffn_out(hidden) + x, layer.ffn_ln)

        if rows:
            cache.tokens[row_index, lengths] = tokens
            cache.lengths[:rows] += 1
        if count:
            cache.tokens[token_rows, prompt_positions] = prompt_tokens
            cache.lengths[first_rows] = prompt_lengths
        last = torch.cat([row_index, rows + torch.cumsum(prompt_lengths, 0) - 1])
        return self._logits(x[last])


def _padded_columns(columns: int, head_size: int = 0) -> int:
    """Attention over a row's first `columns` columns reads a multiple of `_COLUMNS` of them, and enough that a
    single query's products take torch's matmul kernel (see `_MATMUL_SMALL`)."""
    columns = max(columns, -(-_MATMUL_SMALL // head_size) if head_size else 0)
    return -(-columns // _COLUMNS) * _COLUMNS
