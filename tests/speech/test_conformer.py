"""moe_conformer: shapes, padding invariance, equal active parameters of the dense twin, CTC overfit, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moezoo.layers import MoE, update_router_states
from moezoo.models import create_model
from moezoo.models.conformer import subsampled_lengths
from moezoo.tasks.speech.asr import SpeechRecognitionTask, encoder_frame_labels
from moezoo.tasks.speech.text import CharVocab, ctc_greedy_decode, edit_counts, normalize_text

ROUTERS = ("topk", "omni", "language", "global_embedding")


@pytest.mark.parametrize("router", ROUTERS)
def test_padding_never_changes_real_frames(router):
    model = create_model("moe_conformer_debug", moe={"router": router}).eval()
    short = torch.randn(1, 37, 80)
    long = torch.randn(1, 61, 80)
    batch = torch.zeros(2, 61, 80)
    batch[0, :37], batch[1] = short[0], long[0]
    with torch.no_grad():
        alone = model(short)
        together, auxes = model.forward_with_aux(batch, torch.tensor([37, 61]))
    frames = int(subsampled_lengths(torch.tensor(37)))
    assert together.lengths_B.tolist() == [frames, 16] and alone.shape == (1, frames, model.vocab_size)
    torch.testing.assert_close(together.log_probs_BLV[0, :frames], alone[0], rtol=1e-4, atol=1e-5)
    for aux in auxes:  # padding frames are not routed
        assert aux.num_tokens == frames + 16


@pytest.mark.parametrize("router", ROUTERS)
def test_dense_twin_has_the_active_parameters_of_the_moe(router):
    moe = create_model("moe_conformer_debug", moe={"router": router, "top_k": 1})
    dense = create_model("moe_conformer_debug", moe={"router": router, "top_k": 1, "dense": True})
    inactive, routers = 0, {}
    for m in moe.modules():
        if isinstance(m, MoE):
            per_expert = (m.experts.w_in.numel() + m.experts.w_out.numel()) // m.num_experts
            inactive += per_expert * (m.num_experts - m.top_k)
            routers[id(m.router)] = sum(p.numel() for p in m.router.parameters())
    extra = sum(routers.values()) + sum(p.numel() for p in (moe.global_proj.parameters() if moe.global_proj else []))
    total_moe = sum(p.numel() for p in moe.parameters())
    assert total_moe - inactive - extra == sum(p.numel() for p in dense.parameters())


def test_ctc_loss_falls_on_an_overfit_batch():
    torch.manual_seed(0)
    vocab = CharVocab()
    task = SpeechRecognitionTask(
        "moe_conformer_debug", {"moe": {"router": "language"}, "dropout": 0.0}, spec_augment=False
    )
    texts = ["drei", "twenty one", "cinco", "vingt"]
    targets = [torch.tensor(vocab.encode(t)) for t in texts]
    lengths = torch.tensor([60, 52, 44, 40])
    lid = torch.tensor([1, 0, 2, 3])[:, None].expand(4, 60).clone()
    batch = {
        "features": torch.randn(4, 60, 80),
        "lengths": lengths,
        "targets": torch.cat(targets),
        "target_lengths": torch.tensor([t.numel() for t in targets]),
        "lid": lid,
        "kinds": ["mono"] * 4,
        "uids": list("abcd"),
    }
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, auxes, metrics, _ = task.compute_loss(batch, "train")
        assert {"ctc_loss", "lid_loss", "lid_acc"} <= set(metrics)
        opt.zero_grad()
        (loss + sum(a.aux_loss for a in auxes)).backward()
        opt.step()
        update_router_states(task.model)
        losses.append(float(metrics["ctc_loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(metrics["lid_acc"]) > 0.9


def test_model_rejects_bad_input():
    model = create_model("moe_conformer_debug")
    with pytest.raises(ValueError, match="n_mels=80"):
        model(torch.randn(2, 30, 40))
    with pytest.raises(ValueError, match="lengths must be"):
        model(torch.randn(2, 30, 80), torch.tensor([31, 3]))
    with pytest.raises(ValueError, match="moe.router='nope' is unknown"):
        create_model("moe_conformer_debug", moe={"router": "nope"})
    with pytest.raises(ValueError, match="lid_layer must be in"):
        create_model("moe_conformer_debug", moe={"router": "language"}, lid_layer=2)


def test_greedy_decoding_and_error_counts_by_hand():
    # path: a a _ b b _ b  -> "abb"; second utterance is cut at length 2 -> "a"
    ids = torch.tensor([[1, 1, 0, 2, 2, 0, 2], [1, 0, 3, 3, 3, 3, 3]])
    log_probs = F.one_hot(ids, 4).float().log()
    assert ctc_greedy_decode(log_probs, torch.tensor([7, 2])) == [[1, 2, 2], [1]]
    assert edit_counts("the cat sat", "the cat sat") == (0, 11, 0, 3)
    assert edit_counts("the bat", "the cat sat") == (5, 11, 2, 3)
    assert normalize_text("Quatre-Vingt-Dix, ¡Hola!  It’s") == "quatre vingt dix hola it's"


def test_encoder_frame_labels_take_the_frame_near_each_centre():
    lid = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1, -1]])
    assert encoder_frame_labels(lid, 3).tolist() == [[0, 1, -1]]
