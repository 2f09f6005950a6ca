"""Fixes for Unsloth behaviour that the service depends on, applied where Unsloth is loaded.

Expert LoRA and several resident adapters (unsloth_zoo 2026.10.9). Unsloth replaces PEFT's
``ParamWrapper.forward`` for the MoE expert parameters. Its replacement reads the expert LoRA
through ``unsloth_zoo.temporary_patches.moe_utils._extract_lora_from_wrapper(wrapper)`` with the
default ``adapter_name="default"``; an adapter not named "default" falls back to
``list(wrapper.lora_A)[0]``, the adapter loaded *first*, whatever ``set_adapter`` chose. With two
adapters resident, the second one is served with the first one's expert weights (attention LoRA
switches correctly; BENCHMARKS.md has the GPU run that showed it). Unsloth's own callers that name
an adapter explicitly (the routed decode path) are right; only the default-name calls are wrong.

``make_expert_lora_follow_active_adapter`` wraps that function so a call with the default name
resolves to the wrapper's active adapter, and to no LoRA at all when the active adapter has none on
this parameter (instead of another adapter's). It patches every loaded module that holds the
function (Unsloth imports it into its compiled-cache copy of ``moe_utils`` as well).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_TARGETS = ("_extract_lora_from_wrapper", "_get_moe_lora_weights")
_PATCHED = "_gptoss_follows_active_adapter"
_NO_LORA = object()


def active_expert_adapter(wrapper: Any, requested: str) -> Any:
    """The adapter name a LoRA lookup on ``wrapper`` should use: ``requested`` when the caller named
    one, otherwise the first active adapter that has LoRA here; ``_NO_LORA`` when none has."""
    if requested != "default":
        return requested
    lora_a = getattr(wrapper, "lora_A", None)
    if not lora_a:
        return requested  # nothing loaded: the original returns None itself
    active = [name for name in (getattr(wrapper, "active_adapters", None) or []) if name in lora_a]
    return active[0] if active else _NO_LORA


def _follow_active(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def extract(wrapper: Any, adapter_name: str = "default", *args: Any, **kwargs: Any) -> Any:
        name = active_expert_adapter(wrapper, adapter_name)
        if name is _NO_LORA:
            return None
        return original(wrapper, name, *args, **kwargs)

    setattr(extract, _PATCHED, True)
    return extract


def _namespaces() -> list[dict[str, Any]]:
    """Module namespaces that may hold Unsloth's lookup: Unsloth's modules (its compiled-cache copy
    included) and the globals of whatever function now stands as PEFT's ParamWrapper.forward."""
    found = [
        vars(m)
        for name, m in list(sys.modules.items())
        if name.startswith("unsloth") and hasattr(m, "__dict__")
    ]
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # an older PEFT without target_parameters: nothing to patch
        return found
    forward_globals = getattr(ParamWrapper.forward, "__globals__", None)
    if forward_globals is not None and all(forward_globals is not ns for ns in found):
        found.append(forward_globals)
    return found


def _lookups(namespace: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        (attr, fn)
        for attr in _TARGETS
        if callable(fn := namespace.get(attr)) and getattr(fn, "__name__", "") == "_extract_lora_from_wrapper"
    ]


def make_expert_lora_follow_active_adapter() -> str:
    """Patch every loaded copy of Unsloth's expert-LoRA lookup. Returns "patched" when every copy
    follows the active adapter, "absent" when no copy is loaded (Unsloth's MoE code is not in use, or
    a version that renamed it: the caller must then not trust several resident adapters)."""
    wrappers: dict[int, Callable[..., Any]] = {}
    seen = 0
    for namespace in _namespaces():
        for attr, fn in _lookups(namespace):
            seen += 1
            if not getattr(fn, _PATCHED, False):
                namespace[attr] = wrappers.setdefault(id(fn), _follow_active(fn))
    if wrappers:
        log.info("unsloth: expert LoRA now follows the active adapter (%d lookups patched)", len(wrappers))
    return "patched" if seen else "absent"
