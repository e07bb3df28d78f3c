"""Speech recognition: Conformer-CTC MoE on a generated multilingual, code-switched corpus or on real data."""

from moezoo.extras import require

require("speech", __name__)  # before the imports it guards

from moezoo.tasks.speech.asr import CPUTimeLimit, SpeechRecognitionTask
from moezoo.tasks.speech.data import (
    CommonVoiceDataModule,
    LibriSpeechDataModule,
    ManifestDataModule,
    SpeechCorpusDataModule,
    SpeechDataModule,
)

__all__ = [
    "CPUTimeLimit",
    "CommonVoiceDataModule",
    "LibriSpeechDataModule",
    "ManifestDataModule",
    "SpeechCorpusDataModule",
    "SpeechDataModule",
    "SpeechRecognitionTask",
]
