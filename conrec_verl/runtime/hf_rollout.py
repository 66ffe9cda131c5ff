"""A verl rollout backend that generates with ``transformers`` (``actor_rollout_ref.rollout.name=hf``).

verl 0.9.1 only ships server rollouts (vLLM, SGLang, TensorRT-LLM), none of which runs on a CPU.
This backend plugs into the same two registries they use:

* ``_ROLLOUT_REGISTRY[("hf", "async")]`` -> :class:`HFServerAdapter`, built inside each hybrid
  actor worker; it receives the trainer's weights every step (``checkpoint_engine.backend=naive``)
  and forwards them to the server actor;
* ``RolloutReplicaRegistry["hf"]`` -> :class:`HFReplica`, which starts one :class:`HFRolloutServer`
  Ray actor per replica. verl's agent loop calls its ``generate`` (token in, token out).

The server batches concurrent requests (the ``rollout.n`` samples of a prompt arrive as separate
requests), supports temperature / top-p / top-k sampling, greedy decoding (``temperature=0``,
e.g. validation through ``val_kwargs``), beam search (``engine_kwargs.hf.num_beams``) and an
optional logits processor (``engine_kwargs.hf.logits_processor``: ``"module:factory"`` called
as ``factory(tokenizer=..., model_config=..., **engine_kwargs.hf.logits_processor_kwargs)``) --
the hook SID-constrained decoding uses. It returns per-token log-probs so verl can compare
rollout and actor probabilities.

It runs wherever torch runs (CPU, or a CUDA device when the worker has one). It is meant for
laptops, CI and debugging; use vLLM/SGLang for throughput on GPUs.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Optional

import ray
import torch

from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry, TokenOutput

from conrec_verl.runtime import verl_compat

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

ROLLOUT_NAME = "hf"
_SERVER_PREFIX = "hf_rollout_server"


def _server_name(replica_rank: int, node_rank: int = 0) -> str:
    job = ray.get_runtime_context().get_job_id() if ray.is_initialized() else "local"
    return f"{_SERVER_PREFIX}_{job}_{replica_rank}_{node_rank}"


def _hf_options(config) -> dict:
    """``rollout.engine_kwargs.hf`` as a plain dict (empty when unset)."""
    engine_kwargs = getattr(config, "engine_kwargs", None) or {}
    opts = engine_kwargs.get(ROLLOUT_NAME, None) if hasattr(engine_kwargs, "get") else None
    if opts is None:
        return {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(opts):
        return OmegaConf.to_container(opts, resolve=True)
    return dict(opts)


def _import_object(path: str):
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"expected 'package.module:name', got {path!r}")
    return getattr(importlib.import_module(module_name), attr)


# --------------------------------------------------------------------------------------------
# Pure generation core (no Ray): used by the server actor and directly by tests.
# --------------------------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    want_logprobs: bool = True

    def group_key(self) -> tuple:
        return (float(self.temperature), float(self.top_p), int(self.top_k), int(self.max_tokens),
                bool(self.want_logprobs))


@dataclass
class GenerationResult:
    token_ids: list[int]
    log_probs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"


class HFGenerator:
    """Batched generation with a transformers causal LM, with explicit generation settings.

    Every setting is passed explicitly to ``generate`` with a fresh ``GenerationConfig`` so the
    model folder's own ``generation_config.json`` cannot change sampling behind the caller's back.
    """

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", num_beams: int = 1,
                 logits_processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.num_beams = int(num_beams)
        self.logits_processor = logits_processor
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
        eos = set()
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos:
            eos.update(int(e) for e in gen_eos)
        if not eos:
            raise ValueError("the tokenizer/model defines no eos_token_id; generation could not stop")
        self.eos_token_ids = sorted(eos)
        # transformers fills every setting a call leaves unset from model.generation_config; a
        # checkpoint's no_repeat_ngram_size / repetition_penalty / bad_words_ids would silently
        # change rollouts (and break constrained decoding). The generator owns its model: clean it.
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig(eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], seed: int | None = None) -> list[GenerationResult]:
        """Generate for requests that share sampling settings (see ``group_key``).

        ``seed``: sampling draws come from this seed, over the requests sorted by prompt, so the
        same batch gives the same samples whatever order its requests arrived in."""
        if not requests:
            return []
        if seed is not None:
            order = sorted(range(len(requests)), key=lambda i: requests[i].prompt_ids)
            out = self._generate([requests[i] for i in order], seed)
            back: list = [None] * len(requests)
            for pos, i in enumerate(order):
                back[i] = out[pos]
            return back
        return self._generate(requests, None)

    def _generate(self, requests: list[GenerationRequest], seed: int | None) -> list[GenerationResult]:
        from transformers import GenerationConfig

        first = requests[0]
        if any(r.group_key() != first.group_key() for r in requests):  # not an assert: kept under python -O
            raise ValueError("mixed sampling settings in one batch")
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attention[i, width - len(r.prompt_ids):] = 1
        greedy = first.temperature <= 0
        settings = dict(
            max_new_tokens=max(1, int(first.max_tokens)),
            do_sample=not greedy and self.num_beams == 1,
            num_beams=self.num_beams,
            num_return_sequences=1,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        if not greedy:
            settings["temperature"] = float(first.temperature)
            settings["top_p"] = float(first.top_p)
            settings["top_k"] = int(first.top_k) if first.top_k and first.top_k > 0 else 0
        gen_config = GenerationConfig(**settings)
        kwargs = {}
        if self.logits_processor is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([self.logits_processor])
        if seed is not None and not greedy:
            torch.manual_seed(int(seed))
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=gen_config,
            **kwargs,
        )
        sequences = out.sequences[:, width:].cpu()
        scale = 1.0 if greedy else float(first.temperature)
        logprobs = None
        if first.want_logprobs and out.logits is not None and self.num_beams == 1:
            logits = torch.stack(out.logits, dim=1).float().cpu() / scale  # (B, T, V)
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, sequences[:, : logits.shape[1], None])[..., 0]
        results = []
        eos = set(self.eos_token_ids)
        for i in range(len(requests)):
            tokens = sequences[i].tolist()
            finish = "length"
            for j, t in enumerate(tokens):
                if t in eos:
                    tokens = tokens[: j + 1]
                    finish = "stop"
                    break
            lp = logprobs[i, : len(tokens)].tolist() if logprobs is not None else []
            results.append(GenerationResult(tokens, lp, finish))
        return results


def load_generator(model_path: str, *, dtype: str = "float32", device: Optional[str] = None,
                   trust_remote_code: bool = False, num_beams: int = 1, logits_processor=None,
                   attn_implementation: str = "sdpa") -> HFGenerator:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
    ).to(device)
    model.eval()
    return HFGenerator(model, tokenizer, device=device, num_beams=num_beams, logits_processor=logits_processor)


# --------------------------------------------------------------------------------------------
# Ray server actor
# --------------------------------------------------------------------------------------------
class HFRolloutServer:
    """Ray actor serving ``generate`` for verl's agent loop; one per replica."""

    def __init__(self, config, model_config, replica_rank: int, visible_devices: str = ""):
        if visible_devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.replica_rank = replica_rank
        self.global_steps: Optional[int] = None
        opts = _hf_options(self.config)
        self.batch_wait_s = float(opts.get("batch_wait_ms", 20)) / 1000.0
        self.max_batch_size = int(opts.get("max_batch_size", 64))
        device = opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = opts.get("dtype") or ("float32" if device == "cpu" else self.config.dtype)
        processor = None
        if opts.get("logits_processor"):
            factory = _import_object(opts["logits_processor"])
            processor = factory(tokenizer=self.model_config.tokenizer, model_config=self.model_config,
                                **(opts.get("logits_processor_kwargs") or {}))
        override = dict(getattr(self.model_config, "override_config", None) or {})
        self.generator = load_generator(
            self.model_config.local_path,
            dtype=dtype,
            device=device,
            trust_remote_code=self.model_config.trust_remote_code,
            num_beams=int(opts.get("num_beams", 1)),
            logits_processor=processor,
            attn_implementation=override.get("attn_implementation", "sdpa"),
        )
        self._queue: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._drain_task: Optional[asyncio.Task] = None
        self._lock = asyncio.Lock()
        self._pending_weights: dict[str, torch.Tensor] = {}
        self.max_model_len = self.config.max_model_len or (self.config.prompt_length + self.config.response_length)
        logger.info("HFRolloutServer replica %s on %s (%s)", replica_rank, device, dtype)

    # -- generation ------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
                       image_data=None, video_data=None, **kwargs) -> TokenOutput:
        if image_data is not None or video_data is not None:
            raise NotImplementedError("the hf rollout is text-only")
        prompt_ids = list(map(int, prompt_ids))
        params = dict(sampling_params)
        if "max_tokens" in params:
            max_tokens = int(params.pop("max_tokens"))
        elif "max_new_tokens" in params:
            max_tokens = int(params.pop("max_new_tokens"))
        else:
            max_tokens = min(self.config.response_length,
                             self.config.prompt_length + self.config.response_length - len(prompt_ids))
        max_tokens = max(1, min(max_tokens, self.max_model_len - len(prompt_ids)))
        request = GenerationRequest(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(params.get("top_k", -1) or -1),
            want_logprobs=bool(params.get("logprobs", False)),
        )
        future = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain())
        result: GenerationResult = await future
        return TokenOutput(
            token_ids=result.token_ids,
            log_probs=result.log_probs if params.get("logprobs", False) else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    def _batch_seed(self, requests: list[GenerationRequest]) -> int | None:
        """A sampling seed from ``rollout.seed``, the training step and the batch's prompts (order-free):
        the same step with the same batch draws the same samples on a rerun. Batches are formed by
        arrival time (``batch_wait_ms``), so a rerun reproduces exactly when its batches match."""
        if self.config.seed is None:
            return None
        import zlib

        digest = 0
        for r in sorted(tuple(x.prompt_ids) for x in requests):
            digest = zlib.crc32(repr(r).encode(), digest)
        return (int(self.config.seed) * 1_000_003 + int(self.global_steps or 0) * 7919 + digest) % (2 ** 63)

    async def _drain(self):
        while self._queue:
            await asyncio.sleep(self.batch_wait_s)  # let concurrent requests join the batch
            batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size:]
            groups: dict[tuple, list] = {}
            for req, fut in batch:
                groups.setdefault(req.group_key(), []).append((req, fut))
            for items in groups.values():
                async with self._lock:
                    try:
                        reqs = [r for r, _ in items]
                        results = await asyncio.to_thread(self.generator.generate, reqs, self._batch_seed(reqs))
                    except Exception as exc:  # noqa: BLE001 - hand the error to every waiting request
                        for _, fut in items:
                            if not fut.done():
                                fut.set_exception(exc)
                        continue
                for (_, fut), res in zip(items, results):
                    if not fut.done():
                        fut.set_result(res)

    # -- weights -------------------------------------------------------------------------------
    async def load_weights(self, named_tensors: dict[str, torch.Tensor], last: bool = True) -> dict:
        """Receive a bucket of weights; apply them all when ``last`` is set."""
        self._pending_weights.update(named_tensors)
        if not last:
            return {}
        weights, self._pending_weights = self._pending_weights, {}
        async with self._lock:
            model = self.generator.model
            state = model.state_dict()
            unknown = [k for k in weights if k not in state]
            if unknown:
                raise KeyError(f"hf rollout: weights not in the model: {unknown[:5]} (of {len(unknown)})")
            with torch.no_grad():
                for name, tensor in weights.items():
                    state[name].copy_(tensor.to(state[name].dtype))
        return {"loaded": len(weights)}

    async def set_global_steps(self, global_steps: int):
        self.global_steps = global_steps

    # -- lifecycle hooks verl calls on every rollout server (nothing to free on CPU) -------------
    async def wake_up(self, tags: list[str] | None = None):
        return None

    async def sleep(self):
        return None

    async def clear_kv_cache(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False):
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True):
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None

    async def ping(self) -> str:
        return "ok"


