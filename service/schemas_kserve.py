"""Request and response bodies of the Open Inference Protocol (KServe v2 REST) routes
(service/routes/kserve.py): https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import _PNG

Param = bool | int | float | str | dict[str, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InferInput(_Strict):
    name: str = Field(description="`image` (the encoded image file) or `question`.")
    shape: list[int] = Field(min_length=1, max_length=2, description="[N] (or [N, 1]): N images, and N questions for VQA.")
    datatype: str = Field(description="BYTES.")
    parameters: dict[str, Param] | None = Field(
        None, description="`binary_data_size`: the tensor's bytes follow the JSON header (binary data extension)."
    )
    data: list | None = Field(
        None, description="JSON data: strings; an image as base64, a data URI, or an http(s) URL under the server's URL rules."
    )


class RequestedOutput(_Strict):
    name: str
    parameters: dict[str, Param] | None = Field(None, description="`binary_data`: true to get this output as binary data.")


class InferRequest(_Strict):
    id: str | None = None
    parameters: dict[str, Param] | None = Field(
        None,
        description="`compute` (VQA: auto | a level name | a max FLOPs ratio as a number), `deadline_ms` (or Triton's "
        "`timeout` in microseconds), `max_length` and `num_beams` (captions; `num_beams` also for generative VQA), "
        "`binary_data_output` (all outputs as binary data). Other parameters are refused (400).",
    )
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "inputs": [
                        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [_PNG]},
                        {"name": "question", "shape": [1], "datatype": "BYTES", "data": ["what shape is in the image?"]},
                    ],
                    "parameters": {"compute": "auto"},
                }
            ]
        },
    )


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Param] | None = None
    data: list[str] | list[float] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Param] | None = None
    outputs: list[OutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelReady(BaseModel):
    name: str
    ready: bool


class V2Error(BaseModel):
    error: str
