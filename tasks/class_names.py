"""Class names that travel with a checkpoint: classification and detection heads name their outputs the same way."""

from __future__ import annotations

from typing import Any


def class_names(datamodule: Any, num_classes: int) -> tuple[str, ...]:
    """The data's class names (its ``class_names`` attribute) when they fit the head, else ``"0"``, ``"1"`` ..."""
    names = getattr(datamodule, "class_names", None)
    if names is None or len(names) != num_classes:
        names = tuple(str(i) for i in range(num_classes))
    return tuple(str(n) for n in names)


class NamedClasses:
    """Mixin for a task whose model has ``num_classes`` outputs: the names come from the data while training and
    are saved in every checkpoint (``checkpoint["class_names"]``), so a checkpoint predicts with the names it was
    trained on even when the data module at predict time has none (a folder of images, a YOLO folder without a
    names list) or different ones.

    Mix in before :class:`~moezoo.tasks.base.MoETask`; the hooks call the next class's.
    """

    #: class names restored from a checkpoint (``on_load_checkpoint``); they name the head's outputs
    saved_class_names: tuple[str, ...] | None = None

    def class_names(self) -> tuple[str, ...]:
        """The names of the head's classes: the checkpoint's, else the data's, else ``"0"``, ``"1"`` ..."""
        num_classes = self.model.num_classes  # type: ignore[attr-defined]
        if self.saved_class_names is not None and len(self.saved_class_names) == num_classes:
            return self.saved_class_names
        trainer = getattr(self, "_trainer", None)
        datamodule = trainer.datamodule if trainer is not None else None
        return class_names(datamodule, num_classes)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint["class_names"] = list(self.class_names())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        names = checkpoint.get("class_names")
        self.saved_class_names = None if names is None else tuple(str(n) for n in names)
