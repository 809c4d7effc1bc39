"""The Open Inference Protocol v2 (`inference.GRPCInferenceService`, KServe's and Triton's) over the same
logic as aevae.v1: request -> tensors -> EncoderLogic / DecoderLogic (the same validation, limits, errors and
batching) -> response. A thin translation, registered beside aevae.v1 on the same port.

The generated code is tritonclient's (`tritonclient.grpc.service_pb2`, Triton's grpc_service.proto: the
protocol's messages with KServe's field numbers, plus Triton's extensions), so that no hand copy can drift.

Models by their repository names; versions as `model_version` strings ("" or "0": the newest). Tensors in
`raw_input_contents` or the typed `contents`; the response answers in kind (raw for raw, typed for typed).

| service | input | outputs | request parameters |
| --- | --- | --- | --- |
| encoder | `images` UINT8 or FP32, [N, H, W] (the model's shape or the unpadded one) | `mean`, `logvar` (VAE), `sample` | `sample` (bool), `seed` (int) |
| decoder | `latents` FP32 [N, d] | `images` FP32 or UINT8 | `dtype` ("FP32" or "UINT8") |
"""

from __future__ import annotations

import collections
import math
from contextlib import aclosing, nullcontext
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, NoReturn

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2

import aevae
from aevae.errors import InvalidArgument, ResourceExhausted, ServiceError, shorten
from aevae.inference import LoadedModel
from aevae.store import ModelSummary
from aevae.services import inputs
from aevae.services.decoder import Decoded, DecoderLogic
from aevae.services.encoder import EncoderLogic
from aevae.repository import MAX_NUMBER, NUMBER_PATTERN
from aevae.services.admission import Engine
from aevae.services.registration import describable, parsed, readable
from aevae.services.listing import fitted
from aevae.services.status import guarded
from aevae.services.streams import Pinned, answered_stream
from aevae.v1.tensors import length_delimited

DATATYPES: dict[str, np.dtype] = {"UINT8": np.dtype("u1"), "FP32": np.dtype("<f4")}
CONFIG_TYPES = {"UINT8": model_config_pb2.TYPE_UINT8, "FP32": model_config_pb2.TYPE_FP32}
Outputs = dict[str, np.ndarray]


class ServingState:
    """Whether the service takes work: ServerReady and ModelReady answer false once shutdown has begun."""

    def __init__(self) -> None:
        self.serving = True

    def stop(self) -> None:
        self.serving = False


# -- the protocol's fields <-> numpy and the logic's arguments ----------------------------------------------
def version_from_oip(text: str) -> int | None:
    """"" or "0": the newest (None); otherwise a version number as the repository names its folders (ASCII
    digits, no leading zero, at most 19: "²" or "٣" are digits to Python, not versions), up to MAX_NUMBER.
    The whole string must match: the pattern's `$` also matches before a trailing newline, so "1\\n" would
    pass `match`; and a 19-digit number past int64 names no folder (version_number refuses it), so it is a
    malformed version, not an unknown one."""
    if text in ("", "0"):
        return None
    if not NUMBER_PATTERN.fullmatch(text) or int(text) > MAX_NUMBER:
        raise InvalidArgument(f"model_version: expected a version number such as \"3\" (ASCII digits, no leading "
                              f"zero, at most {MAX_NUMBER}), or \"\" or \"0\" for the newest; got {shorten(text)}")
    return int(text)


def parameter(params: Any, name: str, kinds: tuple[str, ...]) -> Any:
    """A request parameter's value, None when absent; INVALID_ARGUMENT when it has another type."""
    if name not in params:
        return None
    which = params[name].WhichOneof("parameter_choice")
    if which not in kinds:
        wanted = " or ".join(kinds)  # the fields' own names: what a client sets (bool_param, int64_param, ...)
        raise InvalidArgument(f"parameters.{name}: expected the value in {wanted}, got {which or 'no value'}")
    return getattr(params[name], which)


