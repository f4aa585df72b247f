"""The memory plan (align/memplan.py): its arithmetic against hand-computed values on a tiny shape,
how it moves with the settings that should move it, the config mapping, and `align plan`.
How close it comes to measured peaks is a benchmark (bench/memplan.py, docs/performance.md),
not a test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from click.testing import CliRunner

from align.cli import main
from align.config import PPOConfig, RMConfig, SFTConfig, DPOStageConfig, GRPOStageConfig, from_dict
from align.errors import AlignError
from align.memplan import (Held, LoraTargets, ModelFacts, ModelShape, Sharding, Trained, estimate_rl,
                           estimate_supervised, launch_strategy, layer_params, layer_saved, model_shape, stage_plan,
                           summary_line, weight_numels)

# h=8, 2 layers, 2 heads (head dim 4), 2 KV heads, I=16, V=10
TINY = ModelShape(hidden=8, layers=2, heads=2, kv_heads=2, intermediate=16, vocab=10)


def test_layer_saved_by_hand() -> None:
    """Bytes per token of one layer, seq 4, tensor by tensor (see `layer_saved`'s docstring)."""
    # fp32: x, rsqrt, normed per norm (2 x 17 = 34 values) + q, k, v, out (32) + lse (2) + mask (4)
    # + gate, up, act, prod (64) + the two norms' outputs read by linear layers (16) = 152 values x 4 B
    assert layer_saved(TINY, 4, 4, False, None) == 152 * 4
    # LoRA on every linear, r=2: no `normed x` (2 x 8 fewer), 7 adapter middles of 2 values
    assert layer_saved(TINY, 4, 4, False, LoraTargets(2)) == (152 - 16 + 14) * 4
    # LoRA on q and v only: the MLP's inputs and down_proj's input are not saved (8 + 16 fewer)
    assert layer_saved(TINY, 4, 4, False, LoraTargets(2, frozenset({"q_proj", "v_proj"}))) == (152 - 16 - 24 + 4) * 4
    # bf16 autocast: residual-stream tensors stay fp32 (34 x 4), q/k/v/out, mask and MLP in bf16
    # ((32 + 4 + 64) x 2), lse fp32 (2 x 4), and each of q, k, v, gate, up saves its own bf16 cast (40 x 2)
    assert layer_saved(TINY, 4, 2, True, None) == 34 * 4 + 100 * 2 + 2 * 4 + 40 * 2


def test_supervised_plan_by_hand() -> None:
    """SFT on TINY, 1,000 parameters, a micro-batch of 2 x 4 tokens, fp32."""
    model = Trained(TINY, params=1000, trained=1000)
    plan = estimate_supervised("sft", model, 2, 4, device="cpu", precision="fp32")
    assert [i.bytes for i in plan.resident] == [4000, 8000]  # weights 4 B, AdamW 8 B per parameter
    tokens = 8
    per_layer = 608 * tokens
    around = tokens * (8 + 2 * 4 * 4 + 3 * 8 * 4 + 4)  # ids, cos and sin, final norm
    activations = 2 * per_layer + around
    logits = 3 * tokens * 10 * 4
    transient = (2 * 16 * 4 + 2 * 8 * 4) * tokens
    grads = 4000
    bwd = max(activations + logits, activations + transient, per_layer + around + grads + transient, grads)
    assert bwd == activations + transient
    assert plan.phases[0].bytes == bwd and plan.phases[1].bytes == grads
    assert plan.peak_bytes == 12000 + bwd
    assert plan.peak_phase.name == "forward + backward"

    # checkpointing: each layer's input kept (8 x 4 B a token), one layer recomputed in the backward
    ckpt = estimate_supervised("sft", model, 2, 4, device="cpu", precision="fp32", checkpointing=True)
    kept = tokens * 8 * 4
    bottom = kept + around + grads + transient + per_layer
    assert ckpt.phases[0].bytes == max(2 * kept + around + logits, 2 * kept + around + transient + per_layer, bottom)
    assert ckpt.phases[0].bytes < plan.phases[0].bytes

    # bf16 autocast: each matmul keeps a bf16 copy of its weight for the backward, the output head's
    # too but not the embedding's (TINY's head is untied: 1,000 - 10 x 8 parameters are cast)
    bf16 = estimate_supervised("sft", model, 2, 4, device="cuda", precision="bf16")
    assert {i.name: i.bytes for i in bf16.parts["forward + backward"]}["bf16 weight copies (autocast)"] == 2 * 920

    # two processes: DDP's gradient buckets (4 B per trained parameter) are resident too
    ddp = estimate_supervised("sft", model, 2, 4, device="cuda", precision="fp32", processes=2)
    assert ddp.resident_bytes == 12000 + 4000


def test_rl_rollout_kv_cache_and_resident_models_by_hand() -> None:
    actor = Trained(TINY, params=1000, trained=1000)
    plan = estimate_rl("ppo", actor, rollout_rows=4, update_rows=2, prompt=3, response=5, device="cpu",
                       precision="fp32", reference=Held("reference", 1000, 4),
                       critic=Trained(TINY, 900, 900, logits=False), reward=Held("reward model", 900, 4),
                       reward_shape=TINY)
    resident = {i.name: i.bytes for i in plan.resident}
    assert resident == {"actor weights": 4000, "actor AdamW moments": 8000, "reference weights": 4000,
                        "critic weights": 3600, "critic AdamW moments": 7200, "reward model weights": 3600}
    kv = 2 * 2 * 8 * (3 + 5) * 4 * 4  # K and V x layers x kv dim x tokens x rows x 4 B
    rollout = {i.name: i.bytes for i in plan.parts["rollout"]}
    assert rollout["KV cache"] == kv + kv / 2  # + one layer's copy while the cache grows
    # offloaded, the reward model leaves the resident set and comes over only to score
    off = estimate_rl("ppo", actor, rollout_rows=4, update_rows=2, prompt=3, response=5, device="cpu",
                      precision="fp32", reward=Held("reward model", 900, 4), reward_shape=TINY, reward_offload=True)
    assert "reward model weights" not in {i.name for i in off.resident}
    scoring = next(i for i in off.phases if i.name.startswith("scoring"))
    assert scoring.bytes >= 3600


def test_the_plan_moves_the_right_way() -> None:
    shape = ModelShape(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=2048, vocab=32000)
    full = Trained(shape, params=60_000_000, trained=60_000_000)

    def sft(**kw: Any) -> Any:
        model = kw.pop("model", full)
        return estimate_supervised("sft", model, kw.pop("rows", 8), 512, device="cuda", **{"precision": "fp32", **kw})

    base = sft()
    assert sft(checkpointing=True).peak_bytes < base.peak_bytes
    assert sft(rows=16).peak_bytes > base.peak_bytes
    assert sft(precision="bf16").parts["forward + backward"][0].bytes < base.parts["forward + backward"][0].bytes
    lora = sft(model=Trained(shape, params=60_000_000, trained=500_000, lora=LoraTargets(8)))
    lora_parts = {i.name: i.bytes for i in lora.resident + lora.parts["forward + backward"]}
    base_parts = {i.name: i.bytes for i in base.resident + base.parts["forward + backward"]}
    assert lora_parts["model AdamW moments"] < base_parts["model AdamW moments"] / 100
    assert lora_parts["gradients"] < base_parts["gradients"] / 100
    assert lora.peak_bytes < base.peak_bytes

    def ppo(**kw: Any) -> float:
        return estimate_rl("ppo", kw.pop("actor", full), rollout_rows=16, update_rows=8, prompt=128, response=128,
                           device="cuda", precision="bf16", frozen_act=2, **kw).peak_bytes

    critic = Trained(shape, 52_000_000, 52_000_000, logits=False)
    reference = Held("reference", 60_000_000, 2)
    separate = ppo(reference=reference, critic=critic)
    assert ppo(reference=reference, value_head=513) < separate  # critic.share_actor
    assert ppo(actor=Trained(shape, 60_000_000, 500_000, LoraTargets(8)), critic=critic) < separate  # lora mode
    assert ppo(reference=reference) < separate  # the critic-free methods


def fake_facts(shape: ModelShape = TINY) -> ModelFacts:
    return ModelFacts(shape, params=1000, backbone=900, lora=50)


def config(cls: type, data: dict[str, Any]) -> Any:
    cfg = from_dict(cls, {"output_dir": "out", "model": {"path": "m"}, "data": {"train": "d.jsonl"}, **data})
    cfg.validate()
    return cfg


def test_stage_plan_maps_each_stage_onto_its_models() -> None:
    facts = {"model": fake_facts()}
    sft = stage_plan("sft", config(SFTConfig, {"train": {"batch_size": 4}, "data": {"train": "d", "max_length": 6}}),
                     facts, device="cpu")
    assert sft.phases[0].note == "micro-batch 4 x 6 tokens" and sft.precision == "fp32"
    rm = stage_plan("rm", config(RMConfig, {"train": {"batch_size": 4}}), facts, device="cpu")
    assert rm.phases[0].note.startswith("micro-batch 8 x")  # chosen and rejected
    assert rm.resident[0].bytes == 4 * (900 + 8)  # the backbone and a 1-wide score head
    dpo = stage_plan("dpo", config(DPOStageConfig, {}), facts, device="cuda")
    assert {i.name for i in dpo.resident} == {"model weights", "model AdamW moments", "reference weights"}
    assert dpo.resident[-1].bytes == 2 * 1000 and dpo.precision == "bf16"  # auto on a GPU: bf16 frozen and compute
    dpo_lora = stage_plan("dpo", config(DPOStageConfig, {"lora": {"enabled": True}}), facts, device="cuda")
    assert "reference weights" not in {i.name for i in dpo_lora.resident}
    assert stage_plan("sft", config(SFTConfig, {}), facts, device="cuda", precision="fp32").precision == "fp32"

    rl_facts = {"actor": fake_facts(), "critic": fake_facts(), "reward": fake_facts()}
    ppo = stage_plan("ppo", config(PPOConfig, {"reward": {"model": "rm"}}), rl_facts, device="cpu")
    assert {i.name for i in ppo.resident} == {"actor weights", "actor AdamW moments", "reference weights",
                                              "critic weights", "critic AdamW moments", "reward model weights"}
    lora = stage_plan("ppo", config(PPOConfig, {"reward": {"model": "rm"}, "memory_mode": "lora",
                                                "critic": {"lora": True}, "lora": {"r": 4}}), rl_facts, device="cpu")
    resident = {i.name: i.bytes for i in lora.resident}
    assert "reference weights" not in resident and resident["actor AdamW moments"] == 8 * 50
    assert resident["critic AdamW moments"] == 8 * (50 + 8)  # adapter + score head
    on_cpu = stage_plan("ppo", config(PPOConfig, {"reward": {"model": "rm", "device": "cpu"}}), rl_facts, device="cuda")
    assert "reward model weights" not in {i.name for i in on_cpu.resident}
    grpo = stage_plan("grpo", config(GRPOStageConfig, {"reward": {"function": "m:f"}}), {"actor": fake_facts()},
                      device="cpu")
    assert {i.name for i in grpo.resident} == {"actor weights", "actor AdamW moments", "reference weights"}
    with pytest.raises(AlignError, match="does not support fp16"):
        stage_plan("grpo", config(GRPOStageConfig, {"reward": {"function": "m:f"}}), {"actor": fake_facts()},
                   device="cuda", precision="fp16")


def test_model_shape_reads_each_family() -> None:
    llama = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 260}
    assert model_shape(llama) == ModelShape(64, 2, 4, 2, 256, 260, True, tied=True)  # transformers' default
    assert not model_shape({**llama, "tie_word_embeddings": False}).tied
    gpt2 = {"model_type": "gpt2", "n_embd": 48, "n_layer": 3, "n_head": 4, "n_inner": None, "vocab_size": 300}
    assert model_shape(gpt2) == ModelShape(48, 3, 4, 4, 192, 300, False, tied=True)  # no n_inner: 4h; no gate
    assert model_shape({"text_config": llama, "model_type": "llava"}).hidden == 64
    with pytest.raises(AlignError, match="hidden_size, n_embd, d_model"):
        model_shape({"num_hidden_layers": 2})


