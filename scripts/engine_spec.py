"""Engine specs (`engines/*.yaml`), checkpoint specs (`engines/checkpoint/*.yaml`) and how each is served.

An engine spec is everything needed to rebuild one deployable engine: the source checkpoint, dtype,
quantization, parallelism, `trtllm-build` limits and switches, the target GPU and where to publish.
`load_spec` validates it once (unknown keys, fp8 below sm_89, ranks vs GPU count, speculative
settings, limits, weights vs GPU memory, what the C++ Executor refuses at load), each message naming
the fix; after that the command builders below cannot produce a command TensorRT-LLM would reject for
those reasons.

A checkpoint spec (`serve: checkpoint`) says "no build: serve the checkpoint": a Hugging Face
checkpoint (bf16/fp16, or ModelOpt FP8) that TensorRT-LLM's LLM API (backend tensorrt_llm_llmapi)
loads as it is, the better path where no engine-only quantization (int8 weight-only, SmoothQuant,
int8 KV cache) is needed. `serve_settings` gives the LLM_* settings that serve either kind.

The flags were checked against TensorRT-LLM 1.2 sources: `examples/models/core/llama/convert_checkpoint.py`,
`examples/quantization/quantize.py`, `tensorrt_llm/commands/build.py` and `tensorrt_llm/plugin/plugin.py`
(plugin switches take `enable`/`disable` or a dtype; `--kv_cache_type paged` replaces the deprecated
`--paged_kv_cache`); the switch combinations `tensorrt_llm/builder.py` would silently override are
refused. Nothing here imports tensorrt_llm: the commands run in the build container.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# -- GPUs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """One GPU type: what an engine is tied to (compute capability) and what must fit (memory)."""

    product: str
    compute_capability: tuple[int, int]
    memory_gb: int
    gke_accelerator: str | None  # the `cloud.google.com/gke-accelerator` node label, where GKE offers it

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


GPUS: dict[str, Gpu] = {
    "v100-32gb": Gpu("Tesla V100-PCIE-32GB", (7, 0), 32, "nvidia-tesla-v100"),
    "t4": Gpu("Tesla T4", (7, 5), 16, "nvidia-tesla-t4"),
    "a10": Gpu("NVIDIA A10", (8, 6), 24, None),
    "a100-40gb": Gpu("NVIDIA A100-SXM4-40GB", (8, 0), 40, "nvidia-tesla-a100"),
    "a100-80gb": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 80, "nvidia-a100-80gb"),
    "l4": Gpu("NVIDIA L4", (8, 9), 24, "nvidia-l4"),
    "h100-80gb": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 80, "nvidia-h100-80gb"),
    "h200": Gpu("NVIDIA H200", (9, 0), 141, "nvidia-h200-141gb"),
    "b200": Gpu("NVIDIA B200", (10, 0), 180, "nvidia-b200"),
    "rtx-pro-6000": Gpu("NVIDIA RTX PRO 6000 Blackwell Server Edition", (12, 0), 96, None),
}
MIN_TRTLLM_CC = (8, 0)  # TensorRT-LLM 1.2 supports Ampere, Ada, Hopper, Blackwell (support matrix)
MIN_FP8_CC = (8, 9)  # FP8 tensor cores: Ada and newer
BLACKWELL_CC = (10, 0)  # trtllm-build refuses integer quantization from here on ...
BLACKWELL_RTX_CC = (12, 0)  # ... up to here: `if get_sm_version() >= 100 and get_sm_version() < 120` (builder.py)
DEFAULT_MAX_NUM_TOKENS = 8192  # trtllm-build's BuildConfig.max_num_tokens
WEIGHT_MEMORY_SHARE = 0.9  # weights may use at most this share of a GPU; the rest is KV cache and activations

# -- Spec --------------------------------------------------------------------------------------

WeightQuant = Literal["none", "int8_weight_only", "int4_weight_only", "int4_awq", "fp8", "smoothquant"]
BITS_PER_WEIGHT: dict[str, int] = {
    "int8_weight_only": 8,
    "int4_weight_only": 4,
    "int4_awq": 4,
    "fp8": 8,
    "smoothquant": 8,
}
# quantize.py --qformat for each weight format; ModelOpt is needed for fp8 and AWQ calibration.
QFORMATS: dict[str, str] = {
    "none": "full_prec",
    "int8_weight_only": "int8_wo",
    "int4_weight_only": "int4_wo",
    "int4_awq": "int4_awq",
    "fp8": "fp8",
    "smoothquant": "int8_sq",
}
REPO_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"
# PEP 440 spellings of a 1.2 release: 1.2.0, 1.2.0rc6, 1.2.0rc6.post3, 1.2.1.post1, 1.2.0.dev2025...
TRTLLM_1_2_VERSION = r"^1\.2\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Checkpoint(_Section):
    """The Hugging Face checkpoint the engine is compiled from."""

    repo: str = Field(pattern=REPO_ID)
    revision: str = Field(default="main", min_length=1, description="Branch, tag or commit; builds record the commit.")
    architecture: Literal["LlamaForCausalLM", "MistralForCausalLM"] = Field(
        description="Both convert with examples/models/core/llama/convert_checkpoint.py."
    )
    params_billion: float = Field(gt=0, description="Parameter count, for the weights-fit check.")


class Quantization(_Section):
    weights: WeightQuant = "none"
    kv_cache: Literal["auto", "int8", "fp8"] = Field(default="auto", description="auto: the model dtype.")
    smoothquant_alpha: float | None = Field(default=None, ge=0.0, le=1.0)
    per_token: bool = Field(default=True, description="SmoothQuant: per-token activation scales.")
    per_channel: bool = Field(default=True, description="SmoothQuant: per-channel weight scales.")
    awq_block_size: Literal[64, 128] = 128
    calib_size: int = Field(default=512, ge=1, description="Calibration samples (int8 KV, SmoothQuant, fp8, AWQ).")

    @model_validator(mode="after")
    def _check_smoothquant(self) -> Quantization:
        if self.weights == "smoothquant" and self.smoothquant_alpha is None:
            raise ValueError("weights: smoothquant needs smoothquant_alpha (0.5 is the usual first try)")
        if self.weights != "smoothquant" and self.smoothquant_alpha is not None:
            raise ValueError(f"smoothquant_alpha is set but weights is {self.weights}; remove it or use smoothquant")
        return self

    @property
    def uses_fp8(self) -> bool:
        return self.weights == "fp8" or self.kv_cache == "fp8"

    @property
    def needs_modelopt(self) -> bool:
        """fp8 and AWQ are calibrated by ModelOpt (quantize.py); the rest by convert_checkpoint.py."""
        return self.weights in {"fp8", "int4_awq"} or self.kv_cache == "fp8"


class Parallelism(_Section):
    tensor: int = Field(default=1, ge=1, le=64)
    pipeline: int = Field(default=1, ge=1, le=64)

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline


class Build(_Section):
    """`trtllm-build` limits and switches."""

    max_batch_size: int = Field(ge=1, le=4096)
    max_input_len: int = Field(ge=1)
    max_seq_len: int = Field(ge=2, description="Prompt plus generated tokens.")
    max_num_tokens: int | None = Field(default=None, ge=1, description="Tokens per batch step; default 8192.")
    kv_cache_type: Literal["paged", "continuous"] = "paged"
    context_fmha: bool = True
    paged_context_fmha: bool = Field(default=True, description="Needed for KV cache reuse and chunked context.")
    remove_input_padding: bool = True
    gemm_plugin: Literal["auto", "disable"] = Field(default="auto", description="auto: the dtype, or fp8 for fp8.")
    fp8_context_fmha: bool = False
    low_latency_gemm_plugin: bool = Field(default=False, description="FP8 GEMM tuned for small batches.")
    multiple_profiles: bool = False
    workers: int | None = Field(default=None, ge=1, description="Ranks built in parallel; default: all of them.")

    @model_validator(mode="after")
    def _check_limits(self) -> Build:
        if self.kv_cache_type != "paged" or not self.remove_input_padding:
            raise ValueError(
                "the C++ Executor, the runner that batches in flight, refuses engines without a paged KV cache or "
                "packed input at load; keep kv_cache_type: paged and remove_input_padding: true"
            )
        if self.max_input_len >= self.max_seq_len:
            raise ValueError(
                f"max_input_len ({self.max_input_len}) must be below max_seq_len ({self.max_seq_len}) "
                "so at least one token can be generated; raise max_seq_len or lower max_input_len"
            )
        max_num_tokens = self.max_num_tokens or DEFAULT_MAX_NUM_TOKENS
        if max_num_tokens < self.max_input_len and not self.paged_context_fmha:
            raise ValueError(
                f"max_num_tokens ({max_num_tokens}) is below max_input_len ({self.max_input_len}), so long "
                "prompts need chunked context, which needs paged_context_fmha: true; enable it or raise max_num_tokens"
            )
        if self.paged_context_fmha and not (self.context_fmha and self.kv_cache_type == "paged"):
            raise ValueError(
                "paged_context_fmha needs context_fmha: true and kv_cache_type: paged; "
                "enable both or set paged_context_fmha: false"
            )
        return self


class Speculative(_Section):
    mode: Literal["draft_tokens_external"] | None = Field(
        default=None, description="Draft-target speculative decoding; other trtllm-build modes need other checkpoints."
    )
    max_draft_len: int = Field(default=0, ge=0, le=64)
    draft: str | None = Field(default=None, description="Name of the draft model's spec in the same folder.")

    @model_validator(mode="after")
    def _check_mode(self) -> Speculative:
        if self.mode is None and (self.max_draft_len or self.draft):
            raise ValueError(
                "max_draft_len and draft need a speculative mode; set mode: draft_tokens_external or remove them"
            )
        if self.mode is not None and not self.max_draft_len:
            raise ValueError(f"mode {self.mode} needs max_draft_len >= 1 (draft tokens per step; 4-10 is usual)")
        if self.mode == "draft_tokens_external" and not self.draft:
            raise ValueError("mode draft_tokens_external needs draft: the name of the draft model's engine spec")
        return self


class Target(_Section):
    type: str = Field(description="A key of GPUS, e.g. a100-40gb.")
    count: int = Field(default=1, ge=1, le=64)

    @field_validator("type")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        if value not in GPUS:
            raise ValueError(f"unknown GPU type '{value}'; use one of {', '.join(GPUS)}")
        return value

    @property
    def gpu(self) -> Gpu:
        return GPUS[self.type]


class Publish(_Section):
    repo: str = Field(pattern=REPO_ID, description="Hub model repo; the tokenizer goes to its root.")
    subfolder: str | None = Field(default=None, pattern=r"^[\w.-]+$", description="Engine folder; default: spec name.")
    revision: str = Field(default="main", min_length=1, description="Branch to commit to (created if missing).")
    private: bool = True


class EngineSpec(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$", description="Equals the file name without .yaml.")
    description: str = ""
    tensorrt_llm_version: str = Field(pattern=TRTLLM_1_2_VERSION, description="The serving image's TensorRT-LLM 1.2.")
    checkpoint: Checkpoint
    dtype: Literal["float16", "bfloat16"]
    quantization: Quantization = Quantization()
    parallelism: Parallelism = Parallelism()
    build: Build
    speculative: Speculative = Speculative()
    gpu: Target
    publish: Publish

    @field_validator("tensorrt_llm_version", mode="before")
    @classmethod
    def _version_is_text(cls, value: Any) -> Any:
        if isinstance(value, float):
            raise ValueError(f'quote the version ({value!r} was read as a number): tensorrt_llm_version: "1.2.0"')
        return value

    @model_validator(mode="after")
    def _check_gpu(self) -> EngineSpec:
        gpu, quant = self.gpu.gpu, self.quantization
        if gpu.compute_capability < MIN_TRTLLM_CC:
            raise ValueError(
                f"gpu {self.gpu.type} is {gpu.sm}; TensorRT-LLM 1.2 supports Ampere (sm_80) and newer, "
                "so target a10, a100-40gb or a newer GPU"
            )
        if quant.uses_fp8 and gpu.compute_capability < MIN_FP8_CC:
            raise ValueError(
                f"fp8 (weights: {quant.weights}, kv_cache: {quant.kv_cache}) needs sm_89 or newer but "
                f"{self.gpu.type} is {gpu.sm}; use int8 weights/KV cache there, or target l4, h100-80gb or h200"
            )
        integer = quant.weights in {"int8_weight_only", "int4_weight_only", "smoothquant"} or quant.kv_cache == "int8"
        if integer and BLACKWELL_CC <= gpu.compute_capability < BLACKWELL_RTX_CC:
            raise ValueError(
                f"TensorRT-LLM refuses int8/int4 weight-only, SmoothQuant and int8 KV cache on {gpu.sm} "
                f"({self.gpu.type}); use fp8 weights and KV cache there"
            )
        if self.parallelism.world_size != self.gpu.count:
            raise ValueError(
                f"parallelism tensor={self.parallelism.tensor} x pipeline={self.parallelism.pipeline} makes "
                f"{self.parallelism.world_size} ranks but gpu.count is {self.gpu.count}; one rank runs per GPU, "
                f"so set gpu.count: {self.parallelism.world_size}"
            )
        if self.build.workers is not None and self.build.workers > self.gpu.count:
            raise ValueError(f"build.workers ({self.build.workers}) exceeds gpu.count ({self.gpu.count}); lower it")
        return self

    @model_validator(mode="after")
    def _check_switches(self) -> EngineSpec:
        """Refuse what trtllm-build would silently override (tensorrt_llm/builder.py `build`)."""
        quant, build = self.quantization, self.build
        if (build.low_latency_gemm_plugin or build.fp8_context_fmha) and quant.weights != "fp8":
            raise ValueError(
                "low_latency_gemm_plugin and fp8_context_fmha work on fp8 weights only; "
                "set quantization.weights: fp8 or turn them off"
            )
        if quant.kv_cache == "int8" and build.paged_context_fmha:
            raise ValueError(
                "TensorRT-LLM turns paged context FMHA off with an int8 KV cache; set build.paged_context_fmha: false "
                "(no chunked context or draft-target decoding then) or use kv_cache fp8 on sm_89+"
            )
        if quant.kv_cache == "fp8" and build.paged_context_fmha:
            if quant.weights != "fp8":
                raise ValueError(
                    f"TensorRT-LLM turns paged context FMHA off for an fp8 KV cache with {quant.weights} weights; "
                    "set build.paged_context_fmha: false, or weights: fp8"
                )
            if not build.fp8_context_fmha:
                raise ValueError(
                    "an fp8 KV cache with paged context FMHA makes TensorRT-LLM turn FP8 context FMHA on; "
                    "say so in the spec: build.fp8_context_fmha: true"
                )
        if build.fp8_context_fmha and not build.paged_context_fmha:
            raise ValueError("fp8_context_fmha needs paged_context_fmha: true")
        if self.speculative.mode is not None and not build.paged_context_fmha:
            raise ValueError("draft-target decoding reuses the KV cache, which needs build.paged_context_fmha: true")
        return self

    @model_validator(mode="after")
    def _check_weights_fit(self) -> EngineSpec:
        check_weights_fit(self.checkpoint, self.bits_per_weight, self.parallelism.world_size, self.gpu)
        return self

    @property
    def bits_per_weight(self) -> int:
        return BITS_PER_WEIGHT.get(self.quantization.weights, 16)

    @property
    def weights_gb(self) -> float:
        return self.checkpoint.params_billion * self.bits_per_weight / 8

    @property
    def engine_subfolder(self) -> str:
        return self.publish.subfolder or self.name

    @property
    def gemm_plugin(self) -> str:
        if self.build.gemm_plugin == "disable":
            return "disable"
        return "fp8" if self.quantization.weights == "fp8" else self.dtype

    @property
    def workers(self) -> int:
        return self.build.workers or self.parallelism.world_size


def check_weights_fit(checkpoint: Checkpoint, bits: int, ranks: int, gpu: Target) -> None:
    per_gpu = checkpoint.params_billion * bits / 8 / ranks
    budget = WEIGHT_MEMORY_SHARE * gpu.gpu.memory_gb
    if per_gpu > budget:
        raise ValueError(
            f"{checkpoint.params_billion:g}B parameters at {bits} bits need ~{per_gpu:.0f} GB "
            f"per GPU but a {gpu.type} leaves {budget:.0f} GB for weights; quantize further "
            "(fp8/int8/int4) or raise parallelism.tensor"
        )


# -- Checkpoint specs: no build, the LLM API serves the checkpoint ------------------------------


class ServeLimits(_Section):
    """What the LLM API is built with (`LLM(max_batch_size=..., max_seq_len=..., max_num_tokens=...)`)."""

    max_batch_size: int = Field(ge=1, le=4096)
    max_seq_len: int = Field(ge=2, description="Prompt plus generated tokens; at most the checkpoint's context.")
    max_num_tokens: int | None = Field(default=None, ge=1, description="Tokens per engine step; default 8192.")


class CheckpointSpeculative(_Section):
    mode: Literal["draft_target", "eagle3"] = Field(description="A smaller model of the family, or an EAGLE-3 head.")
    draft_repo: str = Field(pattern=REPO_ID, description="Hub repo of the draft checkpoint or EAGLE-3 head.")
    max_draft_len: int = Field(ge=1, le=64)


class CheckpointSpec(_Section):
    """`serve: checkpoint`: no engine build; backend tensorrt_llm_llmapi loads the checkpoint as it is."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$", description="Equals the file name without .yaml.")
    description: str = ""
    tensorrt_llm_version: str = Field(pattern=TRTLLM_1_2_VERSION, description="The serving image's TensorRT-LLM 1.2.")
    serve: Literal["checkpoint"]
    checkpoint: Checkpoint
    quantization: Literal["none", "fp8"] = Field(
        default="none", description="fp8: the repo is a ModelOpt FP8 export (hf_quant_config.json)."
    )
    tensor_parallel: int = Field(default=1, ge=1, le=64)
    limits: ServeLimits
    speculative: CheckpointSpeculative | None = None
    gpu: Target

    @model_validator(mode="after")
    def _check_gpu(self) -> CheckpointSpec:
        gpu = self.gpu.gpu
        if gpu.compute_capability < MIN_TRTLLM_CC:
            raise ValueError(f"gpu {self.gpu.type} is {gpu.sm}; TensorRT-LLM 1.2 supports Ampere (sm_80) and newer")
        if self.quantization == "fp8" and gpu.compute_capability < MIN_FP8_CC:
            raise ValueError(
                f"an FP8 checkpoint needs sm_89 or newer but {self.gpu.type} is {gpu.sm}; serve the bf16 checkpoint "
                "there, or target l4, h100-80gb or h200"
            )
        if self.tensor_parallel != self.gpu.count:
            raise ValueError(
                f"tensor_parallel ({self.tensor_parallel}) must equal gpu.count ({self.gpu.count}): one rank per GPU"
            )
        check_weights_fit(self.checkpoint, 8 if self.quantization == "fp8" else 16, self.tensor_parallel, self.gpu)
        return self


