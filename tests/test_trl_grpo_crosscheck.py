"""TRL's GRPOTrainer as a cross-check of align's GRPO (not a code path): from the same weights, on the
same prompts and the completions TRL sampled, align's grpo estimator gives TRL's advantages and
align's clipped loss with the KL in the loss gives TRL's loss, for the loss aggregations both have
(TRL's `dapo` = token-mean, `grpo` = seq-mean-token-mean, `dr_grpo` = seq-mean-token-sum-norm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.rl import AdvantageInput, agg_loss, clipped_policy_loss, get_estimator, kl_estimate

AGG = {"dapo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}


def reward_len(prompts: list[str], completions: list[str], **kw: object) -> list[float]:
    """Differs between almost any two completions, so no group's rewards tie."""
    return [float(sum(map(ord, c)) % 13) for c in completions]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_align_grpo_matches_trl_grpo_on_the_same_completions(loss_type: str, tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from align.bundle import response_logits
    from align.generation import Rollout
    from align.modeling import load_tokenizer
    from align.ops import selective_log_softmax

    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    prompts = [f"{a}+{b}=" for a, b in ((1, 2), (3, 4))]  # equal lengths: no padding, same positions in both
    n, beta, length = 4, 0.1, 6
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", per_device_train_batch_size=8,
                      num_generations=n, max_completion_length=length, temperature=1.0, top_k=0, top_p=1.0,
                      beta=beta, epsilon=0.2, loss_type=loss_type, scale_rewards="group", num_iterations=1,
                      steps_per_generation=1, bf16=False, disable_dropout=True, max_steps=1, logging_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_len], args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts] * 4))
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(n)])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop; one micro-batch here
    trl_loss = trainer._compute_loss(trainer.model, batch)

    # align on the same ids: advantages from the same rewards, log-probs and loss from the same weights
    completion_mask = batch["completion_mask"].float()
    texts = tokenizer.batch_decode([c[:int(m.sum())] for c, m in zip(batch["completion_ids"], completion_mask)],
                                   skip_special_tokens=True)
    scores = torch.tensor(reward_len([], texts))
    adv, _ = get_estimator("grpo").fn(AdvantageInput(scores, completion_mask, group_size=n, eps=1e-4))
    assert torch.allclose(adv[:, 0], batch["advantages"], atol=1e-5)

    rollout = Rollout(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"],
                      torch.ones(len(texts), dtype=torch.bool))
    logits = response_logits(trainer.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1], 1.0)
    logprobs = selective_log_softmax(logits, rollout.response_ids)
    pg, _ = clipped_policy_loss(logprobs, logprobs.detach(), adv, completion_mask, 0.2, 0.2)
    loss_mat = pg + beta * kl_estimate(logprobs, batch["ref_per_token_logps"], "k3") * completion_mask
    ours = agg_loss(loss_mat, completion_mask, AGG[loss_type], max_len=length)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-4, abs=1e-6)
