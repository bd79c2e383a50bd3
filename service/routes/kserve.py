"""Open Inference Protocol (KServe v2 REST): server metadata, model metadata and readiness, inference.

`{name}` is a served model's name (`trimvlm-default`; its latest served version) and `/versions/{v}`
picks a version. Inference inputs: `image` (BYTES: the encoded image file, as binary data or, in JSON,
base64 / a data URI / a URL) and, for VQA, `question` (BYTES); shape [N] (or [N, 1]) for N items. With
`question` the outputs are `answer` (BYTES) and `score` (FP32), as /vqa's (its `answer_one`); without,
`caption` (BYTES), as /caption's (`caption_one`). The N items go through the same batchers as /vqa's
batch form. Triton's binary data extension (Inference-Header-Content-Length) works both ways, so
`tritonclient.http` can send the image file as it is. Errors are `{"error": "..."}` (protocol_errors).
"""

from __future__ import annotations

import json
import struct
import time

import numpy as np
from fastapi import APIRouter, Request, Response

from service import __version__, tracing
from service.errors import ModelUnavailable, ServiceError, UnknownModel
from service.repository import latest
from service.routes.caption import caption_one
from service.routes.common import gather_items, state, validate
from service.routes.vqa import answer_one
from service.schemas import CaptionItem, VQAItem
from service.schemas_kserve import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    ServerMetadata,
    TensorMetadata,
    V2Error,
)
from service.server import ModelServer
from service.state import AppState

router = APIRouter(tags=["kserve-v2"])
infer_router = APIRouter(tags=["kserve-v2"])

ERRORS = {"default": {"model": V2Error, "description": 'Open Inference Protocol error: {"error": "<message>"}'}}
EXTENSIONS = ["binary_tensor_data", "parameters"]
REQUEST_PARAMETERS = {"compute", "deadline_ms", "timeout", "max_length", "num_beams", "binary_data_output"}
VQA_OUTPUTS = {"answer": "BYTES", "score": "FP32"}
CAPTION_OUTPUTS = {"caption": "BYTES"}


def bad(message: str, status: int = 400, code: str = "invalid_request") -> ServiceError:
    return ServiceError(code, status, message)


def find(st: AppState, name: str, version: str | None, ready: bool = True) -> ModelServer:
    """The served model `name` (its latest served version, or `version`). `ready`: refuse (503) one
    still warming up, as the task routes do."""
    if version is not None:
        key = f"{name}/{version}"
        if key not in st.servers:
            if st.loading:
                raise ModelUnavailable(f"no model {key!r} is ready yet (still loading)")
            raise UnknownModel(f"no model {name!r} version {version!r}; serving {sorted(st.servers)}")
        srv = st.servers[key]
    else:
        versions = [k for k in st.servers if k.split("/")[0] == name]
        if not versions:
            if st.loading:
                raise ModelUnavailable(f"no model {name!r} is ready yet (still loading)")
            names = sorted({k.split("/")[0] for k in st.servers})
            raise UnknownModel(f"no model {name!r}; serving {names} (name only; a version goes in /versions/{{v}})")
        srv = st.servers[latest(versions)]
    if ready and not srv.ready:
        raise ModelUnavailable(f"{srv.id} is still loading")
    return srv


# ------------------------------------------------------------------------------------- metadata


@router.get("/v2", response_model=ServerMetadata, responses=ERRORS, summary="KServe v2: server metadata")
async def server_metadata():
    return ServerMetadata(name="trimvlm", version=__version__, extensions=EXTENSIONS)


