"""The BLIP text decoder as an incremental step function.

Numerically this is `BlipTextLMHeadModel` (eager attention, same operation order), restructured for serving:

- cross-attention keys/values are computed once per image, not per beam and not per step; the beams of an
  image are its queries, so one matmul attends all of them to the image;
- self-attention keys/values live in one preallocated cache tensor that is reordered between beams with a
  single `index_select` into a second buffer (double buffering: no allocation per step);
- rows of different requests are decoded together; prompts of different lengths are left-padded and masked.

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
    def from_json(cls, path: str | Path) -> "DecoderConfig":
        return cls(**json.loads(Path(path).read_text()))

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class _Layer:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    self_out_w: torch.Tensor
    self_out_b: torch.Tensor
    self_ln: tuple[torch.Tensor, torch.Tensor]
    cross_q_w: torch.Tensor
    cross_q_b: torch.Tensor
    cross_kv_w: torch.Tensor
    cross_kv_b: torch.Tensor
    cross_out_w: torch.Tensor
    cross_out_b: torch.Tensor
    cross_ln: tuple[torch.Tensor, torch.Tensor]
    ffn_in_w: torch.Tensor
    ffn_in_b: torch.Tensor
    ffn_out_w: torch.Tensor
    ffn_out_b: torch.Tensor
    ffn_ln: tuple[torch.Tensor, torch.Tensor]


@dataclass
class Segment:
    """`requests` consecutive requests that own `rows_per_request` consecutive rows each."""

    first_row: int
    first_request: int
    requests: int
    rows_per_request: int

    @property
    def rows(self) -> int:
        return self.requests * self.rows_per_request


class ImageContext:
    """Cross-attention keys and values of a batch of images, one [R, heads, L, head] pair per layer."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys = keys
        self.values = values

    def select(self, requests: torch.Tensor) -> "ImageContext":
        return ImageContext(
            [k.index_select(0, requests) for k in self.keys],
            [v.index_select(0, requests) for v in self.values],
        )


class SelfAttentionCache:
    """Keys and values of every decoded position, for all layers, in one [2 * layers, rows, heads, T, head] tensor.

    `pad` holds each row's count of left-padding columns; those columns are masked out of attention.
    """

    def __init__(self, config: DecoderConfig, rows: int, capacity: int, pad: torch.Tensor, device, dtype):
        shape = (2 * config.num_hidden_layers, rows, config.num_attention_heads, capacity, config.head_size)
        self._buffers = [torch.empty(shape, device=device, dtype=dtype), None]
        self._current = 0
        self.length = 0
        self.pad = pad
        self._mask = None
        self._update_mask(dtype)

    @property
    def tensor(self) -> torch.Tensor:
        return self._buffers[self._current]

    @property
    def rows(self) -> int:
        return self.tensor.shape[1]

    def _update_mask(self, dtype) -> None:
        if int(self.pad.max()) == 0:
            self._mask = None
            return
        columns = torch.arange(self.tensor.shape[3], device=self.pad.device)
        masked = columns[None, :] < self.pad[:, None]
        mask = torch.zeros(masked.shape, dtype=dtype, device=self.pad.device)
        self._mask = mask.masked_fill_(masked, torch.finfo(dtype).min)[:, None, None, :]

    def mask(self, length: int) -> torch.Tensor | None:
        return None if self._mask is None else self._mask[..., :length]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes old row rows[i] (beam reordering), copying into the spare buffer."""
        spare = 1 - self._current
        if self._buffers[spare] is None or self._buffers[spare].shape != self.tensor.shape:
            self._buffers[spare] = torch.empty_like(self.tensor)
        torch.index_select(self.tensor, 1, rows, out=self._buffers[spare])
        self._current = spare
        if self._mask is not None:
            self._mask = self._mask.index_select(0, rows)
        self.pad = self.pad.index_select(0, rows)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (finished requests leave the batch)."""
        self._buffers = [self.tensor.index_select(1, rows), None]
        self._current = 0
        self.pad = self.pad.index_select(0, rows)
        if self._mask is not None:
            self._mask = self._mask.index_select(0, rows)


