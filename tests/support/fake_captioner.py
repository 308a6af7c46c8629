"""A Captioner whose Triton call is scripted by the prompt, for tests of the gateway without Triton."""

from __future__ import annotations

import asyncio
import time

from blip_server.ensemble import CaptionText
from blip_server.gateway import status_mapping
from blip_server.gateway.captioner import Captioner, GatewayLimits
from blip_server.gateway.messages import ModelDescription, ServedModel
from blip_server.gateway.replicas import ReplicaPool
from support import images

IMAGE = images.encode(images.rgb(8, 8), "PNG")
FAILURES = {
    "invalid": status_mapping.InvalidArgument("num_beams=0 is out of range: allowed 1 to 8"),
    "exhausted": status_mapping.ResourceExhausted("too big"),
    "unavailable": status_mapping.Unavailable("the inference server is unavailable"),
    "deadline": status_mapping.DeadlineExceeded("too slow"),
    "cancelled": status_mapping.Cancelled("cancelled"),
}


_DEFAULT_LIMITS = GatewayLimits()  # frozen: one instance can be every captioner's default


# The models the fake serves: the default, and a second one whose captions start with its name.
MODELS = [ServedModel("blip_caption", "blip_caption", "preprocess", default=True),
          ServedModel("other", "other.blip_caption", "other.preprocess")]


class FakeCaptioner(Captioner):
    """Answers from the prompt: 'fail:<kind>' raises, 'crash' raises a bug, 'slow' waits, else echoes options (and,
    for a model other than the default, its Triton ensemble first)."""

    def __init__(self, limits=_DEFAULT_LIMITS):
        super().__init__(ReplicaPool(("127.0.0.1:1",)), limits)
        self.seen = []
        self.release = asyncio.Event()

    async def ready(self):
        return True

    async def models(self, deadline=None):
        return MODELS

    async def describe(self, name="", deadline=None):
        model = await self.model(name)
        return ModelDescription(model.name, f"/checkpoint/{model.name}", 384, 384, "fp32", {"num_beams": 3},
                                {"max_num_beams": 8, "max_new_tokens": 64, "max_num_return_sequences": 8,
                                 "max_no_repeat_ngram_size": 16})

    async def _infer(self, job, deadline, triton_model="blip_caption"):
        # What was seen: the job and the seconds left to its deadline (None: none).
        self.seen.append((job, None if deadline is None else deadline - time.monotonic()))
        if job.prompt.startswith("fail:"):
            raise FAILURES[job.prompt[5:]]
        if job.prompt == "crash":
            raise RuntimeError("secret internal detail")
        if job.prompt == "slow":
            await self.release.wait()
        if job.prompt.startswith("flaky:"):  # UNAVAILABLE for the first N calls with this prompt
            self.flaky = getattr(self, "flaky", 0) + 1
            if self.flaky <= int(job.prompt[6:]):
                raise status_mapping.Unavailable("the inference server is restarting")
        if job.prompt.startswith("cancelled:"):  # CANCELLED by the server for the first N calls with this prompt
            self.cancelled = getattr(self, "cancelled", 0) + 1
            if self.cancelled <= int(job.prompt[10:]):
                raise status_mapping.Cancelled("the server cancelled the call")
        prefix = "" if triton_model == "blip_caption" else f"{triton_model}: "
        return [CaptionText(f"{prefix}{job.prompt} {sorted(job.options.items())}", -0.5)]