class SpecError(ValueError):
    """A spec that cannot be built; the message names the file, the field and the fix."""


def load_spec(path: Path) -> EngineSpec | CheckpointSpec:
    """Read and validate one spec; its `name` must equal its file name so engines are findable."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc})") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping of keys (name, checkpoint, build, ...)")
    kind: type[EngineSpec] | type[CheckpointSpec] = CheckpointSpec if "serve" in raw else EngineSpec
    try:
        spec = kind.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{path}: " + "; ".join(_describe(error, kind) for error in exc.errors())) from exc
    if spec.name != path.stem:
        raise SpecError(f"{path}: name '{spec.name}' must equal the file name; rename one to match the other")
    return spec


def serve_settings(spec: EngineSpec | CheckpointSpec, draft: EngineSpec | None = None) -> dict[str, str]:
    """The LLM_* environment a deployment of this spec needs (model/settings.py reads it)."""
    if isinstance(spec, CheckpointSpec):
        settings = {
            "LLM_BACKEND": "tensorrt_llm_llmapi",
            "LLM_MODEL_REPO": spec.checkpoint.repo,
            "LLM_TENSOR_PARALLEL_SIZE": str(spec.tensor_parallel),
            "LLM_MAX_BATCH_SIZE": str(spec.limits.max_batch_size),
            "LLM_MAX_SEQ_LEN": str(spec.limits.max_seq_len),
        }
        if spec.checkpoint.revision != "main":
            settings["LLM_REVISION"] = spec.checkpoint.revision
        if spec.limits.max_num_tokens is not None:
            settings["LLM_MAX_NUM_TOKENS"] = str(spec.limits.max_num_tokens)
        if spec.speculative is not None:
            settings["LLM_DRAFT_MODEL_REPO"] = spec.speculative.draft_repo
            settings["LLM_SPECULATIVE_MODE"] = spec.speculative.mode
            settings["LLM_MAX_DRAFT_LEN"] = str(spec.speculative.max_draft_len)
        return settings
    settings = {
        "LLM_BACKEND": "tensorrt_llm",
        "LLM_MODEL_REPO": spec.publish.repo,
        "LLM_SUBFOLDER": spec.engine_subfolder,
        "LLM_MAX_BATCH_SIZE": str(spec.build.max_batch_size),
    }
    if draft is not None:
        settings["LLM_DRAFT_MODEL_REPO"] = draft.publish.repo
        settings["LLM_DRAFT_SUBFOLDER"] = draft.engine_subfolder
    return settings


def load_draft(target: EngineSpec | CheckpointSpec, spec_dir: Path) -> EngineSpec | None:
    """The draft spec a draft-target engine names, checked to be servable next to it."""
    if not isinstance(target, EngineSpec) or target.speculative.draft is None:
        return None
    path = Path(spec_dir) / f"{target.speculative.draft}.yaml"
    if not path.is_file():
        raise SpecError(f"{target.name}: speculative.draft '{target.speculative.draft}' has no spec at {path}")
    draft = load_spec(path)
    if not isinstance(draft, EngineSpec):
        raise SpecError(
            f"{target.name}: speculative.draft '{draft.name}' is a checkpoint spec; a draft engine needs a build"
        )
    check_draft_pairing(target, draft)
    return draft


def check_draft_pairing(target: EngineSpec, draft: EngineSpec) -> None:
    """A draft runs beside its target: same GPU type and TensorRT-LLM, long enough context, both fit."""
    where = f"{target.name} + draft {draft.name}"
    if draft.speculative.mode is not None:
        raise SpecError(f"{where}: a draft engine cannot itself be speculative; remove its speculative section")
    if (draft.gpu.type, draft.tensorrt_llm_version) != (target.gpu.type, target.tensorrt_llm_version):
        raise SpecError(
            f"{where}: draft targets {draft.gpu.type} / TensorRT-LLM {draft.tensorrt_llm_version} but the target "
            f"{target.gpu.type} / {target.tensorrt_llm_version}; both are served by one pod, so make them equal"
        )
    if draft.build.max_seq_len < target.build.max_seq_len or draft.build.max_batch_size < target.build.max_batch_size:
        raise SpecError(
            f"{where}: the draft sees every target sequence, so its max_seq_len/max_batch_size "
            f"({draft.build.max_seq_len}/{draft.build.max_batch_size}) must reach the target's "
            f"({target.build.max_seq_len}/{target.build.max_batch_size})"
        )
    per_gpu = target.weights_gb / target.parallelism.world_size + draft.weights_gb / draft.parallelism.world_size
    budget = WEIGHT_MEMORY_SHARE * target.gpu.gpu.memory_gb
    if per_gpu > budget:
        raise SpecError(
            f"{where}: ~{per_gpu:.0f} GB of weights per GPU exceed the {budget:.0f} GB budget of a {target.gpu.type}; "
            "use a smaller draft or more tensor parallelism"
        )


def _describe(error: dict[str, Any], kind: type[BaseModel]) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "spec"
    if error["type"] == "extra_forbidden":
        parent = _model_at(kind, error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see docs/engines.md, A spec"
        return f"unknown key '{loc}'; remove it or fix its spelling (allowed here: {allowed})"
    if error["type"] == "missing":
        return f"'{loc}' is required"
    message = re.sub(r"^(Value|Assertion) error, ", "", error["msg"])
    return f"{loc}: {message}" if loc != "spec" else message


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


# -- Commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildPaths:
    """Where one build's files go: the downloaded checkpoint, the TensorRT-LLM checkpoint, the engine."""

    work_dir: Path
    examples_dir: Path  # TensorRT-LLM's examples/ (in the release container: /app/tensorrt_llm/examples)

    @property
    def hf_dir(self) -> Path:
        return self.work_dir / "hf"

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "checkpoint"

    @property
    def engine_dir(self) -> Path:
        return self.work_dir / "engine"