MAX_DIMENSION = 2**31 - 1  # no real batch comes near it; past it numpy cannot even describe an empty array

# Tensor parameters of the protocol's extensions that this server does not implement. Ignored, they would
# answer wrongly: an input's data read from elsewhere than the client meant (it is in a shared memory
# region), an output left out of the region the client reads it from, raw scores where classes were asked.
SHARED_MEMORY = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")
UNSUPPORTED = {"input": SHARED_MEMORY, "output": (*SHARED_MEMORY, "classification")}


def check_extensions(request: service_pb2.ModelInferRequest) -> None:
    """INVALID_ARGUMENT when an input's or a requested output's parameters ask for an extension this server
    lacks (UNSUPPORTED), before any model work."""
    # Of the first few only: a request with more inputs or outputs than a model takes is refused for that
    # (read_input, requested_outputs); looking at each of 30,000 took the event loop for a tenth of a second.
    tensors = [("input", t) for t in request.inputs[:LISTED]] + [("output", t) for t in request.outputs[:LISTED]]
    for kind, tensor in tensors:
        named = [name for name in UNSUPPORTED[kind] if name in tensor.parameters]
        if named:
            field = f"{kind}s[{shorten(tensor.name)}]"
            what = "shared memory" if named[0] in SHARED_MEMORY else "classification"
            raise InvalidArgument(f"{field}.parameters: {', '.join(map(repr, named))} asks for {what}, which this "
                                  f"server does not implement; {kind}s travel in the message (raw or typed "
                                  "contents): leave the parameter out")


LISTED = 5  # names an error shows of what a request carries; the rest are counted


def listed(names: list[str], total: int | None = None) -> str:
    """The first LISTED of a request's names, each shortened, and how many there are in all. An error that
    named all of them grew with the request: 1,500 inputs named by 19 NUL bytes (35 KB) made a 120 KB error,
    which a unary call's client could not take as its status ("received metadata size exceeds hard limit",
    RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT) and a stream could not send as an answer past the max
    message size, so that the stream ended there and the messages after it were never answered."""
    total = len(names) if total is None else total
    shown = ", ".join(shorten(n) for n in names[:LISTED])
    return shown if total <= LISTED else f"{shown}, ... ({total} in all)"


