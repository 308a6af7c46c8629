"""A request's captions and scores do not depend on what shares its step or its encoder run: bit for bit, in fp32
and int8, on the demo model and on random checkpoints (whose near-ties show any coupling). The decoder in fp16, the
GPU's precision, is held to the same on the CPU (the same code; CUDA's kernels themselves are not covered here).

Each image is captioned alone, then among seven others with other prompts and options in one step (the same
`generate` call, so one `DecodeLoop` step admits them all), and again joining a loop whose requests are mid-way;
its tokens and scores must be equal, not close. The encoders are compared the same way: one image per run
against eight in one run.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from blip_text_decoder import BlipTextDecoder, DecoderConfig, Int8Linear
from caption_generation import DecodeLoop, generate
from generation_options import GenerationOptions

from blip_server.checkpoint import decoder_config
from blip_server.export import ExportOptions, export_checkpoint
from blip_server.model_store import demo_checkpoint
from support import reference

# Eight requests that differ in everything a step shares: prompt length, beams, rows, strategy, length.
OPTIONS = [
    GenerationOptions(),
    GenerationOptions(num_beams=1, min_new_tokens=0),
    GenerationOptions(num_beams=5, num_return_sequences=2),
    GenerationOptions(num_beams=3, repetition_penalty=1.3),
    GenerationOptions(num_beams=1, do_sample=True, seed=3),
    GenerationOptions(num_beams=4, max_new_tokens=30, min_new_tokens=0),
    GenerationOptions(num_beams=2, no_repeat_ngram_size=2),
    GenerationOptions(num_beams=3, min_new_tokens=12, max_new_tokens=12),
]
PROMPTED = (1, 3, 6, 7)  # the others start from BOS alone


@pytest.fixture(scope="module", params=["demo", "standard", "unusual"])
def model(request, checkpoints):
    path = str(demo_checkpoint() if request.param == "demo" else checkpoints[request.param])
    model, processor = reference.load(path)
    size = processor.image_processor.size
    pixels = torch.randn(8, 3, size["height"], size["width"], generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        embeds = model.vision_model(pixel_values=pixels).last_hidden_state
    bos = model.config.text_config.bos_token_id
    prompt = [bos] + processor.tokenizer("a picture of")["input_ids"][1:-1]
    prompts = [prompt if i in PROMPTED else [bos] for i in range(8)]
    return model, embeds, prompts


PRECISIONS = pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])


def _decoder(model, precision: str) -> BlipTextDecoder:
    config = DecoderConfig(**decoder_config(model.config.text_config))
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return BlipTextDecoder(config, model.text_decoder.state_dict(), dtype=dtype, int8=precision == "int8")


def _outcome(hypotheses) -> list[tuple[list[int], float]]:
    return [(h.tokens, h.score) for h in hypotheses]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@PRECISIONS
def test_a_request_decodes_bit_for_bit_alike_alone_and_among_seven_others_in_one_step(model, precision, threads):
    model, embeds, prompts = model
    decoder = _decoder(model, precision)
    together = generate(decoder, embeds, prompts, OPTIONS)
    for i in range(8):
        alone = generate(decoder, embeds[i : i + 1], [prompts[i]], [OPTIONS[i]])[0]
        assert _outcome(together[i]) == _outcome(alone), (i, OPTIONS[i])


@PRECISIONS
def test_a_request_joining_a_loop_mid_way_decodes_bit_for_bit_as_alone(model, precision):
    """Others are several steps into their captions (longer rows: attention reads more columns) when it joins."""
    model, embeds, prompts = model
    decoder = _decoder(model, precision)
    loop = DecodeLoop(decoder, columns=64)
    for i in (5, 7, 2):
        loop.add(i, embeds[i], prompts[i], OPTIONS[i])
    results = {}
    for _ in range(7):
        results.update(loop.step())
    for i in (0, 1, 4):
        loop.add(i, embeds[i], prompts[i], OPTIONS[i])
    while len(loop):
        results.update(loop.step())
    for i in (0, 1, 4, 5, 7, 2):
        alone = generate(decoder, embeds[i : i + 1], [prompts[i]], [OPTIONS[i]])[0]
        assert _outcome(results[i]) == _outcome(alone), (i, OPTIONS[i])


def test_int8_linear_rows_are_exact_integer_products_of_their_own_scale():
    """Each row's output is (its int8 row . the int8 weights) * its scale * the channel's scale + bias, computed
    here in int64 independently of the layer: nothing of the other rows enters it."""
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(48, 96, generator=generator), torch.randn(48, generator=generator)
    x = torch.randn(7, 96, generator=generator) * torch.logspace(-3, 3, 7)[:, None]  # rows of very different ranges
    layer = Int8Linear(weight, bias)
    weight_scale = weight.abs().amax(dim=1) / 127
    weight_q = torch.round(weight / weight_scale[:, None]).to(torch.int64)
    for r in range(7):
        row_scale = x[r].abs().max() / 127
        row_q = torch.round(x[r] / row_scale).to(torch.int64)
        expected = (row_q @ weight_q.T).to(torch.float32) * (row_scale * weight_scale) + bias
        assert torch.equal(layer(x)[r], expected), r
        assert torch.equal(layer(x[r : r + 1])[0], expected), r


@pytest.fixture(scope="module", params=["fp32", "int8"])
def encoder(request, checkpoints, tmp_path_factory):
    """An exported vision encoder of the demo model and of a random checkpoint, in this precision."""
    sessions = {}
    for name, path in (("demo", demo_checkpoint()), ("standard", checkpoints["standard"])):
        repository = tmp_path_factory.mktemp(f"{name}-{request.param}")
        export_checkpoint(path, repository, ExportOptions(precision=request.param))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        sessions[name] = ort.InferenceSession(str(repository / "vision_encoder" / "1" / "model.onnx"), options,
                                              providers=["CPUExecutionProvider"])
    return sessions


def test_an_image_encodes_bit_for_bit_alike_alone_and_among_seven_others_in_one_run(encoder):
    for name, session in encoder.items():
        feed = session.get_inputs()[0]
        pixels = np.random.default_rng(4).standard_normal([8, *feed.shape[1:]]).astype(np.float32)
        together = session.run(None, {feed.name: pixels})[0]
        for i in range(8):
            alone = session.run(None, {feed.name: pixels[i : i + 1]})[0][0]
            assert np.array_equal(alone, together[i]), (name, i)
