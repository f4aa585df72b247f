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
- Sharded strategies (`Sharding`; `align plan --strategy`, or the `accelerate launch` a dry run
  is in): only the trained models are split (align/sharding.py: every process loads each model
  whole, `prepare` shards the trained ones; the frozen reference and reward models stay whole on
  every process), so a phase `loading (before prepare)` holds every model whole. Per trained
  model, P parameters, T trained, N processes, the accounting of the ZeRO paper (Rajbhandari et
  al. 2020, sec. 3.1 and 5: with mixed precision 2 bytes of parameters, 2 of gradients and 12 of
  optimizer state, float32 master weight and Adam's two moments, per parameter; ZeRO-2 splits the
  gradients and the 12, ZeRO-3 the parameters too):
  - FSDP2 (`fully_shard`, `reshard_after_forward: true`; torch's `fully_shard` docs, accelerate
    1.15's `fsdp2_prepare_model`: one unit per decoder layer, one for an untied input embedding,
    one for the final norm and output head, which it shards with `reshard_after_forward=False`,
    and the root): float32 weights 4P/N, AdamW 8T/N, gradients 4T/N; while a pass runs, the
    head unit gathered from its forward to the end of the backward and one other unit at a time
    beside it, in the compute dtype (2 B under bf16's MixedPrecisionPolicy), on a GPU one more
    for the prefetched all-gather, and in the backward a unit's unsharded float32 gradients
    before their reduce-scatter. No autocast weight copies: the gathered weights are already in
    the compute dtype.
  - DeepSpeed (`deepspeed_config` keys unset: DeepSpeed's defaults, `reduce_bucket_size` 5e8
    elements, `stage3_param_persistence_threshold` 1e5, `stage3_max_reuse_distance` 1e9): with
    bf16 or fp16 the engine casts the whole module (2-byte weights and gradients, activations as
    under autocast), else float32. ZeRO-2: weights whole, a float32 master copy of this
    process's partition 4T/N (stage 1/2 clone it even from float32 weights), AdamW 8T/N; in the
    backward every gradient goes into the reduce bucket until it holds `reduce_bucket_size`
    elements (a model under 5e8 trained parameters: all of them; on a GPU the allocator takes
    the whole bucket, on a CPU only the pages written become resident), then into this
    process's float32 gradient partition 4T/N. ZeRO-3: weights partitioned (a tensor under the
    persistence threshold stays whole on every process), a master copy only when the weights
    are not float32, AdamW 8T/N, the gradient partitions (allocated at start) and the reduce
    bucket resident, and reducing the bucket concatenates its gradients into a new buffer (its
    size again, as the backward ends); `generate` runs inside `GatheredParameters` (the whole actor), and from
    the second step on a gathered parameter that is used again within `stage3_max_reuse_distance`
    parameters stays gathered until the step: every forward parameter is used again in the
    backward, so up to ~5e8 parameters a model stays gathered whole while it trains or scores.

Not counted: the CUDA context and library code (not in `torch.cuda.max_memory_allocated`, and
on CPU measured away as the process's memory before training), allocator caching and
fragmentation, the transient copies while weights load (ZeRO-1/2 flatten the weights into one
buffer, briefly a second copy), communication buffers of NCCL or gloo, DeepSpeed's CPU offload
(`offload_optimizer_device` / `offload_param_device`), FSDP1, ZeRO-1, FSDP2 without
`reshard_after_forward` (refused or not planned), and a DeepSpeed JSON config's own bucket
sizes (the plan uses the defaults above).
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
    strategy: str = "none"
    """How the processes split the trained models (`STRATEGIES`)."""
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
                  autocast: bool, checkpointing: bool, shard: Sharding | None = None,
                  device: str = "cpu") -> tuple[float, list[Item]]:
    """The peak a forward + backward over `rows` x `seq` tokens adds (activations, logits,
    gradients, autocast's weight copies; under sharding the gathered parameters), and its parts.
    `models` in forward order; the loss reads `logit_tokens` positions of each causal LM's logits,
    `logit_copies` float32 copies at once."""
    shard = shard or Sharding()
    tokens = rows * seq
    starts, sweeps, items, gathered = [], [], [], 0.0
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
        grads, grad_items = shard.gradients(m, device, autocast)
        transient = layer_backward_transient(s, act) * tokens + rebuilt + shard.unit_gradients(m)
        # Autocast's bf16 weight copies, saved by each matmul whose input needs a gradient (frozen
        # LoRA bases included): every linear layer's weight and the output head's (a tied head
        # casts the embedding matrix; the embedding lookup itself casts nothing).
        cast = m.params - (0 if m.logits and s.tied else s.vocab * s.hidden)
        # (Under FSDP2 and DeepSpeed the gathered weights are already in the compute dtype.)
        weights16 = 2.0 * cast if autocast and not shard.sharded else 0.0
        held = shard.gathered(m, device, autocast, "update")
        gathered += held
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
                  *(grad_items or [Item(f"{who}gradients", grads, f"{m.trained:,} trained x 4 B")])]
        if held:
            items.append(Item(f"{who}{shard.gathered_name}", held, shard.gathered_note(m, device)))
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
        done += shard.gradients(models[i], device, autocast)[0]
    # Gathered parameters stay for the whole pass (FSDP2's root unit; ZeRO-3 keeps what it reuses).
    return peak + gathered, items


