"""Several models side by side in one `blip-serve` (issue 23): the demo checkpoint and a random one, each request
answered by the model it names with transformers' captions for that model, ListModels, NOT_FOUND for a name not
served, the default for a request that names none, the model in the metrics, and `blip-caption --model`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from blip_client import CaptionClient, NotFoundError
from blip_server.model_store import demo_checkpoint
from support import images, reference
from support.serve import ServeProcess
from support.triton_requests import caption_inputs, captions

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-shapes.jpg"


def test_two_checkpoints_are_served_side_by_side_each_request_by_the_model_it_names(checkpoints, tmp_path):
    demo, random = demo_checkpoint(), checkpoints["standard"]
    pictures = {"example": EXAMPLE.read_bytes(), "random": images.kinds(seed=43)["jpeg"]}
    # The demo named explicitly, the random checkpoint by its folder ("standard").
    serve = ServeProcess("--model", f"demo={demo}", "--model", str(random), cache=tmp_path / "cache")
    try:
        ready = serve.wait_ready()
        assert "models demo = " in ready and "; standard = " in ready
        with CaptionClient(serve.address, timeout=120) as client:
            listed = client.list_models()
            assert [(m.name, m.is_default, m.triton_ensemble, m.triton_cached_ensemble, m.precision)
                    for m in listed] == [
                ("demo", True, "blip_caption", "blip_caption_cached", "fp32"),
                ("standard", False, "standard.blip_caption", "standard.blip_caption_cached", "fp32")]
            assert [Path(m.source_checkpoint) for m in listed] == [demo.resolve(), random.resolve()]
            for name, checkpoint in (("demo", demo), ("standard", random)):
                assert client.model_info(model=name).model == name
                for kind, data in pictures.items():
                    result = client.caption(data, model=name)
                    expected = reference.caption(str(checkpoint), data)
                    assert result.model == name, kind
                    assert [c.text for c in result.captions] == expected[0], (name, kind)
                    assert [c.score for c in result.captions] == pytest.approx(expected[1], abs=1e-4), (name, kind)
            default = client.caption(pictures["example"])  # no model named: the default, the first
            assert (default.model, default.text) == ("demo", reference.caption(str(demo), pictures["example"])[0][0])
            assert client.model_info().model == "demo"
            assert client.model_info(model="standard").image_height == 384
            with pytest.raises(NotFoundError, match="no model named 'missing' is served"):
                client.caption(pictures["example"], model="missing")
            with pytest.raises(NotFoundError):
                client.model_info(model="missing")
        metrics = serve.metrics()
        calls = "blip_gateway_requests_total"
        assert metrics[(calls, (("code", "OK"), ("method", "Caption"), ("model", "standard")))] == 2
        assert metrics[(calls, (("code", "OK"), ("method", "Caption"), ("model", "demo")))] == 3
        assert metrics[(calls, (("code", "NOT_FOUND"), ("method", "Caption"), ("model", "unknown")))] == 1
        # Triton-native clients call each model's ensemble by the name ListModels gives.
        triton = grpcclient.InferenceServerClient(serve.triton_address)
        texts, _ = captions(triton.infer("standard.blip_caption", caption_inputs(pictures["random"])))[0]
        assert texts == reference.caption(str(random), pictures["random"])[0]
        # blip-caption --model NAME
        cli = Path(sys.executable).parent / "blip-caption"
        answer = subprocess.run([str(cli), "--server", serve.address, "--model", "standard", "--json", str(EXAMPLE)],
                                capture_output=True, text=True, timeout=120)
        assert answer.returncode == 0, answer.stderr
        line = json.loads(answer.stdout)
        assert line["captions"][0]["text"] == reference.caption(str(random), pictures["example"])[0][0]
    except BaseException:
        print(serve.log()[-8000:], "\n--- tritonserver ---\n", serve.triton_log_tail())  # in the failure's report
        raise
    finally:
        code, log = serve.stop()
    assert code == 0, log


def test_two_models_may_not_share_a_name(tmp_path):
    process = subprocess.run([ServeProcess.COMMAND, "--model", f"a={tmp_path}", "--model", f"a={tmp_path}",
                              "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert process.returncode == 2
    assert "two --model arguments are named 'a'" in process.stderr and "Traceback" not in process.stderr
