"""Preference-learning and RLHF math against hand-computed values on tiny tensors."""
import math

import pytest
import torch

from llmforge.stages.rl.objectives import (AdaptiveKL, FixedKL, best_of_n, bradley_terry_loss, chosen_nll, dpo_loss,
                                           gae, grpo_advantages, kl_penalized_rewards, ppo_policy_loss, ppo_value_loss,
                                           token_entropy, whiten)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_value_margin_and_gradient_sign():
    rc = torch.tensor([2.0, 0.5], requires_grad=True)
    rr = torch.tensor([1.0, 1.0], requires_grad=True)
    loss = bradley_terry_loss(rc, rr)
    expected = -(math.log(sigmoid(1.0)) + math.log(sigmoid(-0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()   # descent raises chosen, lowers rejected
    with_margin = bradley_terry_loss(rc.detach(), rr.detach(), margin=torch.tensor([1.0, 1.0]))
    assert with_margin.item() == pytest.approx(-(math.log(sigmoid(0.0)) + math.log(sigmoid(-1.5))) / 2, rel=1e-6)
    assert with_margin > loss    # a margin demands a larger gap for the same loss


def test_kl_penalized_rewards_put_score_on_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 1.1], [-0.1, 2.0, 0.0]]))


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 9.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0: δ2 = 1 - .3 = .7; δ1 = 0 + .9*.3 - .2 = .07; δ0 = .9*.2 - .1 = .08
    a2 = 0.7
    a1 = 0.07 + gamma * lam * a2
    a0 = 0.08 + gamma * lam * a1
    # row 1 ends after two tokens: the padded 9s must not leak in
    b1 = 1.0 - 0.5
    b0 = 0.5 + gamma * 0.5 - 0.4 + gamma * lam * b1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, adv + values * mask, atol=1e-6)


def test_whiten_zero_mean_unit_variance_over_mask():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert (real ** 2).mean().item() == pytest.approx(1.0, rel=1e-4)   # population variance
    assert torch.equal(w[~mask.bool()], torch.zeros(2))
    # values: (x - 2.5) / sqrt(1.25)
    assert w[0, 0].item() == pytest.approx(-1.5 / math.sqrt(1.25), rel=1e-5)


def test_ppo_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))      # ratios
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, clipfrac = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # per token: max(-A·ρ, -A·clip(ρ)):  A=+1, ρ=1.5 -> max(-1.5, -1.2) = -1.2 (clipped)
    #            A=+1, ρ=0.5 -> max(-0.5, -0.8) = -0.5;  A=-1, ρ=1.1 -> max(1.1, 1.1) = 1.1
    #            A=-1, ρ=0.5 -> max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4, rel=1e-5)
    assert clipfrac.item() == pytest.approx(0.5)
    # gradient flows only through unclipped tokens
    logp = logp.clone().requires_grad_(True)
    ppo_policy_loss(logp, old, adv, mask, clip=0.2)[0].backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0
    assert logp.grad[0, 1] < 0 and logp.grad[0, 2] > 0


def test_ppo_value_loss_takes_the_pessimistic_clip():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss = ppo_value_loss(new, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-1)² = 0, clipped (0.2-1)² = .64 -> .64;  token 1: (0.1-1)² = .81 both
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, rel=1e-5)


def test_kl_controllers():
    fixed = FixedKL(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    adaptive = AdaptiveKL(0.1, target=6.0, horizon=100)
    adaptive.update(12.0, 10)      # error clipped to +0.2 -> β·(1 + 0.2·10/100)
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    adaptive.update(3.0, 10)       # error -0.5 clipped to -0.2
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)
    adaptive = AdaptiveKL(0.1, target=6.0, horizon=100)
    adaptive.update(6.6, 100)      # error 0.1 -> β·1.1
    assert adaptive.value == pytest.approx(0.11)


def test_dpo_loss_closed_form():
    pc, pr = torch.tensor([-5.0, -3.0]), torch.tensor([-6.0, -2.0])
    rc, rr = torch.tensor([-5.5, -3.0]), torch.tensor([-5.0, -2.5])
    loss, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta=0.5)
    margins = [0.5 * (0.5 - (-1.0)), 0.5 * (0.0 - 0.5)]
    assert loss.item() == pytest.approx(-sum(math.log(sigmoid(m)) for m in margins) / 2, rel=1e-6)
    assert torch.allclose(chosen_reward, torch.tensor([0.25, 0.0]))
    assert torch.allclose(rejected_reward, torch.tensor([-0.5, 0.25]))
    # at the reference policy the loss is log 2
    assert dpo_loss(rc, rr, rc, rr, beta=0.1)[0].item() == pytest.approx(math.log(2))


