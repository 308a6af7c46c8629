"""CaptionClient: the synchronous client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from blip_client._errors import CaptionError, from_rpc_error
from blip_client._images import ImageInput
from blip_client._requests import (
    DEFAULT,
    DEFAULT_RETRY,
    DEFAULT_TARGET,
    Default,
    PemSource,
    RetryPolicy,
    build_request,
    channel_credentials,
    channel_options,
    metadata,
    stream_item,
)
from blip_client._types import CaptionResult, GenerationOptions, ModelInfo, ModelSummary
from blip_client.protos.blip.caption.v1 import caption_pb2, caption_pb2_grpc

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class CaptionClient:
    """Calls a caption server.

        with CaptionClient("127.0.0.1:50051") as client:
            print(client.caption("photo.jpg").text)

    `timeout` (seconds, None for none) applies to every call that does not pass its own. `tls_ca` (and, for mutual
    TLS, `tls_cert` and `tls_key`) are PEM files, paths or bytes, for a server that uses TLS. Calls answered
    UNAVAILABLE are retried by gRPC as `retry` says (bounded, with jittered backoff; None: never). `model` names the
    served model (`list_models()`) of every call that names none (empty: the server's default).
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 60.0, api_key: str | None = None,
                 tls_ca: PemSource | None = None, tls_cert: PemSource | None = None, tls_key: PemSource | None = None,
                 credentials: grpc.ChannelCredentials | None = None, retry: RetryPolicy | None = DEFAULT_RETRY,
                 model: str = "") -> None:
        credentials = credentials or channel_credentials(tls_ca, tls_cert, tls_key)
        options = channel_options(retry)
        self._channel = (grpc.secure_channel(target, credentials, options) if credentials
                         else grpc.insecure_channel(target, options))
        self._stub = caption_pb2_grpc.CaptionServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = metadata(api_key)
        self._model = model  # the model of calls that name none (empty: the server's default)

    def __enter__(self) -> CaptionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request,
              timeout: float | Default | None) -> _Response:
        try:
            return method(request, timeout=self._timeout if timeout is DEFAULT else timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def caption(self, image: ImageInput, *, prompt: str = "", options: GenerationOptions | None = None,
                timeout: float | Default | None = DEFAULT, request_id: str = "", model: str = "") -> CaptionResult:
        """Caption one image (bytes, a path or a PIL image) with `model` (a name `list_models()` gives; empty: the
        server's default).

        Raises:
            InvalidArgumentError: the image cannot be captioned, or an option is out of range.
            ResourceExhaustedError: the image is over the size limit, or the server is at capacity.
            UnavailableError: the server is down or restarting.
            DeadlineExceededError: the timeout passed.
            UnauthenticatedError: a valid API key is required.
            NotFoundError: `model` is not served.
            CaptionError: any other failure (InternalError, CancelledError, ...).
        """
        request = build_request(image, prompt, options, request_id, model or self._model)
        return CaptionResult.from_pb(self._call(self._stub.Caption, request, timeout))

    def caption_many(self, images: Sequence[ImageInput], *, prompt: str = "", options: GenerationOptions | None = None,
                     timeout: float | Default | None = DEFAULT, concurrency: int = 8,
                     return_exceptions: bool = False, model: str = "") -> list[CaptionResult | CaptionError]:
        """Caption many images with at most `concurrency` calls in flight; results in input order.

        With return_exceptions, a failed image's entry is its CaptionError; otherwise the first failure raises.
        """

        def one(image: ImageInput) -> CaptionResult | CaptionError:
            try:
                return self.caption(image, prompt=prompt, options=options, timeout=timeout, model=model)
            except CaptionError as error:
                if return_exceptions:
                    return error
                raise

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(one, images))

    def caption_stream(self, images: Iterable[ImageInput], *, prompt: str = "",
                       options: GenerationOptions | None = None, timeout: float | None = None,
                       model: str = "") -> Iterator[tuple[int, CaptionResult | CaptionError]]:
        """Caption images over one CaptionStream; yields (index in `images`, result or error) as they finish."""
        model = model or self._model
        requests = (build_request(image, prompt, options, str(i), model) for i, image in enumerate(images))
        try:
            for response in self._stub.CaptionStream(requests, timeout=timeout, metadata=self._metadata):
                yield stream_item(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def model_info(self, timeout: float | Default | None = DEFAULT, *, model: str = "") -> ModelInfo:
        """What the server serves as `model` (empty: its default): image size, option defaults and limits."""
        request = caption_pb2.GetModelInfoRequest(model=model or self._model)
        return ModelInfo.from_pb(self._call(self._stub.GetModelInfo, request, timeout))

    def list_models(self, timeout: float | Default | None = DEFAULT) -> list[ModelSummary]:
        """The models the server serves, the default first."""
        response = self._call(self._stub.ListModels, caption_pb2.ListModelsRequest(), timeout)
        return [ModelSummary.from_pb(m) for m in response.models]
