"""Sharded training through accelerate: FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3.

Under DDP every process holds the whole model, so the loops may save from the main process and
generate from any one. Under sharding a process holds only its part of the parameters (FSDP2,
ZeRO-3), of the gradients and of the optimizer states (ZeRO-2 and up), and four things change:

1. the Accelerator: accelerate forms FSDP or DeepSpeed state only on an accelerator device; on a
   machine without one (CPU processes over gloo, how CI tests it) `make_accelerator` builds the
   same state by hand (`cpu_accelerator`);
2. generation: every forward gathers parameters collectively, so every process runs the decode
   loop until all have finished (`generate(synced_gpus=True)`, transformers' own flag for FSDP and
   ZeRO-3); under ZeRO-3 the parameters are gathered once around the whole call
   (`deepspeed.zero.GatheredParameters`, as TRL's `unwrap_model_for_generation`);
3. saving: every process takes part in gathering a model's full state dict
   (`accelerator.get_state_dict`) and the main process writes it, so `model/` and each
   checkpoint's model directory stay plain `from_pretrained` checkpoints (LoRA adapters are cut
   from, and merged models merged from, that full state dict: `modeling.save_model`); FSDP2 optimizer states
   are gathered whole the same way (torch.distributed.checkpoint.state_dict); a ZeRO optimizer's
   states stay partitioned: each process writes its own partition file into the checkpoint
   (`write_optimizer_partitions`), and loads it back on resume with the same number of processes;
4. accumulation and stepping: DeepSpeed steps inside `accelerator.backward` at a gradient
   accumulation boundary; `accumulating` marks the micro-batches before the last one, so the
   engine accumulates over exactly the micro-batches the loop gives it (DeepSpeed's own
   `gradient_accumulation_steps` stays 1: align divides each micro-batch's loss itself). The
   engine clips and steps there, so the loops' non-finite guard can stop a diverged DeepSpeed
   run but not skip one update. PPO's actor and critic are two engines, each stepped by the
   backward of its own part of the loss (`backward`).

Every process loads each model whole (`load_models_whole`); `prepare` shards the trained ones,
and the frozen reference and reward models stay whole on every process.

What is not supported under sharding fails before any weight is loaded (`check_supported`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from align.errors import AlignError

FSDP, DEEPSPEED = "fsdp", "deepspeed"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def requested() -> str | None:
    """The sharding strategy an `accelerate launch` asked for (its environment), if any."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return DEEPSPEED
    if _env_flag("ACCELERATE_USE_FSDP"):
        return FSDP
    return None


def strategy(accelerator: Any) -> str | None:
    """`fsdp`, `deepspeed`, or None (one process, DDP, or no accelerator at all)."""
    from accelerate.utils import DistributedType

    if accelerator is None:
        return None

    return {DistributedType.FSDP: FSDP, DistributedType.DEEPSPEED: DEEPSPEED}.get(accelerator.distributed_type)


def zero_stage(accelerator: Any) -> int | None:
    return accelerator.state.deepspeed_plugin.zero_stage if strategy(accelerator) == DEEPSPEED else None


def check_launch() -> None:
    """Settings of an accelerate config file that align cannot honour, refused before anything loads."""
    where = "the accelerate config"
    if requested() == FSDP and os.environ.get("FSDP_VERSION", "1") != "2":
        raise AlignError(f"{where}: FSDP1 (fsdp_version: 1) is not supported; set fsdp_version: 2 "
                         "(configs/accelerate/fsdp2.yaml)")
    if requested() == DEEPSPEED:
        if importlib.util.find_spec("deepspeed") is None:
            raise AlignError(f"{where} asks for DeepSpeed, which is not installed: pip install -e '.[deepspeed]'")
        if _env_flag("ACCELERATE_DEEPSPEED_ZERO3_INIT"):
            # zero.Init would also partition the frozen reference and reward models, which are
            # never prepared, so their forward passes would see empty parameters.
            raise AlignError(f"{where}: zero3_init_flag: true is not supported (the frozen PPO models would be "
                             "partitioned too); set it to false")
        if os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1") not in ("1", "auto"):
            raise AlignError(f"{where}: deepspeed gradient_accumulation_steps must be 1: align accumulates "
                             "train.grad_accum micro-batches itself")