# --------------------------------------------------------------------------------------------
# verl adapters
# --------------------------------------------------------------------------------------------
class HFServerAdapter(BaseRollout):
    """Lives in each hybrid actor worker; streams the trainer's weights to the replica's server."""

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, device_mesh=None,
                 replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                 * self.config.pipeline_model_parallel_size)
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self.is_leader_rank = self.rollout_rank == 0
        self._server = None
        self.bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20

    def _server_handle(self):
        if self._server is None:
            self._server = ray.get_actor(_server_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        if self.is_leader_rank:
            await self._server_handle().wake_up.remote(tags=tags)

    async def release(self):
        if self.is_leader_rank:
            await self._server_handle().sleep.remote()

    @torch.no_grad()
    async def update_weights(self, weights: Generator[tuple[str, torch.Tensor], None, None],
                             wire_format: str = "named_tensors", global_steps: Optional[int] = None, **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout supports checkpoint wire_format 'named_tensors', got {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError(
                "hf rollout receives merged weights only: set actor_rollout_ref.model.lora.merge=True for LoRA"
            )
        start = time.time()
        bucket: dict[str, torch.Tensor] = {}
        size = 0
        sent = 0
        for name, tensor in weights:  # every rank iterates: gathering full tensors is collective
            if not self.is_leader_rank:
                continue
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            bucket[name] = tensor.detach().to("cpu", copy=True)
            size += bucket[name].numel() * bucket[name].element_size()
            if size >= self.bucket_bytes:
                await self._server_handle().load_weights.remote(bucket, last=False)
                sent += len(bucket)
                bucket, size = {}, 0
        if self.is_leader_rank:
            await self._server_handle().load_weights.remote(bucket, last=True)
            sent += len(bucket)
            if global_steps is not None:
                await self._server_handle().set_global_steps.remote(global_steps)
            logger.info("hf rollout: %d tensors synced in %.2fs", sent, time.time() - start)

    def generate_sequences(self, prompts):
        raise NotImplementedError("the hf rollout serves verl's agent loop (async server mode)")


class HFReplica(RolloutReplica):
    """One :class:`HFRolloutServer` per replica (single node, no tensor parallelism)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.tensor_model_parallel_size != 1 or self.config.pipeline_model_parallel_size != 1:
            raise ValueError(
                "rollout.name=hf runs one model copy per replica: set "
                "actor_rollout_ref.rollout.tensor_model_parallel_size=1 and pipeline_model_parallel_size=1"
            )
        if self.nnodes != 1:
            raise ValueError("rollout.name=hf supports single-node replicas only")

    def rollout_worker_use_gpu(self) -> bool:
        return torch.cuda.is_available()

    async def launch_servers(self):
        visible = ""
        if self.workers and torch.cuda.is_available():
            try:
                from verl.utils.device import get_resource_name

                ids = await self.workers[0].__ray_call__.remote(
                    lambda w: ray.get_runtime_context().get_accelerator_ids().get(get_resource_name(), [])
                )
                visible = ",".join(str(i) for i in ids)
            except Exception:  # noqa: BLE001 - fall back to the default device
                visible = ""
        name = _server_name(self.replica_rank)
        server = ray.remote(HFRolloutServer).options(
            name=name,
            num_cpus=0,
            max_concurrency=self.max_concurrency,
            runtime_env={"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}},
        ).remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank,
                 visible_devices=visible)
        await server.ping.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = name


def register() -> None:
    verl_compat.register_rollout(ROLLOUT_NAME, "async", f"{__name__}.HFServerAdapter")
    RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: HFReplica)


register()