def test_model_facts_count_like_the_dry_run(tiny_model_dir: Path, make_sft_config: Callable[..., Any],
                                            tmp_path: Path) -> None:
    from align.memplan import model_facts
    from align.sft import train_sft

    cfg = make_sft_config(tmp_path / "run", {"lora.enabled": True, "lora.r": 4})
    facts = model_facts("sft", cfg)["model"]
    plan = train_sft(cfg, dry_run=True)
    assert facts.params == plan["parameters"] and facts.lora == plan["trained_parameters"]
    assert facts.backbone == facts.params - facts.shape.vocab * facts.shape.hidden  # untied head removed
    assert plan["memory"].startswith("~") and "per device at the peak" in plan["memory"]


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_plan_command(make_sft_dict: Callable[..., dict], tmp_path: Path,
                      yaml_writer: Callable[[Path, dict], Path]) -> None:
    path = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(tmp_path / "run"))
    result = invoke("plan", "sft", str(path), "--device", "cuda", "--precision", "bf16")
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sft: memory plan per device (cuda, bf16, one process): peak ~")
    for part in ("model weights:", "model AdamW moments:", "activations (saved):", "gradients:", "logits:",
                 "bf16 weight copies (autocast):", "optimizer step:"):
        assert any(part in line for line in lines), part
    ckpt = invoke("plan", "sft", str(path), "--device", "cpu", "--set", "model.gradient_checkpointing=true",
                  "--processes", "2")
    assert ckpt.exit_code == 0 and "activations (layer inputs: checkpointing)" in ckpt.stdout
    assert "DDP gradient buckets" in ckpt.stdout and "the 2 processes hold" in ckpt.stdout
    assert ckpt.stdout.startswith("sft: memory plan per device (cpu, fp32, DDP x 2 processes): peak ~")
    assert not (tmp_path / "run").exists()

    for args, message in [
        (("plan", "eval", str(path)), "error: no memory plan for stage 'eval'; the training stages are sft, rm, ppo"),
        (("plan", "sft", str(path), "--device", "tpu"), "error: --device must be one of cuda, cpu (got 'tpu')"),
        (("plan", "sft", str(path), "--precision", "fp8"), "error: --precision must be one of fp32, bf16, fp16"),
        (("plan", "sft", str(path), "--processes", "two"), "error: --processes must be an integer (got 'two')"),
        (("plan", "sft", str(path), "--processes", "0"), "error: --processes must be >= 1 (got 0)"),
        (("plan", "sft", str(path), "--strategy", "fsdp1"),
         "error: --strategy must be one of none, ddp, fsdp, zero2, zero3 (got 'fsdp1')"),
        (("plan", "sft", str(path), "--strategy", "none", "--processes", "2"),
         "error: --strategy none is one process (got --processes 2)"),
        (("plan", "sft", str(path), "--set", "model.path=/nonexistent/model"),
         "error: config key 'model.path': model path '/nonexistent/model' does not exist"),
        (("plan", "sft", str(tmp_path / "missing.yaml")), "error: config file"),
    ]:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr


