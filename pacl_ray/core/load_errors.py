"""Errors of model loading, shared by every loader in :mod:`pacl_ray.core.backbones`.

A model that cannot be loaded (offline and not cached, an unknown id or tag, a missing file) is
one :class:`ModelLoadError` whose one-line message names the model id, the config key that chose
it (passed in by the caller, so this module stays config-free), the reason in one sentence and
how to fix it. The CLI reports it in one line with exit status 2.
"""

from __future__ import annotations

import contextlib
import logging
import os


class CheckpointMismatchError(ValueError):
    """A backbone checkpoint does not match the architecture; the message names the file and the
    first mismatching key."""


def _on(text: str) -> bool:
    return str(text).strip().lower() in ("1", "true", "yes", "on")


class ModelLoadError(ValueError):
    """Pretrained weights (or a model's files) could not be loaded. The one-line message names the
    model id, the config key that chose it, the reason in one sentence and how to fix it."""


# Substrings of the Hugging Face Hub's "not cached and no network" errors, also when another
# library re-raises them as text (open_clip: RuntimeError("Failed to download weights ...: <hub error>")).
_OFFLINE_MARKERS = ("cannot find the requested files in the local cache", "offline mode is enabled",
                    "hf_hub_offline", "couldn't connect to", "failed to resolve", "max retries exceeded",
                    "not the path to a directory containing",
                    "couldn't find them in the cached files")


def _cause_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and err not in chain and len(chain) < 8:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _from_hub(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) is the Hub's "not cached, cannot download" error."""
    return any(type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
               or any(m in str(e).lower() for m in _OFFLINE_MARKERS) for e in _cause_chain(err))


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm / transformers
        return os.path.expanduser("~/.cache/huggingface/hub")


def _offline() -> bool:
    return _on(os.environ.get("HF_HUB_OFFLINE", "")) or _on(os.environ.get("TRANSFORMERS_OFFLINE", ""))


def _first_sentence(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    for stop in (". ", "\n"):
        head, sep, _ = text.partition(stop)
        if sep:
            text = head
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def model_load_error(model: str, config_key: str, err: BaseException, fix: str,
                     weights: str = "") -> ModelLoadError:
    """The :class:`ModelLoadError` for ``err`` raised while loading ``model`` (chosen by
    ``config_key``; ``weights``: its pretrained tag / weights setting, when one is named). The
    reason is one sentence: "not in the local cache" for the Hub's offline/no-network errors
    (``huggingface_hub.errors.LocalEntryNotFoundError`` and the like, also when re-raised as text),
    else the first sentence of the error; ``fix`` says what to change."""
    if _from_hub(err):
        why = ("downloads are off (HF_HUB_OFFLINE=1)" if _offline()
               else "the Hugging Face Hub could not be reached")
        reason = f"its weights are not in the local cache ({_hub_cache()}) and {why}"
        fix = (f"{fix}; or download them once on a machine with network into the same cache "
               f"(HF_HOME / HF_HUB_CACHE) and copy it here")
    else:
        reason = _first_sentence(err)
    chosen = f"{config_key}={model!r}" if config_key else repr(model)
    return ModelLoadError(f"{chosen}{f' ({weights})' if weights else ''}: cannot load the model: {reason}. "
                          f"Fix: {fix}")


class _HoldBackLoaderErrors(logging.Filter):
    """Drops the ERROR records a model library logs just before it raises (open_clip:
    ``logging.error("Failed to download weights ...")`` on the root logger, which would print an
    ``ERROR:root:`` line); the raised error carries the same text."""

    def __init__(self, packages: tuple[str, ...]):
        super().__init__()
        self.packages = packages

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        return not (record.levelno >= logging.ERROR and any(f"/{p}/" in path for p in self.packages))


@contextlib.contextmanager
def loading(model: str, config_key: str, fix: str, weights: str = "", packages: tuple[str, ...] = ("open_clip",)):
    """Context of one model load: a failure to find or read the model's files becomes a
    :class:`ModelLoadError` (see :func:`model_load_error`); ERROR records the library logs on the
    way (``packages``) are held back. Errors that already name what is wrong
    (:class:`CheckpointMismatchError`, :class:`ModelLoadError`) and a missing local checkpoint file
    (FileNotFoundError not from the Hub) pass unchanged."""
    root = logging.getLogger()
    hold_back = _HoldBackLoaderErrors(packages)
    # logging.error() on a root logger without handlers calls basicConfig, which installs a stderr
    # handler for good; a NullHandler for the duration of the load keeps the root as it was.
    null_handler = logging.NullHandler() if not root.handlers else None
    if null_handler is not None:
        root.addHandler(null_handler)
    root.addFilter(hold_back)
    try:
        yield
    except (ModelLoadError, CheckpointMismatchError):
        raise
    except FileNotFoundError as err:
        if _from_hub(err):
            raise model_load_error(model, config_key, err, fix, weights) from err
        raise
    except (OSError, RuntimeError, ValueError) as err:
        raise model_load_error(model, config_key, err, fix, weights) from err
    finally:
        root.removeFilter(hold_back)
        if null_handler is not None:
            root.removeHandler(null_handler)
