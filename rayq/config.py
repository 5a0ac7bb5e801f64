"""The one schema of rayq's settings: pydantic models shared by the Python API, job files and CLI.

Field names match the flags of `rayq compress` (with dashes for underscores). Unknown keys are
errors, and validation reports every problem at once.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayq.errors import ConfigError
from rayq.quant.schemes import FLOAT, SCHEMES

SchemeName = Literal["int4", "int8", "w8a8"]


class PinSetting(BaseModel):
    """Keep matching layers float or give them a fixed scheme."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(description="Regular expression that must match a whole layer name.")
    scheme: Literal["float", "int4", "int8", "w8a8"] = Field(
        description="`float` keeps the layer unquantized; a scheme name forces that scheme.")


class QuantizationSettings(BaseModel):
    """Settings of the scoring and planning; the Python API and job files share them."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(
        0.005, description="Sensitivity threshold: each layer takes the most compressed scheme "
        "whose QS is at most this. 0 applies only output-preserving transformations. Default 0.005.")
    schemes: list[SchemeName] = Field(
        default_factory=lambda: ["int4", "int8"],
        description="Candidate schemes, any of int4, int8, w8a8. Default: int4 and int8.")
    pins: list[PinSetting] = Field(
        default_factory=list, description="Layers kept float or given a fixed scheme by name pattern.")
    activation_method: Literal["mse", "percentile", "minmax"] = Field(
        "mse", description="How w8a8 input ranges are calibrated: mse (default), percentile, minmax.")
    activation_percentile: float = Field(
        99.99, gt=50, le=100, description="Percentile of |values| kept by the percentile method.")
    sensitivity_mode: Literal["local", "end_to_end"] = Field(
        "local", description="local (default): one float pass scores every layer on its own "
        "output. end_to_end: also quantize one layer at a time and measure the whole model's "
        "output, at one model pass per layer, scheme and batch; the plan then uses these scores.")
    qs_normalization: Literal["energy", "position"] = Field(
        "energy", description="How local QS normalizes the error. energy (default): error "
        "energy over signal energy summed over all outputs. position: each output position "
        "(token, pixel, sample) divided by its own signal energy, then averaged, so a few "
        "positions with very large outputs cannot hide the error on the rest; use it for "
        "transformers, whose special tokens carry outputs hundreds of times larger.")
    clip_search: bool = Field(
        True, description="Search a clipped weight scale per group with less error than absmax.")
    evaluation_batches: int | None = Field(
        None, ge=1, description="Held-out batches taken from the end of the calibration data. "
        "Default: a tenth of them when there are ten or more, else the calibration batches.")

    @field_validator("threshold", mode="before")
    @classmethod
    def _finite_threshold(cls, value):
        if isinstance(value, bool):
            raise ValueError("expected a finite number >= 0, such as 0.005")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a finite number >= 0, such as 0.005") from None
        if not math.isfinite(number) or number < 0:
            raise ValueError("expected a finite number >= 0, such as 0.005")
        return number

    @field_validator("schemes")
    @classmethod
    def _nonempty_unique(cls, value):
        if not value:
            raise ValueError(f"expected at least one of {sorted(SCHEMES)}")
        if len(set(value)) != len(value):
            raise ValueError("each scheme may appear once")
        return value


class ExecutionSettings(BaseModel):
    """Execution settings: scoring in the calling process or on Ray actors."""

    model_config = ConfigDict(extra="forbid")

    workers: int | None = Field(
        None, ge=1, description="Ray actors that score the calibration data. Default: in-process "
        "for the Python API, 1 for the CLI.")
    address: str | None = Field(
        None, description="Ray cluster address to join (or set RAY_ADDRESS). Default: start a "
        "local Ray instance on 127.0.0.1.")
    worker_cpus: float | None = Field(None, gt=0, description="CPUs per worker. Default 1.")
    worker_gpus: float | None = Field(
        None, ge=0, description="GPUs per worker. Default: 1 where the cluster has GPUs, else 0.")
    max_restarts: int = Field(2, ge=0, description="Times each worker may be replaced after it "
                              "dies before the run fails. Default 2.")
    weight_cap_bytes: int | None = Field(
        None, gt=0, strict=True, description="Bytes of model weights one worker may hold. A "
        "Hugging Face decoder model whose weights exceed it is scored and built block by block, "
        "one group of consecutive decoder layers at a time. Default: half the memory of the "
        "worker's GPU, or a quarter of the worker node's memory on CPU workers.")


class JobConfig(QuantizationSettings, ExecutionSettings):
    """A `rayq compress` job: the settings of a job file and of the flags."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Hugging Face model folder, python:package.module:function, "
                       "or the name of an installed package that ships a model.")
    model_weights: str | None = Field(
        None, description="safetensors weights loaded into a python: factory's model.")
    calibration: str = Field(description="pydoc:topics, a .txt, .parquet or .safetensors file, "
                             "local or s3://.")
    evaluation: str | None = Field(None, description="Held-out data in the same formats. Default: "
                                   "the last tenth of the calibration batches.")
    output: str = Field(description="Output folder, file://PATH or s3://BUCKET/PREFIX.")
    batch_size: int = Field(16, ge=1, description="Samples per calibration batch. Default 16.")
    max_batches: int | None = Field(None, ge=1, description="Use at most this many batches.")
    max_length: int = Field(128, ge=1, description="Tokens per text sample, at most. Default 128.")
    overwrite: bool = Field(False, description="Replace a finished run at the output location.")

    def quantization(self) -> QuantizationSettings:
        return QuantizationSettings(**{k: getattr(self, k) for k in QuantizationSettings.model_fields})

    def execution(self) -> ExecutionSettings:
        return ExecutionSettings(**{k: getattr(self, k) for k in ExecutionSettings.model_fields})