def checkpoint_command(spec: EngineSpec, paths: BuildPaths) -> list[str]:
    """Convert (convert_checkpoint.py) or calibrate-and-quantize (quantize.py) into a TensorRT-LLM checkpoint."""
    if spec.quantization.needs_modelopt:
        return _quantize_command(spec, paths)
    return _convert_command(spec, paths)


def _convert_command(spec: EngineSpec, paths: BuildPaths) -> list[str]:
    quant, parallel = spec.quantization, spec.parallelism
    command = [
        "python3",
        str(paths.examples_dir / "models/core/llama/convert_checkpoint.py"),
        *("--model_dir", str(paths.hf_dir)),
        *("--output_dir", str(paths.checkpoint_dir)),
        *("--dtype", spec.dtype),
        *("--tp_size", str(parallel.tensor)),
        *("--pp_size", str(parallel.pipeline)),
    ]
    if quant.weights in {"int8_weight_only", "int4_weight_only"}:
        command += ["--use_weight_only", "--weight_only_precision", quant.weights.removesuffix("_weight_only")]
    if quant.weights == "smoothquant":
        command += ["--smoothquant", f"{quant.smoothquant_alpha:g}"]
        if quant.per_token:
            command.append("--per_token")
        if quant.per_channel:
            command.append("--per_channel")
    if quant.kv_cache == "int8":
        command.append("--int8_kv_cache")
    if quant.weights == "smoothquant" or quant.kv_cache == "int8":
        command += ["--calib_size", str(quant.calib_size)]
    if parallel.world_size > 1:
        command += ["--workers", str(parallel.world_size)]
    return command