def test_ppo_plan_names_the_four_models(tiny_model_dir: Path, tmp_path: Path) -> None:
    ppo = tmp_path / "ppo.yaml"
    ppo.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "ppo"), "model": {"path": str(tiny_model_dir)},
                                   "reward": {"function": "align.tasks.addition:gold_reward"},
                                   "data": {"train": str(tmp_path / "prompts.jsonl"), "max_length": 16}}))
    full = invoke("plan", "ppo", str(ppo), "--device", "cuda")
    assert full.exit_code == 0, full.output + full.stderr
    for part in ("actor weights", "reference weights", "critic weights", "KV cache", "reference log-probs"):
        assert part in full.stdout, part
    lora = invoke("plan", "ppo", str(ppo), "--device", "cuda", "--set", "memory_mode=lora")
    assert "reference weights" not in lora.stdout
    fp16 = invoke("plan", "ppo", str(ppo), "--precision", "fp16")
    assert fp16.exit_code == 2 and fp16.stderr.startswith("error: the RL loop does not support fp16")


def test_memplan_imports_no_torch() -> None:
    code = "import sys, align.memplan; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr


def test_model_shape_reads_the_architecture_matrix_configs() -> None:
    """The shapes of the architectures the test matrix covers, read from transformers' config classes."""
    import transformers as T

    for cls, gated in [(T.LlamaConfig, True), (T.Qwen2Config, True), (T.Qwen3Config, True), (T.MistralConfig, True),
                       (T.Gemma2Config, True), (T.Phi3Config, True), (T.GPT2Config, False), (T.GPTNeoXConfig, False),
                       (T.OPTConfig, False)]:
        config = cls()
        shape = model_shape(config)
        assert shape.hidden == config.get_text_config().hidden_size and shape.gated_mlp == gated, cls.__name__
        assert shape.layers >= 1 and shape.intermediate >= shape.hidden and shape.vocab == config.vocab_size