def test_chosen_nll_is_per_token_and_averaged_over_pairs():
    # two chosen answers: summed log-probs -6 over 3 tokens and -2 over 4 -> NLL 2.0 and 0.5 per token
    assert chosen_nll(torch.tensor([-6.0, -2.0]), torch.tensor([3.0, 4.0])).item() == pytest.approx(1.25)
    assert chosen_nll(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0   # an empty answer adds nothing


def test_grpo_advantages_normalize_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = grpo_advantages(r)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))               # no signal from an all-equal group
    std = math.sqrt(0.75 * 0.25)
    assert adv[2, 3].item() == pytest.approx(0.75 / (std + 1e-4), rel=1e-6)
    assert adv[2, 0].item() == pytest.approx(-0.25 / (std + 1e-4), rel=1e-6)


def test_best_of_n_picks_highest_and_first_on_ties():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.5, 0.2]])
    assert best_of_n(scores).tolist() == [1, 0]


def test_token_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    ent = token_entropy(logits)
    assert ent[0].item() == pytest.approx(math.log(4), rel=1e-6)
    assert ent[1].item() == pytest.approx(0.0, abs=1e-6)


def test_grpo_with_clipped_objective_learns_a_bandit():
    # a 4-armed bandit where arm 2 pays 1: group-normalized advantages + the PPO surrogate
    # must move probability mass onto arm 2
    torch.manual_seed(0)
    logits = torch.zeros(4, requires_grad=True)
    for _ in range(12):
        with torch.no_grad():
            old_logp_all = torch.log_softmax(logits, -1)
            arms = torch.multinomial(old_logp_all.exp(), 8, replacement=True)
        rewards = (arms == 2).float()[None]
        adv = grpo_advantages(rewards)
        for _ in range(2):   # two epochs on the same rollout, as PPO does
            logp = torch.log_softmax(logits, -1)[arms][None]
            loss, _ = ppo_policy_loss(logp, old_logp_all[arms][None], adv, torch.ones_like(adv))
            logits.grad = None
            loss.backward()
            with torch.no_grad():   # plain gradient descent (torch.optim's first import is slow)
                logits -= 1.0 * logits.grad
    assert torch.softmax(logits, -1)[2] > 0.8


def test_dpo_gradient_prefers_chosen_over_rejected():
    chosen = torch.tensor([-4.0], requires_grad=True)
    rejected = torch.tensor([-4.0], requires_grad=True)
    loss, _, _ = dpo_loss(chosen, rejected, torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.1)
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_best_of_n_with_a_verifier_and_rm_tie_break():
    from llmforge.stages.rl.objectives import best_of_n
    verified = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 1.0, 0.0]])
    rm = torch.tensor([[9.0, -1.0, 2.0], [0.1, 0.3, 0.2], [5.0, -3.0, 9.0]])
    # row 0: two verified answers, the RM breaks the tie; the RM's favourite (9.0, wrong) never wins
    # row 1: all wrong: the RM decides; row 2: the verified answer beats the RM's two favourites
    assert best_of_n(verified, tie_break=rm).tolist() == [2, 1, 1]
    assert best_of_n(rm).tolist() == [0, 1, 2]


def test_informative_groups_are_those_with_unequal_rewards():
    from llmforge.stages.rl.objectives import informative_groups
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.4]])
    assert informative_groups(r).tolist() == [False, False, True, True]
    # exactly the groups whose GRPO advantages are not all zero
    assert (grpo_advantages(r).abs().sum(1) > 0).tolist() == informative_groups(r).tolist()


def test_kl_regularized_optimum_closed_form():
    from llmforge.stages.rl.objectives import kl_categorical, kl_regularized_optimum
    ref = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    r = torch.tensor([0.0, 1.0, 0.0])
    logp = kl_regularized_optimum(ref, r, beta=0.5)
    # π* ∝ π_ref·exp(r/β): (0.5, 0.25e², 0.25) / Z
    z = 0.5 + 0.25 * math.e ** 2 + 0.25
    assert torch.allclose(logp.exp(), torch.tensor([0.5 / z, 0.25 * math.e ** 2 / z, 0.25 / z]))
    assert kl_categorical(ref, ref).item() == pytest.approx(0.0, abs=1e-7)
    p = logp.exp()
    assert kl_categorical(logp, ref).item() == pytest.approx(float((p * (logp - ref)).sum()), rel=1e-6)
    # it maximizes E[r] - β·KL: any other distribution scores lower
    obj = lambda lp: float((lp.exp() * r).sum() - 0.5 * kl_categorical(lp, ref))   # noqa: E731
    assert obj(logp) > obj(torch.log_softmax(ref + r, -1)) and obj(logp) > obj(ref)


def test_kl_sweep_spec_parsing():
    from llmforge.errors import UserError
    from llmforge.stages.rl.overopt import sweep_values
    assert sweep_values("") == [] and sweep_values("0.01, 0.05,0.2,") == [0.01, 0.05, 0.2]
    with pytest.raises(UserError, match="kl_sweep"):
        sweep_values("0.1,big")