def model_metadata(st: AppState, srv: ModelServer) -> ModelMetadata:
    name = srv.id.split("/")[0]
    versions = sorted((k.split("/")[1] for k in st.servers if k.split("/")[0] == name), key=int)
    inputs = [TensorMetadata(name="image", datatype="BYTES", shape=[-1])]
    outputs = []
    if srv.tasks.vqa_mode is not None:
        inputs.append(TensorMetadata(name="question", datatype="BYTES", shape=[-1]))
        outputs += [TensorMetadata(name=k, datatype=v, shape=[-1]) for k, v in VQA_OUTPUTS.items()]
    outputs += [TensorMetadata(name=k, datatype=v, shape=[-1]) for k, v in CAPTION_OUTPUTS.items()]
    return ModelMetadata(name=name, versions=versions, platform=f"trimvlm_{srv.backend}", inputs=inputs, outputs=outputs)


@router.get("/v2/models/{name}", response_model=ModelMetadata, responses=ERRORS, summary="KServe v2: model metadata")
async def model_meta(request: Request, name: str):
    """Inputs `image` (BYTES) and, for VQA, `question` (BYTES); outputs `answer` (BYTES) and `score` (FP32)
    with a question, `caption` (BYTES) without. Shapes [-1]: a batch of N items."""
    st = state(request)
    return model_metadata(st, find(st, name, None, ready=False))


@router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS, include_in_schema=False)
async def model_version_meta(request: Request, name: str, version: str):
    st = state(request)
    return model_metadata(st, find(st, name, version, ready=False))


@router.get("/v2/models/{name}/ready", response_model=ModelReady, responses=ERRORS, summary="KServe v2: model readiness")
async def model_ready(request: Request, name: str):
    """200 once the model is loaded and warmed up; 503 while it loads; 404 for a name not served."""
    find(state(request), name, None)
    return ModelReady(name=name, ready=True)


@router.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReady, responses=ERRORS, include_in_schema=False)
async def model_version_ready(request: Request, name: str, version: str):
    find(state(request), name, version)
    return ModelReady(name=name, ready=True)


# ------------------------------------------------------------------------------------ inference


async def read_request(request: Request) -> tuple[dict, bytes]:
    """The JSON header and the binary section (binary data extension: Inference-Header-Content-Length)."""
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise bad(f"Content-Encoding {encoding} is not supported: send the request uncompressed", 415, "unsupported_media_type")
    raw = await request.body()
    size = request.headers.get("inference-header-content-length")
    if size is None:
        header, binary = raw, b""
    else:
        if not size.isdigit() or not 0 < int(size) <= len(raw):
            raise bad(f"Inference-Header-Content-Length {size!r} must be a byte count within the body's {len(raw)} bytes")
        header, binary = raw[: int(size)], raw[int(size) :]
    if not header:
        raise bad("request body is empty; send the JSON inference request", code="empty_body")
    try:
        data = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"the inference request header is not valid JSON: {e}", code="invalid_json") from e
    return data, binary