# ----------------------------------------------------------------------------------------------
# Sharded strategies, by hand on TINY's real parameter count: per layer q, k, v, o (4 x 64), gate,
# up, down (3 x 128), two norms (2 x 8) = 656; embedding 80, final norm 8, untied head 80: 1,480.
P = 1480
LAYER = 656
HEAD = 80 + 8  # FSDP2's head unit (the final norm and the untied head), kept gathered through the backward


def sft_on(strategy: str, device: str = "cpu", precision: str = "fp32", model: Trained | None = None) -> Any:
    return estimate_supervised("sft", model or Trained(TINY, P, P), 2, 4, device=device, precision=precision,
                               processes=2, strategy=strategy)


def bwd_by_hand(grads: float, extra_transient: float = 0.0, gathered: float = 0.0) -> float:
    """`test_supervised_plan_by_hand`'s sweep, on TINY with P parameters (2 x 4 tokens, fp32)."""
    tokens = 8
    per_layer = 608 * tokens
    around = tokens * (8 + 2 * 4 * 4 + 3 * 8 * 4 + 4)
    activations = 2 * per_layer + around
    logits = 3 * tokens * 10 * 4
    transient = (2 * 16 * 4 + 2 * 8 * 4) * tokens + extra_transient
    return max(activations + logits, activations + transient, per_layer + around + grads + transient, grads) + gathered