def _adam(trained: int) -> float:
    return 8.0 * trained


@dataclass(frozen=True)
class Held:
    """A model on the device: parameters, bytes per parameter, trained parameters (and, for a
    trained model, its `Trained`: the shape a sharded strategy's units are cut from)."""

    role: str
    params: int
    weight_bytes: int
    trained: int = 0
    model: Trained | None = None


# ----------------------------------------------------------------------------------------------
# Data parallelism and sharding

STRATEGIES = ("none", "ddp", "fsdp", "zero2", "zero3")
STRATEGY_NAMES = {"none": "one process", "ddp": "DDP", "fsdp": "FSDP2", "zero2": "DeepSpeed ZeRO-2",
                  "zero3": "DeepSpeed ZeRO-3"}


def layer_params(s: ModelShape) -> int:
    """Parameters of one decoder layer (FSDP2's unit: accelerate wraps each `_no_split_modules`
    block): q and o (h x h), k and v (kv x h), the MLP (3 or 2 x h x I), two norms (biases left out)."""
    h = s.hidden
    return 2 * h * h + 2 * h * s.kv_dim + (3 if s.gated_mlp else 2) * h * s.intermediate + 2 * h


def weight_numels(s: ModelShape, logits: bool) -> list[int]:
    """The size of each weight tensor of a decoder (for ZeRO-3's persistence threshold): every
    layer's projections and norms, the embedding, the final norm, and the output head (untied) or a
    critic's 1-wide score head."""
    h, kv, i = s.hidden, s.kv_dim, s.intermediate
    layer = [h * h, kv * h, kv * h, h * h] + [i * h] * (3 if s.gated_mlp else 2) + [h, h]
    head = ([s.vocab * h] if not s.tied else []) if logits else [h]
    return layer * s.layers + [s.vocab * h, h] + head