def _quantize_command(spec: EngineSpec, paths: BuildPaths) -> list[str]:
    quant, parallel = spec.quantization, spec.parallelism
    command = [
        "python3",
        str(paths.examples_dir / "quantization/quantize.py"),
        *("--model_dir", str(paths.hf_dir)),
        *("--output_dir", str(paths.checkpoint_dir)),
        *("--dtype", spec.dtype),
        *("--qformat", QFORMATS[quant.weights]),
    ]
    if quant.kv_cache != "auto":
        command += ["--kv_cache_dtype", quant.kv_cache]
    if quant.weights == "int4_awq":
        command += ["--awq_block_size", str(quant.awq_block_size)]
    command += [
        *("--calib_size", str(quant.calib_size)),
        *("--tp_size", str(parallel.tensor)),
        *("--pp_size", str(parallel.pipeline)),
    ]
    return command


def build_command(spec: EngineSpec, paths: BuildPaths) -> list[str]:
    """`trtllm-build` with every switch spelled out, so a TensorRT-LLM default change cannot alter the engine."""
    build, spec_mode = spec.build, spec.speculative
    command = [
        "trtllm-build",
        *("--checkpoint_dir", str(paths.checkpoint_dir)),
        *("--output_dir", str(paths.engine_dir)),
        *("--gpt_attention_plugin", spec.dtype),
        *("--gemm_plugin", spec.gemm_plugin),
        *("--kv_cache_type", build.kv_cache_type),
        *("--context_fmha", _switch(build.context_fmha)),
        *("--use_paged_context_fmha", _switch(build.paged_context_fmha)),
        *("--remove_input_padding", _switch(build.remove_input_padding)),
    ]
    if spec.quantization.weights == "fp8":
        command += ["--use_fp8_context_fmha", _switch(build.fp8_context_fmha)]
    if build.low_latency_gemm_plugin:
        command += ["--low_latency_gemm_plugin", "fp8"]
    if build.multiple_profiles:
        command += ["--multiple_profiles", "enable"]
    command += [
        *("--max_batch_size", str(build.max_batch_size)),
        *("--max_input_len", str(build.max_input_len)),
        *("--max_seq_len", str(build.max_seq_len)),
    ]
    if build.max_num_tokens is not None:
        command += ["--max_num_tokens", str(build.max_num_tokens)]
    if spec_mode.mode is not None:
        command += ["--speculative_decoding_mode", spec_mode.mode, "--max_draft_len", str(spec_mode.max_draft_len)]
    command += ["--workers", str(spec.workers)]
    return command


def _switch(enabled: bool) -> str:
    return "enable" if enabled else "disable"