def test_the_units_are_tinys_parameters() -> None:
    assert layer_params(TINY) == LAYER and sum(weight_numels(TINY, logits=True)) == P
    assert sum(weight_numels(TINY, logits=False)) == P - 80 + 8  # a critic: a 1-wide score head, no LM head


def test_fsdp_shards_everything_and_gathers_one_unit_at_a_time() -> None:
    plan = sft_on("fsdp")
    assert [(i.name, i.bytes) for i in plan.resident] == [("model weights (1/2 shard)", 4 * P / 2),
                                                          ("model AdamW moments (1/2 shard)", 8 * P / 2)]
    # gradients 1/2 (4 x 1,480 / 2); the largest unit's unsharded gradients while it reduce-scatters
    # (a layer: 656 x 4; the embedding unit is 80); the head unit and one layer gathered, float32
    fwd_bwd = next(i for i in plan.phases if i.name == "forward + backward")
    assert fwd_bwd.bytes == bwd_by_hand(4 * P / 2, 4 * LAYER, (HEAD + LAYER) * 4)
    assert next(i for i in plan.phases if i.name == "optimizer step").bytes == 4 * P / 2
    # on a GPU the next layer's all-gather is in flight too, and under bf16 it gathers 2-byte weights
    gpu = {i.name: i.bytes for i in sft_on("fsdp", "cuda", "bf16").parts["forward + backward"]}
    assert gpu["gathered parameters (FSDP2 units)"] == (HEAD + 2 * LAYER) * 2
    assert "bf16 weight copies (autocast)" not in gpu
    # loading: every process holds the model whole before prepare (5,920 B; no phase when the
    # sharded resident set is larger, as here) -- with LoRA (100 trained) it is the larger one
    assert next(i for i in plan.phases if i.name == "loading (before prepare)").bytes == 0
    lora = sft_on("fsdp", model=Trained(TINY, P, 100, LoraTargets(2)))
    assert next(i for i in lora.phases if i.name.startswith("loading")).bytes == 4 * P - (4 * P / 2 + 8 * 100 / 2)