class BlipTextDecoder:
    """Runs the BLIP text decoder one position at a time for many rows at once."""

    def __init__(self, config: DecoderConfig, weights: dict[str, torch.Tensor], device="cpu", dtype=torch.float32):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {config.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
        self._act = _ACTIVATIONS[config.hidden_act]

        def w(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(f"decoder weights lack {name!r}")
            return weights[name].to(device=self.device, dtype=dtype).contiguous()

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
            self.layers.append(
                _Layer(
                    qkv_w=torch.cat([w(s + f"self.{n}.weight") for n in ("query", "key", "value")]),
                    qkv_b=torch.cat([w(s + f"self.{n}.bias") for n in ("query", "key", "value")]),
                    self_out_w=w(s + "output.dense.weight"),
                    self_out_b=w(s + "output.dense.bias"),
                    self_ln=ln(s + "output.LayerNorm"),
                    cross_q_w=w(c + "self.query.weight"),
                    cross_q_b=w(c + "self.query.bias"),
                    cross_kv_w=torch.cat([w(c + "self.key.weight"), w(c + "self.value.weight")]),
                    cross_kv_b=torch.cat([w(c + "self.key.bias"), w(c + "self.value.bias")]),
                    cross_out_w=w(c + "output.dense.weight"),
                    cross_out_b=w(c + "output.dense.bias"),
                    cross_ln=ln(c + "output.LayerNorm"),
                    ffn_in_w=w(p + "intermediate.dense.weight"),
                    ffn_in_b=w(p + "intermediate.dense.bias"),
                    ffn_out_w=w(p + "output.dense.weight"),
                    ffn_out_b=w(p + "output.dense.bias"),
                    ffn_ln=ln(p + "output.LayerNorm"),
                )
            )
        head = "cls.predictions."
        self.head_w = w(head + "transform.dense.weight")
        self.head_b = w(head + "transform.dense.bias")
        self.head_ln = ln(head + "transform.LayerNorm")
        self.lm_w = w(head + "decoder.weight")
        self.lm_b = w(head + "decoder.bias") if head + "decoder.bias" in weights else w(head + "bias")

    @classmethod
    def from_directory(cls, directory: str | Path, device="cpu", dtype=torch.float32) -> "BlipTextDecoder":
        from safetensors.torch import load_file

        directory = Path(directory)
        config = DecoderConfig.from_json(directory / "decoder_config.json")
        return cls(config, load_file(str(directory / "decoder.safetensors")), device=device, dtype=dtype)

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

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.config.head_size)
        if mask is not None:
            scores = scores + mask
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    def image_context(self, image_embeds: torch.Tensor) -> ImageContext:
        """Cross-attention keys/values of [R, L, encoder_hidden] image embeddings, once per image."""
        image_embeds = image_embeds.to(device=self.device, dtype=self.dtype)
        keys, values = [], []
        for layer in self.layers:
            kv = F.linear(image_embeds, layer.cross_kv_w, layer.cross_kv_b)
            k, v = kv.split(self.config.hidden_size, dim=-1)
            keys.append(self._split_heads(k).contiguous())
            values.append(self._split_heads(v).contiguous())
        return ImageContext(keys, values)

    def _cross_attend(self, q: torch.Tensor, images: ImageContext, layer: int, segments: list[Segment]):
        """q: [rows, heads, T, head]; each row attends to its request's image. Rows of a request are its queries."""
        heads, t, size = q.shape[1], q.shape[2], q.shape[3]
        outputs = []
        for seg in segments:
            k = images.keys[layer][seg.first_request : seg.first_request + seg.requests]
            v = images.values[layer][seg.first_request : seg.first_request + seg.requests]
            rows = q[seg.first_row : seg.first_row + seg.rows]
            n = seg.rows_per_request
            # [R*n, heads, T, head] -> [R, heads, n*T, head]: the beams of one image are extra query positions.
            grouped = rows.view(seg.requests, n, heads, t, size).transpose(1, 2).reshape(seg.requests, heads, n * t, size)
            out = self._attend(grouped, k, v, None)
            out = out.view(seg.requests, heads, n, t, size).transpose(1, 2).reshape(seg.rows, heads, t, size)
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    # -- the forward pass ------------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: SelfAttentionCache,
        images: ImageContext,
        segments: list[Segment],
    ) -> torch.Tensor:
        """Feed `tokens` [rows, T] at `positions` [rows, T]; returns the logits of the last position, [rows, vocab].

        The new keys/values are written into `cache` at columns [cache.length, cache.length + T).
        """
        rows, t = tokens.shape
        start, end = cache.length, cache.length + t
        x = F.embedding(tokens, self.word_embeddings) + F.embedding(positions, self.position_embeddings)
        x = self._layer_norm(x, self.embedding_ln)
        mask = cache.mask(end)
        if t > 1:
            causal = torch.full((t, end), torch.finfo(self.dtype).min, device=self.device, dtype=self.dtype)
            causal = torch.triu(causal, diagonal=start + 1)[None, None]
            # Left padding plus causality can mask a pad position's whole row: clamp so it stays finite.
            mask = causal if mask is None else (mask + causal).clamp_(min=torch.finfo(self.dtype).min)
        kv = cache.tensor
        for i, layer in enumerate(self.layers):
            q, k, v = F.linear(x, layer.qkv_w, layer.qkv_b).split(self.config.hidden_size, dim=-1)
            kv[2 * i, :, :, start:end] = self._split_heads(k)
            kv[2 * i + 1, :, :, start:end] = self._split_heads(v)
            context = self._attend(self._split_heads(q), kv[2 * i, :, :, :end], kv[2 * i + 1, :, :, :end], mask)
            attn = F.linear(self._merge_heads(context), layer.self_out_w, layer.self_out_b)
            x = self._layer_norm(attn + x, layer.self_ln)

            q = self._split_heads(F.linear(x, layer.cross_q_w, layer.cross_q_b))
            context = self._cross_attend(q, images, i, segments)
            attn = F.linear(self._merge_heads(context), layer.cross_out_w, layer.cross_out_b)
            x = self._layer_norm(attn + x, layer.cross_ln)

            hidden = self._act(F.linear(x, layer.ffn_in_w, layer.ffn_in_b))
            x = self._layer_norm(F.linear(hidden, layer.ffn_out_w, layer.ffn_out_b) + x, layer.ffn_ln)
        cache.length = end
        last = x[:, -1]
        last = self._layer_norm(self._act(F.linear(last, self.head_w, self.head_b)), self.head_ln)
        return F.linear(last, self.lm_w, self.lm_b).float()  # selection runs in fp32 whatever the weights' dtype