def unpack_bytes(raw: bytes, what: str) -> list[bytes]:
    """A BYTES tensor's binary data: each element a 4-byte little-endian length and its bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad(f"{what}: binary data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise bad(f"{what}: an element of {n} bytes runs past the tensor's binary data")
        out.append(raw[offset : offset + n])
        offset += n
    return out


def pack_bytes(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))


def flatten(data: list) -> list:
    out = []
    for v in data:
        out.extend(flatten(v) if isinstance(v, list) else [v])
    return out


def tensors_of(req: InferRequest, binary: bytes) -> dict[str, tuple[list, list[int]]]:
    """name -> (elements, shape): bytes from binary data, str from JSON."""
    out: dict[str, tuple[list, list[int]]] = {}
    offset = 0
    for t in req.inputs:
        if t.name not in ("image", "question"):
            raise bad(f"unknown input {t.name!r}: the inputs are `image` and `question` (BYTES)")
        if t.name in out:
            raise bad(f"input {t.name!r} given twice")
        if t.datatype != "BYTES":
            raise bad(f"input {t.name!r} has datatype {t.datatype}; it is BYTES")
        if any(d < 0 for d in t.shape) or (len(t.shape) == 2 and t.shape[1] != 1):
            raise bad(f"input {t.name!r} has shape {t.shape}; send [N] or [N, 1]")
        params = dict(t.parameters or {})
        size = params.pop("binary_data_size", None)
        if params:
            raise bad(f"input {t.name!r}: unsupported parameters {sorted(params)} (only binary_data_size)")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise bad(f"input {t.name!r}: binary_data_size must be a byte count")
            if t.data is not None:
                raise bad(f"input {t.name!r} has both JSON data and binary_data_size")
            if offset + size > len(binary):
                raise bad(f"input {t.name!r}: binary_data_size {size} runs past the {len(binary) - offset} bytes left")
            values: list = unpack_bytes(binary[offset : offset + size], t.name)
            offset += size
        elif t.data is None:
            raise bad(f"input {t.name!r} has no data (JSON `data` or binary_data_size)")
        else:
            values = flatten(t.data)
            if not all(isinstance(v, str) for v in values):
                raise bad(f"input {t.name!r}: BYTES data in JSON are strings")
        count = int(np.prod(t.shape))
        if len(values) != count:
            raise bad(f"input {t.name!r} has {len(values)} elements for shape {t.shape}")
        out[t.name] = (values, t.shape)
    if offset != len(binary):
        raise bad(f"{len(binary) - offset} bytes of binary data belong to no input (binary_data_size)")
    return out


def parameters_of(req: InferRequest) -> dict:
    params = dict(req.parameters or {})
    unknown = set(params) - REQUEST_PARAMETERS
    if unknown:
        raise bad(f"unsupported parameters {sorted(unknown)}; supported: {sorted(REQUEST_PARAMETERS)}")
    for key in ("max_length", "num_beams"):
        if key in params and (isinstance(params[key], bool) or not isinstance(params[key], int)):
            raise bad(f"parameter {key} must be an integer")
    for key in ("deadline_ms", "timeout"):
        if key in params and (isinstance(params[key], bool) or not isinstance(params[key], int | float) or params[key] <= 0):
            raise bad(f"parameter {key} must be a positive number")
    if "deadline_ms" in params and "timeout" in params:
        raise bad("send deadline_ms or timeout (microseconds), not both")
    if "timeout" in params:  # Triton's request timeout, in microseconds
        params["deadline_ms"] = params.pop("timeout") / 1000
    if "binary_data_output" in params and not isinstance(params["binary_data_output"], bool):
        raise bad("parameter binary_data_output must be a boolean")
    compute = params.get("compute")
    if compute is not None and not isinstance(compute, bool) and isinstance(compute, int | float):
        params["compute"] = {"max_flops_ratio": compute}  # a number: the FLOPs budget
    return params


def requested_outputs(req: InferRequest, available: dict[str, str], params: dict) -> list[tuple[str, bool]]:
    """(name, as binary data) per output to return, in the requested order (default: all)."""
    if req.outputs is None:
        return [(name, bool(params.get("binary_data_output", False))) for name in available]
    out = []
    for o in req.outputs:
        if o.name not in available:
            raise bad(f"unknown output {o.name!r}; this request gives {sorted(available)}")
        p = dict(o.parameters or {})
        binary = p.pop("binary_data", False)
        if p or not isinstance(binary, bool):
            raise bad(f"output {o.name!r}: only the boolean parameter binary_data is supported")
        out.append((o.name, binary))
    return out


def item_fields(params: dict, vqa: bool) -> dict:
    """The /vqa or /caption item fields the request parameters set."""
    fields = {k: params[k] for k in ("deadline_ms", "num_beams") if k in params}
    if vqa:
        if "max_length" in params:
            raise bad("max_length applies to captions (send no `question`)")
        if "compute" in params:
            fields["compute"] = params["compute"]
    else:
        if "compute" in params:
            raise bad("compute applies to questions (VQA); captions always run at full compute")
        if "max_length" in params:
            fields["max_length"] = params["max_length"]
    return fields


async def infer(request: Request, name: str, version: str | None = None) -> Response:
    st = state(request)
    t0 = time.perf_counter()
    srv = find(st, name, version)
    request.state.model = srv.id
    with tracing.span("parse"):
        data, binary = await read_request(request)
        req: InferRequest = validate(InferRequest, data)
        params = parameters_of(req)
        tensors = tensors_of(req, binary)
    if "image" not in tensors:
        raise bad("input `image` (BYTES) is required")
    images, shape = tensors["image"]
    questions = tensors.get("question", (None, None))[0]
    n = len(images)
    if n == 0:
        raise bad("input `image` has no elements")
    if n > st.settings.max_items:
        raise bad(f"{n} items in one request; the limit is {st.settings.max_items}", 413, "too_many_items")
    if questions is not None and len(questions) != n:
        raise bad(f"{len(questions)} questions for {n} images: send one per image")
    vqa = questions is not None
    outputs = requested_outputs(req, VQA_OUTPUTS if vqa else CAPTION_OUTPUTS, params)
    fields = item_fields(params, vqa)
    items = []
    for i, image in enumerate(images):
        item = {"image": image if isinstance(image, str) else "binary", "model": srv.id, **fields}
        if vqa:
            q = questions[i]
            if isinstance(q, bytes):
                try:
                    q = q.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise bad(f"question[{i}] is not UTF-8 text") from e
            item["question"] = q
        it = validate(VQAItem if vqa else CaptionItem, item)
        if isinstance(image, bytes):
            it._upload = image  # raw bytes beside the validated fields, as a multipart upload's
        items.append(it)
    one = answer_one if vqa else caption_one
    results = await gather_items((one(request, it, t0) for it in items), n > 1)
    values = {"answer": [r.answer for r in results], "score": [r.score for r in results]} if vqa else {}
    if not vqa:
        values["caption"] = [r.caption for r in results]
    available = VQA_OUTPUTS if vqa else CAPTION_OUTPUTS
    return encode_response(req, srv, shape, [(o, available[o], values[o], b) for o, b in outputs])


def encode_response(req: InferRequest, srv: ModelServer, shape: list[int], outputs: list[tuple]) -> Response:
    tensors, chunks = [], []
    for name, datatype, values, binary in outputs:
        t: dict = {"name": name, "datatype": datatype, "shape": list(shape)}
        if binary:
            raw = pack_bytes(values) if datatype == "BYTES" else np.asarray(values, dtype="<f4").tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            t["data"] = values
        tensors.append(t)
    body: dict = {"model_name": srv.id.split("/")[0], "model_version": srv.id.split("/")[1], "outputs": tensors}
    if req.id is not None:
        body = {"id": req.id, **body}
    header = json.dumps(body).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    headers = {"Inference-Header-Content-Length": str(len(header))}
    return Response(header + b"".join(chunks), media_type="application/octet-stream", headers=headers)


def openapi_components() -> dict[str, dict]:
    """The request body's schema and its parts, for the app's OpenAPI components (the infer routes read the
    body themselves: JSON, or a JSON header and binary data)."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(InferRequest).json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs", {}), "InferRequest": schema}


_INFER = {
    "response_model": InferResponse,
    "responses": {
        **ERRORS,
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "JSON, or (binary data requested) the JSON header then the outputs' bytes",
        },
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}},
        }
    },
}


@infer_router.post("/v2/models/{name}/infer", summary="KServe v2: answer a question about an image, or caption it", **_INFER)
async def model_infer(request: Request, name: str):
    """Inputs `image` and `question` (BYTES, shape [N]): outputs `answer` (BYTES) and `score` (FP32), as
    /vqa. Without `question`: output `caption` (BYTES), as /caption. Parameters: `compute`, `deadline_ms`
    (or `timeout` in µs), `max_length`, `num_beams`, `binary_data_output`. Binary data extension: the
    Inference-Header-Content-Length header and `binary_data_size` per input / `binary_data` per output."""
    return await infer(request, name)


@infer_router.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False, **_INFER)
async def model_version_infer(request: Request, name: str, version: str):
    return await infer(request, name, version)
