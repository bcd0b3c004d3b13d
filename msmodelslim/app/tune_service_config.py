"""The plan's `evaluation: {type: service_oriented}` (protocol.md §7.2): the serving engine, its precheck
questions and the AISBench data sets; app/tune_service.py runs it."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msmodelslim.app.tune_judge import Demand


class ModelMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: str = ""
    subdir: str = "vllm_api"
    base_name: str = "vllm_api_general_chat"
    name_suffix: str = "auto"
    abbr: str = "vllm-api-general-chat"
    attr: str = "service"


class AisBenchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    binary: str = "ais_bench"
    mode: str = "all"
    timeout: float = Field(7200, gt=0)
    cleanup_model_config: bool = True
    model_meta: ModelMeta = Field(default_factory=ModelMeta)
    request_rate: float = Field(1.0, ge=0)
    pred_postprocessor: str = "extract_non_reasoning_content"
    retry: int = Field(2, ge=0)
    batch_size: int = Field(1, ge=1)
    max_out_len: int = Field(512, ge=1)
    trust_remote_code: bool = False
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    extra_args: list[str] = Field(default_factory=list)
    log_dir: str = ""


class AisBenchDataset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config_name: str = Field(min_length=1)
    mode: str = ""
    request_rate: float = Field(0.0, ge=0)
    max_out_len: Optional[int] = Field(None, ge=1)
    returns_tool_calls: Optional[bool] = None
    api_chat_type: str = "VLLMCustomAPIChat"
    extra_args: list[str] = Field(default_factory=list)


class ExpectedAnswerCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["expected_answer"]
    test_cases: list[dict[str, Union[str, list[str]]]] = Field(default_factory=lambda: [{"What is 2+2?": "4"}])
    max_tokens: int = Field(512, ge=1)
    timeout: float = Field(60.0, gt=0)


class GarbledTextCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["garbled_text"]
    test_cases: list[str] = Field(default_factory=lambda: ["How are you?"])
    max_tokens: int = Field(512, ge=1)
    timeout: float = Field(60.0, gt=0)


PrecheckConfig = Annotated[Union[ExpectedAnswerCheck, GarbledTextCheck], Field(discriminator="type")]


class AisBenchEvaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["aisbench"] = "aisbench"
    aisbench: AisBenchSettings = Field(default_factory=AisBenchSettings)
    datasets: dict[str, AisBenchDataset] = Field(min_length=1)
    host: str = "localhost"
    port: int = Field(1234, ge=1, le=65535)
    served_model_name: str = "served_model_name"


class InferenceEngine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["vllm-ascend"] = "vllm-ascend"
    entrypoint: str = "vllm.entrypoints.openai.api_server"
    env_vars: dict[str, str] = Field(default_factory=dict)
    served_model_name: str = "served_model_name"
    host: str = "localhost"
    port: int = Field(1234, ge=1, le=65535)
    health_check_endpoint: str = "/v1/models"
    startup_timeout: float = Field(600, gt=0)
    args: dict[str, Any] = Field(default_factory=dict)


NO_ACCURACY_MODES = ("infer", "perf", "perf_viz")  # AISBench modes that write no accuracy summary
ENGINE_OWNED_FLAGS = ("model", "host", "port", "served-model-name")  # set from the checkpoint and the fields


class ServiceOrientedEvaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["service_oriented"]
    demand: Demand
    evaluation: AisBenchEvaluation
    inference_engine: InferenceEngine = Field(default_factory=InferenceEngine)
    precheck: list[PrecheckConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "ServiceOrientedEvaluation":
        unknown = [e.dataset for e in self.demand.expectations if e.dataset not in self.evaluation.datasets]
        if unknown:
            raise ValueError(f"demand.expectations name data set(s) {unknown} that evaluation.datasets does not "
                             f"define ({sorted(self.evaluation.datasets)})")
        engine, target = self.inference_engine, self.evaluation
        for field in ("port", "served_model_name"):  # AISBench must benchmark the server tune starts
            if field in target.model_fields_set and getattr(target, field) != getattr(engine, field):
                raise ValueError(f"evaluation.{field} {getattr(target, field)!r} differs from inference_engine."
                                 f"{field} {getattr(engine, field)!r}: AISBench would query another server; set "
                                 f"inference_engine.{field} and leave evaluation.{field} out")
        modes = {"evaluation.aisbench.mode": target.aisbench.mode,
                 **{f"evaluation.datasets.{k}.mode": d.mode for k, d in target.datasets.items()}}
        for where, mode in modes.items():
            if mode in NO_ACCURACY_MODES:
                raise ValueError(f"{where} {mode!r}: AISBench writes no accuracy in that mode; use all (or eval)")
        owned = [k for k in engine.args if k.lstrip("-").replace("_", "-") in ENGINE_OWNED_FLAGS]
        if owned:
            raise ValueError(f"inference_engine.args {owned}: tune sets --model (the checkpoint), --host, --port "
                             f"and --served-model-name itself; use inference_engine.host/port/served_model_name")
        return self
