"""The model configuration: one frozen dataclass mirroring transformers' `GptOssConfig`.

`from_hf` reads a `config.json` dict (or the folder holding one); `to_hf` writes it back exactly. Keys that
do not change the computation (`architectures`, `transformers_version`, token ids, ...) are carried
verbatim in `hf_extra` so the round trip is lossless. Anything the model cannot honour is refused with
an error naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
# Rope settings that we interpret; any other key in the rope dict changes the math in ways we do not
# implement (mscale, partial rotary, long-rope factors), so it is refused rather than ignored.
_ROPE_KEYS = {
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "beta_fast",
    "beta_slow",
    "original_max_position_embeddings",
    "truncate",
    "attention_factor",
}


class ConfigError(ValueError):
    """A config.json value this implementation cannot honour."""


@dataclasses.dataclass(frozen=True)
class RopeParams:
    """RoPE settings as written in config.json; `None` means the key was absent (HF defaults apply)."""

    rope_type: str = "yarn"
    theta: float = 150000.0
    factor: float | None = 32.0
    beta_fast: float | None = 32.0
    beta_slow: float | None = 1.0
    original_max_position_embeddings: int | None = 4096
    truncate: bool | None = False
    attention_factor: float | None = None

    @classmethod
    def from_hf(cls, rope: dict[str, Any] | None, theta: float | None) -> RopeParams:
        rope = dict(rope or {"rope_type": "default"})
        unknown = sorted(set(rope) - _ROPE_KEYS)
        if unknown:
            raise ConfigError(f"config.json: rope setting(s) {unknown} are not supported")
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope.pop("type", None)
        if rope_type not in ("yarn", "default"):
            raise ConfigError(f"config.json: rope_type {rope_type!r} is not supported (yarn or default)")
        theta = rope.pop("rope_theta", theta)
        if theta is None:
            raise ConfigError("config.json: rope_theta is missing")
        if rope_type == "yarn" and (
            rope.get("factor") is None or "original_max_position_embeddings" not in rope
        ):
            raise ConfigError("config.json: yarn rope needs factor and original_max_position_embeddings")
        fields = {
            f.name: rope.get(f.name) for f in dataclasses.fields(cls) if f.name not in ("rope_type", "theta")
        }
        return cls(rope_type=rope_type, theta=theta, **fields)

    def to_hf(self, with_theta: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type}
        if with_theta:
            out["rope_theta"] = self.theta
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("rope_type", "theta") and value is not None:
                out[f.name] = value
        return out

    @property
    def yarn_truncate(self) -> bool:
        # transformers treats an absent `truncate` as True (bounds rounded to integers).
        return True if self.truncate is None else self.truncate


ROPE_MODES = ("decompressed", "partial", "rorope")


@dataclasses.dataclass(frozen=True)
class MlaConfig:
    """Which attention layers are Multi-head Latent Attention, and how (see docs/design.md, "MLA: the math").

    `decompressed`: the cache holds a latent of `latent_dim` values per token; K (before RoPE) and V are
    up-projected from it. `partial`: for every kv head a few RoPE frequency pairs (`rope_pairs[i][g]`, the
    pair indices of converted layer i, kv head g) keep their keys exactly, cached after RoPE; the other key
    dims (no RoPE from then on) and all of V are compressed jointly into the latent. `rorope`: every
    frequency pair's keys are mixed across the kv heads by an orthogonal matrix (the layer's `rope_mix`
    parameter); the leading `rope_components[i]` mixed components of every pair keep RoPE, cached after it
    as one key shared by all query heads, and the other components join V in the latent. With `rope_fold`
    F > 1 (FreqFold), F adjacent pairs are mixed together (G F components per group of pairs), and the
    kept components turn at the group's first frequency: an approximation, exact only at F = 1.
    """

    rope_mode: str
    layers: tuple[int, ...]
    latent_dims: tuple[int, ...]  # one per entry of `layers`
    rope_pairs: tuple[tuple[tuple[int, ...], ...], ...] = ()  # partial mode: [layer][kv head] -> pairs
    rope_components: tuple[int, ...] = ()  # rorope mode: mixed components kept per pair, per layer
    rope_fold: int = 1  # rorope mode: adjacent frequency pairs mixed together (FreqFold; 1: none)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "latent_dims", tuple(int(r) for r in self.latent_dims))
        pairs = tuple(
            tuple(tuple(sorted(int(p) for p in head)) for head in layer) for layer in self.rope_pairs
        )
        object.__setattr__(self, "rope_pairs", pairs)
        object.__setattr__(self, "rope_components", tuple(int(m) for m in self.rope_components))

    def index(self, layer: int) -> int | None:
        """Position of `layer` among the converted layers, or None if it is plain GQA."""
        return self.layers.index(layer) if layer in self.layers else None

    def num_rope_pairs(self, layer: int) -> int:
        return len(self.rope_pairs[self.index(layer)][0]) if self.rope_mode == "partial" else 0

    def num_rope_components(self, layer: int) -> int:
        return self.rope_components[self.index(layer)] if self.rope_mode == "rorope" else 0

    @property
    def partial_rope(self) -> bool:
        """Whether some key dims keep RoPE in a cache entry of their own beside the latent and the rest
        lose it (partial, rorope): the modes whose decode attends over the latent, absorbed."""
        return self.rope_mode != "decompressed"

    def rope_values(self, layer: int, head_dim: int, kv_heads: int) -> int:
        """Key values per token that keep RoPE (the `k_rope` cache entry): G * 2n (partial, n pairs per
        kv head), m * head_dim / F (rorope, m components of every group of F pairs), 0 (decompressed)."""
        rorope = head_dim // self.rope_fold * self.num_rope_components(layer)
        return kv_heads * 2 * self.num_rope_pairs(layer) + rorope

    def to_hf(self) -> dict[str, Any]:
        out = {
            "rope_mode": self.rope_mode,
            "layers": list(self.layers),
            "latent_dims": list(self.latent_dims),
        }
        if self.rope_mode == "partial":
            out["rope_pairs"] = [[list(head) for head in layer] for layer in self.rope_pairs]
        if self.rope_mode == "rorope":
            out["rope_components"] = list(self.rope_components)
            out["rope_fold"] = self.rope_fold
        return out

    @classmethod
    def from_hf(cls, mla: dict[str, Any]) -> MlaConfig:
        known = {"rope_mode", "layers", "latent_dims", "rope_pairs", "rope_components", "rope_fold"}
        unknown = sorted(set(mla) - known)
        if unknown:
            raise ConfigError(f"config.json: mla setting(s) {unknown} are not supported")
        return cls(
            mla["rope_mode"],
            mla["layers"],
            mla["latent_dims"],
            mla.get("rope_pairs", ()),
            mla.get("rope_components", ()),
            mla.get("rope_fold", 1),
        )


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int | None = 128
    layer_types: tuple[str, ...] = ()
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope: RopeParams = RopeParams()
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    tie_word_embeddings: bool = False
    # Which key config.json used for rope: transformers 5 `rope_parameters` (theta inside) or the older
    # `rope_scaling` + top-level `rope_theta`. Kept so `to_hf` writes the same layout back.
    rope_key: str = "rope_parameters"
    # Every other config.json key, verbatim, as sorted JSON (a string keeps the dataclass hashable, so
    # the config can be a static argument of `jax.jit`).
    hf_extra: str = "{}"
    # Typed fields that config.json did not contain (transformers filled in defaults); `to_hf` leaves them
    # out again while they still hold the default, so the round trip is exact.
    hf_absent: tuple[str, ...] = ()
    # Multi-head Latent Attention settings of a converted model (None: the original GQA model).
    mla: MlaConfig | None = None

    def __post_init__(self):
        if not self.layer_types:
            default = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", default)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self._validate()

    def _validate(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config.json: layer_types has {len(self.layer_types)} entries but "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"config.json: layer_types contains unsupported {bad}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("config.json: sliding_window must be a positive int when layers slide")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"1..num_local_experts ({self.num_local_experts})"
            )
        if self.rope_key not in ("rope_parameters", "rope_scaling"):
            raise ConfigError(f"rope_key must be rope_parameters or rope_scaling, not {self.rope_key!r}")
        if self.mla is not None:
            self._validate_mla(self.mla)

    def _validate_mla(self, mla: MlaConfig) -> None:
        G, d = self.num_key_value_heads, self.head_dim
        if mla.rope_mode not in ROPE_MODES:
            raise ConfigError(f"mla.rope_mode {mla.rope_mode!r} is not one of {ROPE_MODES}")
        if len(mla.latent_dims) != len(mla.layers) or len(set(mla.layers)) != len(mla.layers):
            raise ConfigError("mla.layers must be distinct and have one entry of mla.latent_dims each")
        if mla.rope_fold != 1 and (
            mla.rope_mode != "rorope" or mla.rope_fold < 1 or (d // 2) % mla.rope_fold
        ):
            raise ConfigError(
                f"mla.rope_fold {mla.rope_fold}: rorope only, and a divisor of the {d // 2} frequency pairs"
            )
        if mla.rope_mode == "rorope":
            if len(mla.rope_components) != len(mla.layers):
                raise ConfigError("mla.rope_components needs one entry per converted layer")
            components = G * mla.rope_fold
            for layer, m in zip(mla.layers, mla.rope_components, strict=True):
                if not 1 <= m <= components:
                    raise ConfigError(
                        f"mla.rope_components of layer {layer}: {m} is outside 1..{components} (the kv heads"
                        " times the pairs folded together)"
                    )
        for layer, r in zip(mla.layers, mla.latent_dims, strict=True):
            if not 0 <= layer < self.num_hidden_layers:
                raise ConfigError(f"mla.layers names layer {layer}; the model has {self.num_hidden_layers}")
            rank = min(self.mla_target_width(layer, mla), self.hidden_size)
            if not 0 < r <= rank:
                raise ConfigError(
                    f"mla latent dim {r} of layer {layer} is outside 1..{rank} (the rank it compresses)"
                )
        if mla.rope_mode == "partial":
            if len(mla.rope_pairs) != len(mla.layers):
                raise ConfigError("mla.rope_pairs needs one entry (per kv head pairs) per converted layer")
            for layer, heads in zip(mla.layers, mla.rope_pairs, strict=True):
                if len(heads) != G or len({len(h) for h in heads}) != 1:
                    raise ConfigError(
                        f"mla.rope_pairs of layer {layer} must list as many pairs for each of {G} kv heads"
                    )
                for head in heads:
                    if len(set(head)) != len(head) or any(not 0 <= p < d // 2 for p in head):
                        raise ConfigError(
                            f"mla.rope_pairs of layer {layer}: {list(head)} are not distinct pairs "
                            f"in 0..{d // 2 - 1}"
                        )

    def mla_target_width(self, layer: int, mla: MlaConfig | None = None) -> int:
        """Values per token that a converted layer's latent replaces: K and V (decompressed), or the
        no-RoPE part of K and all of V (partial, rorope)."""
        mla = mla or self.mla
        G, d = self.num_key_value_heads, self.head_dim
        return 2 * G * d - mla.rope_values(layer, d, G)

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def is_mla(self, layer: int) -> bool:
        """Whether `layer` is converted to Multi-head Latent Attention."""
        return self.mla is not None and self.mla.index(layer) is not None

    # ---- HF round trip -------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | os.PathLike) -> GptOssConfig:
        """Build from a config.json dict, a config.json path, or a model folder holding config.json."""
        if isinstance(source, dict):
            hf = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as f:
                hf = json.load(f)
        model_type = hf.pop("model_type", "gpt_oss")
        if model_type not in ("gpt_oss", "gpt_oss_mla"):
            raise ConfigError(f"config.json: model_type {model_type!r} is not gpt_oss or gpt_oss_mla")
        mla = MlaConfig.from_hf(hf.pop("mla")) if hf.get("mla") is not None else None
        if mla is not None:  # derived from the mla section: to_hf writes them again
            if hf.get("auto_map") == MLA_AUTO_MAP:
                del hf["auto_map"]
            if hf.get("architectures") == MLA_ARCHITECTURES:
                hf["architectures"] = ["GptOssForCausalLM"]
        if (model_type == "gpt_oss_mla") != (mla is not None):
            raise ConfigError("config.json: model_type gpt_oss_mla goes with an 'mla' section, and only it")
        if hf.get("attention_bias", True) is not True:
            raise ConfigError(
                "config.json: attention_bias=false is not supported (gpt-oss has q/k/v/o biases)"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported")
        kwargs = {name: hf.pop(name) for name in _TYPED_FIELDS if name in hf}
        if "num_experts" in hf and "num_local_experts" not in kwargs:
            kwargs["num_local_experts"] = hf.pop("num_experts")
        if kwargs.get("num_key_value_heads") is None and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if kwargs.get("head_dim") is None and "num_attention_heads" in kwargs:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        absent = tuple(sorted(_TYPED_FIELDS - set(kwargs)))
        if "layer_types" in hf:
            kwargs["layer_types"] = tuple(hf.pop("layer_types"))
        if "rope_parameters" in hf and hf["rope_parameters"] is not None:
            rope_key = "rope_parameters"
            rope = RopeParams.from_hf(hf.pop("rope_parameters"), hf.pop("rope_theta", None))
        else:
            rope_key = "rope_scaling"
            rope = RopeParams.from_hf(hf.pop("rope_scaling", None), hf.pop("rope_theta", 150000.0))
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers") if k not in kwargs]
        if missing:
            raise ConfigError(f"config.json: required field(s) {missing} missing")
        return cls(
            **kwargs,
            rope=rope,
            rope_key=rope_key,
            hf_extra=json.dumps(hf, sort_keys=True),
            hf_absent=absent,
            mla=mla,
        )

    def to_hf(self) -> dict[str, Any]:
        out = json.loads(self.hf_extra)
        defaults = GptOssConfig(num_hidden_layers=self.num_hidden_layers)
        for name in _TYPED_FIELDS:
            value = getattr(self, name)
            if name not in self.hf_absent or value != getattr(defaults, name):
                out[name] = value
        out["layer_types"] = list(self.layer_types)
        out["model_type"] = "gpt_oss" if self.mla is None else "gpt_oss_mla"
        if self.mla is not None:
            out["mla"] = self.mla.to_hf()
            out["architectures"], out["auto_map"] = MLA_ARCHITECTURES, MLA_AUTO_MAP
        if self.rope_key == "rope_parameters":
            out["rope_parameters"] = self.rope.to_hf(with_theta=True)
        else:
            out["rope_scaling"] = (
                self.rope.to_hf(with_theta=False) if self.rope.rope_type != "default" else None
            )
            out["rope_theta"] = self.rope.theta
        return out

    def yarn_attention_scale(self) -> float:
        """YaRN's mscale: the factor multiplying cos and sin (so logits carry its square)."""
        rope = self.rope
        if rope.rope_type != "yarn":
            return 1.0
        if rope.attention_factor is not None:
            return float(rope.attention_factor)
        return 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0


# An MLA checkpoint names the PyTorch model that weights.export ships beside it (weights/transformers_mla),
# which transformers loads with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).
MLA_ARCHITECTURES = ["GptOssMlaForCausalLM"]
MLA_AUTO_MAP = {
    "AutoConfig": "configuration_gpt_oss_mla.GptOssMlaConfig",
    "AutoModelForCausalLM": "modeling_gpt_oss_mla.GptOssMlaForCausalLM",
}

_TYPED_FIELDS = frozenset(
    f.name
    for f in dataclasses.fields(GptOssConfig)
    if f.name not in ("rope", "rope_key", "hf_extra", "hf_absent", "layer_types", "mla")
)

GPT_OSS_20B = GptOssConfig(
    num_hidden_layers=24,
    num_local_experts=32,
    hf_extra=json.dumps(
        {"architectures": ["GptOssForCausalLM"], "eos_token_id": 200002, "pad_token_id": 199999},
        sort_keys=True,
    ),
)
GPT_OSS_120B = dataclasses.replace(GPT_OSS_20B, num_hidden_layers=36, num_local_experts=128, layer_types=())
PRESETS = {"gpt-oss-20b": GPT_OSS_20B, "gpt-oss-120b": GPT_OSS_120B}