@dataclass(frozen=True)
class Sharding:
    """How `processes` processes hold each trained model (`strategy`), with the engine settings
    that size what they hold: DeepSpeed's defaults, which accelerate keeps when its config file
    sets no `deepspeed_config_file` (configs/accelerate/deepspeed_*.yaml: accelerate fills these
    keys from the model only where a DeepSpeed JSON says `auto`)."""

    strategy: str = "none"
    processes: int = 1
    reduce_bucket: int = 500_000_000
    """`zero_optimization.reduce_bucket_size` (elements; DeepSpeed's default 5e8)."""
    persistence: int = 100_000
    """`stage3_param_persistence_threshold`: ZeRO-3 keeps a tensor this small whole on every process."""
    reuse_distance: int = 1_000_000_000
    """`stage3_max_reuse_distance` (parameters): ZeRO-3 keeps a gathered parameter that is used
    again within this many parameters of computation, until the optimizer step."""

    @property
    def sharded(self) -> bool:
        return self.strategy in ("fsdp", "zero2", "zero3")

    @property
    def gathered_name(self) -> str:
        return "gathered parameters (FSDP2 units)" if self.strategy == "fsdp" else "gathered parameters (ZeRO-3)"

    @staticmethod
    def ds_bytes(autocast: bool) -> int:
        """Bytes per weight under DeepSpeed: with bf16 or fp16 the engine casts the whole module
        (the ZeRO paper's 2-byte parameters and gradients); without, float32."""
        return 2 if autocast else 4

    def persistent(self, m: Trained) -> int:
        """ZeRO-3: parameters kept whole on every process (tensors under the threshold; a LoRA
        adapter's matrices are r-wide, counted whole)."""
        small = sum(n for n in weight_numels(m.shape, m.logits) if n <= self.persistence)
        if m.lora is not None:
            small += m.trained
        return min(small, m.params)

    @staticmethod
    def tail(m: Trained) -> int:
        """FSDP2: the unit accelerate shards with `reshard_after_forward=False` (the final norm and the
        output head, the embedding too when tied; a critic's score head sits in the root unit, also
        kept): gathered from its forward to the end of the backward."""
        s = m.shape
        return s.vocab * s.hidden + s.hidden if m.logits else 2 * s.hidden

    @staticmethod
    def unit(m: Trained) -> int:
        """FSDP2: the largest unit gathered one at a time (a decoder layer, or an untied input embedding)."""
        s = m.shape
        return max(layer_params(s), 0 if m.logits and s.tied else s.vocab * s.hidden)

    def resident(self, m: Held, device: str, autocast: bool) -> list[Item]:
        """A trained model's weights and optimizer state on one process, the whole step long."""
        n, t, who = self.processes, m.trained, m.role
        if self.strategy in ("none", "ddp"):
            items = [Item(f"{who} weights", m.params * m.weight_bytes, f"{m.params:,} x {m.weight_bytes} B")]
            if t:
                items.append(Item(f"{who} AdamW moments", _adam(t), f"{t:,} x 8 B"))
            if t and self.strategy == "ddp":
                items.append(Item(f"{who} DDP gradient buckets", 4 * t, f"{t:,} x 4 B"))
            return items
        if self.strategy == "fsdp":
            return [Item(f"{who} weights (1/{n} shard)", m.params * 4 / n, f"{m.params:,} x 4 B / {n}"),
                    Item(f"{who} AdamW moments (1/{n} shard)", _adam(t) / n, f"{t:,} x 8 B / {n}")]
        w = self.ds_bytes(autocast)
        master = Item(f"{who} fp32 master weights (1/{n} partition)", 4 * t / n, f"{t:,} x 4 B / {n}")
        adam = Item(f"{who} AdamW moments (1/{n} partition)", _adam(t) / n, f"{t:,} x 8 B / {n}")
        if self.strategy == "zero2":  # ZeRO-1/2 clones the master partition even from float32 weights
            return [Item(f"{who} weights (whole)", m.params * w, f"{m.params:,} x {w} B"), master, adam]
        keep = self.persistent(m.model) if m.model is not None else 0
        items = [Item(f"{who} weights (1/{n} partition, small tensors whole)", (m.params - keep) * w / n + keep * w,
                      f"{m.params - keep:,} x {w} B / {n} + {keep:,} under {self.persistence:,} a tensor x {w} B")]
        if w != 4:  # in float32 ZeRO-3 steps the partition itself (no copy)
            items.append(master)
        items += [adam, Item(f"{who} gradient partitions", t * w / n, f"{t:,} x {w} B / {n}, allocated at start")]
        # The reduce bucket: allocated whole at start; a GPU's allocator takes all of it, on a CPU
        # only the pages the gradients are written to become resident (the model's, up to the size).
        bucket = self.reduce_bucket if device == "cuda" else min(self.reduce_bucket, t)
        items.append(Item(f"{who} gradient reduce bucket", bucket * w, f"{bucket:,} x {w} B (reduce_bucket_size "
                          f"{self.reduce_bucket:,})"))
        return items

    def gradients(self, m: Trained, device: str, autocast: bool) -> tuple[float, list[Item]]:
        """Gradients alive while the backward pass sweeps (`backward_peak`'s `grads`) and their items
        (none: the caller names plain gradients)."""
        n, t, who = self.processes, m.trained, "" if m.role == "model" else f"{m.role} "
        if self.strategy in ("none", "ddp"):
            return 4.0 * t, []
        if self.strategy == "fsdp":
            return 4.0 * t / n, [Item(f"{who}gradients (1/{n} shard)", 4.0 * t / n, f"{t:,} trained x 4 B / {n}")]
        w = self.ds_bytes(autocast)
        bucket = self.reduce_bucket if device == "cuda" else min(self.reduce_bucket, t)
        if self.strategy == "zero3":
            # The partitions and the bucket are resident; reducing the bucket, DeepSpeed's
            # `reduce_scatter_coalesced` concatenates its gradients, rank by rank, into a new buffer.
            flat = min(self.reduce_bucket, t) * w
            return flat, [Item(f"{who}reduce-scatter copy of the bucket", flat, "as the backward ends")]
        # ZeRO-2: the bucket (new each backward) takes every gradient until it holds reduce_bucket_size,
        # then reduces into this process's float32 partition.
        items = [Item(f"{who}gradient reduce bucket", bucket * w, f"{bucket:,} x {w} B (reduce_bucket_size "
                      f"{self.reduce_bucket:,})"),
                 Item(f"{who}gradient partition", 4.0 * t / n, f"{t:,} x 4 B / {n}")]
        return bucket * w + 4.0 * t / n, items

    def unit_gradients(self, m: Trained) -> float:
        """FSDP2: one unit's unsharded gradients before they are reduce-scattered (float32)."""
        if self.strategy != "fsdp" or not m.params:
            return 0.0
        unit = max(self.unit(m), self.tail(m))
        return 4.0 * m.trained * min(unit, m.params) / m.params

    def gathered(self, m: Trained, device: str, autocast: bool, phase: str) -> float:
        """Parameters gathered whole beyond the resident shard while a pass over `m` runs.

        FSDP2 (reshard_after_forward): the tail unit (`tail`) stays gathered from the forward to
        the end of the backward, one other unit at a time beside it (`unit`), and on a GPU the
        next one's all-gather prefetched; in the compute dtype.
        ZeRO-3: `generate` runs inside `GatheredParameters` (align/sharding.py): the whole model;
        in the other passes, from the second step on (once the module trace is complete), a
        gathered parameter that is used again within `reuse_distance` parameters stays gathered
        until the step: a forward's parameters are all used again in its backward, so with the
        default 1e9 a model of up to ~5e8 parameters stays gathered whole."""
        if self.strategy == "fsdp":
            c = 2 if autocast else 4
            return (self.tail(m) + self.unit(m) * (2 if device == "cuda" else 1)) * c
        if self.strategy == "zero3":
            spread = m.params - self.persistent(m)
            if phase != "rollout":
                spread = min(spread, self.reuse_distance // 2)
            return spread * self.ds_bytes(autocast)
        return 0.0

    def gathered_note(self, m: Trained, device: str) -> str:
        if self.strategy == "fsdp":
            layers = 2 if device == "cuda" else 1
            return f"head unit {self.tail(m):,} + {layers} unit(s) of {self.unit(m):,} parameters"
        return f"{m.params - self.persistent(m):,} partitioned parameters, kept while reused"

    def step_bytes(self, trained: list[Trained], autocast: bool) -> tuple[float, str]:
        """What the optimizer step holds beyond the resident memory: the gradients it reads."""
        n, t = self.processes, sum(m.trained for m in trained)
        if self.strategy in ("none", "ddp"):
            return 4.0 * t, "every gradient"
        if self.strategy == "fsdp":
            return 4.0 * t / n, f"every gradient's 1/{n} shard"
        if self.strategy == "zero2":
            return 4.0 * t / n, f"the float32 gradient partition (1/{n})"
        return 0.0, "gradient partitions resident"


def add_resident(plan: MemoryPlan, held: list[Held], shard: Sharding, autocast: bool) -> None:
    """Every model's weights (and the trained ones' optimizer state) on one process. Frozen models
    (the reference, the reward model) are whole on every process under every strategy."""
    for m in held:
        if m.trained and m.model is not None:
            plan.resident += shard.resident(m, plan.device, autocast)
        else:
            plan.resident.append(Item(f"{m.role} weights", m.params * m.weight_bytes,
                                      f"{m.params:,} x {m.weight_bytes} B"))
            if m.trained:  # a value head (critic.share_actor: DDP or one process only)
                plan.resident.append(Item(f"{m.role} AdamW moments", _adam(m.trained), f"{m.trained:,} x 8 B"))
                if shard.strategy == "ddp":
                    plan.resident.append(Item(f"{m.role} DDP gradient buckets", 4 * m.trained,
                                              f"{m.trained:,} x 4 B"))


def add_loading(plan: MemoryPlan, held: list[Held], shard: Sharding) -> None:
    """Under sharding every process loads each model whole, trained ones in float32, before
    `prepare` shards the trained ones (align/sharding.py `load_models_whole`): a phase of its own."""
    if not shard.sharded:
        return
    whole = sum(m.params * (4 if m.trained else m.weight_bytes) for m in held)
    plan.phases.append(Item("loading (before prepare)", max(whole - plan.resident_bytes, 0.0),
                            f"every model whole: {human(whole)}"))


def resolve_sharding(strategy: str | None, processes: int) -> Sharding:
    """The strategy a plan uses: None is DDP with several processes, else one process."""
    if processes < 1:
        raise AlignError(f"processes must be >= 1 (got {processes})")
    strategy = strategy or ("ddp" if processes > 1 else "none")
    if strategy not in STRATEGIES:
        raise AlignError(f"strategy must be one of {', '.join(STRATEGIES)} (got {strategy!r})")
    if strategy == "none" and processes > 1:
        raise AlignError(f"strategy none is one process (got {processes} processes; ddp, fsdp, zero2 or zero3 "
                         "spread a run over several)")
    return Sharding(strategy, processes)


def estimate_supervised(stage: str, model: Trained, rows: int, seq: int, *, device: str, precision: str,
                        processes: int = 1, checkpointing: bool = False,
                        reference: Held | None = None, strategy: str | None = None) -> MemoryPlan:
    """SFT, the reward model, DPO: one trained model (and DPO's frozen reference), a micro-batch of
    `rows` x `seq` tokens on each process. The peak is the larger of the backward pass (with
    AdamW's moments resident from the second step on) and the optimizer step (every gradient);
    under sharding also the loading of the whole model before `prepare`."""
    act, autocast = BYTES[precision], precision != "fp32"
    shard = resolve_sharding(strategy, processes)
    plan = MemoryPlan(stage, device, precision, processes, shard.strategy)
    held = [Held("model", model.params, 4, model.trained, model)] + ([reference] if reference else [])
    add_resident(plan, held, shard, autocast)
    add_loading(plan, held, shard)
    logit_tokens = rows * seq if model.logits else 0
    bwd, items = backward_peak([model], rows, seq, logit_tokens, SFT_LOGIT_COPIES, act, autocast, checkpointing,
                               shard, device)
    plan.parts["forward + backward"] = items
    plan.phases.append(Item("forward + backward", bwd, f"micro-batch {rows} x {seq} tokens"))
    plan.phases.append(Item("optimizer step", *shard.step_bytes([model], autocast)))
    return plan


def estimate_rl(stage: str, actor: Trained, *, rollout_rows: int, update_rows: int, prompt: int, response: int,
                device: str, precision: str, processes: int = 1, checkpointing: bool = False,
                reference: Held | None = None, critic: Trained | None = None, critic_bytes: int = 4,
                value_head: int = 0, reward: Held | None = None, reward_shape: ModelShape | None = None,
                reward_offload: bool = False, frozen_act: int = 4, fused_scoring: bool = False,
                strategy: str | None = None) -> MemoryPlan:
    """An online RL step (align/ppo.py): the rollout (KV cache), the no-grad scoring passes, the
    updates (actor, and critic for gae, in one graph), the optimizer step.

    `reference` is None in `lora` mode (the actor with its adapter disabled); `critic` is a
    separate value model, `value_head` the parameters of `critic.share_actor`'s head; `reward`
    the reward model when there is one on this device (`reward_offload`: it comes over only to
    score). `frozen_act` is the bytes of a frozen model's activations (its weights' dtype)."""
    act, autocast = BYTES[precision], precision != "fp32"
    s, seq = actor.shape, prompt + response
    shard = resolve_sharding(strategy, processes)
    if shard.sharded and value_head:
        raise AlignError(f"critic.share_actor under {STRATEGY_NAMES[shard.strategy]} is not supported "
                         "(align/sharding.py); plan a separate critic")
    plan = MemoryPlan(stage, device, precision, processes, shard.strategy)
    held = [Held("actor", actor.params, 4, actor.trained, actor)]
    if reference is not None:
        held.append(reference)
    if critic is not None:
        held.append(Held("critic", critic.params, critic_bytes, critic.trained, critic))
    if value_head:
        held.append(Held("value head", value_head, 4, value_head))
    if reward is not None and not reward_offload:
        held.append(reward)
    add_resident(plan, held, shard, autocast)
    add_loading(plan, held, shard)

    # 1. rollout: generate's KV cache over prompt + response for every row of the rollout batch
    cache_bytes = act if autocast else 4
    kv = 2 * s.layers * s.kv_dim * seq * rollout_rows * cache_bytes
    kv_growing = kv / s.layers  # DynamicCache concatenates: one layer's old and new copy at once
    prefill = nograd_transient(s, prompt, cache_bytes) * rollout_rows * prompt
    plan.parts["rollout"] = [Item("KV cache", kv + kv_growing, f"K and V x {s.layers} layers x {s.kv_dim} wide x {seq} "
                                  f"tokens x {rollout_rows} rows x {cache_bytes} B"),
                             Item("prefill activations (no grad)", prefill, "one layer at a time")]
    generating = shard.gathered(actor, device, autocast, "rollout")
    if generating:
        plan.parts["rollout"].append(Item(f"actor {shard.gathered_name}", generating,
                                          "the whole actor, around generate" if shard.strategy == "zero3"
                                          else shard.gathered_note(actor, device)))
    plan.phases.append(Item("rollout", kv + max(kv_growing, prefill) + generating,
                            f"{rollout_rows} rows x {seq} tokens"))

    # 2. scoring without grad over the whole rollout batch: the reference (or the actor without
    # its adapter), the reward model, the actor and critic unless the first update provides them
    tokens = rollout_rows * seq
    # (the passes over a trained model gather its parameters under sharding: `on`)
    passes = [("reference log-probs", s, frozen_act if reference is not None else cache_bytes, True,
               None if reference is not None else actor)]
    if reward_shape is not None:
        passes.append(("reward scores", reward_shape, frozen_act, False, None))
    if not fused_scoring:
        passes.append(("old log-probs", s, cache_bytes, True, actor))
        if critic is not None:
            passes.append(("values", critic.shape, cache_bytes, False, critic))
    scoring = []
    for name, shape, nbytes, logits, on in passes:
        widest = nograd_transient(shape, seq, nbytes) * tokens
        lg = SCORING_LOGIT_COPIES * rollout_rows * response * shape.vocab * 4 if logits else 0.0
        held = shard.gathered(on, device, autocast, "scoring") if on is not None else 0.0
        scoring.append(Item(name, widest + lg + held, f"{rollout_rows} rows x {seq} tokens"
                            + (f", {human(held)} of it gathered parameters" if held else "")))
    plan.parts["scoring (no grad)"] = scoring
    offload = reward.params * reward.weight_bytes if reward is not None and reward_offload else 0.0
    plan.phases.append(Item("scoring (no grad)", max(i.bytes for i in scoring) + offload, "largest pass"))

    # 3. updates: actor (and critic) forward + backward over a micro-batch; logits on the response
    models = [actor] + ([critic] if critic is not None else [])
    bwd, items = backward_peak(models, update_rows, seq, update_rows * response, RL_LOGIT_COPIES, act, autocast,
                                checkpointing, shard, device)
    if value_head:
        items.append(Item("value head gradients", 4 * value_head))
        bwd += 4 * value_head
    plan.parts["update forward + backward"] = items
    plan.phases.append(Item("update forward + backward", bwd, f"micro-batch {update_rows} x {seq} tokens"))
    step, note = shard.step_bytes(models, autocast)
    plan.phases.append(Item("optimizer step", step + 4 * value_head, note))
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
               processes: int = 1, strategy: str | None = None) -> MemoryPlan:
    """The memory plan of `stage` with its typed config `cfg` (align/config.py) and the facts of
    each model it loads (`actor`/`model`, and for RL `critic`, `reward`), on `device`, with
    `precision` replacing the config's `mixed_precision` when given, over `processes` processes
    that hold the trained models as `strategy` says (`STRATEGIES`; None: DDP over several
    processes, else one). Sizes are worst cases: every sequence as long as `data.max_length`
    allows (RL: longest prompt + `ppo.response_length`)."""
    if device not in DEVICES:
        raise AlignError(f"device must be one of {', '.join(DEVICES)} (got {device!r})")
    strategy = resolve_sharding(strategy, processes).strategy
    section = cfg.ppo if hasattr(cfg, "ppo") else cfg.train
    precision = resolve_precision(precision or section.mixed_precision, device)
    if precision not in PRECISIONS:
        raise AlignError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if hasattr(cfg, "ppo") and precision == "fp16":
        raise AlignError("the RL loop does not support fp16 (one GradScaler cannot serve actor and critic); plan with "
                         "bf16")
    ckpt = cfg.model.gradient_checkpointing
    if not hasattr(cfg, "ppo"):
        return _supervised_stage(stage, cfg, facts["model"], device, precision, processes, ckpt, strategy)
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
                       fused_scoring=p.fuse_scoring and covered, strategy=strategy)


