"""People in the loop: a ranking page for labellers (``app``), the labels file (``store``), agreement and consensus
(``agreement``) and the ``lightning-rlhf label`` command (``command``). Only ``app`` needs the ``label`` extra."""

from lightning_rlhf.commands.label.command import main

__all__ = ["main"]