class FinetuneSettings(BaseModel):
    """Settings of `rayq finetune`: quantization-aware fine-tuning of a finished run."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(
        None, ge=1, description="Optimizer steps. Default: `epochs` passes over the training "
        "batches. Give steps or epochs, not both.")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training batches, split over the workers; "
        "fractions allowed. Default 1 when `steps` is not given.")
    learning_rate: float = Field(
        1e-4, gt=0, description="AdamW learning rate of every trained parameter. Default 1e-4.")
    batch_size: int | None = Field(
        None, ge=1, description="Samples per step on each worker, at most the run's calibration "
        "batch size: each calibration batch is cut into pieces of this size. Default: the run's "
        "calibration batch size.")
    workers: int | None = Field(
        None, ge=1, description="Ray Train data-parallel workers. Default: train in the calling "
        "process without Ray.")
    worker_gpus: float | None = Field(
        None, ge=0, description="GPUs per Ray Train worker. Default: 1 where the cluster has "
        "GPUs, else 0.")
    address: str | None = Field(
        None, description="Ray cluster address to join with `workers` (or set RAY_ADDRESS). "
        "Default: start a local Ray instance on 127.0.0.1.")
    checkpoint_every: int = Field(
        50, ge=1, description="Steps between checkpoints under OUTPUT/checkpoints. Default 50; "
        "the last step is always checkpointed.")
    max_failures: int = Field(
        2, ge=0, description="Times a Ray Train job restarts from its last checkpoint after a "
        "worker dies before it fails. Default 2.")
    learn_scales: bool = Field(
        False, description="Train the float32 scales of quantized weights too (LSQ-style "
        "gradient); the integer grid stays. Default false.")
    loss: str = Field(
        "distill", description="distill (default): relative squared error between the model's "
        "float outputs and the float model's on the same batch. mse or cross_entropy: between "
        "the first float output and the labels. module:function: a function (outputs, targets) "
        "returning a scalar tensor, with targets the float model's outputs or the labels.")
    data: str | None = Field(
        None, description="Training data: a .parquet file (local or s3://) whose columns are "
        "keyword arguments of the model's forward. Default: the run's calibration data.")
    label_column: str | None = Field(
        None, description="Column of `data` that holds the labels; it is not passed to the "
        "model. Needs `data` and a loss other than distill.")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value):
        if value in BUILTIN_LOSSES:
            return value
        module, sep, function = value.partition(":")
        if not sep or not module or not function or ":" in function:
            raise ValueError(f"expected one of {', '.join(BUILTIN_LOSSES)} or "
                             "package.module:function")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.label_column is not None and self.data is None:
            raise ValueError("label_column needs data, a .parquet file with that column")
        if self.label_column is not None and self.loss == "distill":
            raise ValueError("labels need a loss other than distill: mse, cross_entropy or "
                             "module:function")
        if self.label_column is None and self.loss in ("mse", "cross_entropy"):
            raise ValueError(f"loss {self.loss} needs labels: give data and label_column")
        if self.data is not None and not self.data.lower().endswith(".parquet"):
            raise ValueError(f"data {self.data!r} must be a .parquet file")
        return self


BUILTIN_LOSSES = ("distill", "mse", "cross_entropy")


def finetune_settings(source: str = "finetune() arguments",
                      flag_fields: frozenset[str] = frozenset(), **values) -> FinetuneSettings:
    try:
        return FinetuneSettings(**values)
    except ValidationError as exc:
        raise format_validation_error(exc, source, flag_fields) from None


# pydantic's messages for numeric bounds, worded like rayq's own.
_BOUNDS = {
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be greater than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
}


def format_validation_error(exc: ValidationError, source: str,
                            flag_fields: frozenset[str] = frozenset()) -> ConfigError:
    """Turn pydantic's errors into one ConfigError with a line per field: path, value, rule.

    Fields in `flag_fields` came from the command line and are named as their options
    (`--max-batches`), so that an error points at what the user typed.
    """
    problems = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["loc"] and error["loc"][0] in flag_fields:
            path = "--" + path.replace("_", "-")
        if error["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown key; {_spelling_hint(error, exc.title)}")
            continue
        if error["type"] == "missing":
            problems.append(f"{path}: missing; set it in the job file or with --{path.replace('_', '-')}")
            continue
        value = error.get("input")
        message = _BOUNDS.get(error["type"], "").format(**error.get("ctx", {})) or (
            error["msg"].removeprefix("Value error, "))
        if not error["loc"]:
            # A rule across fields: the input is the whole mapping, so name the rule alone.
            problems.append(message)
            continue
        problems.append(f"{path}: invalid value {value!r}: {message}")
    return ConfigError(f"invalid settings in {source}", problems)


# Settings that change how a run is computed but not what it computes: scores merge exactly for any
# number of workers, and the output location is where the run goes, not what it contains.
EXECUTION_ONLY = frozenset(ExecutionSettings.model_fields) | {"output", "overwrite"}
# A fleet model's output is `<fleet output>/<name>`, and the fleet decides when to replace it.
FLEET_SET_FIELDS = frozenset({"output", "overwrite"})


class FleetEntry(BaseModel):
    """One model of a fleet: its name, source and data, and overrides of any `rayq compress` field."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Folder name of the "
                      "model's run under the fleet's output: letters, digits, '.', '_' and '-'.")
    model: str = Field(description="As `model` of `rayq compress`.")
    calibration: str = Field(description="As `calibration` of `rayq compress`.")