def test_zero2_keeps_whole_weights_and_splits_gradients_and_adam() -> None:
    plan = sft_on("zero2")
    # float32: the weights whole, and ZeRO-1/2's float32 master copy of this process's partition
    assert [(i.name, i.bytes) for i in plan.resident] == [("model weights (whole)", 4 * P),
                                                          ("model fp32 master weights (1/2 partition)", 4 * P / 2),
                                                          ("model AdamW moments (1/2 partition)", 8 * P / 2)]
    # the backward: every gradient lands in the reduce bucket (1,480 < 5e8 elements: pages touched
    # on a CPU), then in this process's float32 partition
    fwd_bwd = next(i for i in plan.phases if i.name == "forward + backward")
    assert fwd_bwd.bytes == bwd_by_hand(4 * P + 4 * P / 2)
    assert next(i for i in plan.phases if i.name == "optimizer step").bytes == 4 * P / 2
    # bf16 on a GPU: the engine casts the model (2 B weights and gradients, the paper's 2 + 2 + 12
    # with 12 split), and the allocator takes the whole 5e8-element bucket
    gpu = sft_on("zero2", "cuda", "bf16")
    resident = {i.name: i.bytes for i in gpu.resident}
    assert resident["model weights (whole)"] == 2 * P and resident["model fp32 master weights (1/2 partition)"] == 2 * P
    parts = {i.name: i.bytes for i in gpu.parts["forward + backward"]}
    assert parts["gradient reduce bucket"] == 500_000_000 * 2 and parts["gradient partition"] == 4 * P / 2


def test_zero3_partitions_what_is_above_the_persistence_threshold() -> None:
    # the default threshold (1e5 elements a tensor) keeps every tensor of TINY whole
    plan = sft_on("zero3")
    resident = {i.name: i.bytes for i in plan.resident}
    assert resident == {"model weights (1/2 partition, small tensors whole)": 4 * P,
                        "model AdamW moments (1/2 partition)": 8 * P / 2, "model gradient partitions": 4 * P / 2,
                        "model gradient reduce bucket": 4 * P}  # float32: no separate master copy
    assert next(i for i in plan.phases if i.name == "optimizer step").bytes == 0
    # a threshold of 64: q, k, v, o (64 each) and the norms stay whole, 552 in all; 928 partitioned
    shard = Sharding("zero3", 2, persistence=64)
    model = Trained(TINY, P, P)
    assert shard.persistent(model) == 2 * (4 * 64 + 2 * 8) + 8 == 552
    items = shard.resident(Held("model", P, 4, P, model), "cpu", False)
    assert items[0].bytes == 928 * 4 / 2 + 552 * 4
    # gathered while a pass runs: every partitioned parameter (reused within 1e9) ...
    assert shard.gathered(model, "cpu", False, "update") == 928 * 4
    # ... or only up to half the reuse distance
    assert Sharding("zero3", 2, persistence=64, reuse_distance=200).gathered(model, "cpu", False, "update") == 100 * 4
    # bf16 on a GPU: 2-byte partitions, a float32 master partition, the whole bucket allocated
    gpu = {i.name: i.bytes for i in Sharding("zero3", 2, persistence=64).resident(Held("model", P, 4, P, model),
                                                                                  "cuda", True)}
    assert gpu["model fp32 master weights (1/2 partition)"] == 4 * P / 2
    assert gpu["model gradient reduce bucket"] == 500_000_000 * 2


