"""The memory plan: peak memory per device of a stage, estimated from the models' shapes and the
stage's config, before anything is loaded (`align plan`, and a line of every `--dry-run`).

The arithmetic is pure (no torch): `estimate_supervised` and `estimate_rl` take numbers and return
a `MemoryPlan`; `stage_plan` maps a stage's typed config onto those numbers. Only `model_facts`,
which reads each model's config.json and counts its parameters on the meta device, imports torch
(when called). Sources and assumptions, checked against measured peaks in docs/performance.md
("Memory plan"):

- Weights, gradients, AdamW. align trains in float32 (`modeling.load_pretrained`: trained weights
  stay float32; `train.mixed_precision` only sets autocast's compute dtype), so a trained
  parameter costs 4 (weight) + 4 (gradient) + 8 (AdamW's two moments) bytes, and no separate
  master copy exists. Under bf16 autocast, the bf16 copy of each trained weight a matmul uses is
  saved for its backward: +2 bytes per trained parameter while a graph is alive. Frozen models take
  `model.dtype` (`auto`: bf16 on a GPU, float32 on CPU). A LoRA base loaded for training
  (`load_trainable`) is float32 even though it is frozen.
- Activations: the tensors autograd saves for the backward pass, counted per token and layer the
  way Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
  sec. 4.1) count them for GPT, redone for transformers' Llama-family decoder layer with its SDPA
  attention (see `layer_saved`). SDPA's fused kernels keep no (T x T) attention matrix (their
  5as^2b term is gone), but with a padding or packing mask the kernel keeps a float copy of the
  (B, 1, T, T) mask per layer. Dropout is off (align disables it), so there are no masks of it.
  With gradient checkpointing (transformers' per-layer, non-reentrant) only each layer's input is
  kept, and one layer's activations are rebuilt during the backward pass.
- The backward pass is a sweep: layer l's saved tensors are freed as layer l's gradients appear,
  so its peak is the largest of (all activations + the logits' backward), (activations of layers
  1..l + gradients of layers l..L) at l = L and l = 1, and (every gradient). With several
  trained models in one loss (actor and critic), autograd runs the model built last first.
- Logits: (tokens x vocab) float32, several copies at once where the loss is taken (the counts
  are per stage below); with a large vocabulary this is often the peak.
- KV cache of a rollout: 2 (K and V) x layers x kv heads x head dim x (prompt + response)
  x rollout rows, in the compute dtype, plus one layer's copy while `DynamicCache` grows it.
- Data-parallel processes: each process holds everything above for its own micro-batch; DDP adds
  gradient buckets the size of the gradients (torch's default `gradient_as_bucket_view=False`).

Not counted: the CUDA context and library code (not in `torch.cuda.max_memory_allocated`, and
on CPU measured away as the process's memory before training), allocator caching and
fragmentation, the transient copies while weights load, and sharded strategies (FSDP, ZeRO).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from align.errors import AlignError

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cuda", "cpu")

# Copies of a (tokens x vocab) float32 logits tensor alive at once where a loss reads them, each
# counted from the code path (align/ops.py, align/bundle.py):
SFT_LOGIT_COPIES = 3
"""SFT (`ops.masked_nll_sum`): the model's logits, the shifted copy `reshape` makes of the sliced
view, and log_softmax's output, which cross_entropy saves; the backward has the same three
(the log-probs' gradient, its input gradient, the unsliced gradient)."""
RL_LOGIT_COPIES = 3
"""An RL update (`bundle.response_logits`, `ops.selective_log_softmax`, `ops.entropy_from_logits`):
the temperature-scaled logits (saved by logsumexp) and two of the entropy's temporaries at the end
of the forward; in the backward, logsumexp's input gradient, the division's and the slice's."""
SCORING_LOGIT_COPIES = 2
"""A no-grad scoring pass: the head's logits and their temperature-scaled copy (logsumexp's
temporary comes after the raw logits are freed)."""


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs of a decoder: the config.json sizes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True
    """SwiGLU-style MLP (gate, up, down: Llama, Mistral, Qwen, Gemma, Phi-3); else fc1, act, fc2 (GPT-2, OPT, NeoX)."""
    tied: bool = False
    """The output head is the input embedding (`tie_word_embeddings`)."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


NON_GATED = ("gpt2", "gpt_neox", "opt", "gptj", "phi", "bloom", "falcon", "gpt_bigcode")
"""model_type values whose MLP has no gate (two linear layers around the activation)."""


def model_shape(config: Mapping[str, Any] | Any) -> ModelShape:
    """The shape of a model from its config.json (a dict) or a transformers config object (its
    text config, for multimodal wrappers). Names differ by family; the first one present wins."""
    if not isinstance(config, Mapping):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        config = text.to_dict()
    config = config.get("text_config", config) if isinstance(config.get("text_config"), Mapping) else config

    def first(*names: str, default: Any = None) -> Any:
        for name in names:
            if isinstance(config.get(name), int) and not isinstance(config.get(name), bool):
                return config[name]
        if default is None:
            raise AlignError(f"model config has none of {', '.join(names)}; cannot plan its memory")
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    intermediate = config.get("intermediate_size") or config.get("n_inner") or config.get("ffn_dim") or 4 * hidden
    return ModelShape(hidden=hidden, layers=first("num_hidden_layers", "n_layer"), heads=heads, kv_heads=kv_heads,
                      intermediate=intermediate, vocab=first("vocab_size"),
                      gated_mlp=config.get("model_type") not in NON_GATED,
                      tied=bool(config.get("tie_word_embeddings", True)))  # transformers' default: tied


@dataclass(frozen=True)
class LoraTargets:
    """Which linear layers of a decoder layer carry an adapter (for the activations they save)."""

    r: int
    modules: frozenset[str] | None = None
    """None: every linear layer (`lora.target: all`)."""

    def has(self, name: str) -> bool:
        return self.modules is None or name in self.modules


ATTN_IN, MLP_IN = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def layer_saved(s: ModelShape, seq: int, act: int, autocast: bool, lora: LoraTargets | None) -> float:
    """Bytes autograd saves per token in one decoder layer (transformers' Llama-family layer, SDPA
    attention, dropout off), for a trained model whose residual stream is float32.

    Counted tensor by tensor (and checked with `torch.autograd.graph.saved_tensors_hooks` on
    LlamaDecoderLayer, docs/performance.md), per token, h = hidden, I = intermediate:
      RMSNorm (x2):  its input x (pow), rsqrt (1 value), normed x (mul by the weight): 2h + 1, fp32;
                     its output is saved by the linear layers that read it (below);
      attention:     q, k, v after rotary, as SDPA gets them (k, v repeated to every head when a
                     mask is given: transformers' `repeat_kv`), SDPA's output, its logsumexp
                     (1 per head), and a float copy of the (T x T) mask: 4h + heads + T;
      MLP:           gate, up, act(gate), act * up: 4I (ungated: fc1's output and the act's: 2I);
      linear inputs: float32 training shares one saved input among the layers that read it (the
                     norms' outputs: 2h); under autocast each matmul saves its own bf16 cast
                     (q, k, v, gate, up: 5h; o_proj and down read bf16 tensors already saved).
    With LoRA the norms' weights are frozen, so `normed x` is not saved; a frozen linear layer
    saves no input, an adapted one saves its input and the adapter's r-wide middle.
    """
    h, I = s.hidden, s.intermediate
    mlp_in = MLP_IN if s.gated_mlp else ("fc1",)
    down = "down_proj" if s.gated_mlp else "fc2"
    trained = (lambda name: lora.has(name)) if lora is not None else (lambda name: True)
    fp32 = 2 * h + 2 + (0 if lora is not None else 2 * h)  # x, rsqrt (x2 norms); normed x unless frozen
    attention = (2 * h + 2 * h) * act + s.heads * 4 + seq * act  # q, k, v (repeated), out; lse; mask
    mlp = (4 * I if s.gated_mlp else 2 * I) * act
    if not trained(down):
        mlp -= I * act  # act * up (or act(fc1)) is saved for down_proj only
    groups = [(ATTN_IN, h), (mlp_in, h)]
    inputs = 0.0
    for names, width in groups:
        n = sum(trained(name) for name in names)
        inputs += (n * width * act) if autocast else (width * 4 if n else 0)
    adapters = 0.0
    if lora is not None:
        names = (*ATTN_IN, "o_proj", *mlp_in, down)
        adapters = sum(lora.has(name) for name in names) * lora.r * act
    return fp32 * 4 + attention + mlp + inputs + adapters


def layer_backward_transient(s: ModelShape, act: int) -> float:
    """Bytes per token a layer's backward holds at once beyond its saved tensors, at its widest
    point, the MLP: the gradients of act and up (2I) exist before act * up's backward releases what
    it saved (down_proj's backward has already released its input, and its output gradient is
    used up), plus the residual stream's gradient in and out (2h, float32)."""
    return 2 * s.intermediate * act + 2 * s.hidden * 4


def nograd_transient(s: ModelShape, seq: int, act: int) -> float:
    """Bytes per token a forward pass without a graph holds at its widest point (one layer's MLP:
    act, up and their product), plus the residual stream, its norm and the layer's mask copy."""
    return 3 * s.intermediate * act + 3 * s.hidden * 4 + seq * act


@dataclass(frozen=True)
class Trained:
    """One model in a loss's graph: its shape, how many parameters it trains and holds."""

    shape: ModelShape
    params: int
    trained: int
    lora: LoraTargets | None = None
    logits: bool = True
    """Whether the loss reads its vocabulary logits (a causal LM) or a scalar (critic, reward model)."""
    role: str = "model"


@dataclass(frozen=True)
class Item:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    """Peak memory per device of one stage: what stays resident, what each phase adds, the peak."""

    stage: str
    device: str
    precision: str
    processes: int
    resident: list[Item] = field(default_factory=list)
    phases: list[Item] = field(default_factory=list)
    """What each phase adds on top of the resident memory, at its own peak."""
    parts: dict[str, list[Item]] = field(default_factory=dict)
    """The pieces of each phase, for the breakdown."""

    @property
    def resident_bytes(self) -> float:
        return sum(i.bytes for i in self.resident)

    @property
    def peak_phase(self) -> Item:
        return max(self.phases, key=lambda i: i.bytes)

    @property
    def peak_bytes(self) -> float:
        return self.resident_bytes + self.peak_phase.bytes


def backward_peak(models: list[Trained], rows: int, seq: int, logit_tokens: int, logit_copies: int, act: int,
                  autocast: bool, checkpointing: bool) -> tuple[float, list[Item]]:
    """The peak a forward + backward over `rows` x `seq` tokens adds (activations, logits,
    gradients, autocast's weight copies), and its parts. `models` in forward order; the loss reads
    `logit_tokens` positions of each causal LM's logits, `logit_copies` float32 copies at once."""
    tokens = rows * seq
    starts, sweeps, items = [], [], []
    for m in models:
        s = m.shape
        per_layer = layer_saved(s, seq, act, autocast, m.lora) * tokens
        # Around the layers: int64 ids, the rotary tables (cos, sin) and the final norm (x, rsqrt,
        # normed, output; with LoRA's frozen norm and head only x and rsqrt).
        final_norm = s.hidden * 4 + 4 if m.lora else 3 * s.hidden * 4 + 4
        around = tokens * (8 + 2 * s.head_dim * 4 + final_norm)
        kept = tokens * s.hidden * 4 if checkpointing else per_layer  # checkpointing keeps each layer's input
        rebuilt = per_layer if checkpointing else 0.0  # ... and rebuilds one layer in the backward pass
        a = kept * s.layers + around
        grads = 4.0 * m.trained
        transient = layer_backward_transient(s, act) * tokens + rebuilt
        # Autocast's bf16 weight copies, saved by each matmul whose input needs a gradient (frozen
        # LoRA bases included): every linear layer's weight and the output head's (a tied head
        # casts the embedding matrix; the embedding lookup itself casts nothing).
        cast = m.params - (0 if m.logits and s.tied else s.vocab * s.hidden)
        weights16 = 2.0 * cast if autocast else 0.0
        lg = logit_copies * logit_tokens * s.vocab * 4.0 if m.logits else 0.0
        starts.append(a + weights16 + lg)
        # This model's sweep: at its last layer (every activation, the layer's transients), at its
        # first (one layer's activations, nearly every gradient), and at the end (every gradient).
        sweeps.append(max(a + weights16 + transient, kept + around + grads + transient, grads))
        who = "" if m.role == "model" else f"{m.role} "
        items += [Item(f"{who}activations ({'layer inputs: checkpointing' if checkpointing else 'saved'})", a,
                       f"{tokens:,} tokens x {s.layers} layers"),
                  Item(f"{who}backward transients" + (" and the recomputed layer" if checkpointing else ""),
                       transient, "one layer at a time"),
                  Item(f"{who}gradients", grads, f"{m.trained:,} trained x 4 B")]
        if lg:
            items.append(Item(f"{who}logits", lg,
                              f"{logit_tokens:,} tokens x {s.vocab:,} vocab x 4 B x {logit_copies}"))
        if weights16:
            items.append(Item(f"{who}bf16 weight copies (autocast)", weights16))
    # The backward runs the model built last first: the earlier ones' activations wait, the later
    # ones' gradients stay.
    peak, done = sum(starts), 0.0
    for i in reversed(range(len(models))):
        # (of a waiting model's logits only the saved copy is left)
        waiting = sum(starts[:i]) - sum((logit_copies - 1) * logit_tokens * m.shape.vocab * 4.0
                                        for m in models[:i] if m.logits)
        peak = max(peak, waiting + done + sweeps[i])
        done += 4.0 * models[i].trained
    return peak, items


def _adam(trained: int) -> float:
    return 8.0 * trained


@dataclass(frozen=True)
class Held:
    """A model on the device: parameters, bytes per parameter, trained parameters."""

    role: str
    params: int
    weight_bytes: int
    trained: int = 0


def add_resident(plan: MemoryPlan, held: list[Held], ddp: bool) -> None:
    for m in held:
        plan.resident.append(Item(f"{m.role} weights", m.params * m.weight_bytes,
                                  f"{m.params:,} x {m.weight_bytes} B"))
        if m.trained:
            plan.resident.append(Item(f"{m.role} AdamW moments", _adam(m.trained), f"{m.trained:,} x 8 B"))
            if ddp:
                plan.resident.append(Item(f"{m.role} DDP gradient buckets", 4 * m.trained, f"{m.trained:,} x 4 B"))


def estimate_supervised(stage: str, model: Trained, rows: int, seq: int, *, device: str, precision: str,
                        processes: int = 1, checkpointing: bool = False,
                        reference: Held | None = None) -> MemoryPlan:
    """SFT, the reward model, DPO: one trained model (and DPO's frozen reference), a micro-batch of
    `rows` x `seq` tokens. The peak is the larger of the backward pass (with AdamW's moments
    resident from the second step on) and the optimizer step (every gradient)."""
    act, autocast = BYTES[precision], precision != "fp32"
    plan = MemoryPlan(stage, device, precision, processes)
    held = [Held("model", model.params, 4, model.trained)] + ([reference] if reference else [])
    add_resident(plan, held, processes > 1)
    logit_tokens = rows * seq if model.logits else 0
    bwd, items = backward_peak([model], rows, seq, logit_tokens, SFT_LOGIT_COPIES, act, autocast, checkpointing)
    plan.parts["forward + backward"] = items
    plan.phases.append(Item("forward + backward", bwd, f"micro-batch {rows} x {seq} tokens"))
    plan.phases.append(Item("optimizer step", 4 * model.trained, "every gradient"))
    return plan


def estimate_rl(stage: str, actor: Trained, *, rollout_rows: int, update_rows: int, prompt: int, response: int,
                device: str, precision: str, processes: int = 1, checkpointing: bool = False,
                reference: Held | None = None, critic: Trained | None = None, critic_bytes: int = 4,
                value_head: int = 0, reward: Held | None = None, reward_shape: ModelShape | None = None,
                reward_offload: bool = False, frozen_act: int = 4, fused_scoring: bool = False) -> MemoryPlan:
    """An online RL step (align/ppo.py): the rollout (KV cache), the no-grad scoring passes, the
    updates (actor, and critic for gae, in one graph), the optimizer step.

    `reference` is None in `lora` mode (the actor with its adapter disabled); `critic` is a
    separate value model, `value_head` the parameters of `critic.share_actor`'s head; `reward`
    the reward model when there is one on this device (`reward_offload`: it comes over only to
    score). `frozen_act` is the bytes of a frozen model's activations (its weights' dtype)."""
    act, autocast = BYTES[precision], precision != "fp32"
    s, seq = actor.shape, prompt + response
    plan = MemoryPlan(stage, device, precision, processes)
    held = [Held("actor", actor.params, 4, actor.trained)]
    if reference is not None:
        held.append(reference)
    if critic is not None:
        held.append(Held("critic", critic.params, critic_bytes, critic.trained))
    if value_head:
        held.append(Held("value head", value_head, 4, value_head))
    if reward is not None and not reward_offload:
        held.append(reward)
    add_resident(plan, held, processes > 1)

    # 1. rollout: generate's KV cache over prompt + response for every row of the rollout batch
    cache_bytes = act if autocast else 4
    kv = 2 * s.layers * s.kv_dim * seq * rollout_rows * cache_bytes
    kv_growing = kv / s.layers  # DynamicCache concatenates: one layer's old and new copy at once
    prefill = nograd_transient(s, prompt, cache_bytes) * rollout_rows * prompt
    plan.parts["rollout"] = [Item("KV cache", kv + kv_growing, f"K and V x {s.layers} layers x {s.kv_dim} wide x {seq} "
                                  f"tokens x {rollout_rows} rows x {cache_bytes} B"),
                             Item("prefill activations (no grad)", prefill, "one layer at a time")]
    plan.phases.append(Item("rollout", kv + max(kv_growing, prefill), f"{rollout_rows} rows x {seq} tokens"))

    # 2. scoring without grad over the whole rollout batch: the reference (or the actor without
    # its adapter), the reward model, the actor and critic unless the first update provides them
    tokens = rollout_rows * seq
    passes = [("reference log-probs", s, frozen_act if reference is not None else cache_bytes, True)]
    if reward_shape is not None:
        passes.append(("reward scores", reward_shape, frozen_act, False))
    if not fused_scoring:
        passes.append(("old log-probs", s, cache_bytes, True))
        if critic is not None:
            passes.append(("values", critic.shape, cache_bytes, False))
    scoring = []
    for name, shape, nbytes, logits in passes:
        widest = nograd_transient(shape, seq, nbytes) * tokens
        lg = SCORING_LOGIT_COPIES * rollout_rows * response * shape.vocab * 4 if logits else 0.0
        scoring.append(Item(name, widest + lg, f"{rollout_rows} rows x {seq} tokens"))
    plan.parts["scoring (no grad)"] = scoring
    offload = reward.params * reward.weight_bytes if reward is not None and reward_offload else 0.0
    plan.phases.append(Item("scoring (no grad)", max(i.bytes for i in scoring) + offload, "largest pass"))

    # 3. updates: actor (and critic) forward + backward over a micro-batch; logits on the response
    models = [actor] + ([critic] if critic is not None else [])
    bwd, items = backward_peak(models, update_rows, seq, update_rows * response, RL_LOGIT_COPIES, act, autocast,
                                checkpointing)
    if value_head:
        items.append(Item("value head gradients", 4 * value_head))
        bwd += 4 * value_head
    plan.parts["update forward + backward"] = items
    plan.phases.append(Item("update forward + backward", bwd, f"micro-batch {update_rows} x {seq} tokens"))
    trained = actor.trained + (critic.trained if critic else 0) + value_head
    plan.phases.append(Item("optimizer step", 4 * trained, "every gradient"))
    return plan


# ----------------------------------------------------------------------------------------------
# From a stage's config


@dataclass(frozen=True)
class ModelFacts:
    """One model as read from its config.json: shape and parameter counts (causal LM, and the
    backbone a sequence classifier or critic keeps: no output head, plus a 1-wide score head)."""

    shape: ModelShape
    params: int
    """Parameters of the causal LM."""
    backbone: int
    """Parameters without the output head (a tied head is the embedding: nothing is removed)."""
    lora: int = 0
    """Adapter parameters of this stage's LoRA settings (0: no LoRA)."""


def resolve_precision(precision: str, device: str) -> str:
    """A `mixed_precision` setting as the run resolves it: `auto` is bf16 on a GPU, else fp32."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return {"no": "fp32"}.get(precision, precision)


def frozen_bytes(dtype: str, device: str) -> int:
    """Bytes per weight of a frozen model (`model.dtype`; `auto`: bf16 on a GPU, else float32)."""
    if dtype == "auto":
        return 2 if device == "cuda" else 4
    return 4 if dtype == "float32" else 2


def lora_targets(lora: Any) -> LoraTargets:
    return LoraTargets(lora.r, None if lora.target == "all" else frozenset(lora.target))


def stage_plan(stage: str, cfg: Any, facts: dict[str, ModelFacts], *, device: str, precision: str | None = None,
               processes: int = 1) -> MemoryPlan:
    """The memory plan of `stage` with its typed config `cfg` (align/config.py) and the facts of
    each model it loads (`actor`/`model`, and for RL `critic`, `reward`), on `device`, with
    `precision` replacing the config's `mixed_precision` when given. Sizes are worst cases: every
    sequence as long as `data.max_length` allows (RL: longest prompt + `ppo.response_length`)."""
    if device not in DEVICES:
        raise AlignError(f"device must be one of {', '.join(DEVICES)} (got {device!r})")
    if processes < 1:
        raise AlignError(f"processes must be >= 1 (got {processes})")
    section = cfg.ppo if hasattr(cfg, "ppo") else cfg.train
    precision = resolve_precision(precision or section.mixed_precision, device)
    if precision not in PRECISIONS:
        raise AlignError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if hasattr(cfg, "ppo") and precision == "fp16":
        raise AlignError("the RL loop does not support fp16 (one GradScaler cannot serve actor and critic); plan with "
                         "bf16")
    ckpt = cfg.model.gradient_checkpointing
    if not hasattr(cfg, "ppo"):
        return _supervised_stage(stage, cfg, facts["model"], device, precision, processes, ckpt)
    p = cfg.ppo
    lora = cfg.memory_mode == "lora"
    a = facts["actor"]
    actor = Trained(a.shape, a.params, a.lora if lora else a.params, lora_targets(cfg.lora) if lora else None,
                    role="actor")
    reference = None if lora else Held("reference", a.params, frozen_bytes(cfg.model.dtype, device))
    critic, value_head = None, 0
    if "critic" in facts:
        c = facts["critic"]
        trained = c.lora + c.shape.hidden if cfg.critic.lora else c.backbone + c.shape.hidden
        critic = Trained(c.shape, c.backbone + c.shape.hidden, trained,
                         lora_targets(cfg.lora) if cfg.critic.lora else None, logits=False, role="critic")
    elif cfg.critic.share_actor:
        value_head = a.shape.hidden + 1
    reward, reward_shape = None, None
    if "reward" in facts and cfg.reward.device != "cpu":  # `reward.device: cpu` keeps it off the device
        r = facts["reward"]
        reward = Held("reward model", r.backbone + r.shape.hidden, frozen_bytes(cfg.model.dtype, device))
        reward_shape = r.shape
    covered = p.mini_batch_size >= p.rollout_batch_size and p.micro_batch_size >= p.rollout_batch_size
    return estimate_rl(stage, actor, rollout_rows=p.rollout_batch_size, update_rows=p.micro_batch_size,
                       prompt=cfg.data.max_length, response=p.response_length, device=device, precision=precision,
                       processes=processes, checkpointing=ckpt, reference=reference, critic=critic,
                       value_head=value_head, reward=reward, reward_shape=reward_shape,
                       reward_offload=cfg.reward.offload, frozen_act=frozen_bytes(cfg.model.dtype, device),
                       fused_scoring=p.fuse_scoring and covered)


def _supervised_stage(stage: str, cfg: Any, m: ModelFacts, device: str, precision: str, processes: int,
                      ckpt: bool) -> MemoryPlan:
    t, lora = cfg.train, cfg.lora.enabled
    targets = lora_targets(cfg.lora) if lora else None
    if stage == "rm":  # a sequence classifier: no output head, a trained 1-wide score head
        params = m.backbone + m.shape.hidden
        model = Trained(m.shape, params, m.lora + m.shape.hidden if lora else params, targets, logits=False)
        return estimate_supervised(stage, model, 2 * t.batch_size, cfg.data.max_length, device=device,
                                   precision=precision, processes=processes, checkpointing=ckpt)
    model = Trained(m.shape, m.params, m.lora if lora else m.params, targets)
    if stage == "dpo":  # TRL concatenates chosen and rejected; the reference is frozen (none with LoRA)
        reference = None if lora and not cfg.reference else Held("reference", m.params,
                                                                 frozen_bytes(cfg.model.dtype, device))
        return estimate_supervised(stage, model, 2 * t.batch_size, cfg.data.max_length, device=device,
                                   precision=precision, processes=processes, checkpointing=ckpt, reference=reference)
    return estimate_supervised(stage, model, t.batch_size, cfg.data.max_length, device=device, precision=precision,
                               processes=processes, checkpointing=ckpt)


def model_facts(stage: str, cfg: Any) -> dict[str, ModelFacts]:
    """Read every model `stage` loads (config.json only, no weights) and count its parameters on
    the meta device (`modeling.parameter_counts`: exact for any architecture). Imports torch."""
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.config import LoraConfig
    from align.modeling import inspect_model, parameter_counts

    trust = cfg.model.trust_remote_code

    def facts(path: str, key: str, lora: Any) -> ModelFacts:
        config = inspect_model(path, key, trust, score_head=False)
        total, adapter = parameter_counts(config, AutoModelForCausalLM, lora, trust)
        seq_config = copy.deepcopy(config)
        seq_config.num_labels = 1
        backbone = parameter_counts(seq_config, AutoModelForSequenceClassification, None, trust)[0]
        shape = model_shape(config)
        return ModelFacts(shape, total, backbone - shape.hidden, adapter if lora and lora.enabled else 0)

    if not hasattr(cfg, "ppo"):
        return {"model": facts(cfg.model.path, "model.path", cfg.lora)}
    from align.bundle import critic_backbone

    out = {"actor": facts(cfg.model.path, "model.path", LoraConfig(**{**cfg.lora.__dict__, "enabled": True}))}
    critic = critic_backbone(cfg)
    if critic is not None:
        key = "critic.path" if cfg.critic.path else "reward.model" if cfg.reward.model else "model.path"
        out["critic"] = facts(critic, key, LoraConfig(**{**cfg.lora.__dict__, "enabled": True}))
    if cfg.reward.model:
        out["reward"] = facts(cfg.reward.model, "reward.model", None)
    return out


def human(n: float) -> str:
    """Bytes as `~1.2 GiB` / `~340.0 MiB` / `~12.0 KiB`."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def plan_lines(plan: MemoryPlan) -> list[str]:
    """The breakdown `align plan` prints."""
    lines = [f"{plan.stage}: memory plan per device ({plan.device}, {plan.precision}, {plan.processes} process(es)): "
             f"peak ~{human(plan.peak_bytes)} during {plan.peak_phase.name}",
             f"  resident: {human(plan.resident_bytes)}"]
    lines += [f"    {i.name}: {human(i.bytes)} ({i.note})" for i in plan.resident]
    for phase in plan.phases:
        mark = "  <- peak" if phase is plan.peak_phase else ""
        lines.append(f"  {phase.name}: +{human(phase.bytes)} ({phase.note}){mark}")
        if phase.name in ("forward + backward", "update forward + backward"):
            lines.append("    of which (not all at once: the backward pass frees activations as gradients appear):")
        for part in plan.parts.get(phase.name, []):
            lines.append(f"    {part.name}: {human(part.bytes)}" + (f" ({part.note})" if part.note else ""))
    if plan.device == "cpu" and plan.processes > 1:
        total = human(plan.peak_bytes * plan.processes)
        lines.append(f"  on one CPU machine the {plan.processes} processes hold ~{total}")
    return lines


def summary_line(plan: MemoryPlan) -> str:
    """The one `--dry-run` line."""
    return (f"~{human(plan.peak_bytes)} per device at the peak ({plan.peak_phase.name}; {plan.device}, "
            f"{plan.precision}; estimate, `align plan` shows the parts)")


def dry_run_line(stage: str, cfg: Any) -> str:
    """The `memory` line of a `--dry-run` plan: this machine's device and process count."""
    from accelerate import PartialState

    state = PartialState()
    device = "cuda" if state.device.type == "cuda" else "cpu"
    try:
        plan = stage_plan(stage, cfg, model_facts(stage, cfg), device=device, processes=state.num_processes)
    except (AlignError, ValueError, KeyError) as e:  # an architecture the plan cannot read: the dry run goes on
        return f"not estimated ({e})"
    return summary_line(plan)