def _supervised_stage(stage: str, cfg: Any, m: ModelFacts, device: str, precision: str, processes: int,
                      ckpt: bool, strategy: str) -> MemoryPlan:
    t, lora = cfg.train, cfg.lora.enabled
    targets = lora_targets(cfg.lora) if lora else None
    if stage == "rm":  # a sequence classifier: no output head, a trained 1-wide score head
        params = m.backbone + m.shape.hidden
        model = Trained(m.shape, params, m.lora + m.shape.hidden if lora else params, targets, logits=False)
        return estimate_supervised(stage, model, 2 * t.batch_size, cfg.data.max_length, device=device,
                                   precision=precision, processes=processes, checkpointing=ckpt, strategy=strategy)
    model = Trained(m.shape, m.params, m.lora if lora else m.params, targets)
    if stage == "dpo":  # TRL concatenates chosen and rejected; the reference is frozen (none with LoRA)
        reference = None if lora and not cfg.reference else Held("reference", m.params,
                                                                 frozen_bytes(cfg.model.dtype, device))
        return estimate_supervised(stage, model, 2 * t.batch_size, cfg.data.max_length, device=device,
                                   precision=precision, processes=processes, checkpointing=ckpt, reference=reference,
                                   strategy=strategy)
    return estimate_supervised(stage, model, t.batch_size, cfg.data.max_length, device=device, precision=precision,
                               processes=processes, checkpointing=ckpt, strategy=strategy)


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