def test_zero3_rollout_gathers_the_whole_actor() -> None:
    """h=512, one layer, I=1024, V=100: the projections (262,144 and 524,288 elements) are partitioned,
    the norms, embedding and head (512, 51,200) stay whole: 103,936 of 2,725,376."""
    shape = ModelShape(hidden=512, layers=1, heads=8, kv_heads=8, intermediate=1024, vocab=100, tied=False)
    params = sum(weight_numels(shape, logits=True))
    assert params == 2_725_376
    actor = Trained(shape, params, params, role="actor")
    plan = estimate_rl("grpo", actor, rollout_rows=2, update_rows=2, prompt=3, response=5, device="cpu",
                       precision="fp32", processes=2, reference=Held("reference", params, 4), strategy="zero3")
    rollout = {i.name: i.bytes for i in plan.parts["rollout"]}
    assert rollout["actor gathered parameters (ZeRO-3)"] == (params - 103_936) * 4 == 10 * 2**20
    resident = {i.name: i.bytes for i in plan.resident}
    assert resident["reference weights"] == 4 * params  # frozen: whole on every process
    # a shared critic (a value head on the actor) is not supported under sharding
    with pytest.raises(AlignError, match="critic.share_actor under DeepSpeed ZeRO-3 is not supported"):
        estimate_rl("ppo", actor, rollout_rows=2, update_rows=2, prompt=3, response=5, device="cpu",
                    precision="fp32", processes=2, value_head=513, strategy="zero3")


def test_strategy_from_the_launch_and_in_the_lines() -> None:
    assert launch_strategy({}) is None
    assert launch_strategy({"ACCELERATE_USE_FSDP": "true"}) == "fsdp"
    assert launch_strategy({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == "zero3"
    with pytest.raises(AlignError, match="ZeRO stage 1: the memory plan counts ZeRO-2 and ZeRO-3 only"):
        launch_strategy({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
    with pytest.raises(AlignError, match="reshard_after_forward: false"):
        launch_strategy({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert "cpu, fp32, DeepSpeed ZeRO-2 x 2 processes;" in summary_line(sft_on("zero2"))
    assert "cpu, fp32, one process;" in summary_line(estimate_supervised("sft", Trained(TINY, P, P), 2, 4,
                                                                         device="cpu", precision="fp32"))
    with pytest.raises(AlignError, match="strategy none is one process"):
        estimate_supervised("sft", Trained(TINY, P, P), 2, 4, device="cpu", precision="fp32", processes=2,
                            strategy="none")


def test_dry_run_line_names_the_launchs_strategy(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path,
                                                  make_sft_config: Callable[..., Any], tmp_path: Path) -> None:
    from align.memplan import dry_run_line

    cfg = make_sft_config(tmp_path / "run")
    assert "one process;" in dry_run_line("sft", cfg)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "FSDP2 x 1 process;" in dry_run_line("sft", cfg)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    assert dry_run_line("sft", cfg).startswith("not estimated (DeepSpeed ZeRO stage 1")


def test_plan_command_strategy(make_sft_dict: Callable[..., dict], tmp_path: Path,
                               yaml_writer: Callable[[Path, dict], Path]) -> None:
    path = yaml_writer(tmp_path / "sft.yaml", make_sft_dict(tmp_path / "run"))
    result = invoke("plan", "sft", str(path), "--device", "cuda", "--precision", "bf16", "--strategy", "zero3",
                    "--processes", "8")
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stdout.startswith("sft: memory plan per device (cuda, bf16, DeepSpeed ZeRO-3 x 8 processes): peak ~")
    for part in ("model weights (1/8 partition, small tensors whole)", "model AdamW moments (1/8 partition)",
                 "model gradient reduce bucket", "model gradient partitions", "loading (before prepare)"):
        assert part in result.stdout, part
    fsdp = invoke("plan", "sft", str(path), "--device", "cuda", "--precision", "bf16", "--strategy", "fsdp",
                  "--processes", "8")
    assert "(cuda, bf16, FSDP2 x 8 processes)" in fsdp.stdout and "model weights (1/8 shard)" in fsdp.stdout