def test_overoptimisation_curve_on_a_toy_bandit(tmp_path):
    """Gao et al. 2022 in miniature. Eight answers; the gold reward likes answer 3; the proxy (a
    misspecified reward model) agrees on the gold ranking but overrates answer 7, which is bad.
    PPO with the KL-penalized reward (the project's own objectives) at a sweep of β: as β falls,
    KL grows, the proxy keeps rising, and the gold reward rises, then falls."""
    from llmforge.stages.rl import overopt
    from llmforge.stages.rl.objectives import kl_categorical, kl_regularized_optimum
    gold = torch.tensor([0.0, 0.2, 0.4, 1.0, 0.3, 0.1, 0.0, -1.0])
    proxy = gold.clone()
    proxy[7] = 1.5                      # rare under the reference: reaching it costs KL
    ref_logp = torch.log_softmax(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0]), -1)
    torch.manual_seed(0)
    points, STEPS = [], 500
    for beta in overopt.sweep_values("2,0.5,0.25,0.1"):
        logits = ref_logp.clone().requires_grad_(True)
        for _ in range(STEPS):
            with torch.no_grad():
                old = torch.log_softmax(logits, -1)
                arms = torch.multinomial(old.exp(), 64, replacement=True)
            logp_arms = old[arms][:, None]
            rewards, _ = kl_penalized_rewards(proxy[arms], logp_arms, ref_logp[arms][:, None],
                                              torch.ones(64, 1), beta)
            adv = rewards - rewards.mean()
            new = torch.log_softmax(logits, -1)[arms][:, None]
            loss, _ = ppo_policy_loss(new, logp_arms, adv, torch.ones(64, 1))
            logits.grad = None
            loss.backward()
            with torch.no_grad():
                logits -= 2.0 * logits.grad
        with torch.no_grad():
            logp = torch.log_softmax(logits, -1)
            kl = float(kl_categorical(logp, ref_logp))
            points.append(overopt.point(beta, STEPS, kl, float((logp.exp() * proxy).sum()),
                                        float((logp.exp() * gold).sum())))
            # the sampled optimisation lands near the closed-form optimum of the same objective
            exact = kl_regularized_optimum(ref_logp, proxy, beta)
            assert float((exact.exp() * proxy).sum()) == pytest.approx(points[-1]["proxy"], abs=0.05)
    pts = sorted(points, key=lambda p: p["kl"])
    assert [p["kl_coef"] for p in pts] == [2, 0.5, 0.25, 0.1]        # less β, more KL
    assert all(b["proxy"] > a["proxy"] for a, b in zip(pts, pts[1:]))      # the proxy only rises
    peak = max(range(len(pts)), key=lambda i: pts[i]["gold"])
    assert 0 < peak < len(pts) - 1                                          # gold rises, then falls
    s = overopt.summarize(points)
    assert s["overoptimised"] and s["gold_peak_kl_coef"] == pts[peak]["kl_coef"]
    assert overopt.plot(points, tmp_path / "curve.png").stat().st_size > 1000


def test_rl_publishes_a_checkpoint_only_when_it_beats_the_initial_policy_significantly(tmp_path, tiny_model_cfg):
    from llmforge.model.transformer import Transformer
    from llmforge.run import RunDir
    from llmforge.stages.rl.evaluate import BestCheckpoint
    run = RunDir(tmp_path / "run").create()
    policy = Transformer(tiny_model_cfg)
    tasks = [t for t in ("a", "b", "c") for _ in range(100)]

    def scored(gained, lost):   # per task: items 0-29 right at first; `gained` more right, `lost` of those wrong
        return [(t, float(lost <= i % 100 < 30 + gained)) for i, t in enumerate(tasks)]

    best = BestCheckpoint(run, "rl_best", None)
    assert best.offer(policy, scored(0, 0), step=0)           # the initial policy is the first candidate
    assert not best.offer(policy, scored(4, 2), step=1)       # +2 points, 12 items gained and 6 lost: noise
    assert best.step == 0 and abs(best.best - 0.30) < 1e-9
    assert best.offer(policy, scored(17, 2), step=2)          # +15 points (51 gained, 6 lost): published
    assert not best.offer(policy, scored(12, 2), step=3)      # significant over the initial one, but not the best
    resumed = BestCheckpoint(run, "rl_best", None, resume=True)
    assert (resumed.step, resumed.best) == (2, best.best)
    assert not resumed.offer(policy, scored(14, 0), step=4)   # 44%: above the initial policy, below the best
    assert resumed.offer(policy, scored(30, 2), step=5)       # the reference survived the resume
    loose = BestCheckpoint(run, "rl_loose", None, select_p=1.0)
    assert loose.offer(policy, scored(0, 0), 0) and loose.offer(policy, scored(4, 2), 1)   # p 1.0: plain argmax
