"""Batch-independent inference (issue 18 item 5): at evaluation an item's MoE output does not depend on the other
items of its batch, for every registered router (parametrised over the registry, so new routers are covered),
except routers that declare a batch-dependent rule and keep it (``Router.depends_on_batch(training=False)``)."""

from __future__ import annotations

import warnings

import pytest
import torch

from moezoo.layers import ROUTERS, MoE, TopKRouter, router_options
from moezoo.layers.routers import SAMPLE_IDX
from moezoo.layers.side_inputs import synthetic_side

DIM, FFN, EXPERTS, TOKENS = 16, 32, 4, 6

# Options that switch on a router's batch-dependent rule where it has one (capacity, balanced evaluation).
BATCH_RULE_OPTIONS = {"capacity_factor": 1.0, "balanced_eval": True}


def _layer(name: str, **extra) -> MoE:
    options = router_options(name)
    kwargs = {k: v for k, v in BATCH_RULE_OPTIONS.items() if k in options}
    kwargs.update(extra)
    top_k = min(2, EXPERTS - 1)
    torch.manual_seed(0)
    return MoE(DIM, FFN, EXPERTS, top_k, router=name, router_kwargs=kwargs, backend="reference").eval()


def _items(moe: MoE, x: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return moe(x, side=side)[0]


def _data(moe: MoE, batch: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TOKENS, DIM, generator=generator)
    return x, synthetic_side(moe.router, (batch, TOKENS), generator)


def _pick(side: dict[str, torch.Tensor], index: slice) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in side.items()}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_eval_output_of_an_item_does_not_depend_on_its_batchmates(name):
    moe = _layer(name)
    if moe.router.depends_on_batch(training=False):
        pytest.skip(f"{name} declares a batch-dependent rule at evaluation and keeps it")
    if getattr(moe.router, "random_at_eval", False):
        pytest.skip(f"{name} routes by a random draw at evaluation (by design), not by its batchmates")
    x, side = _data(moe, 5, seed=1)
    other_x, other_side = _data(moe, 7, seed=2)
    batch = _items(moe, x, side)
    for i in range(5):
        alone = _items(moe, x[i : i + 1], _pick(side, slice(i, i + 1)))
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        mixed_x = torch.cat([other_x[:3], x[i : i + 1], other_x[3:]])
        mixed_side = {k: torch.cat([other_side[k][:3], side[k][i : i + 1], other_side[k][3:]]) for k in side}
        torch.testing.assert_close(_items(moe, mixed_x, mixed_side)[3:4], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in sorted(ROUTERS) if ROUTERS[n].batch_dependent])