def layout(plan: MemoryPlan) -> str:
    """`one process`, `DDP x 2 processes`, `FSDP2 x 8 processes`, ..."""
    if plan.strategy == "none":
        return "one process"
    return f"{STRATEGY_NAMES[plan.strategy]} x {plan.processes} process{'es' if plan.processes > 1 else ''}"


def plan_lines(plan: MemoryPlan) -> list[str]:
    """The breakdown `align plan` prints."""
    lines = [f"{plan.stage}: memory plan per device ({plan.device}, {plan.precision}, {layout(plan)}): "
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
            f"{plan.precision}, {layout(plan)}; estimate, `align plan` shows the parts)")


def launch_strategy(environ: Mapping[str, str] | None = None) -> str | None:
    """The strategy of the `accelerate launch` this process runs in, from its environment (as
    align/sharding.py `requested()` reads it): `fsdp`, `zero2`, `zero3`, or None (no sharding:
    one process, or DDP). A sharded layout the plan does not count is an error."""
    import os

    env = os.environ if environ is None else environ
    flag = lambda name: env.get(name, "false").lower() == "true"  # noqa: E731
    if flag("ACCELERATE_USE_DEEPSPEED"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("2", "3"):
            raise AlignError(f"DeepSpeed ZeRO stage {stage}: the memory plan counts ZeRO-2 and ZeRO-3 only")
        return f"zero{stage}"
    if flag("ACCELERATE_USE_FSDP"):
        if env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "true":
            raise AlignError("FSDP with fsdp_reshard_after_forward: false: the memory plan counts full sharding only")
        return "fsdp"
    return None


def dry_run_line(stage: str, cfg: Any) -> str:
    """The `memory` line of a `--dry-run` plan: this machine's device, process count and the
    launch's sharding."""
    from accelerate import PartialState

    state = PartialState()
    device = "cuda" if state.device.type == "cuda" else "cpu"
    try:
        plan = stage_plan(stage, cfg, model_facts(stage, cfg), device=device, processes=state.num_processes,
                          strategy=launch_strategy())
    except (AlignError, ValueError, KeyError) as e:  # an architecture the plan cannot read: the dry run goes on
        return f"not estimated ({e})"
    return summary_line(plan)