class FleetConfig(BaseModel):
    """A `rayq zoo` fleet file: an output root, defaults for every model, and the models."""

    model_config = ConfigDict(extra="forbid")

    output: str = Field(description="Output root; each model writes its run to OUTPUT/NAME, and the "
                        "fleet writes OUTPUT/fleet.parquet.")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Fields of a `rayq compress` job applied to every model "
        "(threshold, schemes, workers, ...); a model's own fields override them.")
    models: list[FleetEntry] = Field(min_length=1, description="The models, each with a unique name.")
    parallel: int | None = Field(
        None, ge=1, description="Models compressed at once. Default: as many as the cluster's "
        "CPUs and GPUs hold with every model's workers placed.")
    claim_ttl_s: float = Field(
        3600.0, gt=0, description="Seconds a claim on a model stays valid without renewal; a "
        "running fleet renews its claims every third of this. A claim left by a crashed fleet "
        "may be taken over once it expires. Default 3600.")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, value):
        names = [entry.name for entry in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model names must be unique; repeated: {', '.join(repeated)}")
        return value

    def jobs(self, source: str) -> dict[str, JobConfig]:
        """Build every model's effective `JobConfig`; raise one ConfigError listing every problem."""
        problems = []
        for key in sorted(FLEET_SET_FIELDS & set(self.defaults)):
            problems.append(f"defaults.{key}: not allowed in a fleet; the fleet writes each model "
                            "to OUTPUT/NAME and replaces a run only when its inputs changed")
        jobs = {}
        for index, entry in enumerate(self.models):
            values = entry.model_dump(exclude={"name"})
            for key in sorted(FLEET_SET_FIELDS & set(values)):
                problems.append(f"models.{index}.{key}: not allowed in a fleet model; remove it")
            merged = {**self.defaults, **values,
                      "output": self.output.rstrip("/") + "/" + entry.name, "overwrite": True}
            try:
                jobs[entry.name] = JobConfig(**merged)
            except ValidationError as exc:
                problems += [_fleet_problem(error, index, values) for error in exc.errors()]
        if problems:
            raise ConfigError(f"invalid fleet settings in {source}", problems)
        return jobs


def _fleet_problem(error: dict, index: int, own_values: dict) -> str:
    """Name a JobConfig error by where its value came from: the model's entry or the defaults."""
    key = str(error["loc"][0]) if error["loc"] else ""
    path = ".".join(str(p) for p in error["loc"])
    prefix = f"models.{index}" if key in own_values or error["type"] == "missing" else "defaults"
    if error["type"] == "extra_forbidden":
        return f"{prefix}.{path}: unknown key; {_spelling_hint(error, JobConfig.__name__)}"
    if error["type"] == "missing":
        return f"{prefix}.{path}: missing; set it in the model's entry or in defaults"
    message = error["msg"].removeprefix("Value error, ")
    return f"{prefix}.{path}: invalid value {error.get('input')!r}: {message}"


def _spelling_hint(error: dict, model_name: str) -> str:
    """Suggest the field that an unknown key most likely misspells, if one is close enough."""
    model = {cls.__name__: cls for cls in (JobConfig, QuantizationSettings, ExecutionSettings,
                                           FinetuneSettings, FleetConfig)}.get(model_name)
    key = str(error["loc"][-1]) if error["loc"] else ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1) if model else []
    if close:
        return f"did you mean `{close[0]}`?"
    return "check its spelling against `rayq compress --help`"


def load_fleet(data: dict, source: str) -> FleetConfig:
    try:
        return FleetConfig(**data)
    except ValidationError as exc:
        raise format_validation_error(exc, source) from None


def execution_settings(**values) -> ExecutionSettings:
    try:
        return ExecutionSettings(**values)
    except ValidationError as exc:
        raise format_validation_error(exc, "compress() arguments") from None


def quantization_settings(**values) -> QuantizationSettings:
    try:
        return QuantizationSettings(**values)
    except ValidationError as exc:
        raise format_validation_error(exc, "compress() arguments") from None


__all__ = ["EXECUTION_ONLY", "FLOAT", "ExecutionSettings", "FinetuneSettings", "FleetConfig",
           "FleetEntry", "JobConfig", "PinSetting", "QuantizationSettings", "execution_settings",
           "finetune_settings", "format_validation_error", "load_fleet", "quantization_settings"]
