"""CTC speech recognition with ``moe_conformer``: CTC loss, the LR-MoE language-ID loss, SpecAugment, greedy
decoding and exact corpus-level CER/WER, overall and per group of utterances (kind ``mono``/``cs``/``real``,
engine, language, held-out engine: :func:`moezoo.tasks.speech.data.metric_groups`)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor

from moezoo.layers import MoEAux
from moezoo.layers.speech_routers import cross_layer_agreement
from moezoo.models.conformer import subsampled_lengths
from moezoo.stats import TokenGroups
from moezoo.tasks.base import MoETask
from moezoo.tasks.callbacks import CPUTimeBudget
from moezoo.tasks.speech.data import LANGUAGES
from moezoo.tasks.speech.text import CharVocab, ctc_greedy_decode, edit_counts


def _zero_counts() -> list[int]:
    """(character edits, reference characters, word edits, reference words)."""
    return [0, 0, 0, 0]


def encoder_frame_labels(lid_BT: Tensor, num_frames: int) -> Tensor:
    """10 ms frame labels -> encoder-frame labels (every 4th frame, offset 1 toward the centre): (B, L)."""
    idx_L = (torch.arange(num_frames, device=lid_BT.device) * 4 + 1).clamp(max=lid_BT.shape[1] - 1)
    return lid_BT[:, idx_L]


def utterance_groups(batch: dict[str, Any], languages: tuple[str, ...]) -> Tensor:
    """Group of each utterance ``(B,)``: the index of its language if monolingual (the language of its labelled
    frames), ``len(languages)`` ("cs") if code-switched, -1 (not counted) for any other kind or no label."""
    group_B = torch.full((len(batch["kinds"]),), -1, dtype=torch.long)
    for b, kind in enumerate(batch["kinds"]):
        if kind == "cs":
            group_B[b] = len(languages)
        elif kind == "mono":
            labels = batch["lid"][b][batch["lid"][b] >= 0]
            if labels.numel():
                group_B[b] = int(torch.bincount(labels).argmax())
    return group_B


class SpeechRecognitionTask(MoETask):
    """Conformer-CTC training; logs ``loss``, ``ctc_loss``, ``lid_loss``/``lid_acc`` (LR-MoE), ``cer``/``wer``
    on validation and test, each also per group of the batch's ``groups`` (``cer_mono``, ``cer_cs``,
    ``cer_engine_flite``, ``cer_lang_de``, ``cer_engine_festival_en``, ``cer_unseen_engine`` ...; ``moezoo fit``
    and ``moezoo test`` write them to ``test_metrics.json``), and the MoE statistics incl. ``routing_agreement``.

    Args:
        lid_coef: weight of the frame-level language-ID cross-entropy (models with an LID head).
        spec_augment: apply SpecAugment (2 frequency masks of <= 15 bins, time masks of <= 20 frames) in training.
        num_time_masks: time masks per utterance for SpecAugment.
        model, model_kwargs, **kwargs (``optimizer``, ``lr_scheduler``, ``aux_loss_coef``): as in
            :class:`moezoo.tasks.base.MoETask` (``model_kwargs.vocab_size`` defaults to the vocabulary's size).
    """

    def __init__(
        self,
        model: str = "moe_conformer_debug",
        model_kwargs: dict[str, Any] | None = None,
        lid_coef: float = 0.3,
        spec_augment: bool = True,
        num_time_masks: int = 2,
        **kwargs: Any,
    ) -> None:
        vocab = CharVocab()
        model_kwargs = {"vocab_size": len(vocab), **(model_kwargs or {})}
        super().__init__(model, model_kwargs, **kwargs)
        if lid_coef < 0:
            raise ValueError(f"lid_coef must be >= 0, got {lid_coef}")
        if getattr(self.model, "vocab_size", len(vocab)) != len(vocab):
            raise ValueError(f"model vocab_size={self.model.vocab_size} must equal the vocabulary size {len(vocab)}")
        self.vocab = vocab
        self.lid_coef = lid_coef
        self.spec_augment = spec_augment
        self.augment = torchaudio.transforms.SpecAugment(
            n_time_masks=num_time_masks, time_mask_param=20, n_freq_masks=2, freq_mask_param=15, zero_masking=True
        )
        self.errors: dict[str, list[int]] = defaultdict(_zero_counts)

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.model(features, lengths)

    def compute_loss(self, batch: Any, stage: str) -> tuple[Tensor, list[MoEAux], dict[str, Tensor], int]:
        features, lengths = batch["features"], batch["lengths"]
        if stage == "train" and self.spec_augment:
            features = self.augment(features.transpose(1, 2)).transpose(1, 2)
        out, auxes = self.model.forward_with_aux(features, lengths)
        ctc = F.ctc_loss(
            out.log_probs_BLV.transpose(0, 1),
            batch["targets"],
            out.lengths_B,
            batch["target_lengths"],
            blank=0,
            reduction="mean",
            zero_infinity=True,
        )
        metrics: dict[str, Tensor] = {"ctc_loss": ctc.detach()}
        loss = ctc
        if out.lid_logits_BLA is not None:
            labels_BL = encoder_frame_labels(batch["lid"], out.lid_logits_BLA.shape[1])
            labels_BL = labels_BL.masked_fill(~out.mask_BL, -1)
            valid = labels_BL >= 0
            if bool(valid.any()):
                lid_loss = F.cross_entropy(out.lid_logits_BLA[valid].float(), labels_BL[valid])
                loss = loss + self.lid_coef * lid_loss
                metrics["lid_loss"] = lid_loss.detach()
                metrics["lid_acc"] = (out.lid_logits_BLA[valid].argmax(-1) == labels_BL[valid]).float().mean()
        routings = [a.routing for a in auxes if a.routing is not None]
        if len(routings) >= 2 and len({r.num_tokens for r in routings}) == 1:
            metrics["routing_agreement"] = torch.tensor(cross_layer_agreement(routings))
            if stage != "train":  # after the best one-to-one relabelling of experts between consecutive layers
                metrics["routing_agreement_matched"] = torch.tensor(cross_layer_agreement(routings, matched=True))
        if stage != "train":
            self._accumulate(out.log_probs_BLV, out.lengths_B, batch)
        return loss, auxes, metrics, features.shape[0]

    def routing_groups(self, batch: Any) -> TokenGroups:
        """Routing shares per language: a monolingual utterance counts for its language, every code-switched one
        for ``"cs"``; the MoE layers route the real encoder frames only, utterance by utterance."""
        languages = self.languages()
        group_B = utterance_groups(batch, languages)
        return TokenGroups(group_B, (*languages, "cs"), "language", subsampled_lengths(batch["lengths"]))

    def _accumulate(self, log_probs: Tensor, lengths: Tensor, batch: dict[str, Any]) -> None:
        hyps = ctc_greedy_decode(log_probs.detach(), lengths)
        refs = torch.split(batch["targets"].cpu(), batch["target_lengths"].tolist())
        groups = batch.get("groups") or [(kind,) for kind in batch["kinds"]]
        for hyp, ref, names in zip(hyps, refs, groups):
            counts = edit_counts(self.vocab.decode(hyp), self.vocab.decode(ref.tolist()))
            for key in ("", *(f"_{name}" for name in names)):
                acc = self.errors[key]
                for i, c in enumerate(counts):
                    acc[i] += c

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if batch is None:  # every utterance of the batch was skipped (bad audio)
            return None
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return None if batch is None else super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return None if batch is None else super().test_step(batch, batch_idx)

    def error_rates(self) -> dict[str, float]:
        """Corpus-level CER/WER accumulated since the last reset: ``cer``, ``wer``, ``cer_<group>``, ..."""
        out = {}
        for key, (char_err, chars, word_err, words) in self.errors.items():
            out[f"cer{key}"] = char_err / max(1, chars)
            out[f"wer{key}"] = word_err / max(1, words)
        return out

    def _log_error_rates(self, stage: str) -> None:
        for name, value in self.error_rates().items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "cer")
        self.errors.clear()

    def on_validation_epoch_start(self) -> None:
        self.errors.clear()

    def on_validation_epoch_end(self) -> None:
        self._log_error_rates("val")

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.errors.clear()

    def on_test_epoch_end(self) -> None:
        self._log_error_rates("test")
        super().on_test_epoch_end()

    def transcribe(self, features: Tensor, lengths: Tensor | None = None) -> list[str]:
        """Greedy CTC transcripts of a padded batch of log-mel features."""
        out, _ = self.model.forward_with_aux(features, lengths)
        return [self.vocab.decode(ids) for ids in ctc_greedy_decode(out.log_probs_BLV, out.lengths_B)]

    # -- the vocabulary and the language names travel in checkpoints ----------------------------------
    #: language names restored from a checkpoint (the LID head's outputs, in order)
    saved_languages: tuple[str, ...] | None = None

    def languages(self) -> tuple[str, ...]:
        """The LID head's language names: the checkpoint's, else the data module's, else the corpus default."""
        if self.saved_languages is not None:
            return self.saved_languages
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return tuple(getattr(datamodule, "languages", None) or LANGUAGES)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vocabulary"] = list(self.vocab.symbols)
        checkpoint["languages"] = list(self.languages())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "vocabulary" in checkpoint:
            vocab = CharVocab(checkpoint["vocabulary"])
            if len(vocab) != len(self.vocab):
                raise ValueError(
                    f"the checkpoint's vocabulary has {len(vocab)} symbols but the model was built for "
                    f"{len(self.vocab)} (model_kwargs.vocab_size); build the model with vocab_size={len(vocab)}"
                )
            self.vocab = vocab
        if "languages" in checkpoint:
            self.saved_languages = tuple(checkpoint["languages"])

    # -- predict -----------------------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any] | None:
        """Greedy CTC transcripts and, with a language-ID head (LR-MoE), each utterance's language posteriors
        (the head's frame posteriors averaged over the utterance's encoder frames)."""
        if batch is None:  # every file of the batch was unreadable
            return None
        out, _ = self.model.forward_with_aux(batch["features"], batch["lengths"])
        texts = [self.vocab.decode(ids) for ids in ctc_greedy_decode(out.log_probs_BLV, out.lengths_B)]
        result: dict[str, Any] = {"uid": batch["uids"], "text": texts}
        if "files" in batch:
            result["file"] = batch["files"]
        if out.lid_logits_BLA is not None:
            mask_BL1 = out.mask_BL.unsqueeze(-1).float()
            probs_BLA = torch.softmax(out.lid_logits_BLA.float(), dim=-1) * mask_BL1
            result["language_probs"] = probs_BLA.sum(1) / mask_BL1.sum(1).clamp_min(1.0)
        return result

    def prediction_rows(self, prediction: Any, batch: Any) -> list[dict[str, Any]]:
        """Per utterance: ``uid``, ``file`` (predict_path), ``text`` and, with a LID head, ``language`` (the most
        probable) and ``language_probs`` (``{language: posterior}``)."""
        if prediction is None:
            return []
        probs = prediction.pop("language_probs", None)
        rows = super().prediction_rows(prediction, batch)
        if probs is not None:
            names = self.languages()
            if len(names) != probs.shape[-1]:
                names = tuple(f"language {a}" for a in range(probs.shape[-1]))
            for row, p in zip(rows, probs.tolist()):
                row["language_probs"] = {name: round(v, 6) for name, v in zip(names, p)}
                row["language"] = names[max(range(len(p)), key=p.__getitem__)]
        return rows

    def write_predictions(self, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """``transcripts.jsonl``: one utterance a line."""
        from moezoo.tasks.predict import write_jsonl_atomic

        return [write_jsonl_atomic(out_dir / "transcripts.jsonl", rows)]

    def prediction_summary(self, rows: list[dict[str, Any]]) -> str:
        lines = [f"{len(rows)} utterances"]
        for row in rows[:5]:
            language = f" [{row['language']} {row['language_probs'][row['language']]:.2f}]" if "language" in row else ""
            lines.append(f"  {row.get('file', row['uid'])}{language}: {row['text']!r}")
        if len(rows) > 5:
            lines.append(f"  ... ({len(rows) - 5} more in the file)")
        return "\n".join(lines)


#: the CPU-time training budget (one implementation, :class:`moezoo.tasks.callbacks.CPUTimeBudget`), under the
#: name the speech configs use
CPUTimeLimit = CPUTimeBudget
