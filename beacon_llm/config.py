"""Typed configuration of Activation Beacon (paper v2 §2.2 / v3 §3; docs/design.md §1).

Two *eras* exist because the official code changed meaning between releases:

* ``"v2"`` — the Llama-2 checkpoint code (paper v2). ``attend_previous`` means "beacons may attend to the beacon
  memory of earlier windows"; ``stride`` may be smaller than ``window`` (the last ``window - stride`` raw KVs are
  cached); beacons are always appended; no attention sink.
* ``"v3"`` — the Mistral / Qwen-2 code (paper v3). ``attend_prev`` means "beacons may attend to earlier beacons of
  the same window"; ``pos`` chooses append or interleave placement; ``sink_size`` first tokens are kept raw.

The JSON form uses the official ``beacon_*`` key names, so an official ``config.json`` is read directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

Era = Literal["v2", "v3"]
AttnScheme = Literal["step-expansion", "segmentation", "full-coverage"]
Placement = Literal["append", "interleave"]

CONFIG_NAME = "beacon_config.json"
ATTN_SCHEMES: tuple[str, ...] = ("step-expansion", "segmentation", "full-coverage")
PLACEMENTS: tuple[str, ...] = ("append", "interleave")
ERAS: tuple[str, ...] = ("v2", "v3")
RATIO_MIXES: tuple[str, ...] = ("step-random", "instance-random", "sequence", "adapt-<N>", "fit-<N>")
PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "o")
EMBED_INITS: tuple[str, ...] = ("eos", "bos")
# official config keys that select experimental modes we do not implement (docs/design.md §1.4)
_UNSUPPORTED_KEYS = {"retrieval_method": None, "beacon_parallel_window": 1}


def _fail(msg: str) -> None:
    raise ValueError(msg)


@dataclass
class BeaconConfig:
    """All Activation Beacon knobs of the three official eras, validated on construction.

    Args:
        window: raw tokens per window (W; "interval" in paper v2, "chunk" in v3).
        stride: tokens a full window advances (S <= W); ``None`` means ``window``. S < W keeps the last W - S raw
            KVs uncompressed (era v2 only).
        ratios: candidate compression ratios; a window of S tokens gets S / ratio beacons; 0 keeps raw KVs.
        ratio_mix: how a ratio is picked per window: ``step-random`` (per window, from ``generator``),
            ``instance-random`` (once per sequence), ``sequence`` (v2: list[min(step, n-1)], v3: cycle),
            ``adapt-N`` (once: the largest compression that still fits input length + N in the base positions),
            ``fit-N`` (this project's inference mode, not an official one: a read that fits the base positions is
            read raw by the plain model; a longer one condenses only its oldest windows, at the largest ratio, and
            keeps the rest raw; N is the answer reserve assumed when the caller gives no planned length).
        attn: which raw tokens of its window a beacon attends to (paper v2 §2.2, Fig. 3).
        pos: ``append`` beacons after the window's raw tokens, or ``interleave`` one after every ratio raw tokens.
        attend_previous: era v2 only: beacons may attend to the beacon memory of earlier windows.
        attend_prev: era v3 only: beacons may attend to earlier beacons of the same window.
        param: attention projections that get beacon-only copies (q, k, v, o).
        embed_init: base embedding row copied into the beacon embedding at attach time.
        sink_size: era v3: number of first tokens kept raw at the head of the memory.
        fit_overlap: ``fit-N`` only (this project's option): the last ``fit_overlap`` tokens of the condensed windows
            are read once more, raw, right after the beacons, so the text after the condensed part keeps its local
            context (they take that many positions more). 0 (the default) reads the raw part straight after the
            beacons.
        memory_gate: this project's option, off (``None``) by default: a learned gate ``g >= 0`` per layer and
            query head on the attention the beacons of the memory draw (a logit offset ``log g``: 1 is the ungated
            model, 0 hides the beacons, so the memory reads as its sink and raw entries alone). The number is the
            gates' initial value. Needs the memory laid out as sink, beacons, raw entries: a ``fit-N`` mix, or
            ratios without 0.
        era: ``"v2"`` or ``"v3"`` semantics (see module docstring).
    """

    window: int = 1024
    stride: int | None = None
    ratios: tuple[int, ...] = (2, 4, 8, 16, 32)
    ratio_mix: str = "step-random"
    attn: str = "full-coverage"
    pos: str = "interleave"
    attend_previous: bool | None = None
    attend_prev: bool | None = None
    param: tuple[str, ...] = ("q", "k", "v")
    embed_init: str = "eos"
    sink_size: int = 0
    era: str = "v3"
    fit_overlap: int = 0
    memory_gate: float | None = None
    adapt_extra: int = field(init=False, default=0)  # the N of adapt-N / fit-N

    def __post_init__(self) -> None:
        if isinstance(self.ratios, int) and not isinstance(self.ratios, bool):
            self.ratios = (self.ratios,)
        self.ratios = tuple(self.ratios)
        self.param = tuple(self.param)
        if self.era not in ERAS:
            _fail(f"era={self.era!r} is not one of {ERAS}")
        for name in ("window", "sink_size", "fit_overlap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                _fail(f"beacon_{name}={value!r} must be an int")
        if self.window <= 0:
            _fail(f"beacon_window={self.window} must be positive")
        if self.stride is None:
            self.stride = self.window
        if not isinstance(self.stride, int) or isinstance(self.stride, bool) or self.stride <= 0:
            _fail(f"beacon_stride={self.stride!r} must be a positive int")
        if self.stride > self.window:
            _fail(f"beacon_stride={self.stride} exceeds beacon_window={self.window}; use a stride <= the window")
        if self.attn not in ATTN_SCHEMES:
            _fail(f"beacon_attn={self.attn!r} is not one of {ATTN_SCHEMES}")
        if self.pos not in PLACEMENTS:
            _fail(f"beacon_pos={self.pos!r} is not one of {PLACEMENTS}")
        if self.embed_init not in EMBED_INITS:
            _fail(f"beacon_embed_init={self.embed_init!r} is not one of {EMBED_INITS}")
        bad = [p for p in self.param if p not in PROJECTIONS]
        if bad or len(set(self.param)) != len(self.param):
            _fail(f"beacon_param={list(self.param)} must be distinct names from {PROJECTIONS} ('mlp' is not supported)")
        if not self.ratios:
            _fail("beacon_ratio=[] must list at least one ratio")
        for r in self.ratios:
            if not isinstance(r, int) or isinstance(r, bool) or r < 0:
                _fail(f"beacon_ratio entry {r!r} must be an int >= 0")
            if r > self.stride:
                _fail(f"beacon_ratio {r} exceeds beacon_stride={self.stride}; every ratio must be <= the stride")
            exempt = self.era == "v2" and self.attn == "full-coverage"
            if r > 0 and self.stride % r != 0 and not exempt:
                _fail(f"beacon_stride={self.stride} is not divisible by ratio {r}; pick ratios that divide the stride")
        self.adapt_extra = self._parse_mix(self.ratio_mix)
        if self.is_fit:
            if self.stride != self.window:
                _fail(f"beacon_ratio_mix={self.ratio_mix!r} needs beacon_stride = beacon_window ({self.window})")
            bad_fit = [r for r in self.ratios if r > 0 and self.window % r]
            if bad_fit:
                _fail(f"beacon_ratio_mix={self.ratio_mix!r}: ratios {bad_fit} do not divide the window {self.window}")
        if self.sink_size < 0:
            _fail(f"beacon_sink_size={self.sink_size} must be >= 0")
        if self.sink_size > self.window:
            _fail(
                f"beacon_sink_size={self.sink_size} must be at most beacon_window={self.window}: the sink is the "
                "first window's first tokens"
            )
        if not 0 <= self.fit_overlap <= self.window:
            _fail(f"beacon_fit_overlap={self.fit_overlap} must be within [0, beacon_window={self.window}]")
        if self.fit_overlap and not self.is_fit:
            _fail(
                f"beacon_fit_overlap={self.fit_overlap} only applies to a fit-N beacon_ratio_mix (got "
                f"{self.ratio_mix!r}); set beacon_fit_overlap=0 or use a fit-N mix"
            )
        if self.memory_gate is not None:
            gate = self.memory_gate
            if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0.0 <= gate < float("inf"):
                _fail(f"beacon_memory_gate={gate!r} must be a finite number >= 0 (the gates' initial value) or None")
            self.memory_gate = float(gate)
            if not self.is_fit and 0 in self.ratios:
                _fail(
                    f"beacon_memory_gate needs the memory laid out as sink, beacons, raw entries, but ratio 0 in "
                    f"beacon_ratio={list(self.ratios)} under beacon_ratio_mix={self.ratio_mix!r} mixes raw windows "
                    "between beacons; drop ratio 0 or use a fit-N mix"
                )
        if self.era == "v2":
            if self.attend_prev is not None:
                _fail("beacon_attend_prev is an era-v3 key; era v2 uses beacon_attend_previous (attend to memory)")
            if self.attend_previous is None:
                self.attend_previous = True
            if self.pos != "append":
                _fail(f"beacon_pos={self.pos!r}: era v2 only appends beacons; use era='v3' for interleave")
            if self.sink_size:
                _fail(f"beacon_sink_size={self.sink_size}: era v2 has no attention sink; use era='v3'")
        else:
            if self.attend_previous is not None:
                _fail("beacon_attend_previous is an era-v2 key; era v3 uses beacon_attend_prev (same-window beacons)")
            if self.attend_prev is None:
                self.attend_prev = True
            if self.stride != self.window:
                _fail(
                    f"beacon_stride={self.stride} < beacon_window={self.window} is only supported in era v2 "
                    "(the official v3 code crashes on it); set stride = window"
                )
            if self.pos == "interleave" and self.attn == "segmentation":
                _fail("beacon_attn='segmentation' cannot be combined with beacon_pos='interleave'")
            if self.pos == "interleave" and self.attn == "step-expansion" and self.attend_prev:
                _fail(
                    "beacon_pos='interleave' with beacon_attn='step-expansion' requires beacon_attend_prev=False "
                    "(as in the official code)"
                )

    @staticmethod
    def _parse_mix(mix: str) -> int:
        if mix in ("step-random", "instance-random", "sequence"):
            return 0
        for prefix in ("adapt-", "fit-"):
            if isinstance(mix, str) and mix.startswith(prefix):
                tail = mix[len(prefix) :]
                if tail.isdigit():
                    return int(tail)
        _fail(
            f"beacon_ratio_mix={mix!r} is not one of {RATIO_MIXES} (N a non-negative int, e.g. 'adapt-1024' or "
            "'fit-256')"
        )
        return 0  # unreachable

    # ------------------------------------------------------------------ derived
    @property
    def is_adaptive(self) -> bool:
        return self.ratio_mix.startswith("adapt-")

    @property
    def is_fit(self) -> bool:
        """``fit-N``: condense only what does not fit the base positions (see :func:`schedule.fit_plan`)."""
        return self.ratio_mix.startswith("fit-")

    @property
    def interleave(self) -> bool:
        return self.pos == "interleave"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Official ``beacon_*`` keys in this era's spelling (readable by :meth:`from_dict`)."""
        out: dict[str, Any] = {
            "beacon_window": self.window,
            "beacon_stride": [self.stride] if self.era == "v2" else self.stride,
            "beacon_attn": self.attn,
            "beacon_ratio": list(self.ratios),
            "beacon_ratio_mix": self.ratio_mix,
            "beacon_param": list(self.param),
            "beacon_embed_init": self.embed_init,
        }
        if self.era == "v2":
            out["beacon_attend_previous"] = self.attend_previous
            out["beacon_stride_mix"] = "step-random"
        else:
            out["beacon_attend_prev"] = self.attend_prev
            out["beacon_pos"] = self.pos
            out["beacon_sink_size"] = self.sink_size
            out["beacon_parallel_window"] = 1
        if self.fit_overlap:  # this project's key: written only when used, so official configs stay as they were
            out["beacon_fit_overlap"] = self.fit_overlap
        if self.memory_gate is not None:  # this project's key, likewise
            out["beacon_memory_gate"] = self.memory_gate
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> BeaconConfig:
        """Read ``beacon_*`` keys of an official config.json (any era) or of :meth:`to_dict`.

        ``overrides`` are ``beacon_*`` keys applied on top (like the official ``Config.from_pretrained(**kw)``); one
        that switches ``beacon_ratio_mix`` away from ``fit-N`` also drops a saved ``beacon_fit_overlap``, and a new
        ``beacon_window`` takes a saved ``beacon_stride`` along when that stride equalled the saved window.
        Other keys are ignored. The era is detected from the key spelling: ``beacon_attend_previous`` or a list
        ``beacon_stride`` means v2 (Llama-2 checkpoint), otherwise v3 (Mistral / Qwen-2 checkpoints).
        """
        d = {k: v for k, v in d.items() if k.startswith("beacon_") or k in _UNSUPPORTED_KEYS}
        mix = overrides.get("beacon_ratio_mix")
        if isinstance(mix, str) and not mix.startswith("fit-") and "beacon_fit_overlap" not in overrides:
            d.pop("beacon_fit_overlap", None)  # a saved fit-N option does not follow the read into another mode
        if "beacon_window" in overrides and "beacon_stride" not in overrides:
            saved = d.get("beacon_stride")
            saved = saved[0] if isinstance(saved, list) and len(saved) == 1 else saved
            if saved == d.get("beacon_window"):  # a stride equal to the window follows a new window
                if isinstance(d["beacon_stride"], list):  # the list spelling marks era v2: keep the era
                    d.setdefault("beacon_era", "v2")
                d.pop("beacon_stride")
        d = {**d, **overrides}
        if not any(k.startswith("beacon_") for k in d):
            raise ValueError("the config has no beacon_* keys: it is not an Activation Beacon config")
        for key, ok in _UNSUPPORTED_KEYS.items():
            if key in d and d[key] not in (ok, None):
                raise ValueError(f"{key}={d[key]!r} selects an experimental mode that beacon-llm does not implement")
        known = {
            "beacon_window",
            "beacon_stride",
            "beacon_stride_mix",
            "beacon_attn",
            "beacon_attend_previous",
            "beacon_attend_prev",
            "beacon_ratio",
            "beacon_ratio_mix",
            "beacon_param",
            "beacon_embed_init",
            "beacon_sink_size",
            "beacon_pos",
            "beacon_parallel_window",
            "beacon_era",
            "beacon_fit_overlap",
            "beacon_memory_gate",
        }
        unknown = sorted(k for k in d if k.startswith("beacon_") and k not in known)
        if unknown:
            raise ValueError(f"unknown beacon config keys {unknown}; known keys are {sorted(known)}")
        stride = d.get("beacon_stride")
        era = d.get("beacon_era") or ("v2" if "beacon_attend_previous" in d or isinstance(stride, list) else "v3")
        if isinstance(stride, list):
            if len(stride) != 1:
                raise ValueError(f"beacon_stride={stride}: only a single stride is supported")
            stride = stride[0]
        kwargs: dict[str, Any] = {"era": era}
        if "beacon_window" in d:
            kwargs["window"] = d["beacon_window"]
        kwargs["stride"] = stride
        for src, dst in (
            ("beacon_attn", "attn"),
            ("beacon_ratio", "ratios"),
            ("beacon_ratio_mix", "ratio_mix"),
            ("beacon_embed_init", "embed_init"),
            ("beacon_sink_size", "sink_size"),
            ("beacon_pos", "pos"),
            ("beacon_fit_overlap", "fit_overlap"),
            ("beacon_memory_gate", "memory_gate"),
        ):
            if d.get(src) is not None:
                kwargs[dst] = d[src]
        if era == "v2":
            kwargs["attend_previous"] = d.get("beacon_attend_previous", True)
            kwargs.setdefault("attn", "step-expansion")
            kwargs.setdefault("pos", "append")
            kwargs["param"] = tuple(d.get("beacon_param", PROJECTIONS))
        else:
            kwargs["attend_prev"] = d.get("beacon_attend_prev", True)
            # era B (Mistral) configs have no beacon_pos: append only
            kwargs.setdefault("pos", "append" if "beacon_pos" not in d else d["beacon_pos"])
            kwargs.setdefault("attn", "step-expansion" if kwargs["pos"] == "append" else "full-coverage")
            if "beacon_param" not in d:
                raise ValueError("config has no beacon_param: say which projections carry beacon weights")
            kwargs["param"] = tuple(d["beacon_param"])
        return cls(**kwargs)

    def to_json_file(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**self.to_dict(), "beacon_era": self.era}, f, indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> BeaconConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