def cpu_accelerator(mixed_precision: str, **kwargs: Any) -> Any:
    """The Accelerator of an FSDP or DeepSpeed launch on a machine with no accelerator device.

    accelerate 1.15 forms FSDP or DeepSpeed state only when it finds a GPU-like device (on CPU it
    falls back to plain DDP over gloo, silently). DeepSpeed's own CPU accelerator runs ZeRO over
    gloo once accelerate is told the backend; FSDP2 (`fully_shard`) runs on CPU tensors as it is,
    so the CPU process group is built first and then given accelerate's FSDP plugin, exactly as
    accelerate sets it on a GPU (`AcceleratorState` stores `distributed_type` and `fsdp_plugin`).
    Everything after that (prepare, backward, clipping, state dicts) is accelerate's own code.
    `kwargs` go to the Accelerator (the trackers: `log_with`, `project_config`).
    """
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    if requested() == DEEPSPEED:
        _skip_deepspeed_shm_comm()
        return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
                           **kwargs)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True, **kwargs)
    plugin = FullyShardedDataParallelPlugin()  # read from accelerate launch's FSDP_* variables
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def load_models_whole(accelerator: Any) -> None:
    """Under ZeRO-3 accelerate registers its DeepSpeed config with transformers whatever
    `zero3_init_flag` says, and `from_pretrained` then builds every model partitioned
    (`deepspeed.zero.Init`): the frozen reference and reward models too, which are never prepared,
    and even the meta-device models of `--dry-run`'s parameter count. Unregistered, every process
    loads each model whole and `prepare` partitions only the trained one."""
    if zero_stage(accelerator) == 3:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _skip_deepspeed_shm_comm() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (C++, with torch's
    headers) at its first process group: minutes of compiling on a small machine, and a compiler
    it needs, for a speed-up of CPU all-reduce only. Marked incompatible, DeepSpeed falls back to
    plain gloo collectives (`deepspeed.comm.torch.build_shm_op` returns None). GPUs never build it."""
    import deepspeed.ops

    compatible = dict(deepspeed.ops.__compatible_ops__)  # probed lazily by the module's __getattr__
    compatible["deepspeed_shm_comm"] = False
    deepspeed.ops.__compatible_ops__ = compatible


def check_supported(accelerator: Any, *, critic: str | None = None) -> None:
    """What a stage cannot do under the launch's sharding: a one-line error before any weight loads.
    `critic`: the PPO critic's kind (`separate` or `shared`), None without one."""
    kind = strategy(accelerator)
    if kind is None:
        return
    name = "FSDP" if kind == FSDP else f"DeepSpeed ZeRO-{zero_stage(accelerator)}"
    if critic == "shared":
        raise AlignError(f"critic.share_actor under {name} is not supported yet; use a separate critic "
                         "(critic.share_actor: false)" + (" or DDP" if kind == FSDP else ""))


def configure_deepspeed(accelerator: Any, micro_batch_size: int, max_grad_norm: float) -> None:
    """Before `prepare`: DeepSpeed's batch bookkeeping and its clipping follow align's config keys
    (the engine clips inside its step; align's `max_grad_norm` wins over the file's value, as
    align's mixed precision does)."""
    if strategy(accelerator) != DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = micro_batch_size * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm


@contextlib.contextmanager
def accumulating(accelerator: Any, models: list[Any], accumulate: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: with `accumulate`, gradients are only summed
    (no synchronisation across processes, and under DeepSpeed no optimizer step at this backward).
    The last micro-batch of an update passes accumulate=False."""
    with contextlib.ExitStack() as stack:
        if accumulate:
            for model in models:
                stack.enter_context(accelerator.no_sync(model))
            if strategy(accelerator) == DEEPSPEED:
                # accelerate tells the engine "boundary or not" from this flag at each backward
                # (DeepSpeedEngineWrapper.backward); it has no public setter outside accumulate().
                accelerator.gradient_state._set_sync_gradients(False)
                stack.callback(accelerator.gradient_state._set_sync_gradients, True)
        yield


def backward(accelerator: Any, parts: list[tuple[Any, torch.Tensor]], frozen: tuple[Any, ...] = ()) -> torch.Tensor:
    """The backward of a micro-batch's loss that is a sum of parts, each depending on one prepared
    model's parameters alone (PPO: the policy loss on the actor, the value loss on the critic);
    returns the summed loss. `frozen`: models that take no step in this update (PPO's actor while
    the critic warms up).

    Without DeepSpeed: one backward of the sum (a frozen model's gradients are simply not stepped).
    Under DeepSpeed each prepared model is an engine of its own, and `accelerator.backward` reaches
    only the first one prepared (accelerate keeps one `DeepSpeedEngineWrapper`; TRL's PPO trainer
    wrapped policy and value in one module for this reason). So each engine runs the backward of
    its own part and, at the accumulation boundary, clips and steps itself, exactly as accelerate
    drives the first; a frozen engine's part is left out, since its backward would also step it."""
    loss = parts[0][1]
    for _, part in parts[1:]:
        loss = loss + part
    if strategy(accelerator) != DEEPSPEED:
        accelerator.backward(loss)
        return loss
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    first = accelerator.deepspeed_engine_wrapped
    for model, part in parts:
        if any(model is f for f in frozen):
            continue
        engine = first if model is first.engine else DeepSpeedEngineWrapper(model)
        engine.backward(part, sync_gradients=accelerator.sync_gradients)
    return loss


def clip_grad_norm(accelerator: Any, model: Any, max_norm: float) -> torch.Tensor:
    """`accelerator.clip_grad_norm_(model.parameters(), max_norm)` as a plain float tensor (FSDP2
    returns a replicated DTensor, DeepSpeed a float: the norm that model's engine computed when it clipped
    and stepped inside the last backward).

    Under FSDP accelerate 1.15 finds the model by comparing parameter lists with `==`, which
    raises when two prepared models (PPO's actor and critic) have as many parameters; with one
    device mesh its FSDP2 clipping is `torch.nn.utils.clip_grad_norm_` itself, called here."""
    if strategy(accelerator) == FSDP:
        accelerator.unscale_gradients()
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
    elif strategy(accelerator) == DEEPSPEED:
        # This engine's own norm (accelerate's clip_grad_norm_ returns its first engine's); None
        # before the engine's first step, as for an actor frozen while the critic warms up.
        norm = model.get_global_grad_norm()
        norm = 0.0 if norm is None else norm
    else:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return torch.as_tensor(norm, dtype=torch.float32).detach()


@contextlib.contextmanager
def gathered_for_generation(accelerator: Any, model: Any) -> Iterator[None]:
    """Around `generate` under ZeRO-3: every parameter gathered once for the whole decode loop
    (otherwise each step of each layer gathers again). Under FSDP2 each decoder layer gathers
    itself in its forward, but the root's own parameters (embeddings, final norm, head) are
    gathered by the root module's forward, which a peft model's `generate` never calls (it calls
    its base model's): for a peft model they are gathered around the call (`FSDPModule.unshard`)."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
    elif strategy(accelerator) == FSDP and hasattr(model, "get_base_model"):
        # The root must be lazily initialised before any child runs a forward of its own (a child
        # initialised first is taken for a root, and the root's next forward fails): one forward of
        # one token through the root does it, then its parameters stay gathered for the call.
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=accelerator.device))
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def sample(accelerator: Any, model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
           **kwargs: Any) -> Any:
    """`align.generation.sample` under the launch's sharding (every process in step, ZeRO-3's
    parameters gathered); the plain call without sharding."""
    from align.generation import sample as plain_sample

    with gathered_for_generation(accelerator, model):
        return plain_sample(model, tokenizer, prompts, max_new_tokens, synced=strategy(accelerator) is not None,
                            **kwargs)


def full_state_dicts(accelerator: Any, prepared: dict[str, Any]) -> dict[str, dict[str, torch.Tensor] | None]:
    """role -> the full state dict of each prepared model, on the main process (None elsewhere, and
    None for every role when nothing is sharded: the caller saves the unwrapped model as before).
    Every process must call this: gathering is collective."""
    if strategy(accelerator) is None:
        return {role: None for role in prepared}
    out = {}
    for role, model in prepared.items():
        state = accelerator.get_state_dict(model)
        out[role] = {k: v.detach().cpu() for k, v in state.items()} if accelerator.is_main_process else None
    return out


def optimizer_states(accelerator: Any, optimizers: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """name -> a whole optimizer state to write into trainer_state.pt on the main process, for
    FSDP2 (gathered from every process; `optimizers`: name -> (prepared model, prepared
    optimizer)). Empty for DeepSpeed, whose partitions go to `write_optimizer_partitions`, and
    when nothing is sharded."""
    if strategy(accelerator) != FSDP:
        return {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {name: get_optimizer_state_dict(model, opt.optimizer, options=options)
            for name, (model, opt) in optimizers.items()}


def partition_file(name: str, rank: int) -> str:
    return f"{name}-zero-rank{rank:03d}.pt"


def write_optimizer_partitions(accelerator: Any, optimizers: dict[str, tuple[Any, Any]], folder: Path) -> None:
    """DeepSpeed: this process's ZeRO partition of each optimizer's state, into `folder`."""
    if strategy(accelerator) != DEEPSPEED:
        return
    for name, (_, opt) in optimizers.items():
        torch.save(opt.optimizer.state_dict(), folder / partition_file(name, accelerator.process_index))


def load_optimizer_states(accelerator: Any, optimizers: dict[str, tuple[Any, Any]], saved: dict[str, Any],
                          checkpoint: Path) -> None:
    """Restore each optimizer saved by `optimizer_states` / `write_optimizer_partitions`."""
    kind = strategy(accelerator)
    if kind == FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        for name, (model, opt) in optimizers.items():
            # Every process read the same whole state from trainer_state.pt and keeps its shard.
            set_optimizer_state_dict(model, opt.optimizer, saved[name],
                                     options=StateDictOptions(full_state_dict=True))
    elif kind == DEEPSPEED:
        rank, world = accelerator.process_index, accelerator.num_processes
        for name, (_, opt) in optimizers.items():
            path = checkpoint / partition_file(name, rank)
            if not path.is_file():
                raise AlignError(f"{checkpoint}: {path.name} is missing; a DeepSpeed checkpoint resumes only with the "
                                 f"number of processes that wrote it ({world} now)")
            partitions: list[Any] = [None] * world  # ZeRO reads the entry of its own rank
            partitions[rank] = torch.load(path, map_location="cpu", weights_only=False)
            # fp32 master partitions from the file: bit-exact with the uninterrupted run.
            opt.optimizer.load_state_dict(partitions, load_from_fp32_weights=True)


def sharded_names(accelerator: Any, optimizers: dict[str, Any]) -> set[str]:
    """The stateful names whose state is saved by this module rather than by `state_dict()`."""
    return set(optimizers) if strategy(accelerator) is not None else set()