@dataclass(frozen=True)
class InputTensor:
    """A request's input tensor, checked but not yet read: its values are read by `array`, which for typed
    contents converts value by value (about 0.1 us each: 3.9M values held the event loop for a third of a
    second, every client's calls with it), so that runs where the model work runs, after the batch bound."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None  # raw_input_contents[0], or None for typed contents
    typed: Any  # the repeated field holding the values when not raw

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def work(self) -> int:
        """The size of reading it, in rows (the Runner's measure): raw bytes are a view, typed contents are
        converted one value at a time, so they count a row per value."""
        return self.rows if self.raw is not None else math.prod(self.shape)

    def array(self) -> np.ndarray:
        dtype = DATATYPES[self.datatype]
        if self.raw is not None:
            return np.frombuffer(self.raw, dtype).reshape(self.shape)
        if self.datatype == "UINT8":
            wide = np.asarray(self.typed, np.uint32)
            if wide.size and wide.max() > 255:
                raise InvalidArgument(f"{self.name}.contents.uint_contents: UINT8 values must lie in 0..255, got "
                                      f"{wide.max()}")
            return wide.astype(np.uint8).reshape(self.shape)
        return np.asarray(self.typed, np.float32).reshape(self.shape)


def read_input(request: service_pb2.ModelInferRequest, name: str, datatypes: tuple[str, ...],
               dims: str) -> InputTensor:
    """The request's one input tensor, named `name`, checked (datatype, shape, size) without reading its
    values. `dims` names the accepted shape's dimensions ("N, d": two), for the error that a shape of another
    rank gets."""
    if len(request.inputs) != 1 or request.inputs[0].name != name:
        raise InvalidArgument(f"inputs: expected one input named {name!r}, got "
                              f"[{listed([i.name for i in request.inputs[:LISTED]], len(request.inputs))}]")
    tensor = request.inputs[0]
    if tensor.datatype not in datatypes:
        raise InvalidArgument(f"{name}.datatype: expected {' or '.join(datatypes)}, got {shorten(tensor.datatype)}")
    rank = dims.count(",") + 1
    if len(tensor.shape) != rank:  # counted before read: 16,000,000 dimensions made as many Python ints
        got = str(list(tensor.shape[:8]))[:-1] + (", ...]" if len(tensor.shape) > 8 else "]")
        raise InvalidArgument(f"{name}.shape: expected {rank} dimensions [{dims}], got {len(tensor.shape)}: "
                              f"{shorten(got)}")
    shape = tuple(int(s) for s in tensor.shape)
    if any(not 0 <= s <= MAX_DIMENSION for s in shape):
        raise InvalidArgument(f"{name}.shape: dimensions must lie in 0..{MAX_DIMENSION}, got {list(shape)}")
    dtype, count = DATATYPES[tensor.datatype], math.prod(shape)
    describable(name, shape, dtype.itemsize)  # FP32 [0, 2**31 - 1, 2**31 - 1] would be INTERNAL from numpy
    if request.raw_input_contents and tensor.HasField("contents"):
        raise InvalidArgument(f"{name}: send the tensor in raw_input_contents or in contents, not both")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(f"raw_input_contents: expected one entry (for {name!r}), "
                                  f"got {len(request.raw_input_contents)}")
        data = request.raw_input_contents[0]
        if len(data) != count * dtype.itemsize:
            raise InvalidArgument(f"{name}: shape {list(shape)} of {tensor.datatype} needs {count * dtype.itemsize} "
                                  f"bytes in raw_input_contents[0], got {len(data)}")
        return InputTensor(name, tensor.datatype, shape, data, None)
    typed = tensor.contents.uint_contents if tensor.datatype == "UINT8" else tensor.contents.fp32_contents
    kind = "uint_contents" if tensor.datatype == "UINT8" else "fp32_contents"
    others = [field.name for field, _ in tensor.contents.ListFields() if field.name != kind]
    if others:  # never read: values sent there would be dropped without a word
        raise InvalidArgument(f"{name}.contents: a {tensor.datatype} tensor's values go in {kind}, got values in "
                              f"{', '.join(others)}")
    if len(typed) != count:
        raise InvalidArgument(f"{name}.contents.{kind}: shape {list(shape)} needs {count} values, got {len(typed)} "
                              "(or send raw_input_contents)")
    return InputTensor(name, tensor.datatype, shape, None, typed)


def requested_outputs(request: service_pb2.ModelInferRequest, model: str, gives: list[str]) -> list[str]:
    """The outputs a request names (all the model gives when it names none), each at most once: a name
    repeated would repeat its tensor in the answer, past the answer's size as admission counted it."""
    names = [o.name for o in request.outputs] or gives
    unknown = [n for n in names if n not in gives]
    if unknown:
        raise InvalidArgument(f"outputs: model {model!r} gives {gives} for this request, not [{listed(unknown)}]")
    repeated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if repeated:
        raise InvalidArgument(f"outputs: each output may be named once; {', '.join(map(repr, repeated))} is named "
                              "more than once")
    return names


RAW_OUTPUT_CONTENTS = service_pb2.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
INFER_RESPONSE = service_pb2.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number
_CONTENTS = service_pb2.InferTensorContents.DESCRIPTOR.fields_by_name
UINT_CONTENTS, FP32_CONTENTS = _CONTENTS["uint_contents"].number, _CONTENTS["fp32_contents"].number


def infer_response(request: service_pb2.ModelInferRequest, model: str, version: int, outputs: Outputs,
                   raw: bool, serialized: bool = True, max_bytes: int | None = None,
                   streamed: bool = False) -> service_pb2.ModelInferResponse | bytes:
    """The requested outputs, raw or typed, in the order asked. Raw answers are the response's bytes
    (`serialized`, the Engine's raw_responses), serialized here with one copy of each output (the message's
    fields, then the outputs' bytes appended as its raw_output_contents), where appending them to the
    message and serializing it made three. With `max_bytes`, RESOURCE_EXHAUSTED when the answer (wrapped
    in a ModelStreamInferResponse when `streamed`) would be bigger: see fits_message."""
    names = requested_outputs(request, model, list(outputs))
    response = service_pb2.ModelInferResponse(model_name=model, model_version=str(version), id=request.id)
    if streamed:
        final(response)
    data: list[np.ndarray] = []
    payload = 0  # bytes of the outputs' values in the message
    for name in names:
        array = outputs[name]
        datatype = "UINT8" if array.dtype == np.uint8 else "FP32"
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            data.append(np.ascontiguousarray(array, DATATYPES[datatype]).reshape(-1).view(np.uint8))
            payload += data[-1].size
        else:
            contents = typed_contents(array)
            tensor.contents.MergeFromString(contents)
            payload += len(contents)
    rows = int(outputs[names[0]].shape[0]) if names else 0
    if not raw or not serialized:
        if raw:
            response.raw_output_contents.extend(bytes_.tobytes() for bytes_ in data)
        fits_message(response.ByteSize(), payload, rows, request, max_bytes, streamed)
        return response
    parts: list[Any] = [response.SerializeToString()]
    for bytes_ in data:
        parts += [length_delimited(RAW_OUTPUT_CONTENTS, bytes_.size), bytes_.data]
    fits_message(sum(len(part) for part in parts), payload, rows, request, max_bytes, streamed)
    return b"".join(parts)


def fits_message(size: int, payload: int, rows: int, request: service_pb2.ModelInferRequest,
                 max_bytes: int | None, streamed: bool) -> None:
    """RESOURCE_EXHAUSTED when an answer of `size` bytes (`payload` of them the outputs' values for `rows`)
    would pass the max message size. The logic's own check (Limits.check_response) counts the outputs'
    values only, so an answer it lets through can still pass the size by the message's other fields (the
    id, echoed whole; names, shapes), by typed UINT8 values of two bytes each (128..255 as varints), or by
    the stream's wrapper. gRPC would refuse to send it with "Sent message larger than max", a message that
    says nothing of what to change, and in a stream it would end the stream rather than fail this answer."""
    if streamed:
        size += len(length_delimited(INFER_RESPONSE, size))
    if max_bytes is None or size <= max_bytes:
        return
    other = size - payload
    fit = (max_bytes - other) * rows // payload if payload and other < max_bytes else 0
    advice = f"send at most about {fit} rows per request" if fit else "send a shorter id"
    raise ResourceExhausted(f"the response would be {size} bytes, over the max message size of {max_bytes} bytes "
                            f"({payload} bytes of outputs for {rows} rows, {other} of the message's other fields, "
                            f"the request's id of {len(request.id)} bytes among them); {advice}")


# Triton marks every answer of a stream with this response parameter (true: the request's last answer; with
# one answer per request, always true). Clients written for Triton wait for it: tritonclient's
# `async_stream_infer(..., enable_empty_final_response=True)` callers (and PyTriton's streaming client) read
# answers until one carries it, so without it they waited for ever on answers that had all come.
FINAL_RESPONSE = "triton_final_response"


def final(response: service_pb2.ModelInferResponse) -> service_pb2.ModelInferResponse:
    """`response` marked as its request's last answer in a stream, as Triton marks it."""
    response.parameters[FINAL_RESPONSE].bool_param = True
    return response


def stream_response(response: service_pb2.ModelInferResponse | bytes) -> service_pb2.ModelStreamInferResponse | bytes:
    """A ModelStreamInferResponse holding `response` (its bytes wrapped without parsing them again)."""
    if isinstance(response, bytes):
        return length_delimited(INFER_RESPONSE, len(response)) + response
    return service_pb2.ModelStreamInferResponse(infer_response=response)


def typed_contents(array: np.ndarray) -> bytes:
    """An InferTensorContents message holding `array` in `fp32_contents` (FP32) or `uint_contents` (UINT8),
    as bytes: written from the array's bytes with numpy, where extending the repeated field from a list
    made a Python object of every value (8x the answer's size, built on the event loop)."""
    flat = np.ascontiguousarray(array).ravel()
    if array.dtype == np.uint8:  # packed uint32 varints: 0..127 one byte, 128..255 two (v | 0x80, 1)
        wide = flat >= 128
        first = np.arange(flat.size) + np.cumsum(wide) - wide  # where each value's bytes start
        data = np.empty(flat.size + int(wide.sum()), np.uint8)
        data[first] = np.where(wide, flat | 0x80, flat)
        data[first[wide] + 1] = 1
        field = UINT_CONTENTS
    else:  # packed little-endian floats
        data = flat.astype("<f4", copy=False).view(np.uint8)
        field = FP32_CONTENTS
    return length_delimited(field, data.size) + data.tobytes()


# -- the two models' signatures ------------------------------------------------------------------------------
Tensor = tuple[str, str, list[int]]  # name, datatype, shape (-1: any batch)


def signature(kind: str, model: LoadedModel) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of `model` as served by `kind`, from its manifest (no shape assumed)."""
    h, w = model.image_shape
    latent = [-1, model.latent_dim]
    if kind == "encoder":
        outputs = [("mean", "FP32", latent)] + ([("logvar", "FP32", latent)] if model.variational else [])
        return [("images", "UINT8", [-1, h, w])], outputs + [("sample", "FP32", latent)]
    return [("latents", "FP32", latent)], [("images", "FP32", [-1, h, w])]


def encoder_job(servicer: Any, request: service_pb2.ModelInferRequest) -> tuple[Callable[[], Any], int, bool]:
    """The encoder's inputs, parameters and the logic's `prepare` call for one request."""
    images = read_input(request, "images", ("UINT8", "FP32"), "N, H, W")
    servicer.logic.limits.check_batch(images.rows, "images")  # before any value is read
    wants_sample = parameter(request.parameters, "sample", ("bool_param",))
    seed = parameter(request.parameters, "seed", ("int64_param", "uint64_param"))
    if seed is not None and seed < 0:
        raise InvalidArgument(f"parameters.seed: expected a non-negative integer, got {seed}")
    named = any(o.name == "sample" for o in request.outputs)
    if wants_sample is False and named:  # either answer would ignore half of what was asked
        raise InvalidArgument("parameters.sample is false but the output 'sample' is requested: leave the "
                              "parameter out (or set it true) to get a sample, or do not request the output")
    wants_sample = bool(wants_sample) or named
    noise = np.random.default_rng(seed) if wants_sample else None
    version = version_from_oip(request.model_version)
    logic: EncoderLogic = servicer.logic
    return (lambda: logic.prepare(request.model_name, version, images.array(), noise), images.work,
            logic.ready(request.model_name, version))


def decoder_job(servicer: Any, request: service_pb2.ModelInferRequest) -> tuple[Callable[[], Any], int, bool]:
    """The decoder's input, its output dtype parameter and the logic's `prepare` call for one request."""
    latents = read_input(request, "latents", ("FP32",), "N, d")
    servicer.logic.limits.check_batch(latents.rows, "latents")  # before any value is read
    dtype = parameter(request.parameters, "dtype", ("string_param",)) or "FP32"
    dtypes = {"FP32": "float32", "UINT8": "uint8", "float32": "float32", "uint8": "uint8"}
    if dtype not in dtypes:
        raise InvalidArgument(f"parameters.dtype: expected FP32 or UINT8, got {shorten(dtype)}")
    version = version_from_oip(request.model_version)
    logic: DecoderLogic = servicer.logic
    return (lambda: logic.prepare(request.model_name, version, latents.array(), dtypes[dtype]), latents.work,
            logic.ready(request.model_name, version))


def outputs_of(result: Any) -> Outputs:
    """An Encoded or Decoded result -> the protocol's outputs by name."""
    if isinstance(result, Decoded):
        return {"images": result.images}
    outputs: Outputs = {"mean": result.mean}
    if result.logvar is not None:
        outputs["logvar"] = result.logvar
    if result.sample is not None:
        outputs["sample"] = result.sample
    return outputs


def error_response(error: str, request: service_pb2.ModelInferRequest,
                   max_bytes: int) -> service_pb2.ModelStreamInferResponse:
    """A stream's answer to a failed request: the error, with the request's model, version and id echoed and
    Triton's final-response flag (FINAL_RESPONSE); without the echo when it would pass the max message size
    (an id or name of nearly the whole size, on a request that fits): gRPC would refuse to send the answer,
    which ends the stream."""
    echoed = final(service_pb2.ModelInferResponse(model_name=request.model_name,
                                                  model_version=request.model_version, id=request.id))
    response = service_pb2.ModelStreamInferResponse(error_message=error, infer_response=echoed)
    if response.ByteSize() > max_bytes:
        response.infer_response.CopyFrom(final(service_pb2.ModelInferResponse()))  # the flag stays: a few bytes
        response.error_message += (f" (the request's model name, version and id, {echoed.ByteSize()} bytes, are "
                                   f"left out of this answer: with them it would pass the max message size of "
                                   f"{max_bytes} bytes)")
    return response


class _Captured(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")


class _Capture:
    """A context for `guarded` inside a stream: the status becomes the message's error_message, and the
    stream goes on (Triton's streaming semantics)."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise _Captured(code, details)


class InferenceServicer:
    """The protocol for one service over its aevae.v1 servicer's logic and engine: the same admission
    control, runner and dynamic batcher, so OIP and aevae.v1 requests share forward passes. Registered by
    registration.register, which answers the protocol's methods left out here (statistics, repository
    control, shared memory, trace and log settings) with UNIMPLEMENTED naming those that are here."""

    def __init__(self, kind: str, servicer: Any, state: ServingState | None = None):
        self.kind = kind
        self.logic: EncoderLogic | DecoderLogic = servicer.logic
        self.engine: Engine = servicer.engine
        self.batcher: Any = servicer.batcher
        self.state = state or ServingState()
        self._job = encoder_job if kind == "encoder" else decoder_job
        self._servicer = servicer

    # -- inference ----------------------------------------------------------------------------------------
    async def _infer(self, message: Any, unary: bool = False,
                     pinned: Pinned | None = None) -> service_pb2.ModelInferResponse | bytes:
        """One request (its bytes parsed here, so that a message that does not parse fails alone): validated
        on its own, then computed together with whatever else is waiting (a unary call's, on a busy server,
        waiting a moment for others: Batcher.submit). In a stream, `pinned` holds its versions."""
        request: service_pb2.ModelInferRequest = readable(message)
        newest = request.model_version in ("", "0")
        async with pinned.asking(request.model_name, newest) if pinned else nullcontext() as version:
            if version:
                request.model_version = str(version)
            return await self._infer_one(request, unary, pinned, newest)

    async def _infer_one(self, request: service_pb2.ModelInferRequest, unary: bool, pinned: Pinned | None,
                         newest: bool) -> service_pb2.ModelInferResponse | bytes:
        with self.engine.admission.hold(request.ByteSize()):
            check_extensions(request)
            prepare, rows, ready = self._job(self._servicer, request)
            job = await self.engine.run(prepare, rows, ready)
            async with self.engine.answered(self.batcher, job, unary) as out:
                if pinned is not None:
                    pinned.served(out.model, out.version, out.content, newest)
                raw = bool(request.raw_input_contents)
                return infer_response(request, out.model, out.version, outputs_of(out), raw,
                                      self.engine.raw_responses, self.logic.limits.max_message_bytes,
                                      streamed=pinned is not None)

    async def ModelInfer(self, request: Any,
                         context: grpc.aio.ServicerContext) -> service_pb2.ModelInferResponse | bytes:
        async def call() -> service_pb2.ModelInferResponse | bytes:
            with self.engine.admission.call():
                return await self._infer(request, unary=True)

        return await guarded(context, call())

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[service_pb2.ModelStreamInferResponse | bytes]:
        """One response per request, in order, `stream_depth` computed at once; a failed request (one that
        does not even parse included) answers with its error_message (the status name first) and the stream
        goes on, as in Triton. Every answer carries Triton's final-response flag (FINAL_RESPONSE): one answer
        per request, so each is its request's last. One version serves the stream, as in aevae.v1's streams
        (Pinned)."""
        pinned = Pinned()

        async def answer(index: int, message: Any) -> service_pb2.ModelStreamInferResponse | bytes:
            try:
                response = await guarded(_Capture(), self._infer(message, pinned=pinned))
            except _Captured as exc:
                request = message if isinstance(message, service_pb2.ModelInferRequest) else \
                    service_pb2.ModelInferRequest()
                return error_response(f"message {index}: {exc}", request, self.logic.limits.max_message_bytes)
            return stream_response(response)

        async with aclosing(answered_stream(context, self.engine.admission, request_iterator, answer,
                                            self.engine.stream_depth)) as responses:
            async for response in responses:  # closed with this one: its budget is given back at once
                yield response

    # -- health and metadata ------------------------------------------------------------------------------
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> service_pb2.ServerLiveResponse:
        await guarded(context, parsed(request))  # bytes that are no request: INVALID_ARGUMENT, as everywhere
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> service_pb2.ServerReadyResponse:
        """Ready while serving (not once shutdown has begun) and the repository holds a model."""
        await guarded(context, parsed(request))
        if not self.state.serving:
            return service_pb2.ServerReadyResponse(ready=False)
        models = await guarded(context, self.engine.run(lambda: self.logic.store.scan().versions, 0, False))
        return service_pb2.ServerReadyResponse(ready=self.state.serving and bool(models))

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> service_pb2.ModelReadyResponse:
        """Ready while serving and the version loads (an unknown or broken one is not ready)."""
        name, version = await guarded(context, _named(request))  # a malformed name or version: INVALID_ARGUMENT
        if not self.state.serving:
            return service_pb2.ModelReadyResponse(ready=False)

        async def loads() -> bool:
            try:
                await self._load(name, version)
            except ServiceError:
                return False
            return True

        # guarded: anything else is INTERNAL with its message, not UNKNOWN with a traceback in the log
        ready = await guarded(context, loads())
        return service_pb2.ModelReadyResponse(ready=ready and self.state.serving)

    async def ServerMetadata(self, request: Any,
                             context: grpc.aio.ServicerContext) -> service_pb2.ServerMetadataResponse:
        await guarded(context, parsed(request))
        # Triton's names for the extensions served here: request parameters, and ModelConfig
        # ("model_configuration"; a client is to find it listed before calling it). Not "model_repository":
        # of it only RepositoryIndex is served, not load and unload.
        return service_pb2.ServerMetadataResponse(name=f"aevae-{self.kind}", version=aevae.__version__,
                                                  extensions=["parameters", "model_configuration"])

    async def _load(self, name: str, version: int | None) -> LoadedModel:
        return await self.engine.run(lambda: self.logic.store.get(name, version), 0, False)

    def _available(self, name: str) -> list[str]:
        """The model's versions that are not known to be broken: the protocol's "versions of the model
        available on the server". Listing a broken one (ModelReady false, RepositoryIndex UNAVAILABLE) sent a
        client that picks the highest listed to FAILED_PRECONDITION. Off the event loop: a scan older than
        --refresh-seconds reads the disk."""
        broken = self.logic.store.broken()
        return [str(v.number) for v in self.logic.store.scan().versions.get(name, [])
                if (name, v.number) not in broken]

    async def _named_model(self, request: Any) -> LoadedModel:
        """The model a ModelMetadata/ModelConfig request names."""
        return await self._load(*await _named(request))

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> service_pb2.ModelMetadataResponse:
        """The real shapes and datatypes, from the version's manifest; -1 is the batch dimension."""
        model = await guarded(context, self._named_model(request))
        ins, outs = signature(self.kind, model)
        versions = await guarded(context, self.engine.run(lambda: self._available(model.name), 0, False))

        def meta(tensors: list[Tensor]) -> list[service_pb2.ModelMetadataResponse.TensorMetadata]:
            return [service_pb2.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in tensors]

        return service_pb2.ModelMetadataResponse(name=model.name, versions=versions,
                                                 platform=f"aevae_{model.runtime.name}", inputs=meta(ins),
                                                 outputs=meta(outs))

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> service_pb2.ModelConfigResponse:
        """A minimal Triton model configuration (for tools such as perf_analyzer): the batch is the first
        dimension of every tensor (max_batch_size 0)."""
        model = await guarded(context, self._named_model(request))
        ins, outs = signature(self.kind, model)
        return service_pb2.ModelConfigResponse(config=model_config_pb2.ModelConfig(
            name=model.name, platform=f"aevae_{model.runtime.name}", max_batch_size=0,
            input=[model_config_pb2.ModelInput(name=n, data_type=CONFIG_TYPES[d], dims=s) for n, d, s in ins],
            output=[model_config_pb2.ModelOutput(name=n, data_type=CONFIG_TYPES[d], dims=s) for n, d, s in outs],
        ))

    async def RepositoryIndex(self, request: Any,
                              context: grpc.aio.ServicerContext) -> service_pb2.RepositoryIndexResponse:
        """Every version READY (served on request), and the newest broken ones (store.LISTED_BROKEN a model)
        UNAVAILABLE with the reason."""
        message = await guarded(context, parsed(request))

        def listing(summaries: list[ModelSummary], reasons: bool) -> service_pb2.RepositoryIndexResponse:
            index = []
            for s in summaries:
                states = {n: ("READY", "") for n in s.numbers}
                states.update({n: ("UNAVAILABLE", reason if reasons else "") for n, reason in s.listed_broken()})
                for number, (state, reason) in sorted(states.items()):
                    if not message.ready or state == "READY":
                        index.append(service_pb2.RepositoryIndexResponse.ModelIndex(
                            name=s.name, version=str(number), state=state, reason=reason))
            return service_pb2.RepositoryIndexResponse(models=index)

        def answer() -> service_pb2.RepositoryIndexResponse:  # off the event loop: a scan may read the disk
            summaries = self.logic.list_models()
            return fitted(lambda reasons: listing(summaries, reasons), len(summaries),
                          self.logic.limits.max_message_bytes)

        return await guarded(context, self.engine.run(answer, 0, False))


async def _named(request: Any) -> tuple[str, int | None]:
    """The model (name, version) a ModelReady/ModelMetadata/ModelConfig request names, checked."""
    message = readable(request)
    return inputs.model_name(message.name), version_from_oip(message.version)


DESCRIPTOR = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]


__all__ = ["DESCRIPTOR", "InferenceServicer", "ServingState", "version_from_oip"]