def test_the_item_rule_is_the_batch_rule_applied_to_one_item(name):
    """With eval_rule="item", top-k routing with a capacity evaluates dropless, and expert choice / Sinkhorn give an
    item in a batch what the batch rule gives that item alone (a batch of one); the batch rule on the whole batch
    does depend on the batchmates, and the layer says so once."""
    if "eval_rule" not in router_options(name):
        pytest.skip(f"{name} has no eval_rule")
    item, batch_rule = _layer(name), _layer(name, eval_rule="batch")
    batch_rule.load_state_dict(item.state_dict())
    x, side = _data(item, 8, seed=3)
    by_item = _items(item, x, side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = _items(batch_rule, x, side)
        _items(batch_rule, x, side)
    assert sum("keeps its batch-dependent routing rule" in str(w.message) for w in caught) == 1
    if isinstance(item.router, TopKRouter):
        # rectify needs a capacity; its item rule is plain dropless top-k on the same gate
        dropless = _layer("topk" if name == "rectify" else name, capacity_factor=None)
        dropless.load_state_dict(item.state_dict())
        torch.testing.assert_close(by_item, _items(dropless, x, side), atol=1e-5, rtol=1e-5)
    else:
        for i in range(8):
            alone = _items(batch_rule, x[i : i + 1], _pick(side, slice(i, i + 1)))
            torch.testing.assert_close(by_item[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    if name in ("expert_choice", "sinkhorn", "topk"):  # the batch rule really differs: this test can fail
        assert not torch.allclose(by_item, whole, atol=1e-4)


def test_routers_with_a_per_item_rule_do_not_depend_on_the_batch_at_eval_but_do_in_training():
    for name in ("topk", "expert_choice", "sinkhorn"):
        router = _layer(name).router
        assert router.batch_dependent and router.depends_on_batch(training=True)
        assert not router.depends_on_batch(training=False)
    assert not _layer("topk", capacity_factor=None).router.depends_on_batch(training=True)
    with pytest.raises(ValueError, match="eval_rule must be one of 'item', 'batch'; got 'sample'"):
        _layer("expert_choice", eval_rule="sample")


def _ec_layer(train_rule: str) -> MoE:
    torch.manual_seed(0)
    router_kwargs = {"train_rule": train_rule}
    return MoE(DIM, FFN, EXPERTS, 2, router="expert_choice", router_kwargs=router_kwargs, backend="reference").train()


def _outputs_and_grads(moe: MoE, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    out = moe(x)[0]
    (out * weight).sum().backward()
    return out.detach(), [x.grad, *(p.grad for p in moe.parameters())]


def test_expert_choice_train_rule_item_is_the_batch_rule_on_each_sample_alone_forward_and_gradients():
    """train_rule="item": a training forward routes within each sample; the reference is the training (batch) rule
    run on each sample alone (a batch of one), outputs concatenated and gradients summed over the samples."""
    item, alone = _ec_layer("item"), _ec_layer("batch")
    alone.load_state_dict(item.state_dict())
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(5, TOKENS, DIM, generator=generator)
    weight = torch.randn(x.shape, generator=generator)
    out, grads = _outputs_and_grads(item, x, weight)
    ref_out, ref_grads = [], [torch.zeros_like(g) for g in grads]
    for b in range(x.shape[0]):
        out_b, grads_b = _outputs_and_grads(alone, x[b : b + 1], weight[b : b + 1])
        ref_out.append(out_b)
        ref_grads[0][b : b + 1] = grads_b[0]
        for ref, g in zip(ref_grads[1:], grads_b[1:]):
            ref += g
    torch.testing.assert_close(out, torch.cat(ref_out), atol=1e-5, rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)
    # the default training rule chooses over the whole batch: it differs on the same weights (this test can fail)
    batch_out, _ = _outputs_and_grads(alone, x, weight)
    assert not torch.allclose(batch_out, out, atol=1e-4)
    # and training with the item rule routes as evaluation does
    with torch.no_grad():
        torch.testing.assert_close(item.eval()(x)[0], out, atol=1e-5, rtol=1e-5)


def test_expert_choice_train_rule_option():
    assert not _ec_layer("item").router.depends_on_batch(training=True)
    assert _ec_layer("batch").router.depends_on_batch(training=True)
    with pytest.raises(ValueError, match="train_rule must be one of 'item', 'batch'; got 'sample'"):
        _ec_layer("sample")


def test_the_layer_passes_sample_groups_in_training_only_to_a_router_with_a_per_item_training_rule():
    seen: list[bool] = []

    def record(module, args, kwargs):
        side = args[1] if len(args) > 1 else kwargs.get("side")
        seen.append(bool(side) and SAMPLE_IDX in side)

    cases = [(_ec_layer("item"), True), (_ec_layer("batch"), False), (_layer("topk", capacity_factor=None), False)]
    for moe, wanted in cases:
        seen.clear()
        handle = moe.router.register_forward_pre_hook(record, with_kwargs=True)
        moe.train()(torch.randn(3, TOKENS, DIM))
        moe.eval()(torch.randn(3, TOKENS, DIM))
        handle.remove()
        assert seen == [wanted, True], type(moe.router).__name__
