"""Train and use unCLIP (DALL-E 2) text-to-image models. `dalle2.UnCLIP` is a trained system
(dalle2/unclip.py); dalle2.edges holds what talks to users, MLflow and ZenML."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dalle2.unclip import UnCLIP

__all__ = ["UnCLIP"]


def __getattr__(name: str) -> Any:
    """`dalle2.UnCLIP` on first use: `import dalle2.config` stays free of torch."""
    if name == "UnCLIP":
        from dalle2.unclip import UnCLIP

        return UnCLIP
    raise AttributeError(f"module 'dalle2' has no attribute {name!r}")
